"""Throughput per NFE of the whole sampler (docs/design.md): images x NFE / s, and the time of
one sampler step (network + step op) over one bare network forward of the same variant.

Random networks of the presets, reverse sde with K in {0, 2, 3} (FVP, hurst 0.9; 0.5 for K = 0).
Variants (each adds switches to ``fused``; ``all`` turns on every one the device has):

  official     eager fp32 network (legacy attention) + the official-style unfused loop:
               ``reference.sample_em`` with its noise drawn up front, per step ``dyn.marginal_stats``
               (official recipe) and the per-pixel (K+1)x(K+1) solve of ``reference.augmented_score``
  fused        the same eager fp32 network + gfdm_fast.Sampler's fused step
  compiled     fused + torch.compile of the network
  bf16         fused + bf16 autocast of the network (state stays float32)
  cuda_graphs  fused + the whole step captured in a CUDA graph (GPU only)
  all          SDPA + bf16 + compile (+ channels_last and CUDA graphs on a GPU)

Timing: warm-up (compilation, graph capture) first, then pairs of (``steps`` bare forwards, one
sampler run of ``steps`` steps) in alternating order, so a change of machine load hits both; each
clock read follows a device synchronisation; ``step_over_forward`` is the median of the pairs'
ratios, ``images_nfe_per_s`` batch x steps / the median run. On a CPU with one torch thread the
clock is the thread's CPU time (other processes' time slices excluded), else wall time.
``peak_mem_mb``: torch.cuda.max_memory_allocated over the timed part on a GPU; on a
CPU the process's peak resident set size while the row was timed (torch itself included).
"""
import os
import statistics
import threading
import time
from dataclasses import dataclass

import torch

VARIANTS = ("official", "fused", "compiled", "bf16", "cuda_graphs", "all")
ROW_KEYS = ("variant", "preset", "batch", "K", "device", "images_nfe_per_s", "step_over_forward", "peak_mem_mb")
PRESETS = ("mnist", "cifar10")
KS = (0, 2, 3)


@dataclass(frozen=True)
class Switches:
    fused: bool = True            # Sampler's fused step (False: reference.sample_em)
    sdpa: bool = False
    channels_last: bool = False
    compile: bool = False
    precision: str = "fp32"
    cuda_graphs: bool = False


def switches(variant, device):
    """The fast paths of ``variant`` on ``device`` (a torch.device)."""
    gpu = device.type == "cuda"
    return {"official":    Switches(fused=False),
            "fused":       Switches(),
            "compiled":    Switches(compile=True),
            "bf16":        Switches(precision="bf16"),
            "cuda_graphs": Switches(cuda_graphs=True),
            "all":         Switches(sdpa=True, channels_last=gpu, compile=True, precision="bf16", cuda_graphs=gpu),
            }[variant]


@dataclass(frozen=True)
class Sizes:
    batch: int        # images per batch
    steps: int        # sampler steps per timed run
    repeats: int      # timed (forward, run) pairs
    warmup: int       # untimed (forward, run) pairs before them


def default_sizes(device, quick, preset):
    if device.type == "cuda":
        return Sizes(batch=1000, steps=10 if quick else 20,
                     repeats=5 if quick else 10, warmup=2)
    return Sizes(batch=2, steps=2, repeats=3, warmup=1) if quick else Sizes(batch=16, steps=2, repeats=5, warmup=1)


def plan(device, quick, presets=PRESETS, variants=None):
    """(preset, variant) pairs to run and the reasons for the ones skipped."""
    cpu = device.type == "cpu"
    todo, skipped = [], []
    for preset in presets:
        for v in (variants or VARIANTS):
            why = None
            if v == "cuda_graphs" and device.type != "cuda":
                why = "cuda_graphs needs a CUDA device"
            elif cpu and quick and v in ("compiled", "all"):
                why = "a cold inductor compile takes minutes on this CPU (356 s for mnist); run without --quick"
            elif cpu and quick and v == "bf16" and not _cpu_has_native_bf16():
                why = ("this CPU has no native bf16 (emulated: mnist forward 3.5x, cifar10 6x slower than fp32, "
                       "benchmarks/RESULTS_unet.md); too slow for --quick")
            if why:
                skipped.append((preset, v, why))
            else:
                todo.append((preset, v))
    return todo, skipped


def _cpu_has_native_bf16():
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def dynamics_for(K):
    from gfdm_fast import make_dynamics
    return make_dynamics("fvp", hurst=0.9 if K else 0.5, num_aug=K, recipe="official")


