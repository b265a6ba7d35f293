"""``seme eval MODEL_DIR --suite NAME | --tasks FILE.yaml [--out FILE]``, ``seme eval --compare A.json B.json …``
and ``seme eval MODEL_DIR --data-free --sources …``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model: a task suite (metrics JSON) or data-free diagnostics")
    p.add_argument("model_dir", nargs="?", help="checkpoint directory or s3:// URI")
    p.add_argument("--suite", default=None, help="built-in suite: zoo (real zoo) or tiny (CI zoo)")
    p.add_argument("--tasks", default=None, metavar="FILE.yaml",
                   help="a task file (path or s3:// URI): exact_match, multiple_choice, perplexity, lm_eval")
    p.add_argument("--only", nargs="+", default=None, metavar="TASK", help="only these tasks of the suite/file")
    p.add_argument("--compare", nargs="+", default=None, metavar="METRICS.json",
                   help="paired comparison: the first metrics JSON against each of the others")
    p.add_argument("--out", default=None, help="write the metrics (or comparison) JSON here")
    p.add_argument("--zoo", default=None, help="zoo directory holding instruction_set.json (default: cache)")
    p.add_argument("--limit", type=int, default=None, help="at most N items per task (quick runs)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype (bfloat16: faster on CPUs with bf16 units; compare at one dtype)")
    p.add_argument("--data-free", action="store_true", help="SeMe data-free diagnostics instead of a suite")
    p.add_argument("--sources", nargs="+", default=None, help="source models for --data-free")
    p.add_argument("--json", action="store_true", help="print the metrics (or report) as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import importlib
    import json

    from seme.errors import EvalError

    progress = not getattr(args, "quiet", False) and not getattr(args, "json", False)
    if args.compare:
        return _compare(args)
    if not args.model_dir:
        raise EvalError("give MODEL_DIR (or --compare A.json B.json ...)")
    if not args.data_free:
        return _evaluate(args, progress)
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
        if getattr(args, "json", False):
            print(json.dumps(report))
        elif hasattr(diag, "format_report"):
            print(diag.format_report(report))
        else:
            print(json.dumps(report, indent=2))
        if args.out:
            from seme.evaluation import write_metrics

            write_metrics(report, args.out)
        return 0


def _evaluate(args: argparse.Namespace, progress: bool) -> int:
    """Task file (or suite) parsed and its data checked first, then the model fetched, then loaded."""
    import json

    from seme.errors import EvalError

    if bool(args.suite) == bool(args.tasks):
        raise EvalError("give --suite NAME (zoo, tiny) or --tasks FILE.yaml (or --data-free --sources ...)")
    from seme.evaluation import evaluate, format_table, open_tasks, write_metrics
    from seme.evaluation.runner import check_model_dir

    if args.tasks:
        from seme.evaluation.taskfile import resolve_source

        tf = open_tasks(task_file=resolve_source(args.tasks), only=args.only, zoo_dir=args.zoo,
                        source=args.tasks)
    else:
        tf = open_tasks(args.suite, only=args.only, zoo_dir=args.zoo)
    args.model_dir = _local(args.model_dir)
    check_model_dir(args.model_dir)
    metrics = evaluate(args.model_dir, task_file=tf, zoo_dir=args.zoo, device=args.device,
                       batch_size=args.batch_size, limit=args.limit, progress=progress, dtype=args.dtype)
    if getattr(args, "json", False):  # the same object --out writes, on stdout
        if args.out:
            write_metrics(metrics, args.out)
        print(json.dumps(metrics))
        return 0
    print(format_table(metrics))
    if args.out:
        print(f"metrics: {write_metrics(metrics, args.out)}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from seme.evaluation import write_metrics
    from seme.evaluation.compare import compare, format_comparison, read_metrics

    files = ([args.model_dir] if args.model_dir else []) + list(args.compare)
    res = compare([read_metrics(f) for f in files], names=files)
    if getattr(args, "json", False):
        import json

        print(json.dumps(res))
    else:
        print(format_comparison(res))
    if args.out:
        print(f"comparison: {write_metrics(res, args.out)}")
    return 0


def _local(path_or_uri: str) -> str:
    """``s3://`` URIs are fetched (sha256-verified, cached) like everywhere a model path is accepted."""
    if str(path_or_uri).startswith("s3://"):
        from seme.storage import resolve_model_path

        return str(resolve_model_path(path_or_uri))
    return path_or_uri
