"""Exponential integrator for the augmented linear SDE/ODE (few-step sampling, DEIS-style).

The reverse drift splits into a linear part and the network term:
``dZ/dt = A(t) Z + b(t) e``, ``A = F - m G G^T Q``, ``Q = diag(0, -Sreg_yy^-1)``,
``b = m G (G . (1, -alpha)) / sigma_c`` (m = 1/2 ode, 1 sde). Over a step
t_n -> t_{n+1} < t_n the linear part is integrated exactly (its stiffness:
gamma up to 20 and Sreg_yy^-1 ~ 1/pd_eps), the network output is interpolated
by a Lagrange polynomial through the last ``order`` evaluations (Adams-Bashforth):
    Z_{n+1} = Phi_n Z_n + sum_j w_{n,j} e_{n-j} (+ L_n xi_n for sde),
with Phi_n, w_{n,j} and the noise Cholesky factor L_n (of the exact covariance of
the linear SDE over the step; K+1 normals per pixel) precomputed in float64.

Numerics: reversed time r = t_n - t; the step is cut into ``substeps`` pieces
uniform in log t; on each the generator is frozen at the midpoint and the
augmented matrix exponential ([[A, b l_0, .., b l_p], [0, 0]], Van Loan's block
form for the covariance) is taken exactly, so stiff modes are integrated exactly.

The interpolated quantity is the data prediction ``d = (x_in - sigma_c e) / c``
(``predict="x0"``, DPM-Solver++'s choice: far smoother in t than e; its x_in part
joins the linear operator) or e itself (``predict="eps"``).

Row layout of the table (float32), R = order:
[p, q, Phi ((K+1)^2, row-major), w_cur (K+1), w_hist ((R-1) x (K+1), in ring-slot order),
 L ((K+1)^2, row-major lower), alpha_next (K)], with d = p x_in + q e per pixel.
The d of step n is stored in ring slot n mod (R-1) after use (the slot of the
oldest evaluation), so the kernels index the history without a host sync.
"""
import numpy as np
import torch

from gfdm_fast import schedule as S
from gfdm_fast.dynamics import Dynamics
from gfdm_fast.layout import exp_offsets, exp_row_width

GRIDS = ("adaptive", "blend", "logsnr", "power", "uniform")
# what build_exp_table, Sampler and generate use when a knob is not given: chosen on the oracle test bed at
# 10-20 NFE (issue 13, benchmarks/oracle_error.py); VP (K = 0) and the fractional dynamics (K >= 1) differ in
# the grid that wins.
# VP rho 4 (was 3): W1 x 1e3 at 10 NFE 13.5 vs 16.4 (sde), 5.5 vs 5.8 (ode), and on three narrow modes 9.3 vs
# 11.5 (sde), 5.0 vs 6.2 (ode); at 5 NFE mixed (ode 24 vs 31, sde 54 vs 50, narrow-mode ode 36 vs 27)
# Fractional sde: order 2 (was 3), with the corrector (UniP-1 + UniC), 2 seeds x 32,768 pixels, six dynamics: on
# three narrow modes at 20 NFE worst 15.7 vs 59.8 (order 3's sde rows 37-60: its extrapolation overshoots narrow
# modes), at 10 NFE on the default mixture worst 50.5 vs 81.
# Fractional ode (stop 20): the adaptive grid and order "auto" (adaptive_grid below; Sampler's pilot keeps order 2
# or 3). On the oracle at 10 NFE, FVP H0.9 K2 / K3 / H0.8 K4 / H0.7 K2, W1 x 1e3: log-SNR grid + order 3 51 / 42 /
# 89 / 55, adaptive + auto 7.5-12 (narrow modes 12.7-14.7, where auto keeps order 2: order 3 gave 42-61). On the
# trained MNIST network (FVP H0.9 K3, judge FD at n = 1,000, real-vs-real 9.4) it keeps order 3 (order 2: 31.6) and
# equals the log-SNR grid: 15.4 / 13.4 at 10 / 20 NFE against 15.4 / 12.9.
# Fractional sde (stop 21): the adaptive grid with order 2 and ADAPTIVE_RESIDUAL's share. Without the share it met
# the oracle's 10-NFE target (10.4-11.9, narrow modes 16.8-21.4, against the log-SNR grid's 31-50) but cost the
# MNIST network judge FD (10 NFE 41.8 vs 29.8, 20 NFE 22.8 vs 19.7); with it: RESULTS.md, "sde: the residual share".
MEASURED_DEFAULTS = {
    "vp": dict(order=3, grid="power", rho=4.0, corrector=True, lower_final=False, sigma_data=0.0),
    "fractional": dict(order="auto", grid="adaptive", rho=2.0, corrector=True, lower_final=False, sigma_data=0.5),
}
MODE_DEFAULTS = {("fractional", "sde"): dict(order=2)}   # what differs in one mode


