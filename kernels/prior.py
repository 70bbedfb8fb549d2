"""Fused prior draw (gfdm_fast.reference.prior_planar): z_T = L xi per pixel, x_in = X - alpha_0 . Y.

xi_j is Philox stream 1, step 0, component j (or the given ``noise`` plane j); L is the
row-major Cholesky factor of Sreg(T) and alpha_0 the alpha of the first grid time, both in ``prior``.
The K+1 planes of a pixel form one (KP1, BLOCK) tile, so every plane is written once.
"""

import triton
import triton.language as tl

from gfdm_fast import layout

from .launch import NUM_WARPS, pixel_launch, tile_pixels_per_thread
from .philox import philox_normal

STREAM_PRIOR: tl.constexpr = tl.constexpr(layout.STREAM_PRIOR)

INDEX_LIMIT = 2 ** 31          # offsets from here on need 64-bit arithmetic (tests lower it)


@triton.jit
def _prior_kernel(z_ptr, x_in_ptr, prior_ptr, seeds_ptr, noise_ptr, N, CHW,
                  K: tl.constexpr, KP1: tl.constexpr, HAS_NOISE: tl.constexpr, WIDE: tl.constexpr,
                  BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE:                                               # (K+1) N >= 2^31: 64-bit offsets
        pid = pid.to(tl.int64)
    p = pid * BLOCK + tl.arange(0, BLOCK)
    mask = p < N
    plane = pid * 0 + N                                    # plane stride, in p's integer width
    j = tl.arange(0, KP1)
    jmask = j < K + 1
    off = j[:, None] * plane + p[None, :]
    tile_mask = jmask[:, None] & mask[None, :]
    # z = L xi as a sum of outer products (column c of L times xi_c): one normal live at a time
    acc = tl.zeros([KP1, BLOCK], dtype=tl.float32)
    if HAS_NOISE:
        for c in tl.static_range(K + 1):
            xi = tl.load(noise_ptr + c * plane + p, mask=mask, other=0.0)
            L_c = tl.load(prior_ptr + j * (K + 1) + c, mask=jmask, other=0.0)
            acc += L_c[:, None] * xi[None, :]
    else:
        seed = tl.load(seeds_ptr + p // CHW, mask=mask, other=0)
        elem = p % CHW
        for c in tl.range(0, K + 1):                      # a loop, not unrolled: one Philox chain live at a time
            xi = philox_normal(elem, 0, STREAM_PRIOR, c, seed)
            L_c = tl.load(prior_ptr + j * (K + 1) + c, mask=jmask, other=0.0)
            acc += L_c[:, None] * xi[None, :]
    tl.store(z_ptr + off, acc, mask=tile_mask)
    X = tl.sum(tl.where((j == 0)[:, None], acc, 0.0), axis=0)              # exact: one nonzero term
    alpha0 = tl.load(prior_ptr + (K + 1) * (K + 1) + j - 1, mask=jmask & (j > 0), other=0.0)   # (0, alpha_0)
    tl.store(x_in_ptr + p, X - tl.sum(alpha0[:, None] * acc, axis=0), mask=mask)


def _launch(z, x_in, prior_vec, seeds, noise):
    K = z.shape[0] - 1
    N = x_in.numel()
    if N == 0:
        return
    KP1 = triton.next_power_of_2(K + 1)
    wide = (K + 1) * N >= INDEX_LIMIT
    block, grid, guard = pixel_launch(N, KP1, z.device, tile_pixels_per_thread(KP1, wide))
    has_noise = noise is not None
    with guard:
        _prior_kernel[grid](z, x_in, prior_vec, seeds if seeds is not None else prior_vec,
                            noise if has_noise else z, N, N // z.shape[1],
                            K=K, KP1=KP1, HAS_NOISE=has_noise, WIDE=wide,
                            BLOCK=block, num_warps=NUM_WARPS)


def prior(z, x_in, prior, seeds=None, noise=None):
    """The ``triton`` backend of gfdm_fast.ops.prior_draw (arguments already checked there)."""
    _launch(z, x_in, prior, seeds, noise)
