"""`gfdm-fast generate`: the official ``generate.py``, drop-in, streaming and multi-process.

Reads ``{output_dir}/{run_id}_{data_name}_H{hurst}_K{num_aug}/model/model-{version}.pth``
(``ema_model-{version}.pth`` with ``--use_ema True``, the default) or ``--checkpoint PATH``
and writes, as the official code does, one
``generated_data/model-{version}/{mode}{steps}/data/data_{stamp}.npy`` ((N, H, W, C)
float32, ``(x + 1) / 2``, not clipped) and one ``label/label_{stamp}.npy`` (float32, as
the official) per run, with exactly ``--n_samples`` entries. ``--out DIR`` writes
resumable uint8 ``.npz`` shards (``arr_0`` + ``labels``) or PNG grids instead;
``--fid-ref STATS.npz`` computes FID on the fly without keeping images.

Sample policy: float outputs are kept as the official writes them; anything
quantised (PNG, uint8 npz, FID input) is clipped to [0, 1] and rounded to
uint8 levels first, so the FID of saved files equals the on-the-fly FID.

Settings come from the flags, else from what the run recorded (``gfdm_run.json``
beside ``model/``, an engine-format checkpoint, the run folder's name), else
the official defaults; a flag that contradicts a recorded value is an error.
Under ``torchrun`` the image indices are sharded across ranks; image i always
uses seed ``seed + i``, so the union equals a single-process run.
"""
import argparse
import contextlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass

import numpy as np

from gfdm_fast.cli import parse_bool
from gfdm_fast.errors import UserError
from gfdm_fast.sampler import PRECISIONS, SOLVERS

# The official generate.py defaults (args.py: args_base + args_gen).
OFFICIAL = dict(output_dir="./runs", run_id="0", version="final", data_name="cifar10", channels=3, image_size=32,
                num_classes=10, conditioning=True, hurst=0.9, num_aug=2, dynamics="fvp", gamma_max=20.0, norm=True,
                model_channels=128, num_res_blocks=4, attn_resolutions="8", channel_mult="1,2,2,2", dropout=0.1,
                use_ema=True, device="check", n_samples=20, batch_size=10, steps=1000, mode="sde")
DYNAMICS_FLAGS = {"name": "dynamics", "hurst": "hurst", "num_aug": "num_aug", "gamma_max": "gamma_max", "norm": "norm"}
CONFIG_FLAGS = {"in_channels": "channels", "image_size": "image_size", "model_channels": "model_channels",
                "num_res_blocks": "num_res_blocks", "attention_resolutions": "attn_resolutions",
                "channel_mult": "channel_mult", "num_classes": "num_classes"}   # dropout: no effect when sampling
RUN_META = "gfdm_run.json"          # written by `gfdm-fast train` beside model/
MANIFEST = "gfdm_generate.json"     # settings of an --out run, checked on resume
_CKPT_NAME = re.compile(r"^(?:ema_)?model-(?P<version>.+)\.pth$")
_SHARD_NAME = re.compile(r"^(samples|grid)_\d+-\d+\.(npz|png)$")
_COPY_ROWS = 4096                   # rows per chunk when assembling the official .npy


