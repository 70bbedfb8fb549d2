"""Forward dynamics of the augmented state Z = (X, Y_1..Y_K) (Nobis et al. 2024, Sec. 3-4).

``dZ = F(t) Z dt + G(t) dB`` per pixel, with
``F = [[mu, -g omega_1 gamma_1, ..], [0, -gamma_1, ..], ..]`` and
``G = (g sum(omega), 1, .., 1)``; ``Z_t | x0 ~ N((c(t) x0, 0), Sigma(t))``.

Two coefficient recipes (docs/design.md 'Coefficient recipes'):
* ``exact``: float64 throughout; the FVP X-row of Sigma by nested Gauss-Legendre quadrature of the
  variation-of-constants formula (~1e-12 against a DOP853 solve at rtol 1e-13), FVE in closed form.
* ``official``: the numerical recipe of the authors' code, so that their
  checkpoints see the coefficients they were trained with: gamma, A, b and the
  weight solve in float32, the FVP X-row from scipy's RK45 at default
  tolerances on [0, 1] (solved, normalised by VarX(1), solved again).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch
from scipy.integrate import solve_ivp

from gfdm_fast import mafbm

TimeLike = Union[float, Sequence[float], np.ndarray, torch.Tensor]   # one time or many, in [0, T]

DYNAMICS = ("fvp", "fve")
RECIPES = ("exact", "official")
PD_EPS = 1e-4            # regulariser of the Y block: Sreg = Sigma + diag(0, pd_eps e^{-2 gamma t})
FVP_BETA = (0.1, 20.0)   # beta_min, beta_max
FVE_SIGMA = (0.01, 50.0)  # sigma_min, sigma_max

# Panel grid of the FVP quadrature: geometric near t = 0 (g = sqrt(beta) has a
# branch point at t = -beta_min/(beta_max-beta_min) = -0.005), uniform after.
_GL_NODES = 8
_GL_X, _GL_W = np.polynomial.legendre.leggauss(_GL_NODES)


@dataclass(frozen=True)
class MarginalStats:
    """Statistics of the regularised Gaussian ``Sreg(t)`` that the model sees (per time point)."""
    cov: torch.Tensor         # (n, K+1, K+1) Sreg
    alpha: torch.Tensor       # (n, K) Sreg_yy^-1 Sreg_yx
    var_x: torch.Tensor       # (n,) Sreg_xx
    var_c: torch.Tensor       # (n,) alpha . Sreg_yx
    sigma_c: torch.Tensor     # (n,) sqrt(var_x - var_c)
    mean_scale: torch.Tensor  # (n,) c(t)


def _as_t(t, T):
    """Times as a 1-D float64 numpy array inside [0, T]."""
    if isinstance(t, torch.Tensor):
        t = t.detach().to("cpu", torch.float64).numpy()
    arr = np.ascontiguousarray(np.atleast_1d(np.asarray(t, dtype=np.float64)))   # reversed views too (torch)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if not np.all(np.isfinite(arr)) or arr.min(initial=0.0) < 0.0 or arr.max(initial=0.0) > T:
        raise ValueError(f"t must lie in [0, T] = [0, {T}], got values in [{arr.min()}, {arr.max()}]")
    return arr


def _phi1(x):
    """expm1(x)/x, stable at x = 0."""
    x = np.asarray(x, dtype=np.float64)
    small = np.abs(x) < 1e-8
    safe = np.where(small, 1.0, x)
    return np.where(small, 1.0 + x / 2, np.expm1(safe) / safe)


class Dynamics:
    """A GFDM forward process; all public methods take times in [0, T] and return float64 tensors."""

    name = None

    def __init__(self, *, hurst: float, num_aug: int, gamma_max: float = 20.0, T: float = 1.0, norm: bool = True,
                 recipe: str = "exact", pd_eps: float = PD_EPS) -> None:
        self.hurst = mafbm.check_hurst(hurst)
        self.num_aug = mafbm.check_num_aug(num_aug)
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
        if not (T > 0):
            raise ValueError(f"T must be > 0, got {T!r}")
        self.gamma_max, self.T, self.norm, self.recipe = float(gamma_max), float(T), bool(norm), recipe
        self.pd_eps = float(pd_eps)
        K = self.num_aug
        self._ode = None
        if K == 0:
            gamma, omega = np.zeros(0), np.ones(0)
        elif recipe == "official":
            gamma, omega32 = mafbm.official_weights(K, self.hurst, self.gamma_max, self.T)
            omega = omega32.astype(np.float64)
        else:
            gamma = mafbm.gamma_grid(K, self.gamma_max)
            omega, _ = mafbm.optimal_weights(gamma, self.hurst, self.T)
        self._set_weights(gamma, omega)
        if K > 0 and self.norm:
            var_T = float(self._xrow(np.array([self.T]))[0][0])
            scale = self._terminal_scale(var_T)
            omega = omega * scale
            if recipe == "official":  # the official code keeps omega in float32
                omega = omega.astype(np.float32).astype(np.float64)
            self._set_weights(gamma, omega)

    # -- construction helpers -------------------------------------------------
    def _set_weights(self, gamma, omega):
        self._gamma = np.asarray(gamma, np.float64)
        self._omega = np.asarray(omega, np.float64)
        self._sum_omega = float(self._omega.sum()) if self.num_aug else 1.0
        self._ode = None
        if self.num_aug and self.recipe == "official" and self.name == "fvp":
            self._ode = self._solve_official_ode()

    @property
    def gamma(self) -> torch.Tensor:
        return torch.from_numpy(self._gamma.copy())

    @property
    def omega(self) -> torch.Tensor:
        return torch.from_numpy(self._omega.copy())

    @property
    def sum_omega(self) -> float:
        return self._sum_omega

    def config(self) -> dict:
        """The settings that identify this process (what checkpoints record)."""
        return {"name": self.name, "hurst": self.hurst, "num_aug": self.num_aug,
                "gamma_max": self.gamma_max, "T": self.T, "norm": self.norm, "recipe": self.recipe}

    def __repr__(self):
        return (f"{type(self).__name__}(hurst={self.hurst}, num_aug={self.num_aug}, gamma_max={self.gamma_max}, "
                f"T={self.T}, norm={self.norm}, recipe={self.recipe!r})")

    # -- schedule (numpy, float64) ---------------------------------------------
    def _mu(self, t):
        raise NotImplementedError

    def _g(self, t):
        raise NotImplementedError

    def _log_c(self, t):
        raise NotImplementedError

    def _brown_var(self, t):
        raise NotImplementedError

    def _var0(self):
        """Var X at t = 0 (FVE carries s0^2, docs/design.md 'Forward dynamics')."""
        return 0.0

    def _terminal_scale(self, var_T):
        raise NotImplementedError

    # -- public schedule -------------------------------------------------------
    def mu(self, t: TimeLike) -> torch.Tensor:
        return torch.from_numpy(self._mu(_as_t(t, self.T)))

    def g(self, t: TimeLike) -> torch.Tensor:
        return torch.from_numpy(self._g(_as_t(t, self.T)))

    def mean_scale(self, t: TimeLike) -> torch.Tensor:
        return torch.from_numpy(np.exp(self._log_c(_as_t(t, self.T))))

    def F(self, t: TimeLike) -> torch.Tensor:
        """Drift matrix, (n, K+1, K+1)."""
        t = _as_t(t, self.T)
        K = self.num_aug
        F = np.zeros((t.size, K + 1, K + 1))
        F[:, 0, 0] = self._mu(t)
        if K:
            F[:, 0, 1:] = -self._g(t)[:, None] * (self._omega * self._gamma)[None, :]
            F[:, range(1, K + 1), range(1, K + 1)] = -self._gamma[None, :]
        return torch.from_numpy(F)

    def G(self, t: TimeLike) -> torch.Tensor:
        """Diffusion vector, (n, K+1)."""
        t = _as_t(t, self.T)
        G = np.ones((t.size, self.num_aug + 1))
        G[:, 0] = self._g(t) * self._sum_omega
        return torch.from_numpy(G)

    def _breakdown(self, what):
        """The message for statistics that are not a valid Gaussian (ill-conditioned weights at large K)."""
        fix = ("use recipe='exact' (float64): the official code's float32 arithmetic breaks down here too"
               if self.recipe == "official" else "use fewer augmenting processes (num_aug)")
        return (f"{self.name.upper()} H={self.hurst} K={self.num_aug} ({self.recipe} recipe): {what}; "
                f"the MA-fBM weights are too ill-conditioned at this K: {fix}")

    def cov(self, t: TimeLike) -> torch.Tensor:
        """Sigma(t) of Z given x0, no regularisation, (n, K+1, K+1) float64."""
        return torch.from_numpy(self._cov(_as_t(t, self.T)))

    def marginal_stats(self, t: TimeLike) -> MarginalStats:
        """Regularised statistics (docs/design.md, 'Conditional statistics'), vectorised over t."""
        t = _as_t(t, self.T)
        uniq, inverse = np.unique(t, return_inverse=True)
        if uniq.size < t.size:  # e.g. one time per batch element, all equal
            st = self.marginal_stats(uniq)
            idx = torch.from_numpy(inverse)
            return MarginalStats(*(a[idx] for a in (st.cov, st.alpha, st.var_x, st.var_c, st.sigma_c, st.mean_scale)))
        S = self._cov(t)
        K = self.num_aug
        if K:
            S[:, range(1, K + 1), range(1, K + 1)] += self._regulariser(t)
            try:
                alpha = np.linalg.solve(S[:, 1:, 1:], S[:, 1:, 0:1])[..., 0]
            except np.linalg.LinAlgError:
                raise ValueError(self._breakdown("its Y covariance is singular")) from None
            var_c = np.einsum("nk,nk->n", alpha, S[:, 1:, 0])
        else:
            alpha = np.zeros((t.size, 0))
            var_c = np.zeros(t.size)
        var_x = S[:, 0, 0].copy()
        bad = ~np.isfinite(var_x - var_c) | (var_x - var_c < 0) | ~np.isfinite(alpha).all(axis=1)
        if bad.any():
            raise ValueError(self._breakdown(f"the conditional variance var_x - var_c is "
                                             f"{var_x[bad][0] - var_c[bad][0]:.3g} at t = {t[bad][0]:.4g}"))
        sigma_c = np.sqrt(var_x - var_c)
        c = np.exp(self._log_c(t))
        return MarginalStats(*(torch.from_numpy(a) for a in (S, alpha, var_x, var_c, sigma_c, c)))

    # -- covariance ------------------------------------------------------------
    def _yy(self, t):
        if self.recipe == "official":
            # the official Y block and regulariser are float32 torch (visible at t < 1e-3)
            g32, t32 = torch.from_numpy(self._gamma).float(), torch.from_numpy(t).float()
            s32 = g32[:, None] + g32[None, :]
            return ((1 - torch.exp(-t32[:, None, None] * s32)) / s32).double().numpy()
        s = self._gamma[:, None] + self._gamma[None, :]
        return -np.expm1(-s[None] * t[:, None, None]) / s[None]

    def _regulariser(self, t):
        """pd_eps e^{-2 gamma_k t}, (n, K)."""
        if self.recipe == "official":
            g32, t32 = torch.from_numpy(self._gamma).float(), torch.from_numpy(t).float()
            return (self.pd_eps * torch.exp(-2 * g32 * t32[:, None])).double().numpy()
        return self.pd_eps * np.exp(-2.0 * self._gamma[None, :] * t[:, None])

    def _cov(self, t):
        K = self.num_aug
        S = np.zeros((t.size, K + 1, K + 1))
        if K == 0:
            S[:, 0, 0] = self._brown_var(t)
            return S
        var_x, xy = self._xrow(t)
        S[:, 0, 0] = var_x
        S[:, 0, 1:] = xy
        S[:, 1:, 0] = xy
        S[:, 1:, 1:] = self._yy(t)
        return S

    def _xrow(self, t):
        """(Var X(t), Cov(X, Y)(t)) for the current weights."""
        if self._ode is not None:
            sol = self._ode.sol(t)  # (K+1, n)
            return sol[0], sol[1:].T
        return self._xrow_exact(t)

    def _xy_forcing(self, u):
        """f_j(u) = g(u) (sum omega - sum_m omega_m gamma_m Cov(Y_m, Y_j)(u)), shape u.shape + (K,)."""
        gm, wg = self._gamma, self._omega * self._gamma
        s = gm[:, None] + gm[None, :]                      # (m, j)
        W = wg[:, None] / s                                 # (m, j)
        e = np.exp(-gm * u[..., None])                      # (..., m)
        decay = (e @ W) * e                                 # sum_m W_mj e^{-g_m u} e^{-g_j u}
        return self._g(u)[..., None] * (self._sum_omega - W.sum(0) + decay)

    def _advance(self, t0, xx0, xy0, t1):
        """Exact state (Var X, Cov(X,Y)) at t1 from its value at t0 <= t1 (arrays over n).

        Variation of constants with Gauss-Legendre on [t0, t1] (outer) and on
        [t0, u] for every outer node u (inner): Cov(X,Y_j) at u is
        ``c(u)/c(t0) e^{-g_j (u-t0)} xy0_j + int_t0^u c(u)/c(v) e^{-g_j (u-v)} f_j(v) dv``.
        """
        gm, wg, sw = self._gamma, self._omega * self._gamma, self._sum_omega
        h = (t1 - t0)[:, None]                                   # (n, 1)
        u = t0[:, None] + 0.5 * h * (_GL_X + 1.0)                # (n, p) outer nodes
        wu = 0.5 * h * _GL_W                                      # (n, p)
        hv = (u - t0[:, None])[..., None]                        # (n, p, 1)
        v = t0[:, None, None] + 0.5 * hv * (_GL_X + 1.0)         # (n, p, q) inner nodes
        wv = 0.5 * hv * _GL_W
        lc_u, lc_v = self._log_c(u), self._log_c(v)
        f = self._xy_forcing(v)                                   # (n, p, q, K)
        kern = np.exp((lc_u[..., None] - lc_v)[..., None] - gm * (u[..., None, None] - v[..., None]))
        xy_u = np.einsum("npq,npqk->npk", wv, kern * f)
        xy_u += np.exp(lc_u - self._log_c(t0)[:, None])[..., None] * np.exp(-gm * hv) * xy0[:, None, :]
        g_u = self._g(u)
        integrand = -2.0 * g_u * (xy_u @ wg) + (g_u * sw) ** 2
        lc1 = self._log_c(t1)
        xx1 = (np.exp(2 * (lc1 - self._log_c(t0))) * xx0
               + np.einsum("np,np->n", wu, np.exp(2 * (lc1[:, None] - lc_u)) * integrand))
        # Cov(X, Y) at t1: same inner formula with u = t1
        v1 = u                                                   # nodes on [t0, t1]
        f1 = self._xy_forcing(v1)                                # (n, p, K)
        kern1 = np.exp((lc1[:, None] - lc_u)[..., None] - gm * (t1[:, None, None] - v1[..., None]))
        xy1 = np.einsum("np,npk->nk", wu, kern1 * f1)
        xy1 += np.exp(lc1 - self._log_c(t0))[:, None] * np.exp(-gm * (t1 - t0)[:, None]) * xy0
        return xx1, xy1

    def _panel_grid(self):
        geo = self.T * np.geomspace(1e-7, 1.0 / 64, 24)
        uni = np.linspace(self.T / 64, self.T, 64)[1:]
        return np.concatenate([[0.0], geo, uni])

    def _xrow_exact(self, t):
        K = self.num_aug
        # state at the panel boundaries (cached per weights)
        key = self._omega.tobytes()
        if getattr(self, "_panel_cache", (None,))[0] != key:
            tau = self._panel_grid()
            xx, xy = np.zeros(tau.size), np.zeros((tau.size, K))
            xx[0] = self._var0()
            for i in range(tau.size - 1):
                a, b = self._advance(tau[i:i + 1], xx[i:i + 1], xy[i:i + 1], tau[i + 1:i + 2])
                xx[i + 1], xy[i + 1] = a[0], b[0]
            self._panel_cache = (key, tau, xx, xy)
        _, tau, xx, xy = self._panel_cache
        i = np.clip(np.searchsorted(tau, t, side="right") - 1, 0, tau.size - 2)
        return self._advance(tau[i], xx[i], xy[i], t)

    def _xrow_rhs(self, t, S):
        """d/dt (Var X, Cov(X, Y)) = the X row of F Sigma + Sigma F^T + G G^T, Y block in closed form."""
        gm, wg, sw = self._gamma, self._omega * self._gamma, self._sum_omega
        tt = np.array([t])
        mu, g = self._mu(tt)[0], self._g(tt)[0]
        yy = self._yy(tt)[0]
        d = np.empty(self.num_aug + 1)
        d[0] = 2 * mu * S[0] - 2 * g * (wg @ S[1:]) + (sw * g) ** 2
        d[1:] = (mu - gm) * S[1:] + g * (sw - yy @ wg)
        return d

    def _solve_official_ode(self):
        """The official code's RK45 solve of the X-row ODE on [0, 1] (default tolerances, dense output)."""
        return solve_ivp(self._xrow_rhs, (0.0, 1.0), np.zeros(self.num_aug + 1), dense_output=True)


