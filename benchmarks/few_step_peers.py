"""Few-step VP sampling on the oracle test bed: gfdm-fast's exponential integrator against k-diffusion and
diffusers on the identical problem.

    python benchmarks/few_step_peers.py [--quick] [--nfe 5 10 15 20 35 50] [--seeds 3] [--images 32]
                                        [--json PATH] [--plot PATH] [--threads N]
    python benchmarks/few_step_peers.py --from-json benchmarks/few_step_peers.json [--plot PATH]

The problem (the VP row of benchmarks/oracle_error.py): VP = FVP with hurst 0.5 and K = 0 (gamma_max 20,
T = 1, eps = 1e-3); per-pixel data from gfdm_fast.oracle.GaussianMixture; every sampler is given the
closed-form optimal network, so what is left is each sampler's own error. All samplers start from the
same prior draw X_T (gfdm-fast's Philox prior for image seeds SEED..SEED+images-1) and stop at the same
end point, t = eps (sigma_min = sigma_c(eps) / c(eps)), with no final denoising step; the score is W1 x 1e3
between the end-point pixels and a 400,000-pixel sample of the data (the Monte-Carlo floor is printed).
NFE is counted per network call.

- k-diffusion works on x / c(t) with sigma = sigma_c / c and a denoiser D(x, sigma) = E[x0 | x]; the
  schedule ends at sigma_min (no zero appended). Schedules tried: karras (rho 7), exponential (uniform
  in log sigma, i.e. gfdm's ``logsnr`` grid), gfdm's ``uniform`` t grid and its ``power`` grid (rho 3),
  the last two as sigma(t).
- diffusers works on x_t with an epsilon model; its training schedule is set from the same dynamics
  (1,000 discrete times from eps to T, alphas_cumprod = c(t)^2), and the epsilon is computed at the
  scheduler's own sigma, so no time conversion error enters. Schedules tried: linspace and trailing
  timestep spacing, karras and exponential sigmas; final sigma = sigma_min where the scheduler has the
  option (DEIS has none: its last call is spent on a zero-length step, as in diffusers).
- gfdm-fast: ``Sampler(solver="exp")`` with its defaults (what ``gfdm-fast generate --solver exp`` does).

Every peer is reported on its best schedule per NFE (the schedule is named), mean over ``--seeds`` seeds.
Checks, printed and stored in the JSON: (1) gfdm-fast's order-1 exp ODE step (no corrector, no Gaussian
part) on a grid equals k-diffusion's Euler (DDIM) on the same sigmas; (2) every sampler at ~1000 NFE
reaches the floor (below its mean + 3 sd over 12 exact draws of the same size; the ones that do not are named).

Needs the optional ``peers`` extra (``pip install -e .[peers]``; k-diffusion pulls in its training
stack: a separate environment, or ``pip install --target DIR --no-deps k-diffusion==0.1.1.post1
torchsde torchdiffeq trampoline`` plus ``diffusers==0.42.1`` and PYTHONPATH=DIR, keeps the main one as it
is). Only k-diffusion's ``sampling`` module is loaded, not its package ``__init__``.
"""
import argparse
import datetime
import importlib.util
import json
import math
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gfdm_fast import Sampler, make_dynamics, ops  # noqa: E402
from gfdm_fast import schedule as S  # noqa: E402
from gfdm_fast.expint import time_grid  # noqa: E402
from gfdm_fast.oracle import GaussianMixture, MixtureOracle, w1  # noqa: E402

