"""The training loss: augmented score matching in its reduced form (docs/design.md, 'Training loss').

For each image, t ~ U(T_MIN, 1) and eps ~ N(0, 1) come from its Philox key (``seed * 2^32 + global
index``), so the draw does not depend on batching, processes or accumulation; the network sees
``x_in = c(t) x0 + sigma_c(t) eps`` at time ``999 t`` and predicts eps. This equals the official joint
(K+1)-variate draw in distribution (tests/test_train.py) at a fraction of its cost.
"""
import torch
import torch.nn.functional as F

from gfdm_fast import ops
from gfdm_fast.layout import STREAM_TRAIN
from gfdm_fast.philox import MASK32, philox4x32, uniform_from_bits

T_MIN = 1e-5            # t ~ U(T_MIN, 1)
TIME_WEIGHT = 999.0     # network time = 999 t


def sample_seeds(seed, m, batch_size):
    """Philox keys of micro-batch ``m``: ``seed * 2^32 + global image index``."""
    g = m * batch_size + torch.arange(batch_size, dtype=torch.int64)
    return (int(seed) << 32) + g


def draw_times(seeds):
    """t ~ U(1e-5, 1) per image from its key (Philox stream 2, component 1; eps uses component 0)."""
    zero = torch.zeros_like(seeds)
    x0, _, _, _ = philox4x32(zero, zero, zero + STREAM_TRAIN, zero + 1, seeds & MASK32, (seeds >> 32) & MASK32)
    return T_MIN + (1.0 - T_MIN) * uniform_from_bits(x0).to(torch.float64)


def reduced_loss(net, dyn, x0, labels, seeds, *, precision="fp32"):
    """Mean squared error of ``net``'s epsilon prediction on images ``x0`` noised with their keys ``seeds``."""
    from gfdm_fast.models import autocast
    t = draw_times(seeds)
    st = dyn.marginal_stats(t)
    f32 = dict(device=x0.device, dtype=torch.float32, non_blocking=True)
    x_in, eps = ops.noising(x0, st.mean_scale.to(**f32), st.sigma_c.to(**f32), seeds.to(x0.device), 0)
    s = (TIME_WEIGHT * t).to(**f32)
    with autocast(x0.device.type, precision):
        e = net(x_in, s, labels)
    return F.mse_loss(e.float(), eps)
