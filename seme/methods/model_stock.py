"""Model Stock (arXiv:2403.19522): move from the base toward the models' average by a factor set
by the angle between their task vectors.

With N ≥ 2 models besides the base, task vectors δ_i = θ_i − θ_0 and cos θ the mean pairwise cosine
of the δ_i (each clamped to [−1, 1], norms product clamped below at 1e-6):

    t = N·cos θ / (1 + (N−1)·cos θ),     θ = t·mean_i(θ_i) + (1 − t)·θ_0

where 1 + (N−1)·cos θ is (numerically) zero, t = 0 (keep the base). Per whole tensor, or per row
with ``filter_wise: true``. Same steps and dtype as mergekit 0.1.5 (merge_methods/model_stock.py:25-65).
"""

from __future__ import annotations

from seme.lazy import torch

from seme.errors import ConfigError
from seme.methods import MethodSpec, register
from seme.methods._params import as_bool, non_base


def model_stock(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[dict],
    params: dict,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """Model Stock merge of the models that are not the base."""
    idx = non_base("model_stock", base, tensors)
    if len(idx) < 2:
        raise ConfigError(f"model_stock needs at least 2 models besides base_model, got {len(idx)}")
    if not base.is_floating_point():
        raise ConfigError(f"model_stock: tensors must be floating point, got {base.dtype}")
    filter_wise = as_bool("model_stock", "filter_wise", params.get("filter_wise", False))
    out_shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() <= 1 else base
    else:
        w0 = base.reshape(-1)
    ws = [tensors[i].reshape(w0.shape) for i in idx]

    offsets = [w - w0 for w in ws]
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    cos_pairs = []
    for a in range(len(offsets)):
        for b in range(a + 1, len(offsets)):
            dot = (offsets[a] * offsets[b]).sum(dim=-1)
            cos_pairs.append((dot / (norms[a] * norms[b]).clamp(min=1e-6)).clamp(-1, 1))
    del offsets
    cos = torch.stack(cos_pairs).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), (n * cos) / torch.where(singular, 1, denom))

    avg = ws[0].clone()
    for w in ws[1:]:
        avg.add_(w)
    avg.div_(n)
    return avg.mul_(t).add_((1 - t) * w0).reshape(out_shape)


register(
    MethodSpec(
        name="model_stock",
        fn=model_stock,
        needs_base=True,
        global_params={"filter_wise": False},
        model_params={},
        description="interpolate base -> average by the task vectors' angle (arXiv:2403.19522)",
    )
)
