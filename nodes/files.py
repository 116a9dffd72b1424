"""Atomic output: a result is either completely written or not there at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import OutputPathError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


class StagedDir:
    """A directory filled over time (a pruned model, block by block) in a temporary
    sibling of ``path``, swapped in place of ``path`` by :meth:`commit` or removed by
    :meth:`discard`: ``path`` is either the old directory or the complete new one."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.target = Path(path)
        self.path = Path(tempfile.mkdtemp(dir=self.target.parent, prefix=f".{self.target.name}."))

    def commit(self) -> None:
        target, old = self.target, None
        try:
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
            os.replace(self.path, target)
        except BaseException:
            self.discard()
            if old is not None and not target.exists():
                os.replace(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def atomic_write_dir(path: str | os.PathLike, fill: Callable[[Path], None]) -> None:
    """Let ``fill`` populate a temporary directory, then swap it in place of ``path``."""
    staged = StagedDir(path)
    try:
        fill(staged.path)
    except BaseException:
        staged.discard()
        raise
    staged.commit()


def check_writable_parent(path: str | os.PathLike, what: str) -> None:
    """Fail before long work if an output's directory does not exist."""
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise OutputPathError(f"{what} directory does not exist: {parent}")


def check_output_file(path: str | os.PathLike, what: str) -> None:
    """Fail before long work if a file cannot be (atomically) written at ``path``."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise OutputPathError(f"{what} names a directory, not a file: {path}")
    check_writable_parent(target, what)
    parent = target.resolve().parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what}: cannot write in {parent}")


def check_output_dir(path: str | os.PathLike, what: str, *, create_parents: bool = False) -> None:
    """Fail before long work if a directory cannot be created or written at ``path``.

    With ``create_parents`` missing parents are fine (they will be created) as
    long as the nearest existing ancestor is a writable directory.
    """
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"{what} names an existing file, not a directory: {path}")
    if not create_parents:
        check_writable_parent(target, what)
    ancestor = target.resolve()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"{what}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what}: cannot write in {ancestor}")
