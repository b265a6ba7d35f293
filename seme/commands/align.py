"""``seme align CONFIG OUT_DIR``: the SeMe alignment artifact (weights in, artifact out; no data)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("align", help="compute the SeMe alignment artifact for a merge config (data-free)")
    p.add_argument("config", help="merge config with merge_method: seme")
    p.add_argument("out_dir", help="artifact directory (alignment.json, alignment.safetensors, plots)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickle (.bin) checkpoints")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import time

    from seme.semantic.alignment import align

    t0 = time.perf_counter()
    out = align(args.config, args.out_dir, device=args.device, overwrite=args.overwrite,
                allow_pickle=args.allow_pickle)
    meta = json.loads((out / "alignment.json").read_text())
    rot = meta["rotation"]
    permuted = sum(
        len(m["mlp_permuted_layers"]) + len(m["attn_permuted_layers"]) for m in meta["models"].values()
    )
    print(
        f"aligned {len(meta['models'])} models to {meta['anchor']} in {time.perf_counter() - t0:.2f} s: "
        f"rotation {'applied' if rot['applied'] else 'not applied'} ({rot['reason']}), "
        f"{permuted} permuted layer modules, |T| = {meta['token_subset']['size']} -> {out}"
    )
    return 0
