"""The exponential integrator end to end through ``Sampler``: the history ring, the UniPC-style corrector
and the convergence order, against an independent float64 twin that keeps every network output in a list
(no ring, no folded corrector) and takes the step coefficients straight from ``expint.step_coefficients``.
"""
import functools

import numpy as np
import pytest
import torch
from test_exp_step import exp_backend_or_skip
from test_ops import CUDA

from gfdm_fast import Sampler, make_dynamics
from gfdm_fast import reference as ref
from gfdm_fast.expint import _step_orders, build_exp_table, step_coefficients, time_grid
from gfdm_fast.layout import exp_offsets
from gfdm_fast.oracle import NARROW_MODES, GaussianMixture, MixtureOracle

SHAPE = (1, 3, 5)


def _twin(dyn, oracle, steps, mode, order, grid, corrector, seeds, noise=None, substeps=16):
    """Predictor-corrector in float64 with explicit state: Zc (corrected) and Zp (what the network sees)."""
    t = time_grid(dyn, steps, grid=grid)
    m = 0.5 if mode == "ode" else 1.0
    st = dyn.marginal_stats(t)
    c, sig, alpha = st.mean_scale.numpy(), st.sigma_c.numpy(), st.alpha.numpy()
    tab = build_exp_table(dyn, steps, mode=mode, order=order, grid=grid, dtype=torch.float64)
    z = torch.empty(dyn.num_aug + 1, len(seeds), *SHAPE, dtype=torch.float64)
    x_in = torch.empty(len(seeds), *SHAPE, dtype=torch.float64)
    ref.prior_planar(z, x_in, tab.prior, seeds)
    zp = zc = z.numpy().reshape(z.shape[0], -1)
    orders = _step_orders(steps, order - 1 if corrector else order, False)
    d, prev = [], None
    for n in range(steps):
        xin = zp[0] - alpha[n] @ zp[1:]
        e = oracle(torch.from_numpy(xin), torch.tensor([999.0 * t[n]])).numpy()
        d.append((xin - sig[n] * e) / c[n])
        if corrector and prev is not None:                 # redo step n-1 through t_n, t_{n-1}, ..
            pc = min(order, n + 1)
            Phi, W, _ = step_coefficients(dyn, t[n - 1], t[n], t[n + 1 - pc:n + 1][::-1], m, substeps=substeps,
                                          predict="x0")
            zc = Phi @ prev + sum(W[:, [j]] * d[n - j][None] for j in range(pc)) + noise_of(noise, n - 1, zc)
        else:
            zc = zp
        prev = zc
        p = orders[n]
        Phi, W, _ = step_coefficients(dyn, t[n], t[n + 1], t[n - p + 1:n + 1][::-1], m, substeps=substeps, predict="x0")
        zp = Phi @ zc + sum(W[:, [j]] * d[n - j][None] for j in range(p)) + noise_of(noise, n, zc)
    return torch.from_numpy(zp[0]).reshape(len(seeds), *SHAPE)


def noise_of(noise, n, like):
    """L_n xi_n of the sde step n (the table's Cholesky factor), or 0 for ode."""
    if noise is None:
        return 0.0
    L, xi = noise
    return L[n] @ xi[n].reshape(xi.shape[1], -1)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton", CUDA])
@pytest.mark.parametrize("order,corrector", [(3, False), (3, True), (2, True)])
def test_sampler_order3_ring_and_corrector_match_list_twin(backend, order, corrector):
    """8 steps: the ring wraps three times; a wrong ring slot or corrector fold moves the result by ~1e-1."""
    device = exp_backend_or_skip(backend)
    dyn = make_dynamics("fvp", hurst=0.8, num_aug=2)
    oracle = MixtureOracle(dyn)
    steps = 8
    smp = Sampler(dyn, oracle, steps=steps, mode="ode", solver="exp", backend=backend, device=device, order=order,
                  grid="logsnr", corrector=corrector, lower_final=False, sigma_data=0.0)
    smp.table = build_exp_table(dyn, steps, mode="ode", order=order, grid="logsnr", corrector=corrector,
                                lower_final=False, sigma_data=0.0, substeps=16, device=device)   # the twin: no split
    x = smp.sample(3, SHAPE, seed=5).cpu().double()
    twin = _twin(dyn, oracle, steps, "ode", order, "logsnr", corrector, torch.arange(5, 8))
    err = (x - twin).abs().max().item()
    assert err < 2e-4 * max(1.0, twin.abs().max().item()), err      # float32 state over 8 steps: measured ~1e-6


