"""Layer-causal GD and SimAOU / SimAM / SimAMΔ: hand-computed metric cases, capture vs a manual forward, the
stop-gradient, K/V-only updates, and the controls."""
import math

import pytest
import torch

from pnekern.icl import SequenceTransformer
from pnekern.icl.layer_causal import (final_loss, finetune_kv, icl_ft_similarity, kv_parameters, layer_causal_loss,
                                      random_kv_update)
from pnekern.icl.similarity import capture_attention, cosine, sim_am, sim_am_delta, sim_aou
from pnekern.icl.tasks import IGNORE_INDEX


def _model(n_layer=2, seed=0):
    torch.manual_seed(seed)
    return SequenceTransformer(8, 16, n_layer=n_layer, n_head=2, d_model=8).double()


def _prompts(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    demo = torch.randint(0, 8, (B, 6), generator=g)
    targets = demo.roll(-1, 1)
    targets[:, -1] = IGNORE_INDEX
    query = torch.randint(0, 8, (B, 3), generator=g)
    return demo, targets, query


def test_metrics_on_hand_computed_vectors():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)
    assert math.isclose(float(cosine(t(1.0, 0.0), t(1.0, 1.0))), 1 / math.sqrt(2), rel_tol=1e-15)
    assert math.isnan(float(cosine(t(0.0, 0.0), t(1.0, 1.0))))  # undefined, not 0
    zs, icl = t(1.0, 1.0, 0.0), t(2.0, 1.0, 0.0)  # ICL update (1, 0, 0)
    assert float(sim_aou(icl, zs, t(1.0, 3.0, 0.0))) == 0.0  # FT update (0, 2, 0): orthogonal
    assert float(sim_aou(icl, zs, t(4.0, 1.0, 0.0))) == 1.0  # same direction, any length
    assert float(sim_aou(icl, zs, t(0.0, 1.0, 0.0))) == -1.0
    assert math.isnan(float(sim_aou(icl, zs, zs)))  # no FT update
    # two heads, T_q = 2: head 0 parallel (cos 1), head 1 orthogonal (cos 0) -> SimAM 0.5
    s_icl = torch.tensor([[1.0, 2.0], [1.0, 0.0]], dtype=torch.float64)
    s_ft = torch.tensor([[2.0, 4.0], [0.0, 1.0]], dtype=torch.float64)
    assert math.isclose(float(sim_am(s_icl, s_ft)), 0.5, rel_tol=1e-15)
    # SimAMΔ: ZS scores (1, 1) per head; ICL−ZS = (0, 1), (0, −1); FT−ZS = (1, 3), (−1, 0)
    s_zs = torch.ones(2, 2, dtype=torch.float64)
    expected = 0.5 * (3 / math.sqrt(10) + 0.0)
    assert math.isclose(float(sim_am_delta(s_icl, s_zs, s_ft)), expected, rel_tol=1e-14)


def test_capture_matches_a_manual_forward():
    model = _model(n_layer=1)
    tokens = torch.randint(0, 8, (2, 5), generator=torch.Generator().manual_seed(1))
    cap = capture_attention(model, tokens, query_len=3)
    bb = model.backbone
    x = model.wte(tokens) + bb.wpe(torch.arange(5))
    h = bb.blocks[0].ln1(x)
    attn = bb.blocks[0].attn
    out, probs = attn(h)
    torch.testing.assert_close(cap.attn_out[0], out[:, -1], rtol=0, atol=0)
    q, k, _ = attn.qkv(h).split(8, dim=2)
    q = q.view(2, 5, 2, 4).transpose(1, 2)
    k = k.view(2, 5, 2, 4).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) / 2.0  # sqrt(head_dim = 4)
    torch.testing.assert_close(cap.scores[0], scores[:, :, -1, -3:])
    # the captured pre-softmax scores give the model's own attention probabilities
    masked = cap.scores_all[0].masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(masked.softmax(-1), probs)
    with pytest.raises(ValueError):
        capture_attention(model, tokens, query_len=0)
    with pytest.raises(ValueError):
        capture_attention(model, tokens, query_len=6)


def test_layer_causal_loss_stops_gradients_between_layers():
    model = _model(n_layer=3)
    demo, targets, _ = _prompts()
    total, per = layer_causal_loss(model, demo, targets)
    torch.testing.assert_close(total, torch.stack(per).sum())
    blocks = list(model.backbone.blocks)
    for i, loss_i in enumerate(per):
        for j, block in enumerate(blocks):
            grads = torch.autograd.grad(loss_i, list(block.parameters()), retain_graph=True, allow_unused=True)
            nonzero = any(g is not None and bool(g.abs().sum() > 0) for g in grads)
            assert nonzero == (i == j), (i, j)  # no gradient crosses a layer boundary
        emb = torch.autograd.grad(loss_i, [model.wte.weight, model.backbone.wpe.weight], retain_graph=True,
                                  allow_unused=True)
        assert all(g is None for g in emb)
    # the last layer's term is the ordinary final-layer loss
    torch.testing.assert_close(per[-1], final_loss(model, demo, targets))


