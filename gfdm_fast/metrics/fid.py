"""Streaming FID with pytorch-fid's Inception (Heusel et al. 2017, eq. 6).

FID = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)), where (mu, S) are the
mean and the unbiased covariance of Inception features. Features come from
pytorch-fid's own ``InceptionV3`` fed exactly as its ``get_activations`` feeds
it (float32 images in [0, 1], the model resizes to 299 and maps to [-1, 1]);
the statistics are running float64 sums of f and f f^T, so memory is flat in
the number of images and ranks combine by one all-reduce; the distance is
pytorch-fid's ``calculate_frechet_distance``. Statistics files are
pytorch-fid's ``.npz`` (``mu``, ``sigma``), readable by either tool.

Image sources and their checks are in ``metrics.images`` (``open_images``, ``as_unit_images``).
"""
from __future__ import annotations

import contextlib
import math
import os
import zipfile
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_fid import inception as _pfid_inception
from pytorch_fid.fid_score import calculate_frechet_distance
from pytorch_fid.inception import InceptionV3

from gfdm_fast.errors import UserError
from gfdm_fast.metrics.images import as_unit_images, is_stats_file, open_images  # noqa: F401 (re-exported)

WEIGHTS_URL = _pfid_inception.FID_WEIGHTS_URL
WEIGHTS_FILE = os.path.basename(WEIGHTS_URL)   # pt_inception-2015-12-05-6726825d.pth
DIMS = tuple(sorted(InceptionV3.BLOCK_INDEX_BY_DIM))


# --------------------------------------------------------------------------- weights

def _weights_cache():
    return os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)


@contextlib.contextmanager
def _fid_weights_from(state_dict):
    """Make pytorch-fid's ``fid_inception_v3()`` load ``state_dict`` instead of its URL.

    pytorch-fid builds the FID Inception (torchvision's with its patched
    blocks) and loads its weights through the module-level
    ``load_state_dict_from_url``; swapping that one name keeps its
    architecture code and its strict ``load_state_dict`` in charge.
    """
    saved = _pfid_inception.load_state_dict_from_url
    _pfid_inception.load_state_dict_from_url = lambda *args, **kwargs: state_dict
    try:
        yield
    finally:
        _pfid_inception.load_state_dict_from_url = saved


def load_inception(dims: int = 2048, inception_weights: str | None = None,
                   device: str | torch.device = "cpu") -> torch.nn.Module:
    """pytorch-fid's ``InceptionV3`` for ``dims`` features, in eval mode on ``device``.

    Weights: the file ``inception_weights`` (a state dict of pytorch-fid's FID
    Inception, as ``pt_inception-2015-12-05-*.pth``), else pytorch-fid's own
    download into the torch hub cache.
    """
    if dims not in InceptionV3.BLOCK_INDEX_BY_DIM:
        raise UserError(f"--dims {dims} is not one of pytorch-fid's feature sizes {list(DIMS)}")
    blocks = [InceptionV3.BLOCK_INDEX_BY_DIM[dims]]
    if inception_weights is not None:
        path = os.fspath(inception_weights)
        if not os.path.isfile(path):
            raise UserError(f"Inception weights file {path} not found: download pytorch-fid's FID Inception "
                            f"weights {WEIGHTS_FILE} from {WEIGHTS_URL} and pass the file with "
                            "--inception-weights FILE")
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle, zip or torch format errors all mean "not a weights file"
            raise UserError(f"cannot read Inception weights {path} ({type(err).__name__}: {err}); expected a state "
                            f"dict like {WEIGHTS_FILE} from {WEIGHTS_URL} (--inception-weights FILE)") from None
        if not isinstance(state_dict, dict):
            raise UserError(f"{path} holds a {type(state_dict).__name__}, not a state dict of pytorch-fid's FID "
                            f"Inception ({WEIGHTS_FILE} from {WEIGHTS_URL})")
        try:
            with _fid_weights_from(state_dict):
                model = InceptionV3(blocks)
        except RuntimeError as err:  # strict load_state_dict: missing/unexpected keys, shape mismatch
            first = str(err).strip().splitlines()[0]
            raise UserError(f"{path} is not a state dict of pytorch-fid's FID Inception ({WEIGHTS_FILE} from "
                            f"{WEIGHTS_URL}): {first}") from None
    else:
        try:
            model = InceptionV3(blocks)  # pytorch-fid's path: torch hub cache, else download
        except OSError as err:  # URLError and HTTPError are OSErrors
            raise UserError(f"cannot fetch pytorch-fid's FID Inception weights {WEIGHTS_FILE} from {WEIGHTS_URL} "
                            f"({err}) and no cached copy at {_weights_cache()}: download the file where you can "
                            f"and pass it with --inception-weights FILE") from None
    return model.eval().requires_grad_(False).to(device)


def inception_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, dims) features as pytorch-fid's ``get_activations`` takes them (spatial mean below pool3)."""
    with torch.no_grad():
        f = model(images)[0]
    if f.shape[2] != 1 or f.shape[3] != 1:
        f = F.adaptive_avg_pool2d(f, output_size=(1, 1))
    return f.flatten(1)