def test_sde_corrector_matches_list_twin_with_given_noise():
    dyn = make_dynamics("fve", hurst=0.7, num_aug=2)
    oracle = MixtureOracle(dyn)
    steps, B = 6, 2
    smp = Sampler(dyn, oracle, steps=steps, mode="sde", solver="exp", backend="torch", order=3, grid="logsnr",
                  corrector=True, lower_final=False, sigma_data=0.0)
    smp.table = build_exp_table(dyn, steps, mode="sde", order=3, grid="logsnr", corrector=True, lower_final=False,
                                sigma_data=0.0, substeps=16)                      # the twin has no Gaussian split
    xi = torch.randn(steps, 3, B, *SHAPE, generator=torch.Generator().manual_seed(0))
    z = torch.empty(3, B, *SHAPE)
    x_in = torch.empty(B, *SHAPE)
    seeds = torch.arange(B)
    ref.prior_planar(z, x_in, smp.table.prior, seeds)
    smp.run(z, x_in, seeds=seeds, noise=xi)
    o = exp_offsets(2, 3)[3]                               # L (3 x 3) of K = 2, order 3
    L = smp.table.table[:, o:o + 9].double().reshape(steps, 3, 3).numpy()
    twin = _twin(dyn, oracle, steps, "sde", 3, "logsnr", True, seeds, noise=(L, xi.double().numpy()))
    assert (z[0].double() - twin).abs().max().item() < 2e-4


_BIMODAL = GaussianMixture((0.5, 0.5), (-0.5, 0.5), (0.3, 0.3))


@functools.lru_cache(maxsize=None)
def _vp_ode(steps, order=3, corrector=True):
    dyn = make_dynamics("fvp", hurst=0.5, num_aug=0)
    return Sampler(dyn, MixtureOracle(dyn, _BIMODAL), steps=steps, mode="ode", solver="exp", order=order,
                   grid="logsnr", corrector=corrector, lower_final=False).sample(1, (1, 16, 16), seed=1).double()


@pytest.mark.slow
@pytest.mark.parametrize("order,corrector,rate", [(1, False, 1.0), (2, False, 2.0), (3, False, 3.0),
                                                   (2, True, 2.0), (3, True, 3.0)])
def test_each_order_converges_at_its_rate(order, corrector, rate):
    """ODE, same prior draw: error against a 320-step order-3 run; the observed slope between 40 and 80 steps
    (measured 0.99, 2.12, 2.85, 2.04 with corrector, 3.18 with corrector; between 20 and 40 order 3 was still
    pre-asymptotic at 2.59, below order 2's 2.50 + noise), bound rate - 0.25: order 2 (2.12) fails order 3's."""
    best = _vp_ode(320)
    e40, e80 = ((_vp_ode(n, order, corrector) - best).abs().mean().item() for n in (40, 80))
    slope = np.log2(e40 / e80)
    assert slope > rate - 0.25, (e40, e80, slope)

NARROW = NARROW_MODES   # narrower modes than the default
FEW = [("fvp", 0.5, 0), ("fvp", 0.9, 2), ("fve", 0.7, 2)]


def _w1_default(name, hurst, K, mode, steps, mix=GaussianMixture(), images=4, **kw):
    from gfdm_fast.oracle import w1
    dyn = make_dynamics(name, hurst=hurst, num_aug=K)
    x = Sampler(dyn, MixtureOracle(dyn, mix), steps=steps, mode=mode, solver="exp", **kw).sample(images, (1, 32, 32))
    return w1(x, mix.sample(200_000, torch.Generator().manual_seed(0)))


