"""Image sources for FID and VS_p, streamed batch by batch, and the checks every batch passes.

``open_images(path)``: a folder of images (pytorch-fid's extensions, read like its ``ImagePathDataset``),
a folder of ``.npy``/``.npz`` shards, one ``.npy``/``.npz`` array (uint8 or float in [0, 1], (N,H,W,C) or
(N,C,H,W); streamed, never loaded whole), or a torchvision data set name (train split). Float samples
slightly outside [0, 1] are clipped (the sample policy of ``gfdm-fast generate``); far outside is an error.
"""
import contextlib
import os
import pathlib
import zipfile
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from pytorch_fid.fid_score import IMAGE_EXTENSIONS

from gfdm_fast.errors import UserError

ARRAY_KEYS = ("arr_0", "images")                # npz keys holding images
DATASETS = ("cifar10", "mnist", "fashionmnist")
FAR_OUTSIDE = 0.5                               # floats beyond [-0.5, 1.5] are not [0, 1] data


# --------------------------------------------------------------------------- image checks

def as_unit_images(x, what: str = "images") -> torch.Tensor:
    """(B, 3, H, W) float32 in [0, 1] from a (B, C, H, W) batch, C in {1, 3}.

    uint8 is divided by 255 (as torchvision's ToTensor); floats slightly outside
    [0, 1] are clipped, far outside is an error; grey is repeated to 3 channels,
    as PIL's ``convert('RGB')`` does.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if x.dim() != 4:
        raise UserError(f"{what}: expected a batch (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3):
        raise UserError(f"{what}: {x.shape[1]} channels in shape {tuple(x.shape)}; expected 1 (grey) or 3 (RGB)")
    if x.dtype == torch.uint8:
        x = x.float().div(255)
    elif x.dtype == torch.bool or not (x.is_floating_point() or x.dtype in (torch.int16, torch.int32, torch.int64)):
        raise UserError(f"{what}: unsupported dtype {x.dtype}; expected uint8 or float in [0, 1]")
    elif not x.is_floating_point():
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise UserError(f"{what}: integer values span [{lo}, {hi}]; expected uint8 values 0..255")
        x = x.float().div(255)
    else:
        x = x.float()
        if not bool(torch.isfinite(x).all()):
            raise UserError(f"{what}: contains NaN or inf values")
        lo, hi = (float(v) for v in torch.aminmax(x))
        if lo < -FAR_OUTSIDE:
            raise UserError(f"{what}: float values span [{lo:.3g}, {hi:.3g}], far outside [0, 1]; this looks like "
                            f"[-1, 1] data: map it with (x + 1) / 2 first")
        if hi > 1 + FAR_OUTSIDE:
            raise UserError(f"{what}: float values span [{lo:.3g}, {hi:.3g}], far outside [0, 1]; this looks like "
                            f"[0, 255] data: divide it by 255 first")
        x = x.clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x


def _nchw(batch, shape, what):
    """Move the channel axis of an array batch to position 1; ``shape`` is the whole array's."""
    if batch.ndim == 3:
        return batch[:, None]
    if batch.ndim == 4:
        if batch.shape[-1] in (1, 3):
            return batch.transpose(0, 3, 1, 2)
        if batch.shape[1] in (1, 3):
            return batch
        raise UserError(f"{what}: array of shape {tuple(shape)} has neither 1 nor 3 channels; expected "
                        f"(N, H, W, C) or (N, C, H, W) with C = 1 (grey) or 3 (RGB)")
    raise UserError(f"{what}: array of shape {tuple(shape)}; expected images (N, H, W, C), (N, C, H, W) or (N, H, W)")


# --------------------------------------------------------------------------- image sources

class _NpyMember:
    """Rows of an ``.npy`` stream (e.g. an npz member), read sequentially, never whole."""

    def __init__(self, fp, what):
        try:
            version = np.lib.format.read_magic(fp)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            self.shape, fortran, self.dtype = read(fp)
        except (ValueError, OSError, EOFError) as err:
            raise UserError(f"cannot read {what}: {err}") from None
        if fortran or self.dtype.hasobject:
            raise UserError(f"{what}: Fortran-ordered or object arrays cannot be streamed; save with np.savez(x) "
                            f"of a C-ordered numeric array")
        self.fp, self.what = fp, what
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self):
        return int(self.shape[0]) if self.shape else 0

    def rows(self, k: int) -> np.ndarray:
        out = np.empty((k,) + tuple(self.shape[1:]), dtype=self.dtype)  # writable, unlike np.frombuffer
        view, got = memoryview(out).cast("B"), 0
        while got < len(view):
            n = self.fp.readinto(view[got:])
            if not n:
                raise UserError(f"{self.what}: file ends early (truncated)")
            got += n
        return out


