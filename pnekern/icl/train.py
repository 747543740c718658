"""Training loop for the synthetic ICL tasks.

The optimizer is built by a factory ``make_optimizer(params) -> torch.optim.Optimizer`` (default
``torch.optim.AdamW``), so the same loop runs with ``pnekern.AdamW(..., stats="trace")`` without this module
importing ``pnekern.optim``. When the optimizer has ``last_stats()``, its ``.to_dict()`` is recorded at every log
step: that is how exposure telemetry reaches the history.

Each step draws ``batch_size`` fresh sequences, splits them into ``micro_batches`` equal chunks and calls
``(loss_chunk / micro_batches).backward()`` per chunk, so p.grad is the full-batch mean gradient and the
optimizer's gradient hooks see n = micro_batches contributions (n ≥ 2 is needed for noise statistics).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import LinearSelfAttention
from .tasks import IGNORE_INDEX, ICLTask, RegressionBatch, SequenceBatch, make_generator

__all__ = ["TrainResult", "compute_loss", "evaluate_loss", "warmup_cosine_factor", "train", "check_model_task"]

Batch = Union[RegressionBatch, SequenceBatch]


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        history: one dict per log step with step, loss (train, this step), val_loss, tokens, updates, lr,
            elapsed_s and, when the optimizer provides ``last_stats()``, ``stats`` (its ``to_dict()``).
        final_val_loss: validation loss on the fixed validation batch after the last update.
        tokens_seen: tokens read by the model in training (regression: 2 per example).
        updates: optimizer steps taken.
        stop_reason: "steps", "target_loss", "max_tokens" or "callback".
        elapsed_s: wall-clock seconds of the loop.
    """

    history: List[Dict[str, Any]] = field(default_factory=list)
    final_val_loss: float = float("nan")
    final_train_loss: float = float("nan")
    tokens_seen: int = 0
    updates: int = 0
    stop_reason: str = "steps"
    elapsed_s: float = 0.0


def compute_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Scalar training loss of ``model`` on ``batch``.

    * token batches: mean cross-entropy over scored positions (targets ≠ IGNORE_INDEX), nats/token;
    * :class:`LinearSelfAttention`: squared error of the last example predicted from the others (y² units);
    * other regression models ``model(xs, ys) -> [B, k]``: squared error averaged over all prefix positions
      (Garg et al.), or the logistic loss softplus(−y·f) for classification batches.
    """
    if isinstance(batch, SequenceBatch):
        logits = model(batch.tokens)
        return F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
    if isinstance(model, LinearSelfAttention):
        preds = model(batch.xs[:, :-1], batch.ys[:, :-1], batch.xs[:, -1])
        targets = batch.ys[:, -1]
    else:
        preds = model(batch.xs, batch.ys)
        targets = batch.ys
    if batch.kind == "classification":
        return F.softplus(-targets * preds).mean()
    return (preds - targets).pow(2).mean()


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from 1/warmup to 1 over ``warmup_steps``, then cosine to ``min_ratio``.

    ``step`` counts completed updates (0 for the first update), matching ``LambdaLR``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def check_model_task(model: nn.Module, task: ICLTask) -> None:
    """Raise ValueError (naming the field) when the task does not fit the model's context or vocabulary."""
    if isinstance(model, LinearSelfAttention):
        if getattr(task, "d", None) != model.d:
            raise ValueError(f"task d ({getattr(task, 'd', None)}) != model d ({model.d})")
        if getattr(task, "k_max", 0) < 2:
            raise ValueError("k_max must be >= 2 for the LSA model (k_max − 1 context examples + 1 query)")
        return
    if hasattr(model, "k_max") and hasattr(task, "k_max"):
        if task.k_max > model.k_max:
            raise ValueError(f"k_max ({task.k_max}) is larger than the model context k_max ({model.k_max})")
        if task.d != model.d:
            raise ValueError(f"task d ({task.d}) != model d ({model.d})")
    backbone = getattr(model, "backbone", None)
    if backbone is not None and task.sequence_length > backbone.n_positions:
        raise ValueError(f"task sequence_length ({task.sequence_length}) exceeds model n_positions "
                         f"({backbone.n_positions})")
    if hasattr(model, "vocab_size") and hasattr(task, "total_vocab") and task.total_vocab > model.vocab_size:
        raise ValueError(f"task total_vocab ({task.total_vocab}) exceeds model vocab_size ({model.vocab_size})")


def _last_stats(opt: torch.optim.Optimizer) -> Any:
    """The optimizer's latest step statistics, or None when it has none.

    ``pnekern.AdamW`` always has ``last_stats`` but raises when built with ``stats=None``; that is "no telemetry",
    not an error, for the training loop.
    """
    fn = getattr(opt, "last_stats", None)
    if fn is None or getattr(opt, "noise_stats", True) is None:
        return None
    return fn()


def _find_temperature(stats: Dict[str, Any]) -> Optional[float]:
    for key in ("temperature", "ne", "NE", "ne_t"):
        v = stats.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    for key, v in stats.items():
        if "temperature" in str(key).lower() and isinstance(v, (int, float)):
            return float(v)
    return None


