"""Shared test fixtures: where the official test vectors live, the stand-in network, device switches."""
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch  # does not import triton

# Without a CUDA device the Triton kernels run on CPU tensors under the interpreter (it must be set
# before triton is imported); with one they are compiled, so the `gpu` tests run the real thing.
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def fixtures_dir():
    env = os.environ.get("GFDM_FIXTURES")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent / "shared" / "fixtures" / "official"
        if cand.is_dir():
            return cand
    return here.parents[2] / "shared" / "fixtures" / "official"


@pytest.fixture(scope="session")
def official_dir():
    d = fixtures_dir()
    if not d.is_dir():
        pytest.fail(f"official fixtures not found at {d}; set GFDM_FIXTURES to shared/fixtures/official")
    return d


def load_official(name):
    return dict(np.load(fixtures_dir() / name))


def standin_net(x, s, y=None):
    """The stand-in network of the official fixtures: eps_hat(x, s) = tanh(x) (0.5 + s/1998)."""
    s = torch.as_tensor(s, dtype=x.dtype, device=x.device).reshape(-1)
    return torch.tanh(x) * (0.5 + s.reshape(-1, *([1] * (x.dim() - 1))) / 1998)


def pytest_collection_modifyitems(config, items):
    """Every test marked `gpu` (the whole GPU suite: `pytest -m gpu`) skips cleanly without a CUDA device."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def seed_for(nodeid):
    """A 32-bit seed fixed by a test's node id (file, name and parameters): stable across runs and machines."""
    return zlib.crc32(nodeid.encode())


@pytest.fixture
def seed(request):
    """This test's own fixed seed: torch's and numpy's global generators start from it, and it is returned
    for explicit generators (``torch.Generator().manual_seed(seed)``). Each test and parametrisation gets a
    different one, so tests draw fresh inputs without depending on the order they run in."""
    s = seed_for(request.node.nodeid)
    torch.manual_seed(s)
    np.random.seed(s)
    return s


@pytest.fixture
def one_thread():
    """torch on one CPU thread for a test (2 threads contend with other processes on a shared 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
