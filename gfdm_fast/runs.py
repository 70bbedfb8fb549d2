"""The run folder: its name, its record (``gfdm_run.json``), its checkpoints, and folders that two
processes can never share by accident.

* ``run_name(...)``: ``{run_id}_{data_name}_H{hurst}_K{num_aug}``, the official layout;
  ``write_run_record`` / ``read_run_record``: ``gfdm_run.json`` beside ``model/``.
* ``locate(args)``, ``resolve_dynamics``, ``resolve_config``: which checkpoint and settings a
  ``generate`` run uses (flags, else what the run recorded, else the official defaults).

* ``new_run_id()``: the default run id, a time stamp plus a random suffix, so runs started in the same
  second still get distinct folders.
* ``FolderLock``: an advisory lock (``fcntl.flock`` on ``FOLDER/.gfdm.lock``) held for the life of a
  ``train`` or ``generate``; a second process gets one message naming the holder. The kernel drops the
  lock when the holder dies, even by ``kill -9``, so a crashed run never blocks the next one.
* ``clean_stale_temporaries(folder)``: temporary files and folders that a killed run left behind. Only
  called with the folder's lock held, so nothing it removes can belong to a live process.
"""
import datetime
import json
import math
import os
import re
import secrets
import shutil
import socket
import sys
from dataclasses import dataclass

from gfdm_fast.errors import UserError
from gfdm_fast.io import atomic_write_file

LOCK_FILE = ".gfdm.lock"
RUN_META = "gfdm_run.json"          # written by `gfdm-fast train` beside model/
STATE_FILE = "train_state.pt"       # a training run's resumable state
# The official generate.py defaults (args.py: args_base + args_gen).
OFFICIAL = dict(output_dir="./runs", run_id="0", version="final", data_name="cifar10", channels=3, image_size=32,
                num_classes=10, conditioning=True, hurst=0.9, num_aug=2, dynamics="fvp", gamma_max=20.0, norm=True,
                model_channels=128, num_res_blocks=4, attn_resolutions="8", channel_mult="1,2,2,2", dropout=0.1,
                use_ema=True, device="check", n_samples=20, batch_size=10, steps=1000, mode="sde")
DYNAMICS_FLAGS = {"name": "dynamics", "hurst": "hurst", "num_aug": "num_aug", "gamma_max": "gamma_max", "norm": "norm"}
CONFIG_FLAGS = {"in_channels": "channels", "image_size": "image_size", "model_channels": "model_channels",
                "num_res_blocks": "num_res_blocks", "attention_resolutions": "attn_resolutions",
                "channel_mult": "channel_mult", "num_classes": "num_classes"}   # dropout: no effect when sampling
_RUN_NAME = re.compile(r"^(?P<run_id>[^/\\]+?)_(?P<data_name>[^/\\_]+)_H(?P<hurst>[0-9.]+)_K(?P<num_aug>\d+)$")
_CKPT_NAME = re.compile(r"^(?:ema_)?model-(?P<version>.+)\.pth$")


def run_name(run_id, data_name: str, hurst: float, num_aug: int) -> str:
    """The official run-folder name ``{run_id}_{data_name}_H{hurst}_K{num_aug}``."""
    return f"{_run_id(run_id)}_{data_name}_H{float(hurst)}_K{int(num_aug)}"


def run_hints(path: str) -> dict:
    """{run_id, data_name, hurst, num_aug} from an official run folder
    ``runs/{id}_{data}_H{hurst}_K{K}/model/model-*.pth``; {} when the path has no such folder."""
    for part in reversed(os.path.abspath(os.fspath(path)).split(os.sep)):
        m = _RUN_NAME.match(part)
        if m:
            return {"run_id": m["run_id"], "data_name": m["data_name"],
                    "hurst": float(m["hurst"]), "num_aug": int(m["num_aug"])}
    return {}


def write_run_record(run_dir: str, record: dict) -> None:
    atomic_write_file(os.path.join(run_dir, RUN_META), lambda f: f.write(json.dumps(record, indent=2).encode()))


