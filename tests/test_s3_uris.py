"""``s3://`` URIs work everywhere a model path is accepted: merge config, align, inspect, eval.

Real moto S3 server (tests/services.py); models are published with seme's own publish.
"""

from __future__ import annotations

import json
import uuid

import pytest
import torch
import yaml
from safetensors.torch import load_file

from seme.cli import main


@pytest.fixture
def published(s3_server, tmp_path, tiny_model, perturbed, monkeypatch):
    import boto3

    from seme.storage import publish

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.setenv("SEME_CACHE_DIR", str(tmp_path / "cache"))
    bucket = f"uris-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    base = tiny_model("base")
    ft = perturbed(base, "ft", scale=0.05)
    uris = {}
    for name, path in (("base", base), ("ft", ft)):
        uris[name] = f"s3://{bucket}/{name}"
        publish(path, uris[name], endpoint_url=s3_server)
    return uris, {"base": base, "ft": ft}


def _run(capsys, *argv):
    capsys.readouterr()
    rc = main(["-q", *map(str, argv)])
    return rc, *capsys.readouterr()


def test_merge_align_inspect_eval_take_s3_uris(published, tmp_path, capsys):
    uris, local = published
    cfg = {"merge_method": "task_arithmetic", "base_model": uris["base"], "models": [{"model": uris["ft"]}],
           "parameters": {"lambda": 0.5}}
    p = tmp_path / "ta.yaml"
    p.write_text(yaml.safe_dump(cfg))
    rc, _, err = _run(capsys, "merge", p, tmp_path / "out")
    assert rc == 0, err
    man = json.loads((tmp_path / "out" / "seme_manifest.json").read_text())
    assert [i["uri"] for i in man["inputs"]] == [uris["base"], uris["ft"]]
    b, f, m = (load_file(d / "model.safetensors") for d in (local["base"], local["ft"], tmp_path / "out"))
    for k in b:
        assert torch.allclose(m[k], b[k] + 0.5 * (f[k] - b[k]), atol=1e-6), k

    seme_cfg = tmp_path / "seme.yaml"
    seme_cfg.write_text(yaml.safe_dump({"merge_method": "seme", "base_model": uris["base"],
                                        "models": [{"model": uris["ft"]}]}))
    rc, _, err = _run(capsys, "align", seme_cfg, tmp_path / "al")
    assert rc == 0, err
    assert (tmp_path / "al" / "alignment.json").is_file()

    rc, out, err = _run(capsys, "inspect", uris["ft"], "--json")
    assert rc == 0, err
    assert json.loads(out)["family"] == "llama"

    rc, out, err = _run(capsys, "eval", tmp_path / "out", "--data-free", "--sources", uris["base"], uris["ft"])
    assert rc == 0, err
    assert out.strip()


def test_missing_s3_model_is_one_clear_error(published, tmp_path):
    # A real `seme` process (as a user runs it): exactly one error line on stderr, nothing written.
    import subprocess
    import sys

    uris, _ = published
    missing = uris["ft"] + "-nope"
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": uris["ft"]}, {"model": missing}]}))
    r = subprocess.run([sys.executable, "-m", "seme", "-q", "merge", str(p), str(tmp_path / "out")],
                       capture_output=True, text=True, check=False, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert lines[0].startswith("seme: error: ") and "nope" in lines[0]
    assert not (tmp_path / "out").exists()
