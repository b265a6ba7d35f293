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
        help="log a merge run to MLflow and register the merged checkpoint (pilot alias only if the gate passed)",
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
    p.add_argument("--pipeline-run", help="pipeline run id (tag seme.pipeline_run)")
    p.add_argument(
        "--tag", action="append", default=[], metavar="KEY=VALUE", help="extra version tag (repeatable)"
    )
    _uri(p)
    p.set_defaults(func=run_register)

    p = sub.add_parser("promote", help="move an alias (default production) to a version that passed its gate")
    p.add_argument("name", help="registered model name")
    p.add_argument("--version", help="version to promote (default: the one holding 'pilot')")
    p.add_argument("--to", default="production", help="alias to move (default production)")
    _uri(p)
    p.set_defaults(func=run_promote)

    p = sub.add_parser("rollback", help="swap 'production' and 'previous-production'")
    p.add_argument("name", help="registered model name")
    _uri(p)
    p.set_defaults(func=run_rollback)


def run_register(args: argparse.Namespace) -> int:
    import json

    from seme.errors import ConfigError
    from seme.gates import verify_gate_binding
    from seme.registry import aliases, gate_passed, log_merge_run, register_model

    tags = {}
    for t in args.tag:
        k, sep, v = t.partition("=")
        if not sep or not k:
            raise ConfigError(f"--tag {t!r}: expected KEY=VALUE")
        tags[k] = v
    if args.gate:  # the verdict must be about this checkpoint: checked before anything is logged
        verify_gate_binding(args.gate, args.model_dir)
    ok = gate_passed(args.gate) if args.gate else False
    run_id = args.run_id or log_merge_run(
        args.model_dir,
        metrics=args.metrics,
        gate=args.gate,
        alignment_dir=args.alignment,
        pipeline_run=args.pipeline_run,
        tracking_uri=args.tracking_uri,
    )
    version = register_model(
        args.model_dir,
        args.name,
        run_id,
        tags,
        ok,
        pipeline_run=args.pipeline_run,
        tracking_uri=args.tracking_uri,
    )
    al = {a: v for a, v in aliases(args.name, tracking_uri=args.tracking_uri).items() if v == version}
    print(json.dumps({"name": args.name, "version": version, "run_id": run_id, "gate": "passed" if ok else "failed",
                      "aliases": sorted(al)}))  # fmt: skip
    return 0


def run_promote(args: argparse.Namespace) -> int:
    import json

    from seme.registry import promote

    print(
        json.dumps(
            {"name": args.name, **promote(args.name, args.to, args.version, tracking_uri=args.tracking_uri)}
        )
    )
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    import json

    from seme.registry import rollback

    print(json.dumps({"name": args.name, **rollback(args.name, tracking_uri=args.tracking_uri)}))
    return 0