def check_steps(steps):
    """One network evaluation per step: an integer >= 1, or one clear ValueError."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def time_grid(dyn: Dynamics, steps, *, eps=1e-3, grid="logsnr", rho=2.0, mode="ode", sigma_data=0.5,
              activity=None, residual_share=None):
    """steps+1 times from T down to eps (steps network evaluations at t_0..t_{steps-1}).

    ``blend``: the mean of the ``logsnr`` and ``uniform`` grids (the best 20-step ODE error on the oracle);
    ``logsnr``: uniform in log(sigma_c / c) (the noise-to-signal ratio the network sees);
    ``power``: t uniform in t^(1/rho); ``uniform``: linear in t;
    ``adaptive``: follows the network: ``activity`` = (times, |dd/dlog-SNR|[, |d(d - k x_in)/dlog-SNR|]) measured
    by a short pilot run (``Sampler`` makes it; sde needs the third), see ``adaptive_grid``.
    """
    check_steps(steps)
    if grid != "adaptive" and (activity is not None or residual_share is not None):
        raise ValueError(f"activity and residual_share belong to grid 'adaptive', not {grid!r}")
    T = dyn.T
    if grid == "blend":
        return 0.5 * (time_grid(dyn, steps, eps=eps, grid="logsnr") + time_grid(dyn, steps, eps=eps, grid="uniform"))
    if grid == "uniform":
        return np.linspace(T, eps, steps + 1)
    if grid == "power":
        return np.linspace(T ** (1 / rho), eps ** (1 / rho), steps + 1) ** rho
    if grid == "logsnr":
        dense = np.geomspace(eps, T, 4001)[::-1]
        lam = log_nsr(dyn, dense)                             # decreasing as t decreases
        targets = np.linspace(lam[0], lam[-1], steps + 1)
        t = np.interp(targets, lam[::-1], dense[::-1])
        t[0], t[-1] = T, eps
        return t
    if grid == "adaptive":
        if activity is None:
            raise ValueError("grid 'adaptive' follows the network's own output: build it with Sampler(..., "
                             "grid='adaptive') (a short pilot run) or pass activity=(times, rates)")
        if len(activity) not in (2, 3):
            raise ValueError("activity must be (times, rates) or (times, rates, residual rates)")
        return adaptive_grid(dyn, steps, *activity, eps=eps, mode=mode, sigma_data=sigma_data, share=residual_share)
    raise ValueError(f"unknown grid {grid!r}: choose one of {', '.join(GRIDS)}")


# The adaptive grid (issue 13). A step's error is the sample's sensitivity to the data prediction d times the
# interpolation error of d, so the grid equidistributes, per unit log-SNR lambda,
#   (|dX(eps)/dd| (``sensitivity``: the dynamics) x |dd/dlambda| (``activity``: the network, from a pilot run)
#    + FLOOR x max) ** POWER,
# blended with the log-SNR grid's uniform density (share UNIFORM[mode]) and with RESIDUAL[mode] of a grid that
# equidistributes |d(d - k x_in)/dlambda| ** POWER: the change of the part of d that is not the Gaussian
# denoiser k x_in (``gauss_gain``), which the integrator takes exactly. Either factor alone fails a test bed,
# measured at 10 NFE, FVP H0.9 K3 ode (oracle W1 x 1e3 / trained MNIST network's judge FD at n = 1,000): log-SNR
# grid 42 / 15.4; sensitivity alone (tapered below sigma_c/c = 0.01) 10.9 / 134: one step over log-SNR
# 3.1 -> -0.4, where a per-pixel law is still Gaussian but digits take shape. POWER 0.5 and FLOOR 1e-3 against
# 1/3 and 1e-2: three narrow modes, sde, FVP H0.9 K2 / H0.7 K2 23.5 / 24.7 against 64.6 / 57.8. The uniform share
# of 0.3 brings the MNIST ode run from 18.0 to 15.4 at 10 NFE (the oracle's rows stay at 8-15); in sde it takes the
# narrow-mode rows to 22-56, so sde keeps none.
# The residual share (stop 21) is sde's: its sensitivity to d at high noise is small (0.002-0.07 per unit log-SNR
# above lambda = 1, against ~2 where modes resolve: the sde forgets), so without it the MNIST network's first step
# spans lambda 3.1 -> 1.0, and class decisions made there are lost (judge FD 41.8 against the log-SNR grid's 29.8;
# grids whose first step ends at lambda 1.7-2.2, hand-made or blended, gave 26.8-29.7). Per-pixel laws are
# near-Gaussian up there (residual change 0.002 at lambda = 3 against a peak of 0.3), digits are not (1.9 against
# 0.6), so the share moves the first steps for the digits only. It also makes ode's order "auto" a choice of the
# share (AUTO_RESIDUAL_SHARES below).
ADAPTIVE_POWER = 0.5
ADAPTIVE_FLOOR = 0.001
ADAPTIVE_UNIFORM = {"ode": 0.3, "sde": 0.0}
ADAPTIVE_RESIDUAL = {"ode": 0.0, "sde": 0.2}
# ode's order "auto" also tries these shares (Sampler keeps the (order, share) whose pilot images land nearest the
# pilot's fine run): on three narrow modes at 10 NFE, FVP H0.7 K3 / H0.75 K3 ode 44.0 / 32.4 with share 0 and
# 19.5 / 14.8 with 0.2, while FVP H0.9 K3 goes 13.6 -> 23.7 and the MNIST network 15.4 -> 18.7 (both kept at 0 by
# the pilot's comparison); the sde pilot cannot compare paths (its noise), so sde keeps its one share.
AUTO_RESIDUAL_SHARES = (0.0, 0.2)


def residual_shares(mode, sigma_data, auto=False):
    """The residual shares a run may use: ADAPTIVE_RESIDUAL[mode], or with order "auto" AUTO_RESIDUAL_SHARES;
    none (0) when sigma_data = 0: no Gaussian part to tell the residual from d (k = 0, the residual is d)."""
    if not sigma_data > 0:
        return (0.0,)
    return AUTO_RESIDUAL_SHARES if auto else (ADAPTIVE_RESIDUAL[mode],)
_SENSITIVITY_POINTS = 2000
_SENSITIVITY_CACHE = {}


def sensitivity_kernel(dyn: Dynamics, t, *, mode="ode", sigma_data=0.5):
    """e_0^T Phi(t[0], t) b(t) at increasing times ``t``: an error delta of the data prediction d moves the
    sample X at the end time t[0] by -int kernel(tau) delta(tau) dtau (signed, per unit t)."""
    t = np.asarray(t, dtype=np.float64)
    if t.ndim != 1 or t.size < 2 or not np.all(np.diff(t) > 0):
        raise ValueError("t must be an increasing 1-D array of at least two times")
    m = 0.5 if mode == "ode" else 1.0
    _, b, _ = _generator(dyn, t, m, "x0", sigma_data)
    A_mid, _, _ = _generator(dyn, np.sqrt(t[1:] * t[:-1]), m, "x0", sigma_data)
    # Phi(t_{i-1}, t_i) = exp(-A (t_i - t_{i-1})): the reverse run goes from t_i down to t_{i-1}
    E = torch.linalg.matrix_exp(torch.from_numpy(-A_mid * np.diff(t)[:, None, None])).numpy()
    row = np.zeros(dyn.num_aug + 1)
    row[0] = 1.0                                              # e_0^T Phi(t[0], t_i), built up from t[0]
    kernel = np.empty(t.size)
    kernel[0] = row @ b[0]
    for i in range(1, t.size):
        row = row @ E[i - 1]
        kernel[i] = row @ b[i]
    return kernel


def sensitivity(dyn: Dynamics, t, *, mode="ode", sigma_data=0.5):
    """|sensitivity_kernel| per unit log-SNR at increasing times ``t``, and log-SNR there. The fractional
    kernel changes sign and peaks where log-SNR is flat."""
    kernel = sensitivity_kernel(dyn, t, mode=mode, sigma_data=sigma_data)
    lam = log_nsr(dyn, t)
    return np.abs(kernel / np.gradient(lam, np.asarray(t, dtype=np.float64))), lam


def _exact_twin(dyn):
    """``dyn`` with the exact float64 recipe: the official recipe's float32 statistics make d(log-SNR)/dt noisy
    below t ~ 1.5e-3 (the grid's shape only needs the smooth twin; the run keeps its own recipe)."""
    if dyn.recipe == "exact":
        return dyn
    from gfdm_fast.dynamics import make_dynamics
    return make_dynamics(dyn.name, hurst=dyn.hurst, num_aug=dyn.num_aug, gamma_max=dyn.gamma_max, T=dyn.T,
                         norm=dyn.norm, pd_eps=dyn.pd_eps)


def _rates(act_t, act, what):
    act_t, act = np.asarray(act_t, dtype=np.float64).ravel(), np.asarray(act, dtype=np.float64).ravel()
    if act_t.size != act.size or act.size < 2 or not np.all(np.isfinite(act)) or np.any(act < 0) \
            or not np.all(act_t > 0):
        raise ValueError(f"{what} must be two equal-length arrays: times > 0 and finite rates >= 0")
    order = np.argsort(act_t)
    return act_t[order], act[order]


def _cumulative(density, lam):
    """The integral of ``density`` over |d lambda| along the dense times, from 0 at eps."""
    return np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.abs(np.diff(lam)))])


