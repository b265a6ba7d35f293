"""The robustness promise, as one set of assertions every case in ``tests/robustness`` goes through.

A case runs a real ``seme`` process (``python -m seme …``) against bad input or a fault and then checks
what DEVELOPERS.md promises:

- exit code ≠ 0;
- exactly one line ``seme: error: …`` on stderr, naming the file/tensor/object (``names``);
- no traceback (``Traceback`` never appears without ``--debug``);
- nothing that looks complete left behind (no ``seme_manifest.json`` in the output, no temp dirs);
- inputs and unrelated files byte-identical afterwards (:func:`snapshot` before, compare after).

Every case is a pytest id, so ``pytest tests/robustness -q`` counts them; ``CASES`` in each module
lists the corpus it covers.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ERROR_PREFIX = "seme: error:"


@dataclass
class Result:
    argv: list[str]
    rc: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.startswith(ERROR_PREFIX)]

    def __str__(self) -> str:  # shown by pytest when an assertion fails
        return f"$ seme {' '.join(self.argv)}\nrc={self.rc}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"


def seme_env(**extra: str) -> dict[str, str]:
    """The environment a case runs in: this one, offline, plus ``extra``."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def run_seme(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
             timeout: float = 120, stdin: str | None = None) -> Result:
    """Run ``python -m seme ARGV`` to completion (a hang fails the case through ``timeout``)."""
    p = subprocess.run([sys.executable, "-m", "seme", *map(str, argv)], cwd=cwd, env=env or seme_env(),
                       capture_output=True, text=True, timeout=timeout, input=stdin, check=False)
    return Result([str(a) for a in argv], p.returncode, p.stdout, p.stderr)


def run_seme_inproc(argv: list[str], *, cwd: Path | None = None) -> Result:
    """``seme.cli.main(ARGV)`` in this process, stdout/stderr captured: for cases that only parse and
    validate (≈100x cheaper than a process). An exception escaping ``main`` is what a process would
    have printed as a traceback, so it lands in ``stderr`` as one (and fails ``assert_clean_failure``).
    Kills, signals and races need :func:`run_seme`."""
    import contextlib
    import io
    import traceback

    from seme.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in argv])
            except SystemExit as e:  # argparse
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 - reported like the interpreter would
                err.write(traceback.format_exc())
                rc = 1
    finally:
        os.chdir(old)
    return Result([str(a) for a in argv], rc, out.getvalue(), err.getvalue())


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file (and the target of every symlink) under ``roots``: compare before/after."""
    out: dict[str, str] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        paths = [root] if root.is_file() else sorted(root.rglob("*"))
        for p in paths:
            key = str(p)
            if p.is_symlink():
                out[key] = "link:" + os.readlink(p)
            elif p.is_file():
                out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[key] = "dir"
    return out


def leftover_temps(parent: Path) -> list[Path]:
    """Hidden temporary siblings a seme output step may have left in ``parent``."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name))


def assert_clean_failure(r: Result, *, names: str | list[str] | None = None, out: Path | None = None,
                         before: dict[str, str] | None = None, roots: tuple[Path, ...] = (),
                         rc: int | None = None) -> str:
    """Assert the promise for a failed run; return the one error line.

    ``names``: substring(s) the error line must contain (the file, tensor or object).
    ``out``: an output path that must not look complete afterwards (absent, or without a manifest),
    with no temp directories left beside it. ``before`` + ``roots``: a :func:`snapshot` taken before
    the run that must be unchanged after it.
    """
    assert r.rc != 0, f"expected a failure\n{r}"
    if rc is not None:
        assert r.rc == rc, f"expected exit code {rc}\n{r}"
    assert "Traceback" not in r.stderr, f"traceback without --debug\n{r}"
    lines = r.error_lines
    assert len(lines) == 1, f"expected exactly one '{ERROR_PREFIX}' line, got {len(lines)}\n{r}"
    line = lines[0]
    assert len(line) < 2000, f"error line is {len(line)} characters long\n{r}"
    for n in [names] if isinstance(names, str) else (names or []):
        assert n in line, f"error line does not name {n!r}: {line}\n{r}"
    if out is not None:
        out = Path(out)
        assert not (out / "seme_manifest.json").exists() or before is not None and str(out / "seme_manifest.json") in before, \
            f"{out} looks complete after a failure\n{r}"
        assert not leftover_temps(out.parent), f"temp dirs left: {leftover_temps(out.parent)}\n{r}"
    if before is not None:
        after = snapshot(*roots)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        assert not changed, f"files changed or removed by a failed run: {changed[:10]}\n{r}"
    return line


def try_mount_tmpfs(where: Path, size: str, *, ro: bool = False) -> str | None:
    """Mount a tmpfs of ``size`` at ``where`` (e.g. a small disk to fill); None on success, else why
    not (not root, no ``mount`` permission in this container) for a ``pytest.skip``. Unmount with
    :func:`umount`."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    Path(where).mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True,
                       check=False)
    return None if p.returncode == 0 else f"mount -t tmpfs not permitted here: {p.stderr.strip()[:200]}"


def umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)
