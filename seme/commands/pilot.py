"""``seme pilot record|status``: the pilot period's serving evidence (see seme/pilot.py)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pilot", help="record serving evidence for the pilot version; show the promotion decision"
    )
    psub = p.add_subparsers(dest="pilot_command", metavar="ACTION", required=True)

    r = psub.add_parser(
        "record",
        help="log serving metrics of pilot and production over one period to the pilot version's run",
    )
    r.add_argument("name", help="registered model name")
    r.add_argument(
        "--metrics",
        required=True,
        help="YAML/JSON: period {start, end}; metrics {NAME: {pilot: {value, n}, production: {value, n}}}",
    )
    r.add_argument("--version", help="the pilot version (default: the one holding 'pilot')")
    _uri(r)
    r.set_defaults(func=run_record)

    s = psub.add_parser("status", help="the promotion decision now (promote / wait / reject), with p-values")
    s.add_argument("name", help="registered model name")
    s.add_argument("--version", help="the pilot version (default: the one holding 'pilot')")
    s.add_argument("--policy", help="promotion policy YAML (default: seme/policies/promotion.yaml)")
    _uri(s)
    s.set_defaults(func=run_status)


def _uri(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlruns.db)",
    )


def run_record(args: argparse.Namespace) -> int:
    import json

    from seme.pilot import record

    print(json.dumps(record(args.name, args.metrics, version=args.version, tracking_uri=args.tracking_uri)))
    return 0


def run_status(args: argparse.Namespace) -> int:
    import json

    from seme.pilot import status

    d = status(args.name, version=args.version, policy=args.policy, tracking_uri=args.tracking_uri)
    print(json.dumps({"name": args.name, **d.to_dict()}))
    return 0
