"""Small models for synthetic ICL: a GPT-2-style decoder and a one-layer linear self-attention (LSA) model.

* :class:`GPTBackbone` — pre-LN decoder (causal multi-head attention + GELU MLP, learned positional
  embeddings). Attention is computed explicitly (no fused SDPA) so per-head probabilities can be returned
  and heads masked out; at these sizes the cost is irrelevant.
* :class:`RegressionTransformer` — Garg et al. (2022) read-in/read-out around the backbone: the sequence
  interleaves x tokens (0, x_i) and y tokens (y_i, 0, …, 0) in R^{d+1}; the prediction for y_i is read at the
  position of x_i, so it sees (x_1, y_1, …, x_{i−1}, y_{i−1}, x_i) only.
* :class:`SequenceTransformer` — token embedding + LM head for the symbolic tasks.
* :class:`LinearSelfAttention` — von Oswald et al. (2023): tokens e_i = (x_i, y_i), query e_q = (x_q, 0),
  prediction = y-coordinate of Σ_i W_PV e_i (e_iᵀ W_KQ e_q) / k.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Union

import torch
from torch import Tensor, nn

__all__ = [
    "TransformerOutput",
    "CausalSelfAttention",
    "Block",
    "GPTBackbone",
    "RegressionTransformer",
    "SequenceTransformer",
    "LinearSelfAttention",
]


@dataclass
class TransformerOutput:
    """Returned when ``return_attn`` or ``return_hidden`` is set.

    Attributes:
        output: predictions [B, k] (regression) or logits [B, T, V] (tokens).
        attentions: per layer, attention probabilities [B, H, T, T] (rows sum to 1), or None.
        hidden_states: residual stream [B, T, d_model] after the embedding and after each block
            (n_layer + 1 entries, the last before the final LayerNorm), or None.
    """

    output: Tensor
    attentions: Optional[List[Tensor]] = None
    hidden_states: Optional[List[Tensor]] = None


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention with optional per-head output mask.

    ``head_mask`` [H] multiplies each head's output before the output projection, so 0 removes exactly that
    head's contribution to the residual stream (the projection bias is shared and stays).
    """

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_head != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, head_mask: Optional[Tensor] = None):
        """x [B, T, C] → (out [B, T, C], probs [B, H, T, T])."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(causal, float("-inf"))
        probs = scores.softmax(dim=-1)
        out = self.dropout(probs) @ v  # [B, H, T, hd]
        if head_mask is not None:
            out = out * head_mask.to(out.dtype).view(1, self.n_head, 1, 1)
        out = out.transpose(1, 2).reshape(B, T, C)
        return self.proj(out), probs


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, d_model: int, n_head: int, mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(), nn.Linear(mlp_ratio * d_model, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor, head_mask: Optional[Tensor] = None):
        a, probs = self.attn(self.ln1(x), head_mask)
        x = x + a
        x = x + self.mlp(self.ln2(x))
        return x, probs


class GPTBackbone(nn.Module):
    """Stack of pre-LN blocks over input embeddings plus learned positional embeddings.

    Args:
        n_positions: maximum sequence length T.
        n_layer, n_head, d_model: depth, heads per layer, residual width.
    """

    def __init__(self, n_positions: int, n_layer: int = 3, n_head: int = 2, d_model: int = 64,
                 mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        for name, v in (("n_positions", n_positions), ("n_layer", n_layer), ("n_head", n_head),
                        ("d_model", d_model), ("mlp_ratio", mlp_ratio)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.n_positions = n_positions
        self.n_layer = n_layer
        self.n_head = n_head
        self.d_model = d_model
        self.wpe = nn.Embedding(n_positions, d_model)
        self.blocks = nn.ModuleList([Block(d_model, n_head, mlp_ratio, dropout) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d_model)

    def forward(self, h: Tensor, head_mask: Optional[Tensor] = None, return_attn: bool = False,
                return_hidden: bool = False):
        """h [B, T, d_model] (already embedded) → (final [B, T, d_model], attentions, hidden_states).

        head_mask: [n_layer, n_head] multiplicative mask (1 keeps, 0 knocks out a head), or None.
        """
        T = h.shape[1]
        if T > self.n_positions:
            raise ValueError(f"sequence length {T} exceeds the model context n_positions={self.n_positions}")
        if head_mask is not None and tuple(head_mask.shape) != (self.n_layer, self.n_head):
            raise ValueError(f"head_mask must have shape ({self.n_layer}, {self.n_head}), got {tuple(head_mask.shape)}")
        pos = torch.arange(T, device=h.device)
        x = h + self.wpe(pos)
        attns: List[Tensor] = []
        hidden: List[Tensor] = [x]
        for i, block in enumerate(self.blocks):
            x, probs = block(x, None if head_mask is None else head_mask[i])
            if return_attn:
                attns.append(probs)
            if return_hidden:
                hidden.append(x)
        return self.ln_f(x), (attns if return_attn else None), (hidden if return_hidden else None)


def _init_gpt2(module: nn.Module) -> None:
    # GPT-2 initialisation: N(0, 0.02) weights, zero biases; LayerNorm keeps its (1, 0) defaults.
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)


#: token layouts of :class:`RegressionTransformer`
TOKEN_FORMATS = ("interleaved", "pair")


class RegressionTransformer(nn.Module):
    """GPT decoder for in-context regression with the Garg et al. (2022) interleaving.

    Args:
        d: input dimension of x.
        k_max: maximum number of examples; the context holds 2·k_max tokens.
        token_format: ``"interleaved"`` (Garg et al.: x token (0, x_i), y token (y_i, 0, …, 0)) or ``"pair"``
            (x token (0, x_i), y token (y_i, x_i)). Both are causal in the same way (y_i is predicted at the x_i
            token and is visible only to later positions); "pair" puts a whole example in one token, so a single
            attention layer can already regress on the context instead of first having to learn a previous-token
            head that copies x_i onto the y_i token — it learns in-context regression in far fewer steps.
    """

    def __init__(self, d: int, k_max: int, n_layer: int = 3, n_head: int = 2, d_model: int = 64,
                 mlp_ratio: int = 4, dropout: float = 0.0, token_format: str = "interleaved") -> None:
        super().__init__()
        if not isinstance(d, int) or d < 1:
            raise ValueError(f"d must be a positive integer, got {d!r}")
        if not isinstance(k_max, int) or k_max < 1:
            raise ValueError(f"k_max must be a positive integer, got {k_max!r}")
        if token_format not in TOKEN_FORMATS:
            raise ValueError(f"token_format must be one of {TOKEN_FORMATS}, got {token_format!r}")
        self.d = d
        self.k_max = k_max
        self.token_format = token_format
        self.read_in = nn.Linear(d + 1, d_model)
        self.backbone = GPTBackbone(2 * k_max, n_layer, n_head, d_model, mlp_ratio, dropout)
        self.read_out = nn.Linear(d_model, 1)
        _init_gpt2(self)

    @property
    def n_layer(self) -> int:
        return self.backbone.n_layer

    @property
    def n_head(self) -> int:
        return self.backbone.n_head

    def embed_inputs(self, xs: Tensor, ys: Tensor) -> Tensor:
        """Interleave xs [B,k,d] and ys [B,k] into tokens [B, 2k, d+1]: x token (0, x_i), y token (y_i, 0…)
        (``token_format="pair"``: y token (y_i, x_i))."""
        if xs.dim() != 3 or xs.shape[-1] != self.d:
            raise ValueError(f"xs must be [B, k, {self.d}], got {tuple(xs.shape)}")
        B, k, d = xs.shape
        if tuple(ys.shape) != (B, k):
            raise ValueError(f"ys must be [{B}, {k}], got {tuple(ys.shape)}")
        if k > self.k_max:
            raise ValueError(f"k ({k}) is larger than the model context k_max ({self.k_max})")
        x_tok = torch.cat([torch.zeros_like(xs[..., :1]), xs], dim=-1)
        y_rest = xs if self.token_format == "pair" else torch.zeros_like(xs)
        y_tok = torch.cat([ys.unsqueeze(-1), y_rest], dim=-1)
        return torch.stack([x_tok, y_tok], dim=2).reshape(B, 2 * k, d + 1)

    def forward(self, xs: Tensor, ys: Tensor, head_mask: Optional[Tensor] = None, return_attn: bool = False,
                return_hidden: bool = False) -> Union[Tensor, TransformerOutput]:
        """Predictions [B, k]: entry i predicts y_i from (x_1, y_1, …, x_i).

        With ``return_attn``/``return_hidden`` a :class:`TransformerOutput` is returned instead (token positions
        2i are x tokens, 2i+1 y tokens).
        """
        tokens = self.embed_inputs(xs, ys)
        h, attns, hidden = self.backbone(self.read_in(tokens), head_mask, return_attn, return_hidden)
        preds = self.read_out(h[:, 0::2]).squeeze(-1)
        if return_attn or return_hidden:
            return TransformerOutput(preds, attns, hidden)
        return preds


class SequenceTransformer(nn.Module):
    """GPT decoder over tokens: embedding → backbone → LM head (untied). Logits [B, T, vocab_size]."""

    def __init__(self, vocab_size: int, n_positions: int, n_layer: int = 2, n_head: int = 2, d_model: int = 64,
                 mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
        self.vocab_size = vocab_size
        self.wte = nn.Embedding(vocab_size, d_model)
        self.backbone = GPTBackbone(n_positions, n_layer, n_head, d_model, mlp_ratio, dropout)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        _init_gpt2(self)

    @property
    def n_layer(self) -> int:
        return self.backbone.n_layer

    @property
    def n_head(self) -> int:
        return self.backbone.n_head

    def forward(self, tokens: Tensor, head_mask: Optional[Tensor] = None, return_attn: bool = False,
                return_hidden: bool = False) -> Union[Tensor, TransformerOutput]:
        """tokens [B, T] int64 → logits [B, T, vocab_size] (or a :class:`TransformerOutput`)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, T], got {tuple(tokens.shape)}")
        h, attns, hidden = self.backbone(self.wte(tokens), head_mask, return_attn, return_hidden)
        logits = self.lm_head(h)
        if return_attn or return_hidden:
            return TransformerOutput(logits, attns, hidden)
        return logits


