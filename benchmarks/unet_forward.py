"""Forward throughput of the score network: images/s and achieved TFLOP/s per preset,
batch size and fast path.

    python benchmarks/unet_forward.py [--quick] [--json PATH] [--device cuda|cpu]

Variants add one switch at a time:
  eager          legacy attention, float32 (the official code's path)
  sdpa           eager + scaled_dot_product_attention
  channels_last  sdpa + NHWC weights and input
  bf16           channels_last + bf16 autocast (GroupNorm and softmax stay float32)
  compiled_fp32  sdpa + torch.compile (mode --compile-mode), compile time excluded
  compiled       bf16 + torch.compile (GPU default; CPUs without native bf16 skip it)
FLOP per image (18.8 G cifar10, 4.6 G mnist) is torch.utils.flop_counter's count
(2 per multiply-add: convolutions, linears, attention matmuls). A bf16 matmul
row gives the device's dense matrix rate for comparison (the issue's target:
cifar10 at batch 512 >= 40% of it on a GPU).
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gfdm_fast.models import PRESETS, UNetModel, compile_model, set_sdpa  # noqa: E402

GFLOP_PER_IMAGE = {"cifar10": 18.8, "mnist": 4.6}
# variant -> switches; each row adds one switch to a previous one
VARIANTS = {
    "eager":          (),
    "sdpa":           ("sdpa",),
    "channels_last":  ("sdpa", "channels_last"),
    "bf16":           ("sdpa", "channels_last", "bf16"),
    "compiled_fp32":  ("sdpa", "compile"),
    "compiled":       ("sdpa", "channels_last", "bf16", "compile"),
}
# This CPU has no native bf16 (emulated: 4x slower than fp32, measured), so the
# CPU default compiles the fp32 path only; --quick on a CPU skips compilation:
# a cold inductor build of the mnist preset took 356 s on the 2-core machine.
CPU_VARIANTS = ["eager", "sdpa", "channels_last", "bf16", "compiled_fp32"]
CPU_QUICK_VARIANTS = ["eager", "sdpa", "channels_last", "bf16"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device, warmup, repeats, min_time):
    """Median seconds per call: ``warmup`` untimed calls, then ``repeats`` timed
    groups of as many calls as fill ``min_time`` seconds, each group synchronised."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    once = max(time.perf_counter() - t0, 1e-6)
    n = max(1, int(min_time / once))
    samples = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def matmul_rate(device, dtype, n, args):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sec = time_call(lambda: a @ b, device, args.warmup, args.repeats, args.min_time)
    return 2 * n ** 3 / sec / 1e12


def make_forward(preset, variant, batch, device, args):
    """The model for ``variant`` and a no-argument forward on a fixed batch."""
    cfg = PRESETS[preset]
    stack = VARIANTS[variant]
    torch.manual_seed(0)
    net = UNetModel(**cfg.to_kwargs()).eval().to(device)
    set_sdpa(net, "sdpa" in stack)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    t = torch.rand(batch, device=device) * 999
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    if "channels_last" in stack:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if "bf16" in stack
           else contextlib.nullcontext())
    if "compile" in stack:
        torch._dynamo.reset()
        t0 = time.perf_counter()
        with amp:
            net = compile_model(net, mode=args.compile_mode, example_inputs=(x, t, y))
        print(f"  compiled {preset} b={batch} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    def forward():
        with torch.no_grad(), amp:
            return net(x, t, y)
    return forward


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny batches, few repeats (CPU smoke run)")
    p.add_argument("--json", type=Path, help="write the rows as a JSON array here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--presets", default="mnist,cifar10")
    p.add_argument("--batch-sizes", help="comma-separated (default: 64,256,512 on GPU; 1,4 on CPU; 2 quick)")
    p.add_argument("--variants", help=f"comma-separated from {', '.join(VARIANTS)} "
                   "(default: all on GPU; on CPU all but 'compiled', and no compilation with --quick)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: inductor default)")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False   # fp32 rows stay true fp32
        torch.backends.cudnn.allow_tf32 = False
    if args.batch_sizes:
        batches = [int(b) for b in args.batch_sizes.split(",")]
    elif args.quick:
        batches = [2]
    else:
        batches = [64, 256, 512] if device.type == "cuda" else [1, 4]
    args.warmup, args.repeats, args.min_time = (2, 3, 0.5) if args.quick else (5, 7, 2.0)
    if args.variants:
        variants = [v for v in args.variants.split(",") if v]
    else:
        variants = (list(VARIANTS) if device.type == "cuda"
                    else CPU_QUICK_VARIANTS if args.quick else CPU_VARIANTS)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")

    meta = {"device": device_name(device), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "quick": args.quick}
    rows = []
    mm_n = 8192 if device.type == "cuda" else 512
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rates[name] = matmul_rate(device, dtype, mm_n, args)
        rows.append(meta | {"preset": f"matmul {name} {mm_n}^3", "variant": "peak", "batch": None,
                            "ms": None, "images_per_s": None, "tflops": rates[name]})
    print(f"{meta['device']}, torch {meta['torch']}; dense matmul {mm_n}^3: "
          f"fp32 {rates['fp32']:.4f}, bf16 {rates['bf16']:.4f} TFLOP/s")
    print(f"{'preset':8} {'batch':>5} {'variant':14} {'ms/forward':>11} {'images/s':>10} "
          f"{'TFLOP/s':>8} {'x eager':>8}")  # x eager: speed-up over the first variant
    for preset in args.presets.split(","):
        for batch in batches:
            base = None
            for variant in variants:
                forward = make_forward(preset, variant, batch, device, args)
                sec = time_call(forward, device, args.warmup, args.repeats, args.min_time)
                ips = batch / sec
                tflops = ips * GFLOP_PER_IMAGE[preset] / 1e3
                base = base or ips
                rows.append(meta | {"preset": preset, "variant": variant, "batch": batch,
                                    "ms": sec * 1e3, "images_per_s": ips, "tflops": tflops,
                                    "fraction_of_bf16_matmul": tflops / rates["bf16"],
                                    "fraction_of_fp32_matmul": tflops / rates["fp32"]})
                print(f"{preset:8} {batch:5d} {variant:14} {sec * 1e3:11.2f} {ips:10.2f} "
                      f"{tflops:8.4f} {ips / base:8.2f}", flush=True)
                del forward
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    main()