@pytest.mark.slow
@pytest.mark.parametrize("name,hurst,K", FEW)
@pytest.mark.parametrize("mode", ["ode", "sde"])
def test_few_step_targets_at_ci_size(name, hurst, K, mode):
    """Issue 13's 20-NFE targets (VP 6e-3, fractional 15e-3) with the defaults, on 65,536 pixels: W1 of exact
    mixture draws of that size against the 200k target is 2.6e-3 +- 1.0e-3 (10 draws), so the bound is the
    target + 3 sd. Measured x 1e-3 (stop 21 defaults), ode / sde: VP 2.1 / 2.9, FVP H0.9 K2 2.1 / 2.4 (on the
    log-SNR grid 10.2 / 14.7), FVE H0.7 K2 2.4 / 1.2 (log-SNR: 6.5 sde)."""
    bound = 6e-3 if K == 0 else 15e-3
    assert _w1_default(name, hurst, K, mode, 20, images=64) < bound + 3e-3


@pytest.mark.slow
@pytest.mark.parametrize("name,hurst,K", FEW)
@pytest.mark.parametrize("mode", ["ode", "sde"])
def test_defaults_generalise_to_narrow_modes(name, hurst, K, mode):
    """Another per-pixel law (three narrow modes): the defaults at 20 NFE stay within the fractional target
    + 3 sd of that law's floor (2.2e-3 +- 0.8e-3 at 65,536 pixels). Measured x 1e-3 (stop 21 defaults), ode /
    sde: VP 2.2 / 4.3, FVP H0.9 K2 2.8 / 3.4 (on the log-SNR grid 9.4 / 15.8), FVE H0.7 K2 5.6 / 2.0. Order 3 in
    sde (the fractional default of stop 18) failed here (FVP 59.1, FVE 10.9): its extrapolation overshoots narrow
    modes; sde runs order 2 since."""
    assert _w1_default(name, hurst, K, mode, 20, mix=NARROW, images=64) < 15e-3 + 2.5e-3


@pytest.mark.slow
@pytest.mark.parametrize("name,hurst,K", FEW)
@pytest.mark.parametrize("steps", [5, 10])
@pytest.mark.parametrize("mode", ["ode", "sde"])
def test_defaults_never_worse_than_order1_on_the_same_grid(name, hurst, K, steps, mode):
    """The defaults against order 1 (no corrector; the rest as the defaults) on the very same times: for the
    adaptive grid the order-1 table is built from the default run's pilot and residual share."""
    from gfdm_fast.oracle import w1
    dyn = make_dynamics(name, hurst=hurst, num_aug=K)
    model, shape = MixtureOracle(dyn), (1, 32, 32)
    d = Sampler(dyn, model, steps=steps, mode=mode, solver="exp", shape=shape)
    o1 = Sampler(dyn, model, steps=steps, mode=mode, solver="exp", order=1, corrector=False,
                 grid=d.solver_options["grid"], rho=d.solver_options["rho"])
    if d.solver_options["grid"] == "adaptive":
        o1.table = build_exp_table(dyn, steps, mode=mode, order=1, corrector=False, activity=d._pilot(shape)[0],
                                   residual_share=d.solver_options["residual_share"])
    assert torch.equal(o1.table.t, d.table.t)
    target = GaussianMixture().sample(200_000, torch.Generator().manual_seed(0))
    errs = [w1(s.sample(4, shape), target) for s in (d, o1)]
    # paired runs (same prior draw, noise and grid): measured d / o1 = 0.18-0.58 (ode), 0.17-0.46 (sde), so "never
    # worse" is asserted with room
    assert errs[0] < 0.8 * errs[1], (mode, errs)