def random_network(preset, device, *, sdpa=False, channels_last=False, seed=0):
    """The preset's UNet with random weights, eval mode; the zero-initialised output layers get
    small random weights too, so every layer carries signal as in a trained network."""
    from gfdm_fast.models import build_model, optimize
    torch.manual_seed(seed)
    net = build_model(preset).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, 0.02)
    net = optimize(net.to(device), sdpa=sdpa, channels_last=channels_last)
    return net.requires_grad_(False)


# ---- clocks ----------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_clock_is_thread_time(device):
    """On a CPU with one torch thread every op runs on the calling thread, so its CPU time is the
    clock: immune to the time slices other processes take on a shared machine (wall time otherwise)."""
    return device.type == "cpu" and torch.get_num_threads() == 1


def _timed(fn, device, calls=1):
    clock = time.thread_time if cpu_clock_is_thread_time(device) else time.perf_counter
    sync(device)
    t0 = clock()
    for _ in range(calls):
        fn()
    sync(device)
    return clock() - t0


def interleaved(forward, run, device, *, steps, repeats, warmup, before_run=None):
    """(median seconds of one ``forward()``, median seconds of one ``run()`` of ``steps`` steps,
    median over pairs of run / (``steps`` forwards)): each pair times ``steps`` forwards and one run
    back to back, alternating which goes first, so a change of machine load hits both alike."""
    def timed_run():
        if before_run is not None:
            before_run()
        return _timed(run, device)

    for _ in range(warmup):  # first calls: allocator, autotuning, lazy initialisation
        forward(), timed_run()
    fw, rn, ratio = [], [], []
    for i in range(repeats):
        if i % 2:
            b = timed_run()
            a = _timed(forward, device, steps)
        else:
            a = _timed(forward, device, steps)
            b = timed_run()
        fw.append(a / steps), rn.append(b), ratio.append(b / a)
    return statistics.median(fw), statistics.median(rn), statistics.median(ratio)


def _median_per_call(fn, device, min_time=0.2, repeats=5):
    """Median seconds per call of a cheap ``fn``: groups of calls filling ``min_time`` each."""
    fn()
    group = max(1, int(min_time / max(_timed(fn, device), 1e-7)))
    return statistics.median(_timed(fn, device, group) / group for _ in range(repeats))


def median_seconds(fn, device, *, warmup=3, repeats=5, min_time=0.05):
    """Median seconds per call; a group of calls fills ``min_time`` (CPU) or do_bench decides (GPU)."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100 * repeats // 5 or 25, return_mode="median") * 1e-3
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    per_call = time.perf_counter() - t0
    group = max(1, int(min_time / max(per_call, 1e-9)))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(group):
            fn()
        times.append((time.perf_counter() - t0) / group)
    return statistics.median(times)


def copy_bandwidth(device, numel, repeats=9):
    """Bytes/s of a float32 copy of ``numel`` elements on ``device``, counting the read and the write: the
    memory floor of the fused step benchmarks."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return 2 * 4 * numel / median_seconds(lambda: dst.copy_(src), device, warmup=2, repeats=repeats)


class PeakMemory:
    """Peak memory over a ``with`` block in MB: CUDA allocator peak, or process RSS sampled every 5 ms."""

    def __init__(self, device):
        self.device, self.mb = device, None

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            self._stop.wait(0.005)

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._peak, self._stop = self._rss(), threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        else:
            self._stop.set()
            self._thread.join()
            self.mb = max(self._peak, self._rss()) / 2 ** 20
        return False


# ---- one row ---------------------------------------------------------------------------------------
class Network:
    """The network of one (preset, variant), built (and compiled) once and shared by every K."""

    def __init__(self, preset, variant, device):
        from gfdm_fast.models import PRESETS as CONFIGS
        from gfdm_fast.models import compile_model
        self.preset, self.variant, self.device = preset, variant, device
        self.sw = switches(variant, device)
        self.config = CONFIGS[preset]
        self.net = random_network(preset, device, sdpa=self.sw.sdpa, channels_last=self.sw.channels_last)
        self.fn = compile_model(self.net) if self.sw.compile else self.net

    @property
    def image_shape(self):
        c = self.config
        return (c.in_channels, c.image_size, c.image_size)


