"""The sampling engine: network call + one fused op per step on a planar state.

Image i of a run uses seed ``seed + i`` for its prior draw, every step's noise
(Philox) and, when labels are drawn, its label; so a sample depends on its
seed only: not on batch size, backend or number of processes. Batches stream
to the caller (``iter_batches``), so peak memory is one batch whatever the
number of images or steps.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from gfdm_fast import ops
from gfdm_fast import schedule as S
from gfdm_fast.dynamics import Dynamics
from gfdm_fast.layout import STREAM_LABEL  # Philox stream of drawn labels
from gfdm_fast.philox import MASK32, philox4x32

SOLVERS = ("em", "exp")
PRECISIONS = ("fp32", "bf16", "fp16")
# the adaptive grid's pilot run (expint.adaptive_grid): images, least and most steps, seed; fixed, so a model's
# grid (and order="auto"'s choice) is reproducible and, for a deterministic network, equal on every rank
PILOT_IMAGES, PILOT_STEPS, PILOT_MAX_STEPS, PILOT_SEED = 8, 40, 400, 20_241_204


class NonFiniteSamples(ValueError):
    """A batch came out NaN/inf (raised before anything of it is handed on)."""


def _model_device(model):
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def draw_labels(seeds: torch.Tensor, num_classes: int | None) -> torch.Tensor | None:
    """One label per image from its seed (Philox stream 4): independent of batching."""
    seeds = seeds.to("cpu", torch.int64)
    zero = torch.zeros_like(seeds)
    x0, _, _, _ = philox4x32(zero, zero, zero + STREAM_LABEL, zero, seeds & MASK32, (seeds >> 32) & MASK32)
    return x0 % int(num_classes)


def _pilot_shape(model, shape, required=True):
    """(C, H, W) of the adaptive grid's pilot images: ``shape``, or the model's in_channels and image_size
    (None when neither is known and not ``required``)."""
    if shape is None:
        c, size = getattr(model, "in_channels", None), getattr(model, "image_size", None)
        if (c is None or size is None) and not required:
            return None
        if c is None or size is None:
            raise ValueError("grid='adaptive' runs a short pilot of the network: pass shape=(C, H, W) (the model "
                             "has no in_channels / image_size to take it from), or choose another grid")
        shape = (c, size, size)
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3:
        raise ValueError(f"shape must be (C, H, W), got {shape}")
    return shape                                           # the sizes: _check_request, in the pilot


def _check_model(model, device):
    """A float32 network on the sampler's device, or one clear ValueError."""
    if not isinstance(model, torch.nn.Module):
        return
    params = [p for p in model.parameters() if p.is_floating_point()]
    dtypes = sorted({str(p.dtype) for p in params})
    if dtypes and dtypes != ["torch.float32"]:
        raise ValueError(f"the model's parameters are {', '.join(dtypes)}; the sampler feeds it float32: call "
                         "model.float() (precision='bf16' or 'fp16' then autocasts the float32 network)")
    devices = sorted({str(p.device) for p in params})
    if devices and any(torch.device(d) != device and not (torch.device(d).type == device.type == "cuda"
                                                          and device.index is None) for d in devices):
        raise ValueError(f"the model is on {', '.join(devices)} but the sampler runs on {device}: move it with "
                         f"model.to('{device}') or pass device=")


def _check_request(model, shape, labels, num, num_classes):
    """Shapes and labels the network can take, checked before any work."""
    C, H, W = shape
    if min(shape) < 1:
        raise ValueError(f"shape must be (C, H, W) with every size >= 1, got {shape}")
    levels = len(getattr(model, "channel_mult", ()) or ()) - 1
    in_ch = getattr(model, "in_channels", None)
    if in_ch is not None and C != in_ch:
        raise ValueError(f"the model takes {in_ch} channel(s), shape asks for {C}")
    if levels > 0 and (H % 2 ** levels or W % 2 ** levels):
        raise ValueError(f"the model halves the image {levels} times: H and W must be multiples of {2 ** levels}, "
                         f"got {H}x{W} (it was trained at {getattr(model, 'image_size', '?')})")
    classes = getattr(model, "num_classes", None) if isinstance(model, torch.nn.Module) else num_classes
    if labels is not None:
        if classes is None and isinstance(model, torch.nn.Module):
            raise ValueError("labels were given but the model is unconditional (num_classes is None)")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or (classes is not None and hi >= classes):
            raise ValueError(f"labels must lie in [0, {classes}) for this model, got [{lo}, {hi}]")


