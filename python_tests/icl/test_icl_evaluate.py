"""Evaluation: error curves, bootstrap CIs, induction scores, head knockout, probes, recall."""
import pytest
import torch
from torch import nn

from pnekern.icl import (OLS, BayesPosteriorMean, FactualRecallTask, ICLEstimator, InductionTask,
                         LinearRegressionTask, RegressionTransformer, SequenceTransformer, TransformerOutput,
                         bootstrap_ci, error_vs_k, excess_error_over_bayes, head_knockout_effect, induction_score,
                         induction_scores, linear_probe_beta, make_generator, prediction_distance, recall_accuracy)


class _Zero(ICLEstimator):
    name = "zero"

    def _predict(self, xs, ys, xq):
        return xq.new_zeros(xq.shape[0])


def test_bootstrap_ci_covers_the_true_mean():
    # exponential(1) samples: skewed, true mean 1; 95% intervals should cover ≈ 95% of 200 seeded replicates
    covered = 0
    for rep in range(200):
        g = make_generator(1000 + rep)
        x = -torch.log(torch.rand(200, generator=g))
        est, lo, hi = bootstrap_ci(x, n_boot=500, seed=rep)
        assert lo <= est <= hi
        covered += int(lo <= 1.0 <= hi)
    assert 0.88 <= covered / 200 <= 0.99, covered
    # width shrinks like 1/sqrt(N)
    g = make_generator(7)
    _, lo1, hi1 = bootstrap_ci(torch.randn(400, generator=g), n_boot=500)
    _, lo2, hi2 = bootstrap_ci(torch.randn(6400, generator=g), n_boot=500)
    assert 3.0 < (hi1 - lo1) / (hi2 - lo2) < 5.5


def test_bootstrap_is_seeded_and_columnwise():
    x = torch.randn(300, 4, generator=make_generator(0)) + torch.arange(4.0)
    a = bootstrap_ci(x, n_boot=200, seed=3)
    b = bootstrap_ci(x, n_boot=200, seed=3)
    c = bootstrap_ci(x, n_boot=200, seed=4)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[1], c[1])
    assert a[0].shape == (4,)
    torch.testing.assert_close(a[0], x.double().mean(0))
    # per column the percentile interval of a mean ≈ mean ± 1.96·SE
    se = x.double().std(0) / 300 ** 0.5
    assert torch.all(((a[2] - a[1]) / (2 * 1.96 * se) - 1).abs() < 0.2)
    assert torch.all(a[1] < a[0]) and torch.all(a[0] < a[2])


def test_error_curves_targets_and_normalization():
    d, K, sigma2 = 4, 6, 0.4
    task = LinearRegressionTask(d, K, noise_var=sigma2)
    clean = error_vs_k(_Zero(), task, target="clean", n_samples=8192, n_boot=200)
    noisy = error_vs_k(_Zero(), task, target="noisy", n_samples=8192, n_boot=200)
    # zero predictor: E(x·β)²/d = 1 against the clean target, (d + σ²)/d against the noisy one
    assert clean.target == "clean" and noisy.target == "noisy" and clean.normalized_by_d
    # per-sample (x·β)²/d has variance 3(d²+2d)/d² − 1 = 3.5, so SE ≈ 0.021 per k; allow 4 SE
    assert torch.all((clean.mean - 1.0).abs() < 0.085), clean.mean
    expected_noisy = (d + sigma2) / d
    assert torch.all((noisy.mean - expected_noisy).abs() < 0.09), noisy.mean
    assert torch.all(clean.ci_low < clean.mean) and torch.all(clean.ci_high > clean.mean)
    assert torch.all(noisy.mean > clean.mean)  # same sequences: the noise only adds error
    raw = error_vs_k(_Zero(), task, target="clean", n_samples=8192, n_boot=200, normalize=False)
    torch.testing.assert_close(raw.mean, clean.mean * d)
    with pytest.raises(ValueError, match="target"):
        error_vs_k(_Zero(), task, target="bayes")


