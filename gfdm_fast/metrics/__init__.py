"""Sample-quality metrics: streaming FID (pytorch-fid's numbers) and the pixel Vendi score VS_p."""
from gfdm_fast.metrics.fid import (  # noqa: F401
    FIDAccumulator,
    compute_statistics,
    fid_from_stats,
    load_inception,
    load_stats,
    open_images,
    save_stats,
)
from gfdm_fast.metrics.vendi import VendiAccumulator, pixel_vendi_score  # noqa: F401
