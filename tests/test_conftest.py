"""The shared fixtures of conftest.py."""
import numpy as np
import pytest
import torch

from conftest import seed_for


@pytest.mark.parametrize("k", [1, 2])
def test_seed_fixture_is_per_test_and_seeds_the_global_generators(k, seed, request):
    assert seed_for(request.node.nodeid.replace(f"[{k}]", f"[{3 - k}]")) != seed   # other parameters, other seed
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(seed)))
    np.testing.assert_array_equal(np.random.random(3), np.random.RandomState(seed).random_sample(3))
