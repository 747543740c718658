"""Training loop, and the two small-scale reproductions (von Oswald et al. LSA; a tiny GPT beating averaging)."""
import math
import os

import pytest
import torch

from pnekern.icl import (Averaging, LinearRegressionTask, LinearSelfAttention, RegressionTransformer,
                         SequenceTransformer, InductionTask, compute_loss, error_vs_k, make_generator,
                         one_step_gd_optimal_loss, OneStepGD, train, warmup_cosine_factor)


def test_lsa_reaches_the_optimal_one_step_gd_loss():
    """von Oswald et al. 2023: one linear self-attention layer trained on in-context regression converges to the
    loss of one GD step with the optimal step size (by symmetry it cannot do better; see baselines docs)."""
    d, k, sigma2 = 2, 10, 0.0
    task = LinearRegressionTask(d, k + 1, noise_var=sigma2)  # k context examples + 1 query
    model = LinearSelfAttention(d, init_std=0.2, generator=make_generator(0))
    res = train(model, task, steps=600, batch_size=2048, lr=0.03, seed=1, log_every=100, progress=False,
                warmup_steps=20, min_lr_ratio=0.0)
    optimum = one_step_gd_optimal_loss(d, k, sigma2)
    # held-out Monte Carlo loss with many samples (se ≈ 0.3%); GD with η* on the same data as a paired reference
    b = task.sample(200_000, make_generator(123))
    with torch.no_grad():
        pred = model(b.xs[:, :k], b.ys[:, :k], b.xs[:, k])
    lsa_loss = float((pred - b.ys[:, k]).pow(2).mean())
    gd_loss = float((OneStepGD(None, sigma2).predict(b.xs[:, :k], b.ys[:, :k], b.xs[:, k]) - b.ys[:, k]).pow(2).mean())
    assert abs(gd_loss / optimum - 1) < 0.01  # the Monte Carlo itself is accurate
    assert abs(lsa_loss / gd_loss - 1) < 0.02, (lsa_loss, gd_loss, optimum, res.history[-1])
    # and training actually did something: the initial loss is far from the optimum
    untrained = LinearSelfAttention(d, init_std=0.2, generator=make_generator(0))
    with torch.no_grad():
        init_loss = float((untrained(b.xs[:, :k], b.ys[:, :k], b.xs[:, k]) - b.ys[:, k]).pow(2).mean())
    assert init_loss > 1.2 * gd_loss


