"""Augmented score matching (docs/design.md, 'Training loss') in plain PyTorch: one process or DDP under torchrun.

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
import dataclasses
import gc
import math
import os
import time
from dataclasses import dataclass

import torch

from gfdm_fast import checkpoint as ckpt
from gfdm_fast import data as gdata
from gfdm_fast import distributed
from gfdm_fast.data import MicroBatches
from gfdm_fast.ema import EMA
from gfdm_fast.errors import UserError
from gfdm_fast.io import atomic_save, save_grid
from gfdm_fast.loss import TIME_SAMPLING, TIME_WEIGHT, TimeMap, reduced_loss, sample_seeds
from gfdm_fast.runs import (
    STATE_FILE,
    FolderLock,
    clean_stale_temporaries,
    new_run_id,
    run_name,
    write_run_record,
)
from gfdm_fast.train_config import (
    TrainConfig,
    check_labels,
    make_dyn,
    model_config,
    resume_config,
    with_data_recipe,
)
from gfdm_fast.train_log import TrainLog

# ----------------------------------------------------------------------------- set-up helpers

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

EMA_DECAY = {"fvp": 0.9999, "fve": 0.999}


@dataclass
class TrainResult:
    run_dir: str
    step: int
    losses: list            # (step, loss) of the rows written to train_log.csv by this call
    model: torch.nn.Module  # online weights (unwrapped)
    ema_model: torch.nn.Module | None
    dynamics: object
    config: object          # UNetConfig
    skipped: list = dataclasses.field(default_factory=list)   # steps dropped by --nonfinite skip (this call)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg = dataclasses.replace(cfg)
        for name in ("batch_size", "train_steps", "accumulate_grad_batches", "log_every_n_steps", "log_model_every_n"):
            if getattr(cfg, name) is not None and int(getattr(cfg, name)) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.precision not in ("fp32", "bf16"):
            raise UserError(f"--precision must be fp32 or bf16, got {cfg.precision!r}")
        if cfg.time_sampling not in (None, *TIME_SAMPLING):
            raise UserError(f"--time_sampling must be one of {', '.join(TIME_SAMPLING)}, got {cfg.time_sampling!r}")
        cfg.data_name = str(cfg.data_name).lower()
        self.dist = distributed.setup(cfg.device)
        self.device = self.dist.device
        if cfg.nonfinite not in ("stop", "skip"):
            raise UserError(f"--nonfinite must be stop or skip, got {cfg.nonfinite!r}")
        self.state_in = self._read_resume() if cfg.resume else None
        self.resume_changes = {}
        if self.state_in is not None:   # the run's own settings, with what the user may change on top
            cfg, self.resume_changes = resume_config(cfg, self.state_in)
        self.cfg = cfg = with_data_recipe(cfg)   # unset lr, batch_size, time_sampling: the data set's recipe
        if cfg.seed is None:
            cfg.seed = self.dist.broadcast(int.from_bytes(os.urandom(4), "little") >> 1)
        if cfg.wb_id is None:
            cfg.wb_id = self.dist.broadcast(new_run_id())

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
        self.time_map = TimeMap(self.dyn, cfg.time_sampling)
        self.run_dir = (self.resume_dir if self.state_in is not None else
                        os.path.join(cfg.output_dir, run_name(cfg.wb_id, cfg.data_name, cfg.hurst, cfg.num_aug)))
        self.lock = None
        outcome = None
        if self.dist.main:      # one process owns the folder; the others learn the outcome
            try:
                self.lock = self._claim_run_dir()
                outcome = "ok"
            except UserError as err:
                outcome = str(err)
        outcome = self.dist.broadcast(outcome)
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
        if (not isinstance(obj, dict) or obj.get("format") != ckpt.FORMAT
                or "train_config" not in (obj.get("extra") or {})):
            raise UserError(f"{path} is not a gfdm-fast training state (written by gfdm-fast train)")
        return obj

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
        label = y if self.net_config.num_classes is not None else None
        return reduced_loss(self.net, self.dyn, x0, label, sample_seeds(self.cfg.seed, m, x0.shape[0]),
                            precision=self.cfg.precision, time_map=self.time_map)

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
                "train": {k: v for k, v in dataclasses.asdict(cfg).items()
                          if k not in ("extra", "progress", "explicit")},
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
        extra = {"train_config": {k: v for k, v in dataclasses.asdict(self.cfg).items()
                                  if k not in ("extra", "explicit")},
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

    def _log_row(self, log, elapsed):
        """All-reduce the running loss and write one train_log.csv row; returns (step, loss)."""
        total = self.loss_sum.clone()
        if self.dist.active:
            torch.distributed.all_reduce(total)
            total /= self.dist.world
        loss = float(total) / max(self.log_acc[0], 1)
        ips = self.log_acc[1] / max(elapsed, 1e-9)
        lr = self.opt.param_groups[0]["lr"]
        if log is not None:
            log.row(self.step, loss, lr, ips)
        self.loss_sum.zero_()
        self.log_acc = [0, 0]
        self.check_finite()
        return self.step, loss

    # -- the loop -------------------------------------------------------------------------------
    def fit(self, stop_at_step=None):
        cfg, dist = self.cfg, self.dist
        if dist.main:
            os.makedirs(self.run_dir, exist_ok=True)
            write_run_record(self.run_dir, self._metadata())
        sampler = MicroBatches(len(self.dataset), cfg.batch_size, cfg.seed, world=dist.world, rank=dist.rank,
                               start=self.step * cfg.accumulate_grad_batches)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, collate_fn=gdata.collate_batch,
                                             num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
                                             persistent_workers=cfg.num_workers > 0)
        batches = iter(loader)     # draws a base seed from the global RNG: restore the RNG after it
        rng = getattr(self, "_rng_to_restore", None)
        if rng is not None:
            _set_rng_state(rng, self.device)
        log = TrainLog(self.run_dir, step=self.step, total_steps=cfg.train_steps, resumed=self.state_in is not None,
                       progress=cfg.progress, run_id=cfg.wb_id, metadata=self._metadata()) if dist.main else None
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
                if log is not None:
                    log.step()
                if cfg.max_minutes is not None and self.step % cfg.log_every_n_steps == 0:   # a collective: not
                    out_of_time = dist.broadcast(time.perf_counter() - t_start > 60 * cfg.max_minutes)  # per step
                if self.step % cfg.log_every_n_steps == 0 or self.step == cfg.train_steps:   # out_of_time is a log step
                    losses.append(self._log_row(log, time.perf_counter() - t_log))
                    t_log = time.perf_counter()
                if self.step % cfg.log_model_every_n == 0:
                    self.save()
                if cfg.val_check_interval and self.step % cfg.val_check_interval == 0 and dist.main:
                    log.image(self.sample_grid(), self.step)
            if self.step >= cfg.train_steps or out_of_time:
                self.save(final=True)
        except KeyboardInterrupt:
            if self.step > 0 and not dist.active:
                self.save()       # the state to --resume from
            raise
        finally:
            if log is not None:
                log.close()
        if self.skipped:
            dist.print0(f"warning: --nonfinite skip dropped {len(self.skipped)} step(s) with a non-finite loss or "
                        f"gradient: {self.skipped[:20]}{' ...' if len(self.skipped) > 20 else ''}")
        return TrainResult(self.run_dir, self.step, losses, self.model,
                           None if self.ema is None else self.ema.ema_model, self.dyn, self.net_config, self.skipped)


def train(cfg: TrainConfig, *, stop_at_step=None):
    """Train per ``cfg``; ``stop_at_step`` ends early without the final files (as an interruption would)."""
    trainer = Trainer(cfg)
    try:
        result = trainer.fit(stop_at_step=stop_at_step)
        trainer.dist.barrier()        # every rank done (rank 0 writes the final files alone) before the group ends
        return result
    finally:
        trainer.release()
        # DDP's reducer holds the process group: gone before the group is (a gloo rank once aborted in teardown,
        # "terminate called without an active exception"; not reproduced in 40 runs, so the order is made fixed)
        trainer.ddp = trainer.net = None
        gc.collect()
        trainer.dist.close()
