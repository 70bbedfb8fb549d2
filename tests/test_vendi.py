"""Pixel Vendi score: the streamed dual form against the n x n kernel and the vendi-score package."""
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from gfdm_fast.errors import UserError
from gfdm_fast.metrics.vendi import VendiAccumulator, pixel_vendi_score

# float64 eigenvalues of a d x d vs an n x n matrix: measured differences ~3e-13 relative
VS_RTOL = 1e-9
DUAL = 0  # max_rows=0: always score through the streamed d x d Gram


def brute_force_vs(vectors):
    """exp(entropy) of the eigenvalues of K / n, K the n x n cosine kernel, straight from the definition."""
    x = np.asarray(vectors, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norm == 0, 1, norm)
    lam = np.linalg.eigvalsh(x @ x.T / len(x))
    lam = lam[lam > 0]
    return float(np.exp(-(lam * np.log(lam)).sum()))


def random_images(rng, n, size=32, channels=3):
    """uint8 (n, C, H, W): a few near-duplicates, so the score is well inside (1, n)."""
    base = rng.integers(0, 256, (max(1, n // 3), channels, size, size))
    x = base[rng.integers(0, len(base), n)] + rng.integers(-40, 41, (n, channels, size, size))
    return torch.from_numpy(np.clip(x, 0, 255).astype(np.uint8))


def vendi_score_package(monkeypatch):
    """vendi-score's image_utils; its plotting import of matplotlib is stubbed when matplotlib is absent."""
    pytest.importorskip("vendi_score", reason="vendi-score is not installed (pip install vendi-score)")
    try:
        from vendi_score import image_utils
    except ModuleNotFoundError as err:
        if err.name != "matplotlib":
            raise
        # vendi-score 0.0.3 imports pyplot for plot_images only and does not declare it; the score needs none of it
        pyplot = types.ModuleType("matplotlib.pyplot")
        monkeypatch.setitem(sys.modules, "matplotlib", types.ModuleType("matplotlib"))
        monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
        from vendi_score import image_utils
    return image_utils


def test_dual_form_equals_n_by_n_kernel_few_images():
    x = random_images(np.random.default_rng(0), 23)
    acc = VendiAccumulator(max_rows=DUAL)  # the 3072 x 3072 Gram of RGB
    acc.update(x)
    ref = brute_force_vs(x.permute(0, 2, 3, 1).reshape(23, -1).numpy())
    assert 1.5 < ref < 23
    assert acc.score() == pytest.approx(ref, rel=VS_RTOL)


def test_dual_form_equals_n_by_n_kernel_more_images_than_pixels():
    x = random_images(np.random.default_rng(1), 1100, channels=1)  # n > d = 1024
    ref = brute_force_vs(x.reshape(1100, -1).numpy())
    assert pixel_vendi_score(x, batch_size=300) == pytest.approx(ref, rel=VS_RTOL)  # n > d / 2: the Gram


def test_independent_of_batch_size():
    x = random_images(np.random.default_rng(2), 41, channels=1)
    one_at_a_time, all_at_once = VendiAccumulator(), VendiAccumulator()
    for i in range(41):
        one_at_a_time.update(x[i:i + 1])
    all_at_once.update(x)
    # the streamed Gram (what the dual form decomposes) and the score (n x n path here, n <= d / 2)
    torch.testing.assert_close(one_at_a_time.gram, all_at_once.gram, rtol=1e-13, atol=1e-13)
    assert one_at_a_time.score() == pytest.approx(all_at_once.score(), rel=1e-12)


def test_kernel_and_dual_paths_agree():
    x = random_images(np.random.default_rng(6), 30, size=20, channels=1)
    assert pixel_vendi_score(x, max_rows=DUAL) == pytest.approx(pixel_vendi_score(x), rel=VS_RTOL)


@pytest.mark.parametrize("size,channels,max_rows", [(32, 3, None), (28, 1, None), (24, 3, None), (40, 1, DUAL)])
def test_matches_vendi_score_package(monkeypatch, size, channels, max_rows):
    image_utils = vendi_score_package(monkeypatch)
    x = random_images(np.random.default_rng(size + channels), 19, size=size, channels=channels)
    x[3] = 0  # an all-black image: a zero vector, left zero by scikit-learn's normalize
    arrays = x.permute(0, 2, 3, 1).numpy()
    pil = [Image.fromarray(a[..., 0] if channels == 1 else a) for a in arrays]
    ref = image_utils.pixel_vendi_score(pil)
    ours = pixel_vendi_score(x, batch_size=5, max_rows=max_rows)
    print(f"{size}x{size}x{channels}: ours {ours:.12f} vendi-score {ref:.12f} rel diff {abs(ours - ref) / ref:.2e}")
    assert ours == pytest.approx(ref, rel=VS_RTOL)


def test_floats_are_rounded_to_bytes_and_clipped():
    x = random_images(np.random.default_rng(3), 12)
    as_float = x.float() / 255
    as_float[0, 0, 0, 0] = -0.01   # a byte 0 after clipping
    x[0, 0, 0, 0] = 0
    as_float[1, 0, 0, 0] = 1.02    # 255 after clipping
    x[1, 0, 0, 0] = 255
    assert pixel_vendi_score(as_float) == pytest.approx(pixel_vendi_score(x), rel=1e-13)


def test_grey_and_its_rgb_copy_score_the_same():
    x = random_images(np.random.default_rng(4), 15, channels=1)
    assert pixel_vendi_score(x.expand(-1, 3, -1, -1)) == pytest.approx(pixel_vendi_score(x), rel=1e-11)


def test_identical_images_score_one():
    x = random_images(np.random.default_rng(5), 1).expand(9, -1, -1, -1)
    assert pixel_vendi_score(x) == pytest.approx(1.0, rel=1e-12)


def test_bad_inputs():
    acc = VendiAccumulator()
    with pytest.raises(UserError, match="C = 1 or 3"):
        acc.update(torch.zeros(2, 4, 32, 32, dtype=torch.uint8))
    acc.update(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(UserError, match="one channel count"):
        acc.update(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(UserError, match="at least one image"):
        VendiAccumulator().score()
