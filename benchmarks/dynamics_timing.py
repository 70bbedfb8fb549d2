"""Cost and accuracy of the float64 coefficient math (issue 2's figures).

Prints, per (dynamics, H, K): the median time of ``marginal_stats`` on 1000 time
points, and the exact recipe's worst relative error of the covariance X-row
against a DOP853 solve at rtol 1e-13. Writes one JSON array with --json.

    python benchmarks/dynamics_timing.py [--json PATH] [--repeats 7]
"""
import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

from gfdm_fast import make_dynamics
from gfdm_fast.dynamics import tight_xrow


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    t = np.linspace(1e-5, 1.0, 1000)
    rows = []
    print(f"{'dyn':4} {'H':>4} {'K':>2} {'recipe':8} {'ms/1000 t':>10} {'max rel err X-row':>18}")
    for name, hurst, K in [("fvp", 0.9, 3), ("fvp", 0.1, 5), ("fvp", 0.7, 2), ("fve", 0.9, 3), ("fve", 0.1, 5)]:
        for recipe in ("exact", "official"):
            dyn = make_dynamics(name, hurst=hurst, num_aug=K, recipe=recipe)
            dyn.marginal_stats(t)  # panel cache
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                dyn.marginal_stats(t)
                times.append(time.perf_counter() - t0)
            ms = 1e3 * statistics.median(times)
            err = float("nan")
            if recipe == "exact":
                c = dyn.cov(t).numpy()
                ref = tight_xrow(dyn, t)
                got = np.vstack([c[:, 0, 0], c[:, 0, 1:].T])
                err = float(np.max(np.abs(got - ref) / np.abs(ref)))
            rows.append({"dynamics": name, "hurst": hurst, "K": K, "recipe": recipe, "ms_per_1000_t": ms,
                         "max_rel_err_xrow": err, "device": "cpu", "cpu": platform.processor() or platform.machine(),
                         "torch": torch.__version__})
            print(f"{name:4} {hurst:4.1f} {K:2d} {recipe:8} {ms:10.1f} {err:18.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