def test_excess_error_over_bayes():
    d, K, sigma2 = 3, 8, 0.2
    task = LinearRegressionTask(d, K, noise_var=sigma2)
    bayes = BayesPosteriorMean(task.beta_cov, sigma2)
    assert torch.all(excess_error_over_bayes(bayes, task, n_samples=512, n_boot=50).mean == 0)
    ex = excess_error_over_bayes(_Zero(), task, n_samples=32768, n_boot=100)
    err_zero = error_vs_k(_Zero(), task, n_samples=32768, n_boot=100)
    err_bayes = error_vs_k(bayes, task, n_samples=32768, n_boot=100)
    # for squared loss, excess over the posterior mean = error difference (up to Monte Carlo noise)
    torch.testing.assert_close(ex.mean, err_zero.mean - err_bayes.mean, atol=0.025, rtol=0)
    assert ex.target == "bayes" and ex.mean[0] == 0 and torch.all(ex.mean[1:] > 0.1)
    dist = prediction_distance(OLS(), bayes, task, n_samples=256, n_boot=50)
    assert dist.target == "bayes" and dist.mean[1] > 0


def test_induction_score_on_constructed_patterns():
    B, L, H = 4, 8, 3
    g = make_generator(0)
    block = torch.stack([torch.randperm(50, generator=g)[:L] for _ in range(B)])  # no repeats within a block
    tokens = torch.cat([block, block], 1)
    T = 2 * L
    attn = torch.zeros(B, H, T, T)
    uniform = torch.ones(T, T).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    attn[:, 1] = uniform
    for t in range(T):
        attn[:, 2, t, max(t - 1, 0)] = 1.0  # previous-token head
        if t >= L:
            attn[:, 0, t, t - L + 1] = 1.0  # induction head: the token after the earlier copy of tokens[t]
        else:
            attn[:, 0, t, 0] = 1.0
    torch.testing.assert_close(attn.sum(-1), torch.ones(B, H, T))
    s = induction_score(attn, tokens)
    assert s[0] == pytest.approx(1.0)
    assert s[1] < 0.15  # uniform: ≈ mean over t of 1/(t+1)
    assert s[2] == pytest.approx(0.0)


def test_induction_scores_of_a_model_and_knockout():
    torch.manual_seed(0)
    model = SequenceTransformer(vocab_size=20, n_positions=16, n_layer=2, n_head=2, d_model=16)
    s = induction_scores(model, vocab_size=20, prefix_len=8, n_seqs=16)
    assert s.shape == (2, 2) and torch.all((s >= 0) & (s <= 1))
    eff = head_knockout_effect(model, InductionTask(20, 8), n_samples=32)
    assert eff.shape == (2, 2) and torch.all(torch.isfinite(eff))


def test_head_knockout_effect_is_zero_for_a_dead_head_and_not_for_live_ones():
    torch.manual_seed(1)
    model = RegressionTransformer(2, 6, n_layer=2, n_head=2, d_model=16)
    with torch.no_grad():  # make layer 0 head 1 contribute nothing: zero its columns of the output projection
        model.backbone.blocks[0].attn.proj.weight[:, 8:16] = 0
    eff = head_knockout_effect(model, LinearRegressionTask(2, 6, noise_var=0.1), n_samples=256)
    assert eff[0, 1] == 0
    assert (eff.abs() > 0).sum() == 3


class _ProbeModel(nn.Module):
    """Hidden state 0 is noise; hidden state 1 holds β (OLS on a noiseless, over-determined context)."""

    def forward(self, xs, ys, return_hidden=False):
        B, K, d = xs.shape
        bhat = (torch.linalg.pinv(xs) @ ys.unsqueeze(-1)).squeeze(-1)
        g = make_generator(B)  # train and test batches differ in size, so their noise differs
        noise = torch.randn(B, K, 6, generator=g)
        h1 = torch.cat([bhat, torch.randn(B, 3, generator=g)], -1)
        h1 = h1.unsqueeze(1).expand(B, K, h1.shape[-1])
        return TransformerOutput(ys, None, [noise, h1])


def test_linear_probe_recovers_linear_information_only():
    task = LinearRegressionTask(3, 6, noise_var=0.0)
    r2 = linear_probe_beta(_ProbeModel(), task, n_train=1024, n_test=512, lam=1e-4)
    assert r2.shape == (2,)
    assert r2[1] > 0.99
    assert r2[0] < 0.05


class _Oracle(nn.Module):
    def __init__(self, task):
        super().__init__()
        self.task = task
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, self.task.total_vocab)
        logits[:, 0] = nn.functional.one_hot(self.task.values[tokens[:, 0]], self.task.total_vocab).float()
        return logits


def test_recall_accuracy():
    task = FactualRecallTask(num_facts=32, num_values=4, seed=0)
    assert recall_accuracy(_Oracle(task), task) == 1.0
    torch.manual_seed(0)
    model = SequenceTransformer(task.total_vocab, 2, n_layer=1, n_head=1, d_model=8)
    assert recall_accuracy(model, task) < 0.6