def add_arguments(parser):
    o = parser.add_argument_group("official generate.py flags (same meanings and defaults)")
    o.add_argument("--output_dir", default=OFFICIAL["output_dir"], help="folder of the run folders (default ./runs)")
    o.add_argument("--run_id", default=OFFICIAL["run_id"], help="run id of the run folder (default 0)")
    o.add_argument("--version", default=OFFICIAL["version"],
                   help="checkpoint version: model-{version}.pth (default final)")
    o.add_argument("--data_name", default=OFFICIAL["data_name"],
                   help="data set part of the run folder (default cifar10)")
    for flag, typ, what in (("channels", int, "image channels"), ("image_size", int, "image height = width"),
                            ("num_classes", int, "classes of a conditional model"),
                            ("conditioning", parse_bool, "class-conditional network (True/False)"),
                            ("hurst", float, "Hurst index H"), ("num_aug", int, "augmenting processes K"),
                            ("gamma_max", float, "largest MA-fBM speed"),
                            ("norm", parse_bool, "terminal variance normalisation (True/False)"),
                            ("model_channels", int, "UNet width"), ("num_res_blocks", int, "res blocks per level"),
                            ("attn_resolutions", str, "attention down-sampling rates, e.g. 4,2"),
                            ("channel_mult", str, "width multipliers, e.g. 1,2,4"),
                            ("dropout", float, "dropout (no effect when sampling)")):
        o.add_argument(f"--{flag}", type=typ, default=None,
                       help=f"{what} (default: the run's record, else {OFFICIAL[flag]})")
    o.add_argument("--dynamics", choices=("fvp", "fve"), default=None,
                   help="forward dynamics (default: the run's record, else fvp)")
    o.add_argument("--use_ema", type=parse_bool, default=None,
                   help="sample the EMA weights, ema_model-{version}.pth (default True)")
    o.add_argument("--device", default=OFFICIAL["device"],
                   help="check (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps (default check)")
    o.add_argument("--n_samples", type=int, default=OFFICIAL["n_samples"], help="number of images (default 20)")
    o.add_argument("--batch_size", type=int, default=OFFICIAL["batch_size"], help="images per batch and process (default 10)")
    o.add_argument("--steps", type=int, default=OFFICIAL["steps"], help="sampling steps = NFE (default 1000)")
    o.add_argument("--mode", choices=("sde", "ode"), default=OFFICIAL["mode"], help="sde or ode (default sde)")
    for flag in ("wb_key", "wb_project", "wb_id", "name", "data_dir", "model_name", "dir_num", "wb_version", "pth",
                 "test_batch_size", "show_samples", "log_samples"):
        o.add_argument(f"--{flag}", default=None, help=argparse.SUPPRESS)  # accepted, no effect (wandb etc.)

    e = parser.add_argument_group("gfdm-fast options")
    e.add_argument("--checkpoint", metavar="PATH", default=None,
                   help="sample this checkpoint instead of the run folder's (official or engine format)")
    e.add_argument("--recipe", choices=("exact", "official"), default=None,
                   help="coefficient recipe (default: the run's record; official for official runs)")
    e.add_argument("--seed", type=int, default=0, help="image i uses seed SEED + i (default 0)")
    e.add_argument("--backend", default="auto", help="fused-step backend: auto, torch, cpp, cuda, triton")
    e.add_argument("--solver", choices=SOLVERS, default="em", help="sampler (default em)")
    # -- exp solver knobs (issue 13); None = the measured default of gfdm_fast.expint.solver_options --
    from gfdm_fast.expint import GRIDS
    e.add_argument("--order", type=int, choices=(1, 2, 3), default=None, help="--solver exp: interpolation order")
    e.add_argument("--grid", choices=GRIDS, default=None, help="--solver exp: time grid")
    e.add_argument("--rho", type=float, default=None, help="--solver exp --grid power: t uniform in t^(1/rho)")
    e.add_argument("--corrector", type=parse_bool, nargs="?", const=True, default=None,
                   help="--solver exp: UniPC-style corrector (no extra network call)")
    e.add_argument("--lower-final", dest="lower_final", type=parse_bool, nargs="?", const=True, default=None,
                   help="--solver exp: lower order on the last steps")
    e.add_argument("--sigma-data", dest="sigma_data", type=float, default=None,
                   help="--solver exp: data std of the Gaussian part of the denoiser integrated exactly (0: off)")
    # -- end exp solver knobs --
    e.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="network precision; the state stays float32 (default fp32)")
    e.add_argument("--compile", type=parse_bool, nargs="?", const=True, default=False, help="torch.compile the network")
    e.add_argument("--cuda-graphs", dest="cuda_graphs", type=parse_bool, nargs="?", const=True, default=False,
                   help="capture each step in a CUDA graph")
    e.add_argument("--out", metavar="DIR", default=None,
                   help="write resumable uint8 .npz shards (or --png grids) to DIR instead of the official .npy")
    e.add_argument("--png", action="store_true", help="with --out: PNG grids instead of .npz shards")
    e.add_argument("--shard-size", dest="shard_size", type=int, default=1000,
                   help="images per --out shard (default 1000)")
    e.add_argument("--max-shards", dest="max_shards", type=int, default=None,
                   help="write at most N new shards per process, then stop (rerun to continue)")
    e.add_argument("--fid-ref", dest="fid_ref", metavar="STATS.npz", default=None,
                   help="print the FID against these pytorch-fid statistics, computed on the fly")
    e.add_argument("--inception-weights", dest="inception_weights", metavar="FILE", default=None,
                   help="pytorch-fid's FID Inception weights file, for offline use")
    e.add_argument("--progress", type=parse_bool, default=True, help="show a progress bar (default True)")


