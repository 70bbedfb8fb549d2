"""`gfdm-fast generate`: official run-folder layout, reproducibility across batch sizes and processes,
resumable --out shards, on-the-fly FID, and one clear message per bad input."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gfdm_fast import make_dynamics, sinks
from gfdm_fast.cli import main
from gfdm_fast.metrics import fid as F
from gfdm_fast.models import build_model, config_from_flags
from gfdm_fast.runs import LOCK_FILE, RUN_META
from gfdm_fast.sampler import Sampler, draw_labels

RUN = "7_mnist_H0.7_K2"              # {run_id}_{data_name}_H{hurst}_K{num_aug}
N, STEPS = 10, 4
NET = dict(channels=1, image_size=8, model_channels=8, num_res_blocks=1, attn_resolutions="2",
           channel_mult="1,2", dropout=0.0, num_classes=10)
FLAGS = ["--data_name", "mnist", "--run_id", "7", "--hurst", "0.7", "--num_aug", "2", "--steps", str(STEPS),
         "--device", "cpu", "--progress", "False"]
NET_FLAGS = [a for k, v in NET.items() for a in (f"--{k}", str(v))]
SAME = 1e-4                          # relative difference allowed between runs of the same seeds


def generate(*argv):
    """Run ``gfdm-fast generate`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["generate", *map(str, argv)])
    return rc, out.getvalue(), err.getvalue()


def rel_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def tree(root):
    """Every file and folder under ``root`` with its size and mtime: to show nothing was written."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = "folder"
        for name in files:
            if name == LOCK_FILE:      # the folder lock: its holder record changes with every run
                out[os.path.relpath(os.path.join(dirpath, name), root)] = "lock"
                continue
            st = os.stat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


def tiny_nets():
    torch.manual_seed(0)
    cfg = config_from_flags(**NET)
    online, ema = build_model(cfg), build_model(cfg)
    with torch.no_grad():   # distinct EMA weights, so that reading the wrong file shows
        for p in ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cfg, online.eval(), ema.eval()


def write_official_run(folder, online, ema):
    """The official layout: DDP-prefixed online weights, EMA file with ema_model./online_model. keys."""
    model_dir = folder / "model"
    model_dir.mkdir(parents=True)
    torch.save({f"module.{k}": v for k, v in online.state_dict().items()}, model_dir / "model-final.pth")
    ema_sd = {"initted": torch.tensor(True), "step": torch.tensor(40)}
    ema_sd |= {f"online_model.{k}": v for k, v in online.state_dict().items()}
    ema_sd |= {f"ema_model.{k}": v for k, v in ema.state_dict().items()}
    torch.save(ema_sd, model_dir / "ema_model-final.pth")


@pytest.fixture(scope="module")
def nets():
    torch.set_num_threads(1)
    return tiny_nets()


@pytest.fixture(scope="module")
def template(tmp_path_factory, nets):
    root = tmp_path_factory.mktemp("runs_template")
    write_official_run(root / RUN, nets[1], nets[2])
    return root


@pytest.fixture
def runs(tmp_path, template):
    """A fresh copy of the official runs folder for each test."""
    root = tmp_path / "runs"
    shutil.copytree(template, root)
    return root


def expected(net, recipe="official", n=N, seed=0):
    """What generate must produce: the Sampler on the same weights, image i from seed + i."""
    dyn = make_dynamics("fvp", hurst=0.7, num_aug=2, recipe=recipe)
    x = Sampler(dyn, net, steps=STEPS, num_classes=10).sample(n, (1, 8, 8), seed=seed, batch_size=4)
    labels = draw_labels(torch.arange(n) + seed, 10)
    return ((x + 1) / 2).permute(0, 2, 3, 1).numpy(), labels.numpy()


def official_outputs(run_dir, version="final", mode="sde", steps=STEPS):
    base = Path(run_dir) / "generated_data" / f"model-{version}" / f"{mode}{steps}"
    data, label = sorted((base / "data").glob("data_*.npy")), sorted((base / "label").glob("label_*.npy"))
    assert len(data) == 1 and len(label) == 1, (data, label)
    assert data[0].name[5:] == label[0].name[6:]          # one stamp for the pair
    assert not [p for p in base.rglob("*") if ".tmp" in p.name]
    return np.load(data[0]), np.load(label[0])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, template):
    """The batch-size-7 single-process run: the yardstick of the reproducibility tests."""
    root = tmp_path_factory.mktemp("ref")
    shutil.copytree(template, root, dirs_exist_ok=True)
    rc, out, err = generate("--output_dir", root, *FLAGS, *NET_FLAGS, "--n_samples", N, "--batch_size", 7)
    assert rc == 0, err
    assert "Wrote 10 samples" in out
    return official_outputs(root / RUN)


# ----------------------------------------------------------------------------- official layout

def test_official_layout_round_trip(reference, nets):
    data, labels = reference
    assert data.shape == (N, 8, 8, 1) and data.dtype == np.float32          # (N, H, W, C), exactly n_samples
    assert labels.shape == (N,) and labels.dtype == np.float32              # as the official writes them
    want, want_labels = expected(nets[2])                                   # EMA weights, official recipe
    assert rel_diff(data, want) <= SAME
    np.testing.assert_array_equal(labels, want_labels)
    assert data.min() < 0 or data.max() > 1                                 # kept as written: not clipped
    online, _ = expected(nets[1])
    assert rel_diff(data, online) > 1e-2                                    # and not the online weights


def test_use_ema_false_reads_the_online_file(runs, nets, reference):
    rc, _, err = generate("--output_dir", runs, *FLAGS, *NET_FLAGS, "--n_samples", 3, "--use_ema", "False")
    assert rc == 0, err
    data, labels = official_outputs(runs / RUN)
    want, want_labels = expected(nets[1], n=3)
    assert rel_diff(data, want) <= SAME
    np.testing.assert_array_equal(labels, want_labels)


def test_batch_size_does_not_change_samples(runs, reference):
    rc, _, err = generate("--output_dir", runs, *FLAGS, *NET_FLAGS, "--n_samples", N, "--batch_size", 3)
    assert rc == 0, err
    data, labels = official_outputs(runs / RUN)
    assert rel_diff(data, reference[0]) <= SAME
    np.testing.assert_array_equal(labels, reference[1])


def test_gfdm_run_json_gives_config_and_recipe(runs, nets):
    run = runs / "8_mnist_H0.7_K2"
    shutil.copytree(runs / RUN, run)
    meta = {"format": "gfdm-fast-run", "version": 1, "model": nets[0].to_dict(), "recipe": "exact",
            "time_weight": 999.0, "seed": 3,      # as gfdm-fast train writes it
            "dynamics": {"name": "fvp", "hurst": 0.7, "num_aug": 2, "gamma_max": 20.0, "norm": True, "T": 1.0}}
    (run / RUN_META).write_text(json.dumps(meta))
    # no network flags: the recorded config is used
    rc, _, err = generate("--output_dir", runs, "--data_name", "mnist", "--run_id", 8, "--hurst", 0.7,
                          "--num_aug", 2, "--steps", STEPS, "--device", "cpu", "--progress", "False",
                          "--n_samples", 3)
    assert rc == 0, err
    data, _ = official_outputs(run)
    exact, _ = expected(nets[2], recipe="exact", n=3)
    official, _ = expected(nets[2], recipe="official", n=3)
    assert rel_diff(data, exact) <= SAME
    assert rel_diff(exact, official) > 3 * SAME                            # the recipe is visible
    # --recipe overrides the record
    shutil.rmtree(run / "generated_data")
    rc, _, err = generate("--output_dir", runs, "--data_name", "mnist", "--run_id", 8, "--hurst", 0.7,
                          "--num_aug", 2, "--steps", STEPS, "--device", "cpu", "--progress", "False",
                          "--n_samples", 3, "--recipe", "official")
    assert rc == 0, err
    assert rel_diff(official_outputs(run)[0], official) <= SAME


def test_interrupted_official_run_leaves_nothing(runs, monkeypatch):
    before = tree(runs)
    calls = []

    def add(self, chunk, images, labels):
        calls.append(chunk)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, chunk, images, labels)

    original = sinks.OfficialSink.add
    monkeypatch.setattr(sinks.OfficialSink, "add", add)
    rc, _, err = generate("--output_dir", runs, *FLAGS, *NET_FLAGS, "--n_samples", N, "--batch_size", 3)
    assert rc == 130 and "interrupted" in err
    assert tree(runs) == before


# ----------------------------------------------------------------------------- --out shards

def quantised(data):
    return np.floor(np.clip(data, 0, 1) * 255 + 0.5).astype(np.uint8)


def read_shards(out):
    names = sorted(p.name for p in Path(out).glob("samples_*.npz"))
    arrs = [np.load(Path(out) / n) for n in names]
    return names, np.concatenate([a["arr_0"] for a in arrs]), np.concatenate([a["labels"] for a in arrs])


@pytest.fixture(scope="module")
def full_out(tmp_path_factory, template):
    out = tmp_path_factory.mktemp("full") / "shards"
    rc, stdout, err = generate("--output_dir", template, *FLAGS, *NET_FLAGS, "--n_samples", N, "--batch_size", 3,
                               "--out", out, "--shard-size", 4)
    assert rc == 0, err
    assert "3 of 3 shards" in stdout
    return out


def test_out_shards_hold_the_quantised_samples(full_out, reference):
    names, images, labels = read_shards(full_out)
    assert names == ["samples_000000-000004.npz", "samples_000004-000008.npz", "samples_000008-000010.npz"]
    assert images.dtype == np.uint8 and images.shape == (N, 8, 8, 1)
    diff = np.abs(images.astype(int) - quantised(reference[0]).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01                     # rounding at a level boundary at most
    np.testing.assert_array_equal(labels, reference[1].astype(np.int64))
    assert sorted(os.listdir(full_out)) == sorted(names + [sinks.MANIFEST, LOCK_FILE])   # the lock file stays


def test_resume_interrupted_out_run(runs, full_out, monkeypatch):
    out = runs / "shards"
    args = ["--output_dir", runs, *FLAGS, *NET_FLAGS, "--n_samples", N, "--batch_size", 3, "--out", out,
            "--shard-size", 4]
    # a shard-count limit stops the run after one shard
    rc, stdout, err = generate(*args, "--max-shards", 1)
    assert rc == 0, err
    assert "1 of 3 shards" in stdout and "rerun" in stdout
    first = out / "samples_000000-000004.npz"
    stamp = first.stat().st_mtime_ns

    # an interruption while sampling the rest: one more shard lands, no temp file stays
    writes = []
    original = sinks.ShardSink._write

    def write(self, k, images, labels):
        if writes:
            raise KeyboardInterrupt
        writes.append(k)
        return original(self, k, images, labels)

    monkeypatch.setattr(sinks.ShardSink, "_write", write)
    rc, _, err = generate(*args)
    assert rc == 130
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == sorted([sinks.MANIFEST, LOCK_FILE, first.name, "samples_000004-000008.npz"])
    second = out / "samples_000004-000008.npz"
    stamp2 = second.stat().st_mtime_ns

    rc, stdout, err = generate(*args)
    assert rc == 0, err
    assert "3 of 3 shards" in stdout
    assert first.stat().st_mtime_ns == stamp and second.stat().st_mtime_ns == stamp2   # not redone
    names, images, labels = read_shards(out)
    full_names, full_images, full_labels = read_shards(full_out)
    assert names == full_names
    np.testing.assert_array_equal(images, full_images)
    np.testing.assert_array_equal(labels, full_labels)

    # a lost last shard is redone, the others stay
    last = out / "samples_000008-000010.npz"
    last.unlink()
    rc, _, err = generate(*args)
    assert rc == 0, err
    assert first.stat().st_mtime_ns == stamp and last.exists()
    np.testing.assert_array_equal(read_shards(out)[1], full_images)

    # a different run into the same folder is refused
    before = tree(out)
    rc, _, err = generate(*args, "--seed", 1)
    assert rc == 2 and "holds another run" in err and "seed" in err
    assert tree(out) == before


def test_png_grids(runs):
    from PIL import Image
    out = runs / "png"
    rc, _, err = generate("--output_dir", runs, *FLAGS, *NET_FLAGS, "--n_samples", 5, "--out", out,
                          "--shard-size", 4, "--png")
    assert rc == 0, err
    assert sorted(p.name for p in out.glob("*.png")) == ["grid_000000-000004.png", "grid_000004-000005.png"]
    with Image.open(out / "grid_000000-000004.png") as im:
        assert im.size == (2 + 2 * 10, 2 + 2 * 10)                          # 2 x 2 tiles of 8 px, 2 px padding


# ----------------------------------------------------------------------------- FID on the fly

class FakeInception(torch.nn.Module):
    """A fixed random feature map standing in for pytorch-fid's Inception (64 features)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(3, 64, 3)

    def forward(self, x):
        return [torch.tanh(self.conv(x))]


def fid_ref_stats():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(64, 64)) * 0.1
    return rng.normal(size=64) * 0.1, a @ a.T + 0.01 * np.eye(64)


def test_fid_on_the_fly_equals_fid_of_saved_shards(runs, full_out, monkeypatch, tmp_path):
    fake = FakeInception().eval()
    monkeypatch.setattr(F, "load_inception", lambda dims, weights=None, device="cpu": fake)
    ref = tmp_path / "ref.npz"
    F.save_stats(ref, *fid_ref_stats())
    before = tree(runs)
    rc, stdout, err = generate("--output_dir", runs, *FLAGS, *NET_FLAGS, "--n_samples", N, "--batch_size", 3,
                               "--fid-ref", ref)
    assert rc == 0, err
    assert tree(runs) == before                                             # no images kept
    value = float(stdout.split("FID:")[1].split()[0])
    acc = F.FIDAccumulator(64, "cpu", model=fake)
    acc.update(read_shards(full_out)[1].transpose(0, 3, 1, 2))
    assert value == pytest.approx(F.fid_from_stats(*acc.stats(), *F.load_stats(ref)), rel=1e-6)


# ----------------------------------------------------------------------------- processes

WORKER = """
import json, sys
import torch.distributed as dist
from gfdm_fast.cli import main
from gfdm_fast.metrics import fid
from test_generate import FakeInception
fake = FakeInception().eval()
fid.load_inception = lambda dims, weights=None, device="cpu": fake
dist.init_process_group("gloo")   # one group for all commands: generate uses it and leaves it open
for argv in json.load(open(sys.argv[1])):
    rc = main(["generate", *argv])
    if rc:
        sys.exit(rc)
dist.destroy_process_group()
"""


def test_two_processes_match_one(runs, reference, full_out, tmp_path):
    """torchrun, 2 processes on gloo: official .npy, --out shards and FID equal the 1-process results; so do the
    exp solver's shards on its adaptive grid (every rank takes rank 0's pilot table: Sampler.share_table)."""
    (tmp_path / "worker.py").write_text(WORKER)
    ref = tmp_path / "ref.npz"
    fake = FakeInception().eval()
    F.save_stats(ref, *fid_ref_stats())
    common = ["--output_dir", str(runs), *FLAGS, *NET_FLAGS, "--n_samples", str(N), "--batch_size", "3"]
    exp = ["--out", str(runs / "shards_exp"), "--shard-size", "4", "--solver", "exp", "--steps", "4", "--mode", "ode"]
    commands = [common, common + ["--out", str(runs / "shards"), "--shard-size", "4"],
                common + ["--fid-ref", str(ref)], common + exp]
    (tmp_path / "commands.json").write_text(json.dumps(commands))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), str(Path(__file__).parent)]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "worker.py"), str(tmp_path / "commands.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Wrote 10 samples") == 1                       # rank 0 reports
    data, labels = official_outputs(runs / RUN)
    assert rel_diff(data, reference[0]) <= SAME
    np.testing.assert_array_equal(labels, reference[1])
    base = runs / RUN / "generated_data" / "model-final" / f"sde{STEPS}"
    assert sorted(p.name for p in base.iterdir()) == [LOCK_FILE, "data", "label"]   # the per-rank parts are gone
    names, images, shard_labels = read_shards(runs / "shards")
    full_names, full_images, full_labels = read_shards(full_out)
    assert names == full_names
    assert np.abs(images.astype(int) - full_images.astype(int)).max() <= 1
    np.testing.assert_array_equal(shard_labels, full_labels)
    exp_one = tmp_path / "exp_one"
    rc, _, err = generate(*common, *exp[:1], exp_one, *exp[2:])
    assert rc == 0, err
    (names, images, _), (one_names, one_images, _) = read_shards(runs / "shards_exp"), read_shards(exp_one)
    assert names == one_names and np.abs(images.astype(int) - one_images.astype(int)).max() <= 1
    meta, one_meta = (json.loads((p / "gfdm_generate.json").read_text()) for p in (runs / "shards_exp", exp_one))
    assert meta["exp_times"] == one_meta["exp_times"] and meta["exp_solver"] == one_meta["exp_solver"]
    value = float(proc.stdout.split("FID:")[1].split()[0])
    acc = F.FIDAccumulator(64, "cpu", model=fake)
    acc.update(full_images.transpose(0, 3, 1, 2))
    assert value == pytest.approx(F.fid_from_stats(*acc.stats(), *F.load_stats(ref)), rel=1e-5)


# ----------------------------------------------------------------------------- engine checkpoints

def test_engine_checkpoint_records_config_dynamics_recipe(tmp_path, nets):
    from gfdm_fast import checkpoint
    path = tmp_path / "engine" / "engine.pth"
    dyn = {"name": "fvp", "hurst": 0.7, "num_aug": 2, "gamma_max": 20.0, "norm": True}
    checkpoint.save(str(path), nets[1], nets[0], dynamics=dyn, recipe="exact", ema=nets[2])
    rc, _, err = generate("--checkpoint", path, "--steps", STEPS, "--device", "cpu", "--progress", "False",
                          "--n_samples", 3)
    assert rc == 0, err
    data, _ = official_outputs(tmp_path / "engine", version="engine")
    assert rel_diff(data, expected(nets[2], recipe="exact", n=3)[0]) <= SAME
    rc, _, err = generate("--checkpoint", path, "--steps", STEPS, "--device", "cpu", "--n_samples", 3,
                          "--num_aug", 3)
    assert rc == 2 and "num_aug = 2" in err


# ----------------------------------------------------------------------------- bad input

def _engine_run(runs, nets, dynamics):
    run = runs / "9_mnist_H0.7_K2"
    shutil.copytree(runs / RUN, run)
    meta = {"config": nets[0].to_dict(), "recipe": "exact", "dynamics": dynamics}
    (run / RUN_META).write_text(json.dumps(meta))
    return ["--output_dir", runs, "--data_name", "mnist", "--run_id", 9, "--hurst", 0.7, "--num_aug", 2]


BAD = {
    "missing run folder": (lambda r, n: ["--output_dir", r, *FLAGS[:2], "--run_id", 99, *FLAGS[4:], *NET_FLAGS],
                           ["99_mnist_H0.7_K2", "not found", RUN]),
    "missing output_dir": (lambda r, n: ["--output_dir", r / "nope", *FLAGS, *NET_FLAGS], ["does not exist"]),
    "missing version": (lambda r, n: ["--output_dir", r, *FLAGS, *NET_FLAGS, "--version", "v3"],
                        ["ema_model-v3.pth", "not found", "versions there: final"]),
    "num_aug mismatch": (lambda r, n: ["--checkpoint", r / RUN / "model" / "ema_model-final.pth", *FLAGS[:6],
                                       "--num_aug", 3, *FLAGS[8:], *NET_FLAGS], ["num_aug = 2", "--num_aug 3"]),
    "hurst mismatch": (lambda r, n: ["--checkpoint", r / RUN / "model" / "model-final.pth", "--hurst", 0.9,
                                     *FLAGS[8:], *NET_FLAGS], ["hurst = 0.7", "--hurst 0.9"]),
    "recorded dynamics mismatch": (lambda r, n: [*_engine_run(r, n, {"name": "fve", "hurst": 0.7, "num_aug": 2,
                                                                     "gamma_max": 20.0, "norm": True}),
                                                 "--dynamics", "fvp", *FLAGS[8:]],
     ["dynamics = fve", "--dynamics fvp"]),
    "config mismatch": (lambda r, n: ["--output_dir", r, *FLAGS, *NET_FLAGS, "--model_channels", 16],
                        ["does not fit", "model_channels 8"]),
    "recorded config mismatch": (lambda r, n: [*_engine_run(r, n, None), *FLAGS[8:], "--channels", 3],
                                 ["--channels (checkpoint 1, flags 3)"]),
    "n_samples 0": (lambda r, n: ["--output_dir", r, *FLAGS, *NET_FLAGS, "--n_samples", 0], ["--n_samples", "> 0"]),
    "n_samples < 0": (lambda r, n: ["--output_dir", r, *FLAGS, *NET_FLAGS, "--n_samples", -5], ["--n_samples"]),
    "out is a file": (lambda r, n: ["--output_dir", r, *FLAGS, *NET_FLAGS, "--out", r / RUN / "model" /
                                    "model-final.pth"], ["is a file"]),
    "generated_data is a file": (lambda r, n: ((r / RUN / "generated_data").write_text("x"),
                                               ["--output_dir", r, *FLAGS, *NET_FLAGS])[1], ["is a file"]),
    "no ema file": (lambda r, n: ((r / RUN / "model" / "ema_model-final.pth").unlink(),
                                  ["--output_dir", r, *FLAGS, *NET_FLAGS])[1], ["--use_ema False"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_clear_message(case, runs, nets):
    make, words = BAD[case]
    argv = make(runs, nets)
    before = tree(runs)
    rc, out, err = generate(*argv)
    assert rc == 2, (out, err)
    assert err.startswith("gfdm-fast generate: error: ") and "Traceback" not in err
    for w in words:
        assert w in err, err
    assert tree(runs) == before                                             # nothing half-written


def test_exp_solver_knobs_recorded_in_the_manifest(runs):
    out = runs / "exp_knobs"
    rc, _, err = generate("--output_dir", runs, *FLAGS, *NET_FLAGS, "--n_samples", 2, "--out", out, "--solver", "exp",
                          "--steps", 4, "--order", 2, "--grid", "power", "--rho", 2.5, "--corrector",
                          "--sigma-data", 0.5)
    assert rc == 0, err
    meta = json.loads((out / "gfdm_generate.json").read_text())
    assert meta["exp_solver"] == {"order": 2, "grid": "power", "rho": 2.5, "corrector": True, "lower_final": False,
                                  "sigma_data": 0.5}
    assert meta["exp_times"] == pytest.approx(list(np.linspace(1.0, 1e-3 ** 0.4, 5)[:-1] ** 2.5), rel=1e-6)
    out = runs / "exp_defaults"                      # fractional defaults: adaptive grid, order chosen by the pilot
    rc, stdout, err = generate("--output_dir", runs, *FLAGS, *NET_FLAGS, "--n_samples", 2, "--out", out, "--solver",
                               "exp", "--steps", 4, "--mode", "ode")
    assert rc == 0, err
    meta = json.loads((out / "gfdm_generate.json").read_text())
    assert meta["exp_solver"]["grid"] == "adaptive" and meta["exp_solver"]["order"] in (2, 3)
    assert meta["exp_solver"]["residual_share"] in (0.0, 0.2)     # the pilot's pick, with the order
    assert f"exp solver: order {meta['exp_solver']['order']}, grid adaptive (pilot: " in stdout
    assert len(meta["exp_times"]) == 4 and meta["exp_times"][0] == 1.0 and np.all(np.diff(meta["exp_times"]) < 0)
    rc, _, err = generate("--output_dir", runs, *FLAGS, *NET_FLAGS, "--n_samples", 2, "--out", runs / "em_knobs",
                          "--order", 3)
    assert rc != 0 and "solver='exp'" in err and not (runs / "em_knobs").exists()
