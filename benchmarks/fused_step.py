"""Fused-step cost per backend: ns per pixel per step against the memory floor the step cannot beat.

For K in --num-aug, the Euler-Maruyama step (sde, Philox noise) and the exponential-integrator step
(order 2, sde) on a (B, C, H, W) batch, each backend available on the device (auto order first).
The floor is the bytes a step must move per pixel (planes read + written, float32) divided by the
device's copy bandwidth, measured here with a large device-to-device copy.

    python benchmarks/fused_step.py --device cuda --shape 1000 3 32 32 --num-aug 0 2 3 --json out.json

us/step is the time per call: at a tiny shape (1 3 32 32) it is the launch cost of the op (Python
dispatch + kernel launch), which CUDA graphs remove.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from gfdm_fast import bench, make_dynamics, ops  # noqa: E402
from gfdm_fast import schedule as S  # noqa: E402
from gfdm_fast.expint import build_exp_table  # noqa: E402


def bytes_per_pixel(solver, K, order=2):
    """float32 planes a step reads and writes per pixel (step table and seeds are negligible)."""
    if solver == "em":          # read z (K+1), e; write z (K+1), x_in
        return 4 * (2 * (K + 1) + 2)
    nh = order - 1              # read z (K+1), x_in, e, hist (nh); write z (K+1), hist slot, x_in
    return 4 * (2 * (K + 1) + 3 + nh + (1 if nh else 0))


def run(device, shape, Ks, iters, backends=None):
    dev = torch.device(device)
    bw = bench.copy_bandwidth(dev, 1 << 28 if dev.type == "cuda" else 1 << 24)
    pixels = 1
    for s in shape:
        pixels *= s
    rows = []
    for K in Ks:
        dyn = make_dynamics("fvp", hurst=0.9 if K else 0.5, num_aug=K)
        tables = {"em": S.build_em_table(dyn, 1000, mode="sde", dtype=torch.float32).to(dev),
                  "exp": build_exp_table(dyn, 20, mode="sde", order=2, grid="logsnr", substeps=16,
                                         dtype=torch.float32).to(dev)}
        seeds = torch.arange(shape[0], device=dev)
        for solver, table in tables.items():
            op = "em_step" if solver == "em" else "exp_step"
            for backend in backends or ops.available_backends(dev, op):
                if backend not in ops.available_backends(dev, op):
                    continue
                z = torch.randn(K + 1, *shape, device=dev)
                e, x = torch.randn(shape, device=dev), torch.randn(shape, device=dev)
                h = torch.zeros(1, *shape, device=dev)
                n = [0]

                def step():
                    n[0] = (n[0] + 1) % (table.table.shape[0] - 1)
                    if solver == "em":
                        ops.em_step(z, e, x, table, n[0], seeds, backend=backend)
                    else:
                        ops.exp_step(z, e, x, h, table, n[0], seeds, backend=backend)

                sec = bench.median_seconds(step, dev, warmup=2, repeats=iters)
                floor = bytes_per_pixel(solver, K) / bw
                rows.append({"device": str(dev), "solver": solver, "K": K, "backend": backend, "shape": list(shape),
                             "ns_per_pixel_step": 1e9 * sec / pixels, "floor_ns_per_pixel_step": 1e9 * floor,
                             "x_floor": sec / pixels / floor, "us_per_step": 1e6 * sec, "copy_GBps": bw / 1e9})
                r = rows[-1]
                print(f"{solver:>3} K={K} {backend:<6} {r['ns_per_pixel_step']:8.3f} ns/pixel/step  "
                      f"floor {r['floor_ns_per_pixel_step']:.3f}  x{r['x_floor']:.2f}  "
                      f"{r['us_per_step']:9.1f} us/step", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", type=int, nargs=4, default=None, help="B C H W (default 1000 3 32 32; CPU 8 3 32 32)")
    ap.add_argument("--num-aug", type=int, nargs="+", default=[0, 2, 3])
    ap.add_argument("--iters", type=int, default=None,
                    help="repeats of the median (gfdm_fast.bench.median_seconds; default 10 on a GPU, 5 on a CPU)")
    ap.add_argument("--backends", nargs="+", default=None,
                    help="only these backends (default: every one available on the device)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    shape = tuple(args.shape or ((1000, 3, 32, 32) if cuda else (8, 3, 32, 32)))
    rows = run(args.device, shape, args.num_aug, args.iters or (10 if cuda else 5), args.backends)
    print(f"copy bandwidth {rows[0]['copy_GBps']:.0f} GB/s on {args.device}" if rows else "no rows")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
