"""The exponential integrator end to end through ``Sampler``: the history ring, the UniPC-style corrector
and the convergence order, against an independent float64 twin that keeps every network output in a list
(no ring, no folded corrector) and takes the step coefficients straight from ``expint.step_coefficients``.
"""
import numpy as np
import pytest
import torch
from test_exp_step import exp_backend_or_skip

from gfdm_fast import Sampler, make_dynamics
from gfdm_fast import reference as ref
from gfdm_fast.expint import _step_orders, build_exp_table, step_coefficients, time_grid
from gfdm_fast.oracle import GaussianMixture, MixtureOracle

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
            Phi, W, _ = step_coefficients(dyn, t[n - 1], t[n], t[n + 1 - pc:n + 1][::-1], m, substeps=substeps, predict="x0")
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


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("order,corrector", [(3, False), (3, True), (2, True)])
def test_sampler_order3_ring_and_corrector_match_list_twin(backend, order, corrector):
    """8 steps: the ring wraps three times; a wrong ring slot or corrector fold moves the result by ~1e-1."""
    device = exp_backend_or_skip(backend)
    dyn = make_dynamics("fvp", hurst=0.8, num_aug=2)
    oracle = MixtureOracle(dyn)
    steps = 8
    smp = Sampler(dyn, oracle, steps=steps, mode="ode", solver="exp", backend=backend, device=device, order=order,
                  grid="logsnr", corrector=corrector, lower_final=False)
    smp.table = build_exp_table(dyn, steps, mode="ode", order=order, grid="logsnr", corrector=corrector,
                                lower_final=False, substeps=16, device=device)
    x = smp.sample(3, SHAPE, seed=5).cpu().double()
    twin = _twin(dyn, oracle, steps, "ode", order, "logsnr", corrector, torch.arange(5, 8))
    err = (x - twin).abs().max().item()
    assert err < 2e-4 * max(1.0, twin.abs().max().item()), err      # float32 state over 8 steps: measured ~1e-6


def test_sde_corrector_matches_list_twin_with_given_noise():
    dyn = make_dynamics("fve", hurst=0.7, num_aug=2)
    oracle = MixtureOracle(dyn)
    steps, B = 6, 2
    smp = Sampler(dyn, oracle, steps=steps, mode="sde", solver="exp", backend="torch", order=3, grid="logsnr",
                  corrector=True, lower_final=False)
    smp.table = build_exp_table(dyn, steps, mode="sde", order=3, grid="logsnr", corrector=True, lower_final=False,
                                substeps=16)
    xi = torch.randn(steps, 3, B, *SHAPE, generator=torch.Generator().manual_seed(0))
    z = torch.empty(3, B, *SHAPE)
    x_in = torch.empty(B, *SHAPE)
    seeds = torch.arange(B)
    ref.prior_planar(z, x_in, smp.table.prior, seeds)
    smp.run(z, x_in, seeds=seeds, noise=xi)
    o = smp.table.table.shape[1] - 2 - 9                   # L (3 x 3) sits before alpha_next (K = 2)
    L = smp.table.table[:, o:o + 9].double().reshape(steps, 3, 3).numpy()
    twin = _twin(dyn, oracle, steps, "sde", 3, "logsnr", True, seeds, noise=(L, xi.double().numpy()))
    assert (z[0].double() - twin).abs().max().item() < 2e-4


@pytest.mark.slow
@pytest.mark.parametrize("order,corrector,rate", [(1, False, 1.0), (2, False, 2.0), (3, False, 3.0),
                                                   (2, True, 2.0), (3, True, 3.0)])
def test_each_order_converges_at_its_rate(order, corrector, rate):
    """ODE, same prior draw: error against a 320-step order-3 run; the observed slope between 20 and 40 steps."""
    dyn = make_dynamics("fvp", hurst=0.5, num_aug=0)
    oracle = MixtureOracle(dyn, GaussianMixture((0.5, 0.5), (-0.5, 0.5), (0.3, 0.3)))
    run = lambda n, o=order, c=corrector: Sampler(dyn, oracle, steps=n, mode="ode", solver="exp", order=o,
                                                  grid="logsnr", corrector=c, lower_final=False
                                                  ).sample(1, (1, 16, 16), seed=1).double()
    best = run(320, 3, True)
    e20, e40 = ((run(n) - best).abs().mean().item() for n in (20, 40))
    slope = np.log2(e20 / e40)
    assert slope > rate - 0.35, (e20, e40, slope)