# --------------------------------------------------------------------------- statistics

class FIDAccumulator:
    """Running float64 sums of Inception features f and f f^T; ``stats()`` gives (mu, sigma).

    ``extractor`` replaces Inception by any callable mapping images in [0, 1] to (B, dims) features
    (e.g. ``metrics.judge``'s classifier for MNIST-like data).

    Usage during sampling: ``acc.update(x)`` per batch of images in [0, 1],
    ``acc.all_reduce()`` once after the last batch (under torchrun), then
    ``fid_from_stats(*acc.stats(), *load_stats(ref))``.
    """

    def __init__(self, dims: int = 2048, device: str | torch.device | None = None, inception_weights: str | None = None,
                 model: torch.nn.Module | None = None, extractor: Callable | None = None) -> None:
        self.dims = dims
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if extractor is None:        # Inception, as pytorch-fid; any images -> (B, dims) callable plugs in instead
            model = model if model is not None else load_inception(dims, inception_weights, self.device)
            extractor = lambda x: inception_features(model, x)     # noqa: E731
        self.model, self.extractor = model, extractor
        stat_device = self.device if self.device.type in ("cpu", "cuda") else torch.device("cpu")  # no fp64 on mps
        self.count = 0
        self.sum_f = torch.zeros(dims, dtype=torch.float64, device=stat_device)
        self.sum_ff = torch.zeros(dims, dims, dtype=torch.float64, device=stat_device)

    def update(self, images: torch.Tensor | np.ndarray, what: str = "images") -> None:
        """Add a batch (B, C, H, W), uint8 or float in [0, 1] (clipped), C in {1, 3}."""
        x = as_unit_images(images, what).to(self.device)
        with torch.no_grad():
            self.update_features(self.extractor(x))

    def update_features(self, features: torch.Tensor) -> None:
        f = features.to(self.sum_f.device, torch.float64)
        if f.dim() != 2 or f.shape[1] != self.dims:
            raise UserError(f"features of shape {tuple(f.shape)}; expected (B, {self.dims})")
        self.sum_f += f.sum(0)
        self.sum_ff.addmm_(f.T, f)
        self.count += f.shape[0]

    def all_reduce(self) -> None:
        """Sum over ranks when torch.distributed is initialised (call once, after the last update)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        n = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum_f.device)
        for t in (n, self.sum_f, self.sum_ff):
            torch.distributed.all_reduce(t)
        self.count = int(n.item())

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) as numpy float64; sigma is unbiased, as ``np.cov(rowvar=False)``."""
        n = self.count
        if n < 2:
            raise UserError(f"FID statistics need at least 2 images, got {n}")
        mu = self.sum_f / n
        sigma = (self.sum_ff - n * torch.outer(mu, mu)) / (n - 1)
        sigma = (sigma + sigma.T) / 2  # exact symmetry, as np.cov's result
        if not bool(torch.isfinite(mu).all() and torch.isfinite(sigma).all()):
            raise UserError("the features of these images hold NaN or inf; check the images (or the extractor)")
        return mu.cpu().numpy(), sigma.cpu().numpy()


def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance by pytorch-fid's own ``calculate_frechet_distance``."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    if mu1.shape != mu2.shape or np.shape(sigma1) != np.shape(sigma2):
        raise UserError(f"statistics of different feature sizes ({mu1.shape[0]} vs {mu2.shape[0]} dims): "
                        f"compute both with the same --dims")
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise UserError("the statistics hold NaN or inf: FID is undefined; recompute them from finite images")
    try:
        value = float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))
    except ValueError as err:  # pytorch-fid's "Imaginary component" on a degenerate product
        raise UserError(f"FID is numerically undefined here ({err}); use more images than --dims features") from None
    if not math.isfinite(value):
        raise UserError("FID came out NaN/inf (a degenerate covariance); use more images than --dims features")
    return value


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a pytorch-fid statistics ``.npz``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"statistics file {path} not found")
    try:
        with np.load(path) as f:
            mu, sigma = f["mu"][:], f["sigma"][:]
    except KeyError:
        raise UserError(f"{path} is not a statistics file: it needs arrays mu and sigma") from None
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise UserError(f"cannot read statistics file {path}: {err}") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not form (d,) and (d, d) statistics")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"{path}: the statistics hold NaN or inf; recompute them (gfdm-fast fid --save-stats)")
    return mu, sigma


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write pytorch-fid's ``.npz`` (``mu``, ``sigma``) atomically."""
    from gfdm_fast.io import atomic_write_file
    atomic_write_file(os.fspath(path), lambda f: np.savez_compressed(f, mu=mu, sigma=sigma))


def compute_statistics(images: object, accumulator: FIDAccumulator, batch_size: int = 50, num_workers: int = 0,
                       extra: Sequence = (), progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Stream an image source (``open_images``) through ``accumulator`` and ``extra`` accumulators."""
    batches = images.batches(batch_size, num_workers)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, total=-(-len(images) // batch_size), desc=str(images.path), unit="batch",
                       disable=None)
    for x in batches:
        accumulator.update(x, images.path)
        for acc in extra:
            acc.update(x, images.path)
    return accumulator.stats()