def adaptive_grid(dyn: Dynamics, steps, act_t, act, residual=None, *, eps=1e-3, mode="ode", sigma_data=0.5,
                  share=None):
    """steps+1 times from T to eps that equidistribute (sensitivity x activity) ** ADAPTIVE_POWER per unit
    log-SNR; ``act`` (>= 0) is |dd/dlog-SNR| measured at times ``act_t`` (any order; held constant beyond),
    ``residual`` the same for d - k x_in (``gauss_gain``), blended in with ``share`` (in [0, 1); default and
    the sigma_data = 0 rule: ``residual_shares``)."""
    times = act_t
    act_t, act = _rates(times, act, "activity")
    if not act.max() > 0:
        raise ValueError("the pilot run's data prediction never changed: the network output is constant")
    if share is not None and not 0.0 <= float(share) < 1.0:
        raise ValueError(f"the residual share must lie in [0, 1), got {share!r}")
    share = residual_shares(mode, sigma_data)[0] if share is None or not sigma_data > 0 else float(share)
    if residual is not None:
        res_t, res = _rates(times, residual, "residual activity")
    if share and residual is None:
        raise ValueError(f"the {mode} adaptive grid also follows the non-Gaussian part of d: pass activity=(times, "
                         "rates, residual rates), as Sampler's pilot measures it")
    key = (tuple(sorted(dyn.config().items())), dyn.pd_eps, float(eps), mode, float(sigma_data))
    if key not in _SENSITIVITY_CACHE:     # per process and dynamics: order auto builds four tables on two grids
        dense = np.geomspace(eps, dyn.T, _SENSITIVITY_POINTS)
        _SENSITIVITY_CACHE[key] = (dense, *sensitivity(_exact_twin(dyn), dense, mode=mode, sigma_data=sigma_data))
    dense, kern, lam = _SENSITIVITY_CACHE[key]
    mag = kern * np.interp(np.log(dense), np.log(act_t), act)
    u = _cumulative((mag + ADAPTIVE_FLOOR * mag.max()) ** ADAPTIVE_POWER, lam)
    u_lam = _cumulative(np.ones_like(lam), lam)
    beta = ADAPTIVE_UNIFORM[mode]
    u = (1.0 - beta) * u / u[-1] + beta * u_lam / u_lam[-1]
    if share:
        if res.max() > 0:                 # all zero: Gaussian data, the integrator's own part; nothing to add
            u_res = _cumulative(np.interp(np.log(dense), np.log(res_t), res) ** ADAPTIVE_POWER, lam)
            u = (1.0 - share) * u + share * u_res / u_res[-1]
    u = u + 1e-12 * np.arange(u.size)                        # strictly increasing where log-SNR is flat
    t = np.interp(np.linspace(1.0, 0.0, steps + 1), u / u[-1], dense)
    t[0], t[-1] = dyn.T, eps
    return t


