"""Fused exponential-integrator step (gfdm_fast.reference.exp_step_planar; row layout in gfdm_fast.expint).

Per pixel, one read of the K+1 planes of z, of x_in, e and the R-1 history planes, one write of z,
x_in and the ring slot ``step mod (R-1)``:
    d = p x_in + q e
    Z' = Phi Z + w_cur d + sum_s w_hist[s] hist[s] (+ L xi when noisy),   hist[step mod (R-1)] = d
    x_in = X' - alpha_next . Y'
Z' is accumulated as one (KP1, BLOCK) tile of outer products (a column of Phi, w or L times one
plane), so every plane is loaded once and z is written by one 2-D store. xi_j is Philox stream 3,
counter (element, step, 3, j), or the given ``noise`` plane j. The table row is read from
``table[step]`` with ``step`` loaded on the device (no host sync: CUDA-graph replayable).
"""

import triton
import triton.language as tl

from gfdm_fast import layout

from .launch import NUM_WARPS, checked_step, pixel_launch, tile_pixels_per_thread
from .philox import philox_normal

EXP_FIXED: tl.constexpr = tl.constexpr(layout.EXP_FIXED)     # p, q, then Phi
STREAM_EXP: tl.constexpr = tl.constexpr(layout.STREAM_EXP)

INDEX_LIMIT = 2 ** 31          # offsets from here on need 64-bit arithmetic (tests lower it)


@triton.jit
def _exp_step_kernel(z_ptr, e_ptr, x_in_ptr, hist_ptr, table_ptr, steps, step_ptr, seeds_ptr, noise_ptr, N, CHW,
                     K: tl.constexpr, KP1: tl.constexpr, R: tl.constexpr, NOISY: tl.constexpr,
                     HAS_NOISE: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    K1: tl.constexpr = K + 1
    O_W: tl.constexpr = EXP_FIXED + K1 * K1                # w_cur
    O_H: tl.constexpr = O_W + K1                           # w_hist, (R-1) x (K+1) in ring-slot order
    O_L: tl.constexpr = O_H + (R - 1) * K1                 # L, row-major lower
    O_A: tl.constexpr = O_L + K1 * K1                      # alpha_next (K)
    WIDTH: tl.constexpr = O_A + K

    pid = tl.program_id(0)
    if WIDE:                                               # max(K+1, R-1) N >= 2^31: 64-bit offsets
        pid = pid.to(tl.int64)
    p = pid * BLOCK + tl.arange(0, BLOCK)                  # pixel index in [0, B*C*H*W)
    mask = p < N
    plane = pid * 0 + N                                    # plane stride, in p's integer width
    step, poison = checked_step(step_ptr, steps)        # out of range: row 0, NaN outputs
    row = table_ptr + step * WIDTH
    j = tl.arange(0, KP1)                                  # output component
    jmask = j < K1
    off = j[:, None] * plane + p[None, :]
    tile_mask = jmask[:, None] & mask[None, :]

    # the data prediction, from x_in as the network saw it (read before x_in is overwritten)
    x = tl.load(x_in_ptr + p, mask=mask, other=0.0)
    e = tl.load(e_ptr + p, mask=mask, other=0.0)
    d = tl.load(row) * x + tl.load(row + 1) * e

    # Phi Z: column c of Phi times plane c
    acc = tl.zeros([KP1, BLOCK], dtype=tl.float32)
    for c in tl.static_range(K1):
        Zc = tl.load(z_ptr + plane * c + p, mask=mask, other=0.0)
        Phi_c = tl.load(row + EXP_FIXED + j * K1 + c, mask=jmask, other=0.0)
        acc += Phi_c[:, None] * Zc[None, :]
    w_cur = tl.load(row + O_W + j, mask=jmask, other=0.0)
    acc += w_cur[:, None] * d[None, :]
    for s in tl.static_range(R - 1):                       # the older evaluations, in ring-slot order
        Hs = tl.load(hist_ptr + plane * s + p, mask=mask, other=0.0)
        w_s = tl.load(row + O_H + s * K1 + j, mask=jmask, other=0.0)
        acc += w_s[:, None] * Hs[None, :]
    if NOISY:
        if HAS_NOISE:
            for c in tl.static_range(K1):
                xi = tl.load(noise_ptr + plane * c + p, mask=mask, other=0.0)
                L_c = tl.load(row + O_L + j * K1 + c, mask=jmask, other=0.0)
                acc += L_c[:, None] * xi[None, :]
        else:
            seed = tl.load(seeds_ptr + p // CHW, mask=mask, other=0)
            elem = p % CHW
            for c in tl.range(0, K1):                      # a loop, not unrolled: one Philox chain live at a time
                xi = philox_normal(elem, step, STREAM_EXP, c, seed)
                L_c = tl.load(row + O_L + j * K1 + c, mask=jmask, other=0.0)
                acc += L_c[:, None] * xi[None, :]

    if R > 1:                                              # d replaces the oldest evaluation
        slot = step % (R - 1)
        tl.store(hist_ptr + plane * slot + p, d + poison, mask=mask)
    tl.store(z_ptr + off, acc + poison, mask=tile_mask)
    Xn = tl.sum(tl.where((j == 0)[:, None], acc, 0.0), axis=0)            # exact: one nonzero term
    a_next = tl.load(row + O_A + j - 1, mask=jmask & (j > 0), other=0.0)  # (0, alpha_next)
    tl.store(x_in_ptr + p, Xn - tl.sum(a_next[:, None] * acc, axis=0) + poison, mask=mask)


def _launch(z, e, x_in, hist, table, step, order, seeds, noise, noisy):
    K = z.shape[0] - 1
    N = e.numel()
    if N == 0:
        return
    KP1 = triton.next_power_of_2(K + 1)
    wide = max(K + 1, int(order) - 1) * N >= INDEX_LIMIT
    block, grid, guard = pixel_launch(N, KP1, z.device, tile_pixels_per_thread(KP1, wide))
    has_noise = bool(noisy) and noise is not None
    with guard:
        _exp_step_kernel[grid](z, e, x_in, hist, table, table.shape[0], step,
                               seeds if (noisy and seeds is not None) else e, noise if has_noise else e,
                               N, N // z.shape[1],
                               K=K, KP1=KP1, R=int(order), NOISY=bool(noisy), HAS_NOISE=has_noise,
                               WIDE=wide, BLOCK=block, num_warps=NUM_WARPS)


def exp_step(z, e, x_in, hist, table, step, order, seeds=None, noise=None, noisy=False):
    """The ``triton`` backend of gfdm_fast.ops.exp_step (arguments already checked there)."""
    _launch(z, e, x_in, hist, table, step, order, seeds, noise, noisy)
