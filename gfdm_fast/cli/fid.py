"""`gfdm-fast fid PATH1 PATH2`: FID as pytorch-fid computes it, optionally with VS_p.

Each PATH is an image folder, an .npz/.npy of images (or a folder of them), a
statistics .npz (mu, sigma) or a data set name (cifar10, mnist, fashionmnist
with --data_dir, train split). ``--save-stats SRC OUT.npz`` writes SRC's
statistics in pytorch-fid's format.
"""
import os

from gfdm_fast.errors import UserError
from gfdm_fast.io import check_writable

DIMS = (64, 192, 768, 2048)  # pytorch-fid's InceptionV3.BLOCK_INDEX_BY_DIM


def add_arguments(parser):
    parser.add_argument("path", nargs=2, metavar="PATH",
                        help="image folder, .npz/.npy of images, statistics .npz or data set name "
                             "(with --save-stats: SRC OUT.npz)")
    parser.add_argument("--dims", type=int, default=2048, choices=DIMS, help="Inception feature size (default 2048)")
    parser.add_argument("--batch-size", type=int, default=50, help="images per Inception batch (default 50)")
    parser.add_argument("--device", default=None, help="cuda, cuda:0 or cpu (default: cuda when available)")
    parser.add_argument("--inception-weights", metavar="FILE", default=None,
                        help="pytorch-fid's FID Inception state dict (pt_inception-2015-12-05-6726825d.pth) for "
                             "offline use; default: pytorch-fid's download/cache")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="data loading processes for image folders (default min(8, CPUs), as pytorch-fid)")
    parser.add_argument("--save-stats", action="store_true", help="write the statistics of SRC to OUT.npz")
    parser.add_argument("--vendi", action="store_true", help="also print the pixel Vendi score VS_p of each PATH")
    parser.add_argument("--data_dir", "--data-dir", dest="data_dir", default=None,
                        help="root folder of torchvision data sets for a data set name PATH")
    parser.add_argument("--features", default="inception", metavar="inception|judge:NAME",
                        help="feature extractor: Inception (FID, default) or judge:NAME, a small classifier trained "
                             "once on data set NAME's training split and cached (e.g. judge:mnist5k for 28x28 "
                             "digits); the judge also prints the class consistency of labelled images")


def _num_workers(value):
    if value is not None:
        if value < 0:
            raise UserError(f"--num-workers must be >= 0, got {value}")
        return value
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return min(8, cpus)


def _judge_data(features):
    """None for Inception, else the data set name of ``judge:NAME``."""
    if features == "inception":
        return None
    if features.startswith("judge:") and len(features) > len("judge:"):
        return features[len("judge:"):]
    raise UserError(f"--features takes inception or judge:NAME (e.g. judge:mnist5k), got {features!r}")


def _npz_labels(path):
    import numpy as np
    if not str(path).endswith(".npz"):
        return None
    with np.load(path) as f:
        return f["labels"].reshape(-1).astype("int64") if "labels" in f.files else None


def run(args):
    import torch

    from gfdm_fast.metrics.fid import (
        FIDAccumulator,
        compute_statistics,
        fid_from_stats,
        is_stats_file,
        load_inception,
        load_stats,
        open_images,
        save_stats,
    )
    from gfdm_fast.metrics.vendi import VendiAccumulator

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    workers = _num_workers(args.num_workers)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.save_stats:
        src, out = args.path
        if not out.endswith(".npz"):
            raise UserError(f"--save-stats output {out} must end in .npz (pytorch-fid's statistics format)")
        if os.path.exists(out):
            raise UserError(f"--save-stats output {out} exists; remove it or choose another name")
        if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
            raise UserError(f"--save-stats output folder {os.path.dirname(os.path.abspath(out))} does not exist")
        check_writable(os.path.dirname(os.path.abspath(out)))   # fails now, not after the feature pass
        if is_stats_file(src):
            raise UserError(f"{src} is already a statistics file")
    judge_data = _judge_data(args.features)
    # Check every source before the (slow) Inception load.
    sources = [None if is_stats_file(p) else open_images(p, args.data_dir) for p in args.path[:1 if args.save_stats
                                                                                               else 2]]
    dims = args.dims
    if judge_data is not None:
        from gfdm_fast.metrics.judge import FEATURE_DIMS
        dims = FEATURE_DIMS
    loaded = {p: load_stats(p) for p, images in zip(args.path, sources) if images is None}
    computes = any(images is not None for images in sources)
    for path, (mu, _) in loaded.items():          # before any feature pass: a mismatch costs nothing
        if computes and mu.shape != (dims,):
            raise UserError(f"{path} holds {mu.shape[0]}-dim statistics but the features are {dims}-dim; "
                            "use the extractor that wrote it (--dims / --features)")
    model, extractor = None, None
    if judge_data is not None:
        from gfdm_fast.metrics.judge import load_judge
        model = load_judge(judge_data, args.data_dir, device=device, progress=True)
        extractor = model.features
    elif any(s is not None for s in sources):
        model = load_inception(args.dims, args.inception_weights, device)
    stats, vendi, consistency = [], [], []
    for path, images in zip(args.path, sources):
        if images is None:
            stats.append(loaded[path])
            vendi.append(None)
            continue
        acc = FIDAccumulator(dims, device, model=model, extractor=extractor)
        vs = VendiAccumulator(device) if args.vendi else None
        counter = None
        if judge_data is not None:          # labelled .npz samples: does the judge agree with their labels?
            from gfdm_fast.metrics.judge import ConsistencyCounter
            labels = _npz_labels(path)
            if labels is not None and len(labels) == len(images):
                counter = ConsistencyCounter(model, labels)
        stats.append(compute_statistics(images, acc, args.batch_size, workers,
                                        extra=[a for a in (vs, counter) if a is not None], progress=True))
        vendi.append(vs.score() if vs else None)
        if counter is not None:
            consistency.append((path, counter.value()))
    if args.save_stats:
        save_stats(out, *stats[0])
        print(f"Saved statistics of {src} ({len(sources[0])} images, {dims} dims) to {out}")
    else:
        print(f"{'FID' if judge_data is None else 'FD (judge:' + judge_data + ')'}: "
              f"{fid_from_stats(*stats[0], *stats[1])}")
    for path, value in consistency:
        print(f"class consistency: {value:.4f}  ({path})")
    if args.vendi:
        for path, value in zip(args.path, vendi):
            print(f"VS_p: {value}  ({path})" if value is not None else f"VS_p: n/a  ({path} is a statistics file)")
