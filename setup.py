"""Build the C++/CUDA extension of gfdm-fast (the package metadata is in pyproject.toml).

The C++ extension ``gfdm_fast._C`` (csrc/*.cpp, OpenMP) is always built. CUDA
kernels (csrc/*.cu) are added when nvcc and a CUDA build of torch with the same
CUDA major version are present. Switches:

  GFDM_FORCE_CUDA=1   build the CUDA kernels even without a visible GPU
  GFDM_SKIP_CUDA=1    never build the CUDA kernels
  GFDM_CUDA_ARCHS     torch's TORCH_CUDA_ARCH_LIST format, e.g. "8.0;9.0+PTX" or "Hopper" (default:
                      TORCH_CUDA_ARCH_LIST, else 8.0;9.0+PTX): SASS for each, PTX for the "+PTX" ones
  MAX_JOBS            parallel compile jobs (torch's convention)

A missing compiler for the CUDA part never fails the install: it warns and
builds the CPU part only.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import warnings

from setuptools import find_packages, setup


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _nvcc_major(cuda_home):
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.check_output([nvcc, "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return int(m.group(1)) if m else None


def _want_cuda(torch, cuda_home):
    """Decide whether to build the CUDA kernels; return (bool, reason)."""
    if _env_flag("GFDM_SKIP_CUDA"):
        return False, "GFDM_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    if cuda_home is None:
        return False, "nvcc not found (set CUDA_HOME to the toolkit root)"
    major = _nvcc_major(cuda_home)
    torch_major = int(torch.version.cuda.split(".")[0])
    if major != torch_major:
        return False, f"nvcc is CUDA {major}, torch was built with CUDA {torch.version.cuda}"
    if _env_flag("GFDM_FORCE_CUDA") or torch.cuda.is_available():
        return True, "ok"
    return False, "no GPU visible (GFDM_FORCE_CUDA=1 builds anyway)"


def _cuda_home_from_nvcc():
    """Point CUDA_HOME at the toolkit when ``nvcc`` on PATH is a wrapper script or link outside it.

    torch guesses CUDA_HOME as the parent of the ``bin`` holding nvcc; for /usr/local/bin/nvcc that is
    /usr/local, which has no CUDA headers. An explicit CUDA_HOME / CUDA_PATH always wins.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates.append("/usr/local/cuda")
    for root in candidates:
        has_headers = os.path.exists(os.path.join(root, "include", "cuda_runtime.h"))
        if has_headers and os.path.exists(os.path.join(root, "bin", "nvcc")):
            if nvcc and os.path.dirname(os.path.dirname(nvcc)) != root:
                os.environ["CUDA_HOME"] = root
            return


def _extensions():
    _cuda_home_from_nvcc()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        warnings.warn("torch is not installed: building gfdm-fast without its C++ extension "
                      "(install torch first, then reinstall with --no-build-isolation)")
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp:
        return [], {}
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # no -std: torch's BuildExtension adds the standard its headers need (C++20 for torch 2.14);
    # -fno-math-errno lets sqrtf vectorise in the Philox loop; -ffp-contract=off (C++) and --fmad=false
    # (nvcc, no --use_fast_math) keep a * b + c two roundings on both devices, so the per-pixel math of
    # csrc/gfdm_shared.h gives the same bits on CPU and GPU
    cxx = ["-O3", "-fno-math-errno", "-ffp-contract=off", *openmp]
    use_cuda, why = _want_cuda(torch, CUDA_HOME)
    if use_cuda and cu:
        # torch's BuildExtension turns TORCH_CUDA_ARCH_LIST into -gencode flags (SASS per arch, PTX for
        # +PTX; named arches like "Hopper" work too)
        archs = os.environ.get("GFDM_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0+PTX"
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        ext = CUDAExtension(
            "gfdm_fast._C", cpp + cu,
            define_macros=[("GFDM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--fmad=false"]},
            extra_link_args=openmp,
        )
    else:
        if cu:
            warnings.warn(f"gfdm-fast: skipping the CUDA kernels ({why}); building the CPU kernels only")
        ext = CppExtension("gfdm_fast._C", cpp, extra_compile_args=cxx, extra_link_args=openmp)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()

# Metadata, dependencies and the console script live in pyproject.toml; this file adds what needs code:
# the extension and the mapping of the top-level kernels/ folder to the package gfdm_fast.kernels.
setup(
    packages=find_packages(include=["gfdm_fast", "gfdm_fast.*"]) + ["gfdm_fast.kernels"],
    package_dir={"gfdm_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
