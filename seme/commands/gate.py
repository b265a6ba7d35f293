"""``seme gate METRICS --policy FILE``: the validation gate (exit 0 pass, 3 fail)."""

from __future__ import annotations

import argparse

EXIT_FAILED = 3


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gate",
        help="validate a metrics bundle against a gate policy (Great Expectations); exit 0 pass, 3 fail",
        description="METRICS is a bundle: {merged, parents: {base, <expert>...}, experts: {task: expert}, "
        "model_dir?}; see seme/policies/default_gate.yaml.",
    )
    p.add_argument("metrics", help="metrics bundle JSON")
    p.add_argument("--policy", help="gate policy YAML (default: seme/policies/default_gate.yaml)")
    p.add_argument(
        "--out", default=".", help="directory for gate_result.json and gate_summary.md (default .)"
    )
    p.add_argument(
        "--model-dir", help="merged checkpoint for weight checks (default: the bundle's model_dir)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from seme.gates import run_gate

    res = run_gate(args.metrics, args.policy, args.out, model_dir=args.model_dir)
    print(res.summary, end="")
    print(f"\ngate result: {res.result_path}\nsummary: {res.summary_path}")
    return 0 if res.passed else EXIT_FAILED
