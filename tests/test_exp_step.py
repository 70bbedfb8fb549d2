"""Every backend of the fused exponential-integrator step against the float64 torch reference.

Tolerance as in test_ops (flash-attention's rule): a backend's max error against the float64
oracle (float64 table and inputs) is at most twice that of the float32 torch reference plus
4 float32 ulps of the output's scale. The Triton cases run under TRITON_INTERPRET=1 (conftest),
so tensors are small and the sweep is split: every K at order 2, every order at K = 2, 3.
"""
import dataclasses
import functools

import pytest
import torch
from test_ops import CUDA, assert_calibrated, backend_or_skip, device_for

from gfdm_fast import make_dynamics, ops
from gfdm_fast import reference as ref
from gfdm_fast.expint import build_exp_table
from gfdm_fast.layout import EXP_FIXED, STREAM_EXP, exp_row_width
from gfdm_fast.philox import philox_normal

BACKENDS = ["triton", "cpp", CUDA, "torch"]
SHAPES = [(5, 3, 7, 9), (2, 1, 4, 4)]
STEPS = (0, 1, 2, 5)          # with 6-step tables: the first steps (ring not yet full), ring wrap-around, the last


def exp_backend_or_skip(name):
    """As test_ops.backend_or_skip, and the backend must have its exp_step kernel."""
    backend_or_skip(name)
    dev = device_for(name)
    assert name in ops.available_backends(dev, "exp_step"), f"backend {name} has no exp_step kernel"
    return dev


@functools.lru_cache(maxsize=None)
def _tables(K, mode, order):
    """(float32, float64) step tables of a real 6-step schedule; 16 substeps keep the build cheap.

    build_exp_table computes in float64 and rounds once to ``dtype``, so the float32 table is the
    float64 one rounded (bit for bit what dtype=torch.float32 gives) at half the build time.
    """
    dyn = make_dynamics("fve" if K % 2 else "fvp", hurst=0.7 if K else 0.5, num_aug=K)
    t64 = build_exp_table(dyn, 6, mode=mode, order=order, grid="logsnr", substeps=16, dtype=torch.float64)
    return dataclasses.replace(t64, table=t64.table.to(torch.float32), prior=t64.prior.to(torch.float32)), t64


def _philox_planes(seeds, step, K, shape):
    numel = shape[1] * shape[2] * shape[3]
    return torch.stack([philox_normal(seeds, step, STREAM_EXP, numel, component=j).reshape(shape)
                        for j in range(K + 1)])


@functools.lru_cache(maxsize=None)
def _cases(K, order, mode, shape, steps):
    """Inputs and the two torch reference runs (float64 oracle, float32), shared by every backend.

    One tuple per step: (step, explicit, inputs (float64: z0, e, x0, h0; seeds), noise (float32 or None),
    float64 outputs, float32 outputs). Cached: the callers never mutate them.
    """
    noisy = mode == "sde"
    gen = torch.Generator().manual_seed(100 * K + 10 * order + noisy + 1000 * shape[0])
    t32, t64 = _tables(K, mode, order)
    z0 = torch.randn(K + 1, *shape, generator=gen, dtype=torch.float64)
    e = torch.randn(*shape, generator=gen, dtype=torch.float64)
    x0 = torch.randn(*shape, generator=gen, dtype=torch.float64)
    h0 = torch.randn(max(order - 1, 1), *shape, generator=gen, dtype=torch.float64) * 3
    seeds = torch.randint(-(2 ** 62), 2 ** 62, (shape[0],), generator=gen)
    out = []
    for i, step in enumerate(steps):
        explicit = noisy and i % 2 == 1               # alternate the given noise and the Philox draw
        noise = torch.randn(K + 1, *shape, generator=gen) if explicit else None
        if noisy:
            noise64 = noise.double() if explicit else _philox_planes(seeds, step, K, shape).double()
        else:
            noise64 = None
        z64, x64, h64 = z0.clone(), x0.clone(), h0.clone()
        ref.exp_step_planar(z64, e, x64, h64, t64.table, step, order, noise=noise64, noisy=noisy)
        z32, x32, h32 = z0.float(), x0.float(), h0.float()
        ref.exp_step_planar(z32, e.float(), x32, h32, t32.table, step, order, seeds, noise, noisy)
        out.append((step, explicit, (z0, e, x0, h0, seeds), noise, (z64, x64, h64), (z32, x32, h32)))
    return out


