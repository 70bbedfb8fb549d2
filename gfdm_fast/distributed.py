"""One process or many (torchrun): rank, world size and the few collectives the engine needs.

``Dist.from_env()`` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; every collective is a no-op in one
process. ``setup(device)`` also picks the device and starts the process group (NCCL on GPUs, gloo on
CPUs) for training; ``generate`` starts it with ``init(device)`` once it knows its device.
"""
import os
from dataclasses import dataclass

import torch

from gfdm_fast.errors import UserError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    owned: bool = False          # this object started the process group (and ends it in close())

    @classmethod
    def from_env(cls) -> "Dist":
        rank = int(os.environ.get("RANK", "0"))
        return cls(rank, int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", str(rank))))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def init(self, device: torch.device) -> None:
        """Make ``device`` this process's CUDA device (if it is one) and start the process group (once; none
        in one process)."""
        self.device = device
        if device.type == "cuda":
            torch.cuda.set_device(device)     # an indexed device, from pick_device
        if self.world == 1 or torch.distributed.is_initialized():
            return
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.owned = True

    def close(self) -> None:
        if self.owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        self.owned = False

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def all_ok(self, ok: bool) -> bool:
        """True on every rank iff ``ok`` on every rank (so no rank waits for one that failed)."""
        if self.world == 1:
            return ok
        flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
        if torch.distributed.get_backend() == "nccl":
            flag = flag.cuda()
        torch.distributed.all_reduce(flag)
        return int(flag.item()) == 0

    def print0(self, *args, **kwargs) -> None:
        if self.main:
            print(*args, **kwargs)


def setup(device: str | None = None) -> Dist:
    """The training processes: device (``cuda:LOCAL_RANK`` under torchrun) and the started process group."""
    dist = Dist.from_env()
    dist.init(pick_device(device or ("cuda" if torch.cuda.is_available() else "cpu"), dist.local_rank))
    return dist


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``--device``: check (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps; cuda means cuda:LOCAL_RANK.
    A CUDA device always comes back with its index (torch.cuda.set_device refuses a bare 'cuda')."""
    if name == "check":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: expected check, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda, but no CUDA device is available; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev
