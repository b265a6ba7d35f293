"""The Python API (``import seme; seme.merge / validate``), ``--json`` output, ``seme validate`` and
the Hub-style model card, on tiny real checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml


def _cli(capsys, *argv):
    from seme.cli import main

    capsys.readouterr()
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_import_seme_is_light_and_documented():
    code = ("import sys, seme; print(sorted(n for n in seme.__all__)); "
            "print(all(getattr(seme, n).__doc__ for n in ('merge', 'validate', 'align', 'evaluate'))); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "['__version__', 'align', 'evaluate', 'merge', 'validate']"
    assert out[1] == "True" and out[2] == "False"


def test_python_api_merge_and_validate(tmp_path, tiny_model, perturbed):
    import seme

    a = tiny_model("a")
    b = perturbed(a, "b")
    cfg = {"models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}],
           "merge_method": "linear", "dtype": "float32"}
    rep = seme.validate(cfg)
    assert rep["valid"] and rep["output"]["layers"] == 2 and len(rep["models"]) == 2
    assert not (tmp_path / "out").exists()
    res = seme.merge(cfg, tmp_path / "out")
    assert res.tensors == rep["output"]["tensors"] and (tmp_path / "out" / "model.safetensors").is_file()
    import seme.merge

    res2 = seme.merge(cfg, tmp_path / "out2")
    assert res2.manifest["files"][-1]["sha256"] == res.manifest["files"][-1]["sha256"]


def test_merge_json_and_model_card(tmp_path, tiny_model, perturbed, capsys):
    a = tiny_model("a")
    b = perturbed(a, "b")
    text = (f"# a published-style config\nmerge_method: ties\nbase_model: {a}\nmodels:\n"
            f"  - model: {b}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
            f"  - model: {a}\ndtype: bfloat16\nout_dtype: bfloat16\n")
    (tmp_path / "c.yaml").write_text(text)
    rc, out, _ = _cli(capsys, "merge", "--json", str(tmp_path / "c.yaml"), str(tmp_path / "out"))
    assert rc == 0
    res = json.loads(out)  # exactly one JSON object on stdout
    assert res["method"] == "ties" and res["out_dir"] == str(tmp_path / "out") and res["tensors"] > 0
    card = (tmp_path / "out" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front == {"base_model": ["a", "b"], "library_name": "transformers", "tags": ["merge", "seme", "ties"]}
    assert str(tmp_path) not in card.split("```yaml")[0]  # no absolute local path outside the config
    assert text.strip() in card  # the config as given
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["dtype"] == "bfloat16" and "torch_dtype" not in conf


def test_validate_command(tmp_path, tiny_model, perturbed, capsys):
    a = tiny_model("a", num_hidden_layers=3)
    b = perturbed(a, "b")
    good = {"slices": [{"sources": [{"model": str(a), "layer_range": [0, 3]}]},
                       {"sources": [{"model": str(b), "layer_range": [1, 3]}]}],
            "merge_method": "passthrough"}
    p = tmp_path / "good.yaml"
    p.write_text(yaml.safe_dump(good))
    rc, out, _ = _cli(capsys, "validate", "--json", str(p))
    rep = json.loads(out)
    assert rc == 0 and rep["valid"] and rep["output"]["layers"] == 5
    rc, out, _ = _cli(capsys, "validate", str(p))
    assert rc == 0 and out.startswith("valid: passthrough")
    good["slices"][1]["sources"][0]["layer_range"] = [1, 4]
    p.write_text(yaml.safe_dump(good))
    rc, out, err = _cli(capsys, "validate", "--json", str(p))
    assert rc == 2 and json.loads(out)["valid"] is False
    assert err.strip().startswith("seme: error: ") and "out of bounds" in err and len(err.strip().splitlines()) == 1
    other = tiny_model("o", family="qwen2")
    q = tmp_path / "arch.yaml"
    q.write_text(yaml.safe_dump({"models": [{"model": str(a)}, {"model": str(other)}], "merge_method": "linear"}))
    rc, _, err = _cli(capsys, "validate", str(q))
    assert rc == 2 and "architecture" in err and len(err.strip().splitlines()) == 1
    assert not list(Path(tmp_path).glob("*out*"))


def test_eval_json_is_one_object(tmp_path, tiny_model, perturbed, capsys):
    a = tiny_model("a")
    b = perturbed(a, "b")
    rc, out, _ = _cli(capsys, "-q", "eval", str(a), "--data-free", "--sources", str(b), "--json")
    rep = json.loads(out)
    assert rc == 0 and rep["sources"] == [str(b)] and len(rep["layers"]) == 2