def test_tiny_gpt_beats_averaging_and_improves_with_k():
    d, K, sigma2 = 2, 8, 0.1
    task = LinearRegressionTask(d, K, noise_var=sigma2)
    torch.manual_seed(0)
    model = RegressionTransformer(d, K, n_layer=2, n_head=2, d_model=32)
    res = train(model, task, steps=700, batch_size=64, lr=3e-3, seed=0, log_every=100, progress=False)
    assert res.updates == 700
    curve = error_vs_k(model, task, target="clean", n_samples=4096, seed=5, n_boot=200)
    avg = error_vs_k(Averaging(), task, target="clean", n_samples=4096, seed=5, n_boot=200)
    # mean over k ≥ 1 below the averaging estimator's (same sequences)
    assert curve.mean[1:].mean() < avg.mean[1:].mean(), (curve.mean, avg.mean)
    # error decreases with k: the CIs of k = 1 and k = K-1 are disjoint (an untrained model is flat in k,
    # since without in-context learning every k is as hard as k = 0)
    assert curve.ci_high[-1] < curve.ci_low[1], (curve.mean, curve.ci_low, curve.ci_high)
    assert curve.mean[-1] < curve.mean[K // 2] < curve.mean[1]


class _RecordingSGD(torch.optim.SGD):
    """SGD that records the gradient it sees and exposes last_stats() like pnekern.AdamW."""

    class _Stats:
        def __init__(self, step):
            self.step = step

        def to_dict(self):
            return {"step": self.step, "temperature": 0.125}

    def __init__(self, params, lr=0.0):
        super().__init__(params, lr=lr)
        self.grads = []
        self.n = 0

    def step(self, closure=None):
        self.grads.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
        self.n += 1
        return super().step(closure)

    def last_stats(self):
        return self._Stats(self.n)


def test_micro_batching_gives_the_full_batch_gradient_and_stats_flow(capsys):
    d, K = 3, 6
    task = LinearRegressionTask(d, K, noise_var=0.1)
    torch.manual_seed(0)
    model = RegressionTransformer(d, K, n_layer=1, n_head=2, d_model=16)
    opts = []

    def make_opt(params):
        opts.append(_RecordingSGD(params, lr=0.0))  # lr 0: parameters stay put, so steps are comparable
        return opts[-1]

    res = train(model, task, steps=3, batch_size=12, micro_batches=3, make_optimizer=make_opt, lr=0.0, seed=4,
                log_every=1, progress=True, lr_schedule="constant")
    # the same first batch through one backward
    batch = task.sample(12, make_generator(4))
    model.zero_grad()
    compute_loss(model, batch).backward()
    full = [p.grad for p in model.parameters()]
    for g_micro, g_full in zip(opts[0].grads[0], full):
        torch.testing.assert_close(g_micro, g_full, rtol=1e-5, atol=1e-7)
    assert [h["stats"]["step"] for h in res.history] == [1, 2, 3]
    assert all({"step", "loss", "val_loss", "tokens", "updates", "lr"} <= set(h) for h in res.history)
    assert res.tokens_seen == 3 * 12 * 2 * K and res.updates == 3
    out = capsys.readouterr().out
    assert "T 0.125" in out and "step 3/3" in out


def test_stopping_rules_and_checkpoint(tmp_path):
    task = LinearRegressionTask(2, 4, noise_var=0.1)
    torch.manual_seed(0)
    model = RegressionTransformer(2, 4, n_layer=1, n_head=1, d_model=16)
    res = train(model, task, steps=50, batch_size=8, seed=0, log_every=5, progress=False, target_loss=1e6,
                checkpoint_dir=tmp_path)
    assert res.stop_reason == "target_loss" and res.updates == 5
    ck = torch.load(os.path.join(tmp_path, "checkpoint.pt"), weights_only=False)
    assert ck["step"] == 5 and set(ck["model"]) == set(model.state_dict())
    res = train(model, task, steps=50, batch_size=8, seed=0, log_every=100, progress=False,
                max_tokens=3 * 8 * 2 * 4)
    assert res.stop_reason == "max_tokens" and res.updates == 3 and res.history[-1]["updates"] == 3
    res = train(model, task, steps=50, batch_size=8, seed=0, progress=False, on_step=lambda s, i, m, o: s == 7)
    assert res.stop_reason == "callback" and res.updates == 7


def test_train_config_errors():
    task = LinearRegressionTask(2, 4)
    model = RegressionTransformer(2, 4, n_layer=1, n_head=1, d_model=8)
    with pytest.raises(ValueError, match="micro_batches"):
        train(model, task, steps=1, batch_size=10, micro_batches=3, progress=False)
    with pytest.raises(ValueError, match="steps"):
        train(model, task, steps=0, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="k_max"):
        train(RegressionTransformer(2, 3, n_layer=1, n_head=1, d_model=8), task, steps=1, batch_size=8,
              progress=False)
    with pytest.raises(ValueError, match="n_positions"):
        train(SequenceTransformer(10, 6, n_layer=1, n_head=1, d_model=8), InductionTask(10, 4), steps=1,
              batch_size=8, progress=False)


def test_warmup_cosine_schedule():
    f = [warmup_cosine_factor(s, 100, 10, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert warmup_cosine_factor(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_sequence_training_learns_copy():
    from pnekern.icl import CopyTask
    task = CopyTask(vocab_size=6, length=4)
    torch.manual_seed(0)
    model = SequenceTransformer(task.total_vocab, task.sequence_length, n_layer=2, n_head=2, d_model=32)
    from pnekern.icl.train import evaluate_loss
    before = evaluate_loss(model, task.sample(512, make_generator(1)))
    res = train(model, task, steps=150, batch_size=64, lr=3e-3, seed=0, log_every=50, progress=False)
    # chance is log(6) ≈ 1.79 nats; copying from context must get well below it
    assert before > 1.5 and res.final_val_loss < 0.3, (before, res.history)


@pytest.mark.parametrize("stats", [None, "trace"])
def test_train_with_pnekern_adamw(stats):
    """pnekern.AdamW with statistics off must train (its last_stats() raises then); with stats on, every logged
    step carries the exposure record of that step."""
    import pnekern

    task = LinearRegressionTask(2, 4, noise_var=0.1)
    torch.manual_seed(0)
    model = RegressionTransformer(2, 4, n_layer=1, n_head=1, d_model=8)
    kw = dict(stats=stats, batch_size=8) if stats else {}
    res = train(model, task, steps=4, batch_size=8, micro_batches=2, seed=0, log_every=2, progress=False,
                make_optimizer=lambda p: pnekern.AdamW(p, lr=1e-3, **kw))
    assert res.updates == 4 and len(res.history) == 2
    if stats is None:
        assert all("stats" not in h for h in res.history)
    else:
        assert [h["stats"]["step"] for h in res.history] == [2, 4]
        assert all(h["stats"]["num_contributions"] == 2 and h["stats"]["temperature"] > 0 for h in res.history)
