"""Token ids to streamed text: whole characters only, cut at stop strings, a stop's beginning held back."""

from __future__ import annotations

from tinylm.tokenizer import Tokenizer


def truncate_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the first stop string it holds, and whether it held one."""
    cuts = [text.find(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def pending_stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string."""
    return max(
        (n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
        default=0,
    )


class TextStream:
    """Feeds generated ids one at a time and returns the text that is safe to show so far."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.text = ""  # the continuation so far, cut at a stop string
        self.emitted = ""

    def push(self, token: int) -> tuple[str, bool]:
        """(new text to show, whether a stop string ended the text)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its remaining bytes
            self.text = text
            return "", False
        self.text, stopped = truncate_at_stop(text, self.stops)
        if stopped:
            return self.flush(), True
        safe = len(self.text) - pending_stop_prefix(self.text, self.stops)
        if safe <= len(self.emitted):
            return "", False
        piece = self.text[len(self.emitted) : safe]
        self.emitted = self.text[:safe]
        return piece, False

    def flush(self) -> str:
        """Whatever is still held back, once generation has ended."""
        self.text = self.text.rstrip("\ufffd")
        piece = self.text[len(self.emitted) :]
        self.emitted = self.text
        return piece