@pytest.mark.parametrize("name,hurst,K", FEW)
def test_gaussian_part_is_exact_for_gaussian_data(name, hurst, K):
    """With data N(0, 0.5^2) and sigma_data = 0.5 the whole denoiser is the Gaussian part, which the table
    integrates exactly with the linear part: 2 order-1 steps land where 400 do. Measured max |diff| 3.5e-5
    (VP), 2.1e-4 (FVP K2), 4.4e-3 (FVE K2, the 400-step run's own error); a 1% error in the Gaussian gain
    moves the 2-step result by ~0.1."""
    gauss = GaussianMixture((1.0,), (0.0,), (0.5,))
    dyn = make_dynamics(name, hurst=hurst, num_aug=K)
    outs = [Sampler(dyn, MixtureOracle(dyn, gauss), steps=n, mode="ode", solver="exp", order=1, corrector=False,
                    sigma_data=0.5, grid="logsnr").sample(4, (1, 16, 16), seed=3).double() for n in (2, 400)]
    assert (outs[0] - outs[1]).abs().max().item() < 1e-2


def test_default_order_follows_the_mode_for_fractional_dynamics():
    """Both fractional modes default to the adaptive grid; sde to order 2 (order 3 overshoots narrow modes), ode to
    'auto' (the pilot keeps 2 or 3, whichever lands its images nearer its fine run), VP to 3; a given order wins;
    Sampler and the table builder take the mode's default; 'auto' needs the adaptive grid's ode pilot."""
    from gfdm_fast.expint import solver_options
    fvp, vp = make_dynamics("fvp", hurst=0.9, num_aug=2), make_dynamics("fvp", hurst=0.5, num_aug=0)
    assert [solver_options(fvp, mode=m)["order"] for m in ("ode", "sde")] == ["auto", 2]
    assert [solver_options(fvp, mode=m)["grid"] for m in ("ode", "sde")] == ["adaptive", "adaptive"]
    assert [solver_options(vp, mode=m)["order"] for m in ("ode", "sde")] == [3, 3]
    assert solver_options(fvp, mode="sde", order=3)["order"] == 3
    assert solver_options(fvp, mode="ode", grid="logsnr")["order"] == 3       # a fixed grid: no pilot to choose
    s = Sampler(fvp, MixtureOracle(fvp), steps=4, mode="sde", solver="exp", shape=(1, 4, 4))
    assert s.solver_options["order"] == 2 and s.table.order == 2 and s.pilot_nfe == 8 * 40 and s.pilot_errors == {}
    assert build_exp_table(fvp, 4, mode="sde", grid="logsnr").order == 2
    for bad in (dict(mode="sde", order="auto"), dict(mode="ode", order="auto", grid="logsnr"), dict(order=4),
                dict(order=True)):
        with pytest.raises(ValueError, match="order"):
            solver_options(fvp, **bad)
    with pytest.raises(ValueError, match="auto"):
        build_exp_table(fvp, 4, grid="logsnr", order="auto")


def test_auto_order_keeps_the_order_nearer_the_pilot_run():
    """order='auto' runs the pilot's prior draw with orders 2 and 3 and residual shares 0 and 0.2 against its
    fine run and keeps the nearest: on three narrow modes order 3 overshoots at 10 NFE (FVP H0.9 K2 pilot
    errors here: order 2 0.045 / 0.022, order 3 0.090 / 0.063 at share 0 / 0.2); the kept table is the one
    built with that order and share, and solver_options records both."""
    from gfdm_fast.expint import AUTO_RESIDUAL_SHARES
    dyn = make_dynamics("fvp", hurst=0.9, num_aug=2)
    auto = Sampler(dyn, MixtureOracle(dyn, NARROW), steps=10, mode="ode", solver="exp", shape=(1, 8, 8))
    errs = auto.pilot_errors
    assert set(errs) == {(o, sh) for o in (2, 3) for sh in AUTO_RESIDUAL_SHARES}
    order, share = min(errs, key=errs.get)
    assert share == 0.2 and errs[2, 0.2] < errs[2, 0.0]         # the share is used: 0.022 against 0.045
    assert order == 2 and (auto.solver_options["order"], auto.solver_options["residual_share"]) == (order, share)
    assert auto.table.order == 2 and auto.pilot_nfe == 8 * 40 + 4 * 8 * 10
    activity = auto._pilot((1, 8, 8))[0]                     # fixed seed: the same measurement again
    fixed = build_exp_table(dyn, 10, mode="ode", order=order, residual_share=share, activity=activity)
    assert torch.equal(auto.table.table, fixed.table) and torch.equal(auto.table.t, fixed.t)


