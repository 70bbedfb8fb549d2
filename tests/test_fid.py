"""Streaming FID against pytorch-fid itself, with the same (test-made, random) Inception weights.

pytorch-fid's real weights cannot be downloaded here, so the session fixture
builds its FID Inception architecture, draws random weights and calibrates the
batch-norm statistics on random images (otherwise features vanish through ~90
layers and every FID would be ~0, making the 1e-3 check empty).
"""
import contextlib
import io
import os
import socket
import sys
import tracemalloc
import urllib.error

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from pytorch_fid import fid_score as pfid
from pytorch_fid import inception as pfid_inception

from gfdm_fast.cli import main
from gfdm_fast.errors import UserError
from gfdm_fast.metrics import fid as F
from gfdm_fast.metrics.vendi import VendiAccumulator

FID_ATOL = 1e-3  # issue 7: the same FID as pytorch-fid to 1e-3 absolute


# --------------------------------------------------------------------------- fixtures

def fid_inception_architecture():
    """pytorch-fid's FID Inception (torchvision's Inception v3 with its patched blocks), no weights."""
    net = pfid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pfid_inception.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfid_inception.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfid_inception.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfid_inception.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfid_inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfid_inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfid_inception.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfid_inception.FIDInceptionE_1(1280)
    net.Mixed_7c = pfid_inception.FIDInceptionE_2(2048)
    return net


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """A random FID Inception state dict file, in the format of pt_inception-2015-12-05-*.pth."""
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    net = fid_inception_architecture()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.normal_(0.0, 0.2, generator=gen)
            m.momentum = None  # running stats = plain average over the calibration batches
            m.reset_running_stats()
    net.train()
    with torch.no_grad():  # calibrate BN so features stay O(1) in eval mode
        net(torch.rand(4, 3, 299, 299, generator=gen) * 2 - 1)
    for m in net.Mixed_7c.modules():  # pool3 features of the real weights are ~0.1-1, not ~40: scale the last
        if isinstance(m, torch.nn.BatchNorm2d):  # block so 2048-dim FIDs land in the usual range (tens)
            m.weight.data *= 0.02
            m.bias.data *= 0.02
    path = tmp_path_factory.mktemp("weights") / "pt_inception-random.pth"
    torch.save(net.eval().state_dict(), path)
    return str(path)


def pytorch_fid_model(weights, dims):
    """pytorch-fid's own InceptionV3 given our weights through its loader (no download)."""
    state_dict = torch.load(weights, weights_only=True)
    saved = pfid_inception.load_state_dict_from_url
    pfid_inception.load_state_dict_from_url = lambda *a, **k: state_dict
    try:
        return pfid_inception.InceptionV3([pfid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[dims]]).eval()
    finally:
        pfid_inception.load_state_dict_from_url = saved


