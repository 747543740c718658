"""Seeded ICL task generators."""
import pytest
import torch

from pnekern.icl import (IGNORE_INDEX, ClassificationTask, CopyTask, FactualRecallTask, InductionTask,
                         LinearRegressionTask, SparseRegressionTask, make_generator, make_task)


def test_linear_regression_shapes_and_targets():
    task = LinearRegressionTask(5, 7, noise_var=0.25)
    b = task.sample(4096, make_generator(0))
    assert b.xs.shape == (4096, 7, 5) and b.ys.shape == (4096, 7) and b.ys_clean.shape == (4096, 7)
    assert b.betas.shape == (4096, 5) and b.task_ids is None
    torch.testing.assert_close(b.ys_clean, torch.einsum("bkd,bd->bk", b.xs, b.betas))
    resid = b.ys - b.ys_clean
    assert abs(float(resid.var()) - 0.25) < 0.01  # σ² = 0.25, 28k samples: se ≈ 0.002
    short = task.sample(3, make_generator(0), k=2)
    assert short.xs.shape == (3, 2, 5)


def test_determinism_under_seed():
    task = LinearRegressionTask(3, 6, noise_var=0.1)
    a, b = task.sample(8, make_generator(11)), task.sample(8, make_generator(11))
    c = task.sample(8, make_generator(12))
    for f in ("xs", "ys", "ys_clean", "betas"):
        assert torch.equal(getattr(a, f), getattr(b, f))
        assert not torch.equal(getattr(a, f), getattr(c, f))
    for t in (InductionTask(50, 8), CopyTask(10, 5), FactualRecallTask(20, 5)):
        assert torch.equal(t.sample(4, make_generator(3)).tokens, t.sample(4, make_generator(3)).tokens)


def test_finite_pool_has_exactly_m_distinct_tasks():
    M = 7
    task = LinearRegressionTask(4, 5, noise_var=0.1, num_tasks=M, pool_seed=3)
    b = task.sample(2000, make_generator(1))
    distinct = torch.unique(b.betas, dim=0)
    assert distinct.shape[0] == M
    assert torch.unique(task.pool, dim=0).shape[0] == M
    torch.testing.assert_close(b.betas, task.pool[b.task_ids])
    # the pool depends on pool_seed only, not on the batch generator
    assert torch.equal(LinearRegressionTask(4, 5, num_tasks=M, pool_seed=3).pool, task.pool)
    assert not torch.equal(LinearRegressionTask(4, 5, num_tasks=M, pool_seed=4).pool, task.pool)


def test_beta_covariance_is_respected():
    cov = torch.tensor([[2.0, 0.6, 0.0], [0.6, 1.0, 0.0], [0.0, 0.0, 0.0]])  # singular on purpose
    task = LinearRegressionTask(3, 2, beta_cov=cov)
    betas = task.sample(40000, make_generator(2)).betas
    emp = betas.T @ betas / betas.shape[0]
    torch.testing.assert_close(emp, cov, atol=0.05, rtol=0.0)


def test_sparse_and_classification():
    sp = SparseRegressionTask(8, 4, sparsity=3)
    b = sp.sample(100, make_generator(0))
    assert torch.all((b.betas != 0).sum(1) == 3)
    cl = ClassificationTask(4, 6)
    c = cl.sample(100, make_generator(0))
    assert set(c.ys.unique().tolist()) <= {-1.0, 1.0} and c.kind == "classification"
    assert torch.equal(c.ys, torch.where(torch.einsum("bkd,bd->bk", c.xs, c.betas) >= 0, 1.0, -1.0))
    noisy = ClassificationTask(4, 6, label_flip_prob=0.2).sample(5000, make_generator(1))
    assert abs(float((noisy.ys != noisy.ys_clean).float().mean()) - 0.2) < 0.02


def test_token_tasks():
    ind = InductionTask(vocab_size=30, prefix_len=6)
    b = ind.sample(5, make_generator(0))
    assert b.tokens.shape == (5, 12) == b.targets.shape
    assert torch.equal(b.tokens[:, :6], b.tokens[:, 6:])
    scored = b.targets != IGNORE_INDEX
    assert scored.sum(1).tolist() == [6] * 5
    assert torch.equal(b.targets[:, 5:11], b.tokens[:, 6:12])

    for rev in (False, True):
        cp = CopyTask(vocab_size=9, length=4, reverse=rev)
        s = cp.sample(3, make_generator(1))
        src = s.tokens[:, :4]
        assert torch.all(s.tokens[:, 4] == cp.sep_token)
        assert torch.equal(s.tokens[:, 5:], src.flip(1) if rev else src)
        assert torch.equal(s.targets[:, 4:8], s.tokens[:, 5:9])
        assert torch.all(s.targets[:, :4] == IGNORE_INDEX) and torch.all(s.targets[:, 8] == IGNORE_INDEX)
    assert make_task("reverse", vocab_size=5, length=3).reverse

    fr = FactualRecallTask(num_facts=16, num_values=4, seed=5)
    a, b2 = fr.sample(64, make_generator(0)), fr.sample(64, make_generator(9))
    for batch in (a, b2):  # the same key always maps to the same value
        assert torch.equal(batch.targets[:, 0], fr.values[batch.tokens[:, 0]])
    assert fr.all_facts().tokens.shape == (16, 2)


@pytest.mark.parametrize("name,cfg,field", [
    ("linear_regression", dict(d=0, k_max=4), "d"),
    ("linear_regression", dict(d=3, k_max=0), "k_max"),
    ("linear_regression", dict(d=3, k_max=4, noise_var=-1.0), "noise_var"),
    ("linear_regression", dict(d=3, k_max=4, num_tasks=0), "num_tasks"),
    ("linear_regression", dict(d=3, k_max=4, beta_cov=torch.eye(2)), "beta_cov"),
    ("linear_regression", dict(d=2, k_max=4, beta_cov=torch.tensor([[1.0, 0], [0, -1.0]])), "beta_cov"),
    ("linear_regression", dict(d=3, k_max=4, bogus=1), "bogus"),
    ("sparse_regression", dict(d=3, k_max=4, sparsity=5), "sparsity"),
    ("classification", dict(d=3, k_max=4, label_flip_prob=0.7), "label_flip_prob"),
    ("induction", dict(vocab_size=1, prefix_len=4), "vocab_size"),
    ("copy", dict(vocab_size=5, length=0), "length"),
    ("factual_recall", dict(num_facts=0, num_values=3), "num_facts"),
    ("no_such_task", dict(), "name"),
])
def test_config_errors_name_the_field(name, cfg, field):
    with pytest.raises(ValueError, match=field):
        make_task(name, **cfg)


def test_k_larger_than_context_raises():
    task = LinearRegressionTask(3, 5)
    with pytest.raises(ValueError, match="k_max"):
        task.sample(2, make_generator(0), k=6)
    with pytest.raises(ValueError, match="batch_size"):
        task.sample(0, make_generator(0))
