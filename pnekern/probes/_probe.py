"""CurvatureProbe: the periodic Curv_t = Tr(A Ĥ A) measurement the optimizer drives (SPEC §3–4).

``opt.attach_probe(probe)`` makes :class:`pnekern.AdamW` call ``probe.measure(opt.preconditioner(probe.params))``
after every step where ``probe.due(step)``; the result's ``value`` becomes the ``curvature`` of the exposure log and
``pne_star`` = temperature / curvature. The probe can also be used standalone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ._estimators import _check_count, _mean_stderr, hutchpp_core, quadratic_samples, weighted_operator, xtrace_core
from ._output_space import output_space_samples
from ._operators import CurvatureOperator, ForwardFn, fd_hvp, flatten_tensors, ggn_vp, hvp, infer_loss_kind, select_params
from ._sharpness import sampled_label_samples

__all__ = ["CurvatureProbe", "ProbeResult"]

_KINDS = ("ggn", "hessian", "fd_hessian", "sampled_label")
_ESTIMATORS = ("output", "hutchinson", "hutchpp", "xtrace")


@dataclass
class ProbeResult:
    """One curvature measurement Curv = Tr(A Ĥ A) (units: a² × loss/θ², e.g. nats·(θ/…)²/θ² for Adam's A).

    Attributes:
        value: 0-dim float64 tensor on the parameters' device: the estimate (never synchronised with the host).
        stderr: 0-dim float64 tensor: its standard error (output-space / Hutchinson / sampled-label: sample std/√k;
            Hutch++: of the residual term; XTrace: the paper's error estimate).
        nonpositive: 0-dim bool tensor, ``value <= 0``. For a Hessian (kind "hessian"/"fd_hessian") this flags a
            measurement that makes P-NE* = NE/Curv meaningless (SPEC §3); a GGN estimate is ≥ 0 by construction.
        kind, estimator: what was estimated and how.
        num_matvecs: operator products (GGN: one jvp + one vjp each), or backwards (vjps) for the output-space and
            sampled-label estimators.
        index: 0-based count of this probe's measurements; ``batch_index``: which held-out batch was used.
        mode: "eval" or "train": the module mode the model was evaluated in (restored afterwards).
        seed: seed of the probe generator (and of the global RNG replayed for the model's own randomness).
        per_param: per-parameter ``{"value", "stderr"}`` 0-dim tensors (output-space / Hutchinson / sampled-label),
            else None.
    """

    value: Tensor
    stderr: Tensor
    nonpositive: Tensor
    kind: str
    estimator: str
    num_matvecs: int
    index: int
    batch_index: int
    mode: str
    seed: int
    per_param: list[dict[str, Tensor]] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def flagged(self) -> Tensor:
        """0-dim bool tensor: the Hessian estimate is ≤ 0 (always False for the PSD kinds)."""
        if self.kind in ("hessian", "fd_hessian"):
            return self.nonpositive
        return torch.zeros_like(self.nonpositive)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (one device→host transfer)."""
        vals = torch.stack([self.value, self.stderr, self.flagged.to(torch.float64)]).cpu().tolist()
        return {
            "curvature": vals[0], "stderr": vals[1], "nonpositive": bool(vals[2]), "kind": self.kind,
            "estimator": self.estimator, "num_matvecs": self.num_matvecs, "index": self.index,
            "batch_index": self.batch_index, "mode": self.mode, "seed": self.seed,
        }


def _is_batch_list(batches: Any) -> bool:
    """A list/tuple whose every item is itself an ``(inputs, targets)`` pair → several held-out batches."""
    if not isinstance(batches, (list, tuple)) or len(batches) == 0:
        return False
    return all(isinstance(b, (list, tuple)) and len(b) == 2 for b in batches)


class CurvatureProbe:
    """Periodic estimate of Curv_t = Tr(A Ĥ A) on held-out data with the optimizer's current preconditioner A.

    Args:
        model: the module (its parameters are never written; grads, hooks, modes, buffers and RNG are preserved).
        loss_fn: criterion, ``loss = loss_fn(model(inputs), targets)`` (a tuple ``inputs`` is unpacked).
        batches: one held-out batch ``(inputs, targets)`` or a list of such batches, used round-robin (one per
            measurement). A list/tuple whose items are all pairs is read as a list of batches (so a single batch
            with tuple inputs *and* tuple targets must be wrapped: ``[batch]``).
        every: measure when ``step % every == 0`` (``due``); steps count from 1.
        kind: Ĥ: "ggn" (Jᵀ Λ J, PSD, default), "hessian" (double backward), "fd_hessian" (finite differences of
            gradients: models without double backward) or "sampled_label" (GGN from labels drawn from the model,
            one backward per sample, no product needed).
        estimator: None picks "output" for kind "ggn" and "hutchinson" for the Hessian kinds. "output" (GGN only):
            output-space Hutchinson, ‖A Jᵀ L ξ‖² with Λ = L Lᵀ and Rademacher ξ over the model outputs: one backward
            (vjp) per probe and one shared forward, no jvp (see :func:`pnekern.probes.output_space_ggn_trace`).
            "hutchinson": parameter-space, one operator product at v = A z per probe (GGN: jvp + vjp). "hutchpp" or
            "xtrace" (need num_probes ≥ 3 / 4 and are for PSD kinds). Ignored by "sampled_label".
        num_probes: products (or label samples) per measurement.
        params: the parameters probed (default: all with requires_grad); ``probe.params`` is what the optimizer
            builds A for.
        seed: base seed; measurement i uses ``seed + i`` for its probe vectors and the model's own randomness.
        eval_mode: evaluate with ``model.eval()`` (default; no dropout, BatchNorm running statistics used). With
            False the model's current modes are kept and buffers (e.g. BN running stats) are restored afterwards.
        loss: "mse" / "ce" for the GGN/sampled-label kinds (None: inferred from the criterion's type).
        forward: ``forward(model, inputs) -> output`` replacing the call to the model.
        fd_step: finite-difference step multiplier for kind "fd_hessian" (None: automatic).
        rows_per_probe: estimator "output" only. None (default): every probe uses the whole batch. An int m: each
            probe draws its own m of the batch's N examples (leading dimension of targets and input tensors) and is
            scaled by N/m: still unbiased for the whole batch, probes still i.i.d. (calibrated stderr), cost per
            probe ∝ m; all probes' sub-batches run as one vmapped forward + backward. "auto": m = ⌈N/num_probes⌉, so
            a measurement costs about one forward + backward over the N rows whatever num_probes (the cheap setting
            the ICL runs and the benchmark use). Needs examples that do not interact (no train-mode BatchNorm).
        vectorize, probe_chunk: estimator "output": batch probes with vmap (None: automatic, see
            :func:`pnekern.probes.output_space_ggn_trace`) and at most ``probe_chunk`` probes per batched call
            (None: all, unless chunk × num_params > 2^25).
        nonpositive: "keep" reports a Hessian estimate ≤ 0 as is (flagged in the result); "nan" replaces it by NaN
            so downstream ratios (P-NE*) are visibly undefined.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        batches: Any,
        *,
        every: int = 100,
        kind: str = "ggn",
        estimator: str | None = None,
        num_probes: int = 16,
        params: Sequence[Tensor] | None = None,
        seed: int = 0,
        eval_mode: bool = True,
        loss: str | None = None,
        forward: ForwardFn | None = None,
        fd_step: float | None = None,
        nonpositive: str = "keep",
        rows_per_probe: int | str | None = None,
        vectorize: bool | None = None,
        probe_chunk: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        if estimator is None:
            estimator = "output" if kind == "ggn" else "hutchinson"
        if estimator not in _ESTIMATORS:
            raise ValueError(f"estimator must be one of {_ESTIMATORS}, got {estimator!r}")
        _check_count("every", every, 1)
        _check_count("num_probes", num_probes, {"hutchpp": 3, "xtrace": 4}.get(estimator, 1) if kind != "sampled_label" else 1)
        if estimator == "output" and kind not in ("ggn", "sampled_label"):
            raise ValueError(f"estimator='output' estimates the GGN (kind='ggn'), not kind={kind!r}")
        if rows_per_probe is not None and rows_per_probe != "auto":
            _check_count("rows_per_probe", rows_per_probe, 1)
        if (rows_per_probe is not None or vectorize is not None or probe_chunk is not None) and estimator != "output":
            raise ValueError("rows_per_probe / vectorize / probe_chunk apply to estimator='output' only")
        if vectorize is not None and not isinstance(vectorize, bool):
            raise ValueError(f"vectorize must be a bool or None, got {vectorize!r}")
        if probe_chunk is not None:
            _check_count("probe_chunk", probe_chunk, 1)
        if kind in ("hessian", "fd_hessian") and estimator != "hutchinson":
            raise ValueError(
                f"estimator={estimator!r} assumes a PSD operator; with kind={kind!r} (indefinite) use 'hutchinson'"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if not isinstance(eval_mode, bool):
            raise ValueError(f"eval_mode must be a bool, got {eval_mode!r}")
        if nonpositive not in ("keep", "nan"):
            raise ValueError(f"nonpositive must be 'keep' or 'nan', got {nonpositive!r}")
        if forward is not None and not callable(forward):
            raise ValueError("forward must be a callable forward(model, inputs)")
        self.batches = list(batches) if _is_batch_list(batches) else [batches]
        for i, b in enumerate(self.batches):
            if not isinstance(b, (list, tuple)) or len(b) != 2:
                raise ValueError(f"batches[{i}] must be a pair (inputs, targets)")
        self.model = model
        self.loss_fn = loss_fn
        self.every = every
        self.kind = kind
        self.estimator = estimator
        self.num_probes = num_probes
        self.params: list[Tensor] = select_params(model, params)
        self.seed = seed
        self.eval_mode = eval_mode
        self.loss = infer_loss_kind(loss_fn, loss) if kind in ("ggn", "sampled_label") else loss
        self.forward = forward
        self.fd_step = fd_step
        self.nonpositive = nonpositive
        self.rows_per_probe = rows_per_probe
        self.vectorize = vectorize
        self.probe_chunk = probe_chunk
        self.num_measurements = 0
        self.last: ProbeResult | None = None
        devices = {p.device for p in self.params}
        if len(devices) != 1:
            raise ValueError(f"params must live on one device, got {devices}")
        self.device = next(iter(devices))

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) is a measurement step: ``step % every == 0``."""
        return step > 0 and step % self.every == 0

    def _flat_precond(self, precond: Sequence[Tensor] | Tensor | None) -> Tensor | None:
        if precond is None:
            return None
        dtype = self.params[0].dtype
        if isinstance(precond, Tensor):
            flat = precond.reshape(-1)
            if flat.numel() != sum(p.numel() for p in self.params):
                raise ValueError(f"precond has {flat.numel()} elements, the probed parameters have "
                                 f"{sum(p.numel() for p in self.params)}")
            return flat.to(dtype=dtype, device=self.device)
        precond = list(precond)
        if len(precond) != len(self.params):
            raise ValueError(f"precond has {len(precond)} tensors, probe.params has {len(self.params)}")
        for i, (a, p) in enumerate(zip(precond, self.params)):
            if a.shape != p.shape:
                raise ValueError(f"precond[{i}] has shape {tuple(a.shape)}, its parameter {tuple(p.shape)}")
        return flatten_tensors([a.to(dtype=dtype, device=self.device) for a in precond])

    def _operator(self, batch: Any) -> CurvatureOperator:
        if self.kind == "ggn":
            return ggn_vp(self.model, self.loss_fn, batch, loss=self.loss, params=self.params, forward=self.forward)
        if self.kind == "hessian":
            return hvp(self.model, self.loss_fn, batch, params=self.params, forward=self.forward)
        return fd_hvp(self.model, self.loss_fn, batch, h=self.fd_step, params=self.params, forward=self.forward)

    def _estimate(self, batch: Any, a: Tensor | None, gen: torch.Generator) -> tuple[Tensor, Tensor, int, Tensor | None, dict[str, Any]]:
        if self.kind == "sampled_label":
            blocks, _ = sampled_label_samples(
                self.model, self.loss_fn, batch, loss=self.loss, a=a, num_samples=self.num_probes, generator=gen,
                params=self.params, forward=self.forward,
            )
            mean, se = _mean_stderr(blocks.sum(0))
            return mean, se, self.num_probes, blocks, {}
        if self.estimator == "output":
            blocks, meta = output_space_samples(
                self.model, self.loss_fn, batch, loss=self.loss, a=a, num_probes=self.num_probes, generator=gen,
                params=self.params, forward=self.forward, rows_per_probe=self.rows_per_probe,
                vectorize=self.vectorize, chunk_size=self.probe_chunk,
            )
            mean, se = _mean_stderr(blocks.sum(0))
            return mean, se, self.num_probes, blocks, meta
        op = self._operator(batch)
        if self.estimator == "hutchinson":
            blocks = quadratic_samples(op, a, self.num_probes, gen)
            mean, se = _mean_stderr(blocks.sum(0))
            return mean, se, op.num_matvecs, blocks, {}
        wop = weighted_operator(op, a) if a is not None else op
        core = hutchpp_core if self.estimator == "hutchpp" else xtrace_core
        mean, se, meta = core(wop, self.num_probes, gen)
        return mean, se, op.num_matvecs, None, meta

    def measure(self, precond: Sequence[Tensor] | Tensor | None = None) -> ProbeResult:
        """Estimate Tr(A Ĥ A) on the next held-out batch; ``precond`` is A's diagonal a, per parameter (aligned with
        ``probe.params``, e.g. ``opt.preconditioner(probe.params)``) or flat, None for A = I.

        No host synchronisation for the output-space, Hutchinson and sampled-label paths (XTrace/Hutch++ run small QRs). The
        model's parameters, ``.grad``, tensor hooks, module modes, buffers and the global RNG are left as found.
        """
        a = self._flat_precond(precond)
        index = self.num_measurements
        batch_index = index % len(self.batches)
        batch = self.batches[batch_index]
        seed = self.seed + index
        gen = torch.Generator(device=self.device).manual_seed(seed)
        modes = [(m, m.training) for m in self.model.modules()]
        saved_buffers = None
        if not self.eval_mode:
            # Train-mode forwards may update buffers (BatchNorm running statistics): put them back afterwards.
            saved_buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        rng_devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else []
        try:
            if self.eval_mode:
                self.model.eval()
            mode = "train" if any(m.training for m in self.model.modules()) else "eval"
            with torch.random.fork_rng(devices=rng_devices), torch.enable_grad():
                # The model's own randomness (dropout when eval_mode=False) comes from the recorded seed; fork_rng
                # puts the caller's global RNG state back afterwards.
                torch.random.default_generator.manual_seed(seed)
                for d in rng_devices:
                    torch.cuda.default_generators[d].manual_seed(seed)
                mean, se, used, blocks, meta = self._estimate(batch, a, gen)
        finally:
            for m, was_training in modes:
                m.training = was_training
            if saved_buffers is not None:
                with torch.no_grad():
                    for b, s in saved_buffers:
                        b.copy_(s)
        value = mean.to(torch.float64)
        nonpos = value <= 0
        if self.nonpositive == "nan" and self.kind in ("hessian", "fd_hessian"):
            value = torch.where(nonpos, torch.full_like(value, math.nan), value)
        per_param = None
        if blocks is not None:
            bm, bs = _mean_stderr(blocks)
            per_param = [{"value": m, "stderr": s} for m, s in zip(bm.unbind(0), bs.unbind(0))]
        result = ProbeResult(
            value=value, stderr=se.to(torch.float64), nonpositive=nonpos, kind=self.kind,
            estimator="sampled_label" if self.kind == "sampled_label" else self.estimator, num_matvecs=used,
            index=index, batch_index=batch_index, mode=mode, seed=seed, per_param=per_param, metadata=meta,
        )
        self.num_measurements += 1
        self.last = result
        return result

    def __repr__(self) -> str:
        return (f"CurvatureProbe(kind={self.kind!r}, estimator={self.estimator!r}, num_probes={self.num_probes}, "
                f"every={self.every}, batches={len(self.batches)}, params={len(self.params)})")
