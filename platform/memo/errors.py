"""One exception type for every error a user can fix; the CLI prints it as one line and exits non-zero."""


class MemoError(Exception):
    """A problem with the user's input or environment. The message says where and how to fix it."""


class GateRefused(MemoError):
    """A promotion refused by its gate: not bad input, so the CLI exits 3 (2 is for input errors)."""


def where(path, line: int | None = None) -> str:
    """`file:line` prefix used by every input error, so the user can jump straight to the bad spot."""
    return f"{path}:{line}" if line is not None else str(path)