def smooth_images(rng, n, size=32, channels=3, bias=0.0):
    """uint8 (n, size, size, C) images: upsampled coarse noise, so sets differ in structure, not just noise."""
    coarse = rng.random((n, channels, 4, 4)) + bias
    x = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(size, size), mode="bicubic",
                                        align_corners=False)
    x = x + 0.15 * torch.from_numpy(rng.standard_normal((n, channels, size, size)))
    x = (x - x.amin()) / (x.amax() - x.amin())
    return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def blocky_images(rng, n, size=32, block=4):
    """uint8 (n, size, size, 3) images of random flat blocks: a set far from ``smooth_images`` in FID."""
    coarse = rng.integers(0, 256, (n, size // block, size // block, 3), dtype=np.uint8)
    return coarse.repeat(block, axis=1).repeat(block, axis=2)


def write_folder(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{i:05d}.png")
    return str(folder)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Two folders of PNGs big enough for full-rank 64-dim covariances, and their arrays."""
    root = tmp_path_factory.mktemp("sets")
    rng = np.random.default_rng(0)
    a, b = smooth_images(rng, 72), blocky_images(rng, 80)
    return {"a": write_folder(root / "a", a), "b": write_folder(root / "b", b), "a_arr": a, "b_arr": b,
            "root": root}


@pytest.fixture(scope="module")
def reference_64(sets, inception_weights):
    """pytorch-fid's statistics of both folders at dims 64, by its own compute_statistics_of_path."""
    model = pytorch_fid_model(inception_weights, 64)
    return {k: pfid.compute_statistics_of_path(sets[k], model, 50, 64, "cpu", num_workers=0) for k in ("a", "b")}


@pytest.fixture(scope="module")
def ours_64(sets, inception_weights):
    model = F.load_inception(64, inception_weights, "cpu")
    out = {}
    for k in ("a", "b"):
        acc = F.FIDAccumulator(64, "cpu", model=model)
        out[k] = F.compute_statistics(F.open_images(sets[k]), acc, batch_size=50)
    return out


def run_cli(*argv):
    """(exit status, stdout, stderr) of ``gfdm-fast`` in-process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def parse(stdout, key):
    return [float(line.split()[1]) for line in stdout.splitlines() if line.startswith(key + ":")]


# --------------------------------------------------------------------------- against pytorch-fid

def test_weights_give_nontrivial_features(ours_64, reference_64):
    # Guards the fixture: a vanishing network would make every comparison below pass trivially.
    fid = pfid.calculate_frechet_distance(*reference_64["a"], *reference_64["b"])
    assert fid > 1.0, fid
    assert np.linalg.matrix_rank(reference_64["a"][1]) == 64


def test_fid_matches_pytorch_fid_dims64(sets, ours_64, reference_64):
    ours = F.fid_from_stats(*ours_64["a"], *ours_64["b"])
    ref = pfid.calculate_frechet_distance(*reference_64["a"], *reference_64["b"])
    print(f"dims 64: ours {ours:.9f} pytorch-fid {ref:.9f} diff {abs(ours - ref):.3e}")
    assert abs(ours - ref) <= FID_ATOL
    for k in ("a", "b"):
        mu, sigma = ours_64[k]
        np.testing.assert_allclose(mu, reference_64[k][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sigma, reference_64[k][1], rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # two 2048 x 2048 sqrtm (10-50 s each on 2 CPU cores) plus ~1 s per image of Inception
def test_cli_fid_matches_pytorch_fid_dims2048(tmp_path, inception_weights):
    rng = np.random.default_rng(1)
    a = write_folder(tmp_path / "a", smooth_images(rng, 5))  # 2048 features cost ~1 s/image on 2 CPU cores
    b = write_folder(tmp_path / "b", blocky_images(rng, 4))
    model = pytorch_fid_model(inception_weights, 2048)
    ref = pfid.calculate_frechet_distance(*pfid.compute_statistics_of_path(a, model, 4, 2048, "cpu", 0),
                                          *pfid.compute_statistics_of_path(b, model, 4, 2048, "cpu", 0))
    rc, out, err = run_cli("fid", a, b, "--inception-weights", inception_weights, "--device", "cpu",
                           "--num-workers", "0", "--batch-size", "3")
    assert rc == 0, err
    (ours,) = parse(out, "FID")
    print(f"dims 2048: ours {ours:.9f} pytorch-fid {ref:.9f} diff {abs(ours - ref):.3e}")
    assert ref > 1.0
    assert abs(ours - ref) <= FID_ATOL


def test_stats_files_interchangeable_both_ways(tmp_path, sets, ours_64, reference_64, inception_weights):
    ours_file, theirs_file = tmp_path / "ours_a.npz", tmp_path / "theirs_b.npz"
    F.save_stats(ours_file, *ours_64["a"])
    np.savez_compressed(theirs_file, mu=reference_64["b"][0], sigma=reference_64["b"][1])  # as save_fid_stats
    # pytorch-fid reads ours ...
    model = pytorch_fid_model(inception_weights, 64)
    mu, sigma = pfid.compute_statistics_of_path(str(ours_file), model, 50, 64, "cpu")
    np.testing.assert_array_equal(mu, ours_64["a"][0])
    np.testing.assert_array_equal(sigma, ours_64["a"][1])
    # ... and we read theirs (through the CLI: no Inception needed for two statistics files)
    rc, out, err = run_cli("fid", theirs_file, ours_file, "--dims", 64)
    assert rc == 0, err
    ref = pfid.calculate_frechet_distance(*reference_64["b"], *reference_64["a"])
    assert abs(parse(out, "FID")[0] - ref) <= FID_ATOL


def test_save_stats_cli_is_pytorch_fid_format(tmp_path, sets, reference_64, inception_weights):
    out_file = tmp_path / "ref.npz"
    rc, out, err = run_cli("fid", "--save-stats", sets["a"], out_file, "--dims", 64, "--inception-weights",
                           inception_weights, "--device", "cpu", "--num-workers", "0", "--vendi")
    assert rc == 0, err
    vendi = VendiAccumulator()
    vendi.update(torch.from_numpy(sets["a_arr"]).permute(0, 3, 1, 2))
    assert parse(out, "VS_p") == [pytest.approx(vendi.score(), rel=1e-9)]  # same pass as the FID features
    assert sorted(os.listdir(tmp_path)) == ["ref.npz"]  # no temp file left behind
    with np.load(out_file) as f:
        assert sorted(f.files) == ["mu", "sigma"]
        mu, sigma = f["mu"], f["sigma"]
    np.testing.assert_allclose(mu, reference_64["a"][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, reference_64["a"][1], rtol=1e-4, atol=1e-6)
    rc, _, err = run_cli("fid", "--save-stats", sets["a"], out_file, "--dims", 64)
    assert rc == 2 and "exists" in err


@pytest.fixture(scope="module")
def ours_64_batch7(sets, inception_weights):
    """Set a again, in batches of 7 through ``update`` (the on-the-fly path) instead of 50."""
    acc = F.FIDAccumulator(64, "cpu", inception_weights=inception_weights)
    for x in F.open_images(sets["a"]).batches(7):
        acc.update(x)
    return acc.stats()


def test_fid_of_a_set_with_itself_is_zero(ours_64, ours_64_batch7):
    assert abs(F.fid_from_stats(*ours_64["a"], *ours_64["a"])) < 1e-6
    assert abs(F.fid_from_stats(*ours_64["a"], *ours_64_batch7)) < 1e-6


def test_statistics_independent_of_batch_size(ours_64, ours_64_batch7):
    np.testing.assert_allclose(ours_64_batch7[0], ours_64["a"][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours_64_batch7[1], ours_64["a"][1], rtol=1e-4, atol=1e-6)


def test_covariance_is_numpy_cov():
    rng = np.random.default_rng(3)
    f = rng.standard_normal((257, 11)) * 3 + 5
    acc = F.FIDAccumulator(11, "cpu", model=object())
    for i in range(0, 257, 40):
        acc.update_features(torch.from_numpy(f[i:i + 40]))
    mu, sigma = acc.stats()
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-11)


# --------------------------------------------------------------------------- image sources

def all_batches(path, batch_size=16, data_dir=None):
    return torch.cat(list(F.open_images(path, data_dir).batches(batch_size)))


def test_every_source_gives_the_same_images(tmp_path, sets):
    a = sets["a_arr"]
    want = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255
    np.save(tmp_path / "nhwc.npy", a)
    np.save(tmp_path / "nchw.npy", a.transpose(0, 3, 1, 2))
    np.save(tmp_path / "data_0.npy", a.astype(np.float32) / 255)  # as generate writes (x+1)/2 floats
    np.savez(tmp_path / "arr.npz", arr_0=a, labels=np.zeros(len(a)))
    np.savez_compressed(tmp_path / "img.npz", images=a.transpose(0, 3, 1, 2))
    shards = tmp_path / "shards"
    shards.mkdir()
    np.savez(shards / "shard_000.npz", arr_0=a[:30])
    np.savez(shards / "shard_001.npz", arr_0=a[30:])
    for src in (sets["a"], "nhwc.npy", "nchw.npy", "data_0.npy", "arr.npz", "img.npz", "shards"):
        got = all_batches(src if os.path.isabs(src) else tmp_path / src)
        assert torch.equal(got, want), src


def test_grey_becomes_three_equal_channels(tmp_path):
    grey = smooth_images(np.random.default_rng(4), 6, size=28, channels=1)
    folder = write_folder(tmp_path / "grey", grey)
    np.save(tmp_path / "nhw.npy", grey[..., 0])
    np.save(tmp_path / "nhw1.npy", grey)
    want = torch.from_numpy(grey).permute(0, 3, 1, 2).float().div(255).expand(-1, 3, -1, -1)
    for src in (folder, tmp_path / "nhw.npy", tmp_path / "nhw1.npy"):
        assert torch.equal(all_batches(src), want), src


def test_floats_slightly_outside_unit_range_are_clipped():
    x = torch.tensor([-0.02, 0.5, 1.03]).reshape(1, 1, 1, 3).expand(2, 3, 1, 3)
    y = F.as_unit_images(x)
    assert y.min() == 0 and y.max() == 1 and y[0, 0, 0, 1] == 0.5


def test_dataset_name_reads_torchvision_train_split(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(5).integers(0, 256, (5, 28, 28), dtype=np.uint8)

    def idx(name, arr, code):  # MNIST's idx format: zero, zero, dtype code, ndim, then big-endian sizes
        header = bytes([0, 0, code, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
        (raw / name).write_bytes(header + arr.tobytes())

    for split in ("train", "t10k"):
        idx(f"{split}-images-idx3-ubyte", images, 0x08)
        idx(f"{split}-labels-idx1-ubyte", np.arange(5, dtype=np.uint8), 0x08)
    got = all_batches("mnist", 2, data_dir=tmp_path)
    assert torch.equal(got, torch.from_numpy(images)[:, None].float().div(255).expand(-1, 3, -1, -1))


def test_npy_is_streamed_not_loaded(tmp_path):
    big = np.random.default_rng(6).random((600, 3, 64, 64), dtype=np.float32)  # 29 MB
    np.save(tmp_path / "big.npy", big)
    np.savez_compressed(tmp_path / "big.npz", arr_0=big)
    del big
    for name in ("big.npy", "big.npz"):
        tracemalloc.start()
        count = sum(len(x) for x in F.open_images(tmp_path / name).batches(20))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert count == 600
        assert peak < 8e6, f"{name}: peak {peak / 1e6:.1f} MB for a 29 MB file"


# --------------------------------------------------------------------------- bad input: one clear message each

def cli_error(*argv):
    rc, out, err = run_cli("fid", *argv)
    assert rc == 2, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_inputs_give_one_clear_message(tmp_path, sets, inception_weights):
    w = ("--inception-weights", inception_weights, "--dims", 64, "--num-workers", 0, "--device", "cpu")
    rng = np.random.default_rng(8)
    mixed = tmp_path / "mixed"
    write_folder(mixed, smooth_images(rng, 2, size=32))
    Image.fromarray(smooth_images(rng, 1, size=24)[0]).save(mixed / "zz.png")
    assert "differ in size" in cli_error(mixed, sets["a"], *w)

    np.save(tmp_path / "rgba.npy", np.zeros((4, 8, 8, 4), np.uint8))
    np.save(tmp_path / "two.npy", np.zeros((4, 2, 8, 8), np.float32))
    for bad in ("rgba.npy", "two.npy"):
        assert "neither 1 nor 3 channels" in cli_error(tmp_path / bad, sets["a"], *w)

    (tmp_path / "empty").mkdir()
    assert "holds no images" in cli_error(tmp_path / "empty", sets["a"], *w)

    broken = tmp_path / "broken"
    write_folder(broken, smooth_images(rng, 2))
    (broken / "00001.png").write_bytes(b"not a png")
    msg = cli_error(broken, sets["a"], *w)
    assert "cannot read image" in msg and "00001.png" in msg

    np.save(tmp_path / "pm1.npy", rng.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32))
    assert "(x + 1) / 2" in cli_error(tmp_path / "pm1.npy", sets["a"], *w)
    np.save(tmp_path / "255.npy", rng.uniform(0, 255, (4, 8, 8, 3)).astype(np.float32))
    assert "divide it by 255" in cli_error(tmp_path / "255.npy", sets["a"], *w)

    assert "does not exist" in cli_error(tmp_path / "nowhere", sets["a"], *w)
    assert "--data_dir" in cli_error("cifar10", sets["a"], *w, "--data_dir", tmp_path / "no_data")

    F.save_stats(tmp_path / "s64.npz", np.zeros(64), np.eye(64))
    F.save_stats(tmp_path / "s192.npz", np.zeros(192), np.eye(192))
    assert "same --dims" in cli_error(tmp_path / "s64.npz", tmp_path / "s192.npz")


def test_api_errors(tmp_path):
    acc = F.FIDAccumulator(4, "cpu", model=object())
    acc.update_features(torch.ones(1, 4))
    with pytest.raises(UserError, match="at least 2 images"):
        acc.stats()
    with pytest.raises(UserError, match="not found"):
        F.load_stats(tmp_path / "none.npz")
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(UserError, match="needs arrays mu and sigma"):
        F.load_stats(tmp_path / "images.npz")
    with pytest.raises(UserError, match="not one of pytorch-fid's feature sizes"):
        F.load_inception(100)


def test_missing_weights_file_names_file_source_and_flag(tmp_path, sets):
    msg = cli_error(sets["a"], sets["b"], "--inception-weights", tmp_path / "pt_inception.pth", "--dims", 64)
    assert str(tmp_path / "pt_inception.pth") in msg
    assert F.WEIGHTS_URL in msg and "pt_inception-2015-12-05-6726825d.pth" in msg
    assert "--inception-weights" in msg


def test_wrong_weights_file_is_named(tmp_path, sets):
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    for name in ("other.pth", "junk.pth"):
        msg = cli_error(sets["a"], sets["b"], "--inception-weights", tmp_path / name, "--dims", 64)
        assert name in msg and F.WEIGHTS_FILE in msg


def test_offline_without_cache_says_how_to_get_weights(tmp_path, sets, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # empty hub cache

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(pfid_inception, "load_state_dict_from_url", offline)
    msg = cli_error(sets["a"], sets["b"], "--dims", 64)
    assert F.WEIGHTS_URL in msg and "--inception-weights" in msg and "torch_home" in msg


# --------------------------------------------------------------------------- torchrun

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank, world, port, feats, images, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fid, vendi = F.FIDAccumulator(feats.shape[1], "cpu", model=object()), VendiAccumulator()
        fid.update_features(feats[rank::world])
        vendi.update(images[rank::world])
        fid.all_reduce()
        vendi.all_reduce()
        if rank == 0:
            mu, sigma = fid.stats()
            torch.save({"mu": mu, "sigma": sigma, "count": fid.count, "vs": vendi.score()}, out)
    finally:
        torch.distributed.destroy_process_group()


def test_all_reduce_matches_single_process(tmp_path):
    rng = np.random.default_rng(9)
    feats = torch.from_numpy(rng.standard_normal((37, 6)))
    images = torch.from_numpy(smooth_images(rng, 11)).permute(0, 3, 1, 2).contiguous()
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank_worker, args=(2, _free_port(), feats, images, str(out)), nprocs=2)
    got = torch.load(out, weights_only=False)
    single = F.FIDAccumulator(6, "cpu", model=object())
    single.update_features(feats)
    mu, sigma = single.stats()
    vendi = VendiAccumulator()
    vendi.update(images)
    assert got["count"] == 37
    np.testing.assert_allclose(got["mu"], mu, rtol=1e-12)
    np.testing.assert_allclose(got["sigma"], sigma, rtol=1e-10)
    assert got["vs"] == pytest.approx(vendi.score(), rel=1e-10)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