# -- the adaptive grid (issue 13) --------------------------------------------------------------------------------
@pytest.mark.parametrize("name,hurst,K", FEW)
@pytest.mark.parametrize("mode", ["ode", "sde"])
def test_sensitivity_kernel_integrates_to_the_one_step_weight(name, hurst, K, mode):
    """The adaptive grid's sensitivity of X to d, integrated over a step, is the X row of the order-1 weight that
    step_coefficients computes another way (augmented matrix exponentials): W = -int kernel dt. Worst relative
    difference over these 18 cases 1.1e-6 (4,001 points, 1,024 substeps; with 256 substeps step_coefficients' own
    frozen-generator error shows, ~1e-4); a flipped sign of A in the kernel's propagator gives 1.3e-2 to 110."""
    from gfdm_fast.expint import sensitivity_kernel
    dyn = make_dynamics(name, hurst=hurst, num_aug=K)
    for lo, hi in [(0.02, 0.05), (0.3, 0.5), (0.6, 0.9)]:
        t = np.geomspace(lo, hi, 4001)
        integral = np.trapezoid(sensitivity_kernel(dyn, t, mode=mode), t)
        _, W, _ = step_coefficients(dyn, hi, lo, [hi], 0.5 if mode == "ode" else 1.0, substeps=1024, predict="x0",
                                    sigma_data=0.5)
        assert integral == pytest.approx(-W[0, 0], rel=1e-5), (lo, hi)


def test_adaptive_grid_puts_steps_where_the_network_changes():
    """Pure function of the dynamics and the measured activity: endpoints T and eps, strictly decreasing,
    unchanged by scaling the activity, and a bump of activity draws steps into it."""
    from gfdm_fast.expint import adaptive_grid
    dyn = make_dynamics("fvp", hurst=0.9, num_aug=2)
    at = np.geomspace(1e-3, 1.0, 60)
    flat = adaptive_grid(dyn, 12, at, np.ones_like(at))
    assert flat[0] == dyn.T and flat[-1] == 1e-3 and np.all(np.diff(flat) < 0)
    np.testing.assert_allclose(adaptive_grid(dyn, 12, at, 7.0 * np.ones_like(at)), flat, rtol=1e-12)
    bump = 1.0 + 50.0 * np.exp(-0.5 * ((at - 0.3) / 0.02) ** 2)
    inside = lambda g: int(np.sum((g > 0.25) & (g < 0.35)))  # noqa: E731
    assert inside(adaptive_grid(dyn, 12, at, bump)) >= inside(flat) + 2, (adaptive_grid(dyn, 12, at, bump), flat)
    # the reversed order of the activity samples is the same measurement
    np.testing.assert_allclose(adaptive_grid(dyn, 12, at[::-1], bump[::-1]), adaptive_grid(dyn, 12, at, bump))
    for bad in (np.full_like(at, np.nan), -np.ones_like(at), np.zeros_like(at)):
        with pytest.raises(ValueError):
            adaptive_grid(dyn, 12, at, bad)
    with pytest.raises(ValueError, match="Sampler"):
        time_grid(dyn, 12, grid="adaptive")


