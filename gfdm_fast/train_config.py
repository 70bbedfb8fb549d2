"""Training settings: the official train.py flags as a dataclass, what --resume may change, and the
network, dynamics and label checks derived from them."""
import dataclasses
from dataclasses import dataclass, field

from gfdm_fast import data as gdata
from gfdm_fast.errors import UserError

PRESET_FOR_DATA = {"mnist": "mnist", "fashionmnist": "mnist", "cifar10": "cifar10", "mnist5k": "mnist_cpu"}


@dataclass
class TrainConfig:
    # data
    data_name: str = "mnist"
    data_dir: str | None = None
    download: bool = False
    channels: int | None = None              # None: the data set's
    image_size: int | None = None            # None: the data set's
    num_classes: int | None = None           # None: preset (10 for mnist/cifar10), else 0
    conditioning: bool | None = None         # None: conditional iff num_classes > 0
    # dynamics
    dynamics: str = "fvp"
    hurst: float = 0.9
    num_aug: int = 3
    gamma_max: float = 20.0
    norm: bool = True
    # network (None: the preset of the data set, else the mnist preset's widths)
    model_channels: int | None = None
    num_res_blocks: int | None = None
    attn_resolutions: str | tuple | None = None
    channel_mult: str | tuple | None = None
    dropout: float | None = None
    # optimisation
    use_ema: bool = True
    lr: float | None = None                  # None: the data set's recipe, else OFFICIAL_DEFAULTS
    batch_size: int | None = None            # per process and micro-batch; None: as lr
    train_steps: int = 100_000               # optimizer steps
    use_lr_scheduler: bool = False           # OneCycleLR(max_lr=lr, total_steps=train_steps)
    gradient_clip_val: float = 1.0           # 0: no clipping
    accumulate_grad_batches: int = 1
    precision: str = "fp32"                  # or bf16 (autocast)
    time_sampling: str | None = None         # uniform or vp_snr (loss.TimeMap); None: as lr
    compile: bool = False
    seed: int | None = None                  # None: drawn, then recorded in gfdm_run.json
    max_minutes: float | None = None         # stop at the first log row past this wall time (final files written)
    # outputs
    output_dir: str = "runs"
    wb_id: str | None = None                 # None: a fresh id
    log_model_every_n: int = 5000
    val_check_interval: int = 5000           # 0: no sample grids
    val_steps: int | None = None             # sampler steps for the grids (None: 1000 GPU, 100 CPU)
    val_samples: int = 64
    log_every_n_steps: int = 10
    resume: str | None = None                # run folder or its train_state.pt
    device: str | None = None                # None: cuda when available
    num_workers: int = 0
    progress: bool = True
    nonfinite: str = "stop"                  # a NaN/inf loss or gradient: "stop" the run, or "skip" the step
    explicit: tuple | None = None            # flags the user gave (CLI); None: fields that differ from these
    extra: dict = field(default_factory=dict)


# On --resume: what the user may change (applied and recorded), everything else must match the run.
RESUME_SAFE = ("lr", "train_steps", "gradient_clip_val", "max_minutes", "log_model_every_n", "val_check_interval",
               "val_steps", "val_samples", "log_every_n_steps", "device", "num_workers", "progress", "compile",
               "nonfinite", "output_dir", "data_dir", "download")
RESUME_IGNORED = ("resume", "explicit", "extra", "seed", "wb_id")



# What the official train.py uses where neither the user nor the data set's recipe sets a value.
OFFICIAL_DEFAULTS = {"lr": 2e-4, "batch_size": 128, "time_sampling": "uniform"}


def with_data_recipe(cfg):
    """``cfg`` with its unset (None) optimiser fields filled: the data set's recipe
    (models.presets.DATA_RECIPES, e.g. mnist5k), else OFFICIAL_DEFAULTS."""
    from gfdm_fast.models.presets import DATA_RECIPES
    recipe = DATA_RECIPES.get(str(cfg.data_name).lower(), {})
    return dataclasses.replace(cfg, **{k: recipe.get(k, v) for k, v in OFFICIAL_DEFAULTS.items()
                                       if getattr(cfg, k) is None})


