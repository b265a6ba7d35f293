"""``--device cuda`` on a machine without a GPU: the error path, run for real on the CPU.

No test here (or anywhere in the suite) runs a GPU: CI has none. What CI can and does check is that
asking for one where there is none is refused the promised way, by every command that takes
``--device``: one ``seme: error:`` line, no traceback, no output left, inputs untouched.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from robustness.harness import assert_clean_failure, run_seme, snapshot

CASES = ["merge-ties", "merge-seme", "align-seme", "eval-suite", "eval-data-free"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A base with a real (trained) tokenizer and two fine-tune-like variants; merge configs."""
    from conftest import make_tiny_model, perturb_model

    from seme.zoo.base import train_tiny_tokenizer

    root = tmp_path_factory.mktemp("nogpu")
    tok = train_tiny_tokenizer(["12+7=19 in French: dix-neuf, quarante-deux; the quick brown fox"] * 4, 300)
    base = make_tiny_model(root / "base", vocab_size=len(tok))
    tok.save_pretrained(str(base))
    for i in (1, 2):
        perturb_model(base, root / f"e{i}", seed=i)
    for method, params in (("ties", {"density": 0.5}), ("seme", {})):
        cfg = {"merge_method": method, "base_model": str(base), "dtype": "float32",
               "models": [{"model": str(root / f"e{i}"), "parameters": params} for i in (1, 2)]}
        (root / f"{method}.yaml").write_text(yaml.safe_dump(cfg))
    return root


@pytest.mark.parametrize("case", CASES)
def test_device_cuda_without_a_gpu_is_one_clean_error(case: str, models: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the no-GPU error path does not apply")
    out = tmp_path / "out"
    argv = {
        "merge-ties": ["merge", models / "ties.yaml", out, "--device", "cuda"],
        "merge-seme": ["merge", models / "seme.yaml", out, "--device", "cuda"],
        "align-seme": ["align", models / "seme.yaml", out, "--device", "cuda"],
        "eval-suite": ["eval", models / "base", "--suite", "tiny", "--limit", "2", "--out", out / "m.json",
                       "--device", "cuda"],
        "eval-data-free": ["eval", models / "e1", "--data-free", "--sources", models / "e1", models / "e2",
                           "--out", out / "m.json", "--device", "cuda"],
    }[case]
    before = snapshot(models)
    r = run_seme(argv)
    assert_clean_failure(r, names="cuda", out=out, before=before, roots=(models,))
    assert not out.exists(), f"{out} created by a refused run"
