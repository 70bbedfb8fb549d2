"""The C++ extension backends: ``cpp`` (CPU, OpenMP) and ``cuda`` (when built with nvcc).

Importing this module registers them with ``gfdm_fast.ops``; a missing or broken extension
raises ImportError here, which ops.py records as the reason the backend is unavailable.
Arguments arrive checked by ops.py; the extension checks them again (TORCH_CHECK) for direct calls.
"""
from gfdm_fast import _C, ops  # a missing _C raises ImportError here: ops.py catches it

ops.register_backend("cpp", {"em_step": _C.em_step, "prior": _C.prior, "noising": _C.noising,
                             "exp_step": _C.exp_step})

if _C.has_cuda():
    ops.register_backend("cuda", {"em_step": _C.em_step_cuda, "prior": _C.prior_cuda, "noising": _C.noising_cuda,
                                  "exp_step": _C.exp_step_cuda})