def new_run_id() -> str:
    """``YYYYmmdd-HHMMSS-xxxxxx``: a time stamp and 6 random hex digits (the folder is still created
    exclusively, so even a collision could not make two runs share it)."""
    return f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _holder(path):
    try:
        with open(path) as f:
            h = json.load(f)
        return f"process {h['pid']} on {h['host']} ({h['command']}, since {h['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


class FolderLock:
    """Exclusive advisory lock on ``folder`` (created if missing); use as a context manager or acquire/release."""

    def __init__(self, folder: str, what: str = "gfdm-fast"):
        self.folder, self.what = os.fspath(folder), what
        self.path = os.path.join(self.folder, LOCK_FILE)
        self._fd = None

    def acquire(self) -> "FolderLock":
        import fcntl
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{self.folder} is in use by {_holder(self.path)}; wait for it to finish, "
                            "or choose another folder") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.what,
                "since": f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}", "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def clean_stale_temporaries(folder: str, recursive: bool = True) -> list:
    """Remove ``*.tmp`` files and ``.tmp-*`` folders under ``folder``; returns what was removed.

    Call only while holding ``FolderLock(folder)``: every temporary file there then belongs to a dead run.
    """
    removed = []
    if not os.path.isdir(folder):
        return removed
    for root, dirs, files in os.walk(folder):
        for d in [d for d in dirs if d.startswith(".tmp-")]:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
            removed.append(os.path.join(root, d))
            dirs.remove(d)
        for f in files:
            if f.endswith(".tmp"):
                try:
                    os.remove(os.path.join(root, f))
                    removed.append(os.path.join(root, f))
                except OSError:
                    pass
        if not recursive:
            break
    return removed


# ----------------------------------------------------------------------------- what a generate run reads

@dataclass
class Source:
    """Where the weights come from and what the run recorded about itself."""
    path: str                     # checkpoint file
    use_ema: bool | None          # passed to checkpoint.load (None: what the file holds)
    run_dir: str                  # outputs of the official layout go below it
    version: str
    records: list                 # [(what, {field: value})] for dynamics fields
    config: object | None         # recorded UNetConfig, if any
    config_from: str | None
    recipe: str | None
    T: float = 1.0                # time horizon and network time scale, as the run recorded them
    time_weight: float = 999.0


def _listing(folder, pred=lambda name: True):
    names = sorted(n for n in os.listdir(folder) if pred(n)) if os.path.isdir(folder) else []
    return ", ".join(names) if names else "nothing"


def _run_id(value):
    value = str(value)
    return str(int(value)) if value.isdigit() else value   # the official parses --run_id as an int


def _peek(path):
    """The engine-format record of ``path`` (config, dynamics, recipe), or None for official files."""
    import torch

    from gfdm_fast import checkpoint
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:   # not a zip-format file (or unreadable): checkpoint.load reports it
        return None
    return obj if isinstance(obj, dict) and obj.get("format") == checkpoint.FORMAT else None


def read_run_record(run_dir):
    path = os.path.join(run_dir, RUN_META)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} ({err}); fix or remove it") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not a JSON object; fix or remove it")
    return meta


def _config_of(d):
    from gfdm_fast.models.presets import UNetConfig, config_from_flags
    if "in_channels" in d:
        return UNetConfig.from_dict(d)
    keys = ("channels", "image_size", "model_channels", "num_res_blocks", "attn_resolutions", "channel_mult")
    if all(k in d for k in keys):
        classes = d.get("num_classes") if d.get("conditioning", True) else None
        return config_from_flags(**{k: d[k] for k in keys}, dropout=d.get("dropout", 0.0), num_classes=classes)
    raise UserError(f"model config {d} names neither UNetConfig fields nor the official flags")


def _dyn_fields(rec):
    from gfdm_fast import checkpoint
    try:
        return checkpoint.dynamics_record(rec)
    except UserError:   # a partial record: keep what it has
        src = dict(rec)
        src.setdefault("name", src.get("dynamics"))
        return {k: src[k] for k in checkpoint.DYNAMICS_KEYS if src.get(k) is not None}


