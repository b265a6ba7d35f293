"""`make demo`: the main job end to end on embedded defaults.

Builds (or reuses) the tiny zoo, runs the whole merge pipeline locally (KFP local runner, an
in-process S3 server, a local SQLite MLflow store) with SeMe, and prints a summary. Where a part
of the pipeline is not installed, it says so and runs what it can.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


def _small_merge(work: Path) -> int:
    """Fallback demo: merge three generated tiny llama models with TIES and show the result."""
    import torch
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    from seme.config import load_config
    from seme.merge import run_merge

    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg)
    base.save_pretrained(work / "base")
    paths = []
    for i in range(2):
        with torch.no_grad():
            for p in base.parameters():
                p.add_(0.01 * torch.randn_like(p))
        base.save_pretrained(work / f"expert{i}")
        paths.append(work / f"expert{i}")
    conf = {
        "merge_method": "ties",
        "base_model": str(work / "base"),
        "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in paths],
        "dtype": "float32",
    }
    (work / "merge.yaml").write_text(yaml.safe_dump(conf))
    res = run_merge(load_config(work / "merge.yaml"), work / "merged")
    print(f"merged model: {res.out_dir}")
    print(json.dumps({k: res.manifest[k] for k in ("method", "tensors", "wall_seconds", "peak_rss_bytes")}))
    return 0


DEMO_PROMPT = "The capital of France is"


def load_back(name: str, tracking_uri: str, s3_endpoint: str | None, version: str | None = None) -> str:
    """Load the registered version the way a serving platform would, and generate one line.

    ``models:/NAME@pilot`` (or ``models:/NAME/VERSION`` when the gate failed and no alias was set) is
    first checked file by file (``seme verify``: weights against the manifest, manifest and MLflow
    wrapper against the sha256s recorded at registration), then loaded with MLflow's own
    ``mlflow.transformers.load_model``; returns the generated text (prompt included).
    """
    import os

    import mlflow
    import mlflow.transformers

    from seme.registry_model import verify

    uri = f"models:/{name}/{version}" if version else f"models:/{name}@pilot"
    if s3_endpoint:  # MLflow's own S3 client reads the endpoint from here
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", s3_endpoint)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    checked = verify(uri, tracking_uri=tracking_uri, endpoint_url=s3_endpoint)
    print(f"verified {uri}: {checked['files']} files match the registered sha256s", file=sys.stderr)
    pipe = mlflow.transformers.load_model(uri)
    out = pipe(DEMO_PROMPT, max_new_tokens=16, do_sample=False)[0]["generated_text"]
    return " ".join(str(out).split())


def main() -> int:
    try:
        from pipelines.local import run_demo  # the full pipeline (KFP local runner)
    except ModuleNotFoundError:
        run_demo = None
    if run_demo is not None:
        return int(run_demo() or 0)
    work = Path(tempfile.mkdtemp(prefix="seme-demo-"))
    print("pipeline package not available; running a small local merge instead", file=sys.stderr)
    return _small_merge(work)


if __name__ == "__main__":
    sys.exit(main())
