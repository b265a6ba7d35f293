"""Filesystem helpers: atomic, no-clobber output directories; stale temp cleanup; sha256 of files.

An output directory is written as a hidden sibling ``.NAME.tmp-<host>-<pid>-<rand>`` and renamed into
place at the end with a no-replace rename (``renameat2(RENAME_NOREPLACE)``), so of two runs writing
one OUT_DIR exactly one wins and nothing anyone else created there is ever replaced. ``--overwrite``
replaces only a finished seme output (it holds ``seme_manifest.json`` or seme's ``alignment.json``),
never an input, an ancestor of an input or of the current directory; the old output is swapped out
atomically at the very end (``RENAME_EXCHANGE``). Temp names carry their owner, so a later run removes
the ones whose process is gone (same host only).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from seme.errors import OutputError

_CHUNK = 8 << 20
#: files whose presence (written by seme) makes a directory a finished seme output
OUTPUT_MARKERS = ("seme_manifest.json", "alignment.json")
#: errors that mean "the output could not be written" (reported as OutputError naming the path)
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
#: errors that are write errors when they concern the output (no file name, or one inside it)
_OUT_ERRNOS = frozenset({errno.EIO, errno.EACCES, errno.EPERM})
_TEMP_RE = re.compile(r"^\..+\.(?:tmp|old)-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}$")
_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100

log = logging.getLogger(__name__)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def open_regular(path: str | os.PathLike, error: type[Exception] = OutputError) -> int:
    """``os.open`` for reading that refuses anything but a regular file: a FIFO is opened without
    blocking and refused, a device or socket never read. Returns the descriptor; ``error`` (a
    SemeError class) names the file on failure."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(f"{path}: cannot open ({e.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"{path}: not a regular file (a FIFO, device or socket is refused)")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


# ------------------------------------------------------------------------------------------------
# Owner-tagged temporaries and their cleanup
# ------------------------------------------------------------------------------------------------


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64] or "host"


def temp_name(name: str, kind: str = "tmp") -> str:
    """``.NAME.tmp-<host>-<pid>-<rand>``: a hidden sibling that says which process owns it."""
    return f".{name[:100]}.{kind}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temps(parent: str | os.PathLike) -> list[Path]:
    """Remove seme temp siblings in ``parent`` whose owning process (on this host) is gone.

    Only names of the form ``temp_name`` makes are touched; others' hosts and live processes are left
    alone. Returns what was removed. Called at the start of ``merge``/``align`` and by ``atomic_dir``.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    host, me = _host(), os.getpid()
    for e in entries:
        m = _TEMP_RE.match(e.name)
        if not m or m["host"] != host:
            continue
        pid = int(m["pid"])
        if pid == me or _alive(pid):
            continue
        p = Path(e.path)
        log.info("removing stale temporary %s (process %d is gone)", p, pid)
        if e.is_dir(follow_symlinks=False):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    return removed


# ------------------------------------------------------------------------------------------------
# Which directories --overwrite may replace
# ------------------------------------------------------------------------------------------------


def is_seme_output(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory seme finished: ``seme_manifest.json`` with a seme version, or
    the ``alignment.json`` of ``seme align``."""
    p = Path(path)
    if p.is_symlink() or not p.is_dir():
        return False
    for marker, key in (("seme_manifest.json", "seme_version"), ("alignment.json", "format_version")):
        f = p / marker
        if not f.is_file() or f.stat().st_size > 64 << 20:
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and key in data:
            return True
    return False


def _real(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(p))))


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool = False, *, protect: Iterable[str | os.PathLike] = (),
                  markers: tuple[str, ...] | None = OUTPUT_MARKERS) -> Path:
    """Refuse an OUT_DIR that a run may not write; return it as an absolute path.

    Without ``overwrite`` it must not exist. With it, an existing OUT_DIR must be a finished seme output
    (``markers``; None: any directory, for seme's own caches) and must be neither a path in ``protect``
    (the run's inputs) nor an ancestor of one, nor the current directory or an ancestor of it.
    """
    out = Path(os.path.abspath(os.path.expanduser(str(out_dir))))
    if not os.path.lexists(out):
        return out
    if not overwrite:
        raise OutputError(f"output directory {out} already exists (use --overwrite to replace it)")
    if out.is_symlink():
        raise OutputError(f"output directory {out} is a symlink; --overwrite replaces only a real directory")
    if not out.is_dir():
        raise OutputError(f"output path {out} exists and is not a directory; --overwrite will not replace it")
    real = _real(out)
    guarded = [(Path.cwd(), "the current directory")]
    guarded += [(_real(p), "an input") for p in protect if p and not str(p).startswith("s3://")]
    for p, what in guarded:
        if p == real or real in p.parents:
            which = "is" if p == real else "holds"
            raise OutputError(f"output directory {out} {which} {what} ({p}); --overwrite will not replace it")
    if markers is not None and not is_seme_output(out):
        raise OutputError(
            f"output directory {out} is not a finished seme output (no {' or '.join(markers)}); "
            "--overwrite replaces only what seme wrote"
        )
    return out


