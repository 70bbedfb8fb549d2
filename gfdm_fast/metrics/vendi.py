"""Pixel Vendi score VS_p (Friedman & Dieng 2023, eq. 1), streamed by the dual form.

VS = exp(-sum_i lambda_i log lambda_i), lambda the eigenvalues of K / n with the
cosine kernel K_ij = <x_i, x_j> / (|x_i| |x_j|). For VS_p, x is the flattened
uint8 pixel vector of the image resized to 32 x 32 by PIL's default filter, as
the public ``vendi-score`` package's ``pixel_vendi_score`` defines it. With X
the n x d matrix of unit rows, K / n = X X^T / n and X^T X / n share their
nonzero eigenvalues, so a float64 d x d Gram summed over batches gives the score
in one pass, for any n. While n <= d / 2 the unit rows are also kept (no more
memory than the Gram) and the score takes the cheaper n x n kernel, as
vendi-score itself switches on n < d.
"""
import numpy as np
import torch
from PIL import Image

from gfdm_fast.errors import UserError

PIXEL_SIZE = 32  # vendi-score's get_pixel_vectors resizes to 32 x 32


def pixel_vectors(images, what: str = "images") -> torch.Tensor:
    """(B, 32*32*C) float64 pixel vectors (H, W, C order) of a (B, C, H, W) batch, C in {1, 3}.

    Floats in [0, 1] are clipped and rounded to uint8 levels, so k / 255 gives
    back the byte k; images not 32 x 32 go through PIL's ``resize`` with its
    default filter, as ``pixel_vendi_score`` does to its PIL images.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise UserError(f"{what}: expected a batch (B, C, H, W) with C = 1 or 3, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        x = images
    else:
        x = images.float().clamp(0, 1).mul(255).round().to(torch.uint8)
    x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
    if tuple(x.shape[1:3]) != (PIXEL_SIZE, PIXEL_SIZE):
        arr = x.cpu().numpy()
        if arr.shape[3] == 1:
            arr = arr[..., 0]  # PIL mode "L"
        resized = [np.asarray(Image.fromarray(a).resize((PIXEL_SIZE, PIXEL_SIZE))) for a in arr]
        x = torch.from_numpy(np.stack(resized)).reshape(len(arr), PIXEL_SIZE, PIXEL_SIZE, -1).to(images.device)
    return x.reshape(x.shape[0], -1).to(torch.float64)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length; zero rows stay zero (scikit-learn's ``normalize``)."""
    norm = x.norm(dim=1, keepdim=True)
    return x / torch.where(norm == 0, torch.ones_like(norm), norm)


def vendi_from_eigenvalues(lam: torch.Tensor) -> float:
    """exp of the Shannon entropy of the eigenvalues of K / n (eq. 1); lambda <= 0 are rounding noise."""
    lam = np.asarray(lam, dtype=np.float64)
    lam = lam[lam > 0]
    return float(np.exp(-(lam * np.log(lam)).sum()))


class VendiAccumulator:
    """Streaming VS_p: the d x d float64 Gram X^T X of unit pixel vectors and the count n.

    ``max_rows``: keep the unit rows while n <= max_rows (default d / 2) to
    score small sets by the n x n kernel; 0 always uses the Gram.
    """

    def __init__(self, device=None, max_rows=None):
        self.device = torch.device(device or "cpu")
        if self.device.type not in ("cpu", "cuda"):
            self.device = torch.device("cpu")  # float64 Gram
        self.max_rows = max_rows
        self.count = 0
        self.gram = None
        self.rows = []

    def update(self, images, what: str = "images") -> None:
        """Add a batch (B, C, H, W): uint8, or float in [0, 1]."""
        x = unit_rows(pixel_vectors(images, what).to(self.device))
        if self.gram is None:
            self.gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=self.device)
        elif self.gram.shape[0] != x.shape[1]:
            raise UserError(f"{what}: {x.shape[1] // PIXEL_SIZE ** 2} channels after "
                            f"{self.gram.shape[0] // PIXEL_SIZE ** 2} earlier; VS_p needs one channel count per set")
        self.gram.addmm_(x.T, x)
        self.count += x.shape[0]
        if self.rows is not None:
            limit = self.gram.shape[0] // 2 if self.max_rows is None else self.max_rows
            self.rows = self.rows + [x] if self.count <= limit else None

    def all_reduce(self) -> None:
        """Sum over ranks when torch.distributed is initialised (call once, after the last update)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        if self.gram is None:
            raise UserError("VS_p all_reduce: this rank saw no images; every rank needs at least one batch")
        n = torch.tensor([float(self.count)], dtype=torch.float64, device=self.device)
        for t in (n, self.gram):
            torch.distributed.all_reduce(t)
        self.count = int(n.item())
        self.rows = None  # other ranks' rows are only in the Gram

    def score(self) -> float:
        """VS_p of the images seen so far."""
        if self.count == 0:
            raise UserError("VS_p needs at least one image")
        if self.rows:
            x = torch.cat(self.rows)
            k = x @ x.T / self.count  # n x n kernel K / n
        else:
            k = self.gram / self.count  # d x d dual, same nonzero eigenvalues
        return vendi_from_eigenvalues(torch.linalg.eigvalsh(k).cpu().numpy())


def pixel_vendi_score(images, batch_size: int = 256, max_rows: int | None = None) -> float:
    """VS_p of a (N, C, H, W) tensor or array in one call (batched through ``VendiAccumulator``)."""
    acc = VendiAccumulator(max_rows=max_rows)
    for i in range(0, len(images), batch_size):
        acc.update(images[i:i + batch_size])
    return acc.score()
