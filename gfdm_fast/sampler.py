"""The fused reverse sampler: network call + one fused op per step on a planar state.

``Sampler(dyn, model).sample(num, shape, seed=s)``: image i uses seed ``s + i``
for its prior draw and every step's noise (Philox), so a sample depends on its
seed only, not on batch size or backend.
"""
import torch

from gfdm_fast import ops
from gfdm_fast import schedule as S
from gfdm_fast.dynamics import Dynamics

SOLVERS = ("em",)


def _model_device(model):
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


class Sampler:
    """Official Euler-Maruyama sampler (DESIGN.md 'Reverse sampling'), fused.

    ``model(x, s, y)`` is any callable with the official signature (``s = time_weight * t``).
    """

    def __init__(self, dyn: Dynamics, model, *, steps=1000, mode="sde", eps=1e-3, time_weight=999.0,
                 backend="auto", solver="em", device=None):
        if not isinstance(dyn, Dynamics):
            raise ValueError("dyn must be a Dynamics from gfdm_fast.make_dynamics")
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}: choose one of {', '.join(SOLVERS)}")
        if not callable(model):
            raise ValueError("model must be callable as model(x, s, y)")
        self.dyn, self.model = dyn, model
        self.steps, self.mode, self.eps, self.time_weight, self.solver = steps, mode, eps, time_weight, solver
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.backend = ops.resolve_backend(backend, self.device)
        self.table = S.build_em_table(dyn, steps, mode=mode, eps=eps, time_weight=time_weight, device=self.device)

    @property
    def nfe(self):
        return self.steps

    def _net(self, x, n, labels):
        s = self.table.s[n].expand(x.shape[0])
        out = self.model(x, s, labels)
        return out.to(torch.float32).contiguous()

    @torch.no_grad()
    def run(self, z, x_in, labels=None, seeds=None, noise=None):
        """The step loop on a prepared planar state ``z`` (K+1, B, C, H, W) and first input ``x_in``.

        ``noise`` (B, steps+1, C, H, W) in the official layout (``noise[:, n+1]`` at step n) replaces
        the Philox draw from ``seeds``. Returns ``z`` (updated in place).
        """
        for n in range(self.steps):
            e = self._net(x_in, n, labels)
            ops.em_step(z, e, x_in, self.table, n, seeds, None if noise is None else noise[:, n + 1].contiguous(),
                        backend=self.backend)
        return z

    @torch.no_grad()
    def sample(self, num, shape, *, seed=0, labels=None, batch_size=None):
        """``num`` images of ``shape`` (C, H, W) as float32 (num, C, H, W): the X component."""
        if int(num) <= 0:
            raise ValueError(f"num must be > 0, got {num}")
        shape = tuple(int(v) for v in shape)
        if len(shape) != 3:
            raise ValueError(f"shape must be (C, H, W), got {shape}")
        batch_size = int(batch_size or num)
        K = self.dyn.num_aug
        out = torch.empty((num, *shape), dtype=torch.float32, device=self.device)
        for i0 in range(0, num, batch_size):
            b = min(batch_size, num - i0)
            seeds = torch.arange(seed + i0, seed + i0 + b, dtype=torch.int64, device=self.device)
            y = None if labels is None else torch.as_tensor(labels[i0:i0 + b], device=self.device)
            z = torch.empty((K + 1, b, *shape), dtype=torch.float32, device=self.device)
            x_in = torch.empty((b, *shape), dtype=torch.float32, device=self.device)
            ops.prior_draw(z, x_in, self.table, seeds, backend=self.backend)
            self.run(z, x_in, y, seeds)
            out[i0:i0 + b] = z[0]
        return out
