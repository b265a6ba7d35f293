"""Peak memory of ``seme merge`` on three models, against the target (K+1) × largest tensor + 300 MB.

Not a test (nothing here is timed or asserted by pytest): a script that prints and writes the
numbers. It merges the cached llama-shaped bf16 checkpoints of ``seme bench speed`` (generated on
first use) with each method and reads the child's peak RSS from ``wait4``:

    .venv/bin/python tests/benchmarks/bench_memory.py [--scale 135m|1b|tiny] [--methods linear,ties]

K counts the distinct input checkpoints (three fine-tunes for linear; the base and three
fine-tunes for the task-vector methods; base and one model for slerp). The exit code is 0 when
every method meets the target, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

from seme.bench import speed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", default="135m", choices=list(speed.SCALES))
    p.add_argument("--methods", default="linear,task_arithmetic,ties,dare_ties,slerp")
    p.add_argument("--cache", default=None, help="model cache (default as seme bench speed)")
    p.add_argument("--out", default=None, help="write the results as JSON here too")
    args = p.parse_args(argv)

    models = speed.ensure_models(args.scale, speed.cache_root(args.cache))
    largest = speed.largest_tensor_bytes(models["base"])
    work = speed.cache_root(args.cache) / "runs" / f"memory-{args.scale}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    seme_bin = str(Path(sys.executable).parent / "seme")
    rows, ok = [], True
    try:
        for method in [m for m in args.methods.split(",") if m]:
            cfg = speed.merge_config(method, models)
            cfg_path = work / f"{method}.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            rec = speed.run_timed([seme_bin, "-q", "merge", str(cfg_path), str(work / "out")], work / "log.txt")
            shutil.rmtree(work / "out", ignore_errors=True)
            if rec["rc"] != 0:
                print((work / "log.txt").read_text()[-2000:], file=sys.stderr)
                return 2
            k = len(speed.config_inputs(cfg))
            target = (k + 1) * largest + speed.RSS_SLACK
            hit = rec["peak_rss_bytes"] <= target
            ok &= hit
            rows.append({"method": method, "k": k, "peak_rss_bytes": rec["peak_rss_bytes"], "target_bytes": target,
                         "hit": hit, "wall_s": rec["wall_s"]})
            print(f"{args.scale} {method:16s} K={k} peak RSS {rec['peak_rss_bytes'] / 1e6:7.0f} MB "
                  f"target {target / 1e6:7.0f} MB ({'ok' if hit else 'MISSED'})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"scale": args.scale, "largest_tensor_bytes": largest, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