def _npz_keys(path):
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as err:
        raise UserError(f"cannot read {path}: not an .npz archive ({err})") from None


def is_stats_file(path) -> bool:
    """True for an ``.npz`` holding ``mu`` and ``sigma`` (pytorch-fid's statistics)."""
    path = os.fspath(path)
    return path.endswith(".npz") and os.path.isfile(path) and {"mu", "sigma"} <= set(_npz_keys(path))


class ArrayImages:
    """Images of one ``.npy`` (memory-mapped) or ``.npz`` (streamed member)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if self.path.endswith(".npz"):
            keys = _npz_keys(self.path)
            found = [k for k in ARRAY_KEYS if k in keys]
            if not found:
                raise UserError(f"{self.path}: no image array under {' or '.join(ARRAY_KEYS)} (keys: {keys}); "
                                f"a statistics file needs mu and sigma")
            self.key = found[0]
            with self._open() as member:
                self.shape, self.dtype = tuple(member.shape), member.dtype
        else:
            self.key = None
            try:
                arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as err:
                raise UserError(f"cannot read {self.path}: {err}") from None
            self.shape, self.dtype = arr.shape, arr.dtype
        if len(self.shape) not in (3, 4) or self.dtype.kind not in "uif":
            raise UserError(f"{self.path}: array of shape {self.shape} and dtype {self.dtype} is not images "
                            f"(N, H, W, C) / (N, C, H, W), uint8 or float in [0, 1]")
        _nchw(np.empty((0,) + self.shape[1:], self.dtype), self.shape, self.path)  # channel check up front

    @contextlib.contextmanager
    def _open(self):
        with zipfile.ZipFile(self.path) as zf, zf.open(self.key + ".npy") as fp:
            yield _NpyMember(fp, f"{self.path}[{self.key}]")

    def __len__(self):
        return int(self.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(_nchw(np.empty((0,) + self.shape[1:], self.dtype), self.shape, self.path).shape[2:])

    def batches(self, batch_size: int, num_workers: int = 0) -> Iterator[torch.Tensor]:
        del num_workers  # slicing a memory map needs no worker processes
        if self.key is None:
            arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
            for i in range(0, len(self), batch_size):
                yield as_unit_images(_nchw(np.array(arr[i:i + batch_size]), self.shape, self.path), self.path)
        else:
            with self._open() as member:
                for i in range(0, len(self), batch_size):
                    k = min(batch_size, len(self) - i)
                    yield as_unit_images(_nchw(member.rows(k), self.shape, self.path), self.path)


class _ImageFiles(torch.utils.data.Dataset):
    """pytorch-fid's ImagePathDataset (PIL, RGB, ToTensor) that reports bad files instead of raising."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            with Image.open(self.files[i]) as img:
                arr = np.asarray(img.convert("RGB"))
        except Exception as err:  # PIL raises many types for a bad file; report them all the same way
            return None, f"cannot read image {self.files[i]}: {type(err).__name__}: {err}"
        # torchvision's ToTensor: HWC bytes -> CHW float32 / 255
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), str(self.files[i])


def _collate_files(items):
    """Stack a batch in the worker; errors travel back as text (worker exceptions lose their type)."""
    for x, note in items:
        if x is None:
            return None, note
    size = items[0][0].shape
    for x, name in items:
        if x.shape != size:
            return None, (f"images differ in size: {items[0][1]} is {size[2]}x{size[1]} (WxH), {name} is "
                          f"{x.shape[2]}x{x.shape[1]}; FID needs one size per set")
    return torch.stack([x for x, _ in items]), items[0][1]