def _generator(dyn, t, m, predict="eps", sigma_data=0.0):
    """A(t) (n, K+1, K+1), b(t) (n, K+1), G(t) (n, K+1) in float64.

    ``predict="x0"``: the network term is written through the data prediction
    ``d = (x_in - sigma_c e) / c``; the x_in part joins the linear operator
    (A += b (1, -alpha)^T / sigma_c, b -> -b c / sigma_c), and d is far smoother in t than e.
    """
    K = dyn.num_aug
    st = dyn.marginal_stats(t)
    F, G = dyn.F(t).numpy(), dyn.G(t).numpy()
    Q = np.zeros_like(F)
    if K:
        Q[:, 1:, 1:] = -np.linalg.inv(st.cov[:, 1:, 1:].numpy())
    A = F - m * np.einsum("ni,nj,njk->nik", G, G, Q)
    one_alpha = np.concatenate([np.ones((t.size, 1)), -st.alpha.numpy()], axis=1)
    sig = st.sigma_c.numpy()
    b = m * G * (np.einsum("ni,ni->n", G, one_alpha) / sig)[:, None]
    if predict == "x0":
        c = st.mean_scale.numpy()
        A = A + b[:, :, None] * one_alpha[:, None, :] / sig[:, None, None]
        b = -b * (c / sig)[:, None]
        # the Gaussian part of the denoiser, k x_in (k = c s^2 / (c^2 s^2 + sigma_c^2), s = sigma_data), joins A too
        A = A + b[:, :, None] * one_alpha[:, None, :] * gauss_gain(c, sig, sigma_data)[:, None, None]
    return A, b, G