def test_adaptive_grid_residual_share_draws_steps_to_non_gaussian_change(monkeypatch):
    """The residual share (ADAPTIVE_RESIDUAL) equidistributes the change of d - k x_in: a bump of it at high noise
    (where the sde sensitivity is ~0.002 per unit log-SNR) draws steps there (measured: 2 of 10 steps in
    t 0.75-0.95 against 0 without it); none of it (Gaussian data) leaves the grid as without the share; a missing
    or bad residual is one ValueError."""
    from gfdm_fast import expint
    dyn = make_dynamics("fvp", hurst=0.9, num_aug=2)
    at = np.geomspace(1e-3, 1.0, 60)
    act = 1.0 + 5.0 * np.exp(-0.5 * ((at - 0.5) / 0.1) ** 2)
    bump = np.exp(-0.5 * ((at - 0.85) / 0.05) ** 2)
    high = lambda g: int(np.sum((g > 0.75) & (g < 0.95)))  # noqa: E731
    monkeypatch.setitem(expint.ADAPTIVE_RESIDUAL, "sde", 0.0)
    plain = expint.adaptive_grid(dyn, 10, at, act, mode="sde")
    monkeypatch.setitem(expint.ADAPTIVE_RESIDUAL, "sde", 0.2)
    np.testing.assert_allclose(expint.adaptive_grid(dyn, 10, at, act, np.zeros_like(at), mode="sde"), plain)
    drawn = expint.adaptive_grid(dyn, 10, at, act, bump, mode="sde")
    assert drawn[0] == dyn.T and drawn[-1] == 1e-3 and np.all(np.diff(drawn) < 0)
    assert high(drawn) >= high(plain) + 1, (drawn, plain)
    with pytest.raises(ValueError, match="residual"):
        expint.adaptive_grid(dyn, 10, at, act, mode="sde")
    for bad in (np.full_like(at, np.nan), -bump, bump[:-1]):
        with pytest.raises(ValueError, match="residual"):
            expint.adaptive_grid(dyn, 10, at, act, bad, mode="sde")
    with pytest.raises(ValueError, match="activity"):
        time_grid(dyn, 10, grid="adaptive", activity=(at,))


def test_sampler_grid_uses_the_recorded_residual_share():
    """The sde default's times are adaptive_grid's with the 0.2 share on the pilot's measurement (and differ from
    share 0); sigma_data 0 has no Gaussian part to tell the residual from d, so no share; the residual is checked
    whatever the share, and activity or a share given to a fixed grid is one ValueError."""
    from gfdm_fast import expint
    dyn = make_dynamics("fvp", hurst=0.9, num_aug=2)
    grid_of = lambda s, share: expint.adaptive_grid(  # noqa: E731
        dyn, 8, *s._pilot((1, 8, 8))[0], mode="sde", sigma_data=s.solver_options["sigma_data"], share=share)[:-1]
    s = Sampler(dyn, MixtureOracle(dyn), steps=8, mode="sde", solver="exp", shape=(1, 8, 8))
    assert s.solver_options["residual_share"] == 0.2
    np.testing.assert_allclose(s.table.t.numpy(), grid_of(s, 0.2), rtol=1e-6)
    assert not np.allclose(s.table.t.numpy(), grid_of(s, 0.0), rtol=1e-3)
    z = Sampler(dyn, MixtureOracle(dyn), steps=8, mode="sde", solver="exp", sigma_data=0.0, shape=(1, 8, 8))
    assert z.solver_options["residual_share"] == 0.0
    np.testing.assert_allclose(grid_of(z, 0.2), grid_of(z, 0.0))
    at = np.geomspace(1e-3, 1.0, 30)
    with pytest.raises(ValueError, match="residual"):
        expint.adaptive_grid(dyn, 8, at, np.ones_like(at), np.full_like(at, np.nan), mode="ode")
    for bad in (dict(activity=(at, np.ones_like(at))), dict(residual_share=0.2)):
        with pytest.raises(ValueError, match="adaptive"):
            time_grid(dyn, 8, grid="logsnr", **bad)


