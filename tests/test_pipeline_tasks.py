"""The merge pipeline evaluating with a user's task file from S3 instead of a built-in suite.

Real parts: the KFP local runner, a moto S3 server (the task file and its data are published there,
sha256-listed, and fetched + verified by the evaluate step), an MLflow server (per-item table, chart,
dataset inputs with digests), Great Expectations (the significance rule), and the tiny zoo.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

POLICY = ("version: 1\nexpert_retention: {min_ratio: 0.001}\ngeneral: {perplexity: {max_increase: 1000}}\n"
          "expert_significance: {alpha: 0.05}\n")


def _task_dir(d: Path) -> Path:
    from seme.evaluation import data

    d.mkdir()
    held = data.arithmetic(20, 10, 12)[1]
    (d / "sums.jsonl").write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n" for e in held))
    mc = [{"prompt": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 2)], "answer": 0} for a, b in
          ((1, 2), (3, 3), (4, 0), (2, 5), (6, 1), (0, 9))]
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    from pydoc_data.topics import topics

    (d / "prose.txt").write_text(topics["assert"] + topics["if"] + topics["while"])
    (d / "tasks.yaml").write_text(
        "name: user-checks\ntasks:\n"
        "  - {name: arithmetic, kind: exact_match, data: sums.jsonl, max_new_tokens: 4}\n"
        "  - {name: choice, kind: multiple_choice, data: mc.jsonl}\n"
        "  - {name: prose, kind: perplexity, section: general, data: prose.txt, window: 32, max_windows: 8}\n")
    return d


def test_run_local_with_a_user_task_file_from_s3(tiny_zoo, s3_server, mlflow_server, tmp_path):
    from services import create_bucket

    from pipelines.local import run_local
    from seme import registry
    from seme.fsutil import sha256_file
    from seme.storage import publish

    tdir = _task_dir(tmp_path / "user_tasks")
    create_bucket(s3_server, "user-evals")
    publish(tdir, "s3://user-evals/checks/v1", endpoint_url=s3_server)
    uri = "s3://user-evals/checks/v1/tasks.yaml"

    name = f"tasks-{uuid.uuid4().hex[:8]}"
    cfg = {"merge_method": "linear", "models": [{"model": str(tiny_zoo / "experts" / t), "parameters": {"weight": 0.5}}
                                                for t in ("arithmetic", "french_numbers")],
           "base_model": str(tiny_zoo / "base"), "dtype": "float32"}
    s = run_local(cfg, workdir=tmp_path / "run", tasks=uri, gate_policy=POLICY, registered_model_name=name,
                  expert_tasks={"arithmetic": str(tiny_zoo / "experts" / "arithmetic")},
                  s3_endpoint=s3_server, mlflow_uri=mlflow_server)
    log = Path(s["log"]).read_text()[-3000:]
    assert s["status"] == "SUCCEEDED", f"{s['error']}\n{log}"
    assert s["params"]["eval_tasks"] == uri

    # the user's tasks, not a suite's, for the merged model and every parent, with per-item results
    assert set(s["metrics"]) == {"merged", "base", "arithmetic", "french_numbers"}
    for m in s["metrics"].values():
        assert m["suite"] == "user-checks" and set(m["tasks"]) == {"arithmetic", "choice"}
        assert set(m["general"]) == {"prose"}
        assert len(m["tasks"]["arithmetic"]["per_item"]["correct"]) == 12
        assert len(m["tasks"]["choice"]["per_item"]["correct"]) == 6
    rec = s["metrics"]["merged"]["task_file"]
    assert rec["source"] == uri and rec["sha256"] == sha256_file(tdir / "tasks.yaml")
    assert {d["source"]: d["sha256"] for d in rec["data"]} == {
        f: sha256_file(tdir / f) for f in ("sums.jsonl", "mc.jsonl", "prose.txt")}

    # the report: paired comparisons merged − each parent, the chart, the task file
    report = Path(s["report"])
    cmp = json.loads((report / "comparison.json").read_text())["against"]
    assert set(cmp) == {"base", "arithmetic", "french_numbers"}
    for parent in cmp.values():
        assert parent["arithmetic"]["test"] == "exact McNemar" and 0 < parent["arithmetic"]["p_value"] <= 1
        assert parent["general:prose"]["test"] == "paired bootstrap"
    assert (report / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (report / "tasks.yaml").read_bytes() == (tdir / "tasks.yaml").read_bytes()

    # the gate tested "not significantly worse than the expert" on the expert's task
    gate = json.loads((Path(s["gate"]["result"]) / "gate_result.json").read_text())
    (sig,) = gate["significance"]
    assert sig["task"] == "arithmetic" and sig["expert"] == "arithmetic" and sig["test"] == "exact McNemar"
    checks = {c["check"]: c for c in gate["checks"]}
    assert checks["significance:arithmetic"]["passed"] == (sig["worse"] == 0.0)
    assert checks["significance:arithmetic:defined"]["passed"]
    assert s["registry"]["alias"] == ("pilot" if s["gate"]["passed"] else "")

    # MLflow: every task's metric for merged and each parent, the per-item table, the chart, the inputs
    c = registry.client(mlflow_server)
    run = c.get_run(s["registry"]["run_id"])
    for model in ("merged", "base", "arithmetic", "french_numbers"):
        for task in ("arithmetic/accuracy", "choice/accuracy", "general/prose/perplexity"):
            assert run.data.metrics[f"{model}/{task}"] == (
                s["metrics"][model]["general" if "general" in task else "tasks"][task.split("/")[-2]]["value"])
    arts = {f.path for f in c.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/items.json", "eval/merged_vs_parents.png", "eval/task_file", "eval/comparison.json"} <= arts
    logged = c.download_artifacts(run.info.run_id, "eval/task_file/tasks.yaml", str(tmp_path / "dl"))
    assert Path(logged).read_bytes() == (tdir / "tasks.yaml").read_bytes()
    table = json.loads(Path(c.download_artifacts(run.info.run_id, "eval/items.json", str(tmp_path))).read_text())
    rows = [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
    assert len(rows) == 4 * (12 + 6 + 8)
    merged_sums = [r["correct"] for r in rows if r["model"] == "merged" and r["task"] == "arithmetic"]
    assert merged_sums == s["metrics"]["merged"]["tasks"]["arithmetic"]["per_item"]["correct"]
    ds = {i.dataset.name: i.dataset for i in run.inputs.dataset_inputs}
    assert "tasks:user-checks" in ds and len(ds) == 4
    for d in ds.values():
        src = json.loads(d.source)
        assert d.digest == src["sha256"][:36] and len(src["sha256"]) == 64
    assert json.loads(ds["tasks:user-checks"].source)["uri"] == uri


def test_run_local_checks_a_local_task_file_before_anything_runs(tmp_path, capsys):
    from seme.cli import main

    (tmp_path / "merge.yaml").write_text("merge_method: linear\nmodels:\n  - model: s3://b/x\n  - model: s3://b/y\n")
    (tmp_path / "tasks.yaml").write_text("tasks:\n  - {name: a, kind: multiple_choice, data: mc.jsonl}\n")
    (tmp_path / "mc.jsonl").write_text('{"prompt": "x", "choices": ["a"], "answer": 0}\n')
    rc = main(["pipeline", "run-local", str(tmp_path / "merge.yaml"), "--tasks", str(tmp_path / "tasks.yaml"),
               "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1
    assert "mc.jsonl:1: 'choices' must be a list of at least 2 strings" in err
    assert not (tmp_path / "w").exists(), "nothing ran"
