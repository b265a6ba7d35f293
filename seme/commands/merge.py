"""``seme merge CONFIG OUT_DIR``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge models per a YAML config into a Hugging Face checkpoint")
    p.add_argument("config", help="merge config (YAML, mergekit-compatible subset)")
    p.add_argument("out_dir", help="output checkpoint directory")
    p.add_argument("--alignment", help="SeMe alignment artifact directory (from `seme align`)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickle (.bin) checkpoints")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from seme.config import load_config
    from seme.merge import run_merge

    cfg = load_config(args.config)
    res = run_merge(
        cfg,
        args.out_dir,
        alignment=args.alignment,
        device=args.device,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        progress=not args.quiet,
        config_path=args.config,
    )
    print(
        f"merged {res.tensors} tensors ({res.bytes_written / 1e6:.1f} MB) with {cfg.merge_method} "
        f"in {res.seconds:.2f} s, peak RSS {res.peak_rss_bytes / 1e6:.0f} MB -> {res.out_dir}"
    )
    return 0
