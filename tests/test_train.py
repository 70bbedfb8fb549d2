"""Training loop: the loss falls, official-layout outputs load strictly, --resume is bit-exact,
2-process gloo DDP equals 1 process with accumulation, reduced == joint loss in expectation."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from gfdm_fast import checkpoint as ckpt
from gfdm_fast import make_dynamics, reference
from gfdm_fast.train import TrainConfig, train

from conftest import standin_net

TINY_NET = dict(model_channels=8, num_res_blocks=1, channel_mult="1,2", attn_resolutions="2", dropout=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bars_npz(tmp_path_factory):
    """32 images 8x8: a horizontal (label 0) or vertical (label 1) bar at a random place."""
    rng = np.random.default_rng(0)
    imgs = np.zeros((32, 8, 8, 1), np.uint8)
    labels = rng.integers(0, 2, 32)
    for i, (lab, pos) in enumerate(zip(labels, rng.integers(1, 7, 32))):
        if lab:
            imgs[i, :, pos - 1:pos + 1] = 255
        else:
            imgs[i, pos - 1:pos + 1, :] = 255
    path = tmp_path_factory.mktemp("data") / "bars.npz"
    np.savez(path, images=imgs, labels=labels)
    return str(path)


def _cfg(tmp_path, data, **kw):
    base = dict(data_name="npz", data_dir=data, num_classes=2, batch_size=8, lr=2e-3, seed=3,
                output_dir=str(tmp_path / "runs"), wb_id="t", log_every_n_steps=1, log_model_every_n=1000,
                val_check_interval=0, device="cpu", progress=False, **TINY_NET)
    return TrainConfig(**{**base, **kw})


def _log(run_dir):
    with open(os.path.join(run_dir, "train_log.csv"), newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def test_loss_falls_and_official_layout(tmp_path, bars_npz):
    """Loss (1.0 at init: the output layer starts at zero) falls by >= 35% in 40 steps (mean of the last 10
    vs the first 5); files load strictly."""
    res = train(_cfg(tmp_path, bars_npz, train_steps=40, log_model_every_n=20, val_check_interval=40, val_steps=4,
                     val_samples=4))
    losses = [loss for _, loss in _log(res.run_dir)]
    assert len(losses) == 40 and abs(losses[0] - 1.0) < 0.2
    assert np.mean(losses[-10:]) < 0.65 * np.mean(losses[:5]), losses

    run = os.path.join(str(tmp_path), "runs", "t_npz_H0.9_K3")
    assert os.path.abspath(res.run_dir) == os.path.abspath(run)
    mdir = os.path.join(run, "model")
    assert sorted(os.listdir(mdir)) == sorted(
        ["model-v0.pth", "ema_model-v0.pth", "model-v1.pth", "ema_model-v1.pth", "model-final.pth",
         "ema_model-final.pth"])
    meta = json.load(open(os.path.join(run, "gfdm_run.json")))
    assert meta["recipe"] == "exact" and meta["seed"] == 3
    assert meta["dynamics"] == {"name": "fvp", "hurst": 0.9, "num_aug": 3, "gamma_max": 20.0, "norm": True, "T": 1.0}
    config = ckpt.UNetConfig.from_dict(meta["model"])
    assert config.num_classes == 2 and config.image_size == 8

    online = ckpt.load(os.path.join(mdir, "model-final.pth"), config)
    assert online.source == "official" and not online.used_ema
    torch.testing.assert_close(online.model.state_dict(), res.model.state_dict(), rtol=0, atol=0)
    plain = torch.load(os.path.join(mdir, "model-v0.pth"), weights_only=True)
    assert set(plain) == set(res.model.state_dict())                  # a bare state dict, no prefixes
    ema = ckpt.load(os.path.join(mdir, "ema_model-final.pth"), config)
    assert ema.source == "official-ema" and ema.used_ema
    raw = torch.load(os.path.join(mdir, "ema_model-final.pth"), weights_only=True)
    assert int(raw["step"]) == 40 and bool(raw["initted"]) is False   # ema_pytorch warm-up: 100 steps
    state = ckpt.load(os.path.join(run, "train_state.pt"))
    assert state.source == "engine" and state.step == 40 and state.recipe == "exact"
    assert os.path.isfile(os.path.join(run, "samples", "step-0000040.png"))
    assert not [f for f in os.listdir(mdir) if f.endswith(".tmp")]


def test_resume_is_bit_exact(tmp_path, bars_npz):
    """Interrupted at step 4 (after the state of step 4 was saved) and resumed == one run of 8 steps."""
    kw = dict(train_steps=8, log_model_every_n=2, use_lr_scheduler=True, dropout=0.1, num_workers=0)
    full = train(_cfg(tmp_path / "a", bars_npz, **kw))
    part = train(_cfg(tmp_path / "b", bars_npz, **kw), stop_at_step=5)   # dies after step 5, last state at 4
    assert part.step == 5 and not os.path.exists(os.path.join(part.run_dir, "model", "model-final.pth"))
    resumed = train(_cfg(tmp_path / "b", bars_npz, resume=part.run_dir, seed=None, **kw))
    assert resumed.step == 8
    assert _log(resumed.run_dir) == _log(full.run_dir)                 # same losses, bit for bit
    for a, b in ((full.model, resumed.model), (full.ema_model, resumed.ema_model)):
        torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=0, atol=0)
    assert sorted(os.listdir(os.path.join(resumed.run_dir, "model"))) == sorted(
        os.listdir(os.path.join(full.run_dir, "model")))


def test_ddp_two_processes_match_accumulation(tmp_path, bars_npz):
    """torchrun, 2 gloo processes x batch 4 == 1 process x batch 4 x 2 accumulated (same images and noise)."""
    common = ["--data_name", "npz", "--data_dir", bars_npz, "--num_classes", "2", "--batch_size", "4",
              "--train_steps", "3", "--lr", "2e-3", "--seed", "5", "--log_every_n_steps", "1",
              "--log_model_every_n", "1000", "--val_check_interval", "0", "--device", "cpu", "--progress", "False",
              "--wb_id", "d", "--model_channels", "8", "--num_res_blocks", "1", "--channel_mult", "1,2",
              "--attn_resolutions", "2", "--dropout", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gfdm_fast.cli", "train", "--output_dir", str(tmp_path / "ddp"), *common]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    single = train(TrainConfig(**{**_cfg(tmp_path / "one", bars_npz).__dict__, "batch_size": 4, "train_steps": 3,
                                  "lr": 2e-3, "seed": 5, "wb_id": "d", "accumulate_grad_batches": 2,
                                  "dropout": 0.0}))
    ddp_dir = os.path.join(tmp_path, "ddp", "d_npz_H0.9_K3")
    l_ddp, l_one = _log(ddp_dir), _log(single.run_dir)
    assert [s for s, _ in l_ddp] == [1, 2, 3]
    np.testing.assert_allclose([loss for _, loss in l_ddp], [loss for _, loss in l_one], rtol=1e-5)
    ddp_sd = torch.load(os.path.join(ddp_dir, "model", "model-final.pth"), weights_only=True)
    torch.testing.assert_close(ddp_sd, single.model.state_dict(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dynamics, hurst, num_aug", [("fvp", 0.9, 3), ("fve", 0.7, 2)])
def test_reduced_and_joint_loss_agree(dynamics, hurst, num_aug):
    """E[|net(x_in) - target|^2] is the same for the official (K+1)-variate draw and the reduced form."""
    dyn = make_dynamics(dynamics, hurst=hurst, num_aug=num_aug)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    t = torch.tensor([1e-5, 1e-3, 0.05, 0.3, 0.7, 1.0], dtype=torch.float64)
    reps = 4000
    xr, tr = x0.repeat(reps, 1, 1, 1), t.repeat(reps)

    def losses(form):
        x_in, target = reference.training_pair(dyn, xr, tr, form=form, generator=gen)
        err = (standin_net(x_in, 999 * tr) - target) ** 2
        return err.reshape(reps, 6, -1).mean(-1)                      # (reps, time)

    red, joint = losses("reduced"), losses("joint")
    se = torch.sqrt(red.var(0) / reps + joint.var(0) / reps)
    z = (red.mean(0) - joint.mean(0)) / se
    assert bool((z.abs() < 4.5).all()), (red.mean(0), joint.mean(0), z)
    # and the fused op the trainer uses computes the reduced pair itself
    st = dyn.marginal_stats(t)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    from gfdm_fast import ops
    x_in, e = ops.noising(x0.float(), st.mean_scale.float(), st.sigma_c.float(), eps=eps.float())
    ref_in, _ = reference.training_pair(dyn, x0, t, form="reduced", eps=eps)
    torch.testing.assert_close(x_in, ref_in.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device, env, want", [
    ("cuda", {}, 0), ("cuda:1", {}, 1), ("cuda", {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, 1)])
def test_setup_gives_set_device_an_index(monkeypatch, device, env, want):
    """``--device cuda`` reaches torch.cuda.set_device with an index (it refuses a bare 'cuda': found on the
    first H200 run), in one process and under torchrun (cuda:LOCAL_RANK). CUDA is faked: set_device validates
    its argument as torch does."""
    from torch.cuda._utils import _get_device_index

    from gfdm_fast import distributed
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(_get_device_index(d)))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: calls.append(backend))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    dist = distributed.setup(device)
    assert calls == ([want, "nccl"] if env else [want]) and dist.device == torch.device("cuda", want)


# ----------------------------------------------------------------------------- --time_sampling

def _vp_cdf(lam, t_min=1e-5):
    """P(log(sigma/c) <= lam) for VP under t ~ U(t_min, 1), from VP's closed form:
    -log c = (b1 - b0) t^2 / 4 + b0 t / 2 = log(1 + e^(2 lam)) / 2, solved for t."""
    b0, b1 = 0.1, 20.0
    q = 0.5 * np.log1p(np.exp(2 * lam))
    a, b = (b1 - b0) / 4, b0 / 2
    t = (-b + np.sqrt(b * b + 4 * a * q)) / (2 * a)
    return (np.clip(t, t_min, 1.0) - t_min) / (1 - t_min)


@pytest.mark.parametrize("dynamics, hurst, num_aug", [("fvp", 0.9, 3), ("fvp", 0.7, 2), ("fve", 0.7, 2),
                                                      ("fvp", 0.8, 4)])
def test_vp_snr_times_give_vps_noise_levels(dynamics, hurst, num_aug):
    """Under vp_snr the network's log(sigma_c / c) is distributed as VP's under uniform t, restricted to the
    range this dynamics reaches (checked against VP's closed form, not the table): KS distance < 0.012 at
    n = 40,000 (the 99.9% bound is 0.0098)."""
    from gfdm_fast.expint import log_nsr
    from gfdm_fast.loss import TimeMap, draw_times, sample_seeds
    dyn = make_dynamics(dynamics, hurst=hurst, num_aug=num_aug)
    seeds = sample_seeds(11, 0, 40_000)
    t = draw_times(seeds, TimeMap(dyn, "vp_snr"))
    assert t.dtype == torch.float64 and float(t.min()) >= 1e-5 and float(t.max()) <= 1.0
    def ks(times):
        lam = np.sort(log_nsr(dyn, times.numpy()))
        lo, hi = _vp_cdf(lam[0]), _vp_cdf(lam[-1])      # the range reached, in VP's probability
        return np.abs(np.arange(1, len(lam) + 1) / len(lam) - (_vp_cdf(lam) - lo) / (hi - lo)).max()

    assert ks(t) < 0.012
    # uniform t is the official draw, and the same check tells it apart
    assert torch.equal(draw_times(seeds, TimeMap(dyn, "uniform")), draw_times(seeds))
    assert ks(draw_times(seeds)) > 0.05


def test_vp_snr_is_uniform_for_vp_and_depends_on_the_key_only():
    from gfdm_fast.loss import TimeMap, draw_times, sample_seeds
    seeds = sample_seeds(5, 3, 64)
    vp = make_dynamics("fvp", hurst=0.5, num_aug=0)
    assert torch.equal(draw_times(seeds, TimeMap(vp, "vp_snr")), draw_times(seeds))
    fvp = TimeMap(make_dynamics("fvp", hurst=0.9, num_aug=3), "vp_snr")
    full = draw_times(seeds, fvp)
    assert torch.equal(draw_times(seeds[17:40], fvp), full[17:40])      # batching does not change a draw
    with pytest.raises(ValueError, match="uniform, vp_snr"):
        TimeMap(vp, "snr")


def test_mnist5k_recipe_fills_what_was_not_given():
    from gfdm_fast.models.presets import CPU_RECIPE
    from gfdm_fast.train_config import OFFICIAL_DEFAULTS, with_data_recipe
    given = with_data_recipe(TrainConfig(data_name="mnist5k", lr=3e-4, time_sampling="uniform"))
    assert (given.lr, given.batch_size, given.time_sampling) == (3e-4, CPU_RECIPE["batch_size"], "uniform")
    other = with_data_recipe(TrainConfig(data_name="npz"))
    assert (other.lr, other.batch_size, other.time_sampling) == tuple(OFFICIAL_DEFAULTS.values())


def test_time_sampling_is_recorded_and_checked(tmp_path, bars_npz):
    from gfdm_fast.errors import UserError
    res = train(_cfg(tmp_path, bars_npz, train_steps=2, time_sampling="vp_snr"))
    state = torch.load(os.path.join(res.run_dir, "train_state.pt"), weights_only=False)
    assert state["extra"]["train_config"]["time_sampling"] == "vp_snr"
    with pytest.raises(UserError, match="cannot change on a resumed run"):
        train(_cfg(tmp_path, bars_npz, train_steps=3, time_sampling="uniform", resume=res.run_dir,
                   explicit=("time_sampling", "train_steps", "resume")))
    with pytest.raises(UserError, match="--time_sampling must be one of uniform, vp_snr"):
        train(_cfg(tmp_path / "x", bars_npz, train_steps=1, time_sampling="log"))
