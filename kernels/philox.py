"""Philox4x32-10 and the one normal transform as @triton.jit helpers (gfdm_fast.philox is the definition).

All integer work is uint32: ``tl.umulhi`` gives the high word of a 32x32 product and a
wrap-around ``tl.mul`` the low word, exactly as Random123's mulhilo32.
"""
import triton
import triton.language as tl

# Salmon et al. (SC'11) constants, as in gfdm_fast.philox
PHILOX_M0: tl.constexpr = tl.constexpr(0xD2511F53)
PHILOX_M1: tl.constexpr = tl.constexpr(0xCD9E8D57)
PHILOX_W0: tl.constexpr = tl.constexpr(0x9E3779B9)
PHILOX_W1: tl.constexpr = tl.constexpr(0xBB67AE85)
TWO_PI: tl.constexpr = tl.constexpr(6.283185307179586)      # rounded to float32 when it meets u1, as in torch
TWO_POW_M24: tl.constexpr = tl.constexpr(5.960464477539063e-08)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on uint32 tensors of one shape; returns the four output words."""
    for r in tl.static_range(10):
        if r > 0:                                             # key bump between rounds
            k0 = tl.add(k0, PHILOX_W0, sanitize_overflow=False)
            k1 = tl.add(k1, PHILOX_W1, sanitize_overflow=False)
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = tl.mul(c0, PHILOX_M0, sanitize_overflow=False)
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = tl.mul(c2, PHILOX_M1, sanitize_overflow=False)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def uniform_from_bits(x):
    """uint32 -> float32 ((x >> 9) * 2 + 1) * 2^-24 in (0, 1); exact (fewer than 24 significant bits)."""
    return ((x >> 9) * 2 + 1).to(tl.float32) * TWO_POW_M24


@triton.jit
def philox_normal(elem, step, stream, component, seed):
    """Standard normal for counter (elem, step, stream, component) and key = the int64 ``seed``'s two halves.

    ``elem`` is an integer tensor (the flat index inside the image); ``step`` an integer scalar or tensor;
    ``stream``/``component`` integers or integer tensors; ``seed`` an int64 tensor broadcastable to ``elem``.
    """
    zero = tl.zeros(elem.shape, dtype=tl.uint32)        # broadcasts scalars and Python ints to elem's shape
    c0 = (zero + elem).to(tl.uint32)
    c1 = (zero + step).to(tl.uint32)                    # step mod 2^32
    c2 = (zero + stream).to(tl.uint32)
    c3 = (zero + component).to(tl.uint32)
    seed = zero.to(tl.int64) + seed
    k0 = seed.to(tl.uint32)                             # low 32 bits
    k1 = (seed >> 32).to(tl.uint32)                     # high 32 bits
    x0, x1, _, _ = philox4x32_10(c0, c1, c2, c3, k0, k1)
    u0 = uniform_from_bits(x0)
    u1 = uniform_from_bits(x1)
    # Box-Muller, first output only: sqrt(-2 ln u0) cos(2 pi u1)
    return tl.sqrt_rn(-2.0 * tl.log(u0)) * tl.cos(u1 * TWO_PI)
