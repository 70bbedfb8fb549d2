"""Augmented score matching (DESIGN.md 'Training') in plain PyTorch: one process or DDP under torchrun.

Loss (the reduced exact form): ``x_in = c(t) x0 + sigma_c(t) eps`` through the fused
``ops.noising``, target ``eps``, ``t ~ U(1e-5, 1)``, network time ``999 t``, MSE.

Reproducibility: every training image has a global index ``g`` (micro-batch
``m`` times batch size plus position), where micro-batch ``m = (step * accum + a)
* world + rank``; its data come from a per-epoch permutation seeded by
``(seed, epoch)``, its noise and time from Philox keyed by ``seed * 2^32 + g``.
So one process with ``--accumulate_grad_batches 2`` sees exactly the images and
noise of two processes without accumulation, and ``--resume`` continues the
same stream bit for bit (the state file holds optimizer, scheduler, EMA, step,
log accumulators and every rank's RNG state).

Run folder ``{output_dir}/{wb_id}_{data_name}_H{hurst}_K{num_aug}/``:
``model/model-v{n}.pth`` + ``model/ema_model-v{n}.pth`` every
``log_model_every_n`` steps (n from 0), ``model/model-final.pth`` +
``model/ema_model-final.pth`` at the end (official formats), ``train_state.pt``
(engine checkpoint with the full training state, written atomically),
``gfdm_run.json``, ``train_log.csv``, ``samples/step-*.png``.
"""
import contextlib
import copy
import csv
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gfdm_fast import checkpoint as ckpt
from gfdm_fast import data as gdata
from gfdm_fast import ops
from gfdm_fast.errors import UserError
from gfdm_fast.io import atomic_save, atomic_write_file
from gfdm_fast.layout import STREAM_TRAIN
from gfdm_fast.philox import MASK32, philox4x32, uniform_from_bits
from gfdm_fast.runs import FolderLock, clean_stale_temporaries, new_run_id

T_MIN = 1e-5            # t ~ U(T_MIN, 1)
TIME_WEIGHT = 999.0     # network time = 999 t
EMA_DECAY = {"fvp": 0.9999, "fve": 0.999}
STATE_FILE = "train_state.pt"
LOG_COLUMNS = ("step", "loss", "lr", "images_per_s")
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
    lr: float = 2e-4
    batch_size: int = 128                    # per process and micro-batch
    train_steps: int = 100_000               # optimizer steps
    use_lr_scheduler: bool = False           # OneCycleLR(max_lr=lr, total_steps=train_steps)
    gradient_clip_val: float = 1.0           # 0: no clipping
    accumulate_grad_batches: int = 1
    precision: str = "fp32"                  # or bf16 (autocast)
    compile: bool = False
    seed: int | None = None                  # None: drawn, then recorded in gfdm_run.json
    max_minutes: float | None = None         # stop early (and write the final files) after this
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


# ----------------------------------------------------------------------------- EMA

class EMA:
    """Exponential moving average of the weights, the official (ema_pytorch) way.

    Updated every ``update_every`` optimizer steps; a copy of the online weights
    until ``update_after_step``, then decay ``1 - (1 + e)^-power`` (e = updates
    past the warm-up, inv_gamma = 1) capped at ``beta``. ``official_state_dict``
    writes ema_pytorch's layout: ``initted``, ``step``, ``ema_model.*``.
    """

    def __init__(self, model, beta, *, update_every=10, update_after_step=100, power=2 / 3):
        self.ema_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.beta, self.update_every, self.update_after_step, self.power = beta, update_every, update_after_step, power
        self.step, self.initted = 0, False

    def decay(self):
        epoch = max(self.step - self.update_after_step - 1, 0)
        if epoch <= 0:
            return 0.0
        return min(1.0 - (1.0 + epoch) ** -self.power, self.beta)

    @torch.no_grad()
    def update(self, model):
        self.step += 1
        if self.step % self.update_every:
            return
        ema_p = list(self.ema_model.state_dict().values())
        online = list(model.state_dict().values())
        if self.step <= self.update_after_step or not self.initted:
            for e, o in zip(ema_p, online):
                e.copy_(o)
            self.initted = self.step > self.update_after_step
            return
        d = self.decay()
        for e, o in zip(ema_p, online):
            if e.is_floating_point():
                e.lerp_(o, 1.0 - d)
            else:
                e.copy_(o)

    def official_state_dict(self):
        sd = {"initted": torch.tensor(self.initted), "step": torch.tensor(self.step)}
        sd.update({f"ema_model.{k}": v.detach().cpu() for k, v in self.ema_model.state_dict().items()})
        return sd


