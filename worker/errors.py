"""Errors the user can fix.

A `UserError` carries a one-line message that names what is wrong and how to fix it. The CLI prints
it without a traceback and exits with code 2; anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input: a missing file, an invalid value, a pack that does not match its manifest."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))