def test_finetune_updates_only_kv_rows_by_minus_lr_grad():
    model = _model()
    demo, targets, _ = _prompts(B=1)
    ft = finetune_kv(model, demo, targets, steps=1, lr=0.3, method="ft")
    kv_params = [p for p, _ in kv_parameters(model)]
    grads = torch.autograd.grad(final_loss(model, demo, targets), kv_params)
    for (p0, mask), (p1, _), g in zip(kv_parameters(model), kv_parameters(ft), grads):
        torch.testing.assert_close(p1[mask], p0[mask] - 0.3 * g[mask], rtol=1e-13, atol=1e-15)
        assert torch.equal(p1[~mask], p0[~mask])  # queries untouched
    kv_ids = {id(p) for p, _ in kv_parameters(ft)}
    for (n0, p0), (n1, p1) in zip(model.named_parameters(), ft.named_parameters()):
        if id(p1) not in kv_ids:
            assert torch.equal(p0, p1), n0


def test_single_layer_layer_causal_equals_standard_ft():
    model = _model(n_layer=1)
    demo, targets, _ = _prompts(B=1)
    a = finetune_kv(model, demo, targets, steps=3, lr=0.2, method="ft")
    b = finetune_kv(model, demo, targets, steps=3, lr=0.2, method="layer_causal_ft")
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-13, atol=1e-15)


def test_random_control_matches_update_norms():
    model = _model()
    demo, targets, _ = _prompts(B=1)
    ft = finetune_kv(model, demo, targets, steps=2, lr=0.5)
    rnd = random_kv_update(model, ft, torch.Generator().manual_seed(0))
    for (p0, mask), (pf, _), (pr, _) in zip(kv_parameters(model), kv_parameters(ft), kv_parameters(rnd)):
        torch.testing.assert_close((pr - p0)[mask].norm(), (pf - p0)[mask].norm())
        assert torch.equal(pr[~mask], p0[~mask])


def test_similarity_report_shapes_controls_and_undefined_cases():
    model = _model()
    demo, targets, query = _prompts(B=2)
    res = icl_ft_similarity(model, demo, targets, query, steps=2, lr=0.5)
    for m in ("ft", "layer_causal_ft", "random"):
        for metric in (res.sim_aou, res.sim_am, res.sim_am_delta):
            assert metric[m].shape == (2,) and bool(torch.isfinite(metric[m]).all())
            assert bool((metric[m].abs() <= 1 + 1e-12).all())
        assert res.nan_count[m] == 0
    assert "SimAOU" in res.table()
    # zero FT steps: h_FT = h_ZS, so SimAOU and SimAMΔ are undefined (NaN), SimAM is cos(s_ICL, s_ZS)
    zero = icl_ft_similarity(model, demo, targets, query, steps=0, methods=("ft",))
    assert bool(zero.sim_aou["ft"].isnan().all()) and bool(zero.sim_am_delta["ft"].isnan().all())
    zs, icl = capture_attention(model, query[:1], 3), capture_attention(model, torch.cat([demo[:1], query[:1]], 1), 3)
    torch.testing.assert_close(zero.per_prompt["ft"]["sim_am"][0, 0], sim_am(icl.scores[0], zs.scores[0])[0])
    # untrained-model control: the same call on a fresh initialisation runs too
    fresh = icl_ft_similarity(_model(seed=5), demo, targets, query, steps=1, lr=0.5, methods=("ft", "random"))
    assert set(fresh.sim_aou) == {"ft", "random"}


def test_bad_inputs():
    model = _model()
    demo, targets, query = _prompts()
    with pytest.raises(ValueError):
        icl_ft_similarity(model, demo, targets, query, methods=("sgd",))
    with pytest.raises(ValueError):
        icl_ft_similarity(model, demo, targets[:, :3], query)
    with pytest.raises(ValueError):
        icl_ft_similarity(model, demo, targets, query[:1])
    with pytest.raises(ValueError):
        finetune_kv(model, demo, targets, steps=-1, lr=0.1)
    with pytest.raises(ValueError):
        finetune_kv(model, demo, targets, steps=1, lr=0.1, method="adam")
    with pytest.raises(ValueError):
        kv_parameters(torch.nn.Linear(2, 2))
