"""Throughput per NFE of the whole sampler: images x NFE / s and sampler step / bare network forward.

    python benchmarks/throughput.py [--quick] [--json PATH] [--plot PATH] [--device cpu|cuda]
                                    [--preset mnist cifar10] [--batch N] [--num-aug 0 2 3]
                                    [--variants ...] [--steps N] [--repeats N] [--threads N]

Random networks of the ``mnist`` and ``cifar10`` presets, K in {0, 2, 3}, variants ``official``
(eager fp32 network + the official-style unfused loop), ``fused``, ``compiled``, ``bf16``,
``cuda_graphs`` (GPU only) and ``all``; what each one switches on and how it is timed is in
gfdm_fast/bench.py (shared with ``gfdm-fast bench``). Prints a table, writes the rows as one JSON
array and a PNG bar chart (PIL) of images x NFE / s per variant.

``--quick`` on a CPU: batch 2, 2 steps per timed run, 3 repeats; ``compiled``/``all`` are skipped
(a cold inductor compile takes minutes here) and so is ``bf16`` on a CPU without native bf16.
On a shared CPU use ``--threads 1``: the clock is then the thread's CPU time.
"""
import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gfdm_fast import bench  # noqa: E402


def add_arguments(p):
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU: batch 2, 2 steps), no compilation on a CPU")
    p.add_argument("--json", type=Path, default=None, help="write the rows as one JSON array here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG bar chart of images x NFE / s here")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    p.add_argument("--preset", nargs="+", choices=bench.PRESETS, default=list(bench.PRESETS), help="network presets")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default: 1000 on a GPU, 2/16 on a CPU)")
    p.add_argument("--num-aug", type=int, nargs="+", default=list(bench.KS), help="K values (default 0 2 3)")
    p.add_argument("--variants", nargs="+", choices=bench.VARIANTS, default=None, help="default: all of them")
    p.add_argument("--steps", type=int, default=None, help="sampler steps per timed run (>= 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed (forwards, run) pairs per row")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1: CPU-time clock)")


def main(argv=None, prog=None):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return run(args)


def run(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.batch is not None and args.batch < 1 or args.steps is not None and args.steps < 2:
        raise SystemExit("--batch must be >= 1 and --steps >= 2")
    torch.set_grad_enabled(False)
    clock = "thread CPU time" if bench.cpu_clock_is_thread_time(device) else "wall time"
    print(f"throughput on {bench.describe(device)}, torch {torch.__version__}, {datetime.date.today().isoformat()}; "
          f"clock: {clock}", flush=True)
    details = []
    rows = bench.run_benchmark(device, quick=args.quick, presets=tuple(args.preset), variants=args.variants,
                               ks=tuple(args.num_aug), batch=args.batch, steps=args.steps, repeats=args.repeats,
                               log=lambda m: print(m, flush=True), details=details)
    print()
    print(bench.format_table(rows, details))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot and rows:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        bench.plot_bars(rows, args.plot)
        print(f"wrote {args.plot}")
    return rows


if __name__ == "__main__":
    main()
