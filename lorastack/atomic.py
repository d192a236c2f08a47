"""Atomic directory publication: build in a temporary sibling, then one `rename`.

A crash or Ctrl-C at any point leaves either the old state or the new one, never a
half-written directory under the final name. Temporary siblings start with `.tmp-` so a
later open can sweep them away.

Several processes may share one library (a server importing while the CLI lists or
trains), so a staging directory carries its owner: the writing process holds an exclusive
`flock` on it until it is published or removed. A sweep removes only directories whose lock
it can take (the owner is gone, even by SIGKILL: the kernel drops the lock with the
process) and that are older than a short grace period (the instant between `mkdtemp` and
`flock`). `locked` serialises whole writes (stage, check, publish, index) across processes.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"
# A staging directory younger than this is never swept, locked or not: its owner may be
# between creating and locking it. Files (`write_text_atomic`) are not locked and live for
# milliseconds, so they are swept only once clearly abandoned.
STAGING_GRACE_S = 5.0
STALE_FILE_S = 600.0


@contextlib.contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive inter-process lock on `lock_file` (created if missing)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


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
def staging_dir(parent: Path, prefix: str = TMP_PREFIX) -> Iterator[Path]:
    """A fresh temporary directory inside `parent` (same filesystem, so rename is atomic),
    locked by this process while the block runs (see the module docstring).

    Removed on any exception, including KeyboardInterrupt; the caller publishes it with
    `publish_dir` before the block ends.
    """
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    else:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        os.close(fd)


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
        if _exchange(tmp, final):  # one atomic swap: readers never see `final` missing
            fsync_dir(final.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the old version
            return
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`); False where the
    system or filesystem cannot, and the caller falls back to rename-aside + rename."""
    global _renameat2
    if _renameat2 is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            _renameat2 = libc.renameat2
            _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        except (OSError, AttributeError):
            _renameat2 = False
    if not _renameat2:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


_renameat2 = None  # resolved on first use


# A read that fails because its directory was replaced meanwhile is tried again on the new
# copy; a replace loop faster than a read cannot keep a reader spinning past this many tries.
READ_ATTEMPTS = 3


def dir_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the directory at `path`, or None when nothing is there.

    A reader compares this before and after a failed read: a different identity means the
    directory was replaced (an overwrite publishes a new inode) or removed (`remove` renames
    it aside) while it was being read, so the failure says nothing about the adapter.
    """
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def sweep_tmp(parent: Path, prefix: str = TMP_PREFIX) -> list[Path]:
    """Delete leftovers of interrupted writes whose owner is gone; returns what was removed."""
    removed = []
    if not parent.is_dir():
        return removed
    now = time.time()
    for p in parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        try:
            st = p.lstat()
        except FileNotFoundError:
            continue  # its owner just published or removed it
        if p.is_dir() and not p.is_symlink():
            if now - st.st_mtime < STAGING_GRACE_S:
                continue
            if _remove_unowned_dir(p):
                removed.append(p)
        elif now - st.st_mtime >= STALE_FILE_S:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _remove_unowned_dir(path: Path) -> bool:
    """Remove `path` if no live process holds its lock."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live owner is still writing it
        shutil.rmtree(path, ignore_errors=True)
        return not path.exists()
    finally:
        os.close(fd)


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
