"""Sample-quality metrics: streaming FID (pytorch-fid's numbers) and the pixel Vendi score VS_p.

Imported on first use, so the engine imports on machines without pytorch-fid (a GPU box
with no registry access) as long as FID is not asked for.
"""
import importlib

_WHERE = {
    "FIDAccumulator": "fid", "compute_statistics": "fid", "fid_from_stats": "fid", "load_inception": "fid",
    "load_stats": "fid", "open_images": "images", "save_stats": "fid",
    "VendiAccumulator": "vendi", "pixel_vendi_score": "vendi",
}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"gfdm_fast.metrics.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'gfdm_fast.metrics' has no attribute {name!r}")
