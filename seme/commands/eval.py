"""``seme eval MODEL_DIR --suite NAME [--out FILE]`` and ``seme eval MODEL_DIR --data-free --sources …``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model: a task suite (metrics JSON) or data-free diagnostics")
    p.add_argument("model_dir")
    p.add_argument("--suite", default=None, help="suite name: zoo (real zoo) or tiny (CI zoo)")
    p.add_argument("--tasks", nargs="+", default=None, help="only these tasks of the suite")
    p.add_argument("--out", default=None, help="write the metrics JSON here")
    p.add_argument("--zoo", default=None, help="zoo directory holding instruction_set.json (default: cache)")
    p.add_argument("--limit", type=int, default=None, help="at most N items per task (quick runs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--data-free", action="store_true", help="SeMe data-free diagnostics instead of a suite")
    p.add_argument("--sources", nargs="+", default=None, help="source models for --data-free")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import importlib
    import json

    from seme.errors import EvalError

    progress = not getattr(args, "quiet", False)
    args.model_dir = _local(args.model_dir)
    if args.sources:
        args.sources = [_local(s) for s in args.sources]
    if args.data_free:
        if not args.sources:
            raise EvalError("--data-free needs --sources MODEL [MODEL ...]")
        try:
            diag = importlib.import_module("seme.semantic.diagnostics")
        except ModuleNotFoundError as e:
            if e.name != "seme.semantic.diagnostics":
                raise
            raise EvalError("data-free diagnostics are not available: module seme.semantic.diagnostics is missing") from None
        report = diag.data_free_report(args.model_dir, args.sources, args.device)
        if hasattr(diag, "format_report"):
            print(diag.format_report(report))
        else:
            print(json.dumps(report, indent=2))
        if args.out:
            from seme.evaluation import write_metrics

            write_metrics(report, args.out)
        return 0
    if not args.suite:
        raise EvalError("give --suite NAME (zoo, tiny) or --data-free --sources ...")
    from seme.evaluation import evaluate, format_table, write_metrics

    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    metrics = evaluate(args.model_dir, args.suite, tasks=args.tasks, zoo_dir=args.zoo, device=args.device,
                       batch_size=args.batch_size, limit=args.limit, progress=progress)
    print(format_table(metrics))
    if args.out:
        print(f"metrics: {write_metrics(metrics, args.out)}")
    return 0


def _local(path_or_uri: str) -> str:
    """``s3://`` URIs are fetched (sha256-verified, cached) like everywhere a model path is accepted."""
    if str(path_or_uri).startswith("s3://"):
        from seme.storage import resolve_model_path

        return str(resolve_model_path(path_or_uri))
    return path_or_uri
