"""The merge pipeline sized for big models: image, per-step GPUs, --pvc volumes, model-size requests,
the gate without the model (compiled IR parsed as KFP's own protobuf messages). The Kubernetes side
(PVC creation, mounts) cannot run here: no API server; the volume code path of the steps runs under
the KFP local runner with a directory standing in for the mounted volume."""

import hashlib
import json
from pathlib import Path

import pytest
from google.protobuf import json_format

from pipelines.compile import load_ir
from seme.cli import main

DIGEST = "reg.example.com/ml/seme:0.2.0@sha256:" + "0123456789abcdef" * 4


def compile_ir(tmp: Path, *flags: str):
    out = tmp / f"p-{abs(hash(flags))}.yaml"
    assert main(["pipeline", "compile", "-o", str(out), *flags]) == 0
    return load_ir(out)


def executors(spec) -> dict[str, dict]:
    """{component name: container dict} for every container component."""
    execs = json_format.MessageToDict(spec.deployment_spec)["executors"]
    return {
        name: execs[comp.executor_label]["container"]
        for name, comp in spec.components.items()
        if comp.WhichOneof("implementation") == "executor_label"
    }


def k8s(spec, platform) -> dict[str, dict]:
    """{component name: kubernetes executor config} (empty when none)."""
    cfg = json_format.MessageToDict(platform)["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return {name: cfg.get(comp.executor_label, {}) for name, comp in spec.components.items()
            if comp.WhichOneof("implementation") == "executor_label"}  # fmt: skip


def step(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + "-")


def gpu_components(spec) -> set[str]:
    return {n for n, c in executors(spec).items() if "accelerator" in c.get("resources", {})}


def test_image_and_default_gpu_steps_follow_the_method(tmp_path):
    spec, platform = compile_ir(tmp_path, "--image", DIGEST, "--config", str(_config(tmp_path, "seme")))
    ex = executors(spec)
    assert {c["image"] for c in ex.values()} == {DIGEST}  # one image, on every step
    assert gpu_components(spec) == {"comp-compute-alignment", "comp-merge-checkpoints"}
    kc = k8s(spec, platform)
    for name in gpu_components(spec):
        assert ex[name]["resources"]["accelerator"]["resourceCount"] == "1"
        assert kc[name]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    # merge runs on the GPU it asked for; evaluate uses one when its pod has one
    assert _const(spec, "merge-checkpoints", "device") == "auto"
    assert _const(spec, "evaluate-models", "device") == "auto"
    # a classic method: only align keeps its GPU (it is skipped for non-SeMe methods anyway)
    spec, _ = compile_ir(tmp_path, "--method", "ties")
    assert gpu_components(spec) == {"comp-compute-alignment"}
    assert _const(spec, "merge-checkpoints", "device") == "cpu"
    spec, _ = compile_ir(tmp_path, "--method", "tsv")  # the SVD family merges on the GPU
    assert gpu_components(spec) == {"comp-compute-alignment", "comp-merge-checkpoints"}


def test_explicit_gpu_steps_and_no_gpu(tmp_path):
    spec, platform = compile_ir(tmp_path, "--gpu-steps", "align,merge,evaluate", "--method", "linear")
    assert gpu_components(spec) == {
        "comp-compute-alignment",
        "comp-merge-checkpoints",
        "comp-evaluate-models",
    }
    assert all("tolerations" in k8s(spec, platform)[n] for n in gpu_components(spec))
    spec, _ = compile_ir(tmp_path, "--gpu-steps", "evaluate", "--method", "seme")
    assert gpu_components(spec) == {"comp-evaluate-models"}
    spec, _ = compile_ir(tmp_path, "--no-gpu", "--method", "seme")
    assert gpu_components(spec) == set()


def test_pvc_mode_mounts_one_volume_on_every_model_reading_step(tmp_path):
    spec, platform = compile_ir(tmp_path, "--pvc", "200Gi", "--method", "seme")
    kc = k8s(spec, platform)
    root = spec.root.dag.tasks
    create = root["createpvc"]
    assert create.inputs.parameters["size"].runtime_value.constant.string_value == "200Gi"
    assert create.inputs.parameters["pvc_name_suffix"].runtime_value.constant.string_value == "-seme"
    mounted = {n for n, c in kc.items() if c.get("pvcMount")}
    readers = {"comp-fetch-checkpoint", "comp-fetch-checkpoint-2", "comp-compute-alignment",
               "comp-merge-checkpoints", "comp-evaluate-models", "comp-register-model", "comp-register-model-2"}  # fmt: skip
    assert mounted == readers
    for n in mounted:
        (m,) = kc[n]["pvcMount"]
        assert m["mountPath"] == "/mnt/seme"
        assert m["pvcNameParameter"]["componentInputParameter"] == "pipelinechannel--createpvc-name"
    # fetch and merge write onto the volume; the gate takes no model and mounts nothing
    assert _const(spec, "fetch-checkpoint", "volume_dir") == "/mnt/seme"
    assert _const(spec, "merge-checkpoints", "volume_dir") == "/mnt/seme"
    gate = spec.components["comp-validation-gate"]
    assert set(gate.input_definitions.artifacts) == {"report", "manifest"}  # the identity, not the model
    # the volume is deleted after the run's body
    assert set(root["deletepvc"].dependent_tasks) == {"createpvc", "exit-handler-1"}
    # without --pvc: no volume, models travel as artifacts
    spec, platform = compile_ir(tmp_path)
    assert "createpvc" not in spec.root.dag.tasks
    assert not any(c.get("pvcMount") for c in k8s(spec, platform).values())
    assert _const(spec, "fetch-checkpoint", "volume_dir") in (None, "")


