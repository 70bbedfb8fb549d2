"""The real CUDA extension builds and links without a GPU, so a broken csrc/ is caught in CI.

setup.py builds gfdm_fast._C with GFDM_FORCE_CUDA=1 into a temporary folder: nvcc compiles the .cu
and the C++ compiler the .cpp with GFDM_WITH_CUDA, and the two link into one extension that must
import (CUDA runtime present, no GPU needed). ``-Xptxas -v`` (through NVCC_APPEND_FLAGS) reports
every kernel's registers, stack frame and spills per architecture: the K <= 8 specialisations
(and noising) must use no local memory. The fat binary must hold sm_80 and sm_90 machine code
and compute_90 PTX (forward compatible). Skips only when nvcc or a CUDA build of torch is absent.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHS = "8.0;9.0+PTX"


def _torch_cuda_home():
    from torch.utils.cpp_extension import CUDA_HOME
    return CUDA_HOME


def find_nvcc():
    """nvcc of a full toolkit (bin/nvcc and include/cuda_runtime.h): CUDA_HOME / CUDA_PATH, torch's
    CUDA_HOME, /usr/local/cuda, then the toolkit of the nvcc on PATH (followed through symlinks)."""
    found = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), _torch_cuda_home(), "/usr/local/cuda",
             Path(os.path.realpath(found)).parent.parent if found else None]
    for home in homes:
        if home and (Path(home) / "bin" / "nvcc").is_file() and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return Path(home) / "bin" / "nvcc"
    return None


def parse_ptxas(log):
    """ptxas -v lines -> [{kernel, K, arch, registers, stack, spill_stores, spill_loads}] (K None if untemplated)."""
    out, cur = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\w+)'", line)
        if m:
            k = re.search(r"((?:em_step|exp_step|prior|noising)_kernel)(?:ILi(n?\d+)E)?", m.group(1))
            K = None if not k.group(2) else -int(k.group(2)[1:]) if k.group(2).startswith("n") else int(k.group(2))
            cur = {"kernel": k.group(1), "K": K, "arch": m.group(2)}
            out.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
    return out


@pytest.fixture(scope="module")
def cuda_build(tmp_path_factory):
    import torch
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME to the toolkit root): the CUDA extension is not built here")
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU-only build: the CUDA extension cannot link against it")
    out = tmp_path_factory.mktemp("cuda_build")
    env = dict(os.environ, GFDM_FORCE_CUDA="1", GFDM_CUDA_ARCHS=ARCHS, MAX_JOBS="2",
               NVCC_APPEND_FLAGS=(os.environ.get("NVCC_APPEND_FLAGS", "") + " -Xptxas -v").strip())
    env.pop("GFDM_SKIP_CUDA", None)
    env.setdefault("CUDA_HOME", str(nvcc.parent.parent))
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", out / "lib", "--build-temp",
                           out / "tmp"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    log = proc.stdout + proc.stderr
    (out / "build.log").write_text(log)
    assert proc.returncode == 0, f"the CUDA extension build failed:\n{log[-8000:]}"
    if "skipping the CUDA kernels" in log:
        why = re.search(r"skipping the CUDA kernels \(([^)]*)\)", log).group(1)
        pytest.skip("setup.py declined the CUDA build: " + why)
    so = list((out / "lib").glob("gfdm_fast/_C*.so"))
    assert so, "no extension was written"
    return so[0], log, nvcc


def test_extension_links_and_imports(cuda_build):
    so, _, _ = cuda_build
    code = ("import torch, importlib.util as u\n"
            f"spec = u.spec_from_file_location('gfdm_fast._C', {str(so)!r}); m = u.module_from_spec(spec)\n"
            "spec.loader.exec_module(m)\n"
            "assert m.has_cuda(), 'built without the CUDA kernels'\n"
            "print(sorted(n for n in dir(m) if n.endswith('_cuda') and n != 'has_cuda'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["['em_step_cuda',", "'exp_step_cuda',", "'noising_cuda',", "'prior_cuda']"]


def test_fat_binary_has_sass_for_each_arch_and_ptx_of_the_highest(cuda_build):
    so, _, nvcc = cuda_build
    cuobjdump = nvcc.parent / "cuobjdump"
    if not cuobjdump.is_file():                        # a minimal toolkit: Triton bundles one
        triton = pytest.importorskip("triton", reason="no cuobjdump next to nvcc and no triton bundling one")
        cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    elf = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True).stdout
    ptx = subprocess.run([cuobjdump, "--list-ptx", so], capture_output=True, text=True).stdout
    assert "sm_80" in elf and "sm_90" in elf, elf
    assert "sm_90" in ptx and "sm_80" not in ptx, ptx          # PTX of the highest arch only


def test_no_local_memory_for_specialised_kernels(cuda_build):
    _, log, _ = cuda_build
    rows = parse_ptxas(log)
    assert rows, "no ptxas -v output in the build log (NVCC_APPEND_FLAGS ignored?)"
    print("\nkernel             K  arch   regs stack spills")
    for r in sorted(rows, key=lambda r: (r["kernel"], r["arch"], -1 if r["K"] is None else r["K"])):
        k = "" if r["K"] is None else r["K"]
        print(f"{r['kernel']:<18} {k:>2} {r['arch']:<6} {r['registers']:>4} {r['stack']:>5}"
              f" {r['spill_stores'] + r['spill_loads']:>6}")
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"em_step_kernel", "prior_kernel", "noising_kernel", "exp_step_kernel"}, kernels
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    for r in rows:
        if r["K"] is None or 0 <= r["K"] <= 8:
            assert r["stack"] == 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0, r


# ---- one source of per-pixel math (no compiler needed) ---------------------------------------------
SHARED = ROOT / "csrc" / "gfdm_shared.h"


def _constants(text):
    return {m.group(1): int(m.group(2), 0) for m in re.finditer(r"\b(k\w+) = (0x[0-9A-Fa-f]+|\d+)u?\b", text)}


def test_shared_header_mirrors_layout_and_philox():
    from gfdm_fast import layout, philox
    c = _constants(SHARED.read_text())
    want = {"kEmFixed": layout.EM_FIXED, "kExpFixed": layout.EXP_FIXED, "kStreamEm": layout.STREAM_EM,
            "kStreamPrior": layout.STREAM_PRIOR, "kStreamTrain": layout.STREAM_TRAIN, "kStreamExp": layout.STREAM_EXP,
            "kMaxKSpecialised": layout.MAX_K_SPECIALISED, "kExpCudaMaxK1": layout.EXP_CUDA_MAX_K1,
            "kPhiloxM0": philox.PHILOX_M0, "kPhiloxM1": philox.PHILOX_M1, "kPhiloxW0": philox.PHILOX_W0,
            "kPhiloxW1": philox.PHILOX_W1, "kPhiloxRounds": philox.PHILOX_ROUNDS}
    assert {k: c.get(k) for k in want} == want


@pytest.mark.parametrize("source", ["gfdm_ops.cpp", "gfdm_ops_cuda.cu"])
def test_backends_take_the_per_pixel_math_from_the_shared_header(source):
    """Neither the .cpp nor the .cu holds its own Philox constants, normal transform or layout."""
    text = (ROOT / "csrc" / source).read_text()
    assert '#include "gfdm_shared.h"' in text
    for const in ("D2511F53", "CD9E8D57", "9E3779B9", "BB67AE85", "3f3504f3", "0.69314718055994531", "6.28318548f",
                  "1.5707963267948966", "6227020800", "479001600"):
        assert const.lower() not in text.lower(), f"{source} has its own copy of {const}"
    own = re.findall(r"^\s*(?:__device__\s+)?(?:__forceinline__\s+)?(?:GFDM_INLINE\s+)?float\s+"
                     r"(log_pos|cos_2pi|philox_normal|uniform_from_bits|em_pixel|prior_pixel|noising_pixel|exp_pixel|"
                     r"exp_data_prediction)\s*\(", text, re.M)
    assert not own, f"{source} defines {own} itself"
    assert not re.search(r"kEmFixed\s*=|kStream\w+\s*=|COL_AX\s*=|#define GFDM_SWITCH_K", text)
    for fn in ("philox_normal(", "em_pixel<", "prior_pixel<", "noising_pixel(", "exp_pixel<", "exp_data_prediction("):
        assert fn in text, f"{source} does not call {fn}"
