"""Checkpoints: the engine format round trip, official files in the official layout, mismatches."""
import os

import pytest
import torch

from gfdm_fast import checkpoint, runs
from gfdm_fast.errors import UserError
from gfdm_fast.models import PRESETS, UNetConfig, UNetModel

SMALL = UNetConfig(image_size=8, in_channels=2, model_channels=16, out_channels=2, num_res_blocks=1,
                   attention_resolutions=(2,), channel_mult=(1, 2), num_classes=3)
DYN = {"name": "fvp", "hurst": 0.9, "num_aug": 3, "gamma_max": 20.0, "norm": True}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny tensors; see tests/test_unet.py
    yield
    torch.set_num_threads(before)


def random_net(config=SMALL, seed=0):
    torch.manual_seed(seed)
    net = UNetModel(**config.to_kwargs()).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    return net


def inputs(config=SMALL):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, config.in_channels, config.image_size, config.image_size, generator=g)
    return x, torch.tensor([5.0, 700.0]), torch.tensor([1, 2])


def same_weights(model, state_dict):
    sd = model.state_dict()
    assert sd.keys() == state_dict.keys()
    return all(torch.equal(sd[k], state_dict[k]) for k in sd)


def test_engine_round_trip(tmp_path):
    net, ema = random_net(seed=0), random_net(seed=1)
    path = tmp_path / "run" / "ckpt.pt"
    checkpoint.save(path, torch.compile(net), dynamics=DYN, recipe="official", ema=ema, step=1234,
                    extra={"lr": 2e-4})
    assert sorted(os.listdir(path.parent)) == ["ckpt.pt"]          # no .tmp left behind

    ck = checkpoint.load(path)                                       # EMA by default
    assert (ck.source, ck.used_ema, ck.recipe, ck.step) == ("engine", True, "official", 1234)
    assert ck.config == SMALL and ck.dynamics == DYN and ck.extra == {"lr": 2e-4}
    assert same_weights(ck.model, ema.state_dict()) and not ck.model.training
    with torch.no_grad():
        torch.testing.assert_close(ck.model(*inputs()), ema(*inputs()), atol=0, rtol=0)

    online = checkpoint.load(path, SMALL, use_ema=False)
    assert not online.used_ema and same_weights(online.model, net.state_dict())


def test_engine_without_ema(tmp_path):
    net = random_net()
    path = checkpoint.save(tmp_path / "c.pt", net.state_dict(), SMALL)
    ck = checkpoint.load(path)
    assert not ck.used_ema and ck.dynamics is None and ck.recipe == "exact"
    with pytest.raises(UserError, match="no EMA weights"):
        checkpoint.load(path, use_ema=True)


def test_save_is_atomic(tmp_path, monkeypatch):
    net = random_net()
    path = tmp_path / "c.pt"
    checkpoint.save(path, net)
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, random_net(seed=5))
    assert path.read_bytes() == before                 # old checkpoint intact
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]    # and no .tmp


@pytest.mark.parametrize("prefix", ["", "module."])
def test_official_model_file(tmp_path, prefix):
    net = random_net()
    run = tmp_path / "runs" / "3_cifar10_H0.9_K3" / "model"
    run.mkdir(parents=True)
    path = run / "model-20.pth"
    torch.save({prefix + k: v for k, v in net.state_dict().items()}, path)
    ck = checkpoint.load(path, SMALL)
    assert (ck.source, ck.recipe, ck.used_ema, ck.dynamics) == ("official", "official", False, None)
    assert same_weights(ck.model, net.state_dict())
    assert runs.run_hints(path) == {"run_id": "3", "data_name": "cifar10", "hurst": 0.9,
                                          "num_aug": 3}