# ----------------------------------------------------------------------------- the run's records

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


def _read_meta(run_dir):
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


def _locate(args):
    """The checkpoint file and the run's records, or one message listing what exists."""
    from gfdm_fast import checkpoint
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
        hurst = args.hurst if args.hurst is not None else OFFICIAL["hurst"]
        num_aug = args.num_aug if args.num_aug is not None else OFFICIAL["num_aug"]
        name = f"{_run_id(args.run_id)}_{args.data_name}_H{float(hurst)}_K{int(num_aug)}"
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
    hints = checkpoint.run_hints(path)
    if hints:
        records.append((f"run folder {os.path.basename(run_dir)}",
                        {"hurst": hints["hurst"], "num_aug": hints["num_aug"]}))
    meta = _read_meta(run_dir)
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


def _resolve_dynamics(args, src):
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


def _resolve_config(args, src):
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


def _device(name, local_rank):
    import torch
    if name == "check":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: expected check, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda, but no CUDA device is available; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


# ----------------------------------------------------------------------------- processes

class Dist:
    """Rank, world size and the few collectives generate needs (no-ops in one process)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", str(self.rank)))
        self.owned = False

    def init(self, device):
        import torch.distributed as tdist
        if self.world == 1 or tdist.is_initialized():
            return
        if device.type == "cuda":
            import torch
            torch.cuda.set_device(device)
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.owned = True

    def close(self):
        if self.owned:
            import torch.distributed as tdist
            tdist.destroy_process_group()
            self.owned = False

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        import torch.distributed as tdist
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.world > 1:
            import torch.distributed as tdist
            tdist.barrier()

    def all_ok(self, ok):
        """True on every rank iff ``ok`` on every rank (so no rank waits for one that failed)."""
        if self.world == 1:
            return ok
        import torch
        import torch.distributed as tdist
        flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
        if tdist.get_backend() == "nccl":
            flag = flag.cuda()
        tdist.all_reduce(flag)
        return int(flag.item()) == 0


# ----------------------------------------------------------------------------- sinks

def to_uint8(images):
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8: (x + 1) / 2 clipped to [0, 1], rounded to 255 levels."""
    import torch
    u = ((images.float() + 1) / 2).clamp(0, 1).mul(255).add(0.5).floor()
    return u.to("cpu", torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _check_folder_path(path, what):
    """Raise unless ``path`` is (or can become) a folder: no part of it may be a file."""
    p = os.path.abspath(path)
    while True:
        if os.path.exists(p) and not os.path.isdir(p):
            raise UserError(f"{what} {path}: {p} is a file, not a folder; move it or choose another path")
        parent = os.path.dirname(p)
        if parent == p:
            return
        p = parent


def _makedirs(path):
    """``os.makedirs`` that returns the folders it created (deepest last), for cleanup on failure."""
    created, p = [], os.path.abspath(path)
    while not os.path.isdir(p):
        created.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, exist_ok=True)
    return created[::-1]


def _remove_empty(folders):
    for d in reversed(folders):
        with contextlib.suppress(OSError):
            os.rmdir(d)


