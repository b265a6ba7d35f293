"""The ``seme`` command line: one entry point, subcommands in ``seme.commands.*``.

Each command module's ``register`` imports only the standard library, so ``seme --help`` is fast;
heavy imports happen inside each command's ``run``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import signal
import sys
import threading

from seme import __version__

# torch's OpenMP workers otherwise spin after every parallel region; on a busy 2-core machine that
# spinning took CPU from everything else (SeMe's align cost 2-3x more CPU). Must precede any torch
# import; a value set by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# numpy's own OpenBLAS starts a thread per core at import, and those threads spin-wait; seme makes no
# BLAS call through numpy (torch brings MKL), so they only took CPU from the merge kernels.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

COMMAND_MODULES = (
    "merge",
    "validate",
    "inspect",
    "align",
    "eval",
    "zoo",
    "bench",
    "storage",
    "gate",
    "registry",
    "registry_model",
    "pilot",
    "pipeline",
)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (not the stream of the first call), so
    in-process callers that swap stderr (tests, notebooks) never hit a closed stream."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass

    def format(self, record: logging.LogRecord) -> str:
        from seme.errors import redact_url

        return redact_url(super().format(record))  # no password of an endpoint URL in any log line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seme",
        description="Merge language models without training or data (SeMe and classic methods).",
    )
    parser.add_argument("--version", action="version", version=f"seme {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        modname = f"seme.commands.{name}"
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:
                continue
            raise
        mod.register(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every ``finally``/cleanup runs (temp dirs removed)."""


def _on_sigterm(_signum, _frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run one command; SIGTERM is handled like SIGINT while it runs (cleanup, one error line)."""
    in_main = threading.current_thread() is threading.main_thread()
    prev = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    try:
        return _main(argv)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, prev if prev is not None else signal.SIG_DFL)


def _main(argv: list[str] | None) -> int:
    # Importing torch and friends allocates ~10⁶ objects; with the default thresholds the cycle
    # collector ran hundreds of times during imports alone (~0.3 s of a 135M merge's CPU time).
    gc.set_threshold(100_000, 50, 1000)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        handlers=[_StderrHandler()],
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from seme.errors import SemeError

    try:
        return int(args.func(args) or 0)
    except SemeError as e:
        if args.debug:
            raise
        from seme.errors import redact_url

        msg = redact_url(" ".join(str(e).split("\n")))
        if len(msg) > 1000:  # a message quoting a huge input stays one readable line
            msg = msg[:1000] + " …"
        print(f"seme: error: {msg}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        print("seme: error: interrupted", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except OSError as e:
        if args.debug:
            raise
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"seme: error:{where} {e.strerror or e}", file=sys.stderr)
        return 1


def run() -> int:
    """The ``seme`` executable: :func:`main`, then a fast exit.

    ``gc.freeze()`` before the interpreter exits keeps its final collection from walking torch's
    ~10⁶ objects: 0.4 s of CPU on every command that imported torch. (Not done by ``main`` itself,
    which in-process callers such as tests use.)
    """
    rc = main()
    gc.freeze()
    return rc


if __name__ == "__main__":
    sys.exit(run())
