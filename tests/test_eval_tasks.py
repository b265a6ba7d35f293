"""seme eval with task files: statistics, batched generation, every task kind, bad input, comparisons.

References, computed independently in the tests: scipy for the intervals and the binomial test,
transformers' own ``generate`` for greedy decoding, the model's logits for log-likelihoods and
perplexity, and lm-evaluation-harness called directly for the ``lm_eval`` kind. Models: a tiny random
llama (conftest) and the tiny zoo (a small pretrained llama with a real tokenizer, and its experts).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from seme.cli import main as seme_main
from seme.errors import EvalError

PROSE = "\n\n".join(f"Section {i}. " + " ".join(f"word{(i * 7 + j) % 50} is number {j}" for j in range(40))
                    for i in range(4))


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------


def test_wilson_mean_and_mcnemar_against_scipy():
    from scipy.stats import binomtest, norm, sem

    from seme.evaluation.stats import mcnemar_exact, mean_ci, wilson_ci

    z = float(norm.ppf(0.975))
    for k, n in ((0, 10), (3, 10), (10, 10), (37, 40), (120, 200)):
        ref = binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert wilson_ci(k, n, z) == pytest.approx([ref.low, ref.high], abs=1e-12), (k, n)
    # a textbook value (Newcombe 1998, 81/263): 0.2553 to 0.3662
    assert wilson_ci(81, 263) == pytest.approx([0.2553, 0.3662], abs=1e-4)
    vals = [1.5, 2.25, 0.75, 3.0, 2.0, 1.25, 2.5]
    m, h = mean_ci(vals, z)
    lo, hi = norm.interval(0.95, loc=sum(vals) / len(vals), scale=sem(vals))
    assert (m - h, m + h) == pytest.approx((lo, hi), abs=1e-12)
    # McNemar exact: 10 discordant pairs all one way -> 2 * 0.5**10
    a, b = [1] * 10 + [1, 0] * 5, [0] * 10 + [1, 0] * 5
    assert mcnemar_exact(a, b) == pytest.approx(2 * 0.5**10)
    assert mcnemar_exact(a, a) == 1.0


# ------------------------------------------------------------------------------------------------
# batched KV-cache greedy generation vs transformers' generate
# ------------------------------------------------------------------------------------------------


def test_batched_greedy_matches_transformers_generate(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from seme.evaluation.runner import greedy_tokens

    model = AutoModelForCausalLM.from_pretrained(tiny_model(), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # every reference runs the full max_new_tokens
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (3, 11, 5, 8, 2, 13, 7, 4, 9)]
    new = 10

    def reference(p: list[int]) -> list[int]:  # one prompt at a time: no padding at all
        out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=new, do_sample=False, pad_token_id=0)
        return out[0, len(p):].tolist()

    ref = [reference(p) for p in prompts]
    assert len({tuple(r) for r in ref}) > 1
    # batches of 4 mix prompt lengths 2..13: left padding must not change a single token
    assert greedy_tokens(model, prompts, new, set(), set(), pad_id=0, batch_size=4) == ref
    # a stop token that some rows meet early: those rows leave the batch (and its cache) mid-way
    stop = next(t for r in ref for t in r[1:5])
    want = [r[: r.index(stop) + 1] if stop in r else r for r in ref]
    assert any(len(w) < new for w in want) and any(len(w) == new for w in want)
    assert greedy_tokens(model, prompts, new, {stop}, set(), pad_id=0, batch_size=4) == want
    # an end token is not kept
    assert greedy_tokens(model, prompts, new, set(), {stop}, pad_id=0, batch_size=3) == [
        w[:-1] if w and w[-1] == stop and stop in r else w for w, r in zip(want, ref, strict=True)]


# ------------------------------------------------------------------------------------------------
# every kind on the tiny zoo's model, recomputed independently
# ------------------------------------------------------------------------------------------------


def _write(p: Path, rows: list[dict]) -> Path:
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _lm_eval_task(d: Path) -> Path:
    """A lm-evaluation-harness task YAML with a local JSON data file (nothing from a hub)."""
    inc = d / "lm_tasks"
    inc.mkdir()
    rows = [{"question": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1), str(abs(a - b))], "answer": 0}
            for a, b in ((1, 2), (3, 4), (5, 1), (2, 2), (7, 1), (4, 4), (6, 3), (9, 0))]
    _write(inc / "data.jsonl", rows)
    (inc / "sums_local.yaml").write_text(
        "task: sums_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {inc / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return inc


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, hf) -> Path:
    d = tmp_path_factory.mktemp("tasks")
    em = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in ((2, 3), (10, 4), (7, 7), (1, 0), (12, 5))]
    em += [{"prompt": "5 in French:", "answer": "cinq"}, {"prompt": "3-1=", "answer": "2"}]
    model, tok = hf  # one item whose answer is what the model says: both outcomes are exercised
    ids = tok("14-9=", return_tensors="pt")
    said = tok.decode(model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)[
        0, ids["input_ids"].shape[1]:], skip_special_tokens=True).split("\n")[0].strip()
    assert said
    em.insert(2, {"prompt": "14-9=", "answer": said})
    _write(d / "em.jsonl", em)
    mc = [{"prompt": "3+4=", "choices": ["7", "8", "seventy"], "answer": 0},
          {"prompt": "The module", "choices": [" is", " banana", " of the"], "answer": 1},
          {"prompt": "10-3= ", "choices": ["7", "13"], "answer": 0},
          {"prompt": "2+2=", "choices": ["4", "22"], "answer": 1}]
    _write(d / "mc.jsonl", mc)
    (d / "prose.txt").write_text(PROSE)
    _lm_eval_task(d)
    (d / "tasks.yaml").write_text(
        "name: mine\ntasks:\n"
        "  - {name: sums, kind: exact_match, data: em.jsonl, max_new_tokens: 4}\n"
        "  - {name: pick, kind: multiple_choice, data: mc.jsonl}\n"
        "  - {name: text, kind: perplexity, data: prose.txt, window: 16, max_windows: 6}\n"
        "  - {name: harness, kind: lm_eval, task: sums_local, include_path: lm_tasks}\n")
    return d


@pytest.fixture(scope="module")
def expert(tiny_zoo: Path) -> Path:
    return tiny_zoo / "experts" / "arithmetic"


@pytest.fixture(scope="module")
def metrics(expert: Path, task_dir: Path, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("out") / "m.json"
    assert seme_main(["-q", "eval", str(expert), "--tasks", str(task_dir / "tasks.yaml"), "--out", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def hf(expert: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(expert, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(expert))


def test_output_schema_and_task_file_record(metrics, task_dir):
    assert metrics["suite"] == "mine" and set(metrics["tasks"]) == {"sums", "pick", "text", "harness"}
    for t in metrics["tasks"].values():
        assert {"metric", "value", "n", "ci95", "per_item", "items_sha256"} <= set(t)
        assert t["ci95"][0] <= t["value"] <= t["ci95"][1] or t["metric"] == "perplexity"
    rec = metrics["task_file"]
    assert rec["source"] == str(task_dir / "tasks.yaml") and len(rec["sha256"]) == 64
    by_task = {d["task"] for d in rec["data"]}
    assert by_task == {"sums", "pick", "text", "harness"}
    from seme.fsutil import sha256_file

    em = next(d for d in rec["data"] if d["task"] == "sums")
    assert em["sha256"] == sha256_file(task_dir / "em.jsonl")


def test_exact_match_counted_by_hand(metrics, hf, task_dir):
    model, tok = hf
    t = metrics["tasks"]["sums"]
    rows = [json.loads(x) for x in (task_dir / "em.jsonl").read_text().splitlines()]
    by_hand = []
    for r in rows:  # one prompt at a time through transformers' generate, judged here
        ids = tok(r["prompt"], return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).split("\n")[0]
        by_hand.append(int(text.strip() == r["answer"]))
    assert t["per_item"]["correct"] == by_hand
    assert t["n"] == len(rows) and t["value"] == pytest.approx(sum(by_hand) / len(rows))
    assert [e["pred"].strip() == e["answer"] for e in t["examples"]] == [bool(x) for x in by_hand[:5]]
    assert 0 < sum(by_hand) < len(rows), "the test must see both outcomes"


def test_multiple_choice_from_the_models_logits(metrics, hf, task_dir):
    import torch

    model, tok = hf
    t = metrics["tasks"]["pick"]
    rows = [json.loads(x) for x in (task_dir / "mc.jsonl").read_text().splitlines()]
    want_ll, ok, ok_norm = [], [], []
    for r in rows:
        lls = []
        for ch in r["choices"]:
            ctx, cont = r["prompt"], ch
            if ctx.endswith(" "):  # the harness convention: the context's trailing space joins the choice
                ctx, cont = ctx[:-1], " " + cont
            c = tok.encode(ctx)
            whole = tok.encode(ctx + cont)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            lls.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(c), len(whole))))
        want_ll.append(lls)
        ok.append(int(max(range(len(lls)), key=lls.__getitem__) == r["answer"]))
        norm = [v / len(ch.encode()) for v, ch in zip(lls, r["choices"], strict=True)]
        ok_norm.append(int(max(range(len(lls)), key=norm.__getitem__) == r["answer"]))
    got = t["per_item"]["loglik"]
    for g, w in zip(got, want_ll, strict=True):
        assert g == pytest.approx(w, abs=1e-4)
    assert t["per_item"]["correct"] == ok and t["per_item"]["correct_norm"] == ok_norm
    assert t["accuracy"] == sum(ok) / 4 and t["accuracy_norm"] == sum(ok_norm) / 4 and t["value"] == t["accuracy"]


def test_perplexity_from_the_models_logits(metrics, hf):
    import torch
    import torch.nn.functional as F

    model, tok = hf
    t = metrics["tasks"]["text"]
    ids = tok.encode(PROSE, add_special_tokens=False)
    n_full = len(ids) // 16  # one text: 6 windows spread evenly over it (every step-th window)
    step = n_full // 6
    assert step > 1
    wins = [ids[i * 16 : (i + 1) * 16] for i in range(0, n_full, step)][:6]
    nll, n = 0.0, 0
    for w in wins:
        with torch.no_grad():
            logits = model(torch.tensor([w])).logits[0, :-1].double()
        nll += float(F.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum"))
        n += len(w) - 1
    assert t["n_windows"] == 6 and t["n"] == n
    assert t["value"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert sum(t["per_item"]["nll"]) == pytest.approx(nll, rel=1e-5)


def test_lm_eval_kind_equals_the_harness_called_directly(metrics, expert, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    t = metrics["tasks"]["harness"]
    tm = TaskManager(include_path=str(task_dir / "lm_tasks"), include_defaults=False)
    res = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(expert), "dtype": "float32"}, device="cpu",
                                  tasks=["sums_local"], task_manager=tm, log_samples=True, bootstrap_iters=0)
    assert t["metric"] == "acc" and t["n"] == 8
    assert t["value"] == res["results"]["sums_local"]["acc,none"]
    direct = [int(s["acc"]) for s in sorted(res["samples"]["sums_local"], key=lambda s: s["doc_id"])]
    assert t["per_item"]["correct"] == direct


def test_chat_tasks_use_the_chat_template(expert, hf, tmp_path):
    """``chat: true``: prompts go through the tokenizer's chat template (no extra special tokens)."""
    import shutil

    from seme.evaluation import evaluate

    model, tok = hf
    d = tmp_path / "chatty"
    shutil.copytree(expert, d)
    tmpl = ("{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (d / "chat_template.jinja").write_text(tmpl)
    rows = [{"prompt": p, "answer": "7"} for p in ("3+4=", "What is 3+4?", "10-3=")]
    _write(tmp_path / "em.jsonl", rows)
    (tmp_path / "t.yaml").write_text("tasks:\n  - {name: c, kind: exact_match, data: em.jsonl, chat: true, "
                                     "match: contains, stop_at_newline: false, max_new_tokens: 6}\n")
    m = evaluate(d, task_file=tmp_path / "t.yaml", progress=False)
    tok.chat_template = tmpl
    by_hand = []
    for r in rows:
        text = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                       add_generation_prompt=True)
        assert text.startswith("<|user|>") and text.endswith("<|assistant|>")
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        by_hand.append(reply)
    t = m["tasks"]["c"]
    assert [e["pred"] for e in t["examples"]] == by_hand
    assert t["per_item"]["correct"] == [int("7" in r) for r in by_hand]
    # the same task on a tokenizer without a template: one line naming the task, before the model loads
    with pytest.raises(EvalError, match=r"t.yaml:2: task 'c' asks for chat: true, but the model's tokenizer"):
        evaluate(expert, task_file=tmp_path / "t.yaml", progress=False)


