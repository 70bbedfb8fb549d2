"""Fast paths for the score network; none changes the state dict.

* ``set_sdpa(model)``: attention through ``scaled_dot_product_attention``.
* ``to_channels_last(model)``: NHWC weights (feed NHWC inputs too).
* ``autocast(device, dtype)``: bf16/fp16 autocast; GroupNorm and the
  attention softmax stay float32 inside the network.
* ``compile_model(model, mode)``: ``torch.compile`` plus a warm-up, so no
  timing ever includes compilation.
* ``FastNetwork(model, ...)``: the network as the sampler calls it, with the chosen fast paths
  (precision, compile, channels_last); float32 out whatever runs inside.
* ``capture_cuda_graph(fn, warmup)``: ``fn`` (a network call, or a whole sampler step) captured in a
  CUDA graph after a warm-up on a side stream; the sampler and the benchmark both capture through it.

``GFDM_COMPILE=0`` disables compilation (``compile_model`` returns the eager
model), ``GFDM_SDPA=0`` keeps the legacy attention in ``optimize``.
"""
import contextlib
import os

import torch

from gfdm_fast.models.unet import AttentionBlock

_HALF = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
         "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}


def set_sdpa(model, enabled=True):
    """Switch every attention block of ``model`` to (or back from) SDPA; returns ``model``."""
    for m in model.modules():
        if isinstance(m, AttentionBlock):
            m.use_sdpa = bool(enabled)
    return model


def to_channels_last(model):
    return model.to(memory_format=torch.channels_last)


def half_dtype(name):
    """'bf16' / 'fp16' (or a torch dtype) -> torch dtype; None or 'fp32' -> None."""
    if name is None or name in ("fp32", "float32", torch.float32):
        return None
    if isinstance(name, torch.dtype):
        return name
    try:
        return _HALF[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown autocast dtype {name!r}; use bf16, fp16 or fp32") from None


def autocast(device_type, dtype="bf16"):
    """Autocast context for the forward; a no-op context for fp32."""
    dt = half_dtype(dtype)
    if dt is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dt)


def _env_flag(name, default=True):
    v = os.environ.get(name)
    return default if v is None else v.strip().lower() not in ("0", "false", "no", "off")


def compile_model(model, mode=None, example_inputs=None, *, fullgraph=False, dynamic=False,
                  warmup=2, backend="inductor"):
    """``torch.compile(model, mode=mode)`` and, given ``example_inputs`` (a tuple of forward
    arguments), ``warmup`` forwards under ``torch.no_grad`` so compilation (and, for
    ``mode="max-autotune"``/``"reduce-overhead"``, autotuning and graph capture) is done
    before anyone times the model. Static shapes by default: a sampler runs one
    batch shape for thousands of calls.
    """
    if not _env_flag("GFDM_COMPILE"):
        return model
    compiled = torch.compile(model, mode=mode, fullgraph=fullgraph, dynamic=dynamic, backend=backend)
    if example_inputs is not None:
        with torch.no_grad():
            for _ in range(max(1, warmup)):
                compiled(*example_inputs)
        if any(torch.is_tensor(a) and a.is_cuda for a in example_inputs):
            torch.cuda.synchronize()
    return compiled


def optimize(model, *, sdpa=True, channels_last=False):
    """The state-dict-neutral switches in one call (``GFDM_SDPA=0`` overrides ``sdpa``)."""
    set_sdpa(model, sdpa and _env_flag("GFDM_SDPA"))
    if channels_last:
        to_channels_last(model)
    return model


def capture_cuda_graph(fn, warmup=None, *, warmup_calls=2):
    """A ``torch.cuda.CUDAGraph`` of ``fn()``; ``warmup`` (default ``fn``) runs ``warmup_calls`` times first
    on a side stream, so lazy initialisation and autotuning stay out of the capture."""
    warmup = warmup or fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_calls):
            warmup()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


class FastNetwork:
    """``model(x, s, y)`` behind the fast paths a sampler asks for; the solver never sees which are on."""

    def __init__(self, model, device, *, precision="fp32", compile=False, compile_mode=None, channels_last=False):
        self.model, self.device = model, device
        self.precision, self.compile, self.compile_mode = precision, compile, compile_mode
        self.channels_last = channels_last
        self._fn = model
        self._compiled_for = None

    def __call__(self, x, s, labels=None):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.precision == "fp32":
            out = self._fn(x, s, labels)
        else:
            with autocast(self.device.type, self.precision):
                out = self._fn(x, s, labels)
        return out.to(torch.float32).contiguous()

    def prepare(self, x, s, labels=None):
        """Compile once per batch shape, warming up outside any timing (nothing without ``compile``)."""
        if not self.compile or self._compiled_for == tuple(x.shape):
            return
        if self._compiled_for is None:
            self._fn = compile_model(self.model, mode=self.compile_mode)
        for _ in range(2):
            self(x.clone(), s, labels)
        self._compiled_for = tuple(x.shape)