class Sampler:
    """Fused reverse sampler: ``solver="em"`` is the official Euler-Maruyama sampler (docs/design.md,
    'Reverse sampling'); ``solver="exp"`` the exponential integrator of gfdm_fast.expint (few steps;
    ``order``, ``grid``, and ``denoise`` = one extra network call for Tweedie's estimate at t = eps).
    ``grid="adaptive"`` (the fractional default) runs a short pilot of the network once, at construction
    (``pilot_nfe`` calls: 8 images x max(40, 4 x steps), at most 400; images of ``shape`` (C, H, W) or of the
    model's in_channels / image_size; else at the first run); ``order="auto"`` (the fractional ode default)
    then keeps the order (2 or 3) and the grid's residual share (``expint.AUTO_RESIDUAL_SHARES``) whose run of the
    pilot's prior draw lands nearest its fine run (``pilot_errors``, keyed (order, share); 4 x 8 x steps more
    calls; order 3 and share 0 past 100 steps). ``solver_options`` records the kept order and share.

    ``model(x, s, y)`` is any callable with the official signature (``s = time_weight * t``).
    Opt-in fast paths: ``precision`` ('bf16'/'fp16' autocast of the network, state stays float32),
    ``compile`` (torch.compile of the network, warmed up outside any timing), ``cuda_graphs``
    (the whole step, network + fused update, captured once per batch shape and replayed).
    """

    def __init__(self, dyn: Dynamics, model: Callable, *, steps: int = 1000, mode: str = "sde", eps: float = 1e-3,
                 time_weight: float = 999.0, backend: str = "auto", solver: str = "em",
                 device: str | torch.device | None = None, precision: str = "fp32", compile: bool = False,
                 compile_mode: str | None = None, cuda_graphs: bool = False, channels_last: bool = False,
                 num_classes: int | None = None, progress: bool = False, order: int | None = None,
                 grid: str | None = None, rho: float | None = None, corrector: bool | None = None,
                 lower_final: bool | None = None, sigma_data: float | None = None, denoise: bool = False,
                 shape: tuple[int, int, int] | None = None) -> None:
        if not isinstance(dyn, Dynamics):
            raise ValueError("dyn must be a Dynamics from gfdm_fast.make_dynamics")
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}: choose one of {', '.join(SOLVERS)}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        if not callable(model):
            raise ValueError("model must be callable as model(x, s, y)")
        self.dyn, self.model = dyn, model
        self.steps, self.mode, self.eps, self.time_weight, self.solver = steps, mode, eps, time_weight, solver
        self.device = torch.device(device) if device is not None else _model_device(model)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs needs a CUDA device")
        self.backend = ops.resolve_backend(backend, self.device, "em_step" if solver == "em" else "exp_step")
        _check_model(model, self.device)
        from gfdm_fast.models.fast import FastNetwork
        self.network = FastNetwork(model, self.device, precision=precision, compile=compile,
                                   compile_mode=compile_mode, channels_last=channels_last)
        self.precision, self.cuda_graphs, self.channels_last = precision, cuda_graphs, channels_last
        self.num_classes, self.progress = num_classes, progress
        self._graphs = {}
        self.pilot_nfe, self.pilot_errors = 0, {}
        if solver == "em":
            if any(v is not None for v in (order, grid, rho, corrector, lower_final, sigma_data, shape)) or denoise:
                raise ValueError("order, grid, rho, corrector, lower_final, sigma_data, shape and denoise belong to "
                                 "solver='exp'")
            self._table = S.build_em_table(dyn, steps, mode=mode, eps=eps, time_weight=time_weight, device=self.device)
        else:
            from gfdm_fast import expint
            self.solver_options = expint.solver_options(dyn, mode=mode, order=order, grid=grid, rho=rho,
                                                        corrector=corrector, lower_final=lower_final,
                                                        sigma_data=sigma_data)
            self._table = None
            if mode not in S.MODES:
                raise ValueError(f"unknown mode {mode!r}: choose 'sde' or 'ode'")
            expint.check_steps(steps)                                  # now, even if the table waits
            if self.solver_options["grid"] != "adaptive":
                self._build_exp_table(None)
            elif shape is not None or _pilot_shape(model, None, required=False) is not None:
                self._build_exp_table(_pilot_shape(model, shape))
            # else: the adaptive grid's pilot runs on the first sample() / run(), at that image shape
            if denoise:
                inv_c, sig_over_c = expint.denoise_coefficients(dyn, eps)
                self._denoise = (float(inv_c), float(sig_over_c), float(time_weight * eps))
        self.denoise = bool(denoise)

    @property
    def table(self) -> S.StepTable:
        """The step table; with ``grid="adaptive"`` and no known image shape it exists after the first run."""
        if self._table is None:
            raise ValueError("grid='adaptive' builds its step table from a pilot run at the image shape of the "
                             "first sample() / run(): sample first, or pass shape=(C, H, W) to the Sampler")
        return self._table

    @table.setter
    def table(self, value: S.StepTable) -> None:
        self._table = value
        self._graphs = {}                  # captured CUDA graphs hold the old table (and its history ring)

    def _build_exp_table(self, shape):
        """The exp solver's table; with the adaptive grid, after its pilot run on images of ``shape``
        (and with ``order="auto"`` the (order, residual share) whose pilot images land nearest the pilot's fine
        run)."""
        from gfdm_fast import expint
        opts = {k: v for k, v in self.solver_options.items() if k != "residual_share"}
        if opts["grid"] != "adaptive":
            self._table = expint.build_exp_table(self.dyn, self.steps, mode=self.mode, eps=self.eps,
                                                 time_weight=self.time_weight, device=self.device, **opts)
            return
        activity, reference, labels = self._pilot(shape)
        default_share = expint.residual_shares(self.mode, opts["sigma_data"])[0]
        candidates = [(opts["order"], default_share)]                       # (order, residual share)
        if opts["order"] == "auto":          # past PILOT_MAX_STEPS / 4 steps the pilot is no finer than the run
            candidates = [(o, share) for share in expint.residual_shares(self.mode, opts["sigma_data"], auto=True)
                          for o in (2, 3)] if 4 * self.steps <= PILOT_MAX_STEPS else [(3, default_share)]
        tables, errors = {}, {}
        for order, share in candidates:
            table = expint.build_exp_table(self.dyn, self.steps, mode=self.mode, eps=self.eps,
                                           time_weight=self.time_weight, device=self.device, activity=activity,
                                           residual_share=share, **dict(opts, order=order))
            tables[order, share] = table
            if len(candidates) > 1:   # the pilot's prior draw, this run's grid and order: its ode end points
                trial = Sampler(self.dyn, self.network, steps=self.steps, mode="ode", eps=self.eps,
                                time_weight=self.time_weight, backend=self.backend, solver="exp", device=self.device,
                                order=order, grid="adaptive")     # no shape: builds nothing until given a table
                trial.table = table
                self.pilot_nfe += PILOT_IMAGES * self.steps
                try:
                    x = trial.sample(PILOT_IMAGES, shape, seed=PILOT_SEED, labels=labels, batch_size=PILOT_IMAGES)
                except NonFiniteSamples:             # that candidate is out
                    errors[order, share] = float("inf")
                    continue
                errors[order, share] = float((x.double() - reference.double()).abs().mean())
        best = min(candidates, key=lambda c: (errors.get(c, 0.0), c[1], c[0]))
        if errors and not np.isfinite(errors[best]):
            raise ValueError("order='auto': every trial run of the adaptive grid's pilot came out non-finite; the "
                             "network's weights or the dynamics are broken")
        order, share = best
        self.solver_options["order"], self.pilot_errors = order, errors
        self.solver_options["residual_share"] = share
        self._table = tables[best]

    def _ensure_table(self, shape):
        if self._table is None:
            self._build_exp_table(_pilot_shape(self.model, tuple(shape)))

    def _pilot(self, shape):
        """The adaptive grid's pilot: ``PILOT_IMAGES`` images (fixed seed, labels cycling through the classes)
        sampled in the run's mode (ode: order 3, sde: order 2) on a log-SNR grid of
        min(max(PILOT_STEPS, 4 x steps), PILOT_MAX_STEPS) steps.

        Returns the activity (times, mean |d_{k+1} - d_k| / |lambda_{k+1} - lambda_k| between consecutive
        evaluations of the data prediction d, and the same for d - k x_in, its part that is not the Gaussian
        denoiser ``expint.gauss_gain``), the pilot's images (the fine reference ``order="auto"``
        compares against) and its labels. Its network calls (``pilot_nfe``) are paid once per Sampler."""
        from gfdm_fast import expint
        classes = self.num_classes if self.num_classes is not None else getattr(self.model, "num_classes", None)
        labels = torch.arange(PILOT_IMAGES) % classes if classes else None
        _check_request(self.model, shape, labels, PILOT_IMAGES, self.num_classes)
        times, change, residual_change, prev = [], [], [], [None]
        sigma_data = self.solver_options["sigma_data"]

        def recording(x, s, y=None):        # d and d - k x_in of each call, kept only until the next one
            e = self.network(x, s, y)
            t = float(s.reshape(-1)[0]) / self.time_weight
            st = self.dyn.marginal_stats([t])
            c, sig = st.mean_scale.item(), st.sigma_c.item()
            d = (x.double() - sig * e.double()) / c                     # Tweedie's data prediction
            residual = d - float(expint.gauss_gain(c, sig, sigma_data)) * x.double()
            if prev[0] is not None:
                change.append(float((d - prev[0][0]).abs().mean()))
                residual_change.append(float((residual - prev[0][1]).abs().mean()))
            prev[0] = (d, residual)
            times.append(t)
            return e

        steps = min(max(PILOT_STEPS, 4 * self.steps), PILOT_MAX_STEPS)
        pilot = Sampler(self.dyn, recording, steps=steps, mode=self.mode, eps=self.eps, time_weight=self.time_weight,
                        backend=self.backend, solver="exp", device=self.device, order=3 if self.mode == "ode" else 2,
                        grid="logsnr", sigma_data=sigma_data)
        reference = pilot.sample(PILOT_IMAGES, shape, seed=PILOT_SEED, labels=labels, batch_size=PILOT_IMAGES)
        self.pilot_nfe = steps * PILOT_IMAGES
        t = np.array(times)
        lam = expint.log_nsr(self.dyn, t)
        dlam = np.abs(np.diff(lam))
        return (np.sqrt(t[1:] * t[:-1]), np.array(change) / dlam, np.array(residual_change) / dlam), reference, labels

    def share_table(self, dist) -> None:
        """With several processes (``dist``: gfdm_fast.distributed.Dist), every rank takes rank 0's adaptive grid,
        kept order and residual share: each ran the pilot, and on GPUs its last bits (and so order auto's pick)
        may differ per rank, while the shards of one run must come from one grid. Other grids need nothing."""
        if dist.world == 1 or getattr(self, "solver_options", {}).get("grid") != "adaptive":
            return
        import dataclasses
        t = self.table
        on_cpu = {k: getattr(t, k).cpu() for k in ("table", "t", "s", "prior")}
        table, options = dist.broadcast((dataclasses.replace(t, **on_cpu), dict(self.solver_options)))
        self.table = dataclasses.replace(table, **{k: getattr(table, k).to(self.device) for k in on_cpu})
        self.solver_options = options

    @property
    def nfe(self) -> int:
        return self.steps + int(self.denoise)

    def _step(self, z, x_in, hist, n, labels, seeds, noise=None):
        s = self.table.s.index_select(0, n.reshape(1)).expand(x_in.shape[0]) if torch.is_tensor(n) \
            else self.table.s[n].expand(x_in.shape[0])
        e = self.network(x_in, s, labels)
        if self.solver == "em":
            ops.em_step(z, e, x_in, self.table, n, seeds, noise, backend=self.backend)
        else:
            ops.exp_step(z, e, x_in, hist, self.table, n, seeds, noise, backend=self.backend)

    def _new_hist(self, x_in):
        if self.solver != "exp":
            return None
        return torch.zeros((max(self.table.order - 1, 1), *x_in.shape), dtype=x_in.dtype, device=x_in.device)

    def finish(self, z: torch.Tensor, x_in: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The output image of a finished run: X, or Tweedie's denoised estimate (one more network call)."""
        if not self.denoise:
            return z[0]
        inv_c, sig_over_c, s_eps = self._denoise
        e = self.network(x_in, torch.full((x_in.shape[0],), s_eps, device=x_in.device), labels)
        return inv_c * x_in - sig_over_c * e

    # -- loops --------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, z: torch.Tensor, x_in: torch.Tensor, labels: torch.Tensor | None = None,
            seeds: torch.Tensor | None = None, noise: torch.Tensor | None = None, *,
            progress: Callable[[int], object] | None = None) -> torch.Tensor:
        """The step loop on a prepared planar state ``z`` (K+1, B, C, H, W) and first input ``x_in``.

        ``noise`` (B, steps+1, C, H, W) in the official layout (``noise[:, n+1]`` at step n) replaces
        the Philox draw from ``seeds`` (exp solver: (steps, K+1, B, C, H, W), one draw per step).
        Returns ``z`` (updated in place).
        """
        if self.solver == "exp":
            self._ensure_table(x_in.shape[1:])
        self.network.prepare(x_in, self.table.s[:1].expand(x_in.shape[0]), labels)
        if self.cuda_graphs and noise is None:
            return self._run_graph(z, x_in, labels, seeds, progress)
        hist = self._new_hist(x_in)
        for n in range(self.steps):
            if noise is None:
                nz = None
            else:
                nz = (noise[:, n + 1] if self.solver == "em" else noise[n]).contiguous()
            self._step(z, x_in, hist, n, labels, seeds, nz)
            if progress is not None:
                progress(1)
        return z

    def _run_graph(self, z, x_in, labels, seeds, progress):
        """Capture network + fused step once per batch shape (static buffers), replay per step."""
        key = (tuple(z.shape), None if labels is None else tuple(labels.shape))
        if key not in self._graphs:
            bufs = {"z": torch.empty_like(z), "x_in": torch.empty_like(x_in), "seeds": torch.empty_like(seeds),
                    "n": torch.zeros((), dtype=torch.int64, device=z.device), "hist": self._new_hist(x_in),
                    "labels": None if labels is None else torch.empty_like(labels)}
            bufs["z"].copy_(z), bufs["x_in"].copy_(x_in), bufs["seeds"].copy_(seeds)
            if labels is not None:
                bufs["labels"].copy_(labels)
            from gfdm_fast.models.fast import capture_cuda_graph

            def scratch_step():   # the warm-up runs on copies: the captured buffers keep the run's state
                hh = None if bufs["hist"] is None else bufs["hist"].clone()
                self._step(bufs["z"].clone(), bufs["x_in"].clone(), hh, bufs["n"], bufs["labels"], bufs["seeds"])
            graph = capture_cuda_graph(
                lambda: self._step(bufs["z"], bufs["x_in"], bufs["hist"], bufs["n"], bufs["labels"], bufs["seeds"]),
                warmup=scratch_step)
            self._graphs[key] = (graph, bufs)
        graph, bufs = self._graphs[key]
        bufs["z"].copy_(z), bufs["x_in"].copy_(x_in), bufs["seeds"].copy_(seeds)
        if bufs["hist"] is not None:
            bufs["hist"].zero_()
        if labels is not None:
            bufs["labels"].copy_(labels)
        for n in range(self.steps):
            bufs["n"].fill_(n)
            graph.replay()
            if progress is not None:
                progress(1)
        z.copy_(bufs["z"])
        x_in.copy_(bufs["x_in"])
        return z

    def _labels_for(self, seeds, chunk, labels):
        if labels is not None:
            return labels[torch.tensor(chunk)].to(self.device)
        if self.num_classes:
            return draw_labels(seeds, self.num_classes).to(self.device)
        return None

    @torch.no_grad()
    def iter_batches(self, num: int, shape: tuple[int, int, int], *, seed: int = 0,
                     labels: torch.Tensor | Sequence[int] | None = None, batch_size: int | None = None, start: int = 0,
                     indices: Sequence[int] | None = None) -> Iterator[tuple[list, torch.Tensor, torch.Tensor | None]]:
        """Yield ``(indices, images, labels)`` batch by batch: images (b, C, H, W) float32 X components.

        ``indices`` (a range or list of image indices) restricts the run to a shard; by default
        images ``start .. num-1``. Image i always uses seed ``seed + i``.
        """
        if int(num) <= 0:
            raise ValueError(f"the number of samples must be > 0, got {num}")
        shape = tuple(int(v) for v in shape)
        if len(shape) != 3:
            raise ValueError(f"shape must be (C, H, W), got {shape}")
        idx = list(range(start, num)) if indices is None else list(indices)
        if labels is not None:
            labels = torch.as_tensor(labels).to("cpu", torch.int64)
            if labels.shape != (num,):
                raise ValueError(f"labels must hold one class per image: got shape {tuple(labels.shape)} "
                                 f"for {num} images")
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1 (or None: all images at once), got {batch_size}")
        _check_request(self.model, shape, labels, num, self.num_classes)
        if self.solver == "exp":
            self._ensure_table(shape)
        batch_size = int(batch_size or len(idx) or 1)
        K = self.dyn.num_aug
        bar = None
        if self.progress and idx:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(idx) * self.steps, unit="nfe", unit_scale=True, desc="sampling", smoothing=0.1)
        t0 = time.perf_counter()
        done = 0
        try:
            for j in range(0, len(idx), batch_size):
                chunk = idx[j:j + batch_size]
                b = len(chunk)
                seeds = torch.tensor([seed + i for i in chunk], dtype=torch.int64, device=self.device)
                y = self._labels_for(seeds, chunk, labels)
                z = torch.empty((K + 1, b, *shape), dtype=torch.float32, device=self.device)
                x_in = torch.empty((b, *shape), dtype=torch.float32, device=self.device)
                ops.prior_draw(z, x_in, self.table, seeds, backend=self.backend)
                step_cb = None if bar is None else (lambda k, b=b: bar.update(k * b))
                self.run(z, x_in, y, seeds, progress=step_cb)
                img = self.finish(z, x_in, y)
                finite = torch.isfinite(img.reshape(b, -1)).all(dim=1)
                if not bool(finite.all()):     # never hand NaN to a writer
                    bad = [chunk[j] for j in torch.nonzero(~finite).reshape(-1).tolist()]
                    raise NonFiniteSamples(f"images {bad[:8]}{' ...' if len(bad) > 8 else ''} ({len(bad)} of this "
                                           f"batch of {b}) came out non-finite (NaN/inf): the network's weights or "
                                           "the dynamics are broken; nothing of this batch was returned")
                done += b
                if bar is not None:
                    el = time.perf_counter() - t0
                    bar.set_postfix(img_s=f"{done / el:.2f}", nfe_s=f"{done * self.steps / el:.0f}")
                yield chunk, img.clone(), y
        finally:
            if bar is not None:
                bar.close()

    def sample(self, num: int, shape: tuple[int, int, int], *, seed: int = 0,
               labels: torch.Tensor | Sequence[int] | None = None, batch_size: int | None = None) -> torch.Tensor:
        """``num`` images of ``shape`` (C, H, W) as float32 (num, C, H, W): the X component."""
        out = None
        for chunk, x, _ in self.iter_batches(num, shape, seed=seed, labels=labels, batch_size=batch_size):
            if out is None:
                out = torch.empty((num, *x.shape[1:]), dtype=torch.float32, device=x.device)
            out[chunk[0]:chunk[-1] + 1] = x
        return out


def shard(num: int, rank: int, world: int) -> range:
    """The contiguous block of image indices of process ``rank`` out of ``world``."""
    per = math.ceil(num / world)
    return range(min(num, rank * per), min(num, (rank + 1) * per))
