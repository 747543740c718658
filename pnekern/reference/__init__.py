"""Pure-PyTorch reference implementations: the test oracle for every kernel and the fallback backend.

Each function has the same signature as the compiled op it mirrors (``torch.ops.pnekern.<name>``).
"""
from .adamw import adamw_step_, microbatch_accumulate_

__all__ = ["adamw_step_", "microbatch_accumulate_"]
