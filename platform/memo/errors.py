"""One exception type for every error a user can fix; the CLI prints it as one line and exits non-zero."""


class MemoError(Exception):
    """A problem with the user's input or environment. The message says where and how to fix it."""


class Unavailable(MemoError):
    """A part that is coming back (an engine process being restarted): the request may be sent again after
    `retry_after` seconds. The router answers it with 503 and a Retry-After header."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class GateRefused(MemoError):
    """A promotion refused by its gate: not bad input, so the CLI exits 3 (2 is for input errors)."""


def where(path, line: int | None = None) -> str:
    """`file:line` prefix used by every input error, so the user can jump straight to the bad spot."""
    return f"{path}:{line}" if line is not None else str(path)