EPS = 1e-3
SHAPE = (1, 32, 32)
FULL = dict(nfe=(5, 10, 15, 20, 35, 50), seeds=3, images=32, target=400_000)
QUICK = dict(nfe=(5, 10, 20), seeds=1, images=4, target=100_000)
KDIFF = {  # name: (mode, network calls per step)
    "euler": ("ode", 1), "heun": ("ode", 2), "lms": ("ode", 1), "dpmpp_2m": ("ode", 1),
    "dpmpp_2m_sde": ("sde", 1), "dpmpp_3m_sde": ("sde", 1),
}
DIFFUSERS = {  # name: (mode, scheduler class, config)
    "DPM-Solver++ 2M": ("ode", "DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),
    "SDE-DPM-Solver++ 2M": ("sde", "DPMSolverMultistepScheduler",
                            dict(algorithm_type="sde-dpmsolver++", solver_order=2)),
    "UniPC-2": ("ode", "UniPCMultistepScheduler", dict(solver_order=2)),
    "UniPC-3": ("ode", "UniPCMultistepScheduler", dict(solver_order=3)),
    "DEIS-2": ("ode", "DEISMultistepScheduler", dict(solver_order=2)),
    "DEIS-3": ("ode", "DEISMultistepScheduler", dict(solver_order=3)),
}
TARGETS = {10: 15.0, 20: 6.0}   # issue 13, VP, W1 x 1e3


class MissingPeers(RuntimeError):
    pass


def load_peers():
    """(k-diffusion's sampling module, the diffusers module), or MissingPeers naming the install."""
    try:
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("k_diffusion")
        if "k_diffusion" not in sys.modules:   # a bare package: its __init__ imports wandb, clip, clean-fid...
            pkg = types.ModuleType("k_diffusion")
            pkg.__path__ = list(spec.submodule_search_locations)
            sys.modules["k_diffusion"] = pkg
        import diffusers
        import k_diffusion.sampling as ksampling
    except ImportError as err:
        raise MissingPeers(f"the peer samplers are not installed ({err}); pip install -e '.[peers]' "
                           "(see this script's docstring for a separate --target install)") from err
    return ksampling, diffusers


# ---- the problem ------------------------------------------------------------------------------------
class Problem:
    """VP dynamics, the mixture, the shared prior draws and the W1 target."""

    def __init__(self, images, target_n):
        self.dyn = make_dynamics("fvp", hurst=0.5, num_aug=0)
        self.mix = GaussianMixture()
        self.images = images
        self.target = self.mix.sample(target_n, torch.Generator().manual_seed(0))
        # the Monte-Carlo floor: W1 of exact mixture draws of the same size, its mean and spread over 12 draws
        floors = [w1(self.mix.sample(images * math.prod(SHAPE), torch.Generator().manual_seed(s)), self.target)
                  for s in range(1, 13)]
        self.floor, self.floor_sd = float(np.mean(floors)), float(np.std(floors, ddof=1))
        st = self.dyn.marginal_stats(np.array([self.dyn.T, EPS]))
        (self.c_T, self.c_eps), (self.sig_T, self.sig_eps) = st.mean_scale.tolist(), st.sigma_c.tolist()
        self.sigma_max, self.sigma_min = self.sig_T / self.c_T, self.sig_eps / self.c_eps
        self.prior_vector = torch.tensor(S.prior_vector(self.dyn, self.dyn.T), dtype=torch.float32)

    def sigma_of_t(self, t):
        st = self.dyn.marginal_stats(np.asarray(t, dtype=np.float64))
        return (st.sigma_c / st.mean_scale).numpy()

    def prior(self, seed):
        """X_T of images seed..seed+images-1, as gfdm-fast's sampler draws it (K = 0: the state is X)."""
        z = torch.empty(1, self.images, *SHAPE)
        ops.prior_draw(z, torch.empty(self.images, *SHAPE), self.prior_vector, torch.arange(seed, seed + self.images),
                       backend="torch")
        return z[0]

    def denoise(self, x, sigma):
        """The peers' denoiser D(x, sigma) = E[x0 | x0 + sigma n = x] (the oracle's posterior at c = 1)."""
        return self.mix.posterior_mean(x, 1.0, sigma).to(x.dtype)

    def score(self, x_eps):
        """W1 x 1e3 of end-point samples in the x_t scale (t = eps)."""
        return 1e3 * w1(x_eps, self.target)


# ---- samplers ---------------------------------------------------------------------------------------
def run_gfdm(prob, nfe, mode, seed, **opts):
    """gfdm-fast's sampler (image i uses seed + i: the same prior draw as Problem.prior)."""
    smp = Sampler(prob.dyn, MixtureOracle(prob.dyn, prob.mix), steps=nfe, mode=mode,
                  solver=opts.pop("solver", "exp"), device="cpu", backend="torch", **opts)
    return smp.sample(prob.images, SHAPE, seed=seed, batch_size=prob.images), smp.nfe


def kdiff_sigmas(ks, prob, schedule, steps):
    """steps+1 decreasing sigmas from sigma_max to sigma_min (no zero appended)."""
    if schedule == "karras":
        s = ks.get_sigmas_karras(steps + 1, prob.sigma_min, prob.sigma_max, rho=7.0)[:-1]
    elif schedule == "exponential":
        s = ks.get_sigmas_exponential(steps + 1, prob.sigma_min, prob.sigma_max)[:-1]
    elif schedule == "uniform_t":
        s = torch.tensor(prob.sigma_of_t(time_grid(prob.dyn, steps, eps=EPS, grid="uniform")))
    elif schedule == "power3":
        s = torch.tensor(prob.sigma_of_t(time_grid(prob.dyn, steps, eps=EPS, grid="power", rho=3.0)))
    else:
        raise ValueError(schedule)
    return s.to(torch.float32)


KDIFF_SCHEDULES = ("karras", "exponential", "uniform_t", "power3")


def run_kdiff(ks, prob, name, schedule, nfe, seed):
    mode, per_step = KDIFF[name]
    steps = max(1, nfe // per_step)
    sigmas = kdiff_sigmas(ks, prob, schedule, steps)
    calls = [0]

    def model(x, sigma, **kw):
        calls[0] += 1
        return prob.denoise(x, sigma.reshape(-1)[0].double())

    x = prob.prior(seed) / prob.c_T               # x / c at T
    fn = getattr(ks, f"sample_{name}")
    kw = dict(disable=True)
    if mode == "sde":
        # the tree spans the schedule as float32 sigmas (its own range check is exact)
        kw["noise_sampler"] = ks.BrownianTreeNoiseSampler(x, float(sigmas[-1]), float(sigmas[0]), seed=seed)
    out = fn(model, x, sigmas, **kw)
    return out * prob.c_eps, calls[0]


DIFFUSERS_SCHEDULES = ("linspace", "trailing", "karras", "exponential")


def diffusers_scheduler(diffusers, prob, name, schedule, steps):
    mode, cls_name, cfg = DIFFUSERS[name]
    t = np.linspace(EPS, prob.dyn.T, 1000)
    c = prob.dyn.marginal_stats(t).mean_scale.numpy()
    acp = c * c
    betas = 1.0 - acp / np.concatenate([[1.0], acp[:-1]])
    cls = getattr(diffusers, cls_name)
    extra = dict(cfg)
    if "final_sigmas_type" in cls.__init__.__code__.co_varnames:
        extra["final_sigmas_type"] = "sigma_min"
    if schedule in ("linspace", "trailing"):
        extra["timestep_spacing"] = schedule
    else:
        extra["timestep_spacing"] = "linspace"
        extra[f"use_{schedule}_sigmas"] = True
    sch = cls(num_train_timesteps=1000, trained_betas=betas.tolist(), prediction_type="epsilon", **extra)
    sch.set_timesteps(steps)
    return sch


def run_diffusers(diffusers, prob, name, schedule, nfe, seed):
    sch = diffusers_scheduler(diffusers, prob, name, schedule, nfe)
    x = prob.prior(seed) * sch.init_noise_sigma
    kw = {"generator": torch.Generator().manual_seed(seed)} if DIFFUSERS[name][0] == "sde" else {}
    calls = 0
    for i, t in enumerate(sch.timesteps):
        sigma = float(sch.sigmas[i])
        alpha = 1.0 / math.sqrt(1.0 + sigma * sigma)
        x0 = prob.denoise(x / alpha, torch.tensor(sigma, dtype=torch.float64))
        eps = (x - alpha * x0) / (sigma * alpha)
        calls += 1
        x = sch.step(eps, t, x, return_dict=False, **kw)[0]
    return x, calls


# ---- the benchmark ----------------------------------------------------------------------------------
def check_euler_equals_order1(ks, prob, steps=10):
    """gfdm-fast's order-1 exp ODE step on the uniform t grid == k-diffusion's Euler on the same sigmas."""
    x_g, _ = run_gfdm(prob, steps, "ode", 0, order=1, grid="uniform", corrector=False, sigma_data=0.0)
    x_k, _ = run_kdiff(ks, prob, "euler", "uniform_t", steps, 0)
    return float((x_g - x_k).abs().max())


def run(cfg, log=print):
    ks, diffusers = load_peers()
    # torchsde warns when a float32 sigma sits a rounding error outside its float64 interval
    warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
    prob = Problem(cfg["images"], cfg["target"])
    pixels = prob.images * math.prod(SHAPE)
    log(f"VP oracle problem: {pixels} pixels per run, sigma {prob.sigma_min:.4g}..{prob.sigma_max:.4g}, "
        f"floor W1 x 1e3 = {1e3 * prob.floor:.2f} +- {1e3 * prob.floor_sd:.2f}")
    rows = []

    def add(family, name, mode, schedule, nfe_target, fn):
        vals, nfes = [], []
        for seed in range(cfg["seeds"]):
            x, n = fn(1000 * seed)
            vals.append(prob.score(x))
            nfes.append(n)
        rows.append(dict(family=family, sampler=name, mode=mode, schedule=schedule, nfe_target=nfe_target,
                         nfe=int(np.mean(nfes)), w1e3=float(np.mean(vals)), w1e3_seeds=[round(v, 3) for v in vals]))

    t0 = time.perf_counter()
    for nfe in cfg["nfe"]:
        for mode in ("ode", "sde"):
            add("gfdm-fast", "exp (defaults)", mode, "default", nfe,
                lambda s, m=mode, n=nfe: run_gfdm(prob, n, m, s))
            add("gfdm-fast", "exp order 1 (DDIM)", mode, "uniform", nfe,
                lambda s, m=mode, n=nfe: run_gfdm(prob, n, m, s, order=1, grid="uniform", corrector=False,
                                                  sigma_data=0.0))
        for name, (mode, per_step) in KDIFF.items():
            if nfe < per_step:
                continue
            for sched in KDIFF_SCHEDULES:
                add("k-diffusion", name, mode, sched, nfe,
                    lambda s, n=name, sc=sched, k=nfe: run_kdiff(ks, prob, n, sc, k, s))
        for name, (mode, _, _) in DIFFUSERS.items():
            for sched in DIFFUSERS_SCHEDULES:
                add("diffusers", name, mode, sched, nfe,
                    lambda s, n=name, sc=sched, k=nfe: run_diffusers(diffusers, prob, n, sc, k, s))
        log(f"  NFE {nfe}: done ({time.perf_counter() - t0:.0f} s)")

    checks = {"floor_w1e3": round(1e3 * prob.floor, 3), "floor_sd_w1e3": round(1e3 * prob.floor_sd, 3),
              "gfdm_order1_vs_kdiff_euler_max_abs": check_euler_equals_order1(ks, prob)}
    long = {}
    for name, (mode, per_step) in KDIFF.items():
        x, _ = run_kdiff(ks, prob, name, "exponential", 1000 // per_step * per_step, 0)
        long[f"k-diffusion {name}"] = prob.score(x)
    for name in DIFFUSERS:
        x, _ = run_diffusers(diffusers, prob, name, "trailing", 1000, 0)   # linspace repeats timesteps here
        long[f"diffusers {name}"] = prob.score(x)
    for mode in ("ode", "sde"):
        long[f"gfdm-fast exp {mode}"] = prob.score(run_gfdm(prob, 1000, mode, 0)[0])
        long[f"gfdm-fast em {mode}"] = prob.score(run_gfdm(prob, 1000, mode, 0, solver="em")[0])
    checks["w1e3_at_1000_nfe"] = {k: round(v, 3) for k, v in long.items()}
    reach = 1e3 * (prob.floor + 3 * prob.floor_sd)          # an exact sample lands below this 99.9% of the time
    checks["floor_reached_below"] = round(reach, 3)
    checks["not_reaching_floor"] = sorted(k for k, v in long.items() if v > reach)
    return rows, checks


def best_rows(rows):
    """Per (sampler, mode, NFE): the row of the best schedule."""
    best = {}
    for r in rows:
        key = (r["family"], r["sampler"], r["mode"], r["nfe_target"])
        if key not in best or r["w1e3"] < best[key]["w1e3"]:
            best[key] = r
    return best


def format_table(rows, checks):
    best = best_rows(rows)
    nfes = sorted({r["nfe_target"] for r in rows})
    out = []
    for mode in ("ode", "sde"):
        out.append(f"VP {mode}: W1 x 1e3 (best schedule per NFE in brackets); floor {checks['floor_w1e3']:.2f} "
                   f"+- {checks['floor_sd_w1e3']:.2f}")
        out.append(f"{'sampler':34s} " + " ".join(f"{n:>18d}" for n in nfes))
        names = sorted({(k[0], k[1]) for k in best if k[2] == mode}, key=lambda k: (k[0] != "gfdm-fast", k))
        for fam, name in names:
            cells = []
            for n in nfes:
                r = best.get((fam, name, mode, n))
                cells.append(f"{r['w1e3']:7.2f} ({r['schedule'][:9]:>9s})" if r else f"{'':>18s}")
            out.append(f"{fam + ' ' + name:34s} " + " ".join(cells))
        for n, bound in TARGETS.items():
            if n not in nfes:
                continue
            g = best[("gfdm-fast", "exp (defaults)", mode, n)]["w1e3"]
            peers = [r for k, r in best.items() if k[2] == mode and k[3] == n and k[0] != "gfdm-fast"]
            p = min(peers, key=lambda r: r["w1e3"])
            at_floor = checks["floor_w1e3"] + checks["floor_sd_w1e3"]     # within the floor's own spread
            verdict = ("both at the floor (within its mean + 1 sd)" if max(g, p["w1e3"]) <= at_floor
                       else "below the best peer" if g < p["w1e3"] else "NOT below the best peer")
            out.append(f"  {n} NFE: gfdm-fast defaults {g:.2f} (target <= {bound}) vs best peer {p['w1e3']:.2f} "
                       f"({p['family']} {p['sampler']}, {p['schedule']}): {verdict}")
        out.append("")
    out.append(f"check: gfdm-fast order-1 exp ODE vs k-diffusion Euler on the same sigmas, max |diff| = "
               f"{checks['gfdm_order1_vs_kdiff_euler_max_abs']:.2e}")
    out.append(f"check: at ~1000 NFE, samplers above the floor's mean + 3 sd ({checks['floor_reached_below']:.2f}): "
               f"{', '.join(checks['not_reaching_floor']) or 'none'} "
               f"(max {max(checks['w1e3_at_1000_nfe'].values()):.2f})")
    return "\n".join(out)


SHORT = {"gfdm-fast": "gfdm", "k-diffusion": "k-diff", "diffusers": "diffusers"}


def plot(rows, path, floor=None):
    """W1 x 1e3 against NFE (log-log), the best schedule per sampler, one panel per mode (PIL)."""
    from PIL import Image, ImageDraw
    best = best_rows(rows)
    W, H, pad = 560, 420, 50
    img = Image.new("RGB", (2 * W, H), "white")
    d = ImageDraw.Draw(img)
    nfes = sorted({r["nfe_target"] for r in rows})
    vals = [r["w1e3"] for r in best.values() if r["w1e3"] > 0]
    lo, hi = math.log10(max(min(vals), 1e-2)), math.log10(max(vals))
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (90, 90, 200)]
    for p, mode in enumerate(("ode", "sde")):
        x0 = p * W
        d.text((x0 + pad, 8), f"VP {mode}: W1 x 1e3 against NFE (log-log); grey: Monte-Carlo floor", fill="black")
        d.rectangle([x0 + pad, pad, x0 + W - 10, H - pad], outline="black")

        def xy(n, v, x0=x0):
            fx = (math.log10(n) - math.log10(nfes[0])) / max(1e-9, math.log10(nfes[-1]) - math.log10(nfes[0]))
            fy = (math.log10(max(v, 1e-2)) - lo) / max(1e-9, hi - lo)
            return x0 + pad + fx * (W - pad - 10), H - pad - fy * (H - 2 * pad)

        for n in nfes:
            d.text((xy(n, 10 ** lo)[0] - 6, H - pad + 4), str(n), fill="black")
        for k in range(math.floor(lo), math.ceil(hi) + 1):
            if lo <= k <= hi:
                d.text((x0 + 8, xy(nfes[0], 10 ** k)[1] - 6), f"{10 ** k:g}", fill="black")
        if floor and lo <= math.log10(floor) <= hi:
            d.line([xy(nfes[0], floor), xy(nfes[-1], floor)], fill=(170, 170, 170), width=1)
        names = sorted({(k[0], k[1]) for k in best if k[2] == mode})
        for i, (fam, name) in enumerate(names):
            pts = [xy(n, best[(fam, name, mode, n)]["w1e3"]) for n in nfes if (fam, name, mode, n) in best]
            col = palette[i % len(palette)]
            d.line(pts, fill=col, width=3 if fam == "gfdm-fast" else 1)
            d.text((x0 + W - 210, pad + 4 + 12 * i), f"{SHORT[fam]} {name}"[:32], fill=col)
    img.save(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5/10/20 NFE, 1 seed, 4 images")
    ap.add_argument("--nfe", type=int, nargs="+", default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--images", type=int, default=None, help="32 x 32 images per run (default 32: 32,768 pixels)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="PNG of W1 vs NFE")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--from-json", dest="from_json", type=Path, default=None,
                    help="print the table (and --plot) of a saved run instead of running")
    args = ap.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        print(format_table(saved["rows"], saved["checks"]))
        if args.plot:
            plot(saved["rows"], args.plot, saved["checks"]["floor_w1e3"])
        return 0
    cfg = dict(QUICK if args.quick else FULL)
    for k in ("nfe", "seeds", "images"):
        if getattr(args, k) is not None:
            cfg[k] = tuple(getattr(args, k)) if k == "nfe" else getattr(args, k)
    if min(cfg["nfe"]) < 1 or cfg["seeds"] < 1 or cfg["images"] < 1:
        raise SystemExit("--nfe, --seeds and --images must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        rows, checks = run(cfg)
    except MissingPeers as err:
        print(f"few_step_peers: {err}", file=sys.stderr)
        return 2
    print(format_table(rows, checks))
    if args.json:
        args.json.write_text(json.dumps({"date": datetime.date.today().isoformat(), "config": cfg, "checks": checks,
                                         "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(rows, args.plot, checks["floor_w1e3"])
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
