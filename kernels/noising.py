"""Fused training noising (gfdm_fast.reference.noising): x_in = c x0 + sigma_c eps, eps from Philox stream 2.

One read of x0 (and of ``eps`` when given), one write of x_in and eps_out; c and sigma_c
are per image, the Philox counter is (element, step, 2, 0) with ``step`` read on the device.
"""

import triton
import triton.language as tl

from gfdm_fast import layout

from .launch import NUM_WARPS, pixel_launch
from .philox import philox_normal

STREAM_TRAIN: tl.constexpr = tl.constexpr(layout.STREAM_TRAIN)

INDEX_LIMIT = 2 ** 31          # offsets from here on need 64-bit arithmetic (tests lower it)


@triton.jit
def _noising_kernel(x0_ptr, c_ptr, sigma_ptr, seeds_ptr, step_ptr, x_in_ptr, eps_out_ptr, eps_ptr, N, CHW,
                    HAS_EPS: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    p = pid * BLOCK + tl.arange(0, BLOCK)
    mask = p < N
    b = p // CHW
    x0 = tl.load(x0_ptr + p, mask=mask, other=0.0)
    c = tl.load(c_ptr + b, mask=mask, other=0.0)
    sigma_c = tl.load(sigma_ptr + b, mask=mask, other=0.0)
    if HAS_EPS:
        eps = tl.load(eps_ptr + p, mask=mask, other=0.0)
    else:
        seed = tl.load(seeds_ptr + b, mask=mask, other=0)
        eps = philox_normal(p % CHW, tl.load(step_ptr), STREAM_TRAIN, 0, seed)
    tl.store(eps_out_ptr + p, eps, mask=mask)
    tl.store(x_in_ptr + p, c * x0 + sigma_c * eps, mask=mask)


def _launch(x0, mean_scale, sigma_c, seeds, step, x_in, eps_out, eps):
    N = x0.numel()
    if N == 0:
        return
    block, grid, guard = pixel_launch(N, 1, x0.device)
    has_eps = eps is not None
    with guard:
        _noising_kernel[grid](x0, mean_scale, sigma_c, seeds if seeds is not None else mean_scale, step,
                              x_in, eps_out, eps if has_eps else x0, N, N // x0.shape[0],
                              HAS_EPS=has_eps, WIDE=N >= INDEX_LIMIT, BLOCK=block, num_warps=NUM_WARPS)


def noising(x0, mean_scale, sigma_c, seeds, step, x_in, eps_out, eps=None):
    """The ``triton`` backend of gfdm_fast.ops.noising (arguments already checked there)."""
    _launch(x0, mean_scale, sigma_c, seeds, step, x_in, eps_out, eps)
