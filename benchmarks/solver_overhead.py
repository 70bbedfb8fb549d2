"""Solver overhead: ns per pixel per step of the non-network work of one reverse Euler-Maruyama step.

    python benchmarks/solver_overhead.py [--quick] [--json PATH] [--device cpu|cuda] [--threads N]

Backends (every one available for the device):
  official  the unfused step of the official sampler, official layout (B, C, H, W, K+1): per step
            dyn.marginal_stats(t) on the host (recipe "official": the RK45 dense output), the per-pixel
            (K+1)x(K+1) solve of reference.augmented_score with a zero-cost network, the update of
            reference.sample_em and a torch.randn draw (the official loop draws its noise per step)
  torch     gfdm_fast.ops.em_step on the planar state, backend "torch" (reference twin, Philox in torch)
  cpp       the same op, C++/OpenMP backend (CPU)
  triton    the same op, Triton backend (CUDA only: the interpreter is not a benchmark)
  cuda      the same op, CUDA extension backend
One "pixel" is one element of X (B C H W of them); the state has K+1 planes. The memory floor counts
2 (K+2) float32 reads + writes per pixel per step (Z and eps in, Z and the next network input out)
at the copy bandwidth measured here (a large tensor copy).
Timings follow warm-up; the median of repeats (triton.testing.do_bench on a GPU, perf_counter on a CPU).
On a CPU shared with other processes, use --threads 1: an OpenMP region waits for its slowest thread,
and a thread waiting for a busy core costs a scheduler time slice per call (measured on the 2-core
machine at load ~6: 61 ns/pixel/step with 2 threads against 8 with 1).
"""
import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gfdm_fast import bench, make_dynamics, ops
from gfdm_fast import reference as ref
from gfdm_fast import schedule as S

STEPS = 1000
FULL_BATCH = (256, 3, 32, 32)
QUICK_BATCH = (64, 3, 32, 32)       # 3 MB per plane: still larger than L2, not than L3 (32 MB here)
KS = range(6)
FUSED = ("torch", "cpp", "triton", "cuda")


def dynamics(K):
    return make_dynamics("fvp", hurst=0.9 if K else 0.5, num_aug=K, recipe="official")


def fused_step(backend, K, batch, device, dyn):
    """One ops.em_step at a mid-grid sde step (Philox noise, as the sampler calls it)."""
    table = S.build_em_table(dyn, STEPS, mode="sde", device=device)
    gen = torch.Generator(device=device).manual_seed(K)
    z = torch.randn(K + 1, *batch, generator=gen, device=device)
    e = torch.randn(*batch, generator=gen, device=device)
    x_in = torch.empty(*batch, device=device)
    seeds = torch.arange(batch[0], dtype=torch.int64, device=device)
    n = torch.tensor(STEPS // 2, device=device)
    return lambda: ops.em_step(z, e, x_in, table, n, seeds, backend=backend)


def official_step(K, batch, device, dyn):
    """One iteration of reference.sample_em's body, augmented_score included, network free."""
    gen = torch.Generator(device=device).manual_seed(K)
    shape = batch if K == 0 else (*batch, K + 1)
    state = {"z": torch.randn(*shape, generator=gen, device=device)}
    eps_hat = torch.randn(*batch, generator=gen, device=device)
    def model(x, s, y):  # a zero-cost network
        return eps_hat
    t_grid, dt = ref.time_grid(dyn, STEPS)
    n = STEPS // 2
    t = t_grid[n].expand(batch[0])
    # sample_em computes F and G for the whole grid before its loop: not per-step work
    F, G = dyn.F(t_grid[n:n + 1])[0].float().to(device), dyn.G(t_grid[n:n + 1])[0].float().to(device)
    sqrt_dt = dt ** 0.5

    def step():
        z = state["z"]
        score = ref.augmented_score(model, dyn, z, t)
        noise = torch.randn(*batch, device=device)
        if K == 0:
            f, g = F[0, 0], G[0]
            z = z - (f * z - g * g * score) * dt + g * sqrt_dt * noise
        else:
            drift = z @ F.T - G * (score @ G)[..., None]
            z = z - drift * dt + G * (sqrt_dt * noise)[..., None]
        state["z"] = z
    return step


def run(device, quick):
    batch = QUICK_BATCH if quick else FULL_BATCH
    pixels = batch[0] * batch[1] * batch[2] * batch[3]
    bw = bench.copy_bandwidth(device, (16 if quick else 64) * 2 ** 20 if device.type == "cpu" else 256 * 2 ** 20,
                              repeats=5 if quick else 9)
    interpreted = device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    names = ["official"] + [b for b in FUSED if b in ops.available_backends(device)
                            and not (b == "triton" and interpreted)]
    rows, floors = [], {}
    for K in KS:
        dyn = dynamics(K)
        floors[K] = 2 * (K + 2) * 4 / bw * 1e9
        for name in names:
            fn = official_step(K, batch, device, dyn) if name == "official" else fused_step(name, K, batch, device, dyn)
            slow = name in ("official", "torch")
            repeats = (3 if quick else 5) if slow else (5 if quick else 11)
            sec = bench.median_seconds(fn, device, warmup=1 if slow else 3, repeats=repeats)
            ns = sec / pixels * 1e9
            rows.append({"backend": name, "device": device.type, "K": K, "batch": "x".join(map(str, batch)),
                         "ns_per_pixel_step": round(ns, 3), "gbytes_per_s": round(2 * (K + 2) * 4 / ns, 3)})
            print(f"  {name:8s} K={K}: {ns:9.2f} ns/pixel/step", flush=True)
    return rows, floors, bw


def describe(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def print_table(rows, floors, bw, device):
    print(f"\n{describe(device)}, torch {torch.__version__}, {datetime.date.today().isoformat()}")
    print(f"copy bandwidth {bw / 1e9:.2f} GB/s (read + write); floor = 2(K+2) float32 per pixel per step")
    print(f"{'backend':9s} {'K':>2s} {'batch':>12s} {'ns/px/step':>11s} {'GB/s':>7s} {'x floor':>8s} "
          f"{'official/x':>10s}")
    official = {r["K"]: r["ns_per_pixel_step"] for r in rows if r["backend"] == "official"}
    for K in sorted(floors):
        print(f"{'floor':9s} {K:2d} {'':>12s} {floors[K]:11.3f}")
        for r in (r for r in rows if r["K"] == K):
            ns = r["ns_per_pixel_step"]
            print(f"{r['backend']:9s} {K:2d} {r['batch']:>12s} {ns:11.3f} {r['gbytes_per_s']:7.2f} "
                  f"{ns / floors[K]:8.2f} {official[K] / ns:10.1f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"batch {'x'.join(map(str, QUICK_BATCH))}, fewer repeats")
    p.add_argument("--json", type=Path, default=None, help="write the rows as one JSON array here")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch and the cpp backend's OpenMP); default: torch's default")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    torch.set_grad_enabled(False)
    print(f"solver overhead on {describe(device)}; backends available: {', '.join(ops.available_backends(device))}")
    rows, floors, bw = run(device, args.quick)
    print_table(rows, floors, bw, device)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
