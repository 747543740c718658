"""Layer-causal gradient descent and the ZS / ICL / FT comparison (draft 003; SimAOU / SimAM / SimAMΔ).

Settings on a :class:`~pnekern.icl.models.SequenceTransformer` (symbolic tasks):

* **ZS** — the model on the query tokens only.
* **ICL** — the model on demonstrations followed by the query.
* **FT** — a copy fine-tuned for ``steps`` plain SGD steps (learning rate ``lr``) on the demonstrations (tokens and
  next-token targets, ``IGNORE_INDEX`` = unscored), updating **only the K and V projections** (rows C:3C of every
  block's fused ``qkv`` weight and bias), then run on the query only. Each prompt gets its own copy (its own
  demonstrations).
* **layer-causal FT** — the same, but the loss is Σ_ℓ CE(lm_head(ln_f(x_ℓ)), targets) with x_ℓ the output of block ℓ
  computed from a *detached* input: no gradient crosses a layer boundary, so block ℓ is updated only from its own
  early-exit prediction error. The final LayerNorm and unembedding are shared and frozen (they are not K/V).
* **random control** — the FT copy's update replaced by a Gaussian update with the same Frobenius norm per K/V
  tensor (only the rows FT changes); **untrained control** — pass a freshly initialised model as ``model``.

Choices (the draft is silent): SGD without momentum or weight decay; the CE is the mean over scored positions of
each prompt's demonstrations (per layer in the layer-causal loss, summed over layers); the per-layer metrics are
averaged over prompts ignoring NaN (undefined cosines, e.g. a zero update), and ``nan_count`` reports how many.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .similarity import capture_attention, sim_am, sim_am_delta, sim_aou
from .tasks import IGNORE_INDEX

__all__ = [
    "kv_parameters", "layer_outputs", "layer_causal_loss", "final_loss", "finetune_kv", "random_kv_update",
    "SimilarityResult", "icl_ft_similarity", "SIMILARITY_METHODS",
]

SIMILARITY_METHODS = ("ft", "layer_causal_ft", "random")


def _check_model(model: nn.Module) -> None:
    if not all(hasattr(model, a) for a in ("wte", "backbone", "lm_head")):
        raise ValueError("layer-causal GD needs a SequenceTransformer-like model (wte, backbone, lm_head)")


def kv_parameters(model: nn.Module) -> List[Tuple[nn.Parameter, Tensor]]:
    """(parameter, row mask) for every block's qkv weight [3C, C] and bias [3C]: rows C:3C are K and V."""
    _check_model(model)
    out = []
    for block in model.backbone.blocks:
        lin = block.attn.qkv
        C = lin.weight.shape[1]
        for p in (lin.weight, lin.bias):
            if p is None:
                continue
            mask = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
            mask[C:] = True
            out.append((p, mask))
    return out


def layer_outputs(model: nn.Module, tokens: Tensor, detach_inputs: bool) -> List[Tensor]:
    """Residual stream after each block [B, T, C] (n_layer entries); block inputs detached if ``detach_inputs``."""
    _check_model(model)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [B, T], got {tuple(tokens.shape)}")
    bb = model.backbone
    T = tokens.shape[1]
    if T > bb.n_positions:
        raise ValueError(f"sequence length {T} exceeds n_positions={bb.n_positions}")
    x = model.wte(tokens) + bb.wpe(torch.arange(T, device=tokens.device))
    outs = []
    for block in bb.blocks:
        x, _ = block(x.detach() if detach_inputs else x)
        outs.append(x)
    return outs


def _ce(model: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    logits = model.lm_head(model.backbone.ln_f(hidden))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def layer_causal_loss(model: nn.Module, tokens: Tensor, targets: Tensor) -> Tuple[Tensor, List[Tensor]]:
    """(Σ_ℓ CE_ℓ, [CE_ℓ]) with CE_ℓ = CE(lm_head(ln_f(block_ℓ(stopgrad(x_{ℓ−1})))), targets); nats per token."""
    per = [_ce(model, h, targets) for h in layer_outputs(model, tokens, detach_inputs=True)]
    return torch.stack(per).sum(), per


def final_loss(model: nn.Module, tokens: Tensor, targets: Tensor) -> Tensor:
    """The ordinary next-token CE of the final layer (nats per scored token)."""
    return _ce(model, layer_outputs(model, tokens, detach_inputs=False)[-1], targets)


def finetune_kv(model: nn.Module, tokens: Tensor, targets: Tensor, steps: int, lr: float,
                method: str = "ft") -> nn.Module:
    """A copy of ``model`` after ``steps`` SGD steps of size ``lr`` on K/V rows only.

    method: ``"ft"`` (final-layer CE, ordinary backprop) or ``"layer_causal_ft"`` (:func:`layer_causal_loss`).
    """
    if method not in ("ft", "layer_causal_ft"):
        raise ValueError(f"method={method!r}; choose 'ft' or 'layer_causal_ft'")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} must be an int >= 0")
    if not lr >= 0:
        raise ValueError(f"lr={lr!r} must be >= 0")
    if tokens.shape != targets.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and targets {tuple(targets.shape)} must match")
    ft = copy.deepcopy(model)
    kv = kv_parameters(ft)
    params = [p for p, _ in kv]
    for _ in range(steps):
        with torch.enable_grad():
            loss = final_loss(ft, tokens, targets) if method == "ft" else layer_causal_loss(ft, tokens, targets)[0]
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for (p, mask), g in zip(kv, grads):
                if g is not None:
                    shape = (-1,) + (1,) * (p.dim() - 1)
                    p.sub_(lr * g * mask.view(shape).to(g.dtype))
    return ft


