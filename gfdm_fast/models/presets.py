"""Network configurations: a frozen dataclass, the official presets, the official flags.

The presets reproduce the seed README's training commands::

    mnist:   --channels 1 --image_size 28 --model_channels 64 --num_res_blocks 3
             --attn_resolutions 4,2 --channel_mult 1,2,4 --dropout 0.0 --num_classes 10
    cifar10: --channels 3 --image_size 32 --model_channels 128 --num_res_blocks 4
             --attn_resolutions 8 --channel_mult 1,2,2,2 --dropout 0.1 --num_classes 10

``--attn_resolutions`` are down-sampling rates, passed through unchanged:
"4,2" puts attention where the feature maps are image_size/4 and
image_size/2 wide (7x7 and 14x14 for MNIST), as in the official key lists.
"""
import dataclasses
from dataclasses import dataclass

from gfdm_fast.errors import UserError


@dataclass(frozen=True)
class UNetConfig:
    image_size: int                               # H = W of the images
    in_channels: int                              # --channels
    model_channels: int                           # width of the first level
    out_channels: int                             # = in_channels (epsilon prediction)
    num_res_blocks: int                           # residual blocks per level
    attention_resolutions: tuple = ()             # down-sampling rates with attention
    dropout: float = 0.0
    channel_mult: tuple = (1, 2, 4)               # width multiplier per level
    num_classes: int | None = None                # class-conditional when set
    num_heads: int = 1                            # official default
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False

    def __post_init__(self):
        # Normalise lists (from JSON or flags) so configs compare and hash.
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        if self.num_classes is not None and int(self.num_classes) <= 0:
            object.__setattr__(self, "num_classes", None)

    def to_kwargs(self):
        """Keyword arguments of ``UNetModel``."""
        return dataclasses.asdict(self) | {"attention_resolutions": list(self.attention_resolutions),
                                           "channel_mult": list(self.channel_mult)}

    def to_dict(self):
        return self.to_kwargs()

    @classmethod
    def from_dict(cls, d):
        """Build from a dict of constructor arguments; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


PRESETS = {
    "mnist": UNetConfig(image_size=28, in_channels=1, model_channels=64, out_channels=1,
                        num_res_blocks=3, attention_resolutions=(4, 2), dropout=0.0,
                        channel_mult=(1, 2, 4), num_classes=10),
    "cifar10": UNetConfig(image_size=32, in_channels=3, model_channels=128, out_channels=3,
                          num_res_blocks=4, attention_resolutions=(8,), dropout=0.1,
                          channel_mult=(1, 2, 2, 2), num_classes=10),
    # 28x28 digits on a few CPU cores (benchmarks/real_data.py): 1.1M parameters, no attention
    "mnist_cpu": UNetConfig(image_size=28, in_channels=1, model_channels=32, out_channels=1,
                            num_res_blocks=1, attention_resolutions=(), dropout=0.0,
                            channel_mult=(1, 2, 2), num_classes=10),
}

# Optimiser settings that go with the mnist_cpu preset (measured in benchmarks/RESULTS.md, real data):
# `gfdm-fast train --data_name mnist5k` uses them where the flag is not given.
CPU_RECIPE = {"lr": 1e-3, "batch_size": 64, "time_sampling": "vp_snr"}
DATA_RECIPES = {"mnist5k": CPU_RECIPE}


def preset(name):
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def _int_tuple(value, flag):
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p]
    else:
        parts = list(value)
    try:
        return tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise UserError(f"{flag} takes comma-separated integers, got {value!r}") from None


def config_from_flags(*, channels, image_size, model_channels, num_res_blocks, attn_resolutions,
                      channel_mult, dropout=0.0, num_classes=None):
    """Map the official ``train.py`` / ``generate.py`` flags onto a ``UNetConfig``.

    ``attn_resolutions`` and ``channel_mult`` may be "4,2"-style strings or
    sequences; ``num_classes`` of None or 0 means unconditional.
    """
    mult = _int_tuple(channel_mult, "--channel_mult")
    if image_size % 2 ** (len(mult) - 1):
        raise UserError(f"--image_size {image_size} is not divisible by 2^{len(mult) - 1}, "
                        f"as --channel_mult {','.join(map(str, mult))} needs")
    attn = _int_tuple(attn_resolutions, "--attn_resolutions")
    reached = [2 ** level for level in range(len(mult))]
    unused = [r for r in attn if r not in reached]
    if unused:
        raise UserError(f"--attn_resolutions {','.join(map(str, attn))}: {','.join(map(str, unused))} is no "
                        f"down-sampling rate of --channel_mult {','.join(map(str, mult))} (it reaches "
                        f"{','.join(map(str, reached))}), so no attention would be built there")
    return UNetConfig(image_size=int(image_size), in_channels=int(channels),
                      model_channels=int(model_channels), out_channels=int(channels),
                      num_res_blocks=int(num_res_blocks),
                      attention_resolutions=attn,
                      dropout=float(dropout), channel_mult=mult,
                      num_classes=int(num_classes) if num_classes else None)


def flags_of(config):
    """The official command-line flags that reproduce ``config`` (used in error messages)."""
    return (f"--channels {config.in_channels} --image_size {config.image_size} "
            f"--model_channels {config.model_channels} --num_res_blocks {config.num_res_blocks} "
            f"--attn_resolutions {','.join(map(str, config.attention_resolutions))} "
            f"--channel_mult {','.join(map(str, config.channel_mult))} "
            f"--num_classes {config.num_classes or 0}")