def gauss_gain(c, sig, sigma_data):
    """E[x0 | x_in] = k x_in for data N(0, sigma_data^2): the part of the data prediction taken exactly."""
    s2 = float(sigma_data) ** 2
    return c * s2 / (c * c * s2 + sig * sig)


def _lagrange(nodes, x):
    """Lagrange basis polynomials through ``nodes`` evaluated at x: (len(x), len(nodes))."""
    x = np.asarray(x)[:, None]
    out = np.ones((x.shape[0], len(nodes)))
    for j, tj in enumerate(nodes):
        for k, tk in enumerate(nodes):
            if k != j:
                out[:, j] *= (x[:, 0] - tk) / (tj - tk)
    return out


def log_nsr(dyn, t):
    """log(sigma_c / c) at times t (numpy): the log noise-to-signal ratio of the network's input."""
    st = dyn.marginal_stats(np.atleast_1d(np.asarray(t, dtype=np.float64)))
    return np.log(st.sigma_c.numpy() / st.mean_scale.numpy())


def step_coefficients(dyn, t_hi, t_lo, nodes, m, *, substeps=64, noise=False, predict="eps", sigma_data=0.0):
    """Phi(t_lo, t_hi), weights w_j (for e at ``nodes``) and the noise covariance of one step (float64)."""
    K1 = dyn.num_aug + 1
    p = len(nodes)
    # substeps uniform in log t (the statistics vary on the scale of t itself near t = 0)
    edges = np.geomspace(t_hi, t_lo, substeps + 1)
    mids = np.sqrt(edges[:-1] * edges[1:])
    dr = edges[:-1] - edges[1:]                              # positive: reversed time
    A, b, G = _generator(dyn, mids, m, predict, sigma_data)
    ell = _lagrange(nodes, mids)                             # (M, p)
    # reversed time: dZ/dr = -A Z - b e
    n = K1 + p
    aug = np.zeros((substeps, n, n))
    aug[:, :K1, :K1] = -A
    aug[:, :K1, K1:] = -b[:, :, None] * ell[:, None, :]
    E = torch.linalg.matrix_exp(torch.from_numpy(aug * dr[:, None, None])).numpy()
    total = np.eye(n)
    for k in range(substeps):
        total = E[k] @ total
    Phi, W = total[:K1, :K1], total[:K1, K1:]                # W[:, j] multiplies e at nodes[j]
    Sigma = None
    if noise:
        # Van Loan: with Ah = -A, expm([[-Ah, GG^T], [0, Ah^T]] dr) = [[., M12], [0, M22]] and
        # Qk = int_0^dr e^{Ah s} GG^T e^{Ah^T s} ds = M22^T M12.
        vl = np.zeros((substeps, 2 * K1, 2 * K1))
        vl[:, :K1, :K1] = A                                   # = -Ah
        vl[:, :K1, K1:] = G[:, :, None] * G[:, None, :]
        vl[:, K1:, K1:] = -np.transpose(A, (0, 2, 1))         # = Ah^T
        V = torch.linalg.matrix_exp(torch.from_numpy(vl * dr[:, None, None])).numpy()
        Sigma = np.zeros((K1, K1))
        for k in range(substeps):
            Phi_k = E[k][:K1, :K1]
            Qk = V[k][K1:, K1:].T @ V[k][:K1, K1:]
            Sigma = Phi_k @ Sigma @ Phi_k.T + 0.5 * (Qk + Qk.T)
    return Phi, W, Sigma