class LinearSelfAttention(nn.Module):
    """One-layer linear self-attention for in-context regression (von Oswald et al. 2023).

    Tokens e_i = (x_i, y_i) ∈ R^{d+1} for the k context examples, query e_q = (x_q, 0). The layer update of the
    query token is Δe_q = (1/k) Σ_i W_PV e_i (e_iᵀ W_KQ e_q); the prediction is its y-coordinate (e_q has 0
    there). With W_KQ = [[I, 0], [0, 0]] and the y-row of W_PV = (0, …, 0, η) this is exactly one GD step of
    size η from w = 0 on L(w) = (1/2k) Σ (wᵀx_i − y_i)².

    Args:
        d: input dimension.
        init_std: std of the i.i.d. normal initialisation (0 is a saddle point of the training loss).
    """

    def __init__(self, d: int, init_std: float = 0.1, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        if not isinstance(d, int) or d < 1:
            raise ValueError(f"d must be a positive integer, got {d!r}")
        self.d = d
        self.W_KQ = nn.Parameter(torch.randn(d + 1, d + 1, generator=generator) * init_std)
        self.W_PV = nn.Parameter(torch.randn(d + 1, d + 1, generator=generator) * init_std)

    def forward(self, xs_context: Tensor, ys_context: Tensor, x_query: Tensor) -> Tensor:
        """xs_context [B,k,d], ys_context [B,k], x_query [B,d] → prediction [B] (0 when k = 0)."""
        B, k, d = xs_context.shape
        if d != self.d:
            raise ValueError(f"xs_context must have last dim {self.d}, got {d}")
        if k == 0:
            return x_query.new_zeros(B)
        e = torch.cat([xs_context, ys_context.unsqueeze(-1)], dim=-1)  # [B, k, d+1]
        e_q = torch.cat([x_query, x_query.new_zeros(B, 1)], dim=-1)  # [B, d+1]
        scores = torch.einsum("bki,ij,bj->bk", e, self.W_KQ, e_q)  # e_iᵀ W_KQ e_q
        # only the y-row of W_PV reaches the prediction
        values_y = e @ self.W_PV[d]  # [B, k]
        return (scores * values_y).sum(dim=1) / k
