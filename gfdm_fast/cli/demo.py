"""`gfdm-fast demo`: train a small FVP (H = 0.9, K = 3) model on scikit-learn's 8x8 digits, then sample.

Needs no download: the digits ship inside scikit-learn. Training is bounded by
``--minutes`` (and ``--steps``); then the fused Sampler draws a grid. Writes
to ``--out`` (default ``gfdm_demo/``): ``samples.png`` (generated), ``real.png``
(held-out digits), ``samples.npz`` and the run folder with checkpoints. Prints
the sampler's throughput and a nearest-neighbour distance between generated
and held-out images, with the same distance for real training images as the
yardstick (lower is closer; real images score about the yardstick).

Real 28x28 MNIST digits need far more than the demo's few minutes on a CPU: that
run is ``benchmarks/real_data.py`` (FVP against VP, judged by a digit classifier;
its table is in benchmarks/RESULTS.md).
"""
import os
import time

from gfdm_fast.cli import parse_bool
from gfdm_fast.errors import UserError


def add_arguments(parser):
    parser.add_argument("--out", default="gfdm_demo", help="output folder (default gfdm_demo/)")
    parser.add_argument("--minutes", type=float, default=4.0, help="training wall-time bound (default 4)")
    parser.add_argument("--steps", type=int, default=20_000, help="training steps bound (default 20000)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--image_size", type=int, default=8, help="8 (native) or 16 (upscaled); default 8")
    parser.add_argument("--model_channels", type=int, default=32)
    parser.add_argument("--sample_steps", type=int, default=500, help="Euler-Maruyama steps (NFE) of the sampler")
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--mode", default="sde", choices=("sde", "ode"))
    parser.add_argument("--use_ema", type=parse_bool, default=False,
                        help="sample from the EMA weights (default False: a few-minute run is shorter than "
                             "the official EMA's horizon)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", type=parse_bool, default=True)
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads; 0 = the cores not already busy (by the load average), at least 1")


def auto_threads():
    """Cores not already busy: on an oversubscribed CPU, OpenMP teams that spin-wait for a
    descheduled thread run several times slower than one thread."""
    import torch
    n = torch.get_num_threads()
    try:
        busy = round(os.getloadavg()[0])
    except (AttributeError, OSError):
        return n
    return max(1, min(n, (os.cpu_count() or n) - busy))


def nn_distance(a, b, chunk=256):
    """Mean over rows of ``a`` of the L2 distance to the nearest row of ``b`` (images flattened)."""
    import torch
    a, b = a.reshape(len(a), -1).double(), b.reshape(len(b), -1).double()
    best = [torch.cdist(a[i:i + chunk], b).min(dim=1).values for i in range(0, len(a), chunk)]
    return float(torch.cat(best).mean())


def run(args):
    import shutil

    import numpy as np
    import torch

    from gfdm_fast.data import load_dataset
    from gfdm_fast.io import save_grid, to_uint8
    from gfdm_fast.sampler import Sampler
    from gfdm_fast.train import TrainConfig, train

    if args.image_size not in (8, 16, 32):
        raise UserError(f"--image_size must be 8, 16 or 32, got {args.image_size}")
    if args.minutes <= 0 or args.steps < 1 or args.num_samples < 1 or args.sample_steps < 2:
        raise UserError("--minutes, --steps, --num_samples must be positive and --sample_steps >= 2")
    threads = args.threads or auto_threads()
    if (args.device or "cpu").startswith("cpu") or not torch.cuda.is_available():
        torch.set_num_threads(threads)
        print(f"using {threads} CPU thread(s)")
    run_root = os.path.join(args.out, "runs")
    if os.path.isdir(run_root):
        shutil.rmtree(run_root)      # the demo always starts afresh
    cfg = TrainConfig(data_name="digits", image_size=args.image_size, channels=1, num_classes=0,
                      dynamics="fvp", hurst=0.9, num_aug=3, model_channels=args.model_channels,
                      num_res_blocks=1, attn_resolutions="2", channel_mult="1,2", dropout=0.0,
                      use_ema=True, lr=args.lr, batch_size=args.batch_size, train_steps=args.steps,
                      max_minutes=args.minutes, gradient_clip_val=1.0, seed=args.seed, output_dir=run_root,
                      wb_id="demo", log_model_every_n=10 ** 9, val_check_interval=0, log_every_n_steps=50,
                      device=args.device, progress=args.progress)
    t0 = time.perf_counter()
    res = train(cfg)
    t_train = time.perf_counter() - t0
    first, last = res.losses[0][1], np.mean([loss for _, loss in res.losses[-3:]])
    print(f"trained {res.step} steps in {t_train / 60:.1f} min (loss {first:.3f} -> {last:.3f}); "
          f"run folder {res.run_dir}")

    net = (res.ema_model if args.use_ema and res.ema_model is not None else res.model).eval()
    shape = (1, args.image_size, args.image_size)
    sampler = Sampler(res.dynamics, net, steps=args.sample_steps, mode=args.mode, progress=args.progress)
    sampler.sample(min(4, args.num_samples), shape, seed=10 ** 6)     # warm-up, not timed
    dev = next(net.parameters()).device
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    x = sampler.sample(args.num_samples, shape, seed=args.seed)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t_sample = time.perf_counter() - t0
    x = x.clamp(-1, 1).cpu()

    held_out = load_dataset("digits", split="test", image_size=args.image_size)
    real_test = held_out.__getitems__(list(range(len(held_out))))[0]
    train_set = load_dataset("digits", split="train", image_size=args.image_size)
    g = torch.Generator().manual_seed(1)
    real_train = train_set.__getitems__(torch.randperm(len(train_set), generator=g)[:args.num_samples].tolist())[0]
    os.makedirs(args.out, exist_ok=True)
    save_grid(x, os.path.join(args.out, "samples.png"))
    save_grid(real_test[:args.num_samples], os.path.join(args.out, "real.png"))
    np.savez(os.path.join(args.out, "samples.npz"),
             images=to_uint8(x))

    n = args.num_samples
    noise = torch.randn(n, *shape, generator=g).clamp(-1, 1)
    print(f"sampler: {n} images x {args.sample_steps} NFE ({args.mode}) in {t_sample:.2f} s = "
          f"{n / t_sample:.1f} images/s, {n * args.sample_steps / t_sample:.0f} images x NFE/s")
    print(f"nearest-neighbour L2 distance to the {len(real_test)} held-out digits (pixels in [-1, 1], "
          f"{shape[1]}x{shape[2]}; mean over {n} images):")
    print(f"  generated      {nn_distance(x, real_test):.3f}")
    print(f"  real (train)   {nn_distance(real_train, real_test):.3f}   <- yardstick")
    print(f"  Gaussian noise {nn_distance(noise, real_test):.3f}")
    print(f"  held-out -> generated {nn_distance(real_test, x):.3f} "
          f"vs held-out -> real {nn_distance(real_test, real_train):.3f}"
          f"  (coverage: high means missing modes)")
    print(f"wrote {os.path.join(args.out, 'samples.png')} and {os.path.join(args.out, 'real.png')}")
    print("real 28x28 MNIST digits (FVP vs VP, judged by a digit classifier): python benchmarks/real_data.py, "
          "table in benchmarks/RESULTS.md")
