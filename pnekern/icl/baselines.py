"""Closed-form in-context regression baselines (SPEC §8).

Every estimator maps a context and a query to a prediction:
``predict(xs_context [B,k,d], ys_context [B,k], x_query [B,d]) -> [B]`` (same dtype as ``x_query``; the linear
algebra runs in float64 because ill-conditioned contexts at k ≈ d are exactly the interesting regime).
:func:`predict_prefixes` turns any of them into error-vs-k curves: column k predicts y_k from the first k examples,
and k = 0 uses the estimator's prior prediction (0, or the pool mean for dMMSE).

Data model: y = Xβ + ε, β ~ N(0, Σβ), ε ~ N(0, σ²), x ~ N(0, I_d) (the closed-form GD step size assumes the last).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Union

import torch
from torch import Tensor

__all__ = [
    "ICLEstimator",
    "OLS",
    "Ridge",
    "BayesPosteriorMean",
    "Averaging",
    "KNN",
    "OneStepGD",
    "DMMSE",
    "predict_prefixes",
    "one_step_gd_optimal_step",
    "one_step_gd_optimal_loss",
    "line_search_step_size",
    "baselines_for_task",
]


def _check_shapes(xs: Tensor, ys: Tensor, xq: Tensor) -> None:
    if xs.dim() != 3 or ys.dim() != 2 or xq.dim() != 2:
        raise ValueError(f"expected xs [B,k,d], ys [B,k], x_query [B,d]; got {tuple(xs.shape)}, "
                         f"{tuple(ys.shape)}, {tuple(xq.shape)}")
    B, k, d = xs.shape
    if tuple(ys.shape) != (B, k) or tuple(xq.shape) != (B, d):
        raise ValueError(f"inconsistent shapes xs {tuple(xs.shape)}, ys {tuple(ys.shape)}, x_query {tuple(xq.shape)}")


class ICLEstimator:
    """Base class. Subclasses implement :meth:`_predict` for k ≥ 1 in float64."""

    name = "estimator"

    def predict(self, xs_context: Tensor, ys_context: Tensor, x_query: Tensor) -> Tensor:
        """Prediction for y_query, [B], in the dtype of ``x_query``."""
        _check_shapes(xs_context, ys_context, x_query)
        if xs_context.shape[1] == 0:
            return self.prior_prediction(x_query)
        out = self._predict(xs_context.double(), ys_context.double(), x_query.double())
        return out.to(x_query.dtype)

    __call__ = predict

    def prior_prediction(self, x_query: Tensor) -> Tensor:
        """Prediction with an empty context: the prior mean of x_qᵀβ, 0 for a centred prior. [B]."""
        return x_query.new_zeros(x_query.shape[0])

    def _predict(self, xs: Tensor, ys: Tensor, xq: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class OLS(ICLEstimator):
    """Least squares; the minimum-norm solution β̂ = X⁺y when k < d (then it interpolates the context)."""

    name = "ols"

    def _predict(self, xs: Tensor, ys: Tensor, xq: Tensor) -> Tensor:
        beta = (torch.linalg.pinv(xs) @ ys.unsqueeze(-1)).squeeze(-1)  # [B, d]
        return (beta * xq).sum(-1)


class Ridge(ICLEstimator):
    """Ridge regression β̂ = (XᵀX + λI)⁻¹Xᵀy, λ > 0 (computed in the k×k dual form when k < d)."""

    name = "ridge"

    def __init__(self, lam: float) -> None:
        if not (lam > 0 and math.isfinite(lam)):
            raise ValueError(f"lam must be finite and > 0 (use OLS for lam = 0), got {lam}")
        self.lam = float(lam)

    def _predict(self, xs: Tensor, ys: Tensor, xq: Tensor) -> Tensor:
        B, k, d = xs.shape
        if k < d:
            K = xs @ xs.transpose(1, 2) + self.lam * torch.eye(k, dtype=xs.dtype, device=xs.device)
            alpha = torch.linalg.solve(K, ys.unsqueeze(-1))
            beta = (xs.transpose(1, 2) @ alpha).squeeze(-1)
        else:
            G = xs.transpose(1, 2) @ xs + self.lam * torch.eye(d, dtype=xs.dtype, device=xs.device)
            beta = torch.linalg.solve(G, xs.transpose(1, 2) @ ys.unsqueeze(-1)).squeeze(-1)
        return (beta * xq).sum(-1)


class BayesPosteriorMean(ICLEstimator):
    """Posterior mean under β ~ N(0, Σβ), ε ~ N(0, σ²): μ = Σβ Xᵀ(XΣβXᵀ + σ²I)⁻¹y; prediction x_qᵀμ.

    Equals ridge with λ = σ²/τ² when Σβ = τ²I. With σ² = 0 the inverse is a pseudo-inverse (the noiseless
    posterior mean: interpolation, min-Σβ⁻¹-norm).

    Args:
        beta_cov: Σβ as a [d, d] tensor, or a float τ² for τ²I.
        noise_var: σ² ≥ 0.
    """

    name = "bayes"

    def __init__(self, beta_cov: Union[Tensor, float], noise_var: float) -> None:
        if noise_var < 0:
            raise ValueError(f"noise_var must be >= 0, got {noise_var}")
        self.noise_var = float(noise_var)
        self.beta_cov = beta_cov if isinstance(beta_cov, Tensor) else float(beta_cov)

    def _predict(self, xs: Tensor, ys: Tensor, xq: Tensor) -> Tensor:
        B, k, d = xs.shape
        if isinstance(self.beta_cov, Tensor):
            S = self.beta_cov.to(device=xs.device, dtype=xs.dtype)
            if tuple(S.shape) != (d, d):
                raise ValueError(f"beta_cov has shape {tuple(S.shape)}, expected ({d}, {d})")
        else:
            S = self.beta_cov * torch.eye(d, dtype=xs.dtype, device=xs.device)
        XS = xs @ S  # [B, k, d]
        K = XS @ xs.transpose(1, 2) + self.noise_var * torch.eye(k, dtype=xs.dtype, device=xs.device)
        if self.noise_var > 0:
            alpha = torch.linalg.solve(K, ys.unsqueeze(-1))
        else:
            alpha = torch.linalg.pinv(K, hermitian=True) @ ys.unsqueeze(-1)
        mu = (XS.transpose(1, 2) @ alpha).squeeze(-1)  # Σβ Xᵀ α, [B, d]
        return (mu * xq).sum(-1)


class Averaging(ICLEstimator):
    """Garg et al.'s averaging estimator β̂ = (1/k) Σ y_i x_i (unbiased for x ~ N(0, I))."""

    name = "averaging"

    def _predict(self, xs: Tensor, ys: Tensor, xq: Tensor) -> Tensor:
        beta = (ys.unsqueeze(-1) * xs).mean(1)
        return (beta * xq).sum(-1)