def model_config(cfg, channels, image_size):
    """UNetConfig from the official flags; unset flags take the data set's preset."""
    from gfdm_fast.models.presets import PRESETS, config_from_flags
    base = PRESETS[PRESET_FOR_DATA.get(cfg.data_name, "mnist")]

    def pick(v, d):
        return d if v is None else v

    num_classes = cfg.num_classes
    if num_classes is None:
        num_classes = base.num_classes if cfg.data_name in PRESET_FOR_DATA and cfg.conditioning is not False else 0
    if cfg.conditioning is True and not num_classes:
        raise UserError("--conditioning True needs --num_classes > 0")
    conditional = bool(num_classes) and cfg.conditioning is not False
    return config_from_flags(
        channels=channels, image_size=image_size,
        model_channels=pick(cfg.model_channels, base.model_channels),
        num_res_blocks=pick(cfg.num_res_blocks, base.num_res_blocks),
        attn_resolutions=pick(cfg.attn_resolutions, base.attention_resolutions),
        channel_mult=pick(cfg.channel_mult, base.channel_mult),
        dropout=pick(cfg.dropout, base.dropout),
        num_classes=num_classes if conditional else None)


def make_dyn(cfg):
    from gfdm_fast.dynamics import make_dynamics
    try:
        return make_dynamics(cfg.dynamics, hurst=cfg.hurst, num_aug=cfg.num_aug, gamma_max=cfg.gamma_max,
                             norm=cfg.norm, recipe="exact")
    except ValueError as err:
        raise UserError(str(err)) from None


def check_labels(ds, config):
    """Labels fit ``config.num_classes`` (the label embedding's size)."""
    if config.num_classes is None:
        return
    labels = gdata.dataset_labels(ds)
    if labels is None:
        raise UserError("the data set has no labels, but the model is class-conditional: "
                        "pass --num_classes 0 (or --conditioning False)")
    top = int(labels.max())
    if top >= config.num_classes:
        raise UserError(f"the data set has labels up to {top}, but --num_classes is {config.num_classes}: "
                        f"pass --num_classes {top + 1} or more")



def resume_config(cfg, state):
    """(config, changes) of a resumed run: its own settings, with the flags the user gave applied where
    safe (RESUME_SAFE; ``changes`` = {name: [old, new]}); any other flag that differs is an error."""
    saved = dict(state["extra"]["train_config"])
    explicit = cfg.explicit
    if explicit is None:   # Python API: what differs from the defaults was asked for
        default = TrainConfig()
        explicit = tuple(f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name))
    out, changes = {}, {}
    for f in dataclasses.fields(cfg):
        name, new = f.name, getattr(cfg, f.name)
        if name in RESUME_IGNORED or name not in saved:
            out[name] = saved.get(name, new) if name in ("seed", "wb_id") else new
            if name not in saved and name in OFFICIAL_DEFAULTS:   # a run from before the field existed
                out[name] = OFFICIAL_DEFAULTS[name]
            continue
        old = saved[name]
        if name not in explicit or new == old:
            out[name] = old
        elif name in RESUME_SAFE:
            out[name] = new
            changes[name] = [old, new]
        else:
            raise UserError(f"--resume: --{name} cannot change on a resumed run (it was {old!r}, given {new!r}); "
                            f"drop --{name}, or start a new run")
    if saved.get("use_lr_scheduler") and {"lr", "train_steps"} & set(changes):
        raise UserError("--resume: the run's OneCycle schedule fixes --lr and --train_steps; drop them, "
                        "or start a new run")
    if int(out["train_steps"]) < int(state["step"]):
        raise UserError(f"--resume: --train_steps {out['train_steps']} is below the run's step {state['step']}")
    return TrainConfig(**{**out, "resume": cfg.resume, "explicit": cfg.explicit}), changes

