"""GPT-style decoder and linear self-attention models."""
import pytest
import torch

from pnekern.icl import (LinearRegressionTask, LinearSelfAttention, OneStepGD, RegressionTransformer,
                         SequenceTransformer, make_generator)
from pnekern.icl.models import CausalSelfAttention


def _reg_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=2, d_model=32)
    cfg.update(kw)
    return RegressionTransformer(3, 8, **cfg).eval()


@pytest.mark.parametrize("token_format", ["interleaved", "pair"])
def test_regression_model_is_causal(token_format):
    model = _reg_model(token_format=token_format)
    b = LinearRegressionTask(3, 8, noise_var=0.1).sample(4, make_generator(0))
    base = model(b.xs, b.ys)
    assert base.shape == (4, 8)
    xs2 = b.xs.clone()
    xs2[:, 5] += 3.0
    out = model(xs2, b.ys)
    torch.testing.assert_close(out[:, :5], base[:, :5], rtol=0, atol=1e-6)
    assert (out[:, 5] - base[:, 5]).abs().min() > 1e-6  # x_5 is read where y_5 is predicted
    ys2 = b.ys.clone()
    ys2[:, 5] += 3.0
    out = model(b.xs, ys2)
    # y_5 is not visible to its own prediction (read at the x_5 token), only to later ones
    torch.testing.assert_close(out[:, :6], base[:, :6], rtol=0, atol=1e-6)
    assert (out[:, 6:] - base[:, 6:]).abs().min() > 1e-6


def test_sequence_model_is_causal():
    torch.manual_seed(1)
    model = SequenceTransformer(vocab_size=20, n_positions=12, n_layer=2, n_head=4, d_model=32).eval()
    tokens = torch.randint(0, 20, (3, 12), generator=make_generator(0))
    base = model(tokens)
    assert base.shape == (3, 12, 20)
    tok2 = tokens.clone()
    tok2[:, 7] = (tok2[:, 7] + 1) % 20
    out = model(tok2)
    torch.testing.assert_close(out[:, :7], base[:, :7], rtol=0, atol=1e-6)
    assert (out[:, 7:] - base[:, 7:]).abs().amax(-1).min() > 1e-6


def test_attention_probabilities_are_causal_distributions():
    torch.manual_seed(2)
    model = SequenceTransformer(vocab_size=11, n_positions=10, n_layer=3, n_head=2, d_model=16)
    out = model(torch.randint(0, 11, (2, 10), generator=make_generator(1)), return_attn=True, return_hidden=True)
    assert len(out.attentions) == 3 and len(out.hidden_states) == 4
    for a in out.attentions:
        assert a.shape == (2, 2, 10, 10)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 10))
        assert torch.all(a.triu(1) == 0)
        assert torch.all(a >= 0)


def test_head_mask_removes_exactly_one_heads_contribution():
    torch.manual_seed(3)
    attn = CausalSelfAttention(d_model=16, n_head=4)
    x = torch.randn(2, 6, 16, generator=make_generator(0))
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0])
    out_masked, _ = attn(x, mask)
    out_full, _ = attn(x)
    assert (out_masked - out_full).abs().max() > 1e-4
    # perturbing head 1's value weights must not change the masked output, but does change the full one
    with torch.no_grad():
        hd = 4
        attn.qkv.weight[2 * 16 + hd: 2 * 16 + 2 * hd] += 1.0
    out_masked2, _ = attn(x, mask)
    out_full2, _ = attn(x)
    torch.testing.assert_close(out_masked2, out_masked, rtol=0, atol=1e-6)
    assert (out_full2 - out_full).abs().max() > 1e-3
    # all heads masked: only the output projection's bias is left
    out_none, _ = attn(x, torch.zeros(4))
    torch.testing.assert_close(out_none, attn.proj.bias.expand_as(out_none))


def test_head_mask_through_the_full_model():
    model = _reg_model(n_head=4)
    b = LinearRegressionTask(3, 8).sample(4, make_generator(0))
    ones = torch.ones(2, 4)
    torch.testing.assert_close(model(b.xs, b.ys, head_mask=ones), model(b.xs, b.ys))
    mask = ones.clone()
    mask[1, 2] = 0
    assert (model(b.xs, b.ys, head_mask=mask) - model(b.xs, b.ys)).abs().max() > 1e-7
    with pytest.raises(ValueError, match="head_mask"):
        model(b.xs, b.ys, head_mask=torch.ones(3, 4))


def test_model_input_validation():
    model = _reg_model()
    b = LinearRegressionTask(3, 9).sample(2, make_generator(0))
    with pytest.raises(ValueError, match="k_max"):
        model(b.xs, b.ys)  # 9 examples > k_max = 8
    with pytest.raises(ValueError, match="xs"):
        model(b.xs[..., :2], b.ys)
    with pytest.raises(ValueError, match="n_head"):
        RegressionTransformer(3, 8, n_head=3, d_model=32)


def test_lsa_in_gd_form_is_one_gd_step():
    d, k, eta = 3, 6, 0.8
    lsa = LinearSelfAttention(d)
    with torch.no_grad():
        lsa.W_KQ.zero_()
        lsa.W_KQ[:d, :d] = torch.eye(d)
        lsa.W_PV.zero_()
        lsa.W_PV[d, d] = eta
    b = LinearRegressionTask(d, k + 1, noise_var=0.1).sample(32, make_generator(4))
    pred = lsa(b.xs[:, :k], b.ys[:, :k], b.xs[:, k])
    torch.testing.assert_close(pred, OneStepGD(eta).predict(b.xs[:, :k], b.ys[:, :k], b.xs[:, k]))
    assert torch.all(lsa(b.xs[:, :0], b.ys[:, :0], b.xs[:, 0]) == 0)


def test_token_formats():
    model = _reg_model(token_format="pair")
    xs = torch.randn(2, 3, 3, generator=make_generator(0))
    ys = torch.randn(2, 3, generator=make_generator(1))
    tok = model.embed_inputs(xs, ys)
    assert tok.shape == (2, 6, 4)
    torch.testing.assert_close(tok[:, 0::2, 1:], xs)  # x tokens (0, x_i)
    assert torch.all(tok[:, 0::2, 0] == 0)
    torch.testing.assert_close(tok[:, 1::2, 0], ys)  # y tokens (y_i, x_i)
    torch.testing.assert_close(tok[:, 1::2, 1:], xs)
    garg = _reg_model().embed_inputs(xs, ys)
    assert torch.all(garg[:, 1::2, 1:] == 0)
    with pytest.raises(ValueError, match="token_format"):
        RegressionTransformer(3, 8, token_format="bogus")
