"""File output: one atomic-write helper for every writer, the uint8 conversion, the one image grid."""
import contextlib
import math
import os
import secrets

import numpy as np


def temporary_name(path: str) -> str:
    """A temporary name beside ``path``, unique per process and call: ``.NAME.PID-RANDOM.tmp``."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}-{secrets.token_hex(3)}.tmp")


def atomic_write(path: str, write) -> str:
    """``write(tmp_path)`` to a temporary name beside ``path``, then rename it onto ``path``.

    The temporary file is removed on every exit path (errors and KeyboardInterrupt included), so a reader
    sees the old file or the new one, never a partial one, and no two processes share a temporary name.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path


def atomic_write_file(path: str, write) -> str:
    """``write(binary_file_object)`` through ``atomic_write`` (numpy then adds no ``.npz`` suffix)."""
    def to_file(tmp):
        with open(tmp, "wb") as f:   # open(), unlike mkstemp, honours the umask
            write(f)
    return atomic_write(path, to_file)


def atomic_save(obj, path: str) -> str:
    """``torch.save(obj)`` through ``atomic_write``."""
    import torch
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def check_writable(folder) -> None:
    """Create and remove a temporary file in ``folder``: a read-only folder fails now, with PermissionError /
    OSError(EROFS), not after a long run."""
    import tempfile
    with tempfile.TemporaryFile(dir=folder):
        pass


def to_uint8(images):
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8: (x + 1) / 2 clipped to [0, 1], rounded to 255 levels."""
    import torch
    u = ((images.float() + 1) / 2).clamp(0, 1).mul(255).add(0.5).floor()
    return u.to("cpu", torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def image_grid(images, nrow=None, pad=2, background=0, min_size=1):
    """(N, H, W, C) uint8 -> one grid image (rows, cols, C) with ``pad`` pixels between tiles.

    ``nrow`` tiles per row (default: a square grid); tiles smaller than ``min_size`` are enlarged by
    pixel repetition so that small images stay visible.
    """
    images = np.asarray(images)
    n, h, w, c = images.shape
    scale = max(1, math.ceil(min_size / h))
    if scale > 1:
        images = images.repeat(scale, 1).repeat(scale, 2)
        h, w = h * scale, w * scale
    cols = min(nrow or math.ceil(math.sqrt(n)), n)
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), background, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images[i]
    return grid


def save_png(image, path):
    """An (H, W, C) uint8 image as a PNG, atomically (C = 1 is written as greyscale)."""
    from PIL import Image
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    return atomic_write_file(path, lambda f: pil.save(f, format="PNG"))


def save_grid(images, path, nrow=8):
    """PNG grid of images in [-1, 1] (B, C, H, W); small images are enlarged (nearest) to >= 32 px."""
    grid = image_grid(to_uint8(images.detach()), nrow=nrow, background=255, min_size=32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_png(grid, path)
    return path