def test_share_table_gives_every_rank_rank0s_grid():
    """Under torchrun every rank runs the pilot; share_table makes each take rank 0's table, order and share (on
    GPUs a rank's pilot may differ in its last bits); one process, or a fixed grid, is left as it is."""
    dyn = make_dynamics("fvp", hurst=0.9, num_aug=2)
    rank0 = Sampler(dyn, MixtureOracle(dyn), steps=6, mode="ode", solver="exp", shape=(1, 4, 4))
    other = Sampler(dyn, MixtureOracle(dyn, NARROW), steps=6, mode="ode", solver="exp", shape=(1, 4, 4))
    assert not torch.equal(other.table.t, rank0.table.t)           # a pilot that came out otherwise
    sent = {}

    class Rank:                          # a 2-process group's broadcast as one rank sees it: rank 0's object
        def __init__(self, main):
            self.world, self.main = 2, main

        def broadcast(self, obj):
            return sent.setdefault("obj", obj)

    mine = rank0.table
    rank0.share_table(Rank(True))
    other.share_table(Rank(False))
    assert torch.equal(rank0.table.table, mine.table)
    for name in ("table", "t", "s", "prior"):
        assert torch.equal(getattr(other.table, name), getattr(rank0.table, name)), name
    assert other.table.order == rank0.table.order and other.solver_options == rank0.solver_options
    alone, fixed = (Sampler(dyn, MixtureOracle(dyn, NARROW), steps=6, mode="ode", solver="exp", shape=(1, 4, 4), **kw)
                    for kw in ({}, dict(grid="logsnr")))
    before = (alone.table.t.clone(), fixed.table.t.clone())
    alone.share_table(type("One", (), {"world": 1})())
    fixed.share_table(Rank(False))
    assert torch.equal(alone.table.t, before[0]) and torch.equal(fixed.table.t, before[1])


def test_pilot_residual_activity_vanishes_for_gaussian_data():
    """The pilot's residual activity is the change of d - k x_in, k the Gaussian denoiser of sigma_data = 0.5: for
    data N(0, 0.5^2) the optimal d is k x_in, so it is ~0 (measured 1.5e-5 / 2.0e-5 of the full change, sde / ode:
    the float32 state; bound 1e-4) while the full change is not; the two-mode law has it (0.58 / 0.57; bound
    0.1)."""
    dyn = make_dynamics("fvp", hurst=0.9, num_aug=2)
    gauss = GaussianMixture((1.0,), (0.0,), (0.5,))
    for mode in ("sde", "ode"):
        s = Sampler(dyn, MixtureOracle(dyn, gauss), steps=6, mode=mode, solver="exp", order=2)
        (t, full, res), _, _ = s._pilot((1, 8, 8))
        assert t.size == full.size == res.size == 39 and full.max() > 0.05
        assert res.max() < 1e-4 * full.max(), (mode, res.max(), full.max())
        s = Sampler(dyn, MixtureOracle(dyn), steps=6, mode=mode, solver="exp", order=2)
        (_, full, res), _, _ = s._pilot((1, 8, 8))
        assert res.max() > 0.1 * full.max(), (mode, res.max(), full.max())


def test_adaptive_sampler_pilot_is_reproducible_and_lazy():
    """The adaptive grid (the fractional default) comes from a fixed-seed pilot run (8 images x 40 calls, counted
    in pilot_nfe, not in nfe): two Samplers agree; without a known image shape the table waits for the first run;
    the samples (same seeds, so the same sde noise) are the same whichever way the table was built."""
    dyn = make_dynamics("fvp", hurst=0.9, num_aug=2)
    a = Sampler(dyn, MixtureOracle(dyn), steps=6, mode="sde", solver="exp", grid="adaptive", shape=(1, 8, 8))
    assert a.solver_options["grid"] == "adaptive" and a.pilot_nfe == 320 and a.nfe == 6
    lazy = Sampler(dyn, MixtureOracle(dyn), steps=6, mode="sde", solver="exp", grid="adaptive")
    with pytest.raises(ValueError, match="shape"):
        lazy.table
    x = lazy.sample(2, (1, 8, 8), seed=4)
    assert torch.equal(lazy.table.t, a.table.t)
    assert torch.equal(x, a.sample(2, (1, 8, 8), seed=4))
    logsnr = time_grid(dyn, 6, grid="logsnr")[:-1]
    assert not np.allclose(a.table.t.numpy(), logsnr, atol=1e-3)          # the pilot moved the grid