class FVP(Dynamics):
    """Fractional variance preserving dynamics: mu = -beta/2, g = sqrt(beta), beta linear in t."""
    name = "fvp"

    def _beta(self, t):
        b0, b1 = FVP_BETA
        return b0 + t * (b1 - b0)

    def _mu(self, t):
        return -0.5 * self._beta(t)

    def _g(self, t):
        return np.sqrt(self._beta(t))

    def _log_c(self, t):
        b0, b1 = FVP_BETA
        return -0.25 * t ** 2 * (b1 - b0) - 0.5 * t * b0

    def _brown_var(self, t):
        b0, b1 = FVP_BETA
        return -np.expm1(-0.5 * t ** 2 * (b1 - b0) - t * b0)

    def _terminal_scale(self, var_T):
        return 1.0 / math.sqrt(var_T)


class FVE(Dynamics):
    """Fractional variance exploding dynamics: mu = 0, g = a r^t, r = s1/s0, a = s0 sqrt(2 ln r)."""
    name = "fve"

    @property
    def _lam(self):
        return math.log(FVE_SIGMA[1] / FVE_SIGMA[0])

    @property
    def _a(self):
        return FVE_SIGMA[0] * math.sqrt(2.0 * self._lam)

    def _mu(self, t):
        return np.zeros_like(t)

    def _g(self, t):
        return self._a * np.exp(self._lam * t)

    def _log_c(self, t):
        return np.zeros_like(t)

    def _brown_var(self, t):
        return FVE_SIGMA[0] ** 2 * np.exp(2.0 * self._lam * t)

    def _var0(self):
        return FVE_SIGMA[0] ** 2

    def _terminal_scale(self, var_T):
        return FVE_SIGMA[1] / math.sqrt(var_T)

    def _xrow(self, t):
        """Closed form (integrals of exponentials), with phi1(x) = expm1(x)/x for stability.

        Cov(X,Y_j)(t) = a [C_j t e^{-g_j t} phi1((lam+g_j) t) + sum_m W_mj t e^{-g_j t} phi1((lam-g_m) t)],
        W_mj = w_m g_m/(g_m+g_j), C_j = sum(w) - sum_m W_mj; Var X integrates g^2 sum(w)^2 and
        -2 g sum_m w_m g_m Cov(X,Y_m) in the same way.
        """
        gm, w, lam, a, sw = self._gamma, self._omega, self._lam, self._a, self._sum_omega
        wg = w * gm
        s = gm[:, None] + gm[None, :]
        W = wg[:, None] / s                      # (m, j)
        C = sw - W.sum(0)                        # (j,)
        tt = t[:, None]
        ej = np.exp(-gm * tt)                    # (n, j)
        A1 = tt * ej * _phi1((lam + gm) * tt)    # (n, j)
        B1 = tt[..., None] * ej[:, None, :] * _phi1((lam - gm)[None, :, None] * tt[..., None])  # (n, m, j)
        xy = a * (C * A1 + np.einsum("mj,nmj->nj", W, B1))
        # int_0^t e^{lam u} Cov(X, Y_m)(u) du, term by term
        P2 = tt * _phi1(2 * lam * tt)                                # int e^{2 lam u}
        Pm = tt * _phi1((lam - gm) * tt)                             # int e^{(lam-g_m) u}, (n, m)
        int_C = (P2 - Pm) / (lam + gm)                               # C_m part, (n, m)
        x1 = ((2 * lam - gm[:, None] - gm[None, :]) * tt[..., None])  # (n, m, l): exponent of the W_lm part
        x2 = ((lam - gm)[:, None] * tt[..., None]) * np.ones_like(x1)
        diff = x1 - x2                                               # (lam - g_l) t
        close = np.abs(diff) < 1e-6
        dd = np.where(close, _phi1_prime(0.5 * (x1 + x2)), (_phi1(x1) - _phi1(x2)) / np.where(close, 1.0, diff))
        int_W = tt[..., None] ** 2 * dd                              # (n, m, l)
        cross = int_C * C[None, :] + np.einsum("lm,nml->nm", W, int_W)
        var_x = self._var0() + a ** 2 * (sw ** 2 * P2[:, 0] - 2.0 * cross @ wg)
        return var_x, xy


