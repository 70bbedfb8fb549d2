"""Every backend of every fused op against the float64 torch reference.

Tolerance rule (flash-attention's): a backend's max error against the float64
oracle may be at most twice that of the float32 torch reference, plus a floor
of a few float32 ulps of the output's scale.
"""

import os

import pytest
import torch

from gfdm_fast import make_dynamics, ops
from gfdm_fast import reference as ref
from gfdm_fast import schedule as S
from gfdm_fast.layout import STREAM_EM, STREAM_PRIOR, STREAM_TRAIN
from gfdm_fast.philox import philox_normal

SHAPES = [(5, 3, 7, 9), (2, 1, 4, 4)]


HAS_CUDA = torch.cuda.is_available()


def device_for(backend):
    """cuda on CUDA tensors; triton compiled on a GPU, interpreted on CPU tensors without one."""
    return "cuda" if backend == "cuda" or (backend == "triton" and HAS_CUDA) else "cpu"


def backend_or_skip(name):
    """cpp and triton must load on a CPU machine (a failure, not a skip); cuda carries the gpu marker."""
    dev = device_for(name)
    if dev == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    status = ops.backend_status(dev)[name]
    if status != "ok":
        pytest.fail(f"backend {name} unavailable on {dev}: {status}")
    return name


CUDA = pytest.param("cuda", marks=pytest.mark.gpu)
FAST = ["cpp", "triton", CUDA]


def assert_calibrated(out, out32, out64, what):
    """max|out - out64| <= 2 max|out32 - out64| + 4 ulp(scale); report mismatches."""
    out, out32, out64 = out.double().cpu(), out32.double().cpu(), out64.double().cpu()
    assert torch.isfinite(out).all(), f"{what}: non-finite output (poisoned values left?)"
    scale = out64.abs().max().item()
    bound = 2 * (out32 - out64).abs().max().item() + 4 * 2 ** -23 * scale
    err = (out - out64).abs()
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} elements off by more than {bound:.3g} "
                           f"(max {err.max().item():.3g}); first at {tuple(torch.nonzero(bad)[0].tolist())}")


def _table(K, mode, steps=10, name="fvp"):
    dyn = make_dynamics(name, hurst=0.7 if K else 0.5, num_aug=K)
    return (S.build_em_table(dyn, steps, mode=mode, dtype=torch.float32),
            S.build_em_table(dyn, steps, mode=mode, dtype=torch.float64))


@pytest.mark.parametrize("backend", FAST + ["torch"])
@pytest.mark.parametrize("K", range(6))
@pytest.mark.parametrize("mode", ["sde", "ode"])
def test_em_step_matches_reference(backend, K, mode, seed):
    dev = device_for(backend_or_skip(backend))
    gen = torch.Generator().manual_seed(seed)
    t32, t64 = _table(K, mode, name="fve" if K % 2 else "fvp")
    for shape in SHAPES:
        B = shape[0]
        z0 = torch.randn(K + 1, *shape, generator=gen, dtype=torch.float64)
        e = torch.randn(*shape, generator=gen, dtype=torch.float64)
        seeds = torch.randint(0, 2 ** 62, (B,), generator=gen)
        for step in (0, 4, t32.steps - 1):
            for explicit in (False, True):
                noise = torch.randn(*shape, generator=gen) if explicit else None
                if explicit:
                    noise64 = noise.double()
                else:
                    noise64 = philox_normal(seeds, step, STREAM_EM, z0[0, 0].numel()).reshape(shape).double()
                z64, x64 = z0.clone(), torch.empty(shape, dtype=torch.float64)
                ref.em_step_planar(z64, e, x64, t64.table, step, noise=noise64)
                z32, x32 = z0.float(), torch.empty(shape)
                ref.em_step_planar(z32, e.float(), x32, t32.table, step, seeds, noise)
                z, x = z0.float().to(dev), torch.full(shape, float("nan"), device=dev)
                ops.em_step(z, e.float().to(dev), x, t32.table.to(dev), step, seeds.to(dev),
                            None if noise is None else noise.to(dev), backend=backend)
                tag = f"{backend} K={K} {mode} {shape} step={step} explicit={explicit}"
                assert_calibrated(z, z32, z64, "z " + tag)
                assert_calibrated(x, x32, x64, "x_in " + tag)


