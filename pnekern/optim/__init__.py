"""Optimizers: the drop-in AdamW and SGD with in-step noise statistics."""
from .adamw import AdamW
from .nap import NAP
from .sgd import SGD, sgd_kappa

__all__ = ["AdamW", "NAP", "SGD", "sgd_kappa"]
