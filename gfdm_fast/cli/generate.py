"""`gfdm-fast generate`: the official ``generate.py``, drop-in, streaming and multi-process.

Reads ``{output_dir}/{run_id}_{data_name}_H{hurst}_K{num_aug}/model/model-{version}.pth``
(``ema_model-{version}.pth`` with ``--use_ema True``, the default) or ``--checkpoint PATH``
and writes, as the official code does, one
``generated_data/model-{version}/{mode}{steps}/data/data_{stamp}.npy`` ((N, H, W, C)
float32, ``(x + 1) / 2``, not clipped) and one ``label/label_{stamp}.npy`` (float32, as
the official) per run, with exactly ``--n_samples`` entries. ``--out DIR`` writes
resumable uint8 ``.npz`` shards (``arr_0`` + ``labels``) or PNG grids instead;
``--fid-ref STATS.npz`` computes FID on the fly without keeping images.

Sample policy: float outputs are kept as the official writes them; anything
quantised (PNG, uint8 npz, FID input) is clipped to [0, 1] and rounded to
uint8 levels first, so the FID of saved files equals the on-the-fly FID.

Settings come from the flags, else from what the run recorded (``gfdm_run.json``
beside ``model/``, an engine-format checkpoint, the run folder's name), else
the official defaults; a flag that contradicts a recorded value is an error.
Under ``torchrun`` the image indices are sharded across ranks; image i always
uses seed ``seed + i``, so the union equals a single-process run.
"""
import argparse
import os

from gfdm_fast.cli import parse_bool
from gfdm_fast.errors import UserError
from gfdm_fast.runs import OFFICIAL, locate, resolve_config, resolve_dynamics
from gfdm_fast.sampler import PRECISIONS, SOLVERS


def add_arguments(parser):
    o = parser.add_argument_group("official generate.py flags (same meanings and defaults)")
    o.add_argument("--output_dir", default=OFFICIAL["output_dir"], help="folder of the run folders (default ./runs)")
    o.add_argument("--run_id", default=OFFICIAL["run_id"], help="run id of the run folder (default 0)")
    o.add_argument("--version", default=OFFICIAL["version"],
                   help="checkpoint version: model-{version}.pth (default final)")
    o.add_argument("--data_name", default=OFFICIAL["data_name"],
                   help="data set part of the run folder (default cifar10)")
    for flag, typ, what in (("channels", int, "image channels"), ("image_size", int, "image height = width"),
                            ("num_classes", int, "classes of a conditional model"),
                            ("conditioning", parse_bool, "class-conditional network (True/False)"),
                            ("hurst", float, "Hurst index H"), ("num_aug", int, "augmenting processes K"),
                            ("gamma_max", float, "largest MA-fBM speed"),
                            ("norm", parse_bool, "terminal variance normalisation (True/False)"),
                            ("model_channels", int, "UNet width"), ("num_res_blocks", int, "res blocks per level"),
                            ("attn_resolutions", str, "attention down-sampling rates, e.g. 4,2"),
                            ("channel_mult", str, "width multipliers, e.g. 1,2,4"),
                            ("dropout", float, "dropout (no effect when sampling)")):
        o.add_argument(f"--{flag}", type=typ, default=None,
                       help=f"{what} (default: the run's record, else {OFFICIAL[flag]})")
    o.add_argument("--dynamics", choices=("fvp", "fve"), default=None,
                   help="forward dynamics (default: the run's record, else fvp)")
    o.add_argument("--use_ema", type=parse_bool, default=None,
                   help="sample the EMA weights, ema_model-{version}.pth (default True)")
    o.add_argument("--device", default=OFFICIAL["device"],
                   help="check (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps (default check)")
    o.add_argument("--n_samples", type=int, default=OFFICIAL["n_samples"], help="number of images (default 20)")
    o.add_argument("--batch_size", type=int, default=OFFICIAL["batch_size"],
                   help="images per batch and process (default 10)")
    o.add_argument("--steps", type=int, default=OFFICIAL["steps"], help="sampling steps = NFE (default 1000)")
    o.add_argument("--mode", choices=("sde", "ode"), default=OFFICIAL["mode"], help="sde or ode (default sde)")
    for flag in ("wb_key", "wb_project", "wb_id", "name", "data_dir", "model_name", "dir_num", "wb_version", "pth",
                 "test_batch_size", "show_samples", "log_samples"):
        o.add_argument(f"--{flag}", default=None, help=argparse.SUPPRESS)  # accepted, no effect (wandb etc.)

    e = parser.add_argument_group("gfdm-fast options")
    e.add_argument("--checkpoint", metavar="PATH", default=None,
                   help="sample this checkpoint instead of the run folder's (official or engine format)")
    e.add_argument("--recipe", choices=("exact", "official"), default=None,
                   help="coefficient recipe (default: the run's record; official for official runs)")
    e.add_argument("--seed", type=int, default=0, help="image i uses seed SEED + i (default 0)")
    e.add_argument("--backend", default="auto", help="fused-step backend: auto, torch, cpp, cuda, triton")
    e.add_argument("--solver", choices=SOLVERS, default="em", help="sampler (default em)")
    # -- exp solver knobs (issue 13); None = the measured default of gfdm_fast.expint.solver_options --
    from gfdm_fast.expint import GRIDS
    e.add_argument("--order", type=_order, default=None,
                   help="--solver exp: interpolation order 1, 2, 3, or auto (2 or 3, and the adaptive grid's "
                        "residual share, by its pilot: 4 x 8 x steps more calls; the fractional ode default)")
    e.add_argument("--grid", choices=GRIDS, default=None,
                   help="--solver exp: time grid (adaptive: from a pilot run of the network, 8 images x "
                        "max(40, 4 x steps) calls, at most 400; the fractional default; VP defaults to power)")
    e.add_argument("--rho", type=float, default=None, help="--solver exp --grid power: t uniform in t^(1/rho)")
    e.add_argument("--corrector", type=parse_bool, nargs="?", const=True, default=None,
                   help="--solver exp: UniPC-style corrector (no extra network call)")
    e.add_argument("--lower-final", dest="lower_final", type=parse_bool, nargs="?", const=True, default=None,
                   help="--solver exp: lower order on the last steps")
    e.add_argument("--sigma-data", dest="sigma_data", type=float, default=None,
                   help="--solver exp: data std of the Gaussian part of the denoiser integrated exactly (0: off)")
    # -- end exp solver knobs --
    e.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="network precision; the state stays float32 (default fp32)")
    e.add_argument("--compile", type=parse_bool, nargs="?", const=True, default=False, help="torch.compile the network")
    e.add_argument("--cuda-graphs", dest="cuda_graphs", type=parse_bool, nargs="?", const=True, default=False,
                   help="capture each step in a CUDA graph")
    e.add_argument("--out", metavar="DIR", default=None,
                   help="write resumable uint8 .npz shards (or --png grids) to DIR instead of the official .npy")
    e.add_argument("--png", action="store_true", help="with --out: PNG grids instead of .npz shards")
    e.add_argument("--shard-size", dest="shard_size", type=int, default=1000,
                   help="images per --out shard (default 1000)")
    e.add_argument("--max-shards", dest="max_shards", type=int, default=None,
                   help="write at most N new shards per process, then stop (rerun to continue)")
    e.add_argument("--fid-ref", dest="fid_ref", metavar="STATS.npz", default=None,
                   help="print the FID against these pytorch-fid statistics, computed on the fly")
    e.add_argument("--inception-weights", dest="inception_weights", metavar="FILE", default=None,
                   help="pytorch-fid's FID Inception weights file, for offline use")
    e.add_argument("--progress", type=parse_bool, default=True, help="show a progress bar (default True)")