def test_auto_order_drops_a_non_finite_trial(monkeypatch):
    """A trial order whose pilot images come out NaN/inf is out (the other is kept); both out is one message."""
    from gfdm_fast import sampler as sm
    dyn = make_dynamics("fvp", hurst=0.9, num_aug=2)
    real_sample = sm.Sampler.sample
    bad_orders = {3}

    def sample(self, num, shape, **kw):                    # the trials: adaptive samplers given a candidate table
        if self.solver_options["grid"] == "adaptive" and self._table is not None and self.table.order in bad_orders:
            raise sm.NonFiniteSamples("images [0] came out non-finite")
        return real_sample(self, num, shape, **kw)

    monkeypatch.setattr(sm.Sampler, "sample", sample)
    s = Sampler(dyn, MixtureOracle(dyn), steps=6, mode="ode", solver="exp", shape=(1, 4, 4))
    assert s.solver_options["order"] == 2 and s.pilot_errors[3, 0.0] == s.pilot_errors[3, 0.2] == float("inf")
    assert np.isfinite(s.pilot_errors[2, 0.0]) and np.isfinite(s.pilot_errors[2, 0.2])
    bad_orders.add(2)
    with pytest.raises(ValueError, match="every trial run"):
        Sampler(dyn, MixtureOracle(dyn), steps=6, mode="ode", solver="exp", shape=(1, 4, 4))


def test_adaptive_pilot_bounds_and_bad_input():
    """The pilot is capped (8 x 400 calls; order auto keeps order 3 without trials past 100 steps), bad steps or
    mode are refused at construction even when the table waits for the image shape, a shape the model cannot
    take is one ValueError, and replacing the table drops captured CUDA graphs."""
    dyn = make_dynamics("fvp", hurst=0.9, num_aug=2)
    big = Sampler(dyn, MixtureOracle(dyn), steps=120, mode="ode", solver="exp", shape=(1, 2, 2))
    assert big.pilot_nfe == 8 * 400 and big.pilot_errors == {} and big.solver_options["order"] == 3
    for bad in (dict(steps=0), dict(mode="bogus")):
        with pytest.raises(ValueError, match="steps|mode"):
            Sampler(dyn, MixtureOracle(dyn), solver="exp", **{"steps": 4, "mode": "ode", **bad})

    class OneChannel(torch.nn.Module):
        in_channels, image_size, num_classes = 1, 4, None

        def forward(self, x, s, y=None):
            return 0.1 * x

    with pytest.raises(ValueError, match="channel"):
        Sampler(dyn, OneChannel(), steps=4, mode="ode", solver="exp", shape=(3, 4, 4))
    s = Sampler(dyn, OneChannel(), steps=4, mode="ode", solver="exp")
    s._graphs["stale"] = object()
    s.table = s.table
    assert s._graphs == {}


@pytest.mark.slow
@pytest.mark.parametrize("name,hurst,K", [("fvp", 0.9, 2), ("fvp", 0.8, 4), ("fvp", 0.7, 3)])
@pytest.mark.parametrize("mode", ["ode", "sde"])
def test_ten_step_fractional_target_at_ci_size(name, hurst, K, mode):
    """Issue 13's 10-NFE fractional target (30e-3) with the defaults on 65,536 pixels, both per-pixel laws (the
    bound adds 3 sd of the Monte-Carlo error, 1.0e-3). FVP H0.9 K2 was 51 / 50 (ode / sde) on the log-SNR grid;
    measured x 1e-3 (default / narrow): FVP H0.9 K2 ode 8.2 / 10.6, sde 8.8 / 10.6; FVP H0.8 K4 ode 9.1 / 10.0,
    sde 9.6 / 18.6; FVP H0.7 K3 ode 8.9 / 19.2 (narrow 44 when order auto tried share 0 only), sde 5.8 / 5.4."""
    for mix in (GaussianMixture(), NARROW):
        assert _w1_default(name, hurst, K, mode, 10, mix=mix, images=64) < 30e-3 + 3e-3, mix


def test_logsnr_grid_on_the_official_recipe():
    """The log-SNR grid (the adaptive grid's pilot) evaluates the statistics on a reversed array: the official
    recipe's float32 path refused its negative stride (found through gfdm-fast generate on an official run)."""
    dyn = make_dynamics("fvp", hurst=0.7, num_aug=2, recipe="official")
    t = time_grid(dyn, 5, grid="logsnr")
    assert t[0] == dyn.T and t[-1] == 1e-3 and np.all(np.diff(t) < 0)