def measure(network: Network, K, sizes: Sizes, details=None):
    """One row: ``{variant, preset, batch, K, device, images_nfe_per_s, step_over_forward, peak_mem_mb}``.

    ``details`` (a list) receives the medians behind it plus ``overhead_s``: one step with a zero-cost
    network (a fixed output tensor), i.e. the step's own work, timed over many calls. ``1 + overhead_s /
    forward_s`` is a second reading of step_over_forward that the load noise of a forward does not swamp.
    """
    from gfdm_fast import Sampler, ops
    from gfdm_fast import reference as ref
    from gfdm_fast.models import autocast
    from gfdm_fast.models.fast import capture_cuda_graph

    device, sw, B, S = network.device, network.sw, sizes.batch, sizes.steps
    C, H, W = network.image_shape
    dyn = dynamics_for(K)
    gen = torch.Generator().manual_seed(K)
    labels = torch.randint(0, network.config.num_classes or 1, (B,), generator=gen).to(device)
    if not network.config.num_classes:
        labels = None
    x = torch.randn(B, C, H, W, generator=gen).to(device)
    s = torch.full((B,), 999.0 * 0.5, device=device)

    e_fixed = 0.1 * torch.randn(B, C, H, W, generator=gen).to(device)

    def zero_cost(x_, s_, y_):
        return e_fixed

    with torch.no_grad():
        if not sw.fused:
            shape = (B, C, H, W) if K == 0 else (B, C, H, W, K + 1)
            z_T = torch.randn(*shape, generator=gen).to(device)

            def run(model=network.fn):  # the official run: all noise drawn up front, then the unfused loop
                noise = torch.randn(B, S + 1, C, H, W, device=device)
                ref.sample_em(model, dyn, z_T, noise, steps=S, mode="sde", labels=labels)

            def overhead():
                run(zero_cost)

            def forward():
                network.fn(x, s, labels)
            before_run = None
        else:
            sampler = Sampler(dyn, network.fn, steps=S, mode="sde", device=device, precision=sw.precision,
                              cuda_graphs=sw.cuda_graphs, channels_last=sw.channels_last)
            seeds = torch.arange(B, dtype=torch.int64, device=device)
            z0 = torch.empty(K + 1, B, C, H, W, device=device)
            x0 = torch.empty(B, C, H, W, device=device)
            ops.prior_draw(z0, x0, sampler.table, seeds, backend=sampler.backend)
            z, x_in = z0.clone(), x0.clone()

            def before_run():  # every timed run starts from the prior draw, outside the clock
                z.copy_(z0), x_in.copy_(x0)

            def run():
                sampler.run(z, x_in, labels, seeds)

            bare = Sampler(dyn, zero_cost, steps=S, mode="sde", device=device, precision=sw.precision,
                           cuda_graphs=sw.cuda_graphs, channels_last=sw.channels_last)
            zb, xb = z0.clone(), x0.clone()

            def overhead():
                zb.copy_(z0), xb.copy_(x0)
                bare.run(zb, xb, labels, seeds)

            x_fwd = x.contiguous(memory_format=torch.channels_last) if sw.channels_last else x

            def forward():
                with autocast(device.type, sw.precision):
                    network.fn(x_fwd, s, labels)
            if sw.cuda_graphs:
                forward = capture_cuda_graph(forward).replay
        with PeakMemory(device) as mem:
            fwd_s, run_s, ratio = interleaved(forward, run, device, steps=S, repeats=sizes.repeats,
                                              warmup=sizes.warmup, before_run=before_run)
        overhead_s = _median_per_call(overhead, device) / S
    if details is not None:
        details.append({"variant": network.variant, "preset": network.preset, "K": K, "forward_s": fwd_s,
                        "step_s": run_s / S, "overhead_s": overhead_s})
    return {"variant": network.variant, "preset": network.preset, "batch": B, "K": K, "device": device.type,
            "images_nfe_per_s": round(B * S / run_s, 4), "step_over_forward": round(ratio, 4),
            "peak_mem_mb": round(mem.mb, 1)}


