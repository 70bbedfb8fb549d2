"""A judge for small labelled image sets (MNIST-like): a CNN classifier trained once on the training split.

It gives three figures for generated images, none of which needs a download:

* **class consistency**: how often the judge assigns a class-conditional sample the label it was
  conditioned on (chance is 1 / classes);
* **judge-feature Frechet distance (FD)**: FID's formula on the judge's penultimate features
  (``FEATURE_DIMS`` wide) instead of Inception's, through the same streaming ``FIDAccumulator``;
* **VS_p**, the pixel Vendi score (``metrics.vendi``).

The trained weights are cached under ``cache_dir`` (default ``$GFDM_CACHE_DIR`` or
``~/.cache/gfdm_fast``), keyed by the data set, the size of its training split and a hash of its
pixels, so a changed data set trains a new judge. ``gfdm-fast fid --features mnist5k-judge``
uses it in place of Inception.
"""
import hashlib
import os
import pickle

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gfdm_fast.errors import UserError

FEATURE_DIMS = 128
JUDGE_VERSION = 1          # bump when the architecture or the training recipe changes: old caches retrain
TRAIN_EPOCHS = 6
TRAIN_BATCH = 128
TRAIN_LR = 2e-3


class Judge(nn.Module):
    """Two conv-conv-pool stages, a ``FEATURE_DIMS``-wide layer (the features), a linear classifier."""

    def __init__(self, channels=1, num_classes=10, image_size=28):
        super().__init__()
        side = image_size // 4
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * side * side, FEATURE_DIMS), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURE_DIMS, num_classes))
        self.channels, self.num_classes, self.image_size = channels, num_classes, image_size

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, FEATURE_DIMS) features of images ``x`` in [0, 1] (B, C, H, W).

        Grey images repeated to RGB (as FID's image path hands them over) are folded back to one channel.
        """
        if x.shape[1] != self.channels and self.channels == 1:
            x = x.mean(1, keepdim=True)
        if tuple(x.shape[1:]) != (self.channels, self.image_size, self.image_size):
            raise UserError(f"the judge takes ({self.channels}, {self.image_size}, {self.image_size}) images, "
                            f"got {tuple(x.shape[1:])}")
        return self.body(x * 2.0 - 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _data_key(images, labels):
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images.numpy()).tobytes())
    h.update(np.ascontiguousarray(labels.numpy()).tobytes())
    return h.hexdigest()[:16]


def unit_images(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """All items of an in-memory data set (``data.TensorImages``) as float images in [0, 1] and labels."""
    x, y = ds.__getitems__(list(range(len(ds))))
    return (x + 1.0) / 2.0, y


def train_judge(images: torch.Tensor, labels: torch.Tensor, *, num_classes: int, seed: int = 0,
                epochs: int = TRAIN_EPOCHS, progress: bool = False) -> Judge:
    """Train a ``Judge`` on ``images`` in [0, 1] (N, C, H, W) with int labels; deterministic for a seed."""
    if labels is None or int(labels.min()) < 0:
        raise UserError("the judge needs a labelled training split")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = Judge(images.shape[1], num_classes, images.shape[-1])
    opt = torch.optim.Adam(net.parameters(), lr=TRAIN_LR)
    n = len(images)
    steps = epochs * ((n + TRAIN_BATCH - 1) // TRAIN_BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=TRAIN_LR, total_steps=steps)
    net.train()
    it = range(epochs)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="training the judge", unit="epoch")
    for _ in it:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, TRAIN_BATCH):
            idx = perm[i:i + TRAIN_BATCH]
            x = images[idx]
            # one-pixel random shifts: a judge that does not hinge on exact stroke positions
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(net(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval().requires_grad_(False)


def cache_dir_default() -> str:
    return os.environ.get("GFDM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "gfdm_fast")


def load_judge(data_name: str = "mnist5k", data_dir: str | None = None, *, cache_dir: str | None = None,
               device: str | torch.device = "cpu", progress: bool = False) -> Judge:
    """The judge of data set ``data_name``: loaded from the cache, or trained on its training split once."""
    from gfdm_fast.data import load_dataset
    from gfdm_fast.io import atomic_save

    ds = load_dataset(data_name, data_dir, split="train")
    if not hasattr(ds, "__getitems__") or getattr(ds, "labels", None) is None:
        raise UserError(f"the judge needs an in-memory labelled data set; {data_name} is not one")
    images, labels = unit_images(ds)
    num_classes = int(labels.max()) + 1
    key = _data_key(images, labels)
    path = os.path.join(cache_dir or cache_dir_default(), f"judge-{data_name}-v{JUDGE_VERSION}-{key}.pt")
    net = Judge(images.shape[1], num_classes, images.shape[-1])
    if os.path.isfile(path):
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return net.eval().requires_grad_(False).to(device)
        except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError):
            pass                    # a damaged cache file: train again and overwrite it
    net = train_judge(images, labels, num_classes=num_classes, progress=progress)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_save(net.state_dict(), path)
    except OSError as err:          # a read-only cache costs a retrain next time, nothing else
        print(f"judge: cannot cache the weights at {path} ({err}); set GFDM_CACHE_DIR to a writable folder")
    return net.to(device)


@torch.no_grad()
def predict(judge: Judge, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Class predictions of images in [0, 1]."""
    dev = next(judge.parameters()).device
    return torch.cat([judge(images[i:i + batch_size].to(dev)).argmax(1).cpu()
                      for i in range(0, len(images), batch_size)])


def class_consistency(judge: Judge, images: torch.Tensor, labels) -> float:
    """Fraction of ``images`` (in [0, 1]) the judge assigns their conditioning ``labels``."""
    return float((predict(judge, images) == torch.as_tensor(labels).reshape(-1)).double().mean())


class ConsistencyCounter:
    """Class consistency streamed batch by batch, as an ``extra`` accumulator of fid.compute_statistics:
    the judge's predictions of the images, in order, against their ``labels``."""

    def __init__(self, judge: Judge, labels) -> None:
        self.judge, self.labels = judge, torch.as_tensor(labels).reshape(-1)
        self.seen = self.agree = 0

    def update(self, images, what: str = "images") -> None:
        from gfdm_fast.metrics.images import as_unit_images
        pred = predict(self.judge, as_unit_images(images, what))
        self.agree += int((pred == self.labels[self.seen:self.seen + len(pred)]).sum())
        self.seen += len(pred)

    def value(self) -> float:
        return self.agree / max(self.seen, 1)


def judge_statistics(judge: Judge, images: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the judge's features of ``images`` in [0, 1], as FID's statistics."""
    from gfdm_fast.metrics.fid import FIDAccumulator
    dev = next(judge.parameters()).device
    acc = FIDAccumulator(FEATURE_DIMS, dev, extractor=judge.features)
    for i in range(0, len(images), batch_size):
        acc.update(images[i:i + batch_size])
    return acc.stats()


def judge_report(judge: Judge, images: torch.Tensor, labels, reference: torch.Tensor, *, vendi: bool = True) -> dict:
    """Class consistency, judge-feature FD against ``reference`` (images in [0, 1]) and VS_p of ``images``."""
    from gfdm_fast.metrics.fid import fid_from_stats
    from gfdm_fast.metrics.vendi import pixel_vendi_score
    out = {"n": len(images),
           "class_consistency": class_consistency(judge, images, labels) if labels is not None else None,
           "judge_fd": float(fid_from_stats(*judge_statistics(judge, images), *judge_statistics(judge, reference)))}
    if vendi:
        out["vs_p"] = float(pixel_vendi_score(images))
    return out
