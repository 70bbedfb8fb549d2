"""Streaming FID with pytorch-fid's Inception (Heusel et al. 2017, eq. 6).

FID = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)), where (mu, S) are the
mean and the unbiased covariance of Inception features. Features come from
pytorch-fid's own ``InceptionV3`` fed exactly as its ``get_activations`` feeds
it (float32 images in [0, 1], the model resizes to 299 and maps to [-1, 1]);
the statistics are running float64 sums of f and f f^T, so memory is flat in
the number of images and ranks combine by one all-reduce; the distance is
pytorch-fid's ``calculate_frechet_distance``. Statistics files are
pytorch-fid's ``.npz`` (``mu``, ``sigma``), readable by either tool.

Image sources (``open_images``): a folder of images (pytorch-fid's
extensions, read like its ``ImagePathDataset``), a folder of ``.npy``/``.npz``
shards, one ``.npy``/``.npz`` array (uint8 or float in [0, 1], (N,H,W,C) or
(N,C,H,W); streamed, never loaded whole), or a torchvision data set name
(train split). Float samples slightly outside [0, 1] are clipped (the sample
policy of issue 5); far outside is an error.
"""
import contextlib
import math
import os
import pathlib
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_fid import inception as _pfid_inception
from pytorch_fid.fid_score import IMAGE_EXTENSIONS, calculate_frechet_distance
from pytorch_fid.inception import InceptionV3

from gfdm_fast.errors import UserError

WEIGHTS_URL = _pfid_inception.FID_WEIGHTS_URL
WEIGHTS_FILE = os.path.basename(WEIGHTS_URL)   # pt_inception-2015-12-05-6726825d.pth
DIMS = tuple(sorted(InceptionV3.BLOCK_INDEX_BY_DIM))
ARRAY_KEYS = ("arr_0", "images")                # npz keys holding images
DATASETS = ("cifar10", "mnist", "fashionmnist")
FAR_OUTSIDE = 0.5                               # floats beyond [-0.5, 1.5] are not [0, 1] data


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


def load_inception(dims=2048, inception_weights=None, device="cpu"):
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
                            f"weights {WEIGHTS_FILE} from {WEIGHTS_URL} and pass the file with --inception-weights FILE")
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


def inception_features(model, images):
    """(B, dims) features as pytorch-fid's ``get_activations`` takes them (spatial mean below pool3)."""
    with torch.no_grad():
        f = model(images)[0]
    if f.shape[2] != 1 or f.shape[3] != 1:
        f = F.adaptive_avg_pool2d(f, output_size=(1, 1))
    return f.flatten(1)


# --------------------------------------------------------------------------- image checks

def as_unit_images(x, what="images"):
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

    def rows(self, k):
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


def is_stats_file(path):
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
        if len(self.shape) not in (3, 4) or not (self.dtype.kind in "uif"):
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
    def image_size(self):
        return tuple(_nchw(np.empty((0,) + self.shape[1:], self.dtype), self.shape, self.path).shape[2:])

    def batches(self, batch_size, num_workers=0):
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

    def batches(self, batch_size, num_workers=0):
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

    def batches(self, batch_size, num_workers=0):
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

    def batches(self, batch_size, num_workers=0):
        for i in range(0, len(self), batch_size):
            yield as_unit_images(_nchw(self.data[i:i + batch_size], self.data.shape, self.path), self.path)


def open_images(path, data_dir=None):
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


# --------------------------------------------------------------------------- statistics

class FIDAccumulator:
    """Running float64 sums of Inception features f and f f^T; ``stats()`` gives (mu, sigma).

    ``extractor`` replaces Inception by any callable mapping images in [0, 1] to (B, dims) features
    (e.g. ``metrics.judge``'s classifier for MNIST-like data).

    Usage during sampling: ``acc.update(x)`` per batch of images in [0, 1],
    ``acc.all_reduce()`` once after the last batch (under torchrun), then
    ``fid_from_stats(*acc.stats(), *load_stats(ref))``.
    """

    def __init__(self, dims=2048, device=None, inception_weights=None, model=None, extractor=None):
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

    def update(self, images, what="images"):
        """Add a batch (B, C, H, W), uint8 or float in [0, 1] (clipped), C in {1, 3}."""
        x = as_unit_images(images, what).to(self.device)
        with torch.no_grad():
            self.update_features(self.extractor(x))

    def update_features(self, features):
        f = features.to(self.sum_f.device, torch.float64)
        if f.dim() != 2 or f.shape[1] != self.dims:
            raise UserError(f"features of shape {tuple(f.shape)}; expected (B, {self.dims})")
        self.sum_f += f.sum(0)
        self.sum_ff.addmm_(f.T, f)
        self.count += f.shape[0]

    def all_reduce(self):
        """Sum over ranks when torch.distributed is initialised (call once, after the last update)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        n = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum_f.device)
        for t in (n, self.sum_f, self.sum_ff):
            torch.distributed.all_reduce(t)
        self.count = int(n.item())

    def stats(self):
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


def fid_from_stats(mu1, sigma1, mu2, sigma2):
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


def load_stats(path):
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


def save_stats(path, mu, sigma):
    """Write pytorch-fid's ``.npz`` (``mu``, ``sigma``) atomically."""
    from gfdm_fast.io import atomic_write_file
    atomic_write_file(os.fspath(path), lambda f: np.savez_compressed(f, mu=mu, sigma=sigma))


def compute_statistics(images, accumulator, batch_size=50, num_workers=0, extra=(), progress=False):
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
