"""The one exception type a user can cause; the CLI turns it into a clear message."""


class TinyLMError(Exception):
    """A problem with the user's input or environment, stated as one sentence with the fix."""

    exit_code = 2  # what the CLI exits with; subclasses (e.g. an interrupted run) choose their own
