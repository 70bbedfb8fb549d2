"""Checks specific to the Triton kernels (kernels/): Philox known answers, block boundaries, K = 8, device step.

The op-by-op comparison of every backend with the reference lives in test_ops.py. Without a CUDA
device the interpreter (TRITON_INTERPRET=1, set by conftest only then) runs the kernels on CPU
tensors; the ``gpu`` tests run them compiled and skip without a CUDA device. The AOT test compiles
them for sm_90/sm_80 here (benchmarks/triton_aot.py).
"""
import os

import pytest
import torch
from test_ops import assert_calibrated, device_for

from gfdm_fast import make_dynamics, ops
from gfdm_fast import reference as ref
from gfdm_fast import schedule as S
from gfdm_fast.layout import STREAM_EM, STREAM_PRIOR, STREAM_TRAIN
from gfdm_fast.philox import philox4x32, philox_normal

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402 (after the skip: triton is optional)

from gfdm_fast.kernels import philox as kphilox  # noqa: E402

# These run on CUDA tensors (compiled) with a GPU, else on CPU tensors under the interpreter.
DEV = device_for("triton")
interpreted = pytest.mark.skipif(DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="CPU tensors need TRITON_INTERPRET=1")

# Random123 known-answer vectors for philox4x32-10: (c0, c1, c2, c3, k0, k1) -> (x0, x1, x2, x3)
PHILOX_KAT = [
    ((0, 0, 0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 6, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
ODD = (3, 3, 33, 31)          # 9207 pixels: several blocks and a ragged tail


@triton.jit
def _philox_words_kernel(inp_ptr, out_ptr, N: tl.constexpr):
    """Raw Philox words of N (counter, key) rows given as int64 (c0, c1, c2, c3, k0, k1)."""
    i = tl.arange(0, N)
    c0 = tl.load(inp_ptr + 6 * i).to(tl.uint32)
    c1 = tl.load(inp_ptr + 6 * i + 1).to(tl.uint32)
    c2 = tl.load(inp_ptr + 6 * i + 2).to(tl.uint32)
    c3 = tl.load(inp_ptr + 6 * i + 3).to(tl.uint32)
    k0 = tl.load(inp_ptr + 6 * i + 4).to(tl.uint32)
    k1 = tl.load(inp_ptr + 6 * i + 5).to(tl.uint32)
    x0, x1, x2, x3 = kphilox.philox4x32_10(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + 4 * i, x0.to(tl.int64))
    tl.store(out_ptr + 4 * i + 1, x1.to(tl.int64))
    tl.store(out_ptr + 4 * i + 2, x2.to(tl.int64))
    tl.store(out_ptr + 4 * i + 3, x3.to(tl.int64))


@triton.jit
def _philox_normal_kernel(seeds_ptr, out_ptr, step, CHW, N, STREAM: tl.constexpr, BLOCK: tl.constexpr):
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = p < N
    seed = tl.load(seeds_ptr + p // CHW, mask=mask, other=0)
    tl.store(out_ptr + p, kphilox.philox_normal(p % CHW, step, STREAM, 0, seed), mask=mask)


def _philox_words(rows, device):
    inp = torch.tensor(rows, dtype=torch.int64, device=device)
    n = triton.next_power_of_2(len(rows))
    inp = torch.cat([inp, inp[:1].expand(n - len(rows), 6)]) if n > len(rows) else inp
    out = torch.zeros(n, 4, dtype=torch.int64, device=device)
    _philox_words_kernel[(1,)](inp.contiguous(), out, N=n)
    return out[:len(rows)].cpu()


def _check_kat(device):
    got = _philox_words([c for c, _ in PHILOX_KAT], device)
    for (ctr, want), row in zip(PHILOX_KAT, got.tolist()):
        assert tuple(row) == want, f"philox4x32-10{ctr}: got {[hex(x) for x in row]}, want {[hex(x) for x in want]}"


def _check_words_match_reference(device):
    gen = torch.Generator().manual_seed(7)
    rows = torch.randint(0, 2 ** 32, (64, 6), generator=gen, dtype=torch.int64)
    got = _philox_words(rows.tolist(), device)
    want = torch.stack(philox4x32(*rows.unbind(1)), dim=1)
    assert torch.equal(got, want), f"{int((got != want).any(1).sum())} of 64 random counters differ"


def _check_normal_matches_reference(device, stream):
    seeds = torch.tensor([0, 1, -1, 2 ** 63 - 1, -(2 ** 40) + 17], dtype=torch.int64)   # both key halves, signs
    chw = 333
    out = torch.full((5 * chw,), float("nan"), device=device)
    _philox_normal_kernel[(triton.cdiv(out.numel(), 256),)](seeds.to(device), out, 2 ** 32 + 9, chw, out.numel(),
                                                            STREAM=stream, BLOCK=256)
    want = philox_normal(seeds, 9, stream, chw).reshape(-1)      # the step counter is step mod 2^32
    torch.testing.assert_close(out.cpu(), want, rtol=2e-6, atol=2e-6)


def _tables(K, mode, name, steps=10):
    dyn = make_dynamics(name, hurst=0.7 if K else 0.5, num_aug=K)
    return (S.build_em_table(dyn, steps, mode=mode, dtype=torch.float32),
            S.build_em_table(dyn, steps, mode=mode, dtype=torch.float64))


def _check_em_step(device, K, mode, name, shape, step):
    gen = torch.Generator().manual_seed(100 + K)
    t32, t64 = _tables(K, mode, name)
    z0 = torch.randn(K + 1, *shape, generator=gen, dtype=torch.float64)
    e = torch.randn(*shape, generator=gen, dtype=torch.float64)
    seeds = torch.randint(-(2 ** 62), 2 ** 62, (shape[0],), generator=gen)
    noise64 = philox_normal(seeds, step, STREAM_EM, z0[0, 0].numel()).reshape(shape).double()
    z64, x64 = z0.clone(), torch.empty(shape, dtype=torch.float64)
    ref.em_step_planar(z64, e, x64, t64.table, step, noise=noise64)
    z32, x32 = z0.float(), torch.empty(shape)
    ref.em_step_planar(z32, e.float(), x32, t32.table, step, seeds)
    z, x = z0.float().to(device), torch.full(shape, float("nan"), device=device)
    # the step as a 0-d device tensor: read on the device, as a captured CUDA graph replays it
    ops.em_step(z, e.float().to(device), x, t32.table.to(device), torch.tensor(step, device=device),
                seeds.to(device), backend="triton")
    tag = f"K={K} {mode} {shape} step={step}"
    assert_calibrated(z, z32, z64, "z " + tag)
    assert_calibrated(x, x32, x64, "x_in " + tag)


# ---- interpreted on CPU tensors, or compiled on a GPU --------------------------------------------
@interpreted
def test_philox_known_answers():
    _check_kat(DEV)


@interpreted
def test_philox_words_match_reference():
    _check_words_match_reference(DEV)


@interpreted
@pytest.mark.parametrize("stream", [STREAM_EM, STREAM_TRAIN])
def test_philox_normal_matches_reference(stream):
    _check_normal_matches_reference(DEV, stream)


@interpreted
@pytest.mark.parametrize("K,mode,name,step", [(8, "sde", "fvp", 3), (2, "sde", "fve", 0), (3, "ode", "fvp", 9)])
def test_em_step_odd_size_across_blocks(K, mode, name, step):
    _check_em_step(DEV, K, mode, name, ODD, step)


@interpreted
def test_em_step_without_noise_ignores_seeds():
    """ode rows (nx = ny = 0) skip the Philox work: any seeds give the result of zero explicit noise."""
    t32, _ = _tables(2, "ode", "fvp")
    shape = (2, 3, 5, 7)
    z0, e = torch.randn(3, *shape, device=DEV), torch.randn(shape, device=DEV)
    outs = []
    for seeds, noise in ((torch.tensor([1, 2]), None), (torch.tensor([-5, 2 ** 50]), None), (None, torch.zeros(shape))):
        seeds, noise = (None if v is None else v.to(DEV) for v in (seeds, noise))
        z, x = z0.clone(), torch.full(shape, float("nan"), device=DEV)
        ops.em_step(z, e, x, t32.table.to(DEV), 4, seeds, noise, backend="triton")
        outs.append((z, x))
    for z, x in outs[1:]:
        assert torch.equal(z, outs[0][0]) and torch.equal(x, outs[0][1])


@interpreted
def test_em_step_single_pixel_images():
    """C = H = W = 1 (CHW = 1) and B = 1: degenerate strides still index correctly."""
    _check_em_step(DEV, 1, "sde", "fvp", (1, 1, 1, 1), 2)
    _check_em_step(DEV, 1, "sde", "fvp", (7, 1, 1, 1), 2)


@interpreted
@pytest.mark.parametrize("K", [2, 8])
def test_prior_odd_size(K):
    dyn = make_dynamics("fve", hurst=0.7, num_aug=K)
    p64 = torch.tensor(S.prior_vector(dyn, 1.0), dtype=torch.float64)
    shape = (3, 3, 11, 31)                                   # 1023 pixels: a ragged last block
    seeds = torch.tensor([3, -(2 ** 60), 2 ** 33], dtype=torch.int64)
    numel = 3 * 11 * 31
    noise = torch.stack([philox_normal(seeds, 0, STREAM_PRIOR, numel, component=j).reshape(shape)
                         for j in range(K + 1)])
    z64, x64 = torch.empty(K + 1, *shape, dtype=torch.float64), torch.empty(shape, dtype=torch.float64)
    ref.prior_planar(z64, x64, p64, noise=noise.double())
    z32, x32 = torch.empty(K + 1, *shape), torch.empty(shape)
    ref.prior_planar(z32, x32, p64.float(), seeds)
    z, x = torch.full((K + 1, *shape), float("nan"), device=DEV), torch.full(shape, float("nan"), device=DEV)
    ops.prior_draw(z, x, p64.float().to(DEV), seeds.to(DEV), backend="triton")
    assert_calibrated(z, z32, z64, f"prior z K={K}")
    assert_calibrated(x, x32, x64, f"prior x_in K={K}")
    # explicit noise: the same draw, to float32 rounding (x_in = X - alpha.Y cancels, so compare calibrated)
    z2, x2 = torch.full_like(z, float("nan")), torch.full_like(x, float("nan"))
    ops.prior_draw(z2, x2, p64.float().to(DEV), noise=noise.to(DEV), backend="triton")
    assert_calibrated(z2, z32, z64, f"prior z K={K} explicit noise")
    assert_calibrated(x2, x32, x64, f"prior x_in K={K} explicit noise")


@interpreted
@pytest.mark.parametrize("shape", [ODD, (4, 1000)])
def test_noising_odd_shapes(shape):
    gen = torch.Generator().manual_seed(11)
    x0 = torch.rand(shape, generator=gen) * 2 - 1
    c, sig = torch.rand(shape[0], generator=gen), torch.rand(shape[0], generator=gen)
    seeds = torch.randint(-(2 ** 62), 2 ** 62, (shape[0],), generator=gen)
    x, e = ops.noising(x0.to(DEV), c.to(DEV), sig.to(DEV), seeds.to(DEV), torch.tensor(5, device=DEV),
                       backend="triton")
    x, e = x.cpu(), e.cpu()
    x_ref, e_ref = ref.noising(x0, c, sig, seeds, 5)
    torch.testing.assert_close(e, e_ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(x, x_ref, rtol=2e-6, atol=2e-6)


@interpreted
def test_64bit_offsets_give_the_same_result(monkeypatch):
    """The WIDE (int64 offset) variants, forced on small tensors, agree bit for bit with the int32 ones."""
    import gfdm_fast.kernels.em_step as k_em
    import gfdm_fast.kernels.noising as k_noising
    import gfdm_fast.kernels.prior as k_prior
    K, shape = 2, (2, 3, 5, 7)
    t32, _ = _tables(K, "sde", "fvp")
    p32 = torch.tensor(S.prior_vector(make_dynamics("fvp", hurst=0.7, num_aug=K), 1.0), dtype=torch.float32)
    z0, e = torch.randn(K + 1, *shape, device=DEV), torch.randn(shape, device=DEV)
    seeds = torch.tensor([4, -9], device=DEV)

    def run():
        z, x = z0.clone(), torch.empty(shape, device=DEV)
        ops.em_step(z, e, x, t32.table.to(DEV), 3, seeds, backend="triton")
        zp, xp = torch.empty_like(z0), torch.empty(shape, device=DEV)
        ops.prior_draw(zp, xp, p32.to(DEV), seeds, backend="triton")
        xn, en = ops.noising(e, seeds.float(), seeds.float(), seeds, 2, backend="triton")
        return z, x, zp, xp, xn, en

    narrow = run()
    for mod in (k_em, k_prior, k_noising):
        monkeypatch.setattr(mod, "INDEX_LIMIT", 0)
    for a, b in zip(narrow, run()):
        assert torch.equal(a, b)


# ---- native GPU -----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("K,mode,name,step", [(0, "sde", "fvp", 1), (3, "sde", "fve", 4), (5, "ode", "fvp", 2),
                                              (8, "sde", "fvp", 3), (3, "sde", "fvp", 9)])
def test_em_step_gpu(K, mode, name, step):
    _check_em_step("cuda", K, mode, name, (8, 3, 32, 33), step)


@pytest.mark.gpu
def test_em_step_gpu_cuda_graph():
    """A captured step replays with the step counter advanced on the device, no host sync."""
    K, shape = 2, (4, 3, 16, 16)
    t32, _ = _tables(K, "sde", "fvp")
    table = t32.table.cuda()
    seeds = torch.arange(4, device="cuda")
    z0, e = torch.randn(K + 1, *shape, device="cuda"), torch.randn(shape, device="cuda")
    z, x, step = z0.clone(), torch.empty(shape, device="cuda"), torch.zeros((), dtype=torch.int64, device="cuda")
    ops.em_step(z, e, x, table, step, seeds, backend="triton")           # compile outside the capture
    torch.cuda.synchronize()
    z.copy_(z0)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ops.em_step(z, e, x, table, step, seeds, backend="triton")
        step.add_(1)
    z.copy_(z0)
    step.zero_()
    for _ in range(3):
        g.replay()
    zr, xr = z0.clone(), torch.empty_like(x)
    for n in range(3):
        ops.em_step(zr, e, xr, table, n, seeds, backend="triton")
    torch.cuda.synchronize()
    torch.testing.assert_close(z, zr, rtol=0, atol=0)
    torch.testing.assert_close(x, xr, rtol=0, atol=0)


# ---- ahead-of-time compile for real GPUs (no GPU needed) --------------------------------------------
def test_aot_compile_for_sm90_and_sm80_has_no_spills(tmp_path):
    """benchmarks/triton_aot.py --subset compiles a representative set of the launched specialisations
    (K = 0, 1, 3, 8; sde/ode; narrow offsets) for sm_90a and sm_80 with ptxas: no spills, and the tile
    kernels (exp_step, prior) within 72 registers (the full set: run the script without --subset)."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "benchmarks/triton_aot.py", "--subset", "--arch", "90", "80", "--jobs", "2",
                           "--json", str(out)], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["arch"] for r in rows} == {"sm_90a", "sm_80"}
    assert {r["kernel"] for r in rows} == {"em_step", "prior", "noising", "exp_step"}
    assert {r["K"] for r in rows if r["kernel"] == "exp_step"} >= {0, 3, 8}
    for r in rows:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        if r["kernel"] in ("exp_step", "prior"):
            assert r["registers"] <= 72, r
