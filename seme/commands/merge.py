"""``seme merge CONFIG OUT_DIR``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge models per a YAML config into a Hugging Face checkpoint")
    p.add_argument("config", help="merge config (YAML, mergekit's schema)")
    p.add_argument("out_dir", help="output checkpoint directory")
    p.add_argument("--alignment", help="SeMe alignment artifact directory (from `seme align`)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickle (.bin) checkpoints")
    p.add_argument("--json", action="store_true", help="print one JSON object (the result) on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from seme.api import merge

    res = merge(args.config, args.out_dir, alignment=args.alignment, device=args.device,
                overwrite=args.overwrite, allow_pickle=args.allow_pickle,
                progress=not args.quiet and not args.json)
    if args.json:
        m = res.manifest
        print(json.dumps({
            "out_dir": str(res.out_dir), "method": m["method"], "tensors": res.tensors,
            "bytes_written": res.bytes_written, "seconds": round(res.seconds, 3),
            "peak_rss_bytes": res.peak_rss_bytes, "engine": m["engine"], "device": m["device"],
            "config_sha256": m["config_sha256"], "architecture": m["architecture"],
            "files": m["files"],
        }))
        return 0
    print(
        f"merged {res.tensors} tensors ({res.bytes_written / 1e6:.1f} MB) with {res.manifest['method']} "
        f"in {res.seconds:.2f} s, peak RSS {res.peak_rss_bytes / 1e6:.0f} MB -> {res.out_dir}"
    )
    return 0
