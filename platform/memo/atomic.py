"""Atomic writes: a reader (or a crash) never sees half a file or half a folder.

Everything a stage leaves behind (reflections, step parts, stats, converted models, registry downloads,
tenants files) is written under a temporary name beside its target and renamed into place.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write (a file or a whole folder); on success it replaces
    `path` in one rename, on error it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    _remove(tmp)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        if path.is_dir() and tmp.is_dir():  # os.replace cannot replace a non-empty folder
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> Path:
    with atomic_path(path, mode) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()