@pytest.mark.parametrize("backend", FAST + ["torch"])
def test_philox_noise_identical_across_backends(backend):
    """A row whose only nonzero coefficient is nx = 1 turns the step into the noise itself."""
    dev = device_for(backend_or_skip(backend))
    shape = (3, 2, 5, 7)
    row = torch.zeros(1, S.em_row_width(1))
    row[0, S.COL_NX] = 1.0
    seeds = torch.tensor([0, 1, 2 ** 40 + 5], dtype=torch.int64)
    z = torch.zeros(2, *shape, device=dev)
    x = torch.full(shape, float("nan"), device=dev)
    ops.em_step(z, torch.zeros(shape, device=dev), x, row.to(dev), 0, seeds.to(dev), backend=backend)
    want = philox_normal(seeds, 0, STREAM_EM, 2 * 5 * 7).reshape(shape)
    torch.testing.assert_close(z[0].cpu(), want, rtol=2e-6, atol=2e-6)   # float32 log/cos ulps only
    # and the step counter matters: step 1 gives other numbers
    assert not torch.allclose(philox_normal(seeds, 1, STREAM_EM, 70), want.reshape(3, -1))


@pytest.mark.parametrize("backend", FAST + ["torch"])
@pytest.mark.parametrize("K", [0, 1, 3, 5])
def test_prior_matches_reference(backend, K):
    dev = device_for(backend_or_skip(backend))
    dyn = make_dynamics("fvp", hurst=0.9 if K else 0.5, num_aug=K)
    p64 = torch.tensor(S.prior_vector(dyn, 1.0), dtype=torch.float64)
    shape = (5, 3, 7, 9)
    seeds = torch.arange(10, 15, dtype=torch.int64)
    noise = torch.stack([philox_normal(seeds, 0, STREAM_PRIOR, 189, component=j).reshape(shape) for j in range(K + 1)])
    z64, x64 = torch.empty(K + 1, *shape, dtype=torch.float64), torch.empty(shape, dtype=torch.float64)
    ref.prior_planar(z64, x64, p64, noise=noise.double())
    z32, x32 = torch.empty(K + 1, *shape), torch.empty(shape)
    ref.prior_planar(z32, x32, p64.float(), seeds)
    z = torch.full((K + 1, *shape), float("nan"), device=dev)
    x = torch.full(shape, float("nan"), device=dev)
    ops.prior_draw(z, x, p64.float().to(dev), seeds.to(dev), backend=backend)
    assert_calibrated(z, z32, z64, f"prior z {backend} K={K}")
    assert_calibrated(x, x32, x64, f"prior x_in {backend} K={K}")


@pytest.mark.parametrize("backend", FAST + ["torch"])
def test_noising_matches_reference(backend, seed):
    dev = device_for(backend_or_skip(backend))
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(5, 3, 7, 9, generator=gen, dtype=torch.float64) * 2 - 1
    c = torch.rand(5, generator=gen, dtype=torch.float64)
    sig = torch.rand(5, generator=gen, dtype=torch.float64)
    seeds = torch.arange(5, dtype=torch.int64) * 7919
    eps = philox_normal(seeds, 11, STREAM_TRAIN, 189).reshape(x0.shape).double()
    x64, _ = ref.noising(x0, c, sig, eps=eps)
    x32, e32 = ref.noising(x0.float(), c.float(), sig.float(), seeds, 11)
    x, e = ops.noising(x0.float().to(dev), c.float().to(dev), sig.float().to(dev), seeds.to(dev), 11, backend=backend)
    assert_calibrated(x, x32, x64, f"noising {backend}")
    torch.testing.assert_close(e.cpu(), e32, rtol=2e-6, atol=2e-6)
    given = torch.randn(x0.shape, generator=gen)
    x, e = ops.noising(x0.float().to(dev), c.float().to(dev), sig.float().to(dev), eps=given.to(dev), backend=backend)
    assert torch.equal(e.cpu(), given)
    torch.testing.assert_close(x.cpu(), (c[:, None, None, None] * x0 + sig[:, None, None, None] * given).float())


