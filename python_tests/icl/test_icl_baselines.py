"""Closed-form ICL regression baselines (SPEC §8)."""
import pytest
import torch

from pnekern.icl import (DMMSE, KNN, OLS, Averaging, BayesPosteriorMean, LinearRegressionTask, OneStepGD, Ridge,
                         baselines_for_task, line_search_step_size, make_generator, one_step_gd_optimal_loss,
                         one_step_gd_optimal_step, predict_prefixes)


def _batch(d, k, noise_var, n, seed, tau2=1.0):
    task = LinearRegressionTask(d, k, noise_var=noise_var, beta_cov=tau2 * torch.eye(d))
    return task, task.sample(n, make_generator(seed))


@pytest.mark.parametrize("k", [2, 5, 9])  # k < d (dual form), k = d, k > d (primal form)
def test_ridge_equals_bayes_for_isotropic_prior(k):
    d, sigma2, tau2 = 5, 0.3, 2.0
    _, b = _batch(d, k + 1, sigma2, 64, seed=1, tau2=tau2)
    xs, ys, xq = b.xs[:, :k].double(), b.ys[:, :k].double(), b.xs[:, k].double()
    bayes = BayesPosteriorMean(tau2 * torch.eye(d, dtype=torch.float64), sigma2).predict(xs, ys, xq)
    ridge = Ridge(sigma2 / tau2).predict(xs, ys, xq)
    torch.testing.assert_close(bayes, ridge, rtol=1e-10, atol=1e-10)
    # a different λ must give a different answer, or the comparison above proves nothing
    assert (Ridge(10 * sigma2 / tau2).predict(xs, ys, xq) - bayes).abs().max() > 1e-3


def test_bayes_has_lowest_error_monte_carlo():
    d, K, sigma2 = 4, 12, 0.5
    task, b = _batch(d, K, sigma2, 20000, seed=2)
    ests = {
        "bayes": BayesPosteriorMean(1.0, sigma2),
        "ols": OLS(),
        "ridge_wrong_lambda": Ridge(4 * sigma2),
        "averaging": Averaging(),
        "knn": KNN(3),
        "one_step_gd": OneStepGD(None, sigma2),
    }
    # squared error on the noisy target, per sequence and k (paired across estimators)
    errs = {n: (predict_prefixes(e, b.xs, b.ys).double() - b.ys.double()).pow(2) for n, e in ests.items()}
    for name, e in errs.items():
        if name == "bayes":
            continue
        # OLS error has infinite variance for k <= d + 1 (inverse-Wishart moments), so compare it where the
        # mean exists and a CLT-based margin is meaningful; the others over k = 1..K-1
        ks = slice(d + 4, K) if name == "ols" else slice(1, K)
        diff = (e[:, ks] - errs["bayes"][:, ks]).sum(1)
        se = diff.std() / diff.numel() ** 0.5
        assert diff.mean() > 3 * se, f"{name}: mean diff {diff.mean():.4f} (se {se:.4f}) not above Bayes"


@pytest.mark.parametrize("k", [1, 3, 6])
def test_ols_interpolates_when_k_le_d(k):
    d = 6
    _, b = _batch(d, k, 0.5, 32, seed=3)
    ols = OLS()
    for i in range(k):
        pred = ols.predict(b.xs, b.ys, b.xs[:, i])
        torch.testing.assert_close(pred, b.ys[:, i], rtol=1e-4, atol=1e-4)


def test_bayes_noiseless_interpolates_and_ridge_does_not():
    d, k = 6, 4
    _, b = _batch(d, k, 0.0, 16, seed=4)
    bayes = BayesPosteriorMean(1.0, 0.0)
    torch.testing.assert_close(bayes.predict(b.xs, b.ys, b.xs[:, 0]), b.ys[:, 0], rtol=1e-4, atol=1e-4)
    assert (Ridge(1.0).predict(b.xs, b.ys, b.xs[:, 0]) - b.ys[:, 0]).abs().max() > 1e-2


