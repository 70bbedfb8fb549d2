"""Where generated batches go: the official ``.npy`` layout, resumable uint8 shards (or PNG grids), and
on-the-fly FID. Each sink takes ``add(indices, images, labels)`` per batch, then ``finish()`` (or
``abort()`` on failure): use them with ``Sampler.iter_batches`` from Python as ``gfdm-fast generate`` does.
"""
import contextlib
import json
import math
import os
import re
import shutil

import numpy as np

from gfdm_fast.errors import UserError
from gfdm_fast.io import atomic_write, atomic_write_file, image_grid, save_png, to_uint8
from gfdm_fast.runs import LOCK_FILE, FolderLock, clean_stale_temporaries

MANIFEST = "gfdm_generate.json"     # settings of an --out run, checked on resume
_SHARD_NAME = re.compile(r"^(samples|grid)_\d+-\d+\.(npz|png)$")
_COPY_ROWS = 4096                   # rows per chunk when assembling the official .npy

def check_folder_path(path, what):
    """Raise unless ``path`` is (or can become) a folder: no part of it may be a file."""
    p = os.path.abspath(path)
    while True:
        if os.path.exists(p) and not os.path.isdir(p):
            raise UserError(f"{what} {path}: {p} is a file, not a folder; move it or choose another path")
        parent = os.path.dirname(p)
        if parent == p:
            return
        p = parent


def _makedirs(path):
    """``os.makedirs`` that returns the folders it created (deepest last), for cleanup on failure."""
    created, p = [], os.path.abspath(path)
    while not os.path.isdir(p):
        created.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, exist_ok=True)
    return created[::-1]


def _remove_empty(folders):
    """Remove the folders this run created if nothing but the lock file is left in them."""
    for d in reversed(folders):
        with contextlib.suppress(OSError):
            if os.listdir(d) == [LOCK_FILE]:
                os.remove(os.path.join(d, LOCK_FILE))
            os.rmdir(d)


def _release(sink):
    if sink.lock is not None:
        sink.lock.release()
        sink.lock = None


