"""Data sets of gfdm_fast.data: layouts, scaling to [-1, 1], the registry, and one clear message per bad input."""
import numpy as np
import pytest
import torch

from gfdm_fast import data as gdata
from gfdm_fast.cli import main
from gfdm_fast.errors import UserError


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
