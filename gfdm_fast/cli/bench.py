"""`gfdm-fast bench`: the quick throughput benchmark (images x NFE / s, sampler step / network forward).

The same measurement as benchmarks/throughput.py --quick (the timing code is gfdm_fast.bench);
the full sizes, compiled variants and the plot are in that script.
"""
import json
from pathlib import Path

from gfdm_fast.errors import UserError
from gfdm_fast.io import atomic_write_file, check_writable


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true",
                        help="accepted for symmetry with benchmarks/throughput.py: "
                             "this command always runs the quick sizes")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the rows as one JSON array here")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--preset", nargs="+", choices=("mnist", "cifar10"), default=["mnist", "cifar10"])
    parser.add_argument("--num-aug", type=int, nargs="+", default=[0, 2, 3], help="K values (default 0 2 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads; 1 on a shared CPU (the clock is then the thread's CPU time)")


def run(args):
    import torch

    from gfdm_fast import bench
    if args.threads is not None:
        if args.threads < 1:
            raise UserError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu")
    if args.json is not None and args.json.is_dir():
        raise UserError(f"--json {args.json} is a folder; give a file path")
    if args.json is not None:    # a folder that cannot be written fails now, not after the benchmark
        args.json.parent.mkdir(parents=True, exist_ok=True)
        check_writable(args.json.parent)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_grad_enabled(False)
    print(f"gfdm-fast bench (quick) on {bench.describe(device)}, torch {torch.__version__}", flush=True)
    details = []
    rows = bench.run_benchmark(device, quick=True, presets=tuple(args.preset), ks=tuple(args.num_aug),
                               log=lambda m: print(m, flush=True), details=details)
    print()
    print(bench.format_table(rows, details))
    if args.json is not None:
        atomic_write_file(str(args.json), lambda f: f.write((json.dumps(rows, indent=1) + "\n").encode()))
        print(f"wrote {args.json}")
    return 0
