"""The one root exception. Messages say what went wrong and what to do; only cli.py exits."""


class SockmapError(Exception):
    """A failure the user can act on. str() is the whole message, hint included."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)