def test_bad_input_messages():
    t32, _ = _table(2, "sde")
    z = torch.zeros(3, 2, 1, 4, 4)
    e, x, seeds = torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"z must be the planar augmented state"):
        ops.em_step(z[0], e, x, t32, 0, seeds)
    with pytest.raises(ValueError, match=r"e must have shape \(2, 1, 4, 4\)"):
        ops.em_step(z, e[:1], x, t32, 0, seeds)
    with pytest.raises(ValueError, match="e must be torch.float32"):
        ops.em_step(z, e.double(), x, t32, 0, seeds)
    with pytest.raises(ValueError, match="x_in must be contiguous"):
        ops.em_step(z, e, torch.zeros(2, 1, 4, 8)[..., ::2], t32, 0, seeds)
    with pytest.raises(ValueError, match="built for|rows of"):
        ops.em_step(torch.zeros(4, 2, 1, 4, 4), e, x, t32, 0, seeds)   # table from another dynamics (K=2 vs 3)
    with pytest.raises(ValueError, match="seeds must have shape"):
        ops.em_step(z, e, x, t32, 0, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="pass per-image seeds"):
        ops.em_step(z, e, x, t32, 0)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        ops.em_step(z, e, x, t32, 0, seeds, backend="gpu")
    with pytest.raises(ValueError, match="backend 'cuda' is not available on cpu"):
        ops.em_step(z, e, x, t32, 0, seeds, backend="cuda")
    with pytest.raises(ValueError, match="prior must hold"):
        ops.prior_draw(torch.zeros(4, 2, 1, 4, 4), x, t32, seeds)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="is on cuda"):
            ops.em_step(z, e.cuda(), x, t32, 0, seeds)


def test_ops_trace_under_torch_compile():
    """The custom ops have fake implementations: a compiled step has no graph break."""
    t32, _ = _table(2, "sde")
    z = torch.randn(3, 2, 1, 4, 4)
    e, seeds = torch.randn(2, 1, 4, 4), torch.arange(2)

    def step(z, e, x, n):
        ops.em_step(z, e, x, t32.table, n, seeds, backend="torch")
        return x

    z1, x1 = z.clone(), torch.empty(2, 1, 4, 4)
    step(z1, e, x1, 3)
    z2, x2 = z.clone(), torch.empty(2, 1, 4, 4)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    compiled(z2, e, x2, torch.tensor(3))
    torch.testing.assert_close(z2, z1)
    torch.testing.assert_close(x2, x1)


# ---- backends, step index -----------------------------------------------------------------------
def test_backend_status_names_every_backend_and_why():
    st = ops.backend_status("cpu")
    assert set(st) == set(ops.BACKENDS)
    assert st["torch"] == "ok" and st["cpp"] == "ok", st
    assert st["triton"] == "ok", st                      # interpreted (conftest sets TRITON_INTERPRET without a GPU)
    assert st["cuda"] != "ok" and "CUDA" in st["cuda"], st


def _exp_case(K=1, order=2, steps=4):
    from gfdm_fast.expint import build_exp_table
    dyn = make_dynamics("fvp", hurst=0.7, num_aug=K)
    t = build_exp_table(dyn, steps, mode="sde", order=order, grid="logsnr", substeps=4, dtype=torch.float32)
    shape = (2, 1, 3, 5)
    return t, shape, torch.randn(K + 1, *shape), torch.randn(shape), torch.randn(max(order - 1, 1), *shape)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton", CUDA])
def test_host_step_outside_the_table_is_one_clear_error(backend):
    dev = device_for(backend_or_skip(backend))
    t32, _ = _table(1, "sde", steps=5)
    z, e, x = (torch.zeros(s, device=dev) for s in ((2, 2, 1, 3, 5), (2, 1, 3, 5), (2, 1, 3, 5)))
    seeds = torch.arange(2, device=dev)
    for bad in (5, -1, 2 ** 40):
        with pytest.raises(ValueError, match=rf"step {bad} is outside the step table \(5 steps\)"):
            ops.em_step(z, e, x, t32.table.to(dev), bad, seeds, backend=backend)
    te, shape, z, e, h = _exp_case()
    with pytest.raises(ValueError, match=r"step 4 is outside the step table \(4 steps\)"):
        ops.exp_step(z.to(dev), e.to(dev), torch.zeros(shape, device=dev), h.to(dev), te.to(dev), 4, seeds,
                     backend=backend)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton", CUDA])
