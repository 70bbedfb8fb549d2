"""Training throughput per preset (eager / bf16 / compiled) and the cost of the training draw.

    python benchmarks/train_step.py [--quick] [--json PATH] [--threads N] [--device cuda|cpu]

Rows 1: a whole optimizer step as `gfdm-fast train` runs it (Philox keys and
times, marginal_stats, fused noising, forward, MSE, backward, gradient clipping,
Adam), images/s as the median over timed steps after warm-up. Compiled rows are
skipped on CPU with --quick (inductor takes minutes there).
Rows 2: the training draw per pixel: the fused reduced form (`ops.noising`,
one normal per pixel) against the official joint (K+1)-variate draw
(`reference.training_pair(form="joint")`, Cholesky of Sreg per image and K+1
normals per pixel), both given the same batch and times; the statistics
(`marginal_stats`) are timed on their own row, since both forms need them.
"""
import argparse
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from gfdm_fast import make_dynamics, ops, reference
from gfdm_fast.loss import TIME_WEIGHT, draw_times, sample_seeds
from gfdm_fast.models import autocast, build_model, compile_model, preset, set_sdpa


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timeit(fn, device, warmup, reps):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_step_rows(args, device, dyn):
    rows = []
    for name in ("mnist", "cifar10"):
        cfg = preset(name)
        default_batch = (128 if device.type == "cuda" else (8 if args.quick else 32)) // (2 if name == "cifar10" else 1)
        B = args.batch or default_batch
        variants = [("eager", "fp32", False), ("bf16", "bf16", False), ("compiled", "fp32", True)]
        for label, precision, compiled in variants:
            if compiled and device.type == "cpu" and args.quick:
                continue
            torch.manual_seed(0)
            model = set_sdpa(build_model(cfg)).to(device).train()
            net = compile_model(model) if compiled else model
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            x0 = torch.rand(B, cfg.in_channels, cfg.image_size, cfg.image_size, device=device) * 2 - 1
            y = torch.randint(0, 10, (B,), device=device)
            state = {"m": 0}

            def step():
                seeds = sample_seeds(0, state["m"], B)
                state["m"] += 1
                t = draw_times(seeds)
                st = dyn.marginal_stats(t)
                x_in, eps = ops.noising(x0, st.mean_scale.float().to(device), st.sigma_c.float().to(device),
                                        seeds.to(device), 0)
                with autocast(device.type, precision):
                    e = net(x_in, (TIME_WEIGHT * t).float().to(device), y)
                loss = F.mse_loss(e.float(), eps)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

            warmup = 3 if compiled else 1
            reps = 2 if args.quick else 5
            t0 = time.perf_counter()
            dt = _timeit(step, device, warmup, reps)
            rows.append({"bench": "train_step", "preset": name, "variant": label, "batch": B,
                         "images_per_s": B / dt, "ms_per_step": 1e3 * dt,
                         "wall_s": time.perf_counter() - t0})
            print(f"  train_step {name:8s} {label:9s} batch {B:4d}: {B / dt:9.1f} images/s  ({1e3 * dt:8.1f} ms/step)",
                  flush=True)
    return rows


def noising_rows(args, device, dyn):
    B, C, H = (32, 3, 32) if args.quick else (128, 3, 32)
    x0 = torch.rand(B, C, H, H, device=device) * 2 - 1
    seeds = sample_seeds(0, 0, B)
    t = draw_times(seeds)
    st = dyn.marginal_stats(t)
    c, sig = st.mean_scale.float().to(device), st.sigma_c.float().to(device)
    seeds_d = seeds.to(device)
    pixels = x0.numel()
    reps = 5 if args.quick else 20
    backend = ops.resolve_backend("auto", device)
    cases = [
        ("marginal_stats (B times, float64)", lambda: dyn.marginal_stats(t)),
        (f"fused reduced (ops.noising, {backend})", lambda: ops.noising(x0, c, sig, seeds_d, 0)),
        ("reduced, torch reference (Philox)", lambda: ops.noising(x0, c, sig, seeds_d, 0, backend="torch")),
        ("joint (K+1)-variate (training_pair joint)", lambda: reference.training_pair(dyn, x0, t.to(device),
                                                                                      form="joint")),
    ]
    rows = []
    for label, fn in cases:
        dt = _timeit(fn, device, 2, reps)
        per_pixel = None if label.startswith("marginal") else 1e9 * dt / pixels
        rows.append({"bench": "noising", "case": label, "batch": B, "image": [C, H, H], "ms": 1e3 * dt,
                     "ns_per_pixel": per_pixel})
        pp = "" if per_pixel is None else f"{per_pixel:8.2f} ns/pixel"
        print(f"  noising {label:44s} {1e3 * dt:8.3f} ms  {pp}", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small batches, few reps, no compile on CPU")
    p.add_argument("--json", default=None, help="write rows to this JSON file")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default per device/preset)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dyn = make_dynamics("fvp", hurst=0.9, num_aug=3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    meta = {"device": name, "device_type": device.type, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "dynamics": "fvp H0.9 K3", "command": " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"device {name} ({device.type}), torch {torch.__version__}, threads {meta['threads']}")
    rows = train_step_rows(args, device, dyn) + noising_rows(args, device, dyn)
    for r in rows:
        r.update(meta)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