def _find_run(args):
    """(hurst, num_aug) of the run folder: the flags; else the one folder that --run_id and --data_name name;
    else the official defaults (so the message lists what exists)."""
    if args.hurst is not None and args.num_aug is not None:
        return args.hurst, args.num_aug
    prefix = f"{_run_id(args.run_id)}_{args.data_name}_H"
    found = []
    for d in sorted(os.listdir(args.output_dir)) if os.path.isdir(args.output_dir) else ():
        m = _RUN_NAME.match(d)
        if (m and d.startswith(prefix) and os.path.isdir(os.path.join(args.output_dir, d))
                and (args.hurst is None or math.isclose(float(m["hurst"]), args.hurst))
                and (args.num_aug is None or int(m["num_aug"]) == args.num_aug)):
            found.append((float(m["hurst"]), int(m["num_aug"]), d))
    if len(found) == 1:
        return found[0][:2]
    if len(found) > 1:
        raise UserError(f"--run_id {args.run_id} --data_name {args.data_name} matches {len(found)} run folders "
                        f"({', '.join(d for *_, d in found)}); pass --hurst and --num_aug")
    return (args.hurst if args.hurst is not None else OFFICIAL["hurst"],
            args.num_aug if args.num_aug is not None else OFFICIAL["num_aug"])


def locate(args):
    """The checkpoint file and the run's records, or one message listing what exists."""
    if args.checkpoint:
        path = os.path.abspath(args.checkpoint)
        if not os.path.isfile(path):
            folder = os.path.dirname(path)
            raise UserError(f"checkpoint {args.checkpoint} not found; "
                            + (f"{folder} holds: {_listing(folder)}" if os.path.isdir(folder)
                               else f"folder {folder} does not exist"))
        folder = os.path.dirname(path)
        run_dir = os.path.dirname(folder) if os.path.basename(folder) == "model" else folder
        m = _CKPT_NAME.match(os.path.basename(path))
        version = m["version"] if m else os.path.splitext(os.path.basename(path))[0]
        use_ema = args.use_ema     # None: take what the file holds
    else:
        hurst, num_aug = _find_run(args)
        name = run_name(args.run_id, args.data_name, hurst, num_aug)
        run_dir = os.path.abspath(os.path.join(args.output_dir, name))
        if not os.path.isdir(args.output_dir):
            raise UserError(f"--output_dir {args.output_dir} does not exist (it should hold the run folders, "
                            f"e.g. {name}); pass the folder your training wrote to")
        if not os.path.isdir(run_dir):
            raise UserError(f"run folder {os.path.join(args.output_dir, name)} not found (from --run_id, "
                            f"--data_name, --hurst, --num_aug); {args.output_dir} holds: "
                            f"{_listing(args.output_dir, lambda n: os.path.isdir(os.path.join(args.output_dir, n)))}")
        model_dir = os.path.join(run_dir, "model")
        version = args.version
        use_ema = OFFICIAL["use_ema"] if args.use_ema is None else args.use_ema
        path = os.path.join(model_dir, f"{'ema_' if use_ema else ''}model-{version}.pth")
        online = os.path.join(model_dir, f"model-{version}.pth")
        if not os.path.isfile(path):
            versions = sorted({m["version"] for n in (os.listdir(model_dir) if os.path.isdir(model_dir) else ())
                               if (m := _CKPT_NAME.match(n))})
            have = (f"versions there: {', '.join(versions)}" if versions
                    else f"{model_dir} holds: {_listing(model_dir)}")
            if use_ema and os.path.isfile(online):
                rec = _peek(online)
                if rec is not None and rec.get("ema_state_dict"):
                    path = online           # an engine checkpoint holds its EMA weights itself
                else:
                    raise UserError(f"{path} not found; the run has {os.path.basename(online)} without EMA "
                                    "weights: pass --use_ema False to sample it")
            else:
                raise UserError(f"{path} not found (--version {version}"
                                f"{', --use_ema True' if use_ema else ''}); {have}")
    records, config, config_from, recipe = [], None, None, None
    hints = run_hints(path)
    if hints:
        records.append((f"run folder {os.path.basename(run_dir)}",
                        {"hurst": hints["hurst"], "num_aug": hints["num_aug"]}))
    meta = read_run_record(run_dir)
    T, time_weight = 1.0, 999.0
    if meta is not None:   # gfdm-fast train: {"model": UNetConfig, "dynamics", "recipe", "time_weight", "seed"}
        where = os.path.join(run_dir, RUN_META)
        if isinstance(meta.get("dynamics"), dict):
            records.append((where, _dyn_fields(meta["dynamics"])))
            T = float(meta["dynamics"].get("T", T))
        net = meta.get("model", meta.get("config"))
        if isinstance(net, dict):
            config, config_from = _config_of(net), where
        recipe = meta.get("recipe") or recipe
        time_weight = float(meta.get("time_weight", time_weight))
    engine = _peek(path)
    if engine is not None:
        if isinstance(engine.get("dynamics"), dict):
            records.append((path, _dyn_fields(engine["dynamics"])))
        if isinstance(engine.get("config"), dict):
            config, config_from = _config_of(engine["config"]), path
        recipe = engine.get("recipe") or recipe
    return Source(path, use_ema, run_dir, version, records, config, config_from, recipe, T, time_weight)


