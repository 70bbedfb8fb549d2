"""A plain copy of the source tree works without pip: build the extension in place, import, all CPU backends load.

This is how benchmarks/gpu_check.sh runs on a device machine (PYTHONPATH + ``build_ext --inplace``).
The import runs in ``python -S -I``: no site processing, so neither the editable install's finder
nor any installed gfdm_fast is visible; only the copied tree and the directories torch lives in.
"""
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns("*.so", "build", "dist", "__pycache__", ".git", "*.egg-info", ".pytest_cache",
                                "runs", "out", ".venv*", "site-triton*")
SITE_DIRS = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]


def _isolated(code, tree=None):
    """Run ``code`` in a Python that sees ``tree`` (if given) and the site-packages dirs, without .pth files."""
    front = [str(tree)] if tree else []
    prog = f"import sys; sys.path[:0] = {front!r}; sys.path += {SITE_DIRS!r}\n{code}"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-S", "-I", "-c", prog], capture_output=True, text=True, timeout=300,
                          cwd=tree or "/", env=env)


@pytest.fixture(scope="module")
def built_tree(tmp_path_factory):
    tree = tmp_path_factory.mktemp("bare") / "gfdm-fast"
    shutil.copytree(ROOT, tree, symlinks=True, ignore=IGNORE)
    assert not list(tree.glob("gfdm_fast/_C*")), "the copy must not carry a built extension"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(GFDM_SKIP_CUDA="1", MAX_JOBS="2")
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"build_ext --inplace failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert list(tree.glob("gfdm_fast/_C*.so")), "build_ext --inplace produced no gfdm_fast/_C*.so"
    return tree


def test_isolated_python_sees_no_installed_copy():
    proc = _isolated("import gfdm_fast")
    assert proc.returncode != 0 and "No module named 'gfdm_fast'" in proc.stderr, proc.stderr[-2000:]


def test_bare_tree_builds_and_loads_every_cpu_backend(built_tree):
    proc = _isolated("import json, gfdm_fast, gfdm_fast.kernels\n"
                     "from gfdm_fast import ops\n"
                     "print(json.dumps({'pkg': gfdm_fast.__file__, 'kernels': gfdm_fast.kernels.__file__,\n"
                     "                  'status': ops.backend_status('cpu'), 'auto': ops.available_backends('cpu')}))",
                     built_tree)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["pkg"].startswith(str(built_tree)), info
    assert Path(info["kernels"]).resolve().is_relative_to(built_tree.resolve()), info
    for backend in ("cpp", "torch", "triton"):
        assert info["status"][backend] == "ok", info["status"]
    assert info["auto"][0] == "cpp", info