def _check_exp_step(backend, K, order, mode, shapes=SHAPES, steps=STEPS):
    dev = exp_backend_or_skip(backend)
    noisy = mode == "sde"
    R = order
    t32, _ = _tables(K, mode, order)
    table = t32.table.to(dev)
    for shape in shapes:
        for step, explicit, (z0, e, x0, h0, seeds), noise, (z64, x64, h64), (z32, x32, h32) in \
                _cases(K, order, mode, shape, tuple(steps)):
            tag = f"{backend} K={K} order={order} {mode} {shape} step={step} explicit={explicit}"
            if not noisy:
                noise = torch.full((K + 1, *shape), float("nan"))     # must not be read
            z, x, h = z0.float().to(dev), x0.float().to(dev), h0.float().to(dev)
            if R == 1:
                h.fill_(float("nan"))                  # order 1 neither reads nor writes the ring
            ops.exp_step(z, e.float().to(dev), x, h, table, step, seeds.to(dev) if noisy else None,
                         None if noise is None else noise.to(dev), order=order, noisy=noisy, backend=backend)
            assert_calibrated(z, z32, z64, "z " + tag)
            assert_calibrated(x, x32, x64, "x_in " + tag)
            h = h.cpu()
            if R == 1:
                assert torch.isnan(h).all(), "order 1 touched the history ring: " + tag
                continue
            slot = step % (R - 1)
            assert_calibrated(h[slot], h32[slot], h64[slot], "hist slot " + tag)
            for s in range(R - 1):
                if s != slot:
                    assert torch.equal(h[s], h0[s].float()), f"hist slot {s} (not step's) changed: {tag}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", range(6))
def test_exp_step_every_K_order2(backend, K):
    _check_exp_step(backend, K, 2, "sde")
    if K in (0, 1):                                   # ode (no noise) at order 2; every order: below
        _check_exp_step(backend, K, 2, "ode", shapes=SHAPES[:1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("mode", ["sde", "ode"])
def test_exp_step_every_order(backend, K, order, mode):
    _check_exp_step(backend, K, order, mode)


def test_exp_step_triton_odd_K():
    """K = 8: 9 planes, a padded (16, BLOCK) tile."""
    _check_exp_step("triton", 8, 3, "sde", shapes=SHAPES[1:])


def _identity_noise_table(K, order, steps, step):
    """A table whose row ``step`` is Phi = 0, w = 0, L = I, p = q = 0, alpha_next = (1, 2, ..); other rows NaN."""
    K1 = K + 1
    table = torch.full((steps, exp_row_width(K, order)), float("nan"))
    row = torch.zeros(exp_row_width(K, order))
    o_L = EXP_FIXED + K1 * K1 + order * K1
    row[o_L:o_L + K1 * K1] = torch.eye(K1).reshape(-1)
    row[o_L + K1 * K1:] = torch.arange(1, K + 1, dtype=torch.float32) / 4
    table[step] = row
    return table


@pytest.mark.parametrize("backend", BACKENDS)
def test_exp_step_philox_stream3(backend):
    """With Phi = 0, w = 0, L = I the step's state is the K+1 stream-3 normals themselves."""
    dev = exp_backend_or_skip(backend)
    K, order, step = 3, 3, 3
    shape = (3, 2, 5, 7)
    seeds = torch.tensor([0, 1, 2 ** 40 + 5], dtype=torch.int64)
    table = _identity_noise_table(K, order, 5, step)
    z = torch.randn(K + 1, *shape).to(dev)
    x = torch.randn(shape).to(dev)
    h0 = torch.randn(order - 1, *shape)
    h = h0.to(dev)
    ops.exp_step(z, torch.randn(shape).to(dev), x, h, table.to(dev), torch.tensor(step), seeds.to(dev),
                 order=order, noisy=True, backend=backend)
    want = _philox_planes(seeds, step, K, shape)
    torch.testing.assert_close(z.cpu(), want, rtol=2e-6, atol=2e-6)      # float32 log/cos ulps only
    alpha = table[step, -K:].reshape(K, 1, 1, 1, 1)
    torch.testing.assert_close(x.cpu(), want[0] - (alpha * want[1:]).sum(0), rtol=1e-5, atol=1e-5)
    h = h.cpu()
    assert torch.equal(h[step % 2], torch.zeros(shape)) and torch.equal(h[1 - step % 2], h0[1 - step % 2])
    # the step counter and the component both enter the counter
    assert not torch.allclose(_philox_planes(seeds, step + 1, K, shape), want)
    assert not torch.allclose(want[0], want[1])


def test_exp_step_triton_64bit_offsets(monkeypatch):
    """The WIDE (int64 offset) variant, forced on small tensors, agrees bit for bit with the int32 one."""
    import gfdm_fast.kernels.exp_step as k_exp
    dev = exp_backend_or_skip("triton")
    K, order, shape = 2, 3, (2, 3, 5, 7)
    t32, _ = _tables(K, "sde", order)
    z0, e, x0, h0 = (torch.randn(*s, device=dev) for s in ((K + 1, *shape), shape, shape, (2, *shape)))
    seeds = torch.tensor([4, -9], device=dev)

    def run():
        z, x, h = z0.clone(), x0.clone(), h0.clone()
        ops.exp_step(z, e, x, h, t32.to(dev), 3, seeds, backend="triton")
        return z, x, h

    narrow = run()
    monkeypatch.setattr(k_exp, "INDEX_LIMIT", 0)
    for a, b in zip(narrow, run()):
        assert torch.equal(a, b)