# ------------------------------------------------------------------------------------------------
# No-clobber renames
# ------------------------------------------------------------------------------------------------


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False when the system or filesystem lacks it. Raises OSError."""
    fn = getattr(_libc(), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


_LIBC: list = []


def _libc():
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except OSError:  # pragma: no cover - no C library to load
            _LIBC.append(None)
    return _LIBC[0]


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (FileExistsError), atomically.

    Fallback where ``renameat2`` is missing: claim ``dst`` with ``mkdir`` (atomic, fails if it exists),
    then rename onto that empty directory, which fails if anyone has put anything in it meanwhile.
    """
    src, dst = Path(src), Path(dst)
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(e.errno, "exists", str(dst)) from None
        raise
    os.mkdir(dst)  # FileExistsError if taken
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(e.errno, "exists", str(dst)) from None
        with contextlib.suppress(OSError):
            os.rmdir(dst)  # our empty claim
        raise


# ------------------------------------------------------------------------------------------------
# atomic_dir
# ------------------------------------------------------------------------------------------------


def _write_error(e: OSError, tmp: Path, out: Path) -> OutputError:
    where = str(e.filename) if e.filename else str(out)
    if where.startswith(str(tmp)):
        where = str(out) + where[len(str(tmp)):]
    return OutputError(f"cannot write {where}: {e.strerror or e}")


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False, *, protect: Iterable[str | os.PathLike] = (),
               markers: tuple[str, ...] | None = OUTPUT_MARKERS) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``out_dir`` only on success, never clobbering.

    A failure (any exception, SIGINT/SIGTERM included) removes the temporary directory, so nothing
    complete-looking is left; write errors (disk full …) become OutputError naming the file. At the
    end the temp dir is renamed into place without replacing anything; if ``out_dir`` appeared in the
    meantime the run fails (OutputError) and leaves it alone. ``overwrite`` replaces an existing
    ``out_dir`` only if :func:`check_out_dir` allows it, checked again at the end.
    """
    protect = list(protect)
    out = check_out_dir(out_dir, overwrite, protect=protect, markers=markers)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output parent directory {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output directory {parent} is not writable")
    clean_stale_temps(parent)
    tmp = parent / temp_name(out.name)
    try:
        tmp.mkdir()
    except OSError as e:
        raise OutputError(f"cannot write to {parent}: {e.strerror}") from None
    try:
        yield tmp
        _commit(tmp, out, overwrite, protect, markers)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        ours = not e.filename or str(e.filename).startswith(str(tmp))
        if e.errno in _WRITE_ERRNOS or ours and e.errno in _OUT_ERRNOS:
            raise _write_error(e, tmp, out) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit(tmp: Path, out: Path, overwrite: bool, protect: list, markers: tuple[str, ...] | None) -> None:
    """Move the finished ``tmp`` to ``out`` without clobbering (see :func:`atomic_dir`)."""
    if overwrite and os.path.lexists(out):
        check_out_dir(out, True, protect=protect, markers=markers)  # again: it may have changed
        aside = out.parent / temp_name(out.name, "old")
        try:
            swapped = _renameat2(tmp, out, _RENAME_EXCHANGE)  # atomically: out <- new, tmp <- old
        except FileNotFoundError:
            swapped = None  # out vanished meanwhile: a plain no-replace rename below
        if swapped:
            if markers is not None and not is_seme_output(tmp):  # replaced by something else meanwhile
                _renameat2(tmp, out, _RENAME_EXCHANGE)  # put it back
                raise OutputError(f"output directory {out} changed while this run was writing; left as it is")
            os.rename(tmp, aside)
            shutil.rmtree(aside, ignore_errors=True)
            return
        if swapped is False:  # no RENAME_EXCHANGE here: move the old output aside first
            os.rename(out, aside)
            try:
                rename_noreplace(tmp, out)
            except BaseException:
                with contextlib.suppress(OSError):
                    rename_noreplace(aside, out)
                raise
            shutil.rmtree(aside, ignore_errors=True)
            return
    try:
        rename_noreplace(tmp, out)
    except FileExistsError:
        raise OutputError(
            f"output directory {out} appeared while this run was writing (another seme run?); "
            "left as it is, nothing written"
        ) from None