def _phi1_prime(x):
    """d/dx expm1(x)/x."""
    x = np.asarray(x, dtype=np.float64)
    small = np.abs(x) < 1e-4
    safe = np.where(small, 1.0, x)
    return np.where(small, 0.5 + x / 3, (np.exp(safe) * safe - np.expm1(safe)) / safe ** 2)


def tight_xrow(dyn: Dynamics, t: TimeLike, rtol: float = 1e-13) -> np.ndarray:
    """Validation only: (Var X, Cov(X, Y)) at t, shape (K+1, n), from a DOP853 solve of the X-row ODE."""
    y0 = np.zeros(dyn.num_aug + 1)
    y0[0] = dyn._var0()
    return solve_ivp(dyn._xrow_rhs, (0.0, dyn.T), y0, method="DOP853", rtol=rtol, atol=1e-22,
                     t_eval=np.asarray(t, np.float64)).y


def make_dynamics(name: str, *, hurst: float, num_aug: int, gamma_max: float = 20.0, T: float = 1.0, norm: bool = True,
                  recipe: str = "exact", pd_eps: float = PD_EPS) -> Dynamics:
    """Build a GFDM forward process: ``name`` in {'fvp', 'fve'}; num_aug = 0 is the plain VP/VE SDE."""
    classes = {"fvp": FVP, "fve": FVE}
    key = str(name).lower()
    if key not in classes:
        raise ValueError(f"unknown dynamics {name!r}: choose one of {', '.join(DYNAMICS)}")
    return classes[key](hurst=hurst, num_aug=num_aug, gamma_max=gamma_max, T=T, norm=norm, recipe=recipe, pd_eps=pd_eps)