def run_benchmark(device="cpu", *, quick=True, presets=PRESETS, variants=None, ks=KS, batch=None, steps=None,
                  repeats=None, log=print, details=None):
    """Every row of the plan for ``device``; ``batch``/``steps``/``repeats`` override the default sizes.
    ``official`` rows run at ``batch`` too (gpu_check.sh runs them separately at a smaller batch)."""
    device = torch.device(device)
    todo, skipped = plan(device, quick, presets, variants)
    for preset, v, why in skipped:
        log(f"skip {v:11s} {preset:8s}: {why}")
    rows = []
    for preset, v in todo:
        sizes = default_sizes(device, quick, preset)
        sizes = Sizes(batch=batch or sizes.batch, steps=steps or sizes.steps, repeats=repeats or sizes.repeats,
                      warmup=sizes.warmup)
        network = Network(preset, v, device)
        for K in ks:
            t0 = time.perf_counter()
            row = measure(network, K, sizes, details)
            rows.append(row)
            log(f"  {v:11s} {preset:8s} K={K} batch {row['batch']:5d}: {row['images_nfe_per_s']:12.3f} img*NFE/s, "
                f"step/forward {row['step_over_forward']:.4f} ({time.perf_counter() - t0:.0f} s)")
        del network
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def describe(device):
    import platform
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def format_table(rows, details=None):
    """The rows as a text table, with each row's speed-up over ``official`` at the same (preset, K);
    with ``details`` (from run_benchmark) also the forward, the step's own work and 1 + op / forward."""
    base = {(r["preset"], r["K"]): r["images_nfe_per_s"] for r in rows if r["variant"] == "official"}
    more = {(d["variant"], d["preset"], d["K"]): d for d in (details or [])}
    out = [f"{'variant':11s} {'preset':8s} {'K':>2s} {'batch':>6s} {'device':>6s} {'img*NFE/s':>12s} "
           f"{'step/fwd':>9s} {'peak MB':>9s} {'x official':>10s}"
           + (f" {'fwd ms':>9s} {'op ms':>9s} {'1+op/fwd':>9s}" if details else "")]
    for r in rows:
        b = base.get((r["preset"], r["K"]))
        speed = f"{r['images_nfe_per_s'] / b:10.2f}" if b else f"{'':>10s}"
        line = (f"{r['variant']:11s} {r['preset']:8s} {r['K']:2d} {r['batch']:6d} {r['device']:>6s} "
                f"{r['images_nfe_per_s']:12.3f} {r['step_over_forward']:9.4f} {r['peak_mem_mb']:9.1f} {speed}")
        d = more.get((r["variant"], r["preset"], r["K"]))
        if d:
            line += (f" {d['forward_s'] * 1e3:9.2f} {d['overhead_s'] * 1e3:9.4f} "
                     f"{1 + d['overhead_s'] / d['forward_s']:9.5f}")
        out.append(line)
    return "\n".join(out)


# ---- plot (PIL: no plotting dependency) -------------------------------------------------------------
_COLOURS = {"official": (120, 120, 120), "fused": (31, 119, 180), "compiled": (255, 127, 14),
            "bf16": (44, 160, 44), "cuda_graphs": (148, 103, 189), "all": (214, 39, 40)}


def plot_bars(rows, path, title="images x NFE / s per variant"):
    """Grouped bar chart: one panel per preset (its own linear scale), a group per K, a bar per variant."""
    from PIL import Image, ImageDraw, ImageFont
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    pw, ph, pad = 560, 360, 60
    img = Image.new("RGB", (pw * max(1, len(presets)), ph + 90), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), title + f" ({rows[0]['device'] if rows else ''})", fill="black", font=font)
    for i, preset in enumerate(presets):
        pr = [r for r in rows if r["preset"] == preset]
        ks = sorted({r["K"] for r in pr})
        top = max(r["images_nfe_per_s"] for r in pr) * 1.15
        x0, y0, y1 = i * pw + pad, 40, ph
        d.line([(x0, y0), (x0, y1), (i * pw + pw - 10, y1)], fill="black")
        for frac in (0.25, 0.5, 0.75, 1.0):
            y = y1 - frac * (y1 - y0)
            d.line([(x0 - 4, y), (x0, y)], fill="black")
            d.text((i * pw + 2, y - 7), f"{frac * top:.3g}", fill="black", font=font)
        group_w = (pw - pad - 20) / max(1, len(ks))
        bar_w = group_w * 0.8 / max(1, len(variants))
        for g, K in enumerate(ks):
            gx = x0 + g * group_w + group_w * 0.1
            for j, v in enumerate(variants):
                r = next((r for r in pr if r["K"] == K and r["variant"] == v), None)
                if r is None:
                    continue
                h = r["images_nfe_per_s"] / top * (y1 - y0)
                d.rectangle([gx + j * bar_w, y1 - h, gx + (j + 1) * bar_w - 2, y1], fill=_COLOURS[v])
            d.text((gx + group_w * 0.3, y1 + 6), f"K={K}", fill="black", font=font)
        d.text((x0 + 10, y0 - 2), f"{preset}, batch {pr[0]['batch']}", fill="black", font=font)
    lx = 10
    for v in variants:
        d.rectangle([lx, ph + 50, lx + 14, ph + 64], fill=_COLOURS[v])
        d.text((lx + 18, ph + 49), v, fill="black", font=font)
        lx += 30 + 9 * len(v)
    img.save(path)
    return path
