"""Fused GFDM ops with one dispatch: Triton, C++ (CPU), CUDA extension, or the torch reference.

Every op is registered with ``torch.library`` (mutating custom ops with fake
implementations) so ``torch.compile`` traces through it and a whole sampler
step can be captured in a CUDA graph. Arguments are checked here, once, with
messages that name the fix; the backends assume checked input.

Backends: ``torch`` (gfdm_fast.reference, always), ``cpp`` (gfdm_fast._C, CPU
tensors), ``cuda`` (gfdm_fast._C built with nvcc, CUDA tensors), ``triton``
(CUDA tensors, or CPU tensors under TRITON_INTERPRET=1). ``auto`` picks the
fastest available for the device; ``GFDM_BACKEND`` overrides it. On CUDA ``auto``
prefers Triton: both GPU backends pass the reference tests on an H200, and Triton's
kernels are the faster at large batches (benchmarks/RESULTS.md, 'GPU').
``backend_status(device)`` says which backends loaded and why the others did not.

The step index is a 0-d int64 tensor on the state's device: a host int is checked
against the table and becomes a view into a cached device ``arange`` (no host-to-device
copy per step); a device index is read in-kernel, and a step outside the table makes
the kernels write NaN (a raise would need a sync).
"""
import importlib
import os
from typing import Optional

import torch

from gfdm_fast import layout as L
from gfdm_fast import reference as ref
from gfdm_fast import schedule as S

BACKENDS = ("torch", "cpp", "cuda", "triton")
_IMPLS = {"torch": {"em_step": ref.em_step_planar, "prior": ref.prior_planar, "exp_step": ref.exp_step_planar}}
_LOAD_ERRORS = {}


def _noising_torch(x0, mean_scale, sigma_c, seeds, step, x_in, eps_out, eps):
    xi, e = ref.noising(x0, mean_scale, sigma_c, seeds, step, eps)
    x_in.copy_(xi)
    eps_out.copy_(e)


_IMPLS["torch"]["noising"] = _noising_torch


def register_backend(name: str, impls: dict) -> None:
    """Called by a backend module on import: ``impls`` maps op name -> function with the torch twin's signature."""
    _IMPLS.setdefault(name, {}).update(impls)


def _try_load(name):
    if name in _IMPLS or name in _LOAD_ERRORS:
        return name in _IMPLS
    module = {"cpp": "gfdm_fast.kernels_cpp", "cuda": "gfdm_fast.kernels_cpp", "triton": "gfdm_fast.kernels"}[name]
    try:
        importlib.import_module(module)
    except Exception as err:  # a missing or broken optional backend is never fatal
        _LOAD_ERRORS[name] = f"{type(err).__name__}: {err}"
    if name not in _IMPLS and name not in _LOAD_ERRORS:
        _LOAD_ERRORS[name] = "not built"
    return name in _IMPLS


def _triton_runs_on(device_type):
    if device_type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "") == "1"


# 'auto' order per device type. On CUDA, Triton before the CUDA extension: on an H200 Triton's em step runs at
# the copy floor at batch 8000 (K = 3) and the CUDA kernels at 2-4x it (the extension launches faster, which only
# matters without CUDA graphs at small batches; benchmarks/RESULTS.md, 'GPU').
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "triton", "torch")}


