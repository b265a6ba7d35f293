"""Kubeflow pipelines: compiled IR, the schedule request, and a local end-to-end run on the tiny zoo.

- compile: ``seme pipeline compile`` writes IR YAML, parsed back into KFP's ``PipelineSpec`` /
  ``PlatformSpec`` protobufs (kfp.pipeline_spec.pipeline_spec_pb2); the tests read the fields a
  cluster acts on (GPU request, node selector and toleration, the condition, the exit handler,
  retries, caching).
- schedule: no Kubeflow cluster exists here, so the KFP *API server* is the one thing replaced: a
  small HTTP server on 127.0.0.1 that answers the REST calls of the real ``kfp.Client`` and records
  them. The test checks the recurring-run request the real client sent.
- run-local: the real pipeline under KFP's local SubprocessRunner, with real S3 (moto) and MLflow.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from seme.cli import main as seme_main

TRIGGER = None  # filled lazily (kfp import is slow): PipelineTaskSpec.TriggerPolicy.TriggerStrategy


def compile_ir(tmp_path: Path, *args: str, pipeline: str = "merge"):
    from pipelines.compile import load_ir

    out = tmp_path / f"{pipeline}.yaml"
    assert seme_main(["pipeline", "compile", "--pipeline", pipeline, "-o", str(out), *args]) == 0
    return load_ir(out)


def dag_tasks(spec, component: str | None = None) -> dict:
    comp = spec.root if component is None else spec.components[component]
    return dict(comp.dag.tasks)


def tasks_by_component(spec) -> dict[str, list]:
    """component name -> every task (in any DAG) that runs it."""
    out: dict[str, list] = {}
    dags = [spec.root] + [c for c in spec.components.values() if c.WhichOneof("implementation") == "dag"]
    for dag in dags:
        for t in dag.dag.tasks.values():
            out.setdefault(t.component_ref.name, []).append(t)
    return out


def k8s_executors(platform) -> dict[str, dict]:
    """The kfp-kubernetes settings per executor (PlatformSpec → plain dicts)."""
    from google.protobuf import json_format

    execs = platform.platforms["kubernetes"].deployment_spec.executors
    return {name: json_format.MessageToDict(cfg) for name, cfg in execs.items()}


def executor_of(spec, component: str) -> str:
    return spec.components[component].executor_label


def container(spec, component: str):
    from google.protobuf import json_format

    return json_format.MessageToDict(
        spec.deployment_spec["executors"][executor_of(spec, component)]["container"]
    )


@pytest.fixture(scope="module")
def merge_ir(tmp_path_factory):
    return compile_ir(tmp_path_factory.mktemp("ir"))


def test_compile_gpu_request_node_selector_and_toleration_on_align(merge_ir):
    spec, platform = merge_ir
    res = container(spec, "comp-compute-alignment")["resources"]
    assert (
        res["accelerator"]["resourceType"] == "nvidia.com/gpu" and res["accelerator"]["resourceCount"] == "1"
    )
    k8s = k8s_executors(platform)
    align = k8s[executor_of(spec, "comp-compute-alignment")]
    assert align["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert list(align["tolerations"]) == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    # only align asks for a GPU; every step has CPU/memory requests and limits
    for name, comp in spec.components.items():
        if comp.WhichOneof("implementation") != "executor_label":
            continue
        r = container(spec, name)["resources"]
        assert {
            "resourceCpuRequest",
            "resourceCpuLimit",
            "resourceMemoryRequest",
            "resourceMemoryLimit",
        } <= set(r)
        assert ("accelerator" in r) == (name == "comp-compute-alignment"), name
        assert container(spec, name)["image"] == "ghcr.io/seme-project/seme:0.1.0"
        assert "nodeSelector" not in k8s[comp.executor_label] or name == "comp-compute-alignment"
    # S3 credentials come from the S3 secret, only where S3 is touched; the MLflow account's only
    # where the registry is written (register, the exit handler)
    def with_secret(name: str) -> set[str]:
        return {e for e, cfg in k8s.items() if any(s["secretName"] == name for s in cfg.get("secretAsEnv", []))}

    s3_steps = [
        c
        for c in spec.components
        if c.startswith(("comp-fetch-checkpoint", "comp-merge-checkpoints", "comp-register-model"))
    ]
    # fetch (sources), fetch (base), merge (publishes), register pilot/failed (MLflow wrapper next to the weights)
    assert len(s3_steps) == 5
    assert with_secret("seme-s3") == {executor_of(spec, c) for c in s3_steps}
    mlflow_steps = [c for c in spec.components if c.startswith(("comp-register-model", "comp-record-status"))]
    assert mlflow_steps and with_secret("seme-mlflow-auth") == {executor_of(spec, c) for c in mlflow_steps}


def test_compile_structure_exit_handler_loop_and_condition(merge_ir):
    from kfp.pipeline_spec import pipeline_spec_pb2

    spec, _ = merge_ir
    strategy = pipeline_spec_pb2.PipelineTaskSpec.TriggerPolicy.TriggerStrategy
    root = dag_tasks(spec)
    assert set(root) == {"exit-handler-1", "record-status"}
    exit_task = root["record-status"]
    assert exit_task.trigger_policy.strategy == strategy.ALL_UPSTREAM_TASKS_COMPLETED
    assert list(exit_task.dependent_tasks) == ["exit-handler-1"]
    assert exit_task.inputs.parameters["status"].task_final_status.producer_task == "exit-handler-1"

    body = dag_tasks(spec, root["exit-handler-1"].component_ref.name)
    loops = [t for t in body.values() if t.WhichOneof("iterator") == "parameter_iterator"]
    assert (
        len(loops) == 1
        and loops[0].parameter_iterator.items.input_parameter == "pipelinechannel--source_uris"
    )
    loop_body = dag_tasks(spec, loops[0].component_ref.name)
    assert [t.component_ref.name for t in loop_body.values()] == ["comp-fetch-checkpoint"]
    assert {t.component_ref.name for t in body.values()} >= {
        "comp-fetch-checkpoint-2",  # the base
        "comp-compute-alignment",
        "comp-merge-checkpoints",
        "comp-evaluate-models",
        "comp-validation-gate",
    }
    branches = [t for t in body.values() if t.component_ref.name.startswith("comp-condition-branches")]
    assert len(branches) == 1
    conds = dag_tasks(spec, branches[0].component_ref.name)
    by_cond = {t.trigger_policy.condition: t for t in conds.values()}
    passed = "inputs.parameter_values['pipelinechannel--validation-gate-passed'] == true"
    assert set(by_cond) == {passed, f"!({passed})"}
    for cond, alias in ((passed, "pilot"), (f"!({passed})", "")):
        (reg,) = dag_tasks(spec, by_cond[cond].component_ref.name).values()
        assert reg.component_ref.name.startswith("comp-register-model")
        assert reg.inputs.parameters["alias"].runtime_value.constant.string_value == alias
        assert reg.inputs.parameters["gate_passed"].runtime_value.constant.bool_value is (alias == "pilot")


def test_compile_retries_and_caching(merge_ir):
    spec, _ = merge_ir
    tasks = tasks_by_component(spec)
    fetches = [t for name, ts in tasks.items() if name.startswith("comp-fetch-checkpoint") for t in ts]
    registers = [t for name, ts in tasks.items() if name.startswith("comp-register-model") for t in ts]
    assert len(fetches) == 2 and len(registers) == 2  # sources (in the loop) + base; pilot + failed
    for t in fetches + registers:
        assert t.retry_policy.max_retry_count == 3, t.task_info.name
        assert t.retry_policy.backoff_duration.seconds == 30
    for t in fetches:
        assert t.caching_options.enable_cache is False, "fetch must always re-verify the checkpoints"
    assert tasks["comp-merge-checkpoints"][0].retry_policy.max_retry_count == 0, (
        "a failed merge is not retried"
    )


def test_compile_without_gpu_and_bad_options(tmp_path, capsys):
    spec, platform = compile_ir(tmp_path, "--no-gpu")
    assert "accelerator" not in container(spec, "comp-compute-alignment")["resources"]
    align = k8s_executors(platform)[executor_of(spec, "comp-compute-alignment")]
    assert "nodeSelector" not in align and "tolerations" not in align
    spec, platform = compile_ir(
        tmp_path, "--gpu-node-selector", "pool=a100", "--gpu-toleration", "gpu:Equal:yes:NoExecute"
    )
    align = k8s_executors(platform)[executor_of(spec, "comp-compute-alignment")]
    assert align["nodeSelector"]["labels"] == {"pool": "a100"}
    assert list(align["tolerations"]) == [
        {"key": "gpu", "operator": "Equal", "value": "yes", "effect": "NoExecute"}
    ]
    capsys.readouterr()
    out = tmp_path / "bad.yaml"
    rc = _cli(["pipeline", "compile", "-o", str(out), "--gpu-toleration", "gpu:Sometimes"])
    assert rc != 0 and "GPU toleration 'gpu:Sometimes'" in capsys.readouterr().err
    assert not out.exists()


def test_compile_promote_pipeline(tmp_path):
    spec, _ = compile_ir(tmp_path, pipeline="promote")
    (task,) = dag_tasks(spec).values()
    assert task.component_ref.name == "comp-promote-model"
    assert task.retry_policy.max_retry_count == 3 and task.caching_options.enable_cache is False
    params = spec.root.input_definitions.parameters
    assert params["to_alias"].default_value.string_value == "production"
    assert params["version"].default_value.string_value == ""


def _cli(argv: list[str]) -> int:
    try:
        return seme_main(argv)
    except SystemExit as e:  # the CLI exits through sys.exit on errors
        return int(e.code or 0)


def test_localize_config_maps_fetched_uris_and_refuses_mismatches(tmp_path):
    from components.common import artifact_digest, localize_config, parent_names
    from seme.errors import ConfigError

    cfg = "merge_method: ties\nbase_model: s3://b/base/\nmodels:\n  - model: s3://b/x\n  - model: s3://b/y\n"
    fetched = {"s3://b/base": "/art/base", "s3://b/x": "/art/x", "s3://b/y": "/art/y"}
    out = localize_config(cfg, fetched)
    assert out["base_model"] == "/art/base" and [m["model"] for m in out["models"]] == ["/art/x", "/art/y"]
    with pytest.raises(ConfigError, match="s3://b/y, which is not among"):
        localize_config(cfg, {"s3://b/base": "/a", "s3://b/x": "/b"})
    with pytest.raises(ConfigError, match="does not use the fetched checkpoint.*s3://b/z"):
        localize_config(cfg, {**fetched, "s3://b/z": "/art/z"})
    with pytest.raises(ConfigError, match="invalid YAML"):
        localize_config("models: [", fetched)
    assert parent_names(["s3://b/x", "s3://c/x", "s3://b/base", ""]) == ["x", "x-2", "base-2", "source-3"]
    # a directory digest is independent of file order and changes with any byte
    d = tmp_path / "ck"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(b"1")
    (d / "sub" / "b.bin").write_bytes(b"2")
    first = artifact_digest(d)
    assert len(first) == 64 and artifact_digest(d) == first
    (d / "sub" / "b.bin").write_bytes(b"3")
    assert artifact_digest(d) != first


# ------------------------------------------------------------------------------------------------
# schedule: the real kfp.Client against a stand-in KFP API server (no cluster here)
# ------------------------------------------------------------------------------------------------


class FakeKfpApi:
    """Answers the KFP v2beta1 REST calls a ``kfp.Client`` makes to create a recurring run; records them."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict | None]] = []
        self.fail_runs_with: int | None = None  # answer the recurring-run POST with this HTTP error
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def _reply(self, body: dict, code: int = 200) -> None:
                raw = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                api.requests.append(("GET", self.path, None))
                if self.path.startswith("/apis/v2beta1/healthz"):
                    return self._reply({"multi_user": False})
                if self.path.startswith("/apis/v2beta1/experiments"):
                    return self._reply({"experiments": [], "total_size": 0})
                return self._reply({"error": "not found"}, 404)

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}")
                api.requests.append(("POST", self.path, body))
                if self.path == "/apis/v2beta1/experiments":
                    return self._reply({"experiment_id": "exp-7", "display_name": body.get("display_name")})
                if self.path == "/apis/v2beta1/recurringruns" and api.fail_runs_with:
                    return self._reply({"error": "pipeline spec rejected", "code": 3}, api.fail_runs_with)
                if self.path == "/apis/v2beta1/recurringruns":
                    return self._reply({**body, "recurring_run_id": "rr-42", "status": "ENABLED"})
                return self._reply({"error": "not found"}, 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def kfp_api():
    api = FakeKfpApi()
    yield api
    api.close()


def _s3_config(tmp_path: Path) -> Path:
    cfg = {
        "merge_method": "ties",
        "base_model": "s3://zoo/base",
        "models": [{"model": "s3://zoo/arithmetic", "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": "s3://zoo/french", "parameters": {"weight": 1.0, "density": 0.5}}],
    }  # fmt: skip
    p = tmp_path / "merge.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_schedule_sends_a_cron_recurring_run_of_the_compiled_pipeline(tmp_path, kfp_api, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))  # kfp.Client reads ~/.config/kfp/context.json
    cfg = _s3_config(tmp_path)
    rc = _cli(["pipeline", "schedule", str(cfg), "--cron", "0 0 3 * * *", "--host", kfp_api.url,
               "--suite", "tiny", "--expert", "arithmetic=s3://zoo/arithmetic", "--name", "nightly-merge"])  # fmt: skip
    assert rc == 0
    assert "recurring run rr-42" in capsys.readouterr().out
    posts = {path: body for method, path, body in kfp_api.requests if method == "POST"}
    assert posts["/apis/v2beta1/experiments"]["display_name"] == "seme"
    rr = posts["/apis/v2beta1/recurringruns"]
    assert rr["experiment_id"] == "exp-7"
    assert rr["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert rr["mode"] == "ENABLE" and rr["no_catchup"] is True and int(rr["max_concurrency"]) == 1
    assert rr["service_account"] == "seme-pipeline-runner"
    assert rr["display_name"] == "seme-merge-nightly"
    # the whole compiled pipeline travels inline, GPU request and platform config included
    ps = rr["pipeline_spec"]
    assert ps["pipeline_spec"]["pipelineInfo"]["name"] == "seme-merge"
    align = ps["pipeline_spec"]["deploymentSpec"]["executors"]["exec-compute-alignment"]["container"]
    assert align["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert (
        "exec-compute-alignment"
        in ps["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    )
    params = rr["runtime_config"]["parameters"]
    assert params["source_uris"] == ["s3://zoo/arithmetic", "s3://zoo/french"]
    assert params["base_uri"] == "s3://zoo/base"
    assert yaml.safe_load(params["merge_config"])["merge_method"] == "ties"
    assert params["expert_tasks"] == {"arithmetic": "s3://zoo/arithmetic"}
    assert params["registered_model_name"] == "nightly-merge" and params["eval_suite"] == "tiny"
    assert params["mlflow_tracking_uri"] == "" and params["s3_endpoint"] == "", (
        "cluster endpoints: from ConfigMap"
    )


def test_schedule_refuses_bad_input_before_calling_the_server(tmp_path, kfp_api, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = _s3_config(tmp_path)
    rc = _cli(["pipeline", "schedule", str(cfg), "--cron", "0 3 * * *", "--host", kfp_api.url])
    assert rc != 0 and "KFP needs 6" in capsys.readouterr().err
    local_cfg = tmp_path / "local.yaml"
    local_cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(tmp_path)}]}))
    rc = _cli(["pipeline", "schedule", str(local_cfg), "--cron", "0 0 3 * * *", "--host", kfp_api.url])
    assert rc != 0 and "not an s3:// URI" in capsys.readouterr().err
    assert kfp_api.requests == []
    # a server that answers with an error: one line naming the host, no traceback
    kfp_api.fail_runs_with = 400
    rc = _cli(["pipeline", "schedule", str(cfg), "--cron", "0 0 3 * * *", "--host", kfp_api.url])
    assert rc != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not create the recurring run" in err[0] and kfp_api.url in err[0]