# ----------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self):
        return self.rank == 0

    @property
    def active(self):
        return self.world > 1


def setup_distributed(device=None):
    """One process, or DDP under torchrun (RANK / WORLD_SIZE set): NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is visible; use --device cpu")
        if world > 1:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def _broadcast(value, dist):
    if not dist.active:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- data stream

class MicroBatches(torch.utils.data.Sampler):
    """Index lists of this rank's micro-batches ``m = j * world + rank``, j = start, start + 1, ...

    Micro-batch ``m`` is slice ``m mod per_epoch`` of the permutation of epoch
    ``m // per_epoch`` (seeded by seed and epoch); the last partial batch is dropped.
    """

    def __init__(self, n, batch_size, seed, *, world=1, rank=0, start=0):
        self.n, self.b, self.seed, self.world, self.rank, self.start = n, batch_size, seed, world, rank, start
        self.per_epoch = n // batch_size
        self._perm_epoch, self._perm = None, None

    def indices(self, m):
        epoch, k = divmod(m, self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm[k * self.b:(k + 1) * self.b].tolist()

    def __iter__(self):
        j = self.start
        while True:
            yield self.indices(j * self.world + self.rank)
            j += 1

    def __len__(self):  # infinite stream; DataLoader only needs it for len()
        return 2 ** 62


def sample_seeds(seed, m, batch_size):
    """Philox keys of micro-batch ``m``: ``seed * 2^32 + global image index``."""
    g = m * batch_size + torch.arange(batch_size, dtype=torch.int64)
    return (int(seed) << 32) + g


def draw_times(seeds):
    """t ~ U(1e-5, 1) per image from its key (Philox stream 2, component 1; eps uses component 0)."""
    zero = torch.zeros_like(seeds)
    x0, _, _, _ = philox4x32(zero, zero, zero + STREAM_TRAIN, zero + 1, seeds & MASK32, (seeds >> 32) & MASK32)
    return T_MIN + (1.0 - T_MIN) * uniform_from_bits(x0).to(torch.float64)


# ----------------------------------------------------------------------------- set-up helpers

def run_name(cfg):
    return f"{cfg.wb_id}_{cfg.data_name}_H{float(cfg.hurst)}_K{int(cfg.num_aug)}"


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


def save_grid(images, path, nrow=8):
    """PNG grid of images in [-1, 1] (B, C, H, W); small images are enlarged (nearest) to >= 32 px."""
    from PIL import Image
    x = images.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    B, C, H, W = x.shape
    scale = max(1, math.ceil(32 / H))
    if scale > 1:
        x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        H, W = H * scale, W * scale
    nrow = min(nrow, B)
    rows, pad = math.ceil(B / nrow), 2
    grid = torch.full((C, rows * (H + pad) + pad, nrow * (W + pad) + pad), 255, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = x[i]
    arr = grid[0].numpy() if C == 1 else grid.permute(1, 2, 0).numpy()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------- the trainer

@dataclass
class TrainResult:
    run_dir: str
    step: int
    losses: list            # (step, loss) of the rows written to train_log.csv by this call
    model: torch.nn.Module  # online weights (unwrapped)
    ema_model: torch.nn.Module | None
    dynamics: object
    config: object          # UNetConfig


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg = dataclasses.replace(cfg)
        for name in ("batch_size", "train_steps", "accumulate_grad_batches", "log_every_n_steps", "log_model_every_n"):
            if int(getattr(cfg, name)) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.precision not in ("fp32", "bf16"):
            raise UserError(f"--precision must be fp32 or bf16, got {cfg.precision!r}")
        cfg.data_name = str(cfg.data_name).lower()
        self.dist = setup_distributed(cfg.device)
        self.device = self.dist.device
        if cfg.nonfinite not in ("stop", "skip"):
            raise UserError(f"--nonfinite must be stop or skip, got {cfg.nonfinite!r}")
        self.state_in = self._read_resume() if cfg.resume else None
        self.resume_changes = {}
        if self.state_in is not None:   # the run's own settings, with what the user may change on top
            self.cfg = cfg = self._resume_config(cfg, self.state_in)
        if cfg.seed is None:
            cfg.seed = _broadcast(int.from_bytes(os.urandom(4), "little") >> 1, self.dist)
        if cfg.wb_id is None:
            cfg.wb_id = _broadcast(new_run_id(), self.dist)

        self.dataset = gdata.load_dataset(cfg.data_name, cfg.data_dir, split="train", download=cfg.download,
                                          image_size=cfg.image_size, channels=cfg.channels)
        C, H, W = gdata.sample_shape(self.dataset)
        if H != W:
            raise UserError(f"images must be square (got {H}x{W}); pass --image_size to resize")
        self.shape = (C, H, W)
        self.net_config = model_config(cfg, C, H)
        check_labels(self.dataset, self.net_config)
        if len(self.dataset) < cfg.batch_size:
            raise UserError(f"--batch_size {cfg.batch_size} is larger than the data set ({len(self.dataset)} images)")
        self.dyn = make_dyn(cfg)
        self.run_dir = self.resume_dir if self.state_in is not None else os.path.join(cfg.output_dir, run_name(cfg))
        self.lock = None
        outcome = None
        if self.dist.main:      # one process owns the folder; the others learn the outcome
            try:
                self.lock = self._claim_run_dir()
                outcome = "ok"
            except UserError as err:
                outcome = str(err)
        outcome = _broadcast(outcome, self.dist)
        if outcome != "ok":
            raise UserError(outcome)
        try:
            self._build()
        except BaseException:
            self.release()
            raise

    def _claim_run_dir(self):
        """Create a fresh run folder exclusively (or take the resumed one) and lock it for this process."""
        if self.state_in is None:
            os.makedirs(self.cfg.output_dir, exist_ok=True)
            try:
                os.mkdir(self.run_dir)
            except FileExistsError:
                lock = FolderLock(self.run_dir, "gfdm-fast train")
                lock.acquire()          # names the holder when a live process trains there
                lock.release()
                what = ("holds a run" if os.path.exists(os.path.join(self.run_dir, STATE_FILE))
                        else "exists (a run that stopped before its first save, or another folder)")
                raise UserError(f"{self.run_dir} {what}: continue it with --resume {self.run_dir}, choose another "
                                "--wb_id, or remove the folder") from None
        lock = FolderLock(self.run_dir, "gfdm-fast train").acquire()
        clean_stale_temporaries(self.run_dir)     # saves that a killed run left half-done
        return lock

    def release(self):
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # -- construction ---------------------------------------------------------------------------
    def _read_resume(self):
        path = self.cfg.resume
        if os.path.isdir(path):
            path = os.path.join(path, STATE_FILE)
        self.resume_dir = os.path.dirname(os.path.abspath(path))
        if not os.path.isfile(path):
            raise UserError(f"--resume {self.cfg.resume}: no {STATE_FILE} found (pass the run folder or its "
                            f"{STATE_FILE})")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:   # truncated, or not a torch file at all
            raise UserError(f"--resume: {path} cannot be read ({type(err).__name__}: {str(err)[:120]}); it is "
                            "damaged (a copy cut short?): restore it, or start a new run") from None
        if not isinstance(obj, dict) or obj.get("format") != ckpt.FORMAT or "train_config" not in (obj.get("extra") or {}):
            raise UserError(f"{path} is not a gfdm-fast training state (written by gfdm-fast train)")
        return obj

    def _resume_config(self, cfg, state):
        """The resumed run's settings; flags the user gave apply where safe (RESUME_SAFE), else must match."""
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
        self.resume_changes = changes
        return TrainConfig(**{**out, "resume": cfg.resume, "explicit": cfg.explicit})

    def _build(self):
        from gfdm_fast.models import build_model, compile_model, set_sdpa
        cfg, dist = self.cfg, self.dist
        torch.manual_seed(cfg.seed)                         # same initial weights on every rank
        self.model = set_sdpa(build_model(self.net_config)).to(self.device)
        self.ema = EMA(self.model, EMA_DECAY[self.dyn.name]) if cfg.use_ema else None
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.sched = (torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=cfg.lr, total_steps=cfg.train_steps)
                      if cfg.use_lr_scheduler else None)
        torch.manual_seed(cfg.seed + 7919 * (dist.rank + 1))  # dropout differs across ranks
        self.step = 0
        self.log_acc = [0, 0]        # steps, images since the last row
        self.loss_sum = torch.zeros((), device=self.device)   # this rank's loss sum since the last row
        self.first_nonfinite = torch.full((), -1, dtype=torch.int64, device=self.device)
        self.skipped = []                                      # steps skipped by --nonfinite skip
        self.saved_step = None                                 # step of the last state written
        self.version = 0
        if self.state_in is not None:
            self._restore(self.state_in)
        net = self.model
        if dist.active:
            net = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.ddp = net if dist.active else None
        self.net = compile_model(net) if cfg.compile else net

    def _restore(self, obj):
        from gfdm_fast.models.presets import UNetConfig
        saved = UNetConfig.from_dict(obj["config"])
        if saved != self.net_config:
            raise UserError(f"--resume: the run was trained with a different network ({saved}); "
                            f"pass the same flags as the original run")
        if obj["dynamics"] != ckpt.dynamics_record(self.dyn.config()):
            raise UserError(f"--resume: the run was trained with dynamics {obj['dynamics']}; pass the same "
                            "--dynamics --hurst --num_aug --gamma_max --norm")
        ex = obj["extra"]
        self.model.load_state_dict(obj["state_dict"])
        self.opt.load_state_dict(ex["optimizer"])
        if "lr" in self.resume_changes:
            for group in self.opt.param_groups:
                group["lr"] = self.cfg.lr
        if self.sched is not None:
            if ex.get("scheduler") is None:
                raise UserError("--resume: the run had no LR scheduler; pass --use_lr_scheduler False")
            self.sched.load_state_dict(ex["scheduler"])
        if self.ema is not None:
            if obj.get("ema_state_dict") is None:
                raise UserError("--resume: the run kept no EMA; pass --use_ema False")
            self.ema.ema_model.load_state_dict(obj["ema_state_dict"])
            self.ema.step, self.ema.initted = int(ex["ema_step"]), bool(ex["ema_initted"])
        self.step = self.saved_step = int(obj["step"])
        self.log_acc = list(ex["log_acc"])
        self.version = int(ex["version"])
        ranks = ex["ranks"]
        if len(ranks) != self.dist.world:
            raise UserError(f"--resume: the run used {len(ranks)} process(es), now {self.dist.world}; "
                            "resume with the same number of processes")
        self._rng_to_restore = ranks[self.dist.rank]["rng"]
        self.loss_sum = ranks[self.dist.rank]["loss_sum"].to(self.device)

    # -- one optimizer step ---------------------------------------------------------------------
    def loss_on(self, x0, y, m):
        """Reduced-form loss of micro-batch ``m`` (its Philox keys give eps and t)."""
        B = x0.shape[0]
        seeds = sample_seeds(self.cfg.seed, m, B)
        t = draw_times(seeds)
        st = self.dyn.marginal_stats(t)
        f32 = dict(device=self.device, dtype=torch.float32, non_blocking=True)
        x_in, eps = ops.noising(x0, st.mean_scale.to(**f32), st.sigma_c.to(**f32), seeds.to(self.device), 0)
        s = (TIME_WEIGHT * t).to(**f32)
        label = y if self.net_config.num_classes is not None else None
        from gfdm_fast.models import autocast
        with autocast(self.device.type, self.cfg.precision):
            e = self.net(x_in, s, label)
        return F.mse_loss(e.float(), eps)

    def train_step(self, batches):
        cfg, accum = self.cfg, self.cfg.accumulate_grad_batches
        total = torch.zeros((), device=self.device)
        for a in range(accum):
            x0, y = next(batches)
            x0 = x0.to(self.device, torch.float32, non_blocking=True).contiguous()
            y = y.to(self.device, non_blocking=True)
            m = (self.step * accum + a) * self.dist.world + self.dist.rank
            sync = self.ddp is None or a == accum - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                loss = self.loss_on(x0, y, m) / accum
                loss.backward()
            total += loss.detach()
        clip = cfg.gradient_clip_val if cfg.gradient_clip_val and cfg.gradient_clip_val > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)   # inf: measures, clips nothing
        finite = torch.isfinite(total) & torch.isfinite(grad_norm)
        if cfg.nonfinite == "skip" and not bool(finite):   # opt-in: one host sync per step
            self.opt.zero_grad(set_to_none=True)
            self.skipped.append(self.step + 1)
            self.step += 1
            return torch.zeros_like(total)
        # stop: the first bad step is remembered on the device and checked at every log row and save
        self.first_nonfinite = torch.where((self.first_nonfinite < 0) & ~finite,
                                           torch.full_like(self.first_nonfinite, self.step + 1), self.first_nonfinite)
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return total

    def check_finite(self):
        """Raise (nothing saved) if a step since the start had a NaN/inf loss or gradient."""
        bad = int(self.first_nonfinite)
        if bad >= 0:
            kept = (f"the last saved state (step {self.saved_step}) in {self.run_dir} is intact"
                    if self.saved_step is not None else "nothing was saved")
            raise UserError(f"non-finite loss or gradient at step {bad}; stopped without saving, so {kept}. "
                            "Lower --lr, set --gradient_clip_val, or pass --nonfinite skip to skip such steps")

    # -- outputs --------------------------------------------------------------------------------
    def _metadata(self):
        cfg = self.cfg
        return {"format": "gfdm-fast-run", "version": 1, "model": self.net_config.to_dict(),
                "dynamics": {**ckpt.dynamics_record(self.dyn.config()), "T": self.dyn.T},
                "recipe": "exact", "time_weight": TIME_WEIGHT, "seed": cfg.seed,
                "data": {"data_name": cfg.data_name, "channels": self.shape[0], "image_size": self.shape[1],
                         "num_classes": self.net_config.num_classes},
                "train": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("extra", "progress", "explicit")},
                "resumed_with": self.resume_changes,
                "world_size": self.dist.world}

    def _gather_ranks(self):
        """Every rank's RNG state and running loss sum (for a bit-exact --resume)."""
        mine = {"rng": {k: v.cpu() for k, v in _rng_state(self.device).items()}, "loss_sum": self.loss_sum.cpu()}
        if not self.dist.active:
            return [mine]
        out = [None] * self.dist.world
        torch.distributed.all_gather_object(out, mine)
        return out

    def save(self, final=False):
        self.check_finite()
        ranks = self._gather_ranks()   # collective: every rank takes part
        if not self.dist.main:
            return
        mdir = os.path.join(self.run_dir, "model")
        os.makedirs(mdir, exist_ok=True)
        tag = "final" if final else f"v{self.version}"
        sd = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        atomic_save(sd, os.path.join(mdir, f"model-{tag}.pth"))
        if self.ema is not None:
            atomic_save(self.ema.official_state_dict(), os.path.join(mdir, f"ema_model-{tag}.pth"))
        if not final:
            self.version += 1
        extra = {"train_config": {k: v for k, v in dataclasses.asdict(self.cfg).items() if k not in ("extra", "explicit")},
                 "optimizer": self.opt.state_dict(),
                 "scheduler": None if self.sched is None else self.sched.state_dict(),
                 "ema_step": None if self.ema is None else self.ema.step,
                 "ema_initted": None if self.ema is None else self.ema.initted,
                 "log_acc": list(self.log_acc), "version": self.version, "ranks": ranks}
        ckpt.save(os.path.join(self.run_dir, STATE_FILE), sd, self.net_config, dynamics=self.dyn.config(),
                  recipe="exact", ema=None if self.ema is None else self.ema.ema_model.state_dict(),
                  step=self.step, extra=extra)
        self.saved_step = self.step

    @torch.no_grad()
    def sample_grid(self):
        from gfdm_fast.sampler import Sampler
        cfg = self.cfg
        steps = cfg.val_steps or (1000 if self.device.type == "cuda" else 100)
        net = self.ema.ema_model if self.ema is not None else self.model
        was_training = net.training
        net.eval()
        try:
            sampler = Sampler(self.dyn, net, steps=steps, num_classes=self.net_config.num_classes)
            x = sampler.sample(cfg.val_samples, self.shape, seed=0)
        finally:
            net.train(was_training)
        return save_grid(x, os.path.join(self.run_dir, "samples", f"step-{self.step:07d}.png"))

    def _open_log(self):
        path = os.path.join(self.run_dir, "train_log.csv")
        rows = []
        if self.state_in is not None and os.path.exists(path):  # drop rows written after the saved state
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= self.step]
        f = open(path, "w", newline="")
        w = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        w.writeheader()
        w.writerows(rows)
        f.flush()
        return f, w

    def _loggers(self):
        tb = wandb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(os.path.join(self.run_dir, "tensorboard"))
        except Exception:   # tensorboard not installed: optional
            tb = None
        if os.environ.get("WANDB_API_KEY"):
            try:
                import wandb as _wandb
                wandb = _wandb.init(project=os.environ.get("WANDB_PROJECT", "gfdm-fast"), id=self.cfg.wb_id,
                                    resume="allow", config=self._metadata())
            except Exception as err:
                print(f"wandb disabled: {type(err).__name__}: {err}")
        return tb, wandb

    def _log_row(self, writer, log_f, tb, wandb, bar, elapsed):
        """All-reduce the running loss and write one train_log.csv row; returns (step, loss)."""
        total = self.loss_sum.clone()
        if self.dist.active:
            torch.distributed.all_reduce(total)
            total /= self.dist.world
        loss = float(total) / max(self.log_acc[0], 1)
        ips = self.log_acc[1] / max(elapsed, 1e-9)
        lr = self.opt.param_groups[0]["lr"]
        if self.dist.main:
            writer.writerow({"step": self.step, "loss": repr(loss), "lr": repr(lr), "images_per_s": f"{ips:.2f}"})
            log_f.flush()
            if tb is not None:
                tb.add_scalar("train/loss", loss, self.step)
                tb.add_scalar("train/lr", lr, self.step)
            if wandb is not None:
                wandb.log({"loss": loss, "lr": lr, "images_per_s": ips}, step=self.step)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}")
        self.loss_sum.zero_()
        self.log_acc = [0, 0]
        self.check_finite()
        return self.step, loss

    # -- the loop -------------------------------------------------------------------------------
    def fit(self, stop_at_step=None):
        cfg, dist = self.cfg, self.dist
        if dist.main:
            os.makedirs(self.run_dir, exist_ok=True)
            atomic_write_file(os.path.join(self.run_dir, "gfdm_run.json"),
                              lambda f: f.write(json.dumps(self._metadata(), indent=2).encode()))
        sampler = MicroBatches(len(self.dataset), cfg.batch_size, cfg.seed, world=dist.world, rank=dist.rank,
                               start=self.step * cfg.accumulate_grad_batches)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, collate_fn=gdata.collate_batch,
                                             num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
                                             persistent_workers=cfg.num_workers > 0)
        batches = iter(loader)     # draws a base seed from the global RNG: restore the RNG after it
        rng = getattr(self, "_rng_to_restore", None)
        if rng is not None:
            _set_rng_state(rng, self.device)
        log_f = writer = tb = wandb = bar = None
        if dist.main:
            log_f, writer = self._open_log()
            tb, wandb = self._loggers()
            if cfg.progress:
                from tqdm.auto import tqdm
                bar = tqdm(total=cfg.train_steps, initial=self.step, desc="training", unit="step", dynamic_ncols=True)
        losses, images_per_step = [], cfg.batch_size * cfg.accumulate_grad_batches * dist.world
        self.model.train()
        t_start = t_log = time.perf_counter()
        stop = min(cfg.train_steps, stop_at_step if stop_at_step is not None else cfg.train_steps)
        out_of_time = False
        try:
            while self.step < stop and not out_of_time:
                self.loss_sum += self.train_step(batches)
                self.log_acc[0] += 1
                self.log_acc[1] += images_per_step
                if bar is not None:
                    bar.update(1)
                if cfg.max_minutes is not None:
                    out_of_time = _broadcast(time.perf_counter() - t_start > 60 * cfg.max_minutes, dist)
                if self.step % cfg.log_every_n_steps == 0 or self.step == cfg.train_steps or out_of_time:
                    losses.append(self._log_row(writer, log_f, tb, wandb, bar, time.perf_counter() - t_log))
                    t_log = time.perf_counter()
                if self.step % cfg.log_model_every_n == 0:
                    self.save()
                if cfg.val_check_interval and self.step % cfg.val_check_interval == 0 and dist.main:
                    path = self.sample_grid()
                    if tb is not None:
                        import numpy as np
                        from PIL import Image
                        tb.add_image("samples", np.asarray(Image.open(path).convert("RGB")), self.step,
                                     dataformats="HWC")
            if self.step >= cfg.train_steps or out_of_time:
                self.save(final=True)
        except KeyboardInterrupt:
            if self.step > 0 and not dist.active:
                self.save()       # the state to --resume from
            raise
        finally:
            if bar is not None:
                bar.close()
            if log_f is not None:
                log_f.close()
            if tb is not None:
                tb.close()
            if wandb is not None:
                wandb.finish()
        return TrainResult(self.run_dir, self.step, losses, self.model,
                           None if self.ema is None else self.ema.ema_model, self.dyn, self.net_config)


def train(cfg: TrainConfig, *, stop_at_step=None):
    """Train per ``cfg``; ``stop_at_step`` ends early without the final files (as an interruption would)."""
    trainer = Trainer(cfg)
    try:
        return trainer.fit(stop_at_step=stop_at_step)
    finally:
        trainer.release()
        if trainer.dist.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
