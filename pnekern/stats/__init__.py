"""Gradient-noise statistics and exposure telemetry (SPEC §2–§3).

- :class:`NoiseStats` — micro-batch capture + in-step statistics engine used by pnekern.AdamW / pnekern.SGD.
- :class:`StepStats` — one step's statistics (device tensors until read).
- :class:`ExposureLog` — history, JSONL/CSV/TensorBoard, plots.
- :class:`DebiasedEMA`, :class:`NoiseScaleEMA` — smoothing for the gradient-noise scale.
- :class:`KappaCalibrator` — online κ(β1) calibration by mean-squared displacement.
- :func:`tail_index`, :func:`mohammadi_alpha` — α-stable tail index of the noise.
"""
from .ema import DebiasedEMA, NoiseScaleEMA
from .engine import KAPPA_MODES, STATS_MODES, NoiseStats, StepStats, bias_corrected_coefficient, kappa_value, nystrom
from .kappa import KappaCalibrator, KappaEstimate
from .log import ExposureLog
from .tail import TailIndexResult, mohammadi_alpha, sample_symmetric_stable, standardized_deviations, tail_index

__all__ = [
    "NoiseStats", "StepStats", "ExposureLog", "DebiasedEMA", "NoiseScaleEMA", "KappaCalibrator", "KappaEstimate",
    "tail_index", "mohammadi_alpha", "sample_symmetric_stable", "standardized_deviations", "TailIndexResult", "kappa_value",
    "bias_corrected_coefficient", "nystrom", "STATS_MODES", "KAPPA_MODES",
]
