"""ICL-vs-GD similarity metrics (draft 003, "In-context Learning and Gradient Descent Revisited"; Dai et al. 2023).

Three settings share the *query* tokens q (length T_q): ZS (the model on q alone), ICL (the model on demonstrations
followed by q) and FT (a fine-tuned copy on q alone). Per layer ℓ:

* **SimAOU** = cos(h_ICL − h_ZS, h_FT − h_ZS), h = the attention module's output (after the output projection,
  before the residual add) at the last token — the attention-output *update* direction.
* **SimAM** = mean over heads of cos(s_ICL, s_FT), s = the last token's pre-softmax attention scores
  q·k/sqrt(d_head) over the query's key positions (for ICL the last T_q key positions: the demonstrations' keys
  are dropped because FT/ZS have none).
* **SimAMΔ** = mean over heads of cos(s_ICL − s_ZS, s_FT − s_ZS).

Choices where the drafts are ambiguous (documented, tested):
* only the last token's score row is used (the row that produces the prediction, as SimAOU); rows of earlier query
  tokens are available from :func:`capture_attention` (``scores_all``) for other definitions;
* pre-softmax scores (not probabilities), without the causal mask (the last row is unmasked anyway);
* a cosine with a zero vector (e.g. FT with zero steps: h_FT = h_ZS) is undefined and returned as NaN, never 0;
* per-example cosines are averaged over the batch by the callers (:mod:`.layer_causal`).

Capture works on :class:`~pnekern.icl.models.GPTBackbone`-based models (``model.backbone.blocks[i].attn`` with a
fused ``qkv`` Linear) through forward hooks; the model itself is not modified.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List

import torch
from torch import Tensor, nn

__all__ = ["cosine", "sim_aou", "sim_am", "sim_am_delta", "AttentionCapture", "capture_attention"]


def cosine(a: Tensor, b: Tensor, dim: int = -1, eps: float = 0.0) -> Tensor:
    """cos(a, b) along ``dim``; NaN where either vector is zero (undefined direction). float64 math."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    num = (a64 * b64).sum(dim)
    den = a64.norm(dim=dim) * b64.norm(dim=dim)
    out = num / den
    return torch.where(den > eps, out, torch.full_like(out, float("nan")))


def sim_aou(h_icl: Tensor, h_zs: Tensor, h_ft: Tensor) -> Tensor:
    """SimAOU per example: cos(h_ICL − h_ZS, h_FT − h_ZS); inputs [..., C] → [...]."""
    return cosine(h_icl - h_zs, h_ft - h_zs)


def sim_am(s_icl: Tensor, s_ft: Tensor) -> Tensor:
    """SimAM per example: mean over heads of cos(s_ICL, s_FT); inputs [..., H, T_q] → [...]."""
    return cosine(s_icl, s_ft).mean(-1)


def sim_am_delta(s_icl: Tensor, s_zs: Tensor, s_ft: Tensor) -> Tensor:
    """SimAMΔ per example: mean over heads of cos(s_ICL − s_ZS, s_FT − s_ZS); [..., H, T_q] → [...]."""
    return cosine(s_icl - s_zs, s_ft - s_zs).mean(-1)


@dataclass
class AttentionCapture:
    """Per-layer attention quantities of one forward pass.

    Attributes:
        attn_out: list over layers of [B, C] — attention output (after proj) at the last token.
        scores: list over layers of [B, H, T_q] — last token's pre-softmax scores over the last ``query_len`` keys.
        scores_all: list over layers of [B, H, T, T] — every pre-softmax score (causal positions unmasked).
    """

    attn_out: List[Tensor]
    scores: List[Tensor]
    scores_all: List[Tensor]


def _blocks(model: nn.Module) -> Any:
    backbone = getattr(model, "backbone", model)
    blocks = getattr(backbone, "blocks", None)
    if blocks is None or not all(hasattr(b, "attn") and hasattr(b.attn, "qkv") for b in blocks):
        raise ValueError("capture_attention needs a GPTBackbone-based model (model.backbone.blocks[i].attn.qkv)")
    return blocks


@torch.no_grad()
def capture_attention(model: nn.Module, inputs: Tensor, query_len: int,
                      forward: Callable[[nn.Module, Tensor], Any] | None = None) -> AttentionCapture:
    """Run ``model(inputs)`` (or ``forward(model, inputs)``) and capture every layer's attention quantities.

    Args:
        inputs: the model input (tokens [B, T] for a SequenceTransformer).
        query_len: T_q ≥ 1, the number of trailing positions that are the query.
    """
    if isinstance(query_len, bool) or not isinstance(query_len, int) or query_len < 1:
        raise ValueError(f"query_len={query_len!r} must be an int >= 1")
    blocks = _blocks(model)
    outs: List[Tensor] = []
    scores_all: List[Tensor] = []
    handles = []

    def hook(mod: nn.Module, args: tuple, output: Any) -> None:
        x = args[0]
        B, T, C = x.shape
        if query_len > T:
            raise ValueError(f"query_len={query_len} exceeds the sequence length {T}")
        q, k, _ = mod.qkv(x).split(C, dim=2)
        q = q.view(B, T, mod.n_head, mod.head_dim).transpose(1, 2)
        k = k.view(B, T, mod.n_head, mod.head_dim).transpose(1, 2)
        scores_all.append((q @ k.transpose(-2, -1)) / math.sqrt(mod.head_dim))
        outs.append(output[0][:, -1, :])

    try:
        for b in blocks:
            handles.append(b.attn.register_forward_hook(hook))
        if forward is not None:
            forward(model, inputs)
        else:
            model(inputs)
    finally:
        for h in handles:
            h.remove()
    scores = [s[:, :, -1, -query_len:] for s in scores_all]
    return AttentionCapture(outs, scores, scores_all)