def resolve_dynamics(args, src):
    """{name, hurst, num_aug, gamma_max, norm}: flag, else recorded, else official; contradictions are errors."""
    out = {}
    for field, flag in DYNAMICS_FLAGS.items():
        given = getattr(args, flag)
        recorded = [(what, rec[field]) for what, rec in src.records if field in rec]
        value = given if given is not None else (recorded[0][1] if recorded else OFFICIAL[flag])
        for what, rec_value in recorded:
            same = math.isclose(float(value), float(rec_value), rel_tol=0, abs_tol=1e-9) \
                if field in ("hurst", "gamma_max") else str(value).lower() == str(rec_value).lower()
            if not same:
                raise UserError(f"the checkpoint was trained with {flag} = {rec_value} ({what}) but "
                                f"--{flag} {value} was {'given' if given is not None else 'assumed'}; "
                                f"pass --{flag} {rec_value} or choose the matching checkpoint")
        out[field] = value
    return out


def resolve_config(args, src):
    """The network config: the recorded one with the flags on top; flags that contradict it are errors."""
    from gfdm_fast.models.presets import config_from_flags, flags_of
    rec = src.config
    base = dict(OFFICIAL)
    if rec is not None:
        base.update(channels=rec.in_channels, image_size=rec.image_size, model_channels=rec.model_channels,
                    num_res_blocks=rec.num_res_blocks, attn_resolutions=rec.attention_resolutions,
                    channel_mult=rec.channel_mult, dropout=rec.dropout, num_classes=rec.num_classes or 0,
                    conditioning=rec.num_classes is not None)
    flags = {k: (getattr(args, k) if getattr(args, k) is not None else base[k])
             for k in ("channels", "image_size", "model_channels", "num_res_blocks", "attn_resolutions",
                       "channel_mult", "dropout", "num_classes", "conditioning")}
    if flags["num_classes"] is not None and flags["num_classes"] < 0:
        raise UserError(f"--num_classes must be >= 0, got {flags['num_classes']}")
    cfg = config_from_flags(channels=flags["channels"], image_size=flags["image_size"],
                            model_channels=flags["model_channels"], num_res_blocks=flags["num_res_blocks"],
                            attn_resolutions=flags["attn_resolutions"], channel_mult=flags["channel_mult"],
                            dropout=flags["dropout"],
                            num_classes=flags["num_classes"] if flags["conditioning"] else None)
    if rec is not None:
        diff = [f"--{flag} (checkpoint {getattr(rec, field)}, flags {getattr(cfg, field)})"
                for field, flag in CONFIG_FLAGS.items() if getattr(rec, field) != getattr(cfg, field)]
        if diff:
            raise UserError(f"the flags do not match the network recorded in {src.config_from}: {'; '.join(diff)}. "
                            f"Drop those flags or pass {flags_of(rec)}")
    return cfg, flags["num_classes"] or OFFICIAL["num_classes"]