class KNN(ICLEstimator):
    """Mean label of the ``n_neighbors`` context points nearest to x_q (all of them when k < n_neighbors)."""

    name = "knn"

    def __init__(self, n_neighbors: int = 3) -> None:
        if n_neighbors < 1:
            raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}")
        self.n_neighbors = int(n_neighbors)

    def _predict(self, xs: Tensor, ys: Tensor, xq: Tensor) -> Tensor:
        dist = (xs - xq.unsqueeze(1)).pow(2).sum(-1)  # [B, k]
        m = min(self.n_neighbors, xs.shape[1])
        idx = dist.topk(m, dim=1, largest=False).indices
        return ys.gather(1, idx).mean(1)


def one_step_gd_optimal_step(d: int, k: int, noise_var: float, beta_cov: Union[Tensor, float] = 1.0) -> float:
    """Step size η* minimising E(x_qᵀw₁ − y_q)² for one GD step from w = 0 on L(w) = (1/2k)Σ(wᵀx_i − y_i)².

    w₁ = (η/k) Σ y_i x_i. With x ~ N(0, I_d), β ~ N(0, Σβ), t = tr Σβ:
    E[(x_qᵀv) y_q] = t and E[(x_qᵀv)²] = E|v|² = ((k + 1 + d) t + σ² d)/k for v = (1/k)Σ y_i x_i (the i = j terms
    use the Gaussian fourth moment E[(xᵀβ)²|x|²] = (d + 2)|β|²), so η* = k t / ((k + 1 + d) t + σ² d).
    """
    t = float(torch.trace(beta_cov)) if isinstance(beta_cov, Tensor) else float(beta_cov) * d
    return k * t / ((k + 1 + d) * t + noise_var * d)


def one_step_gd_optimal_loss(d: int, k: int, noise_var: float, beta_cov: Union[Tensor, float] = 1.0) -> float:
    """Expected squared error on the noisy y_q of one-step GD with η*: (t + σ²) − t²·k/((k+1+d)t + σ²d)."""
    t = float(torch.trace(beta_cov)) if isinstance(beta_cov, Tensor) else float(beta_cov) * d
    return (t + noise_var) - t * t * k / ((k + 1 + d) * t + noise_var * d)


def line_search_step_size(task, k: int, n_samples: int, generator: torch.Generator) -> float:
    """η minimising the empirical one-step-GD loss on ``n_samples`` fresh sequences of ``task`` (exact: the loss
    is quadratic in η, so the line search is the least-squares ratio Σ a·y / Σ a²)."""
    batch = task.sample(n_samples, generator, k=k + 1)
    xs, ys = batch.xs.double(), batch.ys.double()
    v = (ys[:, :k].unsqueeze(-1) * xs[:, :k]).mean(1)
    a = (v * xs[:, k]).sum(-1)
    return float((a * ys[:, k]).sum() / (a * a).sum())