@pytest.mark.parametrize("bad", [5, -1])
def test_device_step_outside_the_table_raises_or_poisons(backend, bad):
    """A step index read on the device cannot raise without a sync: Triton and CUDA write NaN everywhere;
    the CPU backends (torch, cpp) read it on the host and raise."""
    dev = device_for(backend_or_skip(backend))
    t32, _ = _table(1, "sde", steps=5)
    z, e, x = torch.randn(2, 2, 1, 3, 5), torch.randn(2, 1, 3, 5), torch.zeros(2, 1, 3, 5)
    te, shape, ze, ee, h = _exp_case(steps=5)
    z, e, x, ze, ee, h = (v.to(dev) for v in (z, e, x, ze, ee, h))
    xe, seeds, step = torch.randn(shape, device=dev), torch.arange(2, device=dev), torch.tensor(bad, device=dev)
    if backend in ("triton", "cuda"):
        ops.em_step(z, e, x, t32.table.to(dev), step, seeds, backend=backend)
        assert z.isnan().all() and x.isnan().all()
        ops.exp_step(ze, ee, xe, h, te.to(dev), step, seeds, backend=backend)
        assert ze.isnan().all() and xe.isnan().all() and h.isnan().all()
    else:
        with pytest.raises((RuntimeError, IndexError)):
            ops.em_step(z, e, x, t32.table, step, seeds, backend=backend)
        with pytest.raises((RuntimeError, IndexError)):
            ops.exp_step(ze, ee, xe, h, te, step, seeds, backend=backend)


def test_host_steps_are_views_of_one_device_tensor():
    """An int step costs no host-to-device copy: it indexes a cached arange on the state's device."""
    a, b = ops.step_tensor(3, "cpu", 10), ops.step_tensor(7, "cpu", 10)
    assert a.dim() == 0 and a.dtype == torch.int64 and int(a) == 3 and int(b) == 7
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# ---- custom-op contracts (CPU here; the gpu suite repeats them on CUDA) --------------------------
def _op_samples(dev, backend):
    """One (op, args) per registered custom op (torch.ops.gfdm.*), with fresh inputs on ``dev``."""
    t32, _ = _table(2, "sde", steps=4)
    shape = (2, 1, 3, 5)
    seeds = torch.arange(2, device=dev)
    step = torch.tensor(1, device=dev)
    te, _, ze, ee, h = _exp_case(K=2, order=3, steps=4)
    p = torch.tensor(S.prior_vector(make_dynamics("fvp", hurst=0.7, num_aug=2), 1.0), dtype=torch.float32)
    c = torch.rand(2, device=dev)
    gfdm = torch.ops.gfdm

    def state(k1=3):
        return torch.randn(k1, *shape, device=dev)

    def zeros():
        return torch.zeros(shape, device=dev)

    return [
        (gfdm.em_step, (state(), torch.randn(shape, device=dev), zeros(), t32.table.to(dev), step, seeds, None,
                        backend)),
        (gfdm.prior, (state().zero_(), zeros(), p.to(dev), seeds, None, backend)),
        (gfdm.noising, (torch.randn(shape, device=dev), c, c, seeds, step, zeros(), zeros(), None, backend)),
        (gfdm.exp_step, (ze.to(dev), ee.to(dev), torch.randn(shape, device=dev), h.to(dev), te.table.to(dev), step, 3,
                         seeds, None, True, backend)),
    ]


@pytest.mark.parametrize("backend", ["cpp", pytest.param("cuda", marks=pytest.mark.gpu),
                                     pytest.param("triton", marks=pytest.mark.gpu)])
def test_opcheck_every_op(backend):
    """torch.library.opcheck: schema (declared mutations), fake tensors, autograd registration, AOT dispatch."""
    dev = device_for(backend_or_skip(backend))
    for op, args in _op_samples(dev, backend):
        torch.library.opcheck(op, args)


