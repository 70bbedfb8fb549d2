"""Checkpoints: official ``model-*.pth`` / ``ema_model-*.pth`` files and the engine's own format.

Official files are bare state dicts of the score network, possibly behind a
``module.`` prefix (DDP); EMA files hold the same weights under
``ema_model.`` beside bookkeeping entries (``initted``, ``step``, and
sometimes the online weights under ``online_model.``). They record neither
the network configuration nor the dynamics: the configuration is matched
against the presets (or passed in), and their coefficient recipe is
``"official"`` (they were trained with the authors' numerics).

The engine's format is one dict::

    {"format": FORMAT, "version": 1, "config": {...UNetModel kwargs...},
     "dynamics": {"name", "hurst", "num_aug", "gamma_max", "norm"} | None,
     "recipe": "exact" | "official", "state_dict": {...}, "ema_state_dict": {...} | None,
     "step": int | None, "extra": {...}}

written atomically (``io.atomic_save``: a per-process temp name, then a rename), so a crash never leaves
a half-written checkpoint under the final name.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from typing import Mapping

import torch

from gfdm_fast.errors import UserError
from gfdm_fast.io import atomic_save
from gfdm_fast.models.presets import PRESETS, UNetConfig, flags_of
from gfdm_fast.models.unet import UNetModel

FORMAT = "gfdm-fast-checkpoint"
VERSION = 1
DYNAMICS_KEYS = ("name", "hurst", "num_aug", "gamma_max", "norm")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")   # DDP and torch.compile wrappers
_SHOW = 5                                       # keys listed per kind in a mismatch message


@dataclass
class Checkpoint:
    model: UNetModel                  # in eval mode, on map_location
    config: UNetConfig
    dynamics: dict | None             # {name, hurst, num_aug, gamma_max, norm}; None for official files
    recipe: str | None                # coefficient recipe the weights were trained with
    source: str                       # "engine", "official" or "official-ema"
    used_ema: bool                    # whether ``model`` holds EMA weights
    state_dict: dict | None = None    # online weights, when the file has them
    ema_state_dict: dict | None = None
    step: int | None = None
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- state-dict helpers

def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove leading ``module.`` / ``_orig_mod.`` (any nesting) from every key."""
    out = {}
    for k, v in state_dict.items():
        while k.startswith(_WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def _sub_dict(state_dict, prefix):
    """Entries under ``prefix`` (prefix removed) that can be network parameters.

    Network keys always contain a dot (``label_emb.weight``); dot-less leftovers
    such as ``ema_model.initted`` / ``ema_model.step`` are EMA bookkeeping.
    """
    sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return {k: v for k, v in strip_prefixes(sub).items() if "." in k and torch.is_tensor(v)}


def _unwrap_official(obj, path):
    """The tensor dict of an official file (a few common wrappers tolerated)."""
    if isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
        for key in ("state_dict", "model", "ema"):
            if isinstance(obj.get(key), dict):
                return _unwrap_official(obj[key], path)
    if not isinstance(obj, dict) or not any(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f"{path}: not a model checkpoint (expected a state dict or a "
                        f"{FORMAT} file, found {type(obj).__name__})")
    return obj


def shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


@functools.lru_cache(maxsize=None)
def _preset_shapes(name):
    with torch.device("meta"):   # no memory, no init: only the key/shape layout
        net = UNetModel(**PRESETS[name].to_kwargs())
    return shapes(net.state_dict())


def infer_flags(state_dict: Mapping[str, torch.Tensor]) -> dict | None:
    """Read the official flags off tensor shapes; None when the layout is not recognised.

    Assumes the official defaults for what leaves no trace in the weights
    (``num_heads=1``, conv resampling, no ``resblock_updown``); ``image_size`` and
    ``dropout`` cannot be read off the weights at all.
    """
    sd = state_dict
    try:
        model_channels = sd["time_embed.0.weight"].shape[1]
        in_channels = sd["input_blocks.0.0.weight"].shape[1]
        out_channels = sd["out.2.weight"].shape[0]
    except (KeyError, IndexError):
        return None
    num_classes = sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else None
    levels, blocks, attn, ds, i = [], 0, set(), 1, 1    # res blocks per level, attention rates
    while f"input_blocks.{i}.0.op.weight" in sd or f"input_blocks.{i}.0.in_layers.2.weight" in sd:
        if f"input_blocks.{i}.0.op.weight" in sd:         # a down-sampling step closes a level
            levels.append(blocks)
            blocks, ds = 0, ds * 2
        else:
            blocks += 1
            if f"input_blocks.{i}.1.qkv.weight" in sd:
                attn.add(ds)
        i += 1
    levels.append(blocks)
    if len(set(levels)) != 1 or levels[0] == 0:
        return None
    num_res_blocks = levels[0]
    channel_mult = []
    for level in range(len(levels)):
        first = 1 + level * (num_res_blocks + 1)          # first res block of the level
        ch = sd[f"input_blocks.{first}.0.in_layers.2.weight"].shape[0]
        if ch % model_channels:
            return None
        channel_mult.append(ch // model_channels)
    return dict(channels=in_channels, out_channels=out_channels, model_channels=model_channels,
                num_res_blocks=num_res_blocks, attn_resolutions=tuple(sorted(attn, reverse=True)),
                channel_mult=tuple(channel_mult), num_classes=num_classes,
                use_scale_shift_norm=("input_blocks.1.0.emb_layers.1.weight" in sd and
                                      sd["input_blocks.1.0.emb_layers.1.weight"].shape[0]
                                      == 2 * channel_mult[0] * model_channels))


def _fit_hint(state_dict):
    """One sentence naming the preset or the flags that would fit ``state_dict``."""
    have = shapes(state_dict)
    for name in PRESETS:
        if _preset_shapes(name) == have:
            return f"It fits the '{name}' preset ({flags_of(PRESETS[name])})."
    flags = infer_flags(state_dict)
    if flags is None:
        return ("It does not look like a state dict of the official score network "
                f"(first keys: {', '.join(list(have)[:_SHOW])}).")
    text = (f"It looks like a network built with --channels {flags['channels']} "
            f"--model_channels {flags['model_channels']} --num_res_blocks {flags['num_res_blocks']} "
            f"--attn_resolutions {','.join(map(str, flags['attn_resolutions']))} "
            f"--channel_mult {','.join(map(str, flags['channel_mult']))} "
            f"--num_classes {flags['num_classes'] or 0}")
    if flags["use_scale_shift_norm"]:
        text += " and use_scale_shift_norm=True"
    return text + " (plus your --image_size)."


def check_fit(state_dict: Mapping[str, torch.Tensor], config: UNetConfig, path: str = "checkpoint") -> None:
    """Raise ``UserError`` unless ``state_dict`` has exactly the keys and shapes of ``config``'s network."""
    with torch.device("meta"):
        want = shapes(UNetModel(**config.to_kwargs()).state_dict())
    have = shapes(state_dict)
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    wrong = [k for k in want if k in have and want[k] != have[k]]
    if not (missing or unexpected or wrong):
        return

    def listing(title, keys, fmt=str):
        if not keys:
            return ""
        more = f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
        return f"\n  {title} ({len(keys)}): {', '.join(fmt(k) for k in keys[:_SHOW])}{more}"

    raise UserError(
        f"{path} does not fit the requested network ({flags_of(config)}):"
        + listing("missing keys", missing)
        + listing("unexpected keys", unexpected)
        + listing("shape mismatches", wrong,
                  lambda k: f"{k} checkpoint {list(have[k])} vs network {list(want[k])}")
        + f"\n{_fit_hint(state_dict)}")


def _resolve_config(config):
    if config is None or isinstance(config, UNetConfig):
        return config
    if isinstance(config, str):
        if config not in PRESETS:
            raise UserError(f"unknown model preset {config!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[config]
    if isinstance(config, dict):
        return UNetConfig.from_dict(config)
    raise TypeError(f"config must be a UNetConfig, a preset name or a dict, not {type(config).__name__}")


def _build(config, state_dict, map_location):
    """Network for ``config`` holding ``state_dict`` (checked first), without a random init."""
    with torch.device("meta"):
        model = UNetModel(**config.to_kwargs())
    sd = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        model.to(map_location)
    return model.eval()


# ----------------------------------------------------------------------------- load / save

def _torch_load(path, map_location, weights_only):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as err:
        if weights_only and "weights_only" in str(err):
            raise UserError(f"{path} holds pickled Python objects besides tensors; if you trust "
                            "the file, load it with weights_only=False") from None
        raise UserError(f"{path}: cannot read checkpoint ({type(err).__name__}: {err})") from None


def load(path: str, config: UNetConfig | str | None = None, *, map_location: str | torch.device = "cpu",
         use_ema: bool | None = None, weights_only: bool = True) -> Checkpoint:
    """Load an official or engine checkpoint into a ``UNetModel``.

    ``config``: a ``UNetConfig``, preset name or kwargs dict the weights must
    fit; None takes the file's own (engine format) or the matching preset
    (official files). ``use_ema``: None takes EMA weights when the file has
    them, True demands them, False takes the online weights.
    """
    path = os.fspath(path)
    config = _resolve_config(config)
    obj = _torch_load(path, map_location, weights_only)

    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return _load_engine(obj, path, config, map_location, use_ema)

    raw = _unwrap_official(obj, path)
    ema = _sub_dict(raw, "ema_model.")
    if ema:
        online = _sub_dict(raw, "online_model.") or None
        source = "official-ema"
    else:
        online, source = strip_prefixes({k: v for k, v in raw.items() if torch.is_tensor(v)}), "official"
        ema = None
    chosen, used_ema = _choose(online, ema, use_ema, path)
    if config is None:
        config = _preset_for(chosen, path)
    check_fit(chosen, config, path)
    step = raw.get("step")
    return Checkpoint(model=_build(config, chosen, map_location), config=config, dynamics=None,
                      recipe="official", source=source, used_ema=used_ema, state_dict=online,
                      ema_state_dict=ema, step=int(step) if torch.is_tensor(step) and step.numel() == 1 else None)


def _choose(online, ema, use_ema, path):
    if use_ema is None:
        use_ema = ema is not None
    if use_ema and ema is None:
        raise UserError(f"{path} has no EMA weights; load it with use_ema=False (or pass the "
                        "ema_model-*.pth file)")
    if not use_ema and online is None:
        raise UserError(f"{path} holds only EMA weights; load it with use_ema=True (or pass the "
                        "model-*.pth file)")
    return (ema, True) if use_ema else (online, False)


def _preset_for(state_dict, path):
    have = shapes(state_dict)
    for name, cfg in PRESETS.items():
        if _preset_shapes(name) == have:
            return cfg
    raise UserError(f"{path} matches no preset ({', '.join(PRESETS)}); pass config= "
                    f"(e.g. config_from_flags(...)). {_fit_hint(state_dict)}")


def _load_engine(obj, path, config, map_location, use_ema):
    if obj.get("version", 1) > VERSION:
        raise UserError(f"{path} was written by a newer gfdm-fast (format version "
                        f"{obj['version']} > {VERSION}); upgrade gfdm-fast")
    saved = UNetConfig.from_dict(obj["config"])
    config = config or saved
    chosen, used_ema = _choose(obj.get("state_dict"), obj.get("ema_state_dict"), use_ema, path)
    check_fit(chosen, config, path)
    return Checkpoint(model=_build(config, chosen, map_location), config=config,
                      dynamics=obj.get("dynamics"), recipe=obj.get("recipe"), source="engine",
                      used_ema=used_ema, state_dict=obj.get("state_dict"),
                      ema_state_dict=obj.get("ema_state_dict"), step=obj.get("step"),
                      extra=obj.get("extra") or {})


def _plain_state_dict(model_or_sd):
    if model_or_sd is None:
        return None
    if isinstance(model_or_sd, torch.nn.Module):
        model_or_sd = model_or_sd.state_dict()
    return {k: v.detach().cpu() for k, v in strip_prefixes(model_or_sd).items()}


def _unwrap_module(model):
    while hasattr(model, "_orig_mod") or isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    return model


def dynamics_record(dynamics: object) -> dict | None:
    """{name, hurst, num_aug, gamma_max, norm} from a dict, dataclass or object with those attributes."""
    if dynamics is None:
        return None
    if isinstance(dynamics, dict):
        src = dict(dynamics)
    elif dataclasses.is_dataclass(dynamics):
        src = dataclasses.asdict(dynamics)
    else:
        src = {k: getattr(dynamics, k) for k in (*DYNAMICS_KEYS, "dynamics", "kind")
               if hasattr(dynamics, k)}
    if "name" not in src:
        src["name"] = src.get("dynamics", src.get("kind"))
    missing = [k for k in DYNAMICS_KEYS if src.get(k) is None]
    if missing:
        raise UserError(f"dynamics record lacks {', '.join(missing)} (need {', '.join(DYNAMICS_KEYS)})")
    rec = {k: src[k] for k in DYNAMICS_KEYS}
    return {"name": str(rec["name"]).lower(), "hurst": float(rec["hurst"]), "num_aug": int(rec["num_aug"]),
            "gamma_max": float(rec["gamma_max"]), "norm": bool(rec["norm"])}


def save(path: str, model: torch.nn.Module | Mapping[str, torch.Tensor], config: UNetConfig | None = None, *,
         dynamics: object = None, recipe: str = "exact", ema: object = None, step: int | None = None,
         extra: dict | None = None) -> str:
    """Write the engine format atomically; returns the path.

    ``model`` / ``ema``: modules (DDP / compiled wrappers are unwrapped) or
    state dicts; ``config`` defaults to the model's own constructor arguments.
    """
    path = os.fspath(path)
    if config is None:
        net = _unwrap_module(model) if isinstance(model, torch.nn.Module) else None
        if net is None or not hasattr(net, "config_kwargs"):
            raise UserError("save() needs config= when model is a state dict")
        config = UNetConfig.from_dict(net.config_kwargs)
    config = _resolve_config(config)
    if isinstance(ema, torch.nn.Module):
        ema = _unwrap_module(ema)
        ema = getattr(ema, "ema_model", ema)   # an EMA wrapper holding the averaged network
    obj = {"format": FORMAT, "version": VERSION, "config": config.to_dict(),
           "dynamics": dynamics_record(dynamics), "recipe": recipe,
           "state_dict": _plain_state_dict(_unwrap_module(model) if isinstance(model, torch.nn.Module) else model),
           "ema_state_dict": _plain_state_dict(ema),
           "step": None if step is None else int(step), "extra": dict(extra or {})}
    check_fit(obj["state_dict"], config, path)
    if obj["ema_state_dict"] is not None:
        check_fit(obj["ema_state_dict"], config, path + " (EMA weights)")
    atomic_save(obj, path)
    return path
