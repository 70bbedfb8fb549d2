"""Nothing lost, nothing silently wrong: kill -9 and resume, concurrent runs on one folder, planted NaN,
read-only folders, and one clear message per bad input (CLI and Python API)."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gfdm_fast import make_dynamics
from gfdm_fast.cli import main
from gfdm_fast.models import build_model, config_from_flags
from gfdm_fast.runs import LOCK_FILE, FolderLock, new_run_id
from gfdm_fast.sampler import Sampler
from gfdm_fast.train import TrainConfig, Trainer, train

ROOT = Path(__file__).resolve().parents[1]
NET = ["--model_channels", "8", "--num_res_blocks", "1", "--channel_mult", "1,2", "--attn_resolutions", "2"]
TRAIN = ["train", "--data_name", "digits", *NET, "--batch_size", "8", "--progress", "False", "--device", "cpu",
         "--val_check_interval", "0", "--log_every_n_steps", "1", "--seed", "3"]


pytestmark = pytest.mark.usefixtures("one_thread")


def cli(*argv, drop_write=False, wait=True):
    """``python -m gfdm_fast.cli ARGV`` in a subprocess (optionally without root's override of file modes)."""
    cmd = [sys.executable, "-m", "gfdm_fast.cli", *map(str, argv)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if drop_write:   # CI runs as root, which writes anywhere: drop that capability for this process
        cmd = ["capsh", "--drop=cap_dac_override", "--", "-c", " ".join(f"'{c}'" for c in cmd)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def run_dir(tmp, wb_id):
    return tmp / "runs" / f"{wb_id}_digits_H0.9_K3"


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- kill -9, then resume

def test_kill9_during_training_then_resume_is_bit_exact(tmp_path):
    steps = ["--train_steps", "30", "--log_model_every_n", "3", "--lr", "2e-3"]
    rc, _, err = cli(*TRAIN, *steps, "--output_dir", tmp_path / "a" / "runs", "--wb_id", "r")
    assert rc == 0, err
    b = tmp_path / "b"
    proc = cli(*TRAIN, *steps, "--output_dir", b / "runs", "--wb_id", "r", wait=False)
    state = run_dir(b, "r") / "train_state.pt"
    deadline = time.time() + 240
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed; make it longer"
    rc, out, err = cli(*TRAIN, *steps, "--output_dir", b / "runs", "--resume", run_dir(b, "r"))
    assert rc == 0, err
    for name in ("model-final.pth", "ema_model-final.pth"):
        full = weights(run_dir(tmp_path / "a", "r") / "model" / name)
        resumed = weights(run_dir(b, "r") / "model" / name)
        assert full.keys() == resumed.keys()
        assert all(torch.equal(full[k], resumed[k]) for k in full)
    leftovers = [p for p in run_dir(b, "r").rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    rc, _, err = cli(*TRAIN, "--train_steps", "2", "--output_dir", tmp / "runs", "--wb_id", "7")
    assert rc == 0, err
    return tmp


GEN = ["generate", "--run_id", "7", "--data_name", "digits", "--steps", "40", "--device", "cpu", "--progress",
       "False", "--batch_size", "2", "--shard-size", "2"]


def read_shards(out):
    files = sorted(p for p in Path(out).iterdir() if p.name.startswith("samples_"))
    return np.concatenate([np.load(p)["arr_0"] for p in files]), [p.name for p in files]


def test_kill9_during_generation_then_rerun_equals_one_run(trained_run, tmp_path):
    args = [*GEN, "--output_dir", trained_run / "runs", "--n_samples", "40"]
    rc, _, err = cli(*args, "--out", tmp_path / "full")
    assert rc == 0, err
    out = tmp_path / "cut"
    proc = cli(*args, "--out", out, wait=False)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and not (
            out.is_dir() and sum(p.name.startswith("samples_") for p in out.iterdir()) >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed; make it longer"
    rc, stdout, err = cli(*args, "--out", out)
    assert rc == 0, err
    got, names = read_shards(out)
    want, want_names = read_shards(tmp_path / "full")
    assert names == want_names
    np.testing.assert_array_equal(got, want)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- concurrent runs

def test_default_run_ids_do_not_collide():
    ids = {new_run_id() for _ in range(50)}           # same second: the random part tells them apart
    assert len(ids) == 50 and all(len(i.split("-")[-1]) == 6 for i in ids)


def test_two_trainings_started_together_get_their_own_folders(tmp_path):
    procs = [cli(*TRAIN, "--train_steps", "2", "--output_dir", tmp_path / "runs", wait=False) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    folders = sorted(d.name for d in (tmp_path / "runs").iterdir())
    assert len(folders) == 2 and folders[0] != folders[1]


def test_a_live_run_holds_its_folder(tmp_path):
    rc, _, err = cli(*TRAIN, "--train_steps", "2", "--output_dir", tmp_path / "runs", "--wb_id", "x")
    assert rc == 0, err
    folder = run_dir(tmp_path, "x")
    before = (folder / "train_state.pt").read_bytes()
    with FolderLock(folder, "a test holding the run"):
        rc, _, err = cli(*TRAIN, "--train_steps", "4", "--output_dir", tmp_path / "runs", "--resume", folder)
        assert rc == 2 and f"in use by process {os.getpid()}" in err and "a test holding the run" in err, err
        rc, _, err = cli(*TRAIN, "--train_steps", "4", "--output_dir", tmp_path / "runs", "--wb_id", "x")
        assert rc == 2 and "in use by process" in err, err
    assert (folder / "train_state.pt").read_bytes() == before           # untouched
    rc, _, err = cli(*TRAIN, "--train_steps", "4", "--output_dir", tmp_path / "runs", "--wb_id", "x")
    assert rc == 2 and "holds a run: continue it with --resume" in err, err


def test_a_live_generate_holds_its_out_folder(trained_run, tmp_path):
    out = tmp_path / "shared_out"
    with FolderLock(out, "another generate"):
        rc, _, err = cli(*GEN, "--output_dir", trained_run / "runs", "--n_samples", "4", "--out", out)
    assert rc == 2 and "in use by process" in err and "another generate" in err, err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]          # nothing written


def test_stale_temporaries_of_a_killed_run_are_cleaned(trained_run, tmp_path):
    out = tmp_path / "out"
    rc, _, err = cli(*GEN, "--output_dir", trained_run / "runs", "--n_samples", "4", "--out", out, "--max-shards", "1")
    assert rc == 0, err
    (out / ".samples_000002-000004.npz.999-abc.tmp").write_bytes(b"")     # a killed writer's temp file
    official = trained_run / "runs" / "7_digits_H0.9_K3" / "generated_data" / "model-final" / "sde40"
    (official / ".tmp-123456").mkdir(parents=True)                         # a killed official-layout run
    (official / ".tmp-123456" / "data_rank0.npy").write_bytes(b"\0" * 1024)
    rc, _, err = cli(*GEN, "--output_dir", trained_run / "runs", "--n_samples", "4", "--out", out)
    assert rc == 0, err
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    rc, _, err = cli(*GEN, "--output_dir", trained_run / "runs", "--n_samples", "4")
    assert rc == 0, err
    assert not (official / ".tmp-123456").exists()


# ----------------------------------------------------------------------------- NaN

def test_training_stops_at_the_first_nan_and_keeps_the_last_state(tmp_path, monkeypatch):
    cfg = TrainConfig(data_name="digits", model_channels=8, num_res_blocks=1, channel_mult="1,2",
                      attn_resolutions="2", batch_size=8, train_steps=12, log_model_every_n=4, log_every_n_steps=1,
                      val_check_interval=0, device="cpu", progress=False, seed=1, output_dir=str(tmp_path), wb_id="n")
    original = Trainer.loss_on

    def poisoned(self, x0, y, m):
        loss = original(self, x0, y, m)
        return loss * float("nan") if self.step == 5 else loss          # step 6 is the first bad one
    monkeypatch.setattr(Trainer, "loss_on", poisoned)
    with pytest.raises(Exception, match=r"non-finite loss or gradient at step 6.*last saved state \(step 4\)"):
        train(cfg)
    folder = tmp_path / "n_digits_H0.9_K3"
    state = torch.load(folder / "train_state.pt", weights_only=True)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())
    assert not (folder / "model" / "model-final.pth").exists()
    monkeypatch.undo()
    resumed = train(TrainConfig(**{**cfg.__dict__, "resume": str(folder), "explicit": ()}))   # resumable
    assert resumed.step == 12


def test_training_can_skip_nonfinite_steps(tmp_path, monkeypatch, capsys):
    original = Trainer.loss_on
    def loss_nan_at_step_2(self, *a):
        return original(self, *a) * (float("nan") if self.step == 2 else 1)
    monkeypatch.setattr(Trainer, "loss_on", loss_nan_at_step_2)
    res = train(TrainConfig(data_name="digits", model_channels=8, num_res_blocks=1, channel_mult="1,2",
                            attn_resolutions="2", batch_size=8, train_steps=5, log_every_n_steps=1,
                            val_check_interval=0,
                            device="cpu", progress=False, seed=1, output_dir=str(tmp_path), nonfinite="skip"))
    assert res.step == 5 and all(torch.isfinite(p).all() for p in res.model.parameters())
    assert res.skipped == [3]                                 # the step whose loss was NaN (self.step 2 -> step 3)
    assert "dropped 1 step(s)" in capsys.readouterr().out


def test_nan_weights_write_nothing(trained_run, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(trained_run / "runs" / "7_digits_H0.9_K3", runs / "7_digits_H0.9_K3",
                    ignore=shutil.ignore_patterns("generated_data"))
    path = runs / "7_digits_H0.9_K3" / "model" / "ema_model-final.pth"
    sd = torch.load(path, weights_only=True)
    key = next(k for k in sd if k.startswith("ema_model.") and sd[k].is_floating_point() and sd[k].numel() > 1)
    sd[key].view(-1)[0] = float("nan")                                    # one flipped weight
    torch.save(sd, path)
    for extra in (["--out", tmp_path / "out"], []):
        rc, _, err = cli(*GEN, "--output_dir", runs, "--n_samples", "4", *extra)
        assert rc == 2 and "non-finite" in err and len(err.strip().splitlines()) == 1, err
    assert not list((tmp_path / "out").glob("samples_*"))
    assert not list(runs.rglob("data_*.npy"))


def test_nan_statistics_are_refused(tmp_path):
    np.savez(tmp_path / "a.npz", mu=np.zeros(4), sigma=np.eye(4))
    np.savez(tmp_path / "b.npz", mu=np.array([0, np.nan, 0, 0]), sigma=np.eye(4))
    rc, out, err = cli("fid", tmp_path / "a.npz", tmp_path / "b.npz")
    assert rc == 2 and "NaN or inf" in err and "FID:" not in out


def test_official_recipe_breakdown_is_one_message():
    with pytest.raises(ValueError, match="use recipe='exact'"):
        Sampler(make_dynamics("fvp", hurst=0.9, num_aug=6, recipe="official"), lambda x, s, y=None: x, steps=100)


# ----------------------------------------------------------------------------- read-only folders

@pytest.mark.skipif(shutil.which("capsh") is None, reason="capsh (libcap2-bin) drops root's file-mode override")
def test_read_only_output_folder_is_one_message(trained_run, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        cases = [(*TRAIN, "--train_steps", "2", "--output_dir", ro / "runs"),
                 (*GEN, "--output_dir", trained_run / "runs", "--n_samples", "2", "--out", ro / "out"),
                 ("demo", "--out", ro / "demo", "--minutes", "0.01", "--steps", "1", "--num_samples", "2",
                  "--sample_steps", "2", "--progress", "False", "--threads", "1"),
                 ("bench", "--device", "cpu", "--json", ro / "bench.json"),
                 ("fid", "--save-stats", tmp_path / "imgs.npz", ro / "stats.npz")]
        np.savez(tmp_path / "imgs.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
        for argv in cases:
            rc, _, err = cli(*argv, drop_write=True)
            assert rc == 2 and "permission denied; choose a folder you can write to" in err, (argv, err)
            assert len(err.strip().splitlines()) == 1, (argv, err)
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("argv, message", [
    (["generate", "--hurst", "1.5"], "hurst must be a number in (0, 1)"),
    (["generate", "--num_aug", "50"], "num_aug must be an integer in 0..20"),
    ([*TRAIN, "--attn_resolutions", "3"], "3 is no down-sampling rate"),
    ([*TRAIN, "--nonfinite", "ignore"], "invalid choice"),
])
def test_bad_cli_input_is_one_message(argv, message, tmp_path, capsys):
    argv = [*argv, "--output_dir", str(tmp_path)] if argv[0] == "train" else argv
    try:
        rc = main(argv)
    except SystemExit as exit_:          # argparse's own errors
        rc = exit_.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert "Traceback" not in err


def test_resume_of_a_damaged_state_is_one_message(tmp_path):
    rc, _, err = cli(*TRAIN, "--train_steps", "2", "--output_dir", tmp_path / "runs", "--wb_id", "d")
    assert rc == 0, err
    state = run_dir(tmp_path, "d") / "train_state.pt"
    state.write_bytes(state.read_bytes()[:1000])                          # cut short
    rc, _, err = cli(*TRAIN, "--train_steps", "4", "--output_dir", tmp_path / "runs",
                     "--resume", run_dir(tmp_path, "d"))
    assert rc == 2 and "damaged" in err and len(err.strip().splitlines()) == 1, err


def test_resume_applies_safe_flags_and_refuses_the_rest(tmp_path):
    rc, _, err = cli(*TRAIN, "--train_steps", "2", "--output_dir", tmp_path / "runs", "--wb_id", "s")
    assert rc == 0, err
    folder = run_dir(tmp_path, "s")
    rc, _, err = cli(*TRAIN, "--train_steps", "3", "--lr", "5e-3", "--output_dir", tmp_path / "runs",
                     "--resume", folder)
    assert rc == 0, err
    import json
    meta = json.loads((folder / "gfdm_run.json").read_text())
    assert meta["train"]["lr"] == 5e-3 and meta["train"]["train_steps"] == 3
    assert meta["resumed_with"] == {"lr": [2e-4, 5e-3], "train_steps": [2, 3]}
    assert (folder / "train_log.csv").read_text().strip().splitlines()[-1].split(",")[2] == "0.005"
    rc, _, err = cli(*TRAIN, "--train_steps", "4", "--num_aug", "2", "--output_dir", tmp_path / "runs",
                     "--resume", folder)
    assert rc == 2 and "--num_aug cannot change on a resumed run" in err, err


def _tiny_unet(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = config_from_flags(channels=1, image_size=8, model_channels=8, num_res_blocks=1, attn_resolutions="2",
                            channel_mult="1,2", num_classes=3)
    return build_model(cfg).to(dtype).eval()


@pytest.mark.parametrize("case, message", [
    (lambda s: s.sample(4, (1, 8, 8), batch_size=-1), "batch_size must be >= 1"),
    (lambda s: s.sample(2, (1, 7, 7)), "multiples of 2"),
    (lambda s: s.sample(2, (0, 8, 8)), "every size >= 1"),
    (lambda s: s.sample(2, (3, 8, 8)), "takes 1 channel"),
    (lambda s: s.sample(2, (1, 8, 8), labels=[0, 3]), r"labels must lie in \[0, 3\)"),
    (lambda s: s.sample(0, (1, 8, 8)), "must be > 0"),
])
def test_bad_python_input_is_one_value_error(case, message):
    sampler = Sampler(make_dynamics("fvp", hurst=0.9, num_aug=2), _tiny_unet(), steps=3)
    with pytest.raises(ValueError, match=message):
        case(sampler)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_model_dtype_is_one_value_error(dtype):
    with pytest.raises(ValueError, match=r"call model.float\(\)"):
        Sampler(make_dynamics("fvp", hurst=0.9, num_aug=2), _tiny_unet(dtype), steps=3)


def test_model_on_another_device_is_one_value_error():
    with pytest.raises(ValueError, match="model.to"):
        Sampler(make_dynamics("fvp", hurst=0.9, num_aug=2), _tiny_unet().to("meta"), steps=3, device="cpu")


# ----------------------------------------------------------------------------- determinism

def test_samples_across_batch_sizes():
    """The engine is batch-independent: a per-pixel network gives bit-identical samples at batch 1, 7, 20.
    A small UNet too, on this CPU (a real network's float32 kernels may depend on the batch size elsewhere)."""
    dyn = make_dynamics("fvp", hurst=0.9, num_aug=2)

    def standin(x, s, y=None):
        return torch.tanh(x) * (0.5 + s.reshape(-1, 1, 1, 1) / 1998)
    for solver in ("em", "exp"):
        sampler = Sampler(dyn, standin, steps=12, solver=solver)
        runs = [sampler.sample(20, (1, 8, 8), seed=5, batch_size=b) for b in (1, 7, 20)]
        assert all(torch.equal(runs[0], r) for r in runs[1:]), solver
    net = _tiny_unet()
    sampler = Sampler(dyn, net, steps=12, num_classes=3)
    runs = [sampler.sample(20, (1, 8, 8), seed=5, batch_size=b) for b in (1, 7, 20)]
    # README's claim: bit-identical on this CPU too (CI's kind of machine). A CPU or GPU whose convolution
    # kernels round by batch size would differ by float32 rounding; the README tells users so.
    assert all(torch.equal(runs[2], r) for r in runs[:2]), max(float((r - runs[2]).abs().max()) for r in runs[:2])


def test_fid_dims_mismatch_is_reported_before_any_feature_pass(tmp_path, monkeypatch, capsys):
    from gfdm_fast.metrics import fid
    np.savez(tmp_path / "ref.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(tmp_path / "imgs.npz", images=np.zeros((4, 8, 8, 3), np.uint8))

    def no_inception(*a, **k):
        raise AssertionError("Inception was loaded before the statistics were checked")
    monkeypatch.setattr(fid, "load_inception", no_inception)
    assert main(["fid", str(tmp_path / "imgs.npz"), str(tmp_path / "ref.npz"), "--dims", "2048"]) == 2
    assert "64-dim statistics but the features are 2048-dim" in capsys.readouterr().err


def test_given_options_follow_argparse_matching():
    """What --resume treats as given is what argparse matched: an abbreviated flag and --flag=value count
    (reading raw tokens recorded 'train_step' and the resume kept the saved train_steps)."""
    from gfdm_fast.cli import build_parser, given_options
    commands = {}
    parser = build_parser(commands)
    argv = ["train", "--train_step", "200", "--lr=0.01", "--data_name", "digits"]
    args = parser.parse_args(argv)
    assert args.train_steps == 200 and args.lr == 0.01
    assert sorted(given_options(commands["train"], args, argv)) == ["data_name", "lr", "train_steps"]


def test_a_non_finite_step_table_is_refused_where_it_is_built():
    """StepTable checks its coefficients on construction: every builder (em, exp) and every caller
    (Sampler, benchmarks) gets the one message."""
    import dataclasses

    from gfdm_fast import schedule as S
    from gfdm_fast.expint import build_exp_table
    dyn = make_dynamics("fvp", hurst=0.9, num_aug=2)
    for t in (S.build_em_table(dyn, 4), build_exp_table(dyn, 4, grid="logsnr", substeps=4)):
        for field in ("table", "prior"):
            bad = getattr(t, field).clone()
            bad.view(-1)[1] = float("nan")
            with pytest.raises(ValueError, match=rf"non-finite coefficients \({field}\).*recipe='exact'"):
                dataclasses.replace(t, **{field: bad})