def _safe_cholesky(S):
    """Cholesky of a PSD matrix that may be numerically singular (stiff modes leave ~0 variance)."""
    S = 0.5 * (S + S.T)
    w, V = np.linalg.eigh(S)
    w = np.clip(w, 0.0, None)
    # QR of (V sqrt(w))^T gives R with R^T R = S; L = R^T is lower triangular
    R = np.linalg.qr((V * np.sqrt(w)).T, mode="r")
    L = R.T
    sign = np.sign(np.diag(L))
    sign[sign == 0] = 1.0
    return L * sign[None, :]


def solver_options(dyn: Dynamics, *, mode="ode", order=None, grid=None, rho=None, corrector=None, lower_final=None,
                   sigma_data=None):
    """The exp solver's knobs with every ``None`` replaced by the default of ``dyn``'s family and ``mode``
    (MEASURED_DEFAULTS, MODE_DEFAULTS: chosen on the oracle test bed and real digits), validated: the one
    place either happens."""
    given = dict(order=order, grid=grid, rho=rho, corrector=corrector, lower_final=lower_final, sigma_data=sigma_data)
    family = "vp" if dyn.num_aug == 0 else "fractional"
    opts = dict(MEASURED_DEFAULTS[family], **MODE_DEFAULTS.get((family, mode), {}))
    opts.update({k: v for k, v in given.items() if v is not None})
    auto = opts["order"] == "auto"
    if auto and order is None and (opts["grid"] != "adaptive" or mode != "ode"):
        opts["order"], auto = 3, False        # the defaulted order on a given fixed grid: order 3 (stop 19's default)
    if auto and (opts["grid"] != "adaptive" or mode != "ode"):
        raise ValueError("order='auto' keeps order 2 or 3 and the grid's residual share by comparing ode runs of "
                         "the adaptive grid's pilot: it needs mode='ode' and grid='adaptive'; give order 1, 2 or 3 "
                         "otherwise")
    opts = dict(order="auto" if auto else _int_order(opts["order"]), grid=opts["grid"], rho=float(opts["rho"]),
                corrector=bool(opts["corrector"]), lower_final=bool(opts["lower_final"]),
                sigma_data=float(opts["sigma_data"]))
    if not opts["sigma_data"] >= 0:
        raise ValueError(f"sigma_data must be >= 0, got {opts['sigma_data']!r}")
    if opts["grid"] not in GRIDS:
        raise ValueError(f"unknown grid {opts['grid']!r}: choose one of {', '.join(GRIDS)}")
    if not opts["rho"] > 0:
        raise ValueError(f"rho must be > 0, got {opts['rho']!r}")
    return opts