def _atomic_write(path, write):
    """``write(file_object)`` to a temp name beside ``path``, then ``os.replace``: never half a file."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:   # open(), unlike mkstemp, honours the umask
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


class OfficialSink:
    """The official ``data/data_{stamp}.npy`` + ``label/label_{stamp}.npy``, streamed through memmaps.

    Each rank fills a part file (its index block) in a temp folder; rank 0 then
    copies the parts, in chunks, into the final file under a temp name and
    renames it: no rank holds more than a batch, and no half-written file
    appears under the final name.
    """

    def __init__(self, save_dir, n, shape, dist, indices):
        self.save_dir, self.n, self.dist = save_dir, n, dist
        self.C, self.H, self.W = shape
        self.indices = list(indices)
        self.created = []
        if dist.rank == 0:
            self.created = _makedirs(save_dir)
            stamp = self._new_stamp()
        else:
            stamp = None
        self.stamp = dist.broadcast(stamp)
        self.tmp_dir = os.path.join(save_dir, f".tmp-{self.stamp}")
        if dist.rank == 0:
            os.makedirs(self.tmp_dir, exist_ok=True)
        dist.barrier()
        m = len(self.indices)   # a contiguous block (sampler.shard); empty when n < world
        if m:
            self.data = np.lib.format.open_memmap(self._part("data"), mode="w+", dtype=np.float32,
                                                  shape=(m, self.H, self.W, self.C))
            self.labels = np.lib.format.open_memmap(self._part("label"), mode="w+", dtype=np.float32, shape=(m,))
        self.first = self.indices[0] if m else 0

    def _new_stamp(self):
        import random
        rng = random.SystemRandom()
        while True:   # the official: six random digits; never overwrite an earlier run
            stamp = "".join(rng.choice("0123456789") for _ in range(6))
            if not any(os.path.exists(os.path.join(self.save_dir, d, f"{d}_{stamp}.npy")) for d in ("data", "label")):
                return stamp

    def _part(self, kind):
        return os.path.join(self.tmp_dir, f"{kind}_rank{self.dist.rank}.npy")

    def add(self, chunk, images, labels):
        rows = slice(chunk[0] - self.first, chunk[-1] - self.first + 1)
        self.data[rows] = ((images.float() + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        self.labels[rows] = labels.cpu().numpy().astype(np.float32)

    def finish(self):
        if self.indices:
            self.data.flush(), self.labels.flush()
            del self.data, self.labels
        self.dist.barrier()
        paths = []
        if self.dist.rank == 0:
            for kind, shape in (("data", (self.n, self.H, self.W, self.C)), ("label", (self.n,))):
                folder = os.path.join(self.save_dir, kind)
                self.created += _makedirs(folder)
                final = os.path.join(folder, f"{kind}_{self.stamp}.npy")
                tmp = os.path.join(folder, f".{kind}_{self.stamp}.npy.tmp")
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
                row = 0
                for r in range(self.dist.world):
                    part_path = os.path.join(self.tmp_dir, f"{kind}_rank{r}.npy")
                    if not os.path.exists(part_path):   # a rank without images
                        continue
                    part = np.load(part_path, mmap_mode="r")
                    for j in range(0, len(part), _COPY_ROWS):
                        block = part[j:j + _COPY_ROWS]
                        out[row:row + len(block)] = block
                        row += len(block)
                    del part
                if row != self.n:
                    raise RuntimeError(f"assembled {row} of {self.n} samples")
                out.flush()
                del out
                os.replace(tmp, final)
                paths.append(final)
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.dist.barrier()
        self.created = []
        return paths

    def abort(self):
        for name in ("data", "labels"):
            if hasattr(self, name):
                delattr(self, name)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        for kind in ("data", "label"):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(self.save_dir, kind, f".{kind}_{self.stamp}.npy.tmp"))
        _remove_empty(self.created)


class ShardSink:
    """``--out DIR``: uint8 shards ``samples_{start:06d}-{end:06d}.npz`` (or ``grid_*.png``) by global index.

    Shard k holds images [k S, min((k+1) S, N)); files are written atomically, so
    the files present are exactly the finished shards and a rerun does the rest.
    """

    def __init__(self, out, n, shard_size, png, manifest, dist, max_shards=None, need_all=False):
        self.out, self.n, self.size, self.png, self.dist = out, n, shard_size, png, dist
        self.created = []
        self.count = math.ceil(n / shard_size)
        found = None
        if dist.rank == 0:   # one rank decides; every rank learns the outcome (no rank left waiting)
            try:
                self.created = _makedirs(out)
                pending = [k for k in range(self.count) if not os.path.exists(self.path(k))]
                if need_all and len(pending) < self.count:
                    raise UserError(f"--fid-ref needs every image, but --out {out} already holds finished shards; "
                                    "compute the FID of the finished run with `gfdm-fast fid`, or use an empty --out")
                self._check_manifest(manifest)
                for name in os.listdir(out):   # temp files of a killed run
                    if name.startswith((".samples_", ".grid_")) and name.endswith(".tmp"):
                        os.remove(os.path.join(out, name))
                found = ("ok", pending)
            except UserError as err:
                _remove_empty(self.created)
                found = ("error", str(err))
        kind, value = dist.broadcast(found)
        if kind == "error":
            raise UserError(value)
        from gfdm_fast.sampler import shard
        mine = [value[i] for i in shard(len(value), dist.rank, dist.world)] if value else []
        if max_shards is not None:
            mine = mine[:max_shards]
        self.pending, self.mine = value, mine
        self.buffers = {}   # shard id -> [uint8 images, labels, filled]

    def _check_manifest(self, manifest):
        path = os.path.join(self.out, MANIFEST)
        if os.path.exists(path):
            try:
                with open(path) as f:
                    old = json.load(f)
            except (OSError, ValueError):
                old = None
            if old != manifest:
                diff = [k for k in manifest if not isinstance(old, dict) or old.get(k) != manifest[k]]
                raise UserError(f"--out {self.out} holds another run (it differs in {', '.join(diff) or 'format'}); "
                                "choose another --out folder, or empty this one to start over")
        else:
            strays = [n for n in os.listdir(self.out) if _SHARD_NAME.match(n)]
            if strays:
                raise UserError(f"--out {self.out} holds shards ({strays[0]}, ...) but no {MANIFEST} to say which "
                                "run wrote them; choose another --out folder or empty this one")
            _atomic_write(path, lambda f: f.write(json.dumps(manifest, indent=1, sort_keys=True).encode()))

    def path(self, k):
        start, end = k * self.size, min((k + 1) * self.size, self.n)
        return os.path.join(self.out, f"grid_{start:06d}-{end:06d}.png" if self.png
                            else f"samples_{start:06d}-{end:06d}.npz")

    def indices(self):
        return [i for k in self.mine for i in range(k * self.size, min((k + 1) * self.size, self.n))]

    def add(self, chunk, images, labels):
        u8, y = to_uint8(images), labels.cpu().numpy().astype(np.int64)
        for j, i in enumerate(chunk):
            k = i // self.size
            if k not in self.buffers:
                m = min((k + 1) * self.size, self.n) - k * self.size
                self.buffers[k] = [np.empty((m, *u8.shape[1:]), np.uint8), np.empty(m, np.int64), 0]
            buf = self.buffers[k]
            buf[0][i - k * self.size], buf[1][i - k * self.size] = u8[j], y[j]
            buf[2] += 1
            if buf[2] == len(buf[1]):
                self._write(k, buf[0], buf[1])
                del self.buffers[k]

    def _write(self, k, images, labels):
        if self.png:
            from PIL import Image
            grid = _grid(images)
            _atomic_write(self.path(k), lambda f: Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
                          .save(f, format="PNG"))
        else:
            _atomic_write(self.path(k), lambda f: np.savez(f, arr_0=images, labels=labels))

    def finish(self):
        self.dist.barrier()
        self.created = []
        return sum(os.path.exists(self.path(k)) for k in range(self.count))

    def abort(self):
        _remove_empty(self.created)   # only folders this run created and left empty


def _grid(images, pad=2):
    """(N, H, W, C) uint8 -> one (rows, cols) grid image with ``pad`` pixels between tiles."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images[i]
    return grid


