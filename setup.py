"""Build the pnekern._C extension against the torch already installed.

Use ``pip install --no-build-isolation .`` (or ``pip wheel --no-build-isolation .``).
Environment:
  PNEKERN_BUILD_CUDA=auto|0|1   compile csrc/cuda when torch has CUDA and a toolkit is found (auto), never, or always
  PNEKERN_NATIVE=1              add -march=native (not portable; the default build already dispatches the hot loops
                                to AVX2/AVX-512 code at run time, see csrc/cpu/cpu_isa.h)
  TORCH_CUDA_ARCH_LIST          honoured by torch.utils.cpp_extension for CUDA sources
"""
import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:  # pragma: no cover - build-time diagnosis
    raise RuntimeError(
        "pnekern builds against an installed torch: run `pip install torch` first, then "
        "`pip install --no-build-isolation .`"
    ) from exc

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    mode = os.environ.get("PNEKERN_BUILD_CUDA", "auto").lower()
    if mode in ("0", "false", "no", "off"):
        return False
    has = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode in ("1", "true", "yes", "on") and not has:
        raise RuntimeError(
            "PNEKERN_BUILD_CUDA=1 but torch has no CUDA or no CUDA toolkit was found "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})"
        )
    return has


def _extension():
    rel = lambda p: os.path.relpath(p, ROOT)  # noqa: E731 - setuptools wants relative paths
    sources = [rel(os.path.join(ROOT, "csrc", "torch_ops.cpp"))]
    sources += sorted(rel(p) for p in glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    # -ffp-contract=off: the AVX2/AVX-512 copies of the hot loops (csrc/cpu/cpu_kernels_<isa>.cpp, compiled under
    # `#pragma GCC target`) must not fuse mul+add into FMA, so every ISA level rounds like torch and like each other.
    cxx = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fopenmp", "-std=c++20", "-g0"]
    if os.environ.get("PNEKERN_NATIVE", "0") == "1":
        cxx.append("-march=native")
    macros = []
    with_cuda = _want_cuda()
    if with_cuda:
        sources += sorted(rel(p) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        macros.append(("PNEKERN_WITH_CUDA", "1"))
    build_flags = " ".join(cxx)
    macros.append(("PNEKERN_BUILD_FLAGS", '"' + build_flags + '"'))
    kwargs = dict(
        name="pnekern._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        define_macros=macros,
        # No --use_fast_math for nvcc: it flushes fp32 subnormals to zero (second moments of tiny gradients are
        # subnormal) and the AdamW kernel must reproduce torch's IEEE rounding. --fmad=false: the in-step noise's
        # polynomial normal must not be FMA-contracted, so it gives the CPU kernel's bits.
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--fmad=false"]} if with_cuda else cxx,
        extra_link_args=["-fopenmp", "-Wl,--strip-debug"],
    )
    if with_cuda:
        return cpp_extension.CUDAExtension(**kwargs)
    return cpp_extension.CppExtension(**kwargs)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
