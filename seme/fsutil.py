"""Filesystem helpers: atomic output directories and sha256 of files."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from seme.errors import OutputError

_CHUNK = 8 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that is renamed to ``out_dir`` only on success.

    A failure (any exception) removes the temporary directory, so nothing complete-looking is
    left behind. ``overwrite`` replaces an existing ``out_dir`` only after the new one is complete.
    """
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise OutputError(f"output directory {out} already exists (use --overwrite to replace it)")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output parent directory {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output directory {parent} is not writable")
    tmp = parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise OutputError(f"cannot write to {parent}: {e.strerror}") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
