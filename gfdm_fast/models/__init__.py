"""The score network (official-compatible UNet), its presets and fast paths."""
from gfdm_fast.models.fast import autocast, compile_model, optimize, set_sdpa, to_channels_last
from gfdm_fast.models.presets import PRESETS, UNetConfig, config_from_flags, preset
from gfdm_fast.models.unet import UNetModel


def build_model(config):
    """``UNetModel`` for a ``UNetConfig`` or a preset name."""
    if isinstance(config, str):
        config = preset(config)
    return UNetModel(**config.to_kwargs())


__all__ = ["UNetModel", "UNetConfig", "PRESETS", "preset", "config_from_flags", "build_model",
           "compile_model", "optimize", "set_sdpa", "to_channels_last", "autocast"]