# ----------------------------------------------------------------------------- the run's records

# ----------------------------------------------------------------------------- the command

def _order(value):
    if value == "auto":
        return value
    if value not in ("1", "2", "3"):
        raise argparse.ArgumentTypeError(f"choose 1, 2, 3 or auto, got {value!r}")
    return int(value)


def _times(sampler):
    """The exp solver's evaluation times (recorded with the samples: the adaptive grid follows the network)."""
    if getattr(sampler, "solver", None) != "exp":
        return None
    return [round(float(v), 7) for v in sampler.table.t.tolist()]


def _check_numbers(args):
    from gfdm_fast.mafbm import check_hurst, check_num_aug
    if args.hurst is not None:
        check_hurst(args.hurst)          # range errors before any run folder is looked for
    if args.num_aug is not None:
        check_num_aug(args.num_aug)
    if args.n_samples <= 0:
        raise UserError(f"--n_samples must be > 0, got {args.n_samples}")
    if args.batch_size <= 0:
        raise UserError(f"--batch_size must be > 0, got {args.batch_size}")
    if args.steps < 2:
        raise UserError(f"--steps must be >= 2 (the grid linspace(T, eps, steps) needs two points), got {args.steps}")
    if args.shard_size <= 0:
        raise UserError(f"--shard-size must be > 0, got {args.shard_size}")
    if args.max_shards is not None and args.max_shards < 0:
        raise UserError(f"--max-shards must be >= 0, got {args.max_shards}")
    if args.png and not args.out:
        raise UserError("--png writes PNG grids into --out DIR: pass --out too")
    if args.fid_ref and args.max_shards is not None:
        raise UserError("--fid-ref needs every image: drop --max-shards")
    if args.fid_ref and args.n_samples < 2:
        raise UserError(f"--fid-ref needs at least 2 samples, got --n_samples {args.n_samples}")


