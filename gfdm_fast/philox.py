"""Counter-based noise: Philox4x32-10 (Salmon et al., SC'11) and one normal transform.

THE definition every backend implements bit-for-bit in its integer part:

* key     = (seed mod 2^32, seed >> 32 mod 2^32)  -- the per-image seed (int64)
* counter = (element, step, stream, component)     -- element = flat index inside the image (C*H*W)
* output words (x0, x1) -> u_i = ((x_i >> 9) * 2 + 1) * 2^-24, exact in float32, in (0, 1)
* normal  = sqrt(-2 ln u_0) * cos(2 pi u_1)  (float32)

Streams (numbered in gfdm_fast.layout; docs/design.md 'Noise contract'): 0 = Euler-Maruyama step noise,
1 = prior draw, 2 = training noise and times, 3 = exponential-integrator step noise, 4 = class labels.
A sample therefore depends on its seed only: not on the batch it is in, the backend, or the number of
processes.
"""
import math

import torch

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF


def _mulhilo(a, b):
    """(hi, lo) 32-bit halves of the 64-bit product of a constant a < 2^32 and b (int64 tensor < 2^32)."""
    lo16, hi16 = b & 0xFFFF, b >> 16
    p_lo, p_hi = a * lo16, a * hi16                     # each < 2^48: no int64 overflow
    s = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (s >> 32), s & MASK32


def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on int64 tensors holding uint32 values (broadcasting); returns 4 int64 tensors."""
    for r in range(PHILOX_ROUNDS):
        if r:
            k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def uniform_from_bits(x):
    """uint32 bits (int64 tensor) -> float32 in (0, 1), exactly representable."""
    return ((x >> 9) * 2 + 1).to(torch.float32) * (2.0 ** -24)


def normal_from_bits(x0, x1):
    u0, u1 = uniform_from_bits(x0), uniform_from_bits(x1)
    return torch.sqrt(-2.0 * torch.log(u0)) * torch.cos((2.0 * math.pi) * u1)


def philox_normal(seeds, step, stream, numel, component=0):
    """Standard normals (B, numel) float32: one per (image seed, step, stream, element, component).

    ``seeds`` is a (B,) int64 tensor; ``step`` an int or 0-d integer tensor (no host sync).
    """
    seeds = seeds.to(torch.int64)
    dev = seeds.device
    k0 = (seeds & MASK32)[:, None]
    k1 = ((seeds >> 32) & MASK32)[:, None]
    elem = torch.arange(numel, device=dev, dtype=torch.int64)[None, :]
    step = torch.as_tensor(step, device=dev).to(torch.int64) & MASK32
    c1 = step.expand(1, 1) if step.dim() == 0 else step.reshape(1, 1)
    c2 = torch.full((1, 1), stream, dtype=torch.int64, device=dev)
    c3 = torch.full((1, 1), component, dtype=torch.int64, device=dev)
    x0, x1, _, _ = philox4x32(elem, c1, c2, c3, k0, k1)
    return normal_from_bits(x0, x1)