class FolderImages:
    """A folder of image files, with pytorch-fid's extensions and order."""

    def __init__(self, path, files):
        self.path, self.files = os.fspath(path), files
        self.image_size = None

    def __len__(self):
        return len(self.files)

    def batches(self, batch_size: int, num_workers: int = 0) -> Iterator[torch.Tensor]:
        loader = torch.utils.data.DataLoader(_ImageFiles(self.files), batch_size=batch_size, shuffle=False,
                                             num_workers=num_workers, collate_fn=_collate_files)
        first = None
        for x, note in loader:
            if x is None:
                raise UserError(note)
            if first is None:
                first = (x.shape, note)
            elif x.shape[1:] != first[0][1:]:
                raise UserError(f"images differ in size: {first[1]} is {first[0][3]}x{first[0][2]} (WxH), {note} "
                                f"is {x.shape[3]}x{x.shape[2]}; FID needs one size per set")
            yield x.float().div(255)


class ShardImages:
    """A folder of ``.npy``/``.npz`` image shards (e.g. the generate command's outputs), in name order."""

    def __init__(self, path, shards):
        self.path, self.shards = os.fspath(path), [ArrayImages(p) for p in shards]
        sizes = {s.image_size for s in self.shards}
        if len(sizes) > 1:
            raise UserError(f"{self.path}: shards hold images of different sizes {sorted(sizes)}; FID needs one size")

    def __len__(self):
        return sum(len(s) for s in self.shards)

    def batches(self, batch_size: int, num_workers: int = 0) -> Iterator[torch.Tensor]:
        for shard in self.shards:
            yield from shard.batches(batch_size, num_workers)


class DatasetImages:
    """The train split of a torchvision data set (the paper's reference sets), from ``data_dir``."""

    def __init__(self, name, data_dir):
        import torchvision.datasets as tvd
        cls = {"cifar10": tvd.CIFAR10, "mnist": tvd.MNIST, "fashionmnist": tvd.FashionMNIST}[name]
        if data_dir is None:
            raise UserError(f"data set {name}: pass the folder holding it with --data_dir DIR")
        self.path = name
        try:
            data = cls(root=data_dir, train=True, download=False).data
        except RuntimeError as err:
            raise UserError(f"data set {name} not found under --data_dir {data_dir} ({err}); download it there "
                            f"with torchvision.datasets.{cls.__name__}(root, train=True, download=True)") from None
        self.data = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)  # uint8 NHWC or NHW

    def __len__(self):
        return len(self.data)

    def batches(self, batch_size: int, num_workers: int = 0) -> Iterator[torch.Tensor]:
        for i in range(0, len(self), batch_size):
            yield as_unit_images(_nchw(self.data[i:i + batch_size], self.data.shape, self.path), self.path)


def open_images(path, data_dir: str | None = None) -> "ArrayImages | FolderImages | ShardImages | DatasetImages":
    """The image source behind ``path``; checks it up front (cheaply) so errors come before any compute."""
    spath = os.fspath(path)
    if not os.path.exists(spath):
        if spath.lower() in DATASETS:
            return DatasetImages(spath.lower(), data_dir)
        raise UserError(f"{spath} does not exist; expected an image folder, an .npz/.npy of images, a statistics "
                        f".npz or a data set name ({', '.join(DATASETS)} with --data_dir)")
    if os.path.isdir(spath):
        files = sorted(f for ext in IMAGE_EXTENSIONS for f in _glob(spath, ext))
        if files:
            return FolderImages(spath, files)
        shards = sorted(f for ext in ("npy", "npz") for f in _glob(spath, ext))
        shards = [s for s in shards if not is_stats_file(s)]
        if shards:
            return ShardImages(spath, shards)
        raise UserError(f"{spath} holds no images (looked for *.{', *.'.join(sorted(IMAGE_EXTENSIONS))} as "
                        f"pytorch-fid does, and *.npy/*.npz arrays)")
    if spath.endswith((".npy", ".npz")):
        if is_stats_file(spath):
            raise UserError(f"{spath} is a statistics file (mu, sigma), not images")
        images = ArrayImages(spath)
        if len(images) == 0:
            raise UserError(f"{spath} holds no images (shape {images.shape})")
        return images
    raise UserError(f"{spath}: expected an image folder, an .npz/.npy of images or a statistics .npz")


def _glob(folder, ext):
    return pathlib.Path(folder).glob(f"*.{ext}")  # pytorch-fid's case-sensitive pattern