def test_gate_takes_the_model_only_with_weight_checks(tmp_path):
    spec, _ = compile_ir(tmp_path, "--gate-weight-check")
    gate = spec.components["comp-validation-gate-weights"]
    assert set(gate.input_definitions.artifacts) == {"report", "merged"}
    assert "comp-validation-gate" not in spec.components


def test_model_size_picks_pod_requests(tmp_path):
    from pipelines.merge import SIZES

    for size in ("tiny", "70b"):
        spec, _ = compile_ir(tmp_path, "--model-size", size)
        res = executors(spec)["comp-merge-checkpoints"]["resources"]
        cpu, mem, _cpu_lim, mem_lim = SIZES[size]["merge"]
        assert res["resourceCpuRequest"] == cpu and res["resourceMemoryRequest"] == mem
        assert res["resourceMemoryLimit"] == mem_lim
    assert SIZES["70b"]["merge"][1] != SIZES["tiny"]["merge"][1]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--image", "reg.io/seme@sha256:abc"], "--image 'reg.io/seme@sha256:abc': expected REPOSITORY"),
        (["--gpu-steps", "align,fetch"], "--gpu-steps: unknown step(s) fetch"),
    ],
)
def test_bad_flags_one_line_error_no_file(tmp_path, capsys, flags, message):
    out = tmp_path / "p.yaml"
    assert main(["pipeline", "compile", "-o", str(out), *flags]) != 0
    err = capsys.readouterr().err
    assert err.startswith("seme: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_fetch_step_writes_onto_the_volume(tmp_path, s3_server, monkeypatch):
    """The --pvc code path of a step under the KFP local runner: the checkpoint lands on the volume
    (a directory here) and the KFP artifact only records where."""
    import boto3
    from kfp import local

    from components.common import model_path
    from components.fetch import fetch_checkpoint
    from seme.storage import publish

    src = tmp_path / "ck"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (src / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="seme-scale")
    publish(src, "s3://seme-scale/ck", endpoint_url=s3_server)
    volume = tmp_path / "volume"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    task = fetch_checkpoint(uri="s3://seme-scale/ck", s3_endpoint=s3_server, volume_dir=str(volume))
    art = task.outputs["checkpoint"]
    on_volume = Path(model_path(art))
    assert on_volume.parent.parent == volume and (on_volume / "model.safetensors").is_file()
    assert not any(p.is_file() for p in Path(art.path).rglob("*")), "no model bytes in the artifact store"


def _config(tmp: Path, method: str) -> Path:
    import yaml

    p = tmp / f"{method}.yaml"
    p.write_text(yaml.safe_dump({"merge_method": method, "base_model": "s3://b/base",
                                 "models": [{"model": "s3://b/a"}, {"model": "s3://b/c"}]}))  # fmt: skip
    return p


def _const(spec, task_prefix: str, param: str):
    """The constant a task in any DAG passes for ``param`` (None when the default is used)."""
    for comp in [spec.root, *spec.components.values()]:
        if comp.WhichOneof("implementation") != "dag":
            continue
        for name, t in comp.dag.tasks.items():
            if step(name, task_prefix) and param in t.inputs.parameters:
                v = json_format.MessageToDict(t.inputs.parameters[param].runtime_value.constant)
                return v
    return None


def test_run_local_gives_the_gate_the_model_only_for_weight_checks():
    from pipelines.local import _weight_checks

    assert _weight_checks("") is False  # the default policy checks metrics only
    assert _weight_checks("weights: {finite: false, max_abs: null}\n") is False
    assert _weight_checks("weights: {finite: true}\n") is True
    assert _weight_checks("weights: {max_abs: 40}\n") is True


def test_gate_step_without_the_model_runs_under_the_local_runner(tmp_path):
    """The metrics-only gate step as KFP executes it (a subprocess that imports the step's helpers)."""
    from kfp import dsl, local
    from kfp.dsl import Artifact, Output

    from components.gate import validation_gate

    @dsl.component(base_image="python:3.11", install_kfp_package=False)
    def make_report(bundle: str, report: Output[Artifact], manifest: Output[Artifact]) -> None:
        import os

        os.makedirs(report.path, exist_ok=True)
        with open(os.path.join(report.path, "bundle.json"), "w") as f:
            f.write(bundle)
        os.makedirs(manifest.path, exist_ok=True)
        with open(os.path.join(manifest.path, "seme_manifest.json"), "w") as f:
            f.write('{"method": "ties", "files": []}')

    def m(acc: float, ppl: float) -> dict:
        return {"tasks": {"arith": {"metric": "accuracy", "value": acc, "n": 20}},
                "general": {"prose": {"metric": "perplexity", "value": ppl, "n": 500}}}  # fmt: skip

    bundle = {"merged": m(0.75, 20.5), "parents": {"base": m(0.1, 20.0), "math": m(0.8, 24.0)},
              "experts": {"arith": "math"}, "model_dir": "/nowhere/on/this/pod"}  # fmt: skip

    @dsl.pipeline(name="gate-only")
    def gate_only(bundle: str) -> bool:
        rep = make_report(bundle=bundle)
        gate = validation_gate(report=rep.outputs["report"], manifest=rep.outputs["manifest"], policy="")
        return gate.outputs["passed"]

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    assert gate_only(bundle=json.dumps(bundle)).output is True
    # the verdict names the checkpoint it judged by its manifest's digest, as register checks it
    (result,) = (tmp_path / "kfp").glob("gate-only-*/validation-gate/result/gate_result.json")
    digest = "sha256:" + hashlib.sha256(b'{"method": "ties", "files": []}').hexdigest()
    assert json.loads(result.read_text())["model"]["digest"] == digest