# ------------------------------------------------------------------------------------------------
# bad input: one line naming file and line, before any model is loaded
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if a model gets loaded (the errors must come first)."""
    from seme.evaluation import runner

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(runner, "load_model", boom)


BAD = {
    "unknown kind": ("tasks:\n  - {name: a, kind: essay, data: em.jsonl}\n", {}, "tasks.yaml:2: task 'a' unknown kind 'essay'"),
    "missing data": ("tasks:\n  - name: a\n    kind: exact_match\n    data: nope.jsonl\n", {},
                     "tasks.yaml:2: task 'a': data file"),
    "malformed line": ("tasks:\n  - {name: a, kind: exact_match, data: em.jsonl}\n",
                       {"em.jsonl": '{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": 4}\n'},
                       "em.jsonl:2: 'answer' must be str"),
    "not json": ("tasks:\n  - {name: a, kind: exact_match, data: em.jsonl}\n",
                 {"em.jsonl": '{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": \n'}, "em.jsonl:3: not valid JSON"),
    "empty task": ("tasks:\n  - {name: a, kind: multiple_choice, data: mc.jsonl}\n", {"mc.jsonl": "\n"},
                   "mc.jsonl: no items (empty task 'a')"),
    "no tasks": ("tasks: []\n", {}, "tasks.yaml:1: 'tasks' is empty"),
    "answer out of range": ("tasks:\n  - {name: a, kind: multiple_choice, data: mc.jsonl}\n",
                            {"mc.jsonl": '{"prompt": "x", "choices": ["a", "b"], "answer": 2}\n'},
                            "mc.jsonl:1: answer index 2 is out of range for 2 choices"),
    "unknown lm-eval task": ("tasks:\n  - {name: a, kind: lm_eval, task: no_such_task, include_path: lm}\n", {},
                             "tasks.yaml:2: task 'a': lm-eval has no task 'no_such_task'"),
    "invalid yaml": ("tasks:\n  - {name: a, kind: [\n", {}, "tasks.yaml:3: invalid YAML"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_task_files_fail_with_file_and_line(case, tmp_path, expert, capsys, no_model_load):
    text, files, msg = BAD[case]
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    (tmp_path / "em.jsonl").exists() or (tmp_path / "em.jsonl").write_text('{"prompt": "1", "answer": "1"}\n')
    (tmp_path / "lm").mkdir()
    (tmp_path / "tasks.yaml").write_text(text)
    out = tmp_path / "m.json"
    rc = seme_main(["eval", str(expert), "--tasks", str(tmp_path / "tasks.yaml"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and err.startswith("seme: error: "), err
    assert msg in err, err
    assert not out.exists()


def test_model_that_is_not_a_checkpoint(tmp_path, task_dir, capsys, no_model_load):
    (tmp_path / "empty").mkdir()
    rc = seme_main(["eval", str(tmp_path / "empty"), "--tasks", str(task_dir / "tasks.yaml")])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and "empty has no config.json: not a Hugging Face checkpoint" in err


# ------------------------------------------------------------------------------------------------
# paired comparisons
# ------------------------------------------------------------------------------------------------


def test_compare_detects_a_planted_difference_and_not_identical_models(tiny_zoo, tmp_path, capsys):
    """Answers = the arithmetic expert's own greedy outputs on prompts where the base says otherwise:
    the expert is perfect on that task, the base fails every item."""
    from seme.evaluation import data
    from seme.evaluation.runner import greedy_generate, load_model

    prompts = [e.prompt for e in data.arithmetic(20, 10, 80)[1]]
    preds = {}
    for name in ("experts/arithmetic", "base"):
        model, tok = load_model(tiny_zoo / name, progress=False)
        preds[name] = greedy_generate(model, tok, prompts, 4)
    items = [{"prompt": p, "answer": a.strip()} for p, a, b in
             zip(prompts, preds["experts/arithmetic"], preds["base"], strict=True) if a.strip() and a.strip() != b.strip()]
    assert len(items) >= 10, "expert and base must disagree on enough prompts"
    _write(tmp_path / "planted.jsonl", items[:14])
    (tmp_path / "prose.txt").write_text(PROSE)
    (tmp_path / "t.yaml").write_text("tasks:\n  - {name: planted, kind: exact_match, data: planted.jsonl, max_new_tokens: 4}\n"
                                     "  - {name: text, kind: perplexity, data: prose.txt, window: 16}\n")
    files = {}
    for name, label in (("experts/arithmetic", "a"), ("base", "b"), ("experts/arithmetic", "a2")):
        files[label] = tmp_path / f"{label}.json"
        assert seme_main(["-q", "eval", str(tiny_zoo / name), "--tasks", str(tmp_path / "t.yaml"),
                          "--out", str(files[label])]) == 0
    capsys.readouterr()
    assert seme_main(["eval", "--compare", str(files["a"]), str(files["b"]), str(files["a2"]),
                      "--out", str(tmp_path / "cmp.json")]) == 0
    table = capsys.readouterr().out
    assert "exact McNemar" in table and "paired bootstrap" in table
    c = json.loads((tmp_path / "cmp.json").read_text())
    vs_base, vs_self = c["against"][str(files["b"])], c["against"][str(files["a2"])]
    r = vs_base["planted"]
    assert r["a"] == 1.0 and r["b"] == 0.0 and r["diff"] == 1.0 and r["test"] == "exact McNemar"
    assert r["p_value"] < 0.01 and r["p_value"] == pytest.approx(2 * 0.5**14) and r["significant"]
    assert r["ci95"][0] > 0
    assert vs_base["text"]["test"] == "paired bootstrap" and vs_base["text"]["p_value"] < 0.01
    for task in ("planted", "text"):
        same = vs_self[task]
        assert same["diff"] == 0.0 and same["p_value"] == 1.0 and not same["significant"]
        assert same["ci95"] == [0.0, 0.0]
    # deterministic: the same comparison twice gives the same numbers
    from seme.evaluation.compare import compare, read_metrics

    again = compare([read_metrics(files["a"]), read_metrics(files["b"])], names=[str(files["a"]), str(files["b"])])
    assert again["against"][str(files["b"])] == vs_base


# ------------------------------------------------------------------------------------------------
# the gate's "not significantly worse than the expert" rule
# ------------------------------------------------------------------------------------------------


def _acc_entry(correct: list[int], items: str = "x") -> dict:
    return {"metric": "accuracy", "value": sum(correct) / len(correct), "n": len(correct),
            "per_item": {"correct": correct}, "items_sha256": items}


def test_gate_not_significantly_worse_than_the_expert(tmp_path):
    from seme.gates import run_gate

    expert = _acc_entry([1] * 30)
    close = _acc_entry([1] * 28 + [0] * 2)          # 2 discordant items: p = 0.5, not significant
    far = _acc_entry([1] * 14 + [0] * 16)           # 16 discordant: p ~ 3e-5
    general = {"prose": {"metric": "perplexity", "value": 10.0}}

    def bundle(merged: dict) -> dict:
        return {"merged": {"tasks": {"t": merged}, "general": general},
                "parents": {"base": {"tasks": {"t": _acc_entry([0] * 30)}, "general": general},
                            "ex": {"tasks": {"t": expert}, "general": general}},
                "experts": {"t": "ex"}}

    pol = tmp_path / "p.yaml"
    # ratio rule lenient (0.4), significance on: the ratio passes for both, significance decides
    pol.write_text("version: 1\nexpert_retention: {min_ratio: 0.4}\nexpert_significance: {alpha: 0.05}\n")
    ok = run_gate(bundle(close), pol, tmp_path / "ok")
    assert ok.passed, ok.failures
    bad = run_gate(bundle(far), pol, tmp_path / "bad")
    assert not bad.passed
    (fail,) = bad.failures
    assert fail.startswith("significance:t:") and "exact McNemar" in fail and "expert 'ex'" in fail
    doc = json.loads((tmp_path / "bad" / "gate_result.json").read_text())
    assert doc["significance"][0]["worse"] == 1.0 and doc["significance"][0]["p_value"] < 0.001
    # without per-item results nothing can be shown: the check fails and says why
    bare = {k: v for k, v in far.items() if k != "per_item"}
    res = run_gate(bundle(bare), pol, tmp_path / "bare")
    assert not res.passed and any("no per-item results" in f for f in res.failures)
    # not asked for: the same bundle passes on the ratio rule alone
    pol.write_text("version: 1\nexpert_retention: {min_ratio: 0.4}\n")
    assert run_gate(bundle(far), pol, tmp_path / "ratio").passed


# ------------------------------------------------------------------------------------------------
# task files and data from S3 (the pipeline's `tasks` input: YAML text or an s3:// URI)
# ------------------------------------------------------------------------------------------------


def test_task_file_as_text_with_data_from_s3(s3_server, tmp_path, monkeypatch):
    import boto3
    from services import create_bucket

    from seme.errors import StorageError
    from seme.evaluation import open_tasks
    from seme.evaluation.taskfile import resolve_source
    from seme.fsutil import sha256_file
    from seme.storage import publish

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.setenv("SEME_CACHE_DIR", str(tmp_path / "cache"))
    d = tmp_path / "data"
    d.mkdir()
    _write(d / "em.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}])
    create_bucket(s3_server, "evals")
    publish(d, "s3://evals/sets/a", endpoint_url=s3_server)
    text = "tasks:\n  - {name: s, kind: exact_match, data: s3://evals/sets/a/em.jsonl}\n"
    tf = open_tasks(task_file=resolve_source(text, tmp_path / "w"), inline=True, source="inline")
    (t,) = tf.tasks
    assert [e.answer for e in t.items] == ["2", "4"]
    assert t.data_files[0]["source"] == "s3://evals/sets/a/em.jsonl"
    assert t.data_files[0]["sha256"] == sha256_file(d / "em.jsonl")
    # the task file itself from S3: relative data paths resolve next to it
    (d / "tasks.yaml").write_text("tasks:\n  - {name: s, kind: exact_match, data: em.jsonl}\n")
    publish(d, "s3://evals/sets/b", endpoint_url=s3_server)
    tf = open_tasks(task_file=resolve_source("s3://evals/sets/b/tasks.yaml"), source="s3://evals/sets/b/tasks.yaml")
    assert tf.record()["source"] == "s3://evals/sets/b/tasks.yaml" and len(tf.tasks[0].items) == 2
    # text cannot say what a relative path is relative to
    with pytest.raises(EvalError, match=r"tasks.yaml:2: task 's': data 'em.jsonl' is relative"):
        open_tasks(task_file=resolve_source(text.replace("s3://evals/sets/a/", ""), tmp_path / "w2"), inline=True)
    # a data object changed after publishing: verification fails, nothing is used
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.put_object(Bucket="evals", Key="sets/c/em.jsonl", Body=b'{"prompt": "1+1=", "answer": "2"}\n')
    publish(d, "s3://evals/sets/c", endpoint_url=s3_server)
    s3.put_object(Bucket="evals", Key="sets/c/em.jsonl", Body=b'{"prompt": "1+1=", "answer": "3"}\n')
    with pytest.raises(StorageError, match="sha256|size mismatch"):
        open_tasks(task_file=resolve_source(text.replace("sets/a", "sets/c"), tmp_path / "w3"), inline=True)


def test_compare_refuses_results_that_do_not_pair(tmp_path, capsys):
    a = {"model": "a", "tasks": {"t": _acc_entry([1, 0, 1], "x"), "u": _acc_entry([1, 1, 0], "y")}, "general": {}}
    b = {"model": "b", "tasks": {"t": _acc_entry([1, 1, 1], "x"), "u": _acc_entry([1, 1, 0], "other items")},
         "general": {}}
    for name, m in (("a", a), ("b", b), ("c", {**b, "dtype": "bfloat16"})):
        (tmp_path / f"{name}.json").write_text(json.dumps(m))
    assert seme_main(["eval", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "different items" in out and "exact McNemar" in out
    rc = seme_main(["eval", "--compare", str(tmp_path / "a.json"), str(tmp_path / "c.json")])
    err = capsys.readouterr().err
    assert rc != 0 and "different dtypes (bfloat16, float32)" in err and err.count("\n") == 1
    assert seme_main(["eval", "--compare", str(tmp_path / "a.json")]) != 0
    assert "at least two metrics files" in capsys.readouterr().err
