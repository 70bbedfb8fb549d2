"""The training loss: augmented score matching in its reduced form (docs/design.md, 'Training loss').

For each image, u ~ U(T_MIN, 1) and eps ~ N(0, 1) come from its Philox key (``seed * 2^32 + global
index``), so the draw does not depend on batching, processes or accumulation; the network sees
``x_in = c(t) x0 + sigma_c(t) eps`` at time ``999 t`` and predicts eps. This equals the official joint
(K+1)-variate draw in distribution (tests/test_train.py) at a fraction of its cost.

How t follows from u (``--time_sampling``):

* ``uniform`` (the official code): t = u.
* ``vp_snr``: t is chosen so that the network's log noise-to-signal ratio ``log(sigma_c / c)`` has the
  distribution plain VP (FVP with K = 0) gives it under uniform t, restricted to the range this dynamics
  reaches. At H = 0.9, K = 3 uniform t spends 51% of the draws where sigma_c / c < 0.1 (VP: 3%), where
  the eps loss is largest and matters least to samples. Only the weighting over noise levels changes:
  the loss at each t, its minimiser and the network's time input are the official ones, so a
  checkpoint samples with any sampler as before. For VP itself ``vp_snr`` is ``uniform``, bit for bit.
"""
import numpy as np
import torch
import torch.nn.functional as F

from gfdm_fast import ops
from gfdm_fast.layout import STREAM_TRAIN
from gfdm_fast.philox import MASK32, philox4x32, uniform_from_bits

T_MIN = 1e-5            # u ~ U(T_MIN, 1)
TIME_WEIGHT = 999.0     # network time = 999 t
TIME_SAMPLING = ("uniform", "vp_snr")
_TABLE = 4097           # points of the vp_snr map (its error in t is ~1e-6, far below float32's)


def sample_seeds(seed, m, batch_size):
    """Philox keys of micro-batch ``m``: ``seed * 2^32 + global image index``."""
    g = m * batch_size + torch.arange(batch_size, dtype=torch.int64)
    return (int(seed) << 32) + g


class TimeMap:
    """u ~ U(T_MIN, 1) -> training time t for ``--time_sampling`` ``how`` (see the module docstring)."""

    def __init__(self, dyn, how="uniform"):
        if how not in TIME_SAMPLING:
            raise ValueError(f"unknown time sampling {how!r}: choose one of {', '.join(TIME_SAMPLING)}")
        self.how = "uniform" if (dyn.name == "fvp" and dyn.num_aug == 0) else how
        if self.how == "uniform":
            return
        from gfdm_fast.dynamics import make_dynamics
        from gfdm_fast.expint import log_nsr
        vp = make_dynamics("fvp", hurst=0.5, num_aug=0, T=dyn.T)
        grid = np.unique(np.concatenate([np.geomspace(T_MIN, dyn.T, _TABLE), np.linspace(T_MIN, dyn.T, _TABLE)]))
        lam = np.maximum.accumulate(log_nsr(dyn, grid))    # increasing in t (flat where it is not)
        lam_vp = log_nsr(vp, grid)                          # strictly increasing
        # the u for which VP's ratio lies inside this dynamics' range; u is rescaled onto [lo, hi]
        lo, hi = np.interp([lam[0], lam[-1]], lam_vp, grid, left=T_MIN, right=dyn.T)
        u = np.linspace(lo, hi, _TABLE)
        self.u = torch.from_numpy((u - lo) / (hi - lo))
        self.t = torch.from_numpy(np.interp(np.interp(u, grid, lam_vp), lam, grid))

    def __call__(self, u):
        """Training times (float64) of the uniform draws ``u`` in [T_MIN, 1]."""
        if self.how == "uniform":
            return u
        v = ((u - T_MIN) / (1.0 - T_MIN)).clamp(0.0, 1.0)
        i = torch.searchsorted(self.u, v).clamp(1, len(self.u) - 1)
        w = (v - self.u[i - 1]) / (self.u[i] - self.u[i - 1])
        return torch.lerp(self.t[i - 1], self.t[i], w)


def draw_times(seeds, time_map=None):
    """Training times per image from its key (Philox stream 2, component 1; eps uses component 0):
    u ~ U(1e-5, 1), mapped by ``time_map`` (a TimeMap; None: t = u, the official draw)."""
    zero = torch.zeros_like(seeds)
    x0, _, _, _ = philox4x32(zero, zero, zero + STREAM_TRAIN, zero + 1, seeds & MASK32, (seeds >> 32) & MASK32)
    u = T_MIN + (1.0 - T_MIN) * uniform_from_bits(x0).to(torch.float64)
    return u if time_map is None else time_map(u)


def reduced_loss(net, dyn, x0, labels, seeds, *, precision="fp32", time_map=None):
    """Mean squared error of ``net``'s epsilon prediction on images ``x0`` noised with their keys ``seeds``."""
    from gfdm_fast.models import autocast
    t = draw_times(seeds, time_map)
    st = dyn.marginal_stats(t)
    f32 = dict(device=x0.device, dtype=torch.float32, non_blocking=True)
    x_in, eps = ops.noising(x0, st.mean_scale.to(**f32), st.sigma_c.to(**f32), seeds.to(x0.device), 0)
    s = (TIME_WEIGHT * t).to(**f32)
    with autocast(x0.device.type, precision):
        e = net(x_in, s, labels)
    return F.mse_loss(e.float(), eps)
