"""gfdm-fast: fast Generative Fractional Diffusion Models (Nobis et al., NeurIPS 2024)."""
__version__ = "0.1.0"

from gfdm_fast.dynamics import Dynamics, make_dynamics

__all__ = ["Dynamics", "make_dynamics", "Sampler"]


def __getattr__(name):
    # Sampler pulls in the kernels; import it on first use.
    if name == "Sampler":
        from gfdm_fast.sampler import Sampler
        return Sampler
    raise AttributeError(f"module 'gfdm_fast' has no attribute {name!r}")
