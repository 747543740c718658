"""Lazy loader of the compiled extension ``pnekern._C``.

Importing pnekern never fails because the native library is missing; the first call that needs it raises
a RuntimeError that says what went wrong and how to fix it (bitsandbytes / xformers habit).
"""
from __future__ import annotations

import importlib
import os
import threading
from types import ModuleType
from typing import Any

import torch

_lock = threading.Lock()
_module: ModuleType | None = None
_error: BaseException | None = None
_tried = False

_FIX = (
    "Build it against the installed torch with `pip install --no-build-isolation .` in the pnekern source tree "
    "(or `python setup.py build_ext --inplace` for a development checkout), or select the pure-PyTorch "
    "backend with `backend='reference'` / PNEKERN_BACKEND=reference."
)


def _load() -> ModuleType | None:
    global _module, _error, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        try:
            # torch must be imported first: the extension finds libc10/libtorch through it.
            _module = importlib.import_module("pnekern._C")
        except BaseException as exc:  # noqa: BLE001 - any load failure is reported at call time
            _error = exc
            _module = None
        _tried = True
        return _module


def available() -> bool:
    """True when the compiled extension imported (and registered ``torch.ops.pnekern``)."""
    return _load() is not None


def require(what: str = "this operation") -> ModuleType:
    """Return the extension module or raise a RuntimeError that diagnoses why it is missing."""
    mod = _load()
    if mod is None:
        raise RuntimeError(
            f"pnekern's compiled extension (pnekern._C) is needed for {what} but could not be loaded: "
            f"{type(_error).__name__}: {_error}. {_FIX}"
        )
    return mod


def load_error() -> BaseException | None:
    """The exception raised while importing the extension, or None."""
    _load()
    return _error


def build_info() -> dict[str, Any]:
    """Versions, compile flags and the backends available in this installation.

    Returns a dict with ``pnekern``/``torch``/``triton`` versions, ``native`` (whether ``pnekern._C`` loaded,
    and if so its own compile-time info: compiler, flags, OpenMP, CUDA), ``cpu_isa`` (the instruction-set levels
    of the CPU kernels: compiled, supported, selected; None without the extension), ``backends`` (names usable
    right now) and ``load_error`` when the extension is missing.
    """
    from . import __version__

    info: dict[str, Any] = {"pnekern": __version__, "torch": torch.__version__}
    try:
        import triton  # noqa: F401

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - triton is an optional extra
        info["triton"] = None
    mod = _load()
    backends = ["reference"]
    if mod is not None:
        native = dict(mod.build_info())
        info["native"] = native
        # ISA level of the CPU hot loops: {"compiled", "supported", "best", "selected", "env"} (PNEKERN_CPU_ISA).
        info["cpu_isa"] = native.get("cpu_isa")
        backends.append("cpp")
        if native.get("with_cuda") and torch.cuda.is_available():
            backends.append("cuda")
    else:
        info["native"] = None
        info["cpu_isa"] = None
        info["load_error"] = f"{type(_error).__name__}: {_error}"
    if info["triton"] is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        backends.append("triton")
    info["backends"] = backends
    info["cuda_available"] = torch.cuda.is_available()
    return info
