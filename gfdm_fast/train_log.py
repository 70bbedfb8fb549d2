"""What training reports, on the main process: ``train_log.csv``, TensorBoard and wandb when they are
available, and the progress bar."""
import csv
import io
import os

from gfdm_fast.io import atomic_write_file

LOG_COLUMNS = ("step", "loss", "lr", "images_per_s")


class TrainLog:
    """Open for the life of ``Trainer.fit``; ``row`` per logged step, ``image`` per sample grid."""

    def __init__(self, run_dir, *, step, total_steps, resumed, progress, run_id, metadata):
        path = os.path.join(run_dir, "train_log.csv")
        rows = []
        if resumed and os.path.exists(path):  # drop rows written after the saved state
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        def write_kept(f):   # the kept history replaces the file atomically: a crash here loses nothing
            text = io.TextIOWrapper(f, newline="")
            w = csv.DictWriter(text, fieldnames=LOG_COLUMNS)
            w.writeheader()
            w.writerows(rows)
            text.flush()
            text.detach()
        atomic_write_file(path, write_kept)
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=LOG_COLUMNS)
        self.tb = self.wandb = self.bar = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        except Exception:   # tensorboard not installed: optional
            self.tb = None
        if os.environ.get("WANDB_API_KEY"):
            try:
                import wandb
                self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "gfdm-fast"), id=run_id,
                                        resume="allow", config=metadata)
            except Exception as err:
                print(f"wandb disabled: {type(err).__name__}: {err}")
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", dynamic_ncols=True)

    def step(self):
        if self.bar is not None:
            self.bar.update(1)

    def row(self, step, loss, lr, images_per_s):
        self.writer.writerow({"step": step, "loss": repr(loss), "lr": repr(lr), "images_per_s": f"{images_per_s:.2f}"})
        self.file.flush()
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/lr", lr, step)
        if self.wandb is not None:
            self.wandb.log({"loss": loss, "lr": lr, "images_per_s": images_per_s}, step=step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.0f}")

    def image(self, path, step):
        if self.tb is not None:
            import numpy as np
            from PIL import Image
            self.tb.add_image("samples", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def close(self):
        for closer in (self.bar, self.file, self.tb):
            if closer is not None:
                closer.close()
        if self.wandb is not None:
            self.wandb.finish()