def train(
    model: nn.Module,
    task: ICLTask,
    *,
    steps: int,
    batch_size: int,
    micro_batches: int = 1,
    make_optimizer: Optional[Callable[[Any], torch.optim.Optimizer]] = None,
    lr: Optional[float] = None,
    weight_decay: float = 0.0,
    lr_schedule: str = "warmup_cosine",
    warmup_steps: Optional[int] = None,
    min_lr_ratio: float = 0.1,
    grad_clip: Optional[float] = None,
    seed: int = 0,
    log_every: int = 50,
    val_batch_size: int = 1024,
    target_loss: Optional[float] = None,
    target_eps: float = 0.0,
    max_tokens: Optional[int] = None,
    checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
    progress: bool = True,
    on_step: Optional[Callable[[int, Dict[str, Any], nn.Module, torch.optim.Optimizer], Optional[bool]]] = None,
) -> TrainResult:
    """Train ``model`` on fresh batches of ``task``.

    Args:
        steps: maximum number of optimizer updates.
        batch_size: sequences per update; must be divisible by ``micro_batches``.
        micro_batches: backward calls per update (gradient contributions n).
        make_optimizer: factory ``params -> Optimizer``; default ``torch.optim.AdamW(params, lr, weight_decay)``.
        lr: base learning rate; overrides every param group's lr when given (default 1e-3 when no factory;
            with a factory and ``lr=None`` the factory's lrs are kept).
        lr_schedule: "warmup_cosine" (linear warm-up, cosine decay to ``min_lr_ratio``·lr) or "constant".
        warmup_steps: default ``max(1, steps // 20)``.
        seed: seeds the training-data generator; validation data use ``seed + 1`` (a disjoint stream).
        log_every: history/progress/validation period in updates (the last update is always logged).
        target_loss: stop at the first log step with val_loss ≤ target_loss + target_eps (matched-loss runs).
        max_tokens: stop once this many training tokens have been read.
        checkpoint_dir: if given, ``checkpoint.pt`` (model, optimizer, step, tokens, history) is written at the end.
        progress: print a progress line every log step (tqdm bar if tqdm is installed).
        on_step: called after every update as ``on_step(step, info, model, optimizer)``; returning True stops.

    Returns:
        :class:`TrainResult`.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be a positive integer, got {micro_batches!r}")
    if not isinstance(batch_size, int) or batch_size < micro_batches or batch_size % micro_batches:
        raise ValueError(f"batch_size ({batch_size!r}) must be a positive multiple of micro_batches ({micro_batches})")
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    if lr_schedule not in ("warmup_cosine", "constant"):
        raise ValueError(f"lr_schedule must be 'warmup_cosine' or 'constant', got {lr_schedule!r}")
    check_model_task(model, task)

    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if make_optimizer is None:
        opt = torch.optim.AdamW(params, lr=1e-3 if lr is None else lr, weight_decay=weight_decay)
    else:
        opt = make_optimizer(params)
        if lr is not None:
            for group in opt.param_groups:
                group["lr"] = lr
    if warmup_steps is None:
        warmup_steps = max(1, steps // 20)
    if lr_schedule == "warmup_cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine_factor(s, steps, warmup_steps, min_lr_ratio))
    else:
        sched = None

    gen = make_generator(seed, device)
    val_batch = task.sample(val_batch_size, make_generator(seed + 1, device))
    chunk = batch_size // micro_batches

    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm  # optional dependency
            bar = tqdm(total=steps, desc="train", leave=False)
        except ImportError:
            bar = None

    result = TrainResult()
    t0 = time.perf_counter()
    model.train()
    tokens = 0
    for step in range(1, steps + 1):
        batch = task.sample(batch_size, gen)
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for i in range(micro_batches):
            loss = compute_loss(model, batch.slice(i * chunk, (i + 1) * chunk))
            (loss / micro_batches).backward()
            step_loss += float(loss.detach()) / micro_batches
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"non-finite training loss {step_loss} at step {step}")
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        current_lr = float(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None:
            sched.step()
        tokens += batch.num_tokens()
        result.updates = step
        result.tokens_seen = tokens
        result.final_train_loss = step_loss

        stop_reason = None
        if max_tokens is not None and tokens >= max_tokens:
            stop_reason = "max_tokens"
        info = {"step": step, "loss": step_loss, "tokens": tokens, "updates": step, "lr": current_lr}
        if on_step is not None and on_step(step, info, model, opt):
            stop_reason = stop_reason or "callback"

        if step % log_every == 0 or step == steps or stop_reason is not None:
            val_loss = evaluate_loss(model, val_batch)
            record = dict(info, val_loss=val_loss, elapsed_s=time.perf_counter() - t0)
            stats = _last_stats(opt)
            if stats is not None:
                record["stats"] = stats.to_dict() if hasattr(stats, "to_dict") else dict(stats)
            result.history.append(record)
            if progress:
                line = f"step {step}/{steps} loss {step_loss:.4f} val {val_loss:.4f} lr {current_lr:.2e}"
                temp = _find_temperature(record.get("stats", {}))
                if temp is not None:
                    line += f" T {temp:.3g}"
                if bar is not None:
                    bar.set_postfix_str(line)
                else:
                    print(line, flush=True)
            if target_loss is not None and val_loss <= target_loss + target_eps:
                stop_reason = stop_reason or "target_loss"
        if bar is not None:
            bar.update(1)
        if stop_reason is not None:
            result.stop_reason = stop_reason
            break
    if bar is not None:
        bar.close()
    result.final_val_loss = evaluate_loss(model, val_batch)
    result.elapsed_s = time.perf_counter() - t0
    if checkpoint_dir is not None:
        os.makedirs(checkpoint_dir, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": result.updates,
                    "tokens": tokens, "history": result.history},
                   os.path.join(os.fspath(checkpoint_dir), "checkpoint.pt"))
    return result


@torch.no_grad()
def evaluate_loss(model: nn.Module, batch: Batch) -> float:
    """:func:`compute_loss` in eval mode without gradients (restores the previous train/eval mode)."""
    was_training = model.training
    model.eval()
    try:
        return float(compute_loss(model, batch))
    finally:
        model.train(was_training)