def run(args):
    import torch

    from gfdm_fast import checkpoint, make_dynamics
    from gfdm_fast.distributed import Dist, pick_device
    from gfdm_fast.sampler import Sampler, draw_labels, shard
    from gfdm_fast.sinks import FIDSink, OfficialSink, ShardSink, check_folder_path

    _check_numbers(args)
    dist = Dist.from_env()
    src = locate(args)
    dyn_rec = resolve_dynamics(args, src)
    config, label_classes = resolve_config(args, src)
    recipe = args.recipe or src.recipe or "official"
    device = pick_device(args.device, dist.local_rank)
    try:
        dyn = make_dynamics(dyn_rec["name"], hurst=dyn_rec["hurst"], num_aug=dyn_rec["num_aug"],
                            gamma_max=dyn_rec["gamma_max"], norm=dyn_rec["norm"], recipe=recipe, T=src.T)
    except ValueError as err:
        raise UserError(f"dynamics: {err}") from None
    ckpt = checkpoint.load(src.path, config, map_location="cpu", use_ema=src.use_ema)
    model = ckpt.model.to(device).eval()
    shape = (config.in_channels, config.image_size, config.image_size)
    try:
        sampler = Sampler(dyn, model, steps=args.steps, mode=args.mode, time_weight=src.time_weight,
                          backend=args.backend, solver=args.solver, order=args.order, grid=args.grid, rho=args.rho,
                          corrector=args.corrector, lower_final=args.lower_final, sigma_data=args.sigma_data,
                          device=device, precision=args.precision, compile=args.compile,
                          cuda_graphs=args.cuda_graphs, num_classes=config.num_classes,
                          progress=args.progress and dist.rank == 0, shape=shape if args.solver == "exp" else None)
    except ValueError as err:
        raise UserError(str(err)) from None
    n = args.n_samples

    save_dir = None
    if args.out:
        check_folder_path(args.out, "--out")
    elif not args.fid_ref:
        save_dir = os.path.join(src.run_dir, "generated_data", f"model-{src.version}", f"{args.mode}{args.steps}")
        check_folder_path(save_dir, "output folder")
    fid_sink = FIDSink(args.fid_ref, args.inception_weights, device) if args.fid_ref else None

    dist.init(device)
    sampler.share_table(dist)
    if dist.rank == 0:
        print(f"Sampling {n} images {shape} from {src.path} ({'EMA' if ckpt.used_ema else 'online'} weights, "
              f"{dyn!r}, {args.mode}, {args.steps} steps, seed {args.seed}) on {device}"
              + (f" x {dist.world} processes" if dist.world > 1 else ""), flush=True)
        if args.solver == "exp":
            opts = sampler.solver_options
            trials = len(sampler.pilot_errors)
            kept = f", order {opts['order']} and residual share {opts['residual_share']} kept of {trials}" \
                if trials else ""
            pilot = f" (pilot: {sampler.pilot_nfe} network calls{kept})" if sampler.pilot_nfe else ""
            print(f"exp solver: order {opts['order']}, grid {opts['grid']}{pilot}", flush=True)
    sinks, shards, official = [], None, None
    try:
        if args.out:
            manifest = {"checkpoint": os.path.abspath(src.path), "use_ema": ckpt.used_ema, "recipe": recipe,
                        "dynamics": dyn_rec, "config": config.to_dict(), "seed": args.seed, "steps": args.steps,
                        "mode": args.mode, "solver": args.solver, "precision": args.precision, "n_samples": n,
                        "shard_size": args.shard_size, "format": "png" if args.png else "npz",
                        "exp_solver": getattr(sampler, "solver_options", None),
                        "exp_times": _times(sampler)}
            shards = ShardSink(args.out, n, args.shard_size, args.png, manifest, dist, args.max_shards,
                               need_all=fid_sink is not None)
            sinks.append(shards)
            indices = shards.indices()
        else:
            indices = list(shard(n, dist.rank, dist.world))
        if save_dir is not None:
            official = OfficialSink(save_dir, n, shape, dist, indices)
            sinks.append(official)
        if fid_sink is not None:
            sinks.append(fid_sink)
        ok = False
        try:
            for chunk, images, labels in sampler.iter_batches(n, shape, seed=args.seed, batch_size=args.batch_size,
                                                              indices=indices):
                if labels is None:   # the official writes labels for unconditional models too
                    labels = draw_labels(torch.tensor([args.seed + i for i in chunk]), label_classes)
                for s in sinks:
                    s.add(chunk, images, labels)
            ok = True
        finally:   # a rank that failed raises its own error; the others learn of it instead of waiting
            if dist.world > 1 and not dist.all_ok(ok) and ok:
                raise UserError("another process failed; see its message")
        results = {type(s).__name__: s.finish() for s in sinks}
        sinks = []
    finally:
        for s in sinks:
            s.abort()
        dist.close()

    if dist.rank != 0:
        return None
    if official is not None:
        data_path, label_path = results["OfficialSink"]
        print(f"Wrote {n} samples to {data_path} and their labels to {label_path}")
    if shards is not None:
        done = results["ShardSink"]
        more = "" if done == shards.count else "; rerun the same command to continue"
        print(f"{args.out}: {done} of {shards.count} shards ({n} samples) finished{more}")
    if fid_sink is not None:
        print(f"FID: {results['FIDSink']}")
    return None
