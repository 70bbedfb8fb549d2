"""Markov approximation of type-II fractional Brownian motion (MA-fBM).

K Ornstein-Uhlenbeck processes ``dY_k = -gamma_k Y_k dt + dB`` driven by one
Brownian motion; ``sum_k omega_k Y_k`` approximates the Riemann-Liouville
(type-II) fBM ``B_H(t) = Gamma(H+1/2)^-1 int_0^t (t-s)^(H-1/2) dB_s``
(Daems et al. 2023; Nobis et al. 2024, Sec. 3). Everything here is float64 numpy, except
``official_weights``: the official code's float32 torch solve (the `official` recipe).
"""
import math

import numpy as np
from scipy import special


def check_hurst(hurst: float) -> float:
    if not (isinstance(hurst, (int, float, np.floating)) and 0.0 < float(hurst) < 1.0):
        raise ValueError(f"hurst must be a number in (0, 1) (0.5 is Brownian motion), got {hurst!r}")
    return float(hurst)


MAX_NUM_AUG = 20   # the float64 weight system and statistics are checked up to here (the paper uses K <= 5)


def check_num_aug(num_aug: int) -> int:
    if isinstance(num_aug, bool) or not isinstance(num_aug, (int, np.integer)) or not 0 <= num_aug <= MAX_NUM_AUG:
        raise ValueError(f"num_aug must be an integer in 0..{MAX_NUM_AUG} (0 = plain Brownian motion), "
                         f"got {num_aug!r}")
    return int(num_aug)


def gamma_grid(num_aug: int, gamma_max: float = 20.0) -> np.ndarray:
    """Speeds ``gamma_k = r^(k - (K+1)/2)``, ``r = gamma_max^(2/(K-1))``: geometric from 1/gamma_max to gamma_max."""
    num_aug = check_num_aug(num_aug)
    if num_aug == 0:
        raise ValueError("num_aug = 0 has no OU speeds (plain Brownian motion)")
    if not gamma_max > 1.0:
        raise ValueError(f"gamma_max must be > 1, got {gamma_max!r}")
    if num_aug == 1:
        return np.ones(1)
    r = float(gamma_max) ** (2.0 / (num_aug - 1))
    k = np.arange(1, num_aug + 1, dtype=np.float64)
    return r ** (k - (num_aug + 1) / 2.0)


def weight_system(gamma: np.ndarray, hurst: float, T: float = 1.0) -> tuple[np.ndarray, np.ndarray, float]:
    """The normal equations ``A omega = b`` of min_omega int_0^T E|B_H(t) - sum omega_k Y_k(t)|^2 dt.

    ``A_ij = int_0^T Cov(Y_i, Y_j)``, ``b_k = int_0^T Cov(B_H, Y_k)`` and the
    normaliser ``c = int_0^T Var B_H``.
    """
    g = np.asarray(gamma, dtype=np.float64)
    a = check_hurst(hurst) + 0.5
    s = g[:, None] + g[None, :]
    A = (T + np.expm1(-s * T) / s) / s
    b = T * g ** -a * special.gammainc(a, g * T) - a * g ** -(a + 1) * special.gammainc(a + 1, g * T)
    c = T ** (2 * a) / (2 * hurst * (2 * a) * math.gamma(a) ** 2)
    return A, b, c


def optimal_weights(gamma: np.ndarray, hurst: float, T: float = 1.0) -> tuple[np.ndarray, float]:
    """Optimal (un-normalised) weights omega and the relative cost ``1 - b.omega / c``, float64.

    A is ill-conditioned (cond ~2e4 at K = 4, ~8e6 at K = 5); a symmetric solve
    with one step of iterative refinement keeps omega as accurate as float64
    allows (residual refinement measured in tests/test_mafbm.py).
    """
    A, b, c = weight_system(gamma, hurst, T)
    omega = np.linalg.solve(A, b)
    omega = omega + np.linalg.solve(A, b - A @ omega)  # one refinement step
    return omega, 1.0 - float(b @ omega) / c


def fbm_variance(t, hurst: float) -> np.ndarray:
    """Var B_H(t) of type-II fBM: ``t^(2H) / (2H Gamma(H+1/2)^2)``."""
    h = check_hurst(hurst)
    t = np.asarray(t, dtype=np.float64)
    return t ** (2 * h) / (2 * h * math.gamma(h + 0.5) ** 2)


def fbm_covariance(s, t, hurst: float) -> np.ndarray:
    """Cov(B_H(s), B_H(t)) of type-II fBM.

    For s <= t: ``Gamma(H+1/2)^-2 int_0^s (t-u)^(H-1/2) (s-u)^(H-1/2) du
    = s^(H+1/2) t^(H-1/2) / (H+1/2) 2F1(1/2-H, 1; H+3/2; s/t) / Gamma(H+1/2)^2``.
    """
    h = check_hurst(hurst)
    s, t = np.broadcast_arrays(np.asarray(s, np.float64), np.asarray(t, np.float64))
    lo, hi = np.minimum(s, t), np.maximum(s, t)
    a = h + 0.5
    with np.errstate(divide="ignore", invalid="ignore"):
        val = lo ** a * hi ** (h - 0.5) / a * special.hyp2f1(0.5 - h, 1.0, h + 1.5, lo / hi) / math.gamma(a) ** 2
    return np.where(lo > 0, val, 0.0)


def mafbm_variance(t, gamma: np.ndarray, omega: np.ndarray) -> np.ndarray:
    """Var of ``sum_k omega_k Y_k(t)``: ``omega^T Cov(Y)(t) omega``
    with ``Cov(Y_i,Y_j) = (1-e^{-(g_i+g_j)t})/(g_i+g_j)``."""
    g = np.asarray(gamma, np.float64)
    w = np.asarray(omega, np.float64)
    t = np.asarray(t, np.float64)[..., None, None]
    s = g[:, None] + g[None, :]
    return np.einsum("i,...ij,j->...", w, -np.expm1(-s * t) / s, w)


def official_weights(num_aug: int, hurst: float, gamma_max: float, T: float) -> tuple[np.ndarray, np.ndarray]:
    """gamma and omega exactly as the official code computes them (float32 torch: the official recipe)."""
    import torch

    f32 = torch.float32
    if num_aug == 1:
        gamma = torch.ones(1, dtype=f32)
    else:
        r = torch.tensor(gamma_max, dtype=f32) ** (2.0 / (num_aug - 1))
        k = torch.arange(1, num_aug + 1, dtype=f32)
        gamma = r ** (k - (num_aug + 1) / 2)
    H = torch.tensor(hurst, dtype=f32)
    Tt = torch.tensor([T], dtype=f32)
    s = gamma[None, :] + gamma[:, None]
    A = (Tt + (torch.exp(-s * Tt) - 1) / s) / s
    b = (Tt / gamma ** (H + 0.5) * torch.special.gammainc(H + 0.5, gamma * Tt)
         - (H + 0.5) / gamma ** (H + 1.5) * torch.special.gammainc(H + 1.5, gamma * Tt))
    omega = torch.linalg.solve(A, b)
    return gamma.double().numpy(), omega.numpy()  # omega kept float32
