"""Atomic directory publication: build in a temporary sibling, then one `rename`.

A crash or Ctrl-C at any point leaves either the old state or the new one, never a
half-written directory under the final name. Temporary siblings start with `.tmp-` so a
later open can sweep them away.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    """Persist a directory entry change (the rename itself) on POSIX filesystems."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())


@contextlib.contextmanager
def staging_dir(parent: Path) -> Iterator[Path]:
    """A fresh temporary directory inside `parent` (same filesystem, so rename is atomic).

    Removed on any exception, including KeyboardInterrupt; the caller publishes it with
    `publish_dir` before the block ends.
    """
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    else:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: Path, final: Path, replace: bool = False) -> None:
    """Move a fully written `tmp` to `final` in one step.

    With `replace`, an existing `final` is first renamed aside and deleted only after the
    new one is in place, so a crash in between still leaves one complete copy.
    """
    fsync_tree(tmp)
    old: Path | None = None
    if final.exists():
        if not replace:
            raise FileExistsError(final)
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sweep_tmp(parent: Path) -> list[Path]:
    """Delete leftovers of interrupted writes; returns what was removed."""
    removed = []
    if parent.is_dir():
        for p in parent.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small file via temp file + rename so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
