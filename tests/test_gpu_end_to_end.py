"""The user's GPU path end to end (the whole module carries the gpu marker and skips without CUDA):
train on cuda, generate from that run on cuda through the CLI (em and exp, fp32, bf16 + CUDA graphs),
the Sampler on cuda against the same Sampler on the CPU, the official-style loop on cuda, and the
streaming FID statistics accumulated on cuda. Measured differences are printed (gpu_check.sh runs
this module with -s, so they reach its log)."""
import json

import numpy as np
import pytest
import torch

from gfdm_fast import make_dynamics
from gfdm_fast import reference as ref
from gfdm_fast.cli import main
from gfdm_fast.models import build_model, config_from_flags
from gfdm_fast.sampler import Sampler

pytestmark = pytest.mark.gpu

NET = ["--model_channels", "8", "--num_res_blocks", "1", "--channel_mult", "1,2", "--attn_resolutions", "2"]


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 convolutions without TF32 (cuDNN's default), so that cuda and CPU are compared at fp32 accuracy."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory):
    """A tiny class-conditional model trained 12 steps on cuda (8 x 8 scikit-learn digits)."""
    tmp = tmp_path_factory.mktemp("gpu")
    rc = main(["train", "--data_name", "digits", *NET, "--batch_size", "16", "--train_steps", "12", "--device", "cuda",
               "--progress", "False", "--val_check_interval", "0", "--log_every_n_steps", "1", "--seed", "3",
               "--output_dir", str(tmp / "runs"), "--wb_id", "g"])
    assert rc == 0
    return tmp


def _shards(out):
    files = sorted(p for p in out.iterdir() if p.name.startswith("samples_"))
    return np.concatenate([np.load(p)["arr_0"] for p in files])


def test_training_on_cuda_writes_a_finite_run_and_its_files(cuda_run):
    run = next((cuda_run / "runs").iterdir())
    meta = json.loads((run / "gfdm_run.json").read_text())
    assert meta["train"]["device"] == "cuda", meta["train"]
    rows = (run / "train_log.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[1]) for r in rows]
    assert len(losses) == 12 and np.isfinite(losses).all(), losses
    assert (run / "model" / "ema_model-final.pth").is_file() and (run / "train_state.pt").is_file()
    print(f"\ncuda training: losses {losses[0]:.4f} -> {losses[-1]:.4f} over 12 steps")


@pytest.mark.parametrize("extra", [["--solver", "em", "--steps", "20"],
                                   ["--solver", "exp", "--steps", "10"],
                                   ["--solver", "exp", "--steps", "10", "--precision", "bf16", "--cuda-graphs"]],
                         ids=["em20", "exp10", "exp10_bf16_graphs"])
def test_generate_on_cuda_matches_the_cpu(cuda_run, tmp_path, extra):
    """The same run, seeds and flags on cuda and on the CPU (Philox noise is the same on every device).
    fp32: the Sampler's cuda-vs-CPU error is ~1e-5 relative (test_sampler_on_cuda_equals_the_cpu_sampler), so a
    uint8 level flips only for a value within that of a rounding boundary: at most one level, on < 1% of pixels.
    bf16: bounded by twice the bf16-vs-fp32 gap of the same run on the CPU, plus one level; CUDA graphs give
    the eager bits. Most pixels of this tiny model saturate at 0 or 255: the float-level comparison is
    test_sampler_on_cuda_equals_the_cpu_sampler; this one proves the CLI path on cuda."""
    def generate(dev, flags):
        out = tmp_path / f"{dev}{len(list(tmp_path.iterdir()))}"
        rc = main(["generate", "--run_id", "g", "--data_name", "digits", "--output_dir", str(cuda_run / "runs"),
                   "--device", dev, "--progress", "False", "--n_samples", "12", "--batch_size", "6",
                   "--shard-size", "6", "--out", str(out), *flags])
        assert rc == 0
        return _shards(out).astype(np.int16)

    fp32 = [f for f in extra if f not in ("--precision", "bf16", "--cuda-graphs")]
    cuda, cpu = generate("cuda", extra), generate("cpu", fp32)
    assert cuda.shape == cpu.shape == (12, 8, 8, 1)
    diff = np.abs(cuda - cpu)
    print(f"\ngenerate {' '.join(extra)}: cuda vs cpu fp32, uint8 levels: max {diff.max()}, mean {diff.mean():.4f}")
    if "--cuda-graphs" in extra:          # a replayed graph runs the eager kernels: the same bits
        assert np.array_equal(generate("cuda", [f for f in extra if f != "--cuda-graphs"]), cuda)
    if "bf16" in extra:
        gap = np.abs(generate("cpu", [*fp32, "--precision", "bf16"]) - cpu).mean()
        print(f"  cpu bf16 vs cpu fp32: mean {gap:.4f} levels")
        assert diff.mean() <= 2 * gap + 1, (diff.mean(), gap)
    else:
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_sampler_on_cuda_equals_the_cpu_sampler(backend):
    """A small UNet, 8 exp steps (order 3: the history ring wraps) and 8 em steps, float32, on cuda with each
    GPU backend against the cpp backend on the CPU. Calibrated like test_ops.assert_calibrated: the bound is
    4x the spread between two CPU backends (cpp, torch) of the same run, which is the float32 rounding of
    this trajectory (measured on an H200: cuda-vs-cpu 1.0-1.2x that spread)."""
    torch.manual_seed(0)
    config = config_from_flags(image_size=8, channels=1, model_channels=16, num_res_blocks=1,
                               channel_mult="1,2", attn_resolutions="2", num_classes=10, dropout=0.0)
    model = build_model(config).eval()
    for p in model.parameters():          # the zero-initialised output layer would make every sample the prior
        p.data.add_(0.02 * torch.randn_like(p))
    dyn = make_dynamics("fvp", hurst=0.9, num_aug=3)
    for solver, kw in (("exp", dict(order=3)), ("em", {})):
        got = {}
        for dev, be in (("cpu", "cpp"), ("cpu", "torch"), ("cuda", backend)):
            smp = Sampler(dyn, model.to(dev), steps=8, mode="sde", solver=solver, backend=be, device=dev,
                          num_classes=10, **kw)
            got[be if dev == "cpu" else dev] = smp.sample(5, (1, 8, 8), seed=11).cpu().double()
        spread = (got["torch"] - got["cpp"]).abs().max().item()
        err = (got["cuda"] - got["cpp"]).abs().max().item()
        bound = 4 * spread + 4 * 2 ** -23 * got["cpp"].abs().max().item()
        print(f"\nSampler {solver} {backend}: max |cuda - cpu| = {err:.3g}, cpu backends' spread {spread:.3g}")
        assert torch.isfinite(got["cuda"]).all() and err <= bound, (err, bound)


def test_official_loop_runs_on_cuda():
    """The official-style reference loop (the benchmarks' baseline) on cuda equals itself on the CPU."""
    dyn = make_dynamics("fvp", hurst=0.9, num_aug=2)
    gen = torch.Generator().manual_seed(1)
    z_T, noise = torch.randn(3, 1, 4, 4, 3, generator=gen), torch.randn(3, 7, 1, 4, 4, generator=gen)

    def net(x, s, y):
        return torch.tanh(x) * (0.5 + s.reshape(-1, 1, 1, 1) / 1998)

    cpu = ref.sample_em(net, dyn, z_T, noise, steps=6)
    cuda = ref.sample_em(net, dyn, z_T.cuda(), noise.cuda(), steps=6).cpu()
    torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-5)


def test_fid_statistics_accumulate_on_cuda_as_on_the_cpu():
    pytest.importorskip("pytorch_fid")   # only this test needs it: the module stays collectable without it
    from gfdm_fast.metrics.fid import FIDAccumulator
    weight = torch.randn(3 * 8 * 8, 16, generator=torch.Generator().manual_seed(2))
    images = torch.rand(40, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    stats = {}
    for dev in ("cpu", "cuda"):
        w = weight.to(dev)
        acc = FIDAccumulator(dims=16, device=dev, extractor=lambda x, w=w: x.flatten(1) @ w)
        for batch in images.split(7):
            acc.update(batch)
        stats[dev] = [torch.as_tensor(s).cpu() for s in acc.stats()]
    for a, b in zip(stats["cuda"], stats["cpu"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
