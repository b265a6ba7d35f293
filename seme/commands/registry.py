"""``seme register`` / ``seme promote`` / ``seme rollback``: the MLflow model registry."""

from __future__ import annotations

import argparse


def _uri(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlruns.db)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "register",
        help="log a merge run and register the merged checkpoint as an MLflow model (transformers + pyfunc; "
        "pilot alias only if the gate passed)",
    )
    p.add_argument(
        "model_dir", help="merged checkpoint directory (or an s3:// URI used as the version's source)"
    )
    p.add_argument("--name", default="seme-merged", help="registered model name (default seme-merged)")
    p.add_argument("--metrics", help="metrics JSON or metrics bundle to log (merged + parents)")
    p.add_argument(
        "--gate",
        help="gate_result.json of `seme gate --model-dir MODEL_DIR` (no pilot alias without a passed gate; "
        "refused unless it judged this very checkpoint)",
    )
    p.add_argument("--alignment", help="SeMe alignment directory (alignment.json + plots) to log")
    p.add_argument("--run-id", help="register into this existing run instead of logging a new one")
    p.add_argument(
        "--source-uri",
        help="s3:// prefix MODEL_DIR was published to (the version's location: no second copy)",
    )
    p.add_argument("--pipeline-run", help="pipeline run id (tag seme.pipeline_run)")
    p.add_argument(
        "--tag", action="append", default=[], metavar="KEY=VALUE", help="extra version tag (repeatable)"
    )
    _uri(p)
    p.set_defaults(func=run_register)

    p = sub.add_parser(
        "promote",
        help="move an alias (default production: only once the pilot evidence suffices, see --policy)",
    )
    p.add_argument("name", help="registered model name")
    p.add_argument("--version", help="version to promote (default: the one holding 'pilot')")
    p.add_argument("--to", default="production", help="alias to move (default production)")
    p.add_argument(
        "--policy",
        help="promotion policy YAML: the pilot evidence production needs (default: seme/policies/promotion.yaml)",
    )
    p.add_argument(
        "--skip-evidence",
        action="store_true",
        help="break glass: promote without pilot evidence (tagged seme.pilot=skipped-evidence on the version)",
    )
    _uri(p)
    p.set_defaults(func=run_promote)

    p = sub.add_parser("rollback", help="swap 'production' and 'previous-production'")
    p.add_argument("name", help="registered model name")
    _uri(p)
    p.set_defaults(func=run_rollback)


def run_register(args: argparse.Namespace) -> int:
    import json

    from seme.errors import ConfigError
    from seme.registry import aliases
    from seme.registry_model import register_version

    tags = {}
    for t in args.tag:
        k, sep, v = t.partition("=")
        if not sep or not k:
            raise ConfigError(f"--tag {t!r}: expected KEY=VALUE")
        tags[k] = v
    rv = register_version(
        args.model_dir,
        args.name,
        metrics=args.metrics,
        gate=args.gate,
        alignment_dir=args.alignment,
        source_uri=args.source_uri,
        run_id=args.run_id,
        tags=tags,
        pipeline_run=args.pipeline_run,
        tracking_uri=args.tracking_uri,
    )
    version = rv.version
    al = {a: v for a, v in aliases(args.name, tracking_uri=args.tracking_uri).items() if v == version}
    print(json.dumps({"name": args.name, "version": version, "run_id": rv.run_id, "gate": rv.gate,
                      "model_id": rv.model_id, "location": rv.location, "aliases": sorted(al)}))  # fmt: skip
    return 0


def run_promote(args: argparse.Namespace) -> int:
    import json

    from seme import pilot, registry

    if args.to != registry.PRODUCTION or args.skip_evidence:
        moves = registry.promote(args.name, args.to, args.version, tracking_uri=args.tracking_uri)
        if args.to == registry.PRODUCTION:
            c = registry.client(args.tracking_uri)
            c.set_model_version_tag(args.name, moves[args.to], pilot.TAG_PILOT, "skipped-evidence")
        print(json.dumps({"name": args.name, **moves}))
        return 0
    d = pilot.promote(args.name, version=args.version, policy=args.policy, tracking_uri=args.tracking_uri)
    if d.action == "wait":
        raise pilot.NotYet(f"refusing to promote {args.name} version {d.version} yet: {'; '.join(d.reasons)}")
    if d.action == "reject":
        raise pilot.Rejected(
            f"{args.name} version {d.version} rejected, alias pilot removed, production stays at "
            f"{d.production or 'no version'}: {'; '.join(d.reasons)}"
        )
    prev = registry.aliases(args.name, tracking_uri=args.tracking_uri).get(registry.PREVIOUS)
    print(json.dumps({"name": args.name, registry.PRODUCTION: d.production, registry.PREVIOUS: prev,
                      "evidence": d.reasons, "tests": {m: t["p_value"] for m, t in d.tests.items()}}))  # fmt: skip
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    import json

    from seme.registry import rollback

    print(json.dumps({"name": args.name, **rollback(args.name, tracking_uri=args.tracking_uri)}))
    return 0
