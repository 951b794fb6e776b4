"""Atomic directory writes: build in a temp dir beside the target, then rename into place.

A crash (or SIGKILL) leaves either the old directory or the new one, never half
of one; leftovers are hidden `.tmp-*` dirs that the next write cleans up.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from expertkit.errors import ExpertkitError


def ensure_writable_dir(path: Path, what: str) -> None:
    """Create `path` if needed and prove we can write there, before any long work starts."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-").close()  # created, then deleted
    except OSError as e:
        raise ExpertkitError(f"{what} {path} is not writable ({e.strerror}); choose a folder you can write to") from None


@contextmanager
def atomic_dir(target: Path, overwrite: bool = False):
    """Yield a temp dir; on success it replaces `target` in one rename."""
    target = Path(target)
    ensure_writable_dir(target.parent, "output folder")
    for stale in target.parent.glob(f".tmp-{target.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            if not overwrite:
                raise ExpertkitError(f"{target} already exists; remove it or pass --force")
            old = target.parent / f".tmp-{target.name}-old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file whole or not at all: readers never see half of it, a crash leaves the old one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_of(path: Path) -> str:
    """Hex sha256 of a (possibly large) file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
