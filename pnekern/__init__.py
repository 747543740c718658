"""pnekern: fused kernels for gradient-noise and curvature estimation inside the optimizer step.

Public API (imports are cheap; the compiled extension is loaded on first use):

- :class:`pnekern.AdamW` -- drop-in ``torch.optim.AdamW`` with fused backends and in-step noise statistics.
- :class:`pnekern.SGD` -- drop-in ``torch.optim.SGD`` with the same statistics (A = I).
- :class:`pnekern.NoiseConfig` -- noise injection and exposure control for ``AdamW(noise=...)`` (``pnekern.noise``).
- :func:`pnekern.clip_grad_norm_` -- ``torch.nn.utils.clip_grad_norm_`` that records the clip for exact exposure.
- :func:`pnekern.build_info` -- versions, compile flags and available backends.
- subpackages: ``pnekern.stats``, ``pnekern.probes``, ``pnekern.icl``.
"""
from __future__ import annotations

__version__ = "0.1.0"

from ._native import build_info
from .clip import clip_grad_norm_
from .optim.adamw import AdamW
from .optim.nap import NAP
from .noise.config import NoiseConfig
from .optim.sgd import SGD

__all__ = ["AdamW", "NAP", "SGD", "NoiseConfig", "clip_grad_norm_", "build_info", "__version__"]