class OfficialSink:
    """The official ``data/data_{stamp}.npy`` + ``label/label_{stamp}.npy``, streamed through memmaps.

    Each rank fills a part file (its index block) in a temp folder; rank 0 then
    copies the parts, in chunks, into the final file under a temp name and
    renames it: no rank holds more than a batch, and no half-written file
    appears under the final name.
    """

    def __init__(self, save_dir, n, shape, dist, indices):
        self.save_dir, self.n, self.dist = save_dir, n, dist
        self.C, self.H, self.W = shape
        self.indices = list(indices)
        self.created, self.lock = [], None
        found = None
        if dist.rank == 0:   # one rank owns the folder; every rank learns the outcome
            try:
                self.created = _makedirs(save_dir)
                self.lock = FolderLock(save_dir, "gfdm-fast generate").acquire()
                clean_stale_temporaries(save_dir)   # a killed run's part files and half-copied .npy
                found = ("ok", self._new_stamp())
            except UserError as err:
                _remove_empty(self.created)
                found = ("error", str(err))
        kind, stamp = dist.broadcast(found)
        if kind == "error":
            raise UserError(stamp)
        self.stamp = stamp
        self.tmp_dir = os.path.join(save_dir, f".tmp-{self.stamp}")
        if dist.rank == 0:
            os.makedirs(self.tmp_dir, exist_ok=True)
        dist.barrier()
        m = len(self.indices)   # a contiguous block (sampler.shard); empty when n < world
        if m:
            self.data = np.lib.format.open_memmap(self._part("data"), mode="w+", dtype=np.float32,
                                                  shape=(m, self.H, self.W, self.C))
            self.labels = np.lib.format.open_memmap(self._part("label"), mode="w+", dtype=np.float32, shape=(m,))
        self.first = self.indices[0] if m else 0

    def _new_stamp(self):
        import random
        rng = random.SystemRandom()
        while True:   # the official: six random digits; never overwrite an earlier run
            stamp = "".join(rng.choice("0123456789") for _ in range(6))
            if not any(os.path.exists(os.path.join(self.save_dir, d, f"{d}_{stamp}.npy")) for d in ("data", "label")):
                return stamp

    def _part(self, kind):
        return os.path.join(self.tmp_dir, f"{kind}_rank{self.dist.rank}.npy")

    def add(self, chunk, images, labels):
        rows = slice(chunk[0] - self.first, chunk[-1] - self.first + 1)
        self.data[rows] = ((images.float() + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        self.labels[rows] = labels.cpu().numpy().astype(np.float32)

    def finish(self):
        if self.indices:
            self.data.flush(), self.labels.flush()
            del self.data, self.labels
        self.dist.barrier()
        paths = []
        if self.dist.rank == 0:
            for kind, shape in (("data", (self.n, self.H, self.W, self.C)), ("label", (self.n,))):
                folder = os.path.join(self.save_dir, kind)
                self.created += _makedirs(folder)
                final = os.path.join(folder, f"{kind}_{self.stamp}.npy")
                atomic_write(final, lambda tmp, kind=kind, shape=shape: self._assemble(tmp, kind, shape))
                paths.append(final)
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.dist.barrier()
        self.created = []
        _release(self)
        return paths

    def _assemble(self, path, kind, shape):
        """The ranks' part files, copied in chunks into one official ``.npy`` at ``path``."""
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        row = 0
        for r in range(self.dist.world):
            part_path = os.path.join(self.tmp_dir, f"{kind}_rank{r}.npy")
            if not os.path.exists(part_path):   # a rank without images
                continue
            part = np.load(part_path, mmap_mode="r")
            for j in range(0, len(part), _COPY_ROWS):
                block = part[j:j + _COPY_ROWS]
                out[row:row + len(block)] = block
                row += len(block)
            del part
        if row != self.n:
            raise RuntimeError(f"assembled {row} of {self.n} samples")
        out.flush()
        del out

    def abort(self):
        for name in ("data", "labels"):
            if hasattr(self, name):
                delattr(self, name)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)   # a half-assembled .npy: atomic_write removed it
        _release(self)
        _remove_empty(self.created)


class ShardSink:
    """``--out DIR``: uint8 shards ``samples_{start:06d}-{end:06d}.npz`` (or ``grid_*.png``) by global index.

    Shard k holds images [k S, min((k+1) S, N)); files are written atomically, so
    the files present are exactly the finished shards and a rerun does the rest.
    """

    def __init__(self, out, n, shard_size, png, manifest, dist, max_shards=None, need_all=False):
        self.out, self.n, self.size, self.png, self.dist = out, n, shard_size, png, dist
        self.created, self.lock = [], None
        self.count = math.ceil(n / shard_size)
        found = None
        if dist.rank == 0:   # one rank decides; every rank learns the outcome (no rank left waiting)
            try:
                self.created = _makedirs(out)
                self.lock = FolderLock(out, "gfdm-fast generate").acquire()
                pending = [k for k in range(self.count) if not os.path.exists(self.path(k))]
                if need_all and len(pending) < self.count:
                    raise UserError(f"--fid-ref needs every image, but --out {out} already holds finished shards; "
                                    "compute the FID of the finished run with `gfdm-fast fid`, or use an empty --out")
                self._check_manifest(manifest)
                clean_stale_temporaries(out, recursive=False)   # temp files of a killed run
                found = ("ok", pending)
            except UserError as err:
                _release(self)
                _remove_empty(self.created)
                found = ("error", str(err))
        kind, value = dist.broadcast(found)
        if kind == "error":
            raise UserError(value)
        from gfdm_fast.sampler import shard
        mine = [value[i] for i in shard(len(value), dist.rank, dist.world)] if value else []
        if max_shards is not None:
            mine = mine[:max_shards]
        self.pending, self.mine = value, mine
        self.buffers = {}   # shard id -> [uint8 images, labels, filled]

    def _check_manifest(self, manifest):
        path = os.path.join(self.out, MANIFEST)
        if os.path.exists(path):
            try:
                with open(path) as f:
                    old = json.load(f)
            except (OSError, ValueError):
                old = None
            if old != manifest:
                diff = [k for k in manifest if not isinstance(old, dict) or old.get(k) != manifest[k]]
                raise UserError(f"--out {self.out} holds another run (it differs in {', '.join(diff) or 'format'}); "
                                "choose another --out folder, or empty this one to start over")
        else:
            strays = [n for n in os.listdir(self.out) if _SHARD_NAME.match(n)]
            if strays:
                raise UserError(f"--out {self.out} holds shards ({strays[0]}, ...) but no {MANIFEST} to say which "
                                "run wrote them; choose another --out folder or empty this one")
            atomic_write_file(path, lambda f: f.write(json.dumps(manifest, indent=1, sort_keys=True).encode()))

    def path(self, k):
        start, end = k * self.size, min((k + 1) * self.size, self.n)
        return os.path.join(self.out, f"grid_{start:06d}-{end:06d}.png" if self.png
                            else f"samples_{start:06d}-{end:06d}.npz")

    def indices(self):
        return [i for k in self.mine for i in range(k * self.size, min((k + 1) * self.size, self.n))]

    def add(self, chunk, images, labels):
        u8, y = to_uint8(images), labels.cpu().numpy().astype(np.int64)
        for j, i in enumerate(chunk):
            k = i // self.size
            if k not in self.buffers:
                m = min((k + 1) * self.size, self.n) - k * self.size
                self.buffers[k] = [np.empty((m, *u8.shape[1:]), np.uint8), np.empty(m, np.int64), 0]
            buf = self.buffers[k]
            buf[0][i - k * self.size], buf[1][i - k * self.size] = u8[j], y[j]
            buf[2] += 1
            if buf[2] == len(buf[1]):
                self._write(k, buf[0], buf[1])
                del self.buffers[k]

    def _write(self, k, images, labels):
        if self.png:
            save_png(image_grid(images), self.path(k))
        else:
            atomic_write_file(self.path(k), lambda f: np.savez(f, arr_0=images, labels=labels))

    def finish(self):
        self.dist.barrier()
        self.created = []
        _release(self)
        return sum(os.path.exists(self.path(k)) for k in range(self.count))

    def abort(self):
        _release(self)
        _remove_empty(self.created)   # only folders this run created and left empty


class FIDSink:
    """Streaming FID of the quantised samples (what saved files hold) against reference statistics."""

    def __init__(self, ref, inception_weights, device):
        from gfdm_fast.metrics import fid
        self.ref = fid.load_stats(ref)
        dims = int(self.ref[0].shape[0])
        model = fid.load_inception(dims, inception_weights, device)
        self.acc = fid.FIDAccumulator(dims, device, model=model)

    def add(self, chunk, images, labels):
        import torch
        u8 = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2)
        self.acc.update(u8, "samples")

    def finish(self):
        from gfdm_fast.metrics.fid import fid_from_stats
        self.acc.all_reduce()
        return fid_from_stats(*self.acc.stats(), *self.ref)

    def abort(self):
        pass



