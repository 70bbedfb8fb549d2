"""Pure-PyTorch reference of GFDM training and sampling, in the official layout.

The augmented axis is LAST: ``z`` is (B, C, H, W, K+1) with X first, or
(B, C, H, W) when K = 0. Works in float32 or float64 (the dtype of the inputs);
coefficients come from ``Dynamics`` in float64 and are cast. This is the
oracle every fast path is tested against: clarity over speed.
"""
import torch

from gfdm_fast import layout
from gfdm_fast.dynamics import Dynamics

MODES = ("sde", "ode")


def _stats(dyn, t, dtype, device):
    """Regularised statistics at times t (1-D tensor) as tensors of ``dtype`` on ``device``."""
    st = dyn.marginal_stats(t)
    fields = (st.cov, st.alpha, st.var_x, st.var_c, st.sigma_c, st.mean_scale)
    return type(st)(*(a.to(device=device, dtype=dtype) for a in fields))


def _per_sample(v, ndim):
    """(B,) -> (B, 1, 1, ...) with ``ndim`` trailing singleton axes."""
    return v.reshape(v.shape[0], *([1] * ndim))


def _check_layout(dyn, z):
    K = dyn.num_aug
    if K == 0 and z.dim() != 4:
        raise ValueError(f"num_aug = 0 expects z of shape (B, C, H, W), got {tuple(z.shape)}")
    if K > 0 and (z.dim() != 5 or z.shape[-1] != K + 1):
        raise ValueError(f"num_aug = {K} expects z of shape (B, C, H, W, {K + 1}) (X first), got {tuple(z.shape)}")


def _chol(S):
    """Cholesky factor of the (n, K+1, K+1) float64 Sreg."""
    return torch.linalg.cholesky(S.to(torch.float64))


def prior_sample(dyn: Dynamics, shape, generator=None, *, dtype=torch.float32, device="cpu"):
    """z_T ~ N(0, Sreg(T)) per pixel; ``shape`` = (B, C, H, W); returns the official layout."""
    K = dyn.num_aug
    st = dyn.marginal_stats([dyn.T])
    if K == 0:
        std = st.sigma_c[0].item()
        return torch.randn(*shape, generator=generator, dtype=dtype, device=device) * std
    L = _chol(st.cov[0]).to(device=device, dtype=dtype)
    n = torch.randn(*shape, K + 1, generator=generator, dtype=dtype, device=device)
    return n @ L.T


def training_pair(dyn: Dynamics, x0, t, *, form="reduced", generator=None, z=None, eps=None):
    """Network input and target of augmented score matching (docs/design.md 'Training loss').

    ``form="joint"``: the official draw ``(xi, eta) ~ N(0, Sreg(t))`` per pixel
    (or the given ``z`` in the official layout), input ``c x0 + xi - alpha.eta``,
    target ``(xi - alpha.eta) / sigma_c``.
    ``form="reduced"``: ``x_in = c x0 + sigma_c eps``, target ``eps ~ N(0, 1)``
    (or the given ``eps``): the same distribution, one normal per pixel.
    """
    B = x0.shape[0]
    t = torch.as_tensor(t).reshape(-1)
    if t.numel() != B:
        raise ValueError(f"t needs one time per sample: got {t.numel()} for a batch of {B}")
    st = _stats(dyn, t, x0.dtype, x0.device)
    c = _per_sample(st.mean_scale, x0.dim() - 1)
    sig = _per_sample(st.sigma_c, x0.dim() - 1)
    if form == "reduced":
        if eps is None:
            eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        return c * x0 + sig * eps, eps
    if form != "joint":
        raise ValueError(f"unknown form {form!r}: choose 'reduced' or 'joint'")
    K = dyn.num_aug
    if z is None:
        if K == 0:
            z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device) * sig
        else:
            L = _chol(st.cov).to(x0.dtype)                                   # (B, K+1, K+1)
            n = torch.randn(*x0.shape, K + 1, generator=generator, dtype=x0.dtype, device=x0.device)
            z = torch.einsum("bij,b...j->b...i", L, n)
    if K == 0:
        resid = z
    else:
        alpha = st.alpha.reshape(B, *([1] * (x0.dim() - 1)), K)
        resid = z[..., 0] - (alpha * z[..., 1:]).sum(-1)
    return c * x0 + resid, resid / sig