@torch.no_grad()
def random_kv_update(model: nn.Module, reference: nn.Module, generator: torch.Generator) -> nn.Module:
    """A copy of ``model`` whose K/V rows moved by a random Gaussian direction with the same Frobenius norm per
    tensor as ``reference`` − ``model`` (the random-update control)."""
    out = copy.deepcopy(model)
    for (p, mask), (r, _), (p0, _) in zip(kv_parameters(out), kv_parameters(reference), kv_parameters(model)):
        delta = (r - p0)[mask]
        z = torch.randn(delta.shape, generator=generator, dtype=torch.float64).to(p.dtype)
        nz = z.norm()
        if nz > 0:
            p[mask] += z * (delta.norm() / nz)
    return out


@dataclass
class SimilarityResult:
    """Per-layer metrics [n_layer] for each method, averaged over prompts (NaN-ignoring).

    Attributes:
        sim_aou, sim_am, sim_am_delta: method -> tensor [n_layer] (float64).
        nan_count: method -> number of undefined per-prompt cosines (over layers and metrics).
        per_prompt: method -> {"sim_aou"/"sim_am"/"sim_am_delta": [B, n_layer]}.
    """

    sim_aou: Dict[str, Tensor] = field(default_factory=dict)
    sim_am: Dict[str, Tensor] = field(default_factory=dict)
    sim_am_delta: Dict[str, Tensor] = field(default_factory=dict)
    nan_count: Dict[str, int] = field(default_factory=dict)
    per_prompt: Dict[str, Dict[str, Tensor]] = field(default_factory=dict)

    def table(self) -> str:
        """A plain-text table: one row per (method, layer)."""
        lines = [f"{'method':<16}{'layer':>6}{'SimAOU':>10}{'SimAM':>10}{'SimAMΔ':>10}"]
        for m in self.sim_aou:
            for layer in range(self.sim_aou[m].shape[0]):
                lines.append(f"{m:<16}{layer:>6}{float(self.sim_aou[m][layer]):>10.4f}"
                             f"{float(self.sim_am[m][layer]):>10.4f}{float(self.sim_am_delta[m][layer]):>10.4f}")
        return "\n".join(lines)


def icl_ft_similarity(
    model: nn.Module,
    demo_tokens: Tensor,
    demo_targets: Tensor,
    query_tokens: Tensor,
    steps: int = 1,
    lr: float = 1e-2,
    methods: Sequence[str] = SIMILARITY_METHODS,
    seed: int = 0,
) -> SimilarityResult:
    """SimAOU / SimAM / SimAMΔ per layer of FT variants against ICL (module docstring).

    Args:
        demo_tokens, demo_targets: [B, T_d] demonstrations and their next-token targets (IGNORE_INDEX unscored).
        query_tokens: [B, T_q]; ICL input = cat(demo_tokens, query_tokens).
        steps, lr: the FT budget. methods: subset of ``("ft", "layer_causal_ft", "random")`` ("random" reuses
            the "ft" update norms). seed: the random control's generator seed.
    """
    bad = [m for m in methods if m not in SIMILARITY_METHODS]
    if bad or not methods:
        raise ValueError(f"methods={list(methods)!r}; choose from {SIMILARITY_METHODS}")
    if demo_tokens.dim() != 2 or query_tokens.dim() != 2 or demo_tokens.shape[0] != query_tokens.shape[0]:
        raise ValueError("demo_tokens [B, T_d] and query_tokens [B, T_q] must be 2-D with the same B")
    if demo_targets.shape != demo_tokens.shape:
        raise ValueError("demo_targets must have the shape of demo_tokens")
    B, Tq = query_tokens.shape
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    rows: Dict[str, Dict[str, List[Tensor]]] = {m: {"sim_aou": [], "sim_am": [], "sim_am_delta": []} for m in methods}
    try:
        for b in range(B):
            q = query_tokens[b:b + 1]
            zs = capture_attention(model, q, Tq)
            icl = capture_attention(model, torch.cat([demo_tokens[b:b + 1], q], dim=1), Tq)
            ft_models: Dict[str, nn.Module] = {}
            for m in methods:
                if m in ("ft", "layer_causal_ft"):
                    ft_models[m] = finetune_kv(model, demo_tokens[b:b + 1], demo_targets[b:b + 1], steps, lr, m)
            if "random" in methods:
                ref = ft_models.get("ft") or finetune_kv(model, demo_tokens[b:b + 1], demo_targets[b:b + 1],
                                                         steps, lr, "ft")
                ft_models["random"] = random_kv_update(model, ref, gen)
            for m in methods:
                ft_models[m].eval()
                ft = capture_attention(ft_models[m], q, Tq)
                rows[m]["sim_aou"].append(torch.stack([sim_aou(i, z, f)[0] for i, z, f in
                                                       zip(icl.attn_out, zs.attn_out, ft.attn_out)]))
                rows[m]["sim_am"].append(torch.stack([sim_am(i, f)[0] for i, f in zip(icl.scores, ft.scores)]))
                rows[m]["sim_am_delta"].append(torch.stack([sim_am_delta(i, z, f)[0] for i, z, f in
                                                            zip(icl.scores, zs.scores, ft.scores)]))
    finally:
        model.train(was_training)
    res = SimilarityResult()
    for m in methods:
        per = {k: torch.stack(v) for k, v in rows[m].items()}  # [B, L]
        res.per_prompt[m] = per
        res.sim_aou[m] = per["sim_aou"].nanmean(0)
        res.sim_am[m] = per["sim_am"].nanmean(0)
        res.sim_am_delta[m] = per["sim_am_delta"].nanmean(0)
        res.nan_count[m] = int(sum(int(t.isnan().sum()) for t in per.values()))
    return res
