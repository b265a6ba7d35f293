"""``seme bench quality|speed|eval …``: forwards the remaining arguments to ``seme.bench.<name>.main``."""

from __future__ import annotations

import argparse
import importlib


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: quality (zoo), speed (vs mergekit and the I/O limit), eval (throughput)")
    p.add_argument("which", choices=["quality", "speed", "eval"], help="which benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark (see `seme bench NAME -h`)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    mod = importlib.import_module(f"seme.bench.{args.which}")  # heavy imports live there
    return int(mod.main(list(args.rest)))