def augmented_score(model, dyn: Dynamics, z, t, labels=None, time_weight=999.0):
    """Score of the regularised Gaussian from an epsilon network (docs/design.md 'Score of the augmented state').

    ``e = model(X - alpha.Y, time_weight t, labels)``, ``s_x = -e / sigma_c``,
    ``score = (s_x, -alpha s_x) + (0, -Sreg_yy^-1 Y)``.
    """
    _check_layout(dyn, z)
    B = z.shape[0]
    t = torch.as_tensor(t, device=z.device).reshape(-1)
    if t.numel() == 1 and B > 1:
        t = t.expand(B)
    st = _stats(dyn, t, z.dtype, z.device)
    s = (time_weight * t).to(z.dtype)
    if dyn.num_aug == 0:
        return -model(z, s, labels) / _per_sample(st.sigma_c, 3)
    alpha = st.alpha[:, None, None, None, :]                                  # (B,1,1,1,K)
    Y = z[..., 1:]
    x_in = z[..., 0] - (alpha * Y).sum(-1)
    s_x = -model(x_in, s, labels) / _per_sample(st.sigma_c, 3)
    Syy_inv_Y = torch.linalg.solve(st.cov[:, 1:, 1:], Y.permute(0, 4, 1, 2, 3).reshape(B, dyn.num_aug, -1))
    Syy_inv_Y = Syy_inv_Y.reshape(B, dyn.num_aug, *Y.shape[1:4]).permute(0, 2, 3, 4, 1)
    return torch.cat([s_x[..., None], -alpha * s_x[..., None] - Syy_inv_Y], dim=-1)


def time_grid(dyn: Dynamics, steps, eps=1e-3):
    """The official grid ``linspace(T, eps, steps)`` in float32 and its step ``dt = t_0 - t_1``."""
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    if not (0.0 < eps < dyn.T):
        raise ValueError(f"eps must lie in (0, T), got {eps}")
    t = torch.linspace(dyn.T, eps, steps, dtype=torch.float32)
    return t, (t[0] - t[1]).item()