class FIDSink:
    """Streaming FID of the quantised samples (what saved files hold) against reference statistics."""

    def __init__(self, ref, inception_weights, device):
        from gfdm_fast.metrics import fid
        self.ref = fid.load_stats(ref)
        dims = int(self.ref[0].shape[0])
        model = fid.load_inception(dims, inception_weights, device)
        self.acc = fid.FIDAccumulator(dims, device, model=model)

    def add(self, chunk, images, labels):
        import torch
        u8 = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2)
        self.acc.update(u8, "samples")

    def finish(self):
        from gfdm_fast.metrics.fid import fid_from_stats
        self.acc.all_reduce()
        return fid_from_stats(*self.acc.stats(), *self.ref)

    def abort(self):
        pass


# ----------------------------------------------------------------------------- the command

def _check_numbers(args):
    if args.n_samples <= 0:
        raise UserError(f"--n_samples must be > 0, got {args.n_samples}")
    if args.batch_size <= 0:
        raise UserError(f"--batch_size must be > 0, got {args.batch_size}")
    if args.steps < 2:
        raise UserError(f"--steps must be >= 2 (the grid linspace(T, eps, steps) needs two points), got {args.steps}")
    if args.shard_size <= 0:
        raise UserError(f"--shard-size must be > 0, got {args.shard_size}")
    if args.max_shards is not None and args.max_shards < 0:
        raise UserError(f"--max-shards must be >= 0, got {args.max_shards}")
    if args.png and not args.out:
        raise UserError("--png writes PNG grids into --out DIR: pass --out too")
    if args.fid_ref and args.max_shards is not None:
        raise UserError("--fid-ref needs every image: drop --max-shards")
    if args.fid_ref and args.n_samples < 2:
        raise UserError(f"--fid-ref needs at least 2 samples, got --n_samples {args.n_samples}")


