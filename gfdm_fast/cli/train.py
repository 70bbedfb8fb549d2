"""`gfdm-fast train`: the official train.py flags (booleans take True/False), plus engine extras.

Examples::

    gfdm-fast train --data_name mnist --data_dir data --download True --hurst 0.9 --num_aug 3
    torchrun --nproc_per_node 4 -m gfdm_fast.cli train --data_name cifar10 --data_dir data ...
    gfdm-fast train ... --resume runs/abc_mnist_H0.9_K3

Network flags left out take the data set's preset (mnist, cifar10), or the
mnist preset's widths for other data sets.
"""
from gfdm_fast.cli import parse_bool


def add_arguments(parser):
    d = parser.add_argument_group("data")
    d.add_argument("--data_name", default="mnist",
                   help="mnist, fashionmnist, cifar10, imagefolder, npz, digits or a registered name (default mnist)")
    d.add_argument("--data_dir", default=None, help="data folder (torchvision sets, imagefolder) or .npz file")
    d.add_argument("--download", type=parse_bool, default=False, help="fetch torchvision data sets (True/False)")
    d.add_argument("--channels", type=int, default=None, help="image channels (default: the data set's)")
    d.add_argument("--image_size", type=int, default=None, help="resize to this size (default: the data set's)")
    d.add_argument("--num_classes", type=int, default=None,
                   help="classes of the label embedding; 0 = unconditional (default: 10 for mnist/cifar10, else 0)")
    d.add_argument("--conditioning", type=parse_bool, default=None,
                   help="class-conditional training (default: True iff num_classes > 0)")
    n = parser.add_argument_group("dynamics")
    n.add_argument("--dynamics", default="fvp", choices=("fvp", "fve"), help="FVP or FVE (default fvp)")
    n.add_argument("--hurst", type=float, default=0.9, help="Hurst index H (default 0.9)")
    n.add_argument("--num_aug", type=int, default=3, help="number K of augmenting processes (default 3)")
    n.add_argument("--gamma_max", type=float, default=20.0, help="largest OU speed (default 20)")
    n.add_argument("--norm", type=parse_bool, default=True, help="terminal variance normalisation (default True)")
    m = parser.add_argument_group("network")
    m.add_argument("--model_channels", type=int, default=None)
    m.add_argument("--num_res_blocks", type=int, default=None)
    m.add_argument("--attn_resolutions", default=None, help='down-sampling rates with attention, e.g. "4,2"')
    m.add_argument("--channel_mult", default=None, help='e.g. "1,2,4"')
    m.add_argument("--dropout", type=float, default=None)
    o = parser.add_argument_group("optimisation")
    o.add_argument("--use_ema", type=parse_bool, default=True, help="keep an EMA of the weights (default True)")
    o.add_argument("--lr", type=float, default=None, help="default 2e-4 (mnist5k: 1e-3, its CPU recipe)")
    o.add_argument("--batch_size", type=int, default=None,
                   help="per process and micro-batch (default 128; mnist5k: 64)")
    o.add_argument("--train_steps", type=int, default=100_000, help="optimizer steps (default 100000)")
    o.add_argument("--use_lr_scheduler", type=parse_bool, default=False, help="OneCycleLR (default False)")
    o.add_argument("--gradient_clip_val", type=float, default=1.0, help="0 disables clipping (default 1.0)")
    o.add_argument("--accumulate_grad_batches", type=int, default=1)
    o.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16 = autocast (default fp32)")
    o.add_argument("--time_sampling", default=None, choices=("uniform", "vp_snr"),
                   help="training times: uniform in t (official; the default) or vp_snr (the noise levels "
                        "VP trains on; mnist5k's default)")
    o.add_argument("--compile", type=parse_bool, default=False, help="torch.compile the network (default False)")
    o.add_argument("--seed", type=int, default=None, help="seed of weights, data order, noise (default: drawn, "
                                                         "recorded in gfdm_run.json)")
    o.add_argument("--nonfinite", default="stop", choices=("stop", "skip"),
                   help="a NaN/inf loss or gradient: stop the run (nothing saved after it; default) or skip the step")
    o.add_argument("--max_minutes", type=float, default=None,
                   help="stop at the first log row past this wall time (final files written)")
    r = parser.add_argument_group("outputs")
    r.add_argument("--output_dir", default="runs", help="runs go to OUTPUT_DIR/{wb_id}_{data}_H{hurst}_K{K}/")
    r.add_argument("--wb_id", default=None, help="run id (default: a time stamp and 6 random hex digits)")
    r.add_argument("--log_model_every_n", type=int, default=5000, help="model-v{n}.pth every N steps (default 5000)")
    r.add_argument("--val_check_interval", type=int, default=5000, help="sample grid every N steps; 0 = never")
    r.add_argument("--val_steps", type=int, default=None, help="sampler steps of the grids (1000 GPU / 100 CPU)")
    r.add_argument("--val_samples", type=int, default=64, help="images per sample grid (default 64)")
    r.add_argument("--log_every_n_steps", type=int, default=10, help="train_log.csv row every N steps (default 10)")
    r.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR (or its "
                                                                     "train_state.pt)")
    r.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    r.add_argument("--num_workers", type=int, default=0, help="data loading processes (default 0)")
    r.add_argument("--progress", type=parse_bool, default=True, help="progress bar (default True)")


def run(args):
    from gfdm_fast.train import TrainConfig, train

    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__},
                      explicit=getattr(args, "given", None))
    result = train(cfg)
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"trained {result.step} steps; run folder {result.run_dir}")
