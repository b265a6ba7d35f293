"""seme.registry against a real MLflow server (SQLite backend, artifacts on the moto bucket).

Faults are real too: a TCP proxy in front of the server (tests/services.py) that goes down or drops
chosen requests, and a port nothing listens on.
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from services import MLFLOW_BUCKET, CuttingProxy, free_port

from seme.errors import RegistryError
from seme.fsutil import sha256_file
from seme.registry import (
    PILOT,
    PREVIOUS,
    PRODUCTION,
    aliases,
    client,
    log_merge_run,
    promote,
    register_model,
    rollback,
    set_alias,
)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    """One retry, short backoff, no hidden HTTP retries: a down server fails in well under a second."""
    monkeypatch.setenv("SEME_REGISTRY_RETRIES", "1")
    monkeypatch.setenv("SEME_REGISTRY_BACKOFF", "0.05")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


@pytest.fixture
def uri(mlflow_server, monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return mlflow_server


@pytest.fixture
def name() -> str:
    return f"seme-test-{uuid.uuid4().hex[:8]}"


def merged_dir(root: Path, seed: int = 0) -> Path:
    """A merged checkpoint as `seme merge` writes it: safetensors, config, model card, manifest."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    save_file(
        {"lm_head.weight": rng.standard_normal((64, 16), dtype=np.float32)}, str(root / "model.safetensors")
    )
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    (root / "README.md").write_text("# Merged model (ties)\n")
    files = [
        {"path": n, "sha256": sha256_file(root / n), "bytes": (root / n).stat().st_size}
        for n in ("README.md", "config.json", "model.safetensors")
    ]
    inputs = [
        {"uri": f"s3://zoo/expert{i}", "local_path": f"/cache/e{i}", "files": [{"path": "model.safetensors", "sha256": f"{i}" * 64, "bytes": 10}]}
        for i in range(2)
    ]  # fmt: skip
    manifest = {
        "seme_version": "0.1.0", "method": "ties", "seed": 0, "dtype": "float32", "out_dtype": "as input",
        "parameters": {"global": {"normalize": True, "lambda": 1.0}, "models": [{"model": "s3://zoo/expert0", "weight": 1.0, "density": 0.5}]},
        "config_sha256": hashlib.sha256(f"cfg{seed}".encode()).hexdigest(), "inputs": inputs, "files": files,
    }  # fmt: skip
    (root / "seme_manifest.json").write_text(json.dumps(manifest))
    return root


def bundle() -> dict:
    def m(tasks, ppl):
        return {"tasks": {t: {"metric": "accuracy", "value": v, "n": 20} for t, v in tasks.items()},
                "general": {"prose": {"metric": "perplexity", "value": ppl, "n": 500}}}  # fmt: skip

    return {
        "merged": m({"arith": 0.75, "capitals": 0.70}, 20.5),
        "parents": {"base": m({"arith": 0.1, "capitals": 0.3}, 20.0), "math": m({"arith": 0.8}, 24.0), "geo": m({"capitals": 0.74}, 23.0)},
        "experts": {"arith": "math", "capitals": "geo"},
    }  # fmt: skip


def test_log_merge_run_and_register_without_loading(tmp_path, uri, name, s3_server):
    import boto3
    import mlflow

    from seme.gates import run_gate

    model = merged_dir(tmp_path / "merged")
    gate = run_gate(bundle(), None, tmp_path / "gate")
    assert gate.passed
    align = tmp_path / "align"
    align.mkdir()
    (align / "alignment.json").write_text(json.dumps({"method": "seme", "layers": 2}))
    (align / "semantic_shift.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 64)
    run_id = log_merge_run(model, metrics=bundle(), gate=gate, alignment_dir=align, params={"zoo": "tiny"})
    c = client(uri)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["seme.gate"] == "passed"
    assert run.data.params["method"] == "ties" and run.data.params["zoo"] == "tiny"
    assert json.loads(run.data.params["sources"])[0]["uri"] == "s3://zoo/expert0"
    assert run.data.params["params.global.lambda"] == "1.0"
    mets = run.data.metrics
    assert mets["merged/arith/accuracy"] == 0.75 and mets["math/arith/accuracy"] == 0.8
    assert mets["base/general/prose/perplexity"] == 20.0 and mets["gate/passed"] == 1.0
    arts = {a.path for d in ("eval", "checkpoint", "alignment") for a in c.list_artifacts(run_id, d)}
    assert {
        "eval/metrics.json", "eval/gate_result.json", "eval/gate_summary.md", "checkpoint/seme_manifest.json",
        "checkpoint/README.md", "alignment/alignment.json", "alignment/semantic_shift.png",
    } <= arts  # fmt: skip

    version = register_model(model, name, run_id, {"team": "nlp"}, gate_passed=True, pipeline_run="kfp-123")
    mv = c.get_model_version(name, version)
    assert mv.source == f"runs:/{run_id}/model"
    assert mv.tags["seme.method"] == "ties" and mv.tags["seme.gate"] == "passed"
    assert mv.tags["seme.pipeline_run"] == "kfp-123" and mv.tags["team"] == "nlp"
    assert (
        mv.tags["seme.config_sha256"]
        == json.loads((model / "seme_manifest.json").read_text())["config_sha256"]
    )
    srcs = json.loads(mv.tags["seme.sources"])
    assert [s["uri"] for s in srcs] == ["s3://zoo/expert0", "s3://zoo/expert1"] and len(
        srcs[0]["sha256"]
    ) == 64
    assert aliases(name) == {PILOT: version}
    # the checkpoint files went (as files) through the server onto the moto bucket, byte for byte
    got = Path(
        mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(tmp_path / "dl"))
    )
    assert sha256_file(got / "model.safetensors") == sha256_file(model / "model.safetensors")
    keys = [
        o["Key"]
        for o in boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
        .list_objects_v2(Bucket=MLFLOW_BUCKET)
        .get("Contents", [])
    ]
    assert any(k.endswith(f"{run_id}/artifacts/model/model.safetensors") for k in keys)