def _unavailable_reason(name, dev, op=None):
    """None if backend ``name`` runs ``op`` (any op if None) on device type ``dev``, else why not."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}"
    if name == "cuda" and dev != "cuda":
        return "runs on CUDA tensors only"
    if name == "cpp" and dev != "cpu":
        return "runs on CPU tensors only"
    if name == "triton" and not _triton_runs_on(dev):
        return "CPU tensors need TRITON_INTERPRET=1 (set before triton is imported)"
    if name != "torch" and not _try_load(name):
        return _LOAD_ERRORS[name]
    if op is not None and op not in _IMPLS[name]:
        return f"it has no {op} kernel"
    return None


def backend_status(device: str | torch.device = "cpu") -> dict[str, str]:
    """{backend: "ok" or why it cannot run on ``device``} for every backend, in 'auto' order.

    The reason for a backend that failed to load is the import error (e.g. a missing extension).
    """
    dev = torch.device(device).type
    order = _AUTO_ORDER.get(dev, ("torch",))
    return {name: _unavailable_reason(name, dev) or "ok" for name in (*order, *(b for b in BACKENDS if b not in order))}


def available_backends(device: str | torch.device = "cpu", op: str | None = None) -> list[str]:
    """Backends that can run ops (``op``, if given) on tensors of ``device``, in 'auto' order."""
    dev = torch.device(device).type
    return [name for name in _AUTO_ORDER.get(dev, ("torch",)) if _unavailable_reason(name, dev, op) is None]


def resolve_backend(backend: str, device: str | torch.device, op: str | None = None) -> str:
    """'auto' -> the fastest backend for ``device`` that has ``op`` (GFDM_BACKEND overrides); validate names.
    Called on every op: an explicit, available backend costs one lookup."""
    dev = torch.device(device).type
    if backend in (None, "auto"):
        env = os.environ.get("GFDM_BACKEND")
        if not env or env == "auto":
            # the Triton interpreter is for testing; on a CPU it never wins 'auto'
            return next(b for b in available_backends(dev, op) if not (b == "triton" and dev == "cpu"))
        backend = env
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose auto or one of {', '.join(BACKENDS)}")
    why = _unavailable_reason(backend, dev, op)
    if why is not None:
        hint = {"cpp": "reinstall with `pip install --no-build-isolation -e .` to build the C++ extension",
                "cuda": "needs a GPU and the extension built with nvcc (GFDM_FORCE_CUDA=1)",
                "triton": "needs a CUDA device, or TRITON_INTERPRET=1 for CPU tensors"}.get(backend, "")
        raise ValueError(f"backend {backend!r} is not available on {dev} ({why}); "
                         f"available: {', '.join(available_backends(dev, op))}. {hint}".strip())
    return backend


# ---- argument checks ----------------------------------------------------------------------------
def _need(cond, msg):
    if not cond:
        raise ValueError(msg)


def _need_float32(backend, x):
    _need(backend == "torch" or x.dtype == torch.float32,
          f"backend {backend!r} computes in float32; use backend='torch' for float64")


def _check_tensor(name, x, shape, dtype, device):
    _need(isinstance(x, torch.Tensor), f"{name} must be a tensor")
    _need(tuple(x.shape) == tuple(shape), f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    _need(x.dtype == dtype, f"{name} must be {dtype}, got {x.dtype}")
    _need(x.device == device,
          f"{name} is on {x.device} but the state is on {device}: move it with .to({str(device)!r})")
    _need(x.is_contiguous(), f"{name} must be contiguous: pass {name}.contiguous()")


def _check_state(z, num_aug=None):
    _need(isinstance(z, torch.Tensor) and z.dim() == 5,
          f"z must be the planar augmented state (K+1, B, C, H, W), got {tuple(getattr(z, 'shape', ()))}")
    _need(z.dtype in (torch.float32, torch.float64),
          f"z must be float32 (or float64 for the torch backend), got {z.dtype}")
    _need(z.is_contiguous(), "z must be contiguous: pass z.contiguous()")
    if num_aug is not None:
        _need(z.shape[0] == num_aug + 1, f"z has K+1 = {z.shape[0]} planes but the step table was built for "
                                         f"num_aug = {num_aug}: build the table from the same dynamics")


def _check_seeds_noise(seeds, noise, B, shape, device):
    if noise is not None:
        _check_tensor("noise", noise, shape, noise.dtype, device)
    else:
        _need(seeds is not None, "pass per-image seeds (B,) int64 or explicit noise")
        _check_tensor("seeds", seeds, (B,), torch.int64, device)


_STEP_CACHE = {}         # device -> arange(n) int64 on it: host step ints become views, not copies
_STEP_CACHE_MAX = 1 << 16


def step_tensor(step: int | torch.Tensor, device: torch.device, limit: int) -> torch.Tensor:
    """``step`` as a 0-d int64 tensor on ``device``; a host int must lie in [0, limit).

    A device tensor is used as is (its range is checked in-kernel: NaN output). A host int
    indexes a cached device arange, so the eager step loop makes no host-to-device copy.
    """
    if isinstance(step, torch.Tensor):
        _need(step.numel() == 1 and not step.is_floating_point(),
              "step must be an integer (or a 1-element integer tensor)")
        return step.reshape(()).to(device=device, dtype=torch.int64)
    _need(not isinstance(step, bool) and int(step) == step, f"step must be an integer, got {step!r}")
    step = int(step)
    _need(0 <= step < limit, f"step {step} is outside the step table ({limit} steps): pass 0 <= step < {limit}")
    if step >= _STEP_CACHE_MAX:
        return torch.tensor(step, dtype=torch.int64, device=device)
    device = torch.device(device)
    steps = _STEP_CACHE.get(device)
    if steps is None or steps.numel() <= step:
        steps = torch.arange(min(_STEP_CACHE_MAX, max(1024, 2 * (step + 1))), dtype=torch.int64, device=device)
        _STEP_CACHE[device] = steps
    return steps[step]


# ---- registered custom ops ----------------------------------------------------------------------
@torch.library.custom_op("gfdm::em_step", mutates_args=("z", "x_in"))
def _em_step_op(z: torch.Tensor, e: torch.Tensor, x_in: torch.Tensor, table: torch.Tensor, step: torch.Tensor,
                seeds: Optional[torch.Tensor], noise: Optional[torch.Tensor], backend: str) -> None:
    _IMPLS[backend]["em_step"](z, e, x_in, table, step, seeds, noise)


@_em_step_op.register_fake
def _(z, e, x_in, table, step, seeds, noise, backend):
    return None


@torch.library.custom_op("gfdm::prior", mutates_args=("z", "x_in"))
def _prior_op(z: torch.Tensor, x_in: torch.Tensor, prior: torch.Tensor, seeds: Optional[torch.Tensor],
              noise: Optional[torch.Tensor], backend: str) -> None:
    _IMPLS[backend]["prior"](z, x_in, prior, seeds, noise)


@_prior_op.register_fake
def _(z, x_in, prior, seeds, noise, backend):
    return None


@torch.library.custom_op("gfdm::noising", mutates_args=("x_in", "eps_out"))
def _noising_op(x0: torch.Tensor, mean_scale: torch.Tensor, sigma_c: torch.Tensor, seeds: Optional[torch.Tensor],
                step: torch.Tensor, x_in: torch.Tensor, eps_out: torch.Tensor, eps: Optional[torch.Tensor],
                backend: str) -> None:
    _IMPLS[backend]["noising"](x0, mean_scale, sigma_c, seeds, step, x_in, eps_out, eps)


@_noising_op.register_fake
def _(x0, mean_scale, sigma_c, seeds, step, x_in, eps_out, eps, backend):
    return None


@torch.library.custom_op("gfdm::exp_step", mutates_args=("z", "x_in", "hist"))
def _exp_step_op(z: torch.Tensor, e: torch.Tensor, x_in: torch.Tensor, hist: torch.Tensor, table: torch.Tensor,
                 step: torch.Tensor, order: int, seeds: Optional[torch.Tensor], noise: Optional[torch.Tensor],
                 noisy: bool, backend: str) -> None:
    _IMPLS[backend]["exp_step"](z, e, x_in, hist, table, step, order, seeds, noise, noisy)


@_exp_step_op.register_fake
def _(z, e, x_in, hist, table, step, order, seeds, noise, noisy, backend):
    return None


# ---- public functions ---------------------------------------------------------------------------
def em_step(z: torch.Tensor, e: torch.Tensor, x_in: torch.Tensor, table, step: int | torch.Tensor,
            seeds: torch.Tensor | None = None, noise: torch.Tensor | None = None, *, backend: str = "auto"):
    """Fused Euler-Maruyama step (gfdm_fast.schedule row layout): updates ``z`` in place, writes ``x_in``.

    ``table`` is a StepTable or its (N, 6+4K) tensor; ``step`` an int or 0-d integer tensor.
    """
    if isinstance(table, S.StepTable):
        _need(table.solver == "em", f"em_step needs an Euler-Maruyama table, got solver {table.solver!r}")
        table = table.table
    _check_state(z)
    K, B = z.shape[0] - 1, z.shape[1]
    img = tuple(z.shape[1:])
    _need(isinstance(table, torch.Tensor) and table.dim() == 2, "table must be a (steps, 6+4K) step table")
    _need(table.shape[1] == L.em_row_width(K),
          f"the step table has rows of {table.shape[1]} coefficients, but z has K = {K} (rows of {L.em_row_width(K)}): "
          f"build the table from the dynamics that made z")
    _check_tensor("table", table, table.shape, z.dtype, z.device)
    _check_tensor("e", e, img, z.dtype, z.device)
    _check_tensor("x_in", x_in, img, z.dtype, z.device)
    _check_seeds_noise(seeds, noise, B, img, z.device)
    if noise is not None:
        _need(noise.dtype == z.dtype, f"noise must be {z.dtype}, got {noise.dtype}")
    backend = resolve_backend(backend, z.device)
    _need_float32(backend, z)
    _em_step_op(z, e, x_in, table, step_tensor(step, z.device, table.shape[0]), seeds, noise, backend)


def prior_draw(z: torch.Tensor, x_in: torch.Tensor, prior, seeds: torch.Tensor | None = None,
               noise: torch.Tensor | None = None, *, backend: str = "auto"):
    """z_T ~ N(0, Sreg(T)) per pixel into ``z`` (K+1, B, C, H, W) and the first network input into ``x_in``."""
    if isinstance(prior, S.StepTable):
        prior = prior.prior
    _check_state(z)
    K, B = z.shape[0] - 1, z.shape[1]
    img = tuple(z.shape[1:])
    _need(isinstance(prior, torch.Tensor) and prior.shape == ((K + 1) ** 2 + K,),
          f"prior must hold (K+1)^2 + K = {(K + 1) ** 2 + K} coefficients for K = {K}, got {tuple(prior.shape)}: "
          f"build it from the dynamics that made z")
    _check_tensor("prior", prior, prior.shape, z.dtype, z.device)
    _check_tensor("x_in", x_in, img, z.dtype, z.device)
    _check_seeds_noise(seeds, noise, B, tuple(z.shape), z.device)
    if noise is not None:
        _need(noise.dtype == z.dtype, f"noise must be {z.dtype}, got {noise.dtype}")
    backend = resolve_backend(backend, z.device)
    _need_float32(backend, z)
    _prior_op(z, x_in, prior, seeds, noise, backend)


def noising(x0: torch.Tensor, mean_scale: torch.Tensor, sigma_c: torch.Tensor, seeds: torch.Tensor | None = None,
            step: int = 0, eps: torch.Tensor | None = None, *, backend: str = "auto"):
    """Training pair of the reduced loss: returns (``c x0 + sigma_c eps``, eps), eps from Philox stream 2 or given."""
    _need(isinstance(x0, torch.Tensor) and x0.dim() >= 2, "x0 must be a (B, ...) tensor")
    _need(x0.dtype in (torch.float32, torch.float64), f"x0 must be float32, got {x0.dtype}")
    x0 = x0.contiguous()
    B = x0.shape[0]
    for name, v in (("mean_scale", mean_scale), ("sigma_c", sigma_c)):
        _check_tensor(name, v, (B,), x0.dtype, x0.device)
    _check_seeds_noise(seeds, eps, B, tuple(x0.shape), x0.device)
    if eps is not None:
        _need(eps.dtype == x0.dtype, f"eps must be {x0.dtype}, got {eps.dtype}")
    backend = resolve_backend(backend, x0.device)
    _need_float32(backend, x0)
    x_in, eps_out = torch.empty_like(x0), torch.empty_like(x0)
    _noising_op(x0, mean_scale, sigma_c, seeds, step_tensor(step, x0.device, 1 << 32), x_in, eps_out, eps, backend)
    return x_in, eps_out


def exp_step(z: torch.Tensor, e: torch.Tensor, x_in: torch.Tensor, hist: torch.Tensor | None, table,
             step: int | torch.Tensor, seeds: torch.Tensor | None = None, noise: torch.Tensor | None = None, *,
             order: int | None = None, noisy: bool | None = None, backend: str = "auto"):
    """Fused exponential-integrator step (gfdm_fast.expint row layout): updates ``z`` and the history
    ring ``hist`` (max(order-1, 1), B, C, H, W) in place and writes the next network input ``x_in``.
    ``noisy`` (sde) draws K+1 normals per pixel (Philox stream 3) or uses ``noise`` (K+1, B, C, H, W).
    """
    if isinstance(table, S.StepTable):
        _need(table.solver == "exp", f"exp_step needs an exponential-integrator table, got solver {table.solver!r}")
        order = table.order if order is None else order
        noisy = (table.mode == "sde") if noisy is None else noisy
        table = table.table
    _need(order in (1, 2, 3), f"order must be 1, 2 or 3, got {order!r}")
    _check_state(z)
    K, B = z.shape[0] - 1, z.shape[1]
    img = tuple(z.shape[1:])
    _need(isinstance(table, torch.Tensor) and table.dim() == 2 and table.shape[1] == L.exp_row_width(K, order),
          f"the step table does not fit K = {K}, order = {order} (rows of {L.exp_row_width(K, order)}): "
          f"build it from the dynamics that made z")
    _check_tensor("table", table, table.shape, z.dtype, z.device)
    _check_tensor("e", e, img, z.dtype, z.device)
    _check_tensor("x_in", x_in, img, z.dtype, z.device)
    _check_tensor("hist", hist, (max(order - 1, 1), *img), z.dtype, z.device)
    if noisy:
        _check_seeds_noise(seeds, noise, B, tuple(z.shape), z.device)
        if noise is not None:
            _need(noise.dtype == z.dtype, f"noise must be {z.dtype}, got {noise.dtype}")
    backend = resolve_backend(backend, z.device, "exp_step")
    _need_float32(backend, z)
    _exp_step_op(z, e, x_in, hist, table, step_tensor(step, z.device, table.shape[0]), int(order), seeds, noise,
                 bool(noisy), backend)
