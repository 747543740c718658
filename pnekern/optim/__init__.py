"""Optimizers: the drop-in AdamW and SGD with in-step noise statistics."""
from .adamw import AdamW
from .sgd import SGD, sgd_kappa

__all__ = ["AdamW", "SGD", "sgd_kappa"]