# ------------------------------------------------------------------------------------------------
# run-local: the real pipeline under KFP's local runner, real moto S3 and a real MLflow server
# ------------------------------------------------------------------------------------------------

EVAL_LIMIT = 16  # items per eval task: enough for real numbers, small enough for 2 cores
# The gate's outcome is fixed by construction, never by how good the merge happens to be (quality
# claims live in the benchmark): with no retention floor and no general checks, any finite metrics of
# every task pass; a task no model reports always fails the "every expected task is present" check.
PASSES = "version: 1\nexpert_retention: {min_ratio: 0}\ngeneral: {}\n"
FAILS = "version: 1\nexpert_retention: {min_ratio: 0}\ngeneral: {}\ntasks: [reading_comprehension]\n"


@pytest.fixture(scope="module")
def tiny_zoo_info(tiny_zoo):
    """The tiny zoo (conftest's session fixture) and its manifest."""
    from seme.zoo import load_zoo

    return tiny_zoo, load_zoo(tiny_zoo)


def _zoo_config(zdir: Path, zoo: dict, method: str = "seme") -> dict:
    return {
        "merge_method": method,
        "base_model": str(zdir / "base"),
        "models": [{"model": str(zdir / e["path"])} for e in zoo["experts"].values()],
        "dtype": "float32",
    }


