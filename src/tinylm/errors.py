"""The one exception type a user can cause; the CLI turns it into a clear message."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TinyLMError(Exception):
    """A problem with the user's input or environment, stated as one sentence with the fix."""

    exit_code = 2  # what the CLI exits with; subclasses (e.g. an interrupted run) choose their own


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A hint ` Did you mean 'x'?` naming the closest of `choices` to a mistyped `word`, or "" if none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""
