"""Exposure target schedules for the noise controller (SPEC §5): value(step) of NE_t or P-NE*_t.

Steps are the optimizer's 1-based step numbers t (the step the value applies to). Units are those of the metric the
controller tracks: temperature NE_t = η κ Tr(AΣA) or the dimensionless P-NE*_t.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Schedule", "constant", "ramp", "piecewise", "concentrated", "equal_exposure_pair"]


def _check_value(name: str, v: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name}={v!r} must be a finite float >= 0")
    return float(v)


def _check_step(name: str, v: int, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name}={v!r} must be an int >= {minimum}")
    return v


@dataclass(frozen=True)
class Schedule:
    """Piecewise-linear target: ``knots`` (step, value) pairs, linear in between, held constant outside.

    Windows with jumps are represented by two knots one step apart. Build with :func:`constant`, :func:`ramp`,
    :func:`piecewise`, :func:`concentrated`.
    """

    knots: tuple[tuple[int, float], ...]

    def __post_init__(self) -> None:
        if not self.knots:
            raise ValueError("Schedule needs at least one (step, value) knot")
        prev = None
        for t, v in self.knots:
            _check_step("schedule step", t)
            _check_value("schedule value", v)
            if prev is not None and t <= prev:
                raise ValueError(f"schedule knots must have strictly increasing steps, got {t} after {prev}")
            prev = t

    def __call__(self, step: int) -> float:
        """Target value at optimizer step ``step`` (1-based)."""
        ks = self.knots
        if step <= ks[0][0]:
            return ks[0][1]
        for (t0, v0), (t1, v1) in zip(ks, ks[1:]):
            if step <= t1:
                return v0 + (v1 - v0) * (step - t0) / (t1 - t0)
        return ks[-1][1]

    def integral(self, first: int, last: int) -> float:
        """Σ_{t=first}^{last} value(t) (the integrated exposure target over those steps, inclusive)."""
        return math.fsum(self(t) for t in range(first, last + 1))


def constant(value: float) -> Schedule:
    """value at every step."""
    return Schedule(((0, _check_value("value", value)),))


def ramp(start: float, end: float, steps: int, begin: int = 1) -> Schedule:
    """Linear from ``start`` at step ``begin`` to ``end`` at step ``begin + steps``, held afterwards."""
    _check_step("steps", steps, 1)
    _check_step("begin", begin)
    return Schedule(((begin, _check_value("start", start)), (begin + steps, _check_value("end", end))))


def piecewise(windows: Sequence[tuple[int, int, float]], default: float = 0.0) -> Schedule:
    """Constant ``value`` on each window [first, last] (inclusive, 1-based steps), ``default`` elsewhere.

    Windows must not overlap and must be given in increasing order.
    """
    default = _check_value("default", default)
    knots: list[tuple[int, float]] = [(0, default)]
    prev_last = 0
    for i, w in enumerate(windows):
        if len(w) != 3:
            raise ValueError(f"windows[{i}]={w!r} must be (first_step, last_step, value)")
        first, last, value = w
        _check_step(f"windows[{i}] first step", first, 1)
        _check_step(f"windows[{i}] last step", last, first)
        value = _check_value(f"windows[{i}] value", value)
        if first <= prev_last:
            raise ValueError(f"windows[{i}] starts at step {first}, inside the previous window (ends at {prev_last})")
        if first - 1 > knots[-1][0]:
            knots.append((first - 1, default))  # hold the default up to the step before the window
        knots.append((first, value))
        if last > first:
            knots.append((last, value))
        knots.append((last + 1, default))
        prev_last = last
    # Drop knots that coincide in step (a window right after another): keep the later value's start.
    out: list[tuple[int, float]] = []
    for t, v in knots:
        if out and out[-1][0] == t:
            out[-1] = (t, v)
        else:
            out.append((t, v))
    return Schedule(tuple(out))


def concentrated(total_steps: int, mean: float, where: str, fraction: float = 0.25, baseline: float = 0.0) -> Schedule:
    """A target whose integral over steps 1..total_steps is ``mean · total_steps``, concentrated early or late.

    ``baseline`` everywhere, plus a window of w = round(fraction · total_steps) steps at the start (``where="early"``)
    or the end (``"late"``) at ``baseline + (mean − baseline) · total_steps / w``. Early and late schedules with the
    same arguments have exactly equal integrals (the phase-sensitivity experiment).
    """
    _check_step("total_steps", total_steps, 1)
    mean = _check_value("mean", mean)
    baseline = _check_value("baseline", baseline)
    if where not in ("early", "late"):
        raise ValueError(f"where={where!r} must be 'early' or 'late'")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r} must be in (0, 1]")
    if baseline > mean:
        raise ValueError(f"baseline={baseline!r} must not exceed mean={mean!r} (the window would be negative)")
    w = max(1, round(fraction * total_steps))
    high = baseline + (mean - baseline) * total_steps / w
    first = 1 if where == "early" else total_steps - w + 1
    return piecewise([(first, first + w - 1, high)], default=baseline)


def equal_exposure_pair(total_steps: int, mean: float, fraction: float = 0.25, baseline: float = 0.0) -> tuple[Schedule, Schedule]:
    """(early, late) :func:`concentrated` schedules with equal integrated exposure ``mean · total_steps``."""
    return (
        concentrated(total_steps, mean, "early", fraction, baseline),
        concentrated(total_steps, mean, "late", fraction, baseline),
    )
