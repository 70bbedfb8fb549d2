"""Throughput of FID feature extraction: gfdm-fast's streaming FID vs pytorch-fid.

Rows: images/s through pytorch-fid's Inception (random weights with calibrated
batch norm: speed does not depend on the weights, and calibration keeps
activations away from slow denormals) for
  gfdm-fast  npy     FIDAccumulator over a memory-mapped uint8 .npy
  gfdm-fast  png     FIDAccumulator over a folder of PNGs (same reader as pytorch-fid)
  pytorch-fid png    pytorch-fid's calculate_activation_statistics over the same PNGs
and the wall time of a 50k FID estimated as 50000 / (images/s) plus one measured
Frechet distance (the 2048 x 2048 sqrtm). Warm-up batch before each timing;
CUDA is synchronised before reading the clock.

    python benchmarks/fid_throughput.py [--quick] [--json PATH] [--device cuda]
"""
import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytorch_fid
from pytorch_fid import fid_score as pfid
from pytorch_fid import inception as pfid_inception

from gfdm_fast.metrics import fid as F


def random_fid_weights(path, seed=0):
    """A random state dict of pytorch-fid's FID Inception, batch norm calibrated on random images."""
    torch.manual_seed(seed)
    net = pfid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for name, block in [("Mixed_5b", pfid_inception.FIDInceptionA(192, pool_features=32)),
                        ("Mixed_5c", pfid_inception.FIDInceptionA(256, pool_features=64)),
                        ("Mixed_5d", pfid_inception.FIDInceptionA(288, pool_features=64)),
                        ("Mixed_6b", pfid_inception.FIDInceptionC(768, channels_7x7=128)),
                        ("Mixed_6c", pfid_inception.FIDInceptionC(768, channels_7x7=160)),
                        ("Mixed_6d", pfid_inception.FIDInceptionC(768, channels_7x7=160)),
                        ("Mixed_6e", pfid_inception.FIDInceptionC(768, channels_7x7=192)),
                        ("Mixed_7b", pfid_inception.FIDInceptionE_1(1280)),
                        ("Mixed_7c", pfid_inception.FIDInceptionE_2(2048))]:
        setattr(net, name, block)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        net.train()(torch.rand(4, 3, 299, 299) * 2 - 1)
    torch.save(net.eval().state_dict(), path)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ours(source, model, dims, batch_size, device, workers):
    images = F.open_images(source)
    acc = F.FIDAccumulator(dims, device, model=model)
    acc.update(next(iter(images.batches(batch_size, 0))))  # warm-up
    acc = F.FIDAccumulator(dims, device, model=model)
    sync(device)
    t0 = time.perf_counter()
    stats = F.compute_statistics(images, acc, batch_size, workers)
    sync(device)
    return time.perf_counter() - t0, len(images), stats


def time_pytorch_fid(folder, weights, dims, batch_size, device, workers):
    state_dict = torch.load(weights, weights_only=True)
    saved = pfid_inception.load_state_dict_from_url  # pytorch-fid's own model, our file instead of its URL
    pfid_inception.load_state_dict_from_url = lambda *a, **k: state_dict
    try:
        model = pfid_inception.InceptionV3([pfid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[dims]]).to(device)
    finally:
        pfid_inception.load_state_dict_from_url = saved
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".png"))
    pfid.calculate_activation_statistics(files[:batch_size], model, batch_size, dims, device, 0)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    stats = pfid.calculate_activation_statistics(files, model, batch_size, dims, device, workers)
    sync(device)
    return time.perf_counter() - t0, len(files), stats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few images, 2048 dims only (< 5 min on 2 CPU cores)")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--device", default=None)
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    n, batch_size = (32, 16) if args.quick else ((2000, 200) if on_gpu else (200, 50))
    dims_list = (2048,) if args.quick else (64, 2048)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        device_name = f"CPU ({torch.get_num_threads()} threads, {os.cpu_count()} cores, {cpu})"
    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__,
                "pytorch_fid": pytorch_fid.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
                "python": platform.python_version()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "pt_inception-random.pth")
        random_fid_weights(weights)
        images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        np.save(os.path.join(tmp, "images.npy"), images)
        folder = os.path.join(tmp, "png")
        os.mkdir(folder)
        for i, img in enumerate(images):
            Image.fromarray(img).save(os.path.join(folder, f"{i:06d}.png"))
        for dims in dims_list:
            model = F.load_inception(dims, weights, device)
            timings = [("gfdm-fast", "npy (mmap)", *time_ours(os.path.join(tmp, "images.npy"), model, dims,
                                                             batch_size, device, args.num_workers)),
                       ("gfdm-fast", "png folder", *time_ours(folder, model, dims, batch_size, device,
                                                             args.num_workers)),
                       ("pytorch-fid", "png folder", *time_pytorch_fid(folder, weights, dims, batch_size, device,
                                                                      args.num_workers))]
            t0 = time.perf_counter()
            F.fid_from_stats(*timings[0][4], *timings[2][4])  # one Frechet distance at this dims (sqrtm)
            t_distance = time.perf_counter() - t0
            for impl, source, seconds, count, _ in timings:
                ips = count / seconds
                rows.append({"impl": impl, "input": source, "dims": dims, "batch_size": batch_size,
                             "images": count, "seconds": round(seconds, 3), "images_per_s": round(ips, 3),
                             "distance_s": round(t_distance, 3), "est_50k_s": round(50000 / ips + t_distance, 1),
                             "device": device_name, **versions,
                             "date": datetime.datetime.now().isoformat(timespec="seconds")})
    header = f"{'impl':<12} {'input':<11} {'dims':>5} {'batch':>5} {'images':>6} {'seconds':>8} {'img/s':>8} " \
             f"{'sqrtm s':>8} {'est. 50k FID':>13}"
    print(f"device: {device_name}; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(header)
    print("-" * len(header))
    for r in rows:
        est = r["est_50k_s"]
        print(f"{r['impl']:<12} {r['input']:<11} {r['dims']:>5} {r['batch_size']:>5} {r['images']:>6} "
              f"{r['seconds']:>8.2f} {r['images_per_s']:>8.2f} {r['distance_s']:>8.1f} "
              f"{int(est // 3600):>6d} h {int(est % 3600 // 60):02d} min")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"rows written to {args.json}")


if __name__ == "__main__":
    main()