def run(args):
    import torch

    from gfdm_fast import checkpoint, make_dynamics
    from gfdm_fast.sampler import Sampler, draw_labels, shard

    _check_numbers(args)
    dist = Dist()
    src = _locate(args)
    dyn_rec = _resolve_dynamics(args, src)
    config, label_classes = _resolve_config(args, src)
    recipe = args.recipe or src.recipe or "official"
    device = _device(args.device, dist.local_rank)
    try:
        dyn = make_dynamics(dyn_rec["name"], hurst=dyn_rec["hurst"], num_aug=dyn_rec["num_aug"],
                            gamma_max=dyn_rec["gamma_max"], norm=dyn_rec["norm"], recipe=recipe, T=src.T)
    except ValueError as err:
        raise UserError(f"dynamics: {err}") from None
    ckpt = checkpoint.load(src.path, config, map_location="cpu", use_ema=src.use_ema)
    model = ckpt.model.to(device).eval()
    try:
        sampler = Sampler(dyn, model, steps=args.steps, mode=args.mode, time_weight=src.time_weight,
                          backend=args.backend, solver=args.solver, order=args.order, grid=args.grid, rho=args.rho,
                          corrector=args.corrector, lower_final=args.lower_final, sigma_data=args.sigma_data,
                          device=device, precision=args.precision, compile=args.compile,
                          cuda_graphs=args.cuda_graphs, num_classes=config.num_classes,
                          progress=args.progress and dist.rank == 0)
    except ValueError as err:
        raise UserError(str(err)) from None
    shape = (config.in_channels, config.image_size, config.image_size)
    n = args.n_samples

    save_dir = None
    if args.out:
        _check_folder_path(args.out, "--out")
    elif not args.fid_ref:
        save_dir = os.path.join(src.run_dir, "generated_data", f"model-{src.version}", f"{args.mode}{args.steps}")
        _check_folder_path(save_dir, "output folder")
    fid_sink = FIDSink(args.fid_ref, args.inception_weights, device) if args.fid_ref else None

    dist.init(device)
    if dist.rank == 0:
        print(f"Sampling {n} images {shape} from {src.path} ({'EMA' if ckpt.used_ema else 'online'} weights, "
              f"{dyn!r}, {args.mode}, {args.steps} steps, seed {args.seed}) on {device}"
              + (f" x {dist.world} processes" if dist.world > 1 else ""), flush=True)
    sinks, shards, official = [], None, None
    try:
        if args.out:
            manifest = {"checkpoint": os.path.abspath(src.path), "use_ema": ckpt.used_ema, "recipe": recipe,
                        "dynamics": dyn_rec, "config": config.to_dict(), "seed": args.seed, "steps": args.steps,
                        "mode": args.mode, "solver": args.solver, "precision": args.precision, "n_samples": n,
                        "shard_size": args.shard_size, "format": "png" if args.png else "npz",
                        "exp_solver": getattr(sampler, "solver_options", None)}
            shards = ShardSink(args.out, n, args.shard_size, args.png, manifest, dist, args.max_shards,
                               need_all=fid_sink is not None)
            sinks.append(shards)
            indices = shards.indices()
        else:
            indices = list(shard(n, dist.rank, dist.world))
        if save_dir is not None:
            official = OfficialSink(save_dir, n, shape, dist, indices)
            sinks.append(official)
        if fid_sink is not None:
            sinks.append(fid_sink)
        ok = False
        try:
            for chunk, images, labels in sampler.iter_batches(n, shape, seed=args.seed, batch_size=args.batch_size,
                                                              indices=indices):
                if labels is None:   # the official writes labels for unconditional models too
                    labels = draw_labels(torch.tensor([args.seed + i for i in chunk]), label_classes)
                for s in sinks:
                    s.add(chunk, images, labels)
            ok = True
        finally:   # a rank that failed raises its own error; the others learn of it instead of waiting
            if dist.world > 1 and not dist.all_ok(ok) and ok:
                raise UserError("another process failed; see its message")
        results = {type(s).__name__: s.finish() for s in sinks}
        sinks = []
    finally:
        for s in sinks:
            s.abort()
        dist.close()

    if dist.rank != 0:
        return None
    if official is not None:
        data_path, label_path = results["OfficialSink"]
        print(f"Wrote {n} samples to {data_path} and their labels to {label_path}")
    if shards is not None:
        done = results["ShardSink"]
        more = "" if done == shards.count else "; rerun the same command to continue"
        print(f"{args.out}: {done} of {shards.count} shards ({n} samples) finished{more}")
    if fid_sink is not None:
        print(f"FID: {results['FIDSink']}")
    return None