# ---- the GPU suite (pytest -m gpu) ----------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_inductor_compiles_a_step_through_the_custom_ops(backend):
    """torch.compile with the default (inductor) backend over a network + fused step: no graph break, and the
    fused op gives the eager bits (the network term is computed once, outside, so that inductor's own
    rounding of it does not enter the comparison)."""
    backend_or_skip(backend)
    t32, _ = _table(2, "sde")
    table = t32.table.cuda()
    z0, seeds = torch.randn(3, 2, 1, 8, 8, device="cuda"), torch.arange(2, device="cuda")
    e = torch.tanh(z0[0]) * 0.5

    def step(z, e, x, n):
        ops.em_step(z, e * 1.0, x, table, n, seeds, backend=backend)
        return x

    z1, x1 = z0.clone(), z0[0].clone()
    step(z1, e, x1, 3)
    z2, x2 = z0.clone(), z0[0].clone()
    torch._dynamo.reset()
    torch.compile(step, fullgraph=True)(z2, e, x2, torch.tensor(3, device="cuda"))
    torch.testing.assert_close(z2, z1, rtol=0, atol=0)
    torch.testing.assert_close(x2, x1, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("solver", ["em", "exp"])
def test_sampler_steps_make_no_host_sync(backend, solver):
    """torch.cuda.set_sync_debug_mode('error') over whole eager and CUDA-graphed step loops."""
    from gfdm_fast import Sampler
    backend_or_skip(backend)
    dyn = make_dynamics("fvp", hurst=0.9, num_aug=2)
    def net(x, s, y):
        return torch.tanh(x) * (0.5 + s.reshape(-1, 1, 1, 1) / 1998)
    outs = []
    for graphs in (False, True):
        smp = Sampler(dyn, net, steps=6, device="cuda", backend=backend, solver=solver, cuda_graphs=graphs)
        seeds = torch.arange(4, device="cuda")
        z = torch.zeros(3, 4, 1, 8, 8, device="cuda")
        x = torch.zeros(4, 1, 8, 8, device="cuda")
        ops.prior_draw(z, x, smp.table.prior, seeds, backend=backend)
        smp.run(z.clone(), x.clone(), seeds=seeds)   # Triton's compile and the graph capture: outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            smp.run(z, x, seeds=seeds)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        outs.append(z.cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("K", range(9))
def test_cpp_and_cuda_give_the_same_bits(K):
    """csrc/gfdm_shared.h's claim: the C++ and CUDA backends run the same per-pixel code with no FMA
    contraction, so for the specialised K <= 8 they give the same bits (em sde, prior, exp order 3 sde)."""
    from gfdm_fast.expint import build_exp_table
    backend_or_skip("cuda")
    dyn = make_dynamics("fve" if K % 2 else "fvp", hurst=0.7 if K else 0.5, num_aug=K)
    shape, seeds = (3, 2, 9, 11), torch.tensor([4, -7, 2 ** 40])
    em = S.build_em_table(dyn, 6, mode="sde", dtype=torch.float32)
    ex = build_exp_table(dyn, 6, mode="sde", order=3, grid="logsnr", substeps=8, dtype=torch.float32)
    z0, e, h0 = torch.randn(K + 1, *shape), torch.randn(shape), torch.randn(2, *shape)
    outs = {}
    for be, dev in (("cpp", "cpu"), ("cuda", "cuda")):
        z, x = z0.to(dev, copy=True), torch.empty(shape, device=dev)      # the ops write their inputs
        ops.em_step(z, e.to(dev), x, em.table.to(dev), 3, seeds.to(dev), backend=be)
        zp, xp = torch.empty_like(z), torch.empty_like(x)
        ops.prior_draw(zp, xp, em.to(dev), seeds.to(dev), backend=be)
        ze, xe, h = z0.to(dev, copy=True), e.to(dev, copy=True), h0.to(dev, copy=True)
        ops.exp_step(ze, e.to(dev), xe, h, ex.to(dev), 4, seeds.to(dev), backend=be)
        outs[be] = [t.cpu() for t in (z, x, zp, xp, ze, xe, h)]
    for name, a, b in zip(("em z", "em x_in", "prior z", "prior x_in", "exp z", "exp x_in", "exp hist"),
                          outs["cpp"], outs["cuda"]):
        assert torch.equal(a, b), f"K={K} {name}: max |cpp - cuda| = {(a - b).abs().max().item():.3g}"


def test_cpp_avx2_noise_is_bit_equal_to_the_scalar_code(tmp_path):
    """The AVX2 Philox path (intrinsics) and the scalar code of csrc/gfdm_shared.h (GFDM_CPU_ISA=generic,
    what the CUDA kernels run) give the same bits on 2^20 normals."""
    import subprocess
    import sys
    backend_or_skip("cpp")
    from gfdm_fast import _C
    if _C.cpu_isa() != "avx2":
        pytest.skip("this CPU has no AVX2+FMA: only the scalar path exists here")
    x0, c = torch.zeros(4, 1, 512, 512), torch.ones(4)
    seeds = torch.tensor([0, 7, -(2 ** 61), 2 ** 40 + 3])
    _, eps = ops.noising(x0, c, c, seeds, 123, backend="cpp")
    code = ("import sys, torch; from gfdm_fast import ops, _C; assert _C.cpu_isa() == 'generic'\n"
            "_, e = ops.noising(torch.zeros(4, 1, 512, 512), torch.ones(4), torch.ones(4), "
            f"torch.tensor({seeds.tolist()}), 123, backend='cpp'); torch.save(e, sys.argv[1])")
    env = dict(os.environ, GFDM_CPU_ISA="generic")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "e.pt")], env=env, capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    generic = torch.load(tmp_path / "e.pt")
    diff = (generic != eps).sum().item()
    assert diff == 0, f"{diff} of {eps.numel()} normals differ between the AVX2 and the scalar path"