class OneStepGD(ICLEstimator):
    """One gradient step from w = 0 on L(w) = (1/2k) Σ (wᵀx_i − y_i)²: prediction x_qᵀ (η/k) Σ y_i x_i.

    Args:
        step_size: a fixed η, or None to use the k-dependent optimum :func:`one_step_gd_optimal_step`
            (then ``d_prior``-free: d is read from the inputs, ``noise_var`` and ``beta_cov`` are required).
    """

    name = "one_step_gd"

    def __init__(self, step_size: Optional[float] = None, noise_var: Optional[float] = None,
                 beta_cov: Union[Tensor, float] = 1.0) -> None:
        if step_size is None and noise_var is None:
            raise ValueError("noise_var is required when step_size is None (optimal step size)")
        self.step_size = step_size
        self.noise_var = noise_var
        self.beta_cov = beta_cov

    def step_for(self, d: int, k: int) -> float:
        if self.step_size is not None:
            return float(self.step_size)
        return one_step_gd_optimal_step(d, k, float(self.noise_var), self.beta_cov)

    def _predict(self, xs: Tensor, ys: Tensor, xq: Tensor) -> Tensor:
        B, k, d = xs.shape
        w1 = self.step_for(d, k) * (ys.unsqueeze(-1) * xs).mean(1)
        return (w1 * xq).sum(-1)


class DMMSE(ICLEstimator):
    """Discrete MMSE for a finite task pool (Raventós et al. 2023): posterior over the M pool vectors with a
    uniform prior and Gaussian likelihood, prediction Σ_m p(β_m | context) x_qᵀβ_m.

    Args:
        pool: [M, d] task vectors.
        noise_var: σ² > 0 of the likelihood.
    """

    name = "dmmse"

    def __init__(self, pool: Tensor, noise_var: float) -> None:
        if pool.dim() != 2:
            raise ValueError(f"pool must be [M, d], got {tuple(pool.shape)}")
        if not noise_var > 0:
            raise ValueError(f"noise_var must be > 0 for the dMMSE likelihood, got {noise_var}")
        self.pool = pool
        self.noise_var = float(noise_var)

    def posterior(self, xs_context: Tensor, ys_context: Tensor) -> Tensor:
        """Posterior probabilities over the pool, [B, M] (float64)."""
        pool = self.pool.to(device=xs_context.device, dtype=torch.float64)
        pred = xs_context.double() @ pool.T  # [B, k, M]
        sq = (pred - ys_context.double().unsqueeze(-1)).pow(2).sum(1)  # [B, M]
        # softmax of the log-likelihood: normalising in log space keeps tiny σ² from underflowing to 0/0
        return torch.softmax(-sq / (2 * self.noise_var), dim=-1)

    def _predict(self, xs: Tensor, ys: Tensor, xq: Tensor) -> Tensor:
        post = self.posterior(xs, ys)
        beta = post @ self.pool.to(device=xs.device, dtype=torch.float64)
        return (beta * xq).sum(-1)

    def prior_prediction(self, x_query: Tensor) -> Tensor:
        return (x_query * self.pool.to(device=x_query.device, dtype=x_query.dtype).mean(0)).sum(-1)


def predict_prefixes(estimator: ICLEstimator, xs: Tensor, ys: Tensor) -> Tensor:
    """Predictions for every prefix: out[:, k] predicts ys[:, k] from the first k examples (k = 0..K−1).

    Args:
        xs: [B, K, d]; ys: [B, K].
    Returns:
        [B, K] in the dtype of ``xs``.
    """
    K = xs.shape[1]
    cols = [estimator.predict(xs[:, :k], ys[:, :k], xs[:, k]) for k in range(K)]
    return torch.stack(cols, dim=1)


def baselines_for_task(task, n_neighbors: int = 3) -> Dict[str, ICLEstimator]:
    """The standard baseline set for a (linear) regression task: OLS, ridge (λ = σ²/τ² for isotropic priors),
    Bayes posterior mean, averaging, k-NN, one-step GD with the optimal step, and dMMSE for finite pools."""
    out: Dict[str, ICLEstimator] = {
        "ols": OLS(),
        "bayes": BayesPosteriorMean(task.beta_cov, task.noise_var),
        "averaging": Averaging(),
        "knn": KNN(n_neighbors),
        "one_step_gd": OneStepGD(None, task.noise_var, task.beta_cov),
    }
    cov = task.beta_cov
    tau2 = float(cov[0, 0])
    isotropic = bool(torch.allclose(cov, tau2 * torch.eye(cov.shape[0], device=cov.device)))
    if isotropic and task.noise_var > 0 and tau2 > 0:
        out["ridge"] = Ridge(task.noise_var / tau2)
    if getattr(task, "pool", None) is not None and task.noise_var > 0:
        out["dmmse"] = DMMSE(task.pool, task.noise_var)
    return out
