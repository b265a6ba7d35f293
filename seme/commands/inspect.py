"""``seme inspect MODEL_DIR``: architecture, layers, parameters, dtypes, sha256."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show a checkpoint's architecture, parameters, dtypes and sha256")
    p.add_argument("model_dir")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-hash", action="store_true", help="skip sha256 of the files")
    p.add_argument("--allow-pickle", action="store_true")
    p.set_defaults(func=run)


def inspect_checkpoint(path: str, hash_files: bool = True, allow_pickle: bool = False) -> dict:
    from collections import Counter

    from seme.checkpoint import open_checkpoint
    from seme.fsutil import sha256_file

    ck = open_checkpoint(path, allow_pickle=allow_pickle)
    arch = ck.architecture
    params = 0
    dtypes: Counter[str] = Counter()
    for n in ck.names:
        numel = 1
        for s in ck.shape(n):
            numel *= s
        params += numel
        dtypes[str(ck.dtype(n)).replace("torch.", "")] += numel
    return {
        "path": str(ck.path),
        "model_type": arch.model_type,
        "family": arch.family,
        "layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "vocab_size": arch.vocab_size,
        "heads": arch.num_heads,
        "kv_heads": arch.num_kv_heads,
        "tied_embeddings": arch.tied_embeddings,
        "tensors": len(ck.names),
        "parameters": params,
        "dtypes": dict(dtypes),
        "files": [
            {"path": f.name, "bytes": f.stat().st_size, **({"sha256": sha256_file(f)} if hash_files else {})}
            for f in ck.files
        ],
    }


def run(args: argparse.Namespace) -> int:
    import json

    info = inspect_checkpoint(args.model_dir, hash_files=not args.no_hash, allow_pickle=args.allow_pickle)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k in ("path", "model_type", "family", "layers", "hidden_size", "vocab_size", "heads", "kv_heads",
              "tied_embeddings", "tensors"):
        print(f"{k:<16} {info[k]}")
    print(f"{'parameters':<16} {info['parameters']:,} ({info['parameters'] / 1e6:.1f} M)")
    print(f"{'dtypes':<16} " + ", ".join(f"{d}: {n:,}" for d, n in info["dtypes"].items()))
    for f in info["files"]:
        print(f"  {f['path']:<40} {f['bytes']:>14,} B  {f.get('sha256', '')}")
    return 0
