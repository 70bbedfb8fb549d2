"""End to end: wall time and device-hours of a 50k-sample x N-step cifar10 run with FID, per variant.

    python benchmarks/end_to_end.py [--quick] [--json PATH] [--device cpu|cuda] [--steps 1000]
                                    [--samples 50000] [--batch N] [--num-aug 3] [--variants ...]
                                    [--fid-images N] [--inception-weights FILE] [--threads N]

EXTRAPOLATED, not a full run: the sampling rate of each variant is measured on a shortened run
(``--batch`` images x a few steps, gfdm_fast.bench: warm-up, synchronised, median of repeats,
random cifar10 network, FVP hurst 0.9, reverse sde), the FID feature extraction on ``--fid-images``
images through the FID Inception (on-the-fly FID: gfdm_fast.metrics.FIDAccumulator, float64 sums)
and one Frechet distance (the 2048 x 2048 matrix square root, timed at --sqrtm-dims and scaled
by n^3 when smaller); then

    wall = samples x steps / (images x NFE / s)  +  samples / (FID images / s)  +  sqrtm

with the reference statistics taken as precomputed. Device-hours = wall on one GPU, or the CPU
core-hours (wall x torch threads) on a CPU. Inception weights: ``--inception-weights FILE``, else
random weights (speed does not depend on them): pytorch-fid's FID Inception with calibrated batch
norm when pytorch-fid is installed, else torchvision's Inception v3 (the same architecture family,
a stand-in for the timing only).
"""
import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gfdm_fast import bench

SAMPLES, STEPS = 50_000, 1000


def inception(device, weights=None):
    """(features(images in [0,1]) -> (B, 2048), description)."""
    try:
        from gfdm_fast.metrics import fid as F
    except ImportError:
        F = None
    if F is not None:
        if weights is None:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from fid_throughput import random_fid_weights
            tmp = tempfile.mkdtemp()
            weights = os.path.join(tmp, "pt_inception-random.pth")
            random_fid_weights(weights)
            what = "pytorch-fid FID Inception, random weights (calibrated batch norm)"
        else:
            what = f"pytorch-fid FID Inception, weights {weights}"
        acc = F.FIDAccumulator(2048, device, inception_weights=weights)
        return acc.update, what
    if weights is not None:
        raise SystemExit("--inception-weights needs pytorch-fid (pip install pytorch-fid)")
    import torch.nn.functional as nnf
    import torchvision
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    net.fc = torch.nn.Identity()
    net = net.eval().to(device)
    sums = {"f": torch.zeros(2048, dtype=torch.float64, device=device),
            "ff": torch.zeros(2048, 2048, dtype=torch.float64, device=device)}

    def update(x):
        with torch.no_grad():
            x = nnf.interpolate(x.to(device).expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear",
                                align_corners=False)
            f = net(2 * x - 1).double()
        sums["f"] += f.sum(0)
        sums["ff"].addmm_(f.T, f)
    return update, "torchvision Inception v3 with random weights (stand-in: pytorch-fid is not installed)"


def time_fid(device, n, batch, weights):
    update, what = inception(device, weights)
    images = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    update(images[:min(batch, n)].to(device))                           # warm-up
    bench.sync(device)
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        update(images[i:i + batch].to(device))
    bench.sync(device)
    return n / (time.perf_counter() - t0), what


def time_sqrtm(dims):
    """Seconds of one Frechet distance's matrix square root at ``dims`` (scipy, as pytorch-fid), scaled to 2048."""
    from scipy import linalg
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2 * dims, dims)), rng.standard_normal((2 * dims, dims))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    t0 = time.perf_counter()
    linalg.sqrtm(s1.dot(s2))
    sec = time.perf_counter() - t0
    return sec * (2048 / dims) ** 3


def hours(sec):
    return sec / 3600


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU: batch 2, 2 steps, 4 FID images, sqrtm at 512 dims")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--samples", type=int, default=SAMPLES)
    p.add_argument("--steps", type=int, default=STEPS, help="NFE of the full run being estimated")
    p.add_argument("--batch", type=int, default=None, help="images per batch of the measured run")
    p.add_argument("--num-aug", type=int, default=3)
    p.add_argument("--variants", nargs="+", choices=bench.VARIANTS, default=None)
    p.add_argument("--fid-images", type=int, default=None)
    p.add_argument("--fid-batch", type=int, default=None)
    p.add_argument("--sqrtm-dims", type=int, default=None, help="default 2048 (512 with --quick)")
    p.add_argument("--inception-weights", default=None, help="pytorch-fid's FID Inception weights file")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    torch.set_grad_enabled(False)
    gpu = device.type == "cuda"
    fid_n = args.fid_images or (4 if args.quick and not gpu else (500 if gpu else 50))
    fid_batch = args.fid_batch or (min(fid_n, 250) if gpu else min(fid_n, 16))
    sq_dims = args.sqrtm_dims or (512 if args.quick else 2048)
    print(f"end to end on {bench.describe(device)}, torch {torch.__version__}, {datetime.date.today().isoformat()}: "
          f"{args.samples} cifar10 samples x {args.steps} steps + FID, EXTRAPOLATED from shortened runs", flush=True)

    rows = bench.run_benchmark(device, quick=args.quick, presets=("cifar10",), variants=args.variants,
                               ks=(args.num_aug,), batch=args.batch, log=lambda m: print(m, flush=True))
    fid_rate, fid_what = time_fid(device, fid_n, fid_batch, args.inception_weights)
    sqrtm_s = time_sqrtm(sq_dims)
    print(f"FID features: {fid_rate:.3f} images/s on {fid_n} images ({fid_what})")
    scaled = f" (timed at {sq_dims}, scaled by n^3)" if sq_dims != 2048 else ""
    print(f"Frechet distance: {sqrtm_s:.1f} s for 2048 dims" + scaled)
    threads = 1 if gpu else torch.get_num_threads()
    unit = "GPU-h" if gpu else "CPU core-h"
    out = []
    print(f"\n{'variant':11s} {'batch':>5s} {'img*NFE/s':>11s} {'sampling h':>11s} {'FID h':>8s} {'wall h':>9s} "
          f"{unit:>11s}  (EXTRAPOLATED to {args.samples} x {args.steps} NFE)")
    fid_s = args.samples / fid_rate + sqrtm_s
    for r in rows:
        sample_s = args.samples * args.steps / r["images_nfe_per_s"]
        wall = sample_s + fid_s
        row = {"variant": r["variant"], "device": r["device"], "batch": r["batch"], "K": r["K"],
               "images_nfe_per_s": r["images_nfe_per_s"], "samples": args.samples, "steps": args.steps,
               "sampling_hours": round(hours(sample_s), 4), "fid_hours": round(hours(fid_s), 4),
               "wall_hours": round(hours(wall), 4), "device_hours": round(hours(wall) * threads, 4),
               "extrapolated": True, "fid_images_per_s": round(fid_rate, 4), "sqrtm_seconds": round(sqrtm_s, 2),
               "inception": fid_what}
        out.append(row)
        print(f"{r['variant']:11s} {r['batch']:5d} {r['images_nfe_per_s']:11.3f} {row['sampling_hours']:11.2f} "
              f"{row['fid_hours']:8.2f} {row['wall_hours']:9.2f} {row['device_hours']:11.2f}")
    if bench.cpu_clock_is_thread_time(device):
        print("(one CPU thread: rates are per thread CPU second, i.e. what an otherwise idle core gives)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
