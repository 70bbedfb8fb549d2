"""MA-fBM weights and the type-II fBM they approximate."""
import json

import numpy as np
import pytest
from scipy import integrate

from gfdm_fast import mafbm

from conftest import fixtures_dir

RECORDS = json.loads((fixtures_dir() / "mafbm_weights.json").read_text())
# README of the fixtures: A is ill-conditioned, rtol ~1e-5 on omega at K = 5, better for small K.
OMEGA_RTOL = {1: 1e-12, 2: 1e-11, 3: 1e-10, 4: 1e-8, 5: 1e-5}


@pytest.mark.parametrize("rec", RECORDS, ids=lambda r: f"H{r['hurst']}_K{r['num_aug']}")
def test_optimal_weights_match_official(rec):
    gamma = np.array(rec["gamma"])
    omega, cost = mafbm.optimal_weights(gamma, rec["hurst"], rec["T"])
    np.testing.assert_allclose(omega, rec["omega"], rtol=OMEGA_RTOL[rec["num_aug"]], atol=0)
    assert abs(cost - rec["cost"]) < 1e-9
    # the official grid is float32; ours is float64 of the same formula
    np.testing.assert_allclose(mafbm.gamma_grid(rec["num_aug"], rec["gamma_max"]), gamma, rtol=1e-7)


def test_gamma_grid_spans_inverse_to_max():
    g = mafbm.gamma_grid(5, 20.0)
    np.testing.assert_allclose([g[0], g[2], g[-1]], [1 / 20, 1.0, 20.0], rtol=1e-15)
    assert np.all(np.diff(np.log(g)) > 0)
    np.testing.assert_allclose(np.diff(np.log(g)), np.log(20.0) / 2, rtol=1e-14)
    assert mafbm.gamma_grid(1) == pytest.approx([1.0])


@pytest.mark.parametrize("K", [4, 5])
def test_refined_solve_has_float64_residual(K):
    gamma = mafbm.gamma_grid(K)
    A, b, _ = mafbm.weight_system(gamma, 0.9)
    omega, _ = mafbm.optimal_weights(gamma, 0.9)
    assert np.linalg.norm(A @ omega - b) / np.linalg.norm(b) < 1e-15


@pytest.mark.parametrize("hurst", [0.2, 0.5, 0.8])
def test_fbm_covariance_against_quadrature(hurst):
    from math import gamma as Gamma
    for s, t in [(0.3, 0.7), (0.5, 0.5), (0.9, 0.2)]:
        lo = min(s, t)
        val, _ = integrate.quad(lambda u: (t - u) ** (hurst - 0.5) * (s - u) ** (hurst - 0.5), 0, lo, limit=200)
        assert mafbm.fbm_covariance(s, t, hurst) == pytest.approx(val / Gamma(hurst + 0.5) ** 2, rel=1e-7)
    t = np.linspace(0.1, 1, 5)
    np.testing.assert_allclose(mafbm.fbm_covariance(t, t, hurst), mafbm.fbm_variance(t, hurst), rtol=1e-12)


def test_mafbm_variance_approaches_fbm():
    """Relative L2 error of omega^T Cov(Y)(t) omega against Var B_H on t in [0.01, 1] (gamma_max = 20):

    H    K=1    K=2    K=3    K=4    K=5
    0.3  0.051  0.041  0.009  0.010  0.009
    0.7  0.351  0.097  0.0026 0.0009 0.0012
    0.9  0.491  0.200  0.0024 0.0005 0.0009
    (at fixed gamma_max the error plateaus once the grid covers [1/20, 20]).
    """
    t = np.linspace(0.01, 1, 200)
    for hurst in (0.3, 0.7, 0.9):
        f = mafbm.fbm_variance(t, hurst)
        err = []
        for K in range(1, 6):
            g = mafbm.gamma_grid(K)
            w, _ = mafbm.optimal_weights(g, hurst)
            err.append(np.sqrt(np.mean((mafbm.mafbm_variance(t, g, w) - f) ** 2) / np.mean(f ** 2)))
        assert err[-1] < 0.3 * err[0]
        assert max(err[2:]) < 0.011
        assert err[2] < err[1] < err[0] or hurst == 0.3 and err[2] < err[0]


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, "0.5", None])
def test_bad_hurst(bad):
    with pytest.raises(ValueError, match=r"hurst must be a number in \(0, 1\)"):
        mafbm.optimal_weights([1.0], bad)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_num_aug(bad):
    with pytest.raises(ValueError, match="num_aug must be an integer in 0..20"):
        mafbm.gamma_grid(bad)
