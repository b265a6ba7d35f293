"""Registered versions as MLflow models (seme.registry_model) against a real MLflow server whose
artifacts live on a moto S3 server: load by alias with MLflow's own loaders, one copy of the
weights, tampering caught."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import yaml

from seme.errors import RegistryError, StorageError


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setenv("SEME_REGISTRY_RETRIES", "1")
    monkeypatch.setenv("SEME_REGISTRY_BACKOFF", "0.05")


@pytest.fixture
def uri(mlflow_server, s3_server, monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)  # where the published prefixes live
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server)  # MLflow's client reads them from there
    return mlflow_server


@pytest.fixture
def name() -> str:
    return f"seme-mlm-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    """A real merged checkpoint: two tiny llamas (with a real BPE tokenizer) merged by `seme merge`."""
    from conftest import make_tiny_model

    from seme.config import load_config
    from seme.merge import run_merge
    from seme.zoo.base import train_tiny_tokenizer

    root = tmp_path_factory.mktemp("mlm")
    tok = train_tiny_tokenizer(
        ["the quick brown fox jumps over the lazy dog 0123456789"] * 20, vocab_size=300
    )
    srcs = []
    for i in range(2):
        d = make_tiny_model(root / f"src{i}", seed=i, vocab_size=300)
        tok.save_pretrained(str(d))
        srcs.append(d)
    cfg = {"merge_method": "linear", "models": [{"model": str(s), "parameters": {"weight": 0.5}} for s in srcs],
           "dtype": "float32"}  # fmt: skip
    (root / "merge.yaml").write_text(yaml.safe_dump(cfg))
    run_merge(load_config(root / "merge.yaml"), root / "merged", progress=False)
    return root / "merged"


def _bucket(s3_server: str, name: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    try:
        s3.create_bucket(Bucket=name)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass


def _all_keys(s3_server: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    keys = []
    for b in s3.list_buckets()["Buckets"]:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=b["Name"]):
            keys += [f"{b['Name']}/{o['Key']}" for o in page.get("Contents", [])]
    return keys


def test_published_version_loads_by_alias_with_mlflow_loaders(tmp_path, uri, name, merged, s3_server, capsys):
    import mlflow
    import mlflow.pyfunc
    import mlflow.transformers

    from seme.cli import main
    from seme.gates import run_gate
    from seme.registry import PILOT, aliases, client
    from seme.registry_model import register_version, run_name, verify
    from seme.storage import publish

    _bucket(s3_server, "seme-models")
    location = f"s3://seme-models/{name}/run-1"
    publish(merged, location)
    bundle = {"merged": _m(0.75, 20.5), "parents": {"base": _m(0.1, 20.0), "math": _m(0.8, 24.0)},
              "experts": {"arith": "math"}}  # fmt: skip
    gate = run_gate(bundle, None, tmp_path / "gate", model_dir=merged)  # bound to this checkpoint
    rv = register_version(merged, name, metrics=bundle, gate=gate, source_uri=location, pipeline_run="kfp-1")
    assert rv.gate == "passed" and rv.location == location
    assert aliases(name) == {PILOT: rv.version}

    c = client(uri)
    manifest = json.loads((merged / "seme_manifest.json").read_text())
    run = c.get_run(rv.run_id)
    assert run.info.run_name == run_name("linear", name, manifest["config_sha256"])
    assert run.info.run_name == f"linear-{name}-{manifest['config_sha256'][:8]}"
    mv = c.get_model_version(name, rv.version)
    assert mv.source == location and mv.tags["seme.model_id"] == rv.model_id
    lm = c.get_logged_model(rv.model_id)
    assert json.loads(lm.tags["mlflow.modelVersions"]) == [{"name": name, "version": rv.version}]
    assert lm.status.to_proto() == lm.status.READY.to_proto() and lm.source_run_id == rv.run_id
    assert lm.params["method"] == "linear" and lm.params["config_sha256"] == manifest["config_sha256"]
    assert {m.key: m.value for m in lm.metrics}["merged/arith/accuracy"] == 0.75
    found = c.search_logged_models(experiment_ids=[lm.experiment_id], filter_string=f"name = '{name}'")
    assert [m.model_id for m in found] == [rv.model_id]

    info = mlflow.models.get_model_info(f"models:/{name}@{PILOT}")
    assert {"transformers", "python_function"} <= set(info.flavors)
    assert info.signature.inputs.input_types()[0].name == "string"
    seme_meta = info.metadata["seme"]
    assert seme_meta["method"] == "linear" and seme_meta["gate"]["passed"] is True
    assert len(seme_meta["sources"]) == 2 and seme_meta["metrics"]["merged/arith/accuracy"] == 0.75

    pipe = mlflow.transformers.load_model(f"models:/{name}@{PILOT}", dst_path=str(_mk(tmp_path / "t")))
    out = pipe("the quick brown", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert out.startswith("the quick brown") and len(out) > len("the quick brown")
    pyf = mlflow.pyfunc.load_model(f"models:/{name}@{PILOT}", dst_path=str(_mk(tmp_path / "p")))
    pred = pyf.predict(["the lazy dog"], params={"max_new_tokens": 4})
    assert isinstance(pred[0], str) and len(pred[0]) > 0

    # one copy of the weights in the whole object store (models bucket + MLflow's artifact bucket)
    weights = [k for k in _all_keys(s3_server) if k.endswith(".safetensors") and f"/{name}/" in k]
    assert weights == [f"seme-models/{name}/run-1/model.safetensors"]

    # the documented verification passes, then catches a changed weight file
    assert main(["verify", f"{name}@{PILOT}"]) == 0
    res = capsys.readouterr()
    assert json.loads(res.out)["version"] == rv.version
    assert "is not listed" not in res.err  # the MLflow files are checked against the registry, quietly
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    key = f"{name}/run-1/model.safetensors"
    data = bytearray(s3.get_object(Bucket="seme-models", Key=key)["Body"].read())
    data[-1] ^= 0x01
    s3.put_object(Bucket="seme-models", Key=key, Body=bytes(data))
    assert main(["verify", f"models:/{name}@{PILOT}"]) == 1
    # (other test modules may leave a logging handler on a closed stream: look for our line)
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("seme: error: ")]
    assert "model.safetensors" in err and "sha256" in err
    with pytest.raises(StorageError, match="model.safetensors"):
        verify(name, alias=PILOT)


def test_verified_load_and_a_rewritten_manifest(tmp_path, uri, name, merged, s3_server):
    """The verified loader loads only what matches; rewriting the manifest to match a changed file
    is caught by the manifest sha256 recorded in the registry."""
    import boto3

    from seme.fsutil import sha256_file
    from seme.registry_model import load_verified, register_version
    from seme.storage import publish

    _bucket(s3_server, "seme-models")
    location = f"s3://seme-models/{name}/run-2"
    publish(merged, location)
    with pytest.raises(RegistryError, match=r"does not hold the checkpoint .*publish it there first"):
        register_version(merged, name, source_uri=f"s3://seme-models/{name}/never-published")
    rv = register_version(merged, name, source_uri=location)
    assert rv.gate == "failed"  # no gate: registered, no alias
    # what `make demo` ends with: verify, load with mlflow.transformers.load_model, generate one line
    from seme.demo import DEMO_PROMPT, load_back

    line = load_back(name, uri, s3_server, version=rv.version)
    assert line.startswith(DEMO_PROMPT) and len(line) > len(DEMO_PROMPT)
    pipe = load_verified(f"{name}/{rv.version}", dest=tmp_path / "ok")
    assert pipe("the", max_new_tokens=2, do_sample=False)[0]["generated_text"].startswith("the")

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    cfg_key = f"{name}/run-2/config.json"
    cfg = json.loads(s3.get_object(Bucket="seme-models", Key=cfg_key)["Body"].read())
    cfg["rope_theta"] = 1.0
    changed = tmp_path / "config.json"
    changed.write_text(json.dumps(cfg))
    man = json.loads((merged / "seme_manifest.json").read_text())
    for f in man["files"]:
        if f["path"] == "config.json":
            f["sha256"], f["bytes"] = sha256_file(changed), changed.stat().st_size
    s3.put_object(Bucket="seme-models", Key=cfg_key, Body=changed.read_bytes())
    s3.put_object(Bucket="seme-models", Key=f"{name}/run-2/seme_manifest.json", Body=json.dumps(man).encode())
    with pytest.raises(StorageError, match=r"seme_manifest\.json: changed since .* was registered"):
        load_verified(f"{name}/{rv.version}", dest=tmp_path / "bad")
    # a changed MLflow wrapper file (here: the tokenizer the flavor loads) is caught too
    s3.put_object(Bucket="seme-models", Key=f"{name}/run-2/seme_manifest.json",
                  Body=(merged / "seme_manifest.json").read_bytes())  # fmt: skip
    s3.put_object(Bucket="seme-models", Key=cfg_key, Body=(merged / "config.json").read_bytes())
    s3.put_object(Bucket="seme-models", Key=f"{name}/run-2/components/tokenizer/tokenizer.json", Body=b"{}")
    with pytest.raises(
        StorageError, match=r"components/tokenizer/tokenizer\.json: MLflow wrapper file changed"
    ):
        load_verified(f"{name}/{rv.version}", dest=tmp_path / "bad2")


def test_local_checkpoint_becomes_the_logged_models_artifacts(tmp_path, uri, name, merged, s3_server):
    """Without S3 publication the checkpoint is uploaded once, with its wrapper, as the LoggedModel."""
    import mlflow.transformers

    from seme.registry import client
    from seme.registry_model import register_version, verify

    rv = register_version(merged, name)
    assert rv.location == f"models:/{rv.model_id}"
    mv = client(uri).get_model_version(name, rv.version)
    assert mv.source == rv.location and mv.tags["seme.model_id"] == rv.model_id
    pipe = mlflow.transformers.load_model(f"models:/{name}/{rv.version}", dst_path=str(_mk(tmp_path / "t")))
    assert pipe("the", max_new_tokens=2, do_sample=False)[0]["generated_text"].startswith("the")
    weights = [k for k in _all_keys(s3_server) if k.endswith(".safetensors") and rv.model_id in k]
    assert len(weights) == 1
    assert verify(name, version=rv.version)["files"] > 5


def _m(acc: float, ppl: float) -> dict:
    return {"tasks": {"arith": {"metric": "accuracy", "value": acc, "n": 20}},
            "general": {"prose": {"metric": "perplexity", "value": ppl, "n": 500}}}  # fmt: skip


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def test_cli_registers_a_published_prefix_and_a_plain_checkpoint_falls_back(
    tmp_path, uri, name, merged, s3_server, capsys
):
    """`seme register s3://…` reads only the small files from the bucket; a checkpoint that cannot be
    served (no tokenizer) is still registered, as plain files, and says so in a tag."""
    import shutil

    from seme.cli import main
    from seme.registry import client
    from seme.storage import publish

    _bucket(s3_server, "seme-models")
    location = f"s3://seme-models/{name}/cli"
    publish(merged, location)
    assert main(["register", location, "--name", name]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["location"] == location and out["model_id"].startswith("m-") and out["aliases"] == []
    assert main(["verify", name, "--version", out["version"]]) == 0
    capsys.readouterr()

    plain = tmp_path / "plain"
    shutil.copytree(merged, plain)
    for f in plain.glob("tokenizer*"):
        f.unlink()
    assert main(["register", str(plain), "--name", name]) == 0
    v = json.loads(capsys.readouterr().out)["version"]
    tag = client(uri).get_model_version(name, v).tags["seme.mlflow_model"]
    assert tag.startswith("no: ") and "no usable tokenizer" in tag
    assert main(["verify", f"{name}/{v}"]) == 1
    assert "was not registered as an MLflow model by seme" in capsys.readouterr().err