def test_dmmse_finds_the_right_task_in_a_small_pool():
    d, M, k = 4, 5, 6
    task = LinearRegressionTask(d, k + 1, noise_var=1e-4, num_tasks=M, pool_seed=7)
    b = task.sample(200, make_generator(5))
    dmmse = DMMSE(task.pool, 1e-4)
    post = dmmse.posterior(b.xs[:, :k], b.ys[:, :k])
    assert post.shape == (200, M)
    assert (post.argmax(-1) == b.task_ids).all()
    assert post.gather(1, b.task_ids[:, None]).min() > 0.99
    pred = dmmse.predict(b.xs[:, :k], b.ys[:, :k], b.xs[:, k])
    torch.testing.assert_close(pred, b.ys_clean[:, k], rtol=1e-3, atol=1e-3)
    # with no context the prediction is the pool mean
    torch.testing.assert_close(dmmse.predict(b.xs[:, :0], b.ys[:, :0], b.xs[:, 0]),
                               b.xs[:, 0] @ task.pool.mean(0))


def test_one_step_gd_equals_an_explicit_gradient_step():
    d, k, eta = 3, 7, 0.37
    _, b = _batch(d, k + 1, 0.1, 16, seed=6)
    xs, ys, xq = b.xs[:, :k].double(), b.ys[:, :k].double(), b.xs[:, k].double()
    w = torch.zeros(16, d, dtype=torch.float64, requires_grad=True)
    loss = ((torch.einsum("bkd,bd->bk", xs, w) - ys).pow(2).sum(1) / (2 * k)).sum()
    (grad,) = torch.autograd.grad(loss, w)
    expected = ((w - eta * grad) * xq).sum(-1)
    torch.testing.assert_close(OneStepGD(eta).predict(xs, ys, xq), expected, rtol=1e-12, atol=1e-12)


def test_one_step_gd_optimal_step_closed_form_matches_line_search_and_loss():
    d, k, sigma2 = 3, 8, 0.2
    task = LinearRegressionTask(d, k + 1, noise_var=sigma2)
    eta_closed = one_step_gd_optimal_step(d, k, sigma2)
    eta_ls = line_search_step_size(task, k, 200_000, make_generator(8))
    assert abs(eta_ls / eta_closed - 1) < 0.02
    b = task.sample(200_000, make_generator(9))
    pred = OneStepGD(None, sigma2).predict(b.xs[:, :k], b.ys[:, :k], b.xs[:, k]).double()
    err = (pred - b.ys[:, k].double()).pow(2)
    se = err.std() / err.numel() ** 0.5
    assert abs(err.mean() - one_step_gd_optimal_loss(d, k, sigma2)) < 4 * se
    # the optimum really is optimal: 20% off in either direction costs more
    for scale in (0.8, 1.2):
        worse = (scale * pred - b.ys[:, k].double()).pow(2).mean()
        assert worse > err.mean()


def test_predict_prefixes_columns_and_k0():
    d, K = 3, 6
    task, b = _batch(d, K, 0.1, 8, seed=10)
    for name, est in baselines_for_task(task).items():
        out = predict_prefixes(est, b.xs, b.ys)
        assert out.shape == (8, K), name
        assert torch.all(out[:, 0] == 0), name  # centred prior: predict 0 without context
        torch.testing.assert_close(out[:, 4], est.predict(b.xs[:, :4], b.ys[:, :4], b.xs[:, 4]))


def test_baselines_for_task_contents():
    task = LinearRegressionTask(3, 6, noise_var=0.1, num_tasks=4)
    names = set(baselines_for_task(task))
    assert {"ols", "ridge", "bayes", "averaging", "knn", "one_step_gd", "dmmse"} <= names
    assert "dmmse" not in baselines_for_task(LinearRegressionTask(3, 6, noise_var=0.1))


def test_knn_uses_nearest_points():
    xs = torch.tensor([[[0.0], [1.0], [5.0], [6.0]]])
    ys = torch.tensor([[1.0, 2.0, 10.0, 20.0]])
    assert float(KNN(2).predict(xs, ys, torch.tensor([[5.4]]))) == pytest.approx(15.0)
    assert float(KNN(1).predict(xs, ys, torch.tensor([[0.2]]))) == pytest.approx(1.0)


def test_baseline_config_errors():
    with pytest.raises(ValueError, match="lam"):
        Ridge(0.0)
    with pytest.raises(ValueError, match="noise_var"):
        DMMSE(torch.zeros(3, 2), 0.0)
    with pytest.raises(ValueError, match="noise_var"):
        OneStepGD(None, None)
    with pytest.raises(ValueError, match="shapes"):
        OLS().predict(torch.zeros(2, 3, 4), torch.zeros(2, 3), torch.zeros(2, 5))
