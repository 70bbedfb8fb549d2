"""Step tables: every per-step coefficient of the fused update, computed once in float64.

One contiguous float32 device tensor per (dynamics, grid, mode): the sampling
loop does no host sync, no solve and no scipy call, so a whole step can be
captured in a CUDA graph.

Euler-Maruyama row n (docs/design.md 'Reverse sampling: Euler-Maruyama'), per pixel with network output e:
    gs = u e - q . Y                                  # G . score, with s_x = -e / sigma_c
    X' = a_x X + b . Y + cG0 gs + nx xi
    Y' = a_y * Y + c gs + ny xi
    x_in' = X' - alpha_next . Y'                      # the next network input
with a_x = 1 - dt mu, b_k = dt g omega_k gamma_k, a_y = 1 + dt gamma, c = m dt,
cG0 = c G_0, u = -(G_0 - sum alpha) / sigma_c, q = 1^T Sreg_yy^-1,
nx = G_0 sqrt(dt), ny = sqrt(dt) (0 for ode and on the last step).
Row layout: [a_x, cG0, c, u, nx, ny, b(K), a_y(K), q(K), alpha_next(K)].
"""
from dataclasses import dataclass

import numpy as np
import torch

from gfdm_fast.dynamics import Dynamics
from gfdm_fast.layout import COL_AX, COL_C, COL_CG0, COL_NX, COL_NY, COL_U, EM_FIXED, em_row_width

MODES = ("sde", "ode")


def official_grid(T, eps, steps):
    """``linspace(T, eps, steps)`` in float32 as the official sampler, and dt = t_0 - t_1."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
        raise ValueError(f"steps must be an integer >= 2, got {steps!r}")
    if not (0.0 < eps < T):
        raise ValueError(f"eps must lie in (0, T) = (0, {T}), got {eps!r}")
    t = torch.linspace(T, eps, steps, dtype=torch.float32)
    return t.double().numpy(), float(t[0] - t[1])


@dataclass(frozen=True)
class StepTable:
    """Per-step coefficients on a device, plus what identifies them."""
    table: torch.Tensor      # (N, EM_FIXED + 4K) float32
    t: torch.Tensor          # (N,) float32 times t_n
    s: torch.Tensor          # (N,) float32 network time input time_weight * t_n
    prior: torch.Tensor      # ((K+1)^2 + K,) float32: Cholesky factor of Sreg(T) (row-major), alpha(t_0)
    num_aug: int
    steps: int
    mode: str
    solver: str
    key: tuple               # (dynamics config, eps, time_weight, solver...) for mismatch checks
    order: int = 1           # history length of multistep solvers (exp)

    def __post_init__(self):
        """Every builder's output is checked here, once: a non-finite coefficient would reach the images."""
        bad = [name for name in ("table", "t", "s", "prior") if not bool(torch.isfinite(getattr(self, name)).all())]
        if bad:
            dyn = ", ".join(f"{k}={v}" for k, v in self.key[0]) if isinstance(self.key[0], tuple) else self.key[0]
            raise ValueError(f"the {self.solver} step table of ({dyn}) has non-finite coefficients "
                             f"({', '.join(bad)}); these dynamics cannot be sampled (with the official recipe, "
                             "try recipe='exact')")

    @property
    def device(self):
        return self.table.device

    def to(self, device):
        return StepTable(self.table.to(device), self.t.to(device), self.s.to(device), self.prior.to(device),
                         self.num_aug, self.steps, self.mode, self.solver, self.key, self.order)


def prior_vector(dyn: Dynamics, t0):
    """Cholesky factor L of Sreg(T) (row-major, (K+1)^2) and alpha at the first grid time (K), float64."""
    st = dyn.marginal_stats([dyn.T, t0])
    L = torch.linalg.cholesky(st.cov[0]).numpy()
    return np.concatenate([L.reshape(-1), st.alpha[1].numpy()])


def build_em_table(dyn: Dynamics, steps, *, mode="sde", eps=1e-3, time_weight=999.0, device="cpu", dtype=torch.float32):
    """The Euler-Maruyama step table on the official grid (float64 math, float32 storage by default;
    ``dtype=torch.float64`` gives the float64 oracle that calibrates kernel tolerances)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose 'sde' or 'ode'")
    t, dt = official_grid(dyn.T, eps, steps)
    K = dyn.num_aug
    st = dyn.marginal_stats(t)
    mu, g = dyn.mu(t).numpy(), dyn.g(t).numpy()
    G0 = g * dyn.sum_omega
    m = 1.0 if mode == "sde" else 0.5
    rows = np.zeros((steps, em_row_width(K)))
    rows[:, COL_AX] = 1.0 - dt * mu
    rows[:, COL_C] = m * dt
    rows[:, COL_CG0] = m * dt * G0
    alpha = st.alpha.numpy()
    rows[:, COL_U] = -(G0 - alpha.sum(1)) / st.sigma_c.numpy()
    if mode == "sde":
        rows[:-1, COL_NX] = G0[:-1] * np.sqrt(dt)
        rows[:-1, COL_NY] = np.sqrt(dt)
    if K:
        gm, w = dyn.gamma.numpy(), dyn.omega.numpy()
        o = EM_FIXED
        rows[:, o:o + K] = dt * g[:, None] * (w * gm)[None, :]
        rows[:, o + K:o + 2 * K] = 1.0 + dt * gm[None, :]
        P = np.linalg.inv(st.cov[:, 1:, 1:].numpy())
        rows[:, o + 2 * K:o + 3 * K] = P.sum(1)          # 1^T P (P symmetric)
        rows[:-1, o + 3 * K:o + 4 * K] = alpha[1:]
    key = (tuple(sorted(dyn.config().items())), float(eps), float(time_weight), "em")
    return StepTable(
        table=torch.tensor(rows, dtype=dtype, device=device),
        t=torch.tensor(t, dtype=torch.float32, device=device),
        s=torch.tensor(time_weight * t, dtype=torch.float32, device=device),
        prior=torch.tensor(prior_vector(dyn, t[0]), dtype=dtype, device=device),
        num_aug=K, steps=steps, mode=mode, solver="em", key=key)