def test_pilot_promote_rollback(tmp_path, uri, name, capsys):
    from seme.cli import main

    v1 = register_model(merged_dir(tmp_path / "m1"), name, gate_passed=True)
    assert promote(name) == {PRODUCTION: v1, PREVIOUS: None}
    assert aliases(name) == {PILOT: v1, PRODUCTION: v1}
    with pytest.raises(RegistryError, match=rf"version {v1}: it already holds 'production'"):
        promote(name)
    v2 = register_model(merged_dir(tmp_path / "m2", seed=1), name, gate_passed=True)
    assert v2 != v1 and aliases(name) == {PILOT: v2, PRODUCTION: v1}
    # the CLI promotes the pilot (without pilot evidence only by breaking glass: see tests/test_pilot.py)
    assert main(["promote", name, "--tracking-uri", uri, "--skip-evidence"]) == 0
    assert json.loads(capsys.readouterr().out) == {"name": name, PRODUCTION: v2, PREVIOUS: v1}
    assert aliases(name) == {PILOT: v2, PRODUCTION: v2, PREVIOUS: v1}
    assert main(["rollback", name]) == 0
    assert aliases(name) == {PILOT: v2, PRODUCTION: v1, PREVIOUS: v2}
    assert rollback(name) == {PRODUCTION: v2, PREVIOUS: v1}  # and forward again
    # a named version that passed its gate may be promoted without holding pilot
    assert promote(name, version=v1) == {PRODUCTION: v1, PREVIOUS: v2}
    # promote to a custom alias needs --version and a passed gate
    assert main(["promote", name, "--version", v2, "--to", "canary"]) == 0
    assert aliases(name)["canary"] == v2


