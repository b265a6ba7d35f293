"""``seme verify``: check a registered version's files against what was recorded at registration."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="download a registered version and check every file (weights against seme_manifest.json, "
        "the manifest and the MLflow wrapper against the sha256s recorded in the registry)",
    )
    p.add_argument(
        "model", help="NAME@ALIAS, NAME/VERSION or models:/NAME@ALIAS (or NAME with --alias/--version)"
    )
    p.add_argument("--alias", help="alias of NAME (e.g. production)")
    p.add_argument("--version", help="version of NAME")
    p.add_argument(
        "--dest", help="keep the verified copy in this directory (default: removed after the check)"
    )
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlruns.db)",
    )
    p.add_argument("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL_S3)")
    p.set_defaults(func=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    import json

    from seme.registry_model import verify

    res = verify(
        args.model, alias=args.alias, version=args.version, dest=args.dest,
        tracking_uri=args.tracking_uri, endpoint_url=args.endpoint_url,
    )  # fmt: skip
    print(json.dumps({**res, "verified": True}))
    return 0