def sample_em(model, dyn: Dynamics, z_T, noise, *, steps, eps=1e-3, mode="sde", labels=None, time_weight=999.0):
    """The official reverse Euler-Maruyama loop (docs/design.md 'Reverse sampling: Euler-Maruyama').

    Step n at t_n: ``drift = F Z - m G (G . score)`` (m = 1 sde, 1/2 ode),
    ``Z <- Z - drift dt + G sqrt(dt) noise[:, n+1]`` with no noise on the last
    step nor for ode. ``noise`` is (B, steps+1, C, H, W); returns the final state.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose 'sde' or 'ode'")
    _check_layout(dyn, z_T)
    B = z_T.shape[0]
    if noise is not None and (noise.shape[0] != B or noise.shape[1] < steps or noise.shape[2:] != z_T.shape[1:4]):
        chw = ", ".join(map(str, z_T.shape[1:4]))
        raise ValueError(f"noise must be (B, steps+1, C, H, W) = ({B}, {steps + 1}, {chw}), "
                         f"got {tuple(noise.shape)}")
    t_grid, dt = time_grid(dyn, steps, eps)
    m = 1.0 if mode == "sde" else 0.5
    K = dyn.num_aug
    F_all = dyn.F(t_grid).to(z_T.device, z_T.dtype)      # (N, K+1, K+1)
    G_all = dyn.G(t_grid).to(z_T.device, z_T.dtype)      # (N, K+1)
    z = z_T.clone()
    sqrt_dt = dt ** 0.5
    for n in range(steps):
        t = t_grid[n].expand(B)
        score = augmented_score(model, dyn, z, t, labels, time_weight)
        if K == 0:
            f, g = F_all[n, 0, 0], G_all[n, 0]
            drift = f * z - m * g * g * score
            z = z - drift * dt
            if mode == "sde" and n < steps - 1:
                z = z + g * sqrt_dt * noise[:, n + 1]
            continue
        F, G = F_all[n], G_all[n]
        drift = z @ F.T - m * G * (score @ G)[..., None]
        z = z - drift * dt
        if mode == "sde" and n < steps - 1:
            z = z + G * (sqrt_dt * noise[:, n + 1])[..., None]
    return z


# ---- planar twins of the fused ops (state (K+1, B, C, H, W), X first) -----------------------------
# These define what every backend of gfdm_fast.ops computes; see gfdm_fast.schedule for the row layout.

def _row(table, step):
    """Row ``step`` of a step table without a host sync (step: int or 0-d integer tensor)."""
    step = torch.as_tensor(step, device=table.device).reshape(1).to(torch.int64)
    return table.index_select(0, step)[0]


def em_step_planar(z, e, x_in, table, step, seeds=None, noise=None):
    """One fused Euler-Maruyama step in place: z (K+1, B, C, H, W) <- update, x_in <- next network input.

    ``noise`` (B, C, H, W) overrides the Philox draw (stream 0, counter step) from ``seeds`` (B,).
    """
    from gfdm_fast.philox import philox_normal
    K = z.shape[0] - 1
    r = _row(table, step).to(z.dtype)
    X, Y = z[0], z[1:]
    o = layout.EM_FIXED
    b, a_y, q, a_next = (r[o + i * K:o + (i + 1) * K].reshape(K, 1, 1, 1, 1) for i in range(4))
    gs = r[layout.COL_U] * e - (q * Y).sum(0)
    if noise is None:
        noise = philox_normal(seeds, step, layout.STREAM_EM, X[0].numel()).reshape(X.shape).to(z.dtype)
    Xn = r[layout.COL_AX] * X + (b * Y).sum(0) + r[layout.COL_CG0] * gs + r[layout.COL_NX] * noise
    Yn = a_y * Y + r[layout.COL_C] * gs + r[layout.COL_NY] * noise
    z[0].copy_(Xn)
    z[1:].copy_(Yn)
    x_in.copy_(Xn - (a_next * Yn).sum(0))


def prior_planar(z, x_in, prior, seeds=None, noise=None):
    """z_T = L xi per pixel (xi: Philox stream 1, component j for Z_j, or ``noise`` (K+1, B, C, H, W)),
    x_in = X - alpha_0 . Y."""
    from gfdm_fast.philox import philox_normal
    K = z.shape[0] - 1
    p = prior.to(z.dtype)
    L = p[:(K + 1) ** 2].reshape(K + 1, K + 1)
    alpha0 = p[(K + 1) ** 2:].reshape(K, 1, 1, 1, 1)
    if noise is None:
        numel = z[0, 0].numel()
        noise = torch.stack([philox_normal(seeds, 0, layout.STREAM_PRIOR, numel, component=j).reshape(z.shape[1:])
                             for j in range(K + 1)]).to(z.dtype)
    zn = torch.einsum("ij,j...->i...", L, noise)
    z.copy_(zn)
    x_in.copy_(zn[0] - (alpha0 * zn[1:]).sum(0))


def noising(x0, mean_scale, sigma_c, seeds=None, step=0, eps=None):
    """Training input ``c x0 + sigma_c eps`` and its target eps (Philox stream 2 unless ``eps`` is given)."""
    from gfdm_fast.philox import philox_normal
    if eps is None:
        eps = philox_normal(seeds, step, layout.STREAM_TRAIN, x0[0].numel()).reshape(x0.shape).to(x0.dtype)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return mean_scale.to(x0.dtype).reshape(shape) * x0 + sigma_c.to(x0.dtype).reshape(shape) * eps, eps


def exp_step_planar(z, e, x_in, hist, table, step, order, seeds=None, noise=None, noisy=False):
    """One exponential-integrator step in place (gfdm_fast.expint row layout).

    ``d = p x_in + q e`` (x_in: the input the network just saw); ``Z' = Phi Z + w_cur d + sum_s w_hist[s] hist[s]
    (+ L xi if noisy)``; then ``hist[step mod (order-1)] = d`` and ``x_in = X' - alpha_next . Y'``.
    ``hist`` is (max(order-1, 1), B, C, H, W); ``noise`` (K+1, B, C, H, W) overrides Philox stream 3.
    """
    from gfdm_fast.philox import philox_normal
    K1 = z.shape[0]
    K, R = K1 - 1, int(order)
    r = _row(table, step).to(z.dtype)
    o_phi, o_w, o_h, o_l, o_a, width = layout.exp_offsets(K, R)
    Phi = r[o_phi:o_w].reshape(K1, K1)
    w_cur = r[o_w:o_h]
    w_hist = r[o_h:o_l].reshape(R - 1, K1)
    L = r[o_l:o_a].reshape(K1, K1)
    a_next = r[o_a:width].reshape(K, 1, 1, 1, 1)
    d = r[0] * x_in + r[1] * e
    zn = torch.einsum("ij,j...->i...", Phi, z) + w_cur.reshape(K1, 1, 1, 1, 1) * d
    for s in range(R - 1):
        zn = zn + w_hist[s].reshape(K1, 1, 1, 1, 1) * hist[s]
    if noisy:
        if noise is None:
            numel = z[0, 0].numel()
            noise = torch.stack([philox_normal(seeds, step, layout.STREAM_EXP, numel, component=j).reshape(z.shape[1:])
                                 for j in range(K1)]).to(z.dtype)
        zn = zn + torch.einsum("ij,j...->i...", L, noise)
    if R > 1:
        slot = torch.as_tensor(step, device=z.device).reshape(1).to(torch.int64) % (R - 1)
        hist.index_copy_(0, slot, d.unsqueeze(0))
    z.copy_(zn)
    x_in.copy_(zn[0] - (a_next * zn[1:]).sum(0))