def test_run_local_end_to_end_on_the_tiny_zoo(tiny_zoo_info, s3_server, mlflow_server, tmp_path):
    import uuid

    from pipelines.local import format_summary, run_local
    from seme import registry
    from seme.checkpoint import Checkpoint
    from seme.storage import fetch

    zdir, zoo = tiny_zoo_info
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    common = {"suite": "tiny", "limit": EVAL_LIMIT, "registered_model_name": name, "s3_endpoint": s3_server,
                  "mlflow_uri": mlflow_server}  # fmt: skip
    s = run_local(_zoo_config(zdir, zoo), workdir=tmp_path / "run1", gate_policy=PASSES, **common)
    log = Path(s["log"]).read_text()[-3000:]
    assert s["status"] == "SUCCEEDED", f"{s['error']}\n{log}"

    # the merged model: a real checkpoint, SeMe-aligned, published to S3 and verifiable from there
    merged = s["merged"]
    ck = Checkpoint(merged["path"])
    assert set(ck.names) == set(Checkpoint(zdir / "base").names)
    manifest = json.loads((Path(merged["path"]) / "seme_manifest.json").read_text())
    assert manifest["method"] == "seme" and merged["method"] == "seme"
    assert merged["uri"].startswith("s3://seme-models/merged/")
    assert (
        fetch(merged["uri"], endpoint_url=s3_server, dest=tmp_path / "back") / "model.safetensors"
    ).is_file()
    assert {x["uri"].split("/inputs/")[0] for x in merged["sources"]} == {"s3://seme-models"}
    assert len(merged["sources"]) == 1 + len(zoo["experts"])
    assert s["alignment"]["skipped"] is False and (Path(s["alignment"]["path"]) / "alignment.json").is_file()

    # metrics of the merged model and every parent, on both tasks; each expert mapped to its task
    assert set(s["metrics"]) == {"merged", "base", *s["experts"].values()}
    assert set(s["experts"]) == set(zoo["experts"])
    assert s["experts"] == {task: task for task in zoo["experts"]}, (
        "each task's expert: the source tuned on it"
    )
    for m in s["metrics"].values():
        assert set(m["tasks"]) == set(zoo["experts"]) and m["limit"] == EVAL_LIMIT
        for t in m["tasks"].values():
            assert 0.0 <= t["value"] <= 1.0 and t["n"] == EVAL_LIMIT

    # gate passed → registered with alias pilot; the exit handler recorded the final status
    assert s["gate"]["passed"] is True
    assert json.loads((Path(s["gate"]["result"]) / "gate_result.json").read_text())["passed"] is True
    v1 = s["registry"]["version"]
    assert s["registry"]["alias"] == "pilot" and s["aliases"] == {"pilot": v1}
    c = registry.client(mlflow_server)
    tags = c.get_model_version(name, v1).tags
    assert tags["seme.gate"] == "passed" and tags["seme.method"] == "seme"
    assert tags["seme.pipeline_status"] == "SUCCEEDED"
    assert {x["uri"] for x in json.loads(tags["seme.sources"])} == {x["uri"] for x in merged["sources"]}
    run = c.get_run(s["registry"]["run_id"])
    assert run.data.tags["seme.pipeline_status"] == "SUCCEEDED"
    assert (
        run.data.metrics["merged/arithmetic/accuracy"]
        == s["metrics"]["merged"]["tasks"]["arithmetic"]["value"]
    )
    text = format_summary(s)
    assert f"version {v1}, alias pilot" in text and "gate: PASSED" in text and merged["path"] in text

    # rerun on the same inputs and registry with a gate that fails (task arithmetic and 4 eval items
    # keep it short): a new version, registered as failed, and no alias moves
    cfg2 = _zoo_config(zdir, zoo, "task_arithmetic")
    s2 = run_local(cfg2, workdir=tmp_path / "run2", gate_policy=FAILS, **{**common, "limit": 4})
    assert s2["status"] == "SUCCEEDED", s2["error"]
    assert s2["gate"]["passed"] is False
    summary_md = (Path(s2["gate"]["result"]) / "gate_summary.md").read_text()
    assert "reading_comprehension" in summary_md
    v2 = s2["registry"]["version"]
    assert int(v2) == int(v1) + 1 and s2["registry"]["alias"] == ""
    assert s2["alignment"]["skipped"] is True, "only SeMe needs the alignment step"
    assert c.get_model_version(name, v2).tags["seme.gate"] == "failed"
    assert s2["aliases"] == {"pilot": v1}, "a failed gate moves no alias"
    assert "alias none (gate failed)" in format_summary(s2)


