"""The ``triton`` backend of gfdm_fast.ops: one fused op per module (kernel, launcher, registered op).

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how it is tested).
Importing registers the backend; without triton this raises ImportError, which ops.py records.
"""
try:
    import triton  # noqa: F401 (only checks that triton is installed)
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("the triton backend needs the `triton` package (pip install triton)") from err

from gfdm_fast import ops

from . import em_step, exp_step, noising, prior  # the modules stay reachable as gfdm_fast.kernels.<op>

ops.register_backend("triton", {"em_step": em_step.em_step, "prior": prior.prior, "noising": noising.noising,
                              "exp_step": exp_step.exp_step})