def _int_order(order):
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2, 3 or 'auto', got {order!r}")
    return int(order)


def _step_orders(steps, order, lower_final):
    """Interpolation order of each step: warm-up from 1 (history fills), and with ``lower_final`` at most
    ``steps - n`` on the last steps (DPM-Solver's lower-order-final rule: the largest log-SNR steps are last)."""
    orders = [min(order, n + 1) for n in range(steps)]
    if lower_final:
        orders = [min(o, steps - n) for n, o in enumerate(orders)]
    return orders


def build_exp_table(dyn: Dynamics, steps, *, mode="ode", order=None, eps=1e-3, grid=None, rho=None,
                    corrector=None, lower_final=None, sigma_data=None, time_weight=999.0, substeps=None,
                    predict="x0", activity=None, residual_share=None, device="cpu", dtype=torch.float32):
    """The exponential-integrator step table (see module docstring for the row layout).

    ``corrector``: UniPC-style (exponential Adams-Moulton) corrector at no extra NFE. The predictor
    interpolates through ``order - 1`` nodes t_n, ..; once d_{n+1} is known step n is re-done with the
    interpolant through the ``order`` nodes t_{n+1}, t_n, .. (UniP-(p) + UniC: order p + 1); the state is linear in the
    d's, so the correction ``Phi_{n+1} (W_AM - W_AB) d`` is folded into row n+1's weights and the op and its
    ring are unchanged (the network still sees the predicted state, as in UniPC). Needs order >= 2
    (the corrector uses d_n from the ring); the last step is not corrected (that would cost an NFE).
    ``activity`` and ``residual_share``: the adaptive grid's pilot measurements and blend (``adaptive_grid``).
    """
    if mode not in S.MODES:
        raise ValueError(f"unknown mode {mode!r}: choose 'sde' or 'ode'")
    opts = solver_options(dyn, mode=mode, order=order, grid=grid, rho=rho, corrector=corrector, lower_final=lower_final,
                          sigma_data=sigma_data)
    order, grid, rho = opts["order"], opts["grid"], opts["rho"]
    if order == "auto":
        raise ValueError("order='auto' is chosen by Sampler's pilot run (grid='adaptive'); give build_exp_table 1, 2 "
                         "or 3")
    corrector, lower_final, sigma_data = opts["corrector"], opts["lower_final"], opts["sigma_data"]
    if predict not in ("x0", "eps"):
        raise ValueError(f"unknown predict {predict!r}: choose 'x0' or 'eps'")
    t = time_grid(dyn, steps, eps=eps, grid=grid, rho=rho, mode=mode, sigma_data=sigma_data, activity=activity,
                  residual_share=residual_share)
    if substeps is None:                                     # ~640 frozen-generator pieces over the whole run
        substeps = max(8, -(-640 // steps))
    K = dyn.num_aug
    K1 = K + 1
    m = 0.5 if mode == "ode" else 1.0
    R = order
    corrector = bool(corrector) and R > 1
    rows = np.zeros((steps, exp_row_width(K, order)))
    st = dyn.marginal_stats(t)
    alpha = st.alpha.numpy()
    o_P, o_w, o_h, o_L, o_a, _ = exp_offsets(K, R)
    orders = _step_orders(steps, order - 1 if corrector else order, lower_final)   # predictor orders
    carry = {}                                               # correction of the previous step: {d index: (K1,) weights}
    for n in range(steps):
        p = orders[n]
        nodes = t[n - p + 1:n + 1][::-1]                     # t_n, t_{n-1}, ...
        Phi, W, Sigma = step_coefficients(dyn, t[n], t[n + 1], nodes, m, substeps=substeps, noise=(mode == "sde"),
                                          predict=predict, sigma_data=sigma_data)
        if predict == "x0":
            c_n, s_n = st.mean_scale[n].item(), st.sigma_c[n].item()
            rows[n, 0] = 1.0 / c_n - gauss_gain(c_n, s_n, sigma_data)
            rows[n, 1] = -st.sigma_c[n].item() / st.mean_scale[n].item()
        else:
            rows[n, 1] = 1.0
        weights = {n - j: W[:, j] for j in range(p)}         # weight on d_{n-j}
        for i, wc in carry.items():                          # fold the corrector of step n-1 in: Phi_n (W_AM - W_AB)
            weights[i] = weights.get(i, 0.0) + Phi @ wc
        rows[n, o_P:o_w] = Phi.reshape(-1)
        for i, w in weights.items():
            if i == n:
                rows[n, o_w:o_h] = w
            else:                                            # d_i sits in ring slot i mod
                assert n - i <= R - 1, "the ring holds R-1 past evaluations"
                slot = i % (R - 1)
                rows[n, o_h + slot * K1:o_h + (slot + 1) * K1] = w
        if mode == "sde":
            rows[n, o_L:o_a] = _safe_cholesky(Sigma).reshape(-1)
        rows[n, o_a:] = alpha[n + 1]                          # the last row: alpha(eps), for a final denoise
        carry = {}
        if corrector and n + 1 < steps:
            pc = min(R, n + 2)
            am_nodes = t[n + 2 - pc:n + 2][::-1]              # t_{n+1}, t_n, ..
            _, W_am, _ = step_coefficients(dyn, t[n], t[n + 1], am_nodes, m, substeps=substeps, predict=predict,
                                          sigma_data=sigma_data)
            carry = {n + 1 - j: W_am[:, j] for j in range(pc)}
            for j in range(p):
                carry[n - j] = carry.get(n - j, 0.0) - W[:, j]
    key = (tuple(sorted(dyn.config().items())), float(eps), float(time_weight), "exp", order, grid, float(rho), predict,
           corrector, bool(lower_final), float(sigma_data), tuple(t.tolist()) if grid == "adaptive" else None)
    return S.StepTable(
        table=torch.tensor(rows, dtype=dtype, device=device),
        t=torch.tensor(t[:-1], dtype=torch.float32, device=device),
        s=torch.tensor(time_weight * t[:-1], dtype=torch.float32, device=device),
        prior=torch.tensor(S.prior_vector(dyn, t[0]), dtype=dtype, device=device),
        num_aug=K, steps=steps, mode=mode, solver="exp", key=key, order=order)


def denoise_coefficients(dyn: Dynamics, t):
    """Tweedie's final denoising at time t: x0_hat = (x_in - sigma_c e) / c -> (1/c, sigma_c/c)."""
    st = dyn.marginal_stats([t])
    c, s = st.mean_scale.item(), st.sigma_c.item()
    return 1.0 / c, s / c