def test_run_local_fetch_failure_ends_failed_in_mlflow_with_nothing_registered(tmp_path, monkeypatch):
    """Embedded defaults (in-process moto S3, SQLite MLflow); a source that is not in the store."""
    from conftest import make_tiny_model
    from mlflow import MlflowClient

    from pipelines.local import run_local

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    src = make_tiny_model(tmp_path / "a")
    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(src)}, {"model": "s3://seme-models/no-such-model"}],
    }
    s = run_local(cfg, workdir=tmp_path / "w", suite="tiny", registered_model_name="never")
    assert s["status"] == "FAILED" and "fetch-checkpoint" in s["error"] and "\x1b" not in s["error"]
    assert s["s3_embedded"] and s["mlflow_uri"].startswith("sqlite:///")
    assert "merged" not in s and "registry" not in s and s["aliases"] == {}
    assert "no objects under this prefix" in Path(s["log"]).read_text(), "the step's error reached the log"
    c = MlflowClient(tracking_uri=s["mlflow_uri"])
    exp = c.get_experiment_by_name("seme")
    assert exp.artifact_location.startswith((tmp_path / "w").as_uri())
    (run,) = c.search_runs([exp.experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["seme.pipeline_status"] == "FAILED" and run.data.tags["seme.pipeline_error"]
    assert c.search_registered_models() == []
