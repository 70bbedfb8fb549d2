"""The CUDA sources compile and link without a GPU, so a broken csrc/*.cu is caught in CI.

nvcc -c each .cu for one architecture (sm_90) with torch's include paths, then links the object
with a stub that declares the launchers exactly as csrc/gfdm_ops.cpp does: a signature that
drifted between the two files fails here instead of at import on a GPU machine. Skips only
when nvcc is absent.
"""
import os
import re
import shutil
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CU_SOURCES = sorted((ROOT / "csrc").glob("*.cu"))
ARCH = "-gencode=arch=compute_90,code=sm_90"


def _torch_paths():
    from torch.utils.cpp_extension import CUDA_HOME, include_paths
    return CUDA_HOME, include_paths()


def find_nvcc():
    """CUDA_HOME / CUDA_PATH, torch's CUDA_HOME, /usr/local/cuda, then PATH."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), _torch_paths()[0], "/usr/local/cuda"]
    for home in homes:
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return Path(home) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    return Path(found) if found else None


def _run(cmd, what):
    t0 = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (f"{what} failed ({time.perf_counter() - t0:.0f} s):\n{' '.join(map(str, cmd))}\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def launcher_declarations():
    """The block of csrc/gfdm_ops.cpp that declares the CUDA launchers (inside namespace gfdm)."""
    text = (ROOT / "csrc" / "gfdm_ops.cpp").read_text()
    m = re.search(r"#ifdef GFDM_WITH_CUDA\n(// csrc/gfdm_ops_cuda\.cu.*?)#endif", text, re.S)
    assert m, "csrc/gfdm_ops.cpp no longer declares the CUDA launchers in an '#ifdef GFDM_WITH_CUDA' block"
    decls = m.group(1)
    names = re.findall(r"const char\* (\w+_cuda_launch)\(", decls)
    assert names, "no *_cuda_launch declarations found in csrc/gfdm_ops.cpp"
    return decls, names


@pytest.fixture(scope="module")
def nvcc():
    path = find_nvcc()
    if path is None:
        pytest.skip("nvcc not found (set CUDA_HOME to the toolkit root): the CUDA sources are not compiled here")
    return path


def test_cuda_sources_exist():
    assert CU_SOURCES, "csrc/ has no .cu file"


@pytest.mark.parametrize("source", CU_SOURCES, ids=lambda p: p.name)
def test_cu_compiles_and_links(nvcc, source, tmp_path):
    _, includes = _torch_paths()
    obj = tmp_path / (source.stem + ".o")
    flags = ["-std=c++17", "-O3", "--use_fast_math", ARCH, "-Xcompiler", "-fPIC", "-DGFDM_WITH_CUDA=1",
             *(f"-I{p}" for p in includes), f"-I{sysconfig.get_paths()['include']}"]
    _run([nvcc, "-c", source, "-o", obj, *flags], f"nvcc -c {source.name}")
    assert obj.stat().st_size > 0

    decls, names = launcher_declarations()
    stub = tmp_path / "launchers_stub.cpp"
    refs = "\n".join(f"  (void)&gfdm::{n};" for n in names)
    stub.write_text(f"#include <cstdint>\nnamespace gfdm {{\n{decls}}}\nint main() {{\n{refs}\n  return 0;\n}}\n")
    _run([nvcc, "-std=c++17", ARCH, stub, obj, "-o", tmp_path / "stub"], "linking the launchers declared in gfdm_ops.cpp")
