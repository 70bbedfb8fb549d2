"""Fused Euler-Maruyama step (gfdm_fast.reference.em_step_planar; row layout in gfdm_fast.schedule).

Per pixel, one read of the K+1 planes of z and of e, one write of z and x_in:
    gs = u e - q . Y
    X' = a_x X + b . Y + cG0 gs + nx xi,   Y' = a_y * Y + c gs + ny xi,   x_in = X' - alpha_next . Y'
The Y planes are held as one (KP, BLOCK) tile so each is loaded once; the table row is read
from ``table[step]`` with ``step`` loaded on the device (no host sync: CUDA-graph replayable).
"""

import triton
import triton.language as tl

from gfdm_fast import layout as S

from .launch import NUM_WARPS, checked_step, pixel_launch
from .philox import philox_normal

# row layout of gfdm_fast.layout, as compile-time constants
EM_FIXED: tl.constexpr = tl.constexpr(S.EM_FIXED)
COL_AX: tl.constexpr = tl.constexpr(S.COL_AX)
COL_CG0: tl.constexpr = tl.constexpr(S.COL_CG0)
COL_C: tl.constexpr = tl.constexpr(S.COL_C)
COL_U: tl.constexpr = tl.constexpr(S.COL_U)
COL_NX: tl.constexpr = tl.constexpr(S.COL_NX)
COL_NY: tl.constexpr = tl.constexpr(S.COL_NY)
STREAM_EM: tl.constexpr = tl.constexpr(S.STREAM_EM)

INDEX_LIMIT = 2 ** 31          # offsets from here on need 64-bit arithmetic (tests lower it)


@triton.jit
def _em_step_kernel(z_ptr, e_ptr, x_in_ptr, table_ptr, steps, step_ptr, seeds_ptr, noise_ptr, N, CHW,
                    K: tl.constexpr, KP: tl.constexpr, HAS_NOISE: tl.constexpr, WIDE: tl.constexpr,
                    BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE:                                               # (K+1) N >= 2^31: 64-bit offsets
        pid = pid.to(tl.int64)
    p = pid * BLOCK + tl.arange(0, BLOCK)                  # pixel index in [0, B*C*H*W)
    mask = p < N
    plane = pid * 0 + N                                    # plane stride, in p's integer width
    step, poison = checked_step(step_ptr, steps)        # out of range: row 0, NaN outputs
    row = table_ptr + step * (EM_FIXED + 4 * K)
    a_x = tl.load(row + COL_AX)
    cG0 = tl.load(row + COL_CG0)
    c = tl.load(row + COL_C)
    u = tl.load(row + COL_U)
    nx = tl.load(row + COL_NX)
    ny = tl.load(row + COL_NY)

    X = tl.load(z_ptr + p, mask=mask, other=0.0)
    e = tl.load(e_ptr + p, mask=mask, other=0.0)

    xi = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_NOISE:
        xi = tl.load(noise_ptr + p, mask=mask, other=0.0)
    else:
        if (nx != 0.0) | (ny != 0.0):                      # ode and the last step skip the Philox work
            seed = tl.load(seeds_ptr + p // CHW, mask=mask, other=0)
            xi = philox_normal(p % CHW, step, STREAM_EM, 0, seed)

    if K > 0:
        k = tl.arange(0, KP)
        kmask = k < K
        b = tl.load(row + EM_FIXED + k, mask=kmask, other=0.0)
        a_y = tl.load(row + EM_FIXED + K + k, mask=kmask, other=0.0)
        q = tl.load(row + EM_FIXED + 2 * K + k, mask=kmask, other=0.0)
        a_next = tl.load(row + EM_FIXED + 3 * K + k, mask=kmask, other=0.0)
        y_off = (k[:, None] + 1) * plane + p[None, :]
        y_mask = kmask[:, None] & mask[None, :]
        Y = tl.load(z_ptr + y_off, mask=y_mask, other=0.0)                  # (KP, BLOCK)
        gs = u * e - tl.sum(q[:, None] * Y, axis=0)
        Xn = a_x * X + tl.sum(b[:, None] * Y, axis=0) + cG0 * gs + nx * xi
        Yn = a_y[:, None] * Y + (c * gs)[None, :] + (ny * xi)[None, :]
        tl.store(z_ptr + y_off, Yn + poison, mask=y_mask)
        x_next = Xn - tl.sum(a_next[:, None] * Yn, axis=0)
    else:
        gs = u * e
        Xn = a_x * X + cG0 * gs + nx * xi
        x_next = Xn
    tl.store(z_ptr + p, Xn + poison, mask=mask)
    tl.store(x_in_ptr + p, x_next + poison, mask=mask)


def _launch(z, e, x_in, table, step, seeds, noise):
    K = z.shape[0] - 1
    N = e.numel()
    if N == 0:
        return
    KP = triton.next_power_of_2(max(K, 1))
    block, grid, guard = pixel_launch(N, KP, z.device)
    has_noise = noise is not None
    with guard:
        _em_step_kernel[grid](z, e, x_in, table, table.shape[0], step, seeds if seeds is not None else e,
                              noise if has_noise else e, N, N // z.shape[1],
                              K=K, KP=KP, HAS_NOISE=has_noise, WIDE=(K + 1) * N >= INDEX_LIMIT,
                              BLOCK=block, num_warps=NUM_WARPS)


def em_step(z, e, x_in, table, step, seeds=None, noise=None):
    """The ``triton`` backend of gfdm_fast.ops.em_step (arguments already checked there)."""
    _launch(z, e, x_in, table, step, seeds, noise)