@pytest.mark.parametrize("bookkeeping", ["top", "under_prefix"])
def test_official_ema_file(tmp_path, bookkeeping):
    online, ema = random_net(seed=0), random_net(seed=1)
    sd = {f"ema_model.{k}": v for k, v in ema.state_dict().items()}
    sd |= {f"online_model.{k}": v for k, v in online.state_dict().items()}
    book = "" if bookkeeping == "top" else "ema_model."
    sd |= {f"{book}initted": torch.tensor(True), f"{book}step": torch.tensor(500)}
    path = tmp_path / "ema_model-20.pth"
    torch.save(sd, path)

    ck = checkpoint.load(path, SMALL)
    assert ck.source == "official-ema" and ck.used_ema
    assert same_weights(ck.model, ema.state_dict())
    assert same_weights(checkpoint.load(path, SMALL, use_ema=False).model, online.state_dict())

    only_ema = {k: v for k, v in sd.items() if not k.startswith("online_model.")}
    torch.save(only_ema, path)
    with pytest.raises(UserError, match="only EMA weights"):
        checkpoint.load(path, SMALL, use_ema=False)


def test_official_file_picks_its_preset(tmp_path):
    with torch.device("meta"):
        shapes = UNetModel(**PRESETS["mnist"].to_kwargs()).state_dict()
    # Zero-stride tensors: the preset's full layout in a few bytes on disk.
    sd = {k: torch.zeros(()).expand(v.shape) for k, v in shapes.items()}
    path = tmp_path / "model-1.pth"
    torch.save({"module." + k: v for k, v in sd.items()}, path)
    ck = checkpoint.load(path)
    assert ck.config == PRESETS["mnist"]


def test_mismatch_names_keys_and_fitting_preset(tmp_path):
    with torch.device("meta"):
        shapes = UNetModel(**PRESETS["mnist"].to_kwargs()).state_dict()
    path = tmp_path / "model-1.pth"
    torch.save({k: torch.zeros(()).expand(v.shape) for k, v in shapes.items()}, path)
    with pytest.raises(UserError) as err:
        checkpoint.load(path, "cifar10")
    msg = str(err.value)
    assert "missing keys (224)" in msg and "unexpected keys (86)" in msg
    assert "shape mismatches (176): time_embed.0.weight checkpoint [256, 64] vs network [512, 128]" in msg
    assert "fits the 'mnist' preset" in msg and "--model_channels 64" in msg
    assert len(msg.splitlines()) <= 6                       # first few keys, not hundreds


def test_mismatch_suggests_inferred_flags(tmp_path):
    net = random_net()
    path = tmp_path / "model-1.pth"
    torch.save(net.state_dict(), path)
    with pytest.raises(UserError) as err:
        checkpoint.load(path, "mnist")
    msg = str(err.value)
    assert "missing keys" in msg and "unexpected keys" in msg
    assert ("--channels 2 --model_channels 16 --num_res_blocks 1 --attn_resolutions 2 "
            "--channel_mult 1,2 --num_classes 3") in msg
    with pytest.raises(UserError, match="matches no preset"):
        checkpoint.load(path)                                # no config, no preset fits


def test_infer_flags_on_official_fixture(official_dir):
    d = torch.load(official_dir / "unet_small_io.pt", weights_only=False)
    for prefix in ("", "uncond_"):
        cfg, flags = d[prefix + "config"], checkpoint.infer_flags(d[prefix + "state_dict"])
        assert flags["model_channels"] == cfg["model_channels"]
        assert flags["num_res_blocks"] == cfg["num_res_blocks"]
        assert list(flags["channel_mult"]) == cfg["channel_mult"]
        assert list(flags["attn_resolutions"]) == cfg["attention_resolutions"]
        assert flags["num_classes"] == cfg["num_classes"]


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not found"):
        checkpoint.load(tmp_path / "nope.pth", SMALL)
    torch.save({"a": torch.zeros(3)}, tmp_path / "odd.pth")
    with pytest.raises(UserError, match="does not look like"):
        checkpoint.load(tmp_path / "odd.pth", SMALL)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(UserError, match="not a model checkpoint"):
        checkpoint.load(tmp_path / "list.pth", SMALL)