def test_failing_gate_blocks_pilot_and_production(tmp_path, uri, name, capsys):
    from seme.cli import main
    from seme.gates import run_gate

    bad = bundle()
    bad["merged"]["tasks"]["arith"]["value"] = 0.2
    model = merged_dir(tmp_path / "m")
    gate = run_gate(bad, None, tmp_path / "gate", model_dir=model)  # the verdict names the checkpoint
    assert not gate.passed
    (tmp_path / "bundle.json").write_text(json.dumps(bad))
    assert main(["register", str(model), "--name", name, "--gate", str(gate.result_path), "--metrics", str(tmp_path / "bundle.json")]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    v = out["version"]
    assert out["gate"] == "failed" and out["aliases"] == []
    assert client(uri).get_model_version(name, v).tags["seme.gate"] == "failed"
    run = client(uri).get_run(out["run_id"])
    assert run.data.tags["seme.gate"] == "failed" and run.data.metrics["gate/passed"] == 0.0
    assert run.data.metrics["merged/arith/accuracy"] == 0.2 and run.data.metrics["geo/capitals/accuracy"] == 0.74
    assert aliases(name) == {}
    with pytest.raises(
        RegistryError, match=rf"refusing to set 'pilot' on {name} version {v}: its gate is 'failed'"
    ):
        set_alias(name, PILOT, v)
    with pytest.raises(RegistryError, match=r"no version holds alias 'pilot'"):
        promote(name)
    with pytest.raises(RegistryError, match=rf"version {v} to production: its gate is 'failed'"):
        promote(name, version=v)
    with pytest.raises(RegistryError, match=r"refusing to set 'production' .* directly"):
        set_alias(name, PRODUCTION, v)
    with pytest.raises(RegistryError, match=r"refusing to promote to 'previous-production'"):
        promote(name, to=PREVIOUS, version=v)
    assert main(["rollback", name]) == 1
    assert "no version holds 'previous-production'" in capsys.readouterr().err
    assert aliases(name) == {}


def test_server_down_clear_error_and_no_alias_moved(tmp_path, uri, name):
    v1 = register_model(merged_dir(tmp_path / "m1"), name, gate_passed=True)
    promote(name)
    v2 = register_model(merged_dir(tmp_path / "m2", seed=1), name, gate_passed=True)
    before = aliases(name)
    proxy = CuttingProxy(uri)
    try:
        proxy.set_down()
        for action in (
            lambda: promote(name, tracking_uri=proxy.url),
            lambda: rollback(name, tracking_uri=proxy.url),
        ):
            with pytest.raises(
                RegistryError,
                match=r"MLflow tracking server http://127\.0\.0\.1:\d+ unreachable .* after 2 attempts",
            ):
                action()
        with pytest.raises(RegistryError, match=r"unreachable"):
            register_model(
                merged_dir(tmp_path / "m3", seed=2), name, gate_passed=True, tracking_uri=proxy.url
            )
    finally:
        proxy.close()
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(
        RegistryError, match=r"unreachable or failing after 2 attempts \(.*(refused|Max retries)"
    ):
        promote(name, tracking_uri=dead)
    assert aliases(name) == before == {PILOT: v2, PRODUCTION: v1}
    assert len(client(uri).search_model_versions(f"name = '{name}'")) == 2  # nothing registered while down


def test_failed_step_mid_promote_is_undone(tmp_path, uri, name):
    v1 = register_model(merged_dir(tmp_path / "m1"), name, gate_passed=True)
    promote(name)
    v2 = register_model(merged_dir(tmp_path / "m2", seed=1), name, gate_passed=True)
    before = aliases(name)
    proxy = CuttingProxy(uri)
    try:
        # step 1 (previous-production -> v1) goes through, step 2 (production -> v2) is dropped twice
        proxy.fail_requests("registered-models/alias", skip=1, count=2)
        with pytest.raises(
            RegistryError, match=r"set alias production -> .* unreachable .*; undid previous-production"
        ):
            promote(name, tracking_uri=proxy.url)
        assert proxy.dropped == 2
        assert aliases(name) == before == {PILOT: v2, PRODUCTION: v1}
        # the server dies for good after step 1: production is untouched and the error says what is left
        proxy.fail_requests("registered-models/alias", skip=1, count=100)
        with pytest.raises(RegistryError, match=rf"could not undo previous-production={v1} \(was None\)"):
            promote(name, tracking_uri=proxy.url)
        assert aliases(name)[PRODUCTION] == v1
    finally:
        proxy.close()


def test_concurrent_registrations_get_distinct_versions(tmp_path, uri, name):
    dirs = [merged_dir(tmp_path / f"m{i}", seed=i) for i in range(4)]
    versions: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(dirs))

    def work(d: Path) -> None:
        try:
            barrier.wait()
            versions.append(register_model(d, name, gate_passed=False))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(d,)) for d in dirs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    # guaranteed: four distinct versions, each one of the model's versions, each registered once
    # (MLflow numbers them; a retried request may make the numbers other than 1-4)
    mvs = client(uri).search_model_versions(f"name = '{name}'")
    assert len(set(versions)) == 4 and set(versions) == {str(m.version) for m in mvs}
    assert len(mvs) == 4 and len({m.tags["seme.registration_id"] for m in mvs}) == 4


def test_register_a_published_s3_checkpoint_as_is(tmp_path, uri, name, s3_server, monkeypatch):
    import boto3

    from seme.storage import publish

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="seme-models")
    model = merged_dir(tmp_path / "m")
    publish(model, f"s3://seme-models/{name}/v1", endpoint_url=s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    v = register_model(f"s3://seme-models/{name}/v1", name, gate_passed=True)
    mv = client(uri).get_model_version(name, v)
    assert mv.source == f"s3://seme-models/{name}/v1"  # no copy: the version points at the published prefix
    assert mv.tags["seme.method"] == "ties" and len(json.loads(mv.tags["seme.sources"])) == 2
    assert aliases(name) == {PILOT: v}


def test_register_a_local_checkpoint_by_its_published_uri(tmp_path, uri, name):
    """The pipeline's case: the manifest is read locally, the version points at the published
    prefix, and nothing is uploaded to MLflow's artifact store."""
    model = merged_dir(tmp_path / "m")
    v = register_model(model, name, gate_passed=False, source_uri=f"s3://seme-models/{name}/run-7")
    mv = client(uri).get_model_version(name, v)
    assert mv.source == f"s3://seme-models/{name}/run-7"
    assert mv.tags["seme.method"] == "ties" and mv.tags["seme.gate"] == "failed"
    assert aliases(name) == {}
    run_id = mv.run_id
    if run_id:
        assert not [a for a in client(uri).list_artifacts(run_id) if a.path.startswith("model")]
