"""``seme validate CONFIG``: parse, resolve every model reference, check shapes; merge nothing."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a merge config and its models without merging (exit 0 ok, 2 not)")
    p.add_argument("config", help="merge config (YAML)")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickle (.bin) checkpoints")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from seme.api import validate
    from seme.errors import SemeError

    try:
        report = validate(args.config, allow_pickle=args.allow_pickle)
    except SemeError as e:
        if args.debug:
            raise
        msg = " ".join(str(e).split("\n"))
        if args.json:
            print(json.dumps({"valid": False, "error": msg}))
        print(f"seme: error: {msg}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        out = report["output"]
        print(f"valid: {report['merge_method']} of {len(report['models'])} model(s) -> {out['architecture']}, "
              f"{out['layers']} layers, {out['tensors']} tensors")
    return 0
