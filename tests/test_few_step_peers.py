"""benchmarks/few_step_peers.py without the peers installed: its problem is gfdm-fast's oracle problem
(the peers' denoiser and prior draw are the ones gfdm-fast's sampler sees), and a missing install is one
clear message with exit 2."""
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import torch

from gfdm_fast import Sampler
from gfdm_fast.oracle import MixtureOracle

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import few_step_peers as peers  # noqa: E402


def test_peer_denoiser_is_the_gfdm_oracle_in_sigma_space(seed):
    """D(x / c, sigma_c / c) = x0_hat of the optimal epsilon network at the same t, at several t."""
    prob = peers.Problem(images=1, target_n=1000)
    oracle = MixtureOracle(prob.dyn)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64) * 1.3
    for t in (1e-3, 0.05, 0.3, 0.9):
        st = prob.dyn.marginal_stats(np.array([t]))
        c, sig = st.mean_scale.item(), st.sigma_c.item()
        x0_gfdm = (x - sig * oracle(x, torch.tensor([999.0 * t]))) / c
        x0_peer = prob.denoise(x / c, torch.tensor(sig / c, dtype=torch.float64))
        torch.testing.assert_close(x0_peer, x0_gfdm, rtol=1e-7, atol=1e-7)   # measured 8e-9 (t = s / 999 round trip)


def test_prior_is_the_samplers_own_draw():
    """The shared X_T is the first state of gfdm-fast's sampler for the same seeds."""
    prob = peers.Problem(images=3, target_n=1000)
    x_T = prob.prior(7)
    smp = Sampler(prob.dyn, MixtureOracle(prob.dyn), steps=2, mode="ode", solver="em", device="cpu", backend="torch")
    batch = next(smp.iter_batches(3, peers.SHAPE, seed=7))
    assert x_T.shape == (3, *peers.SHAPE) and torch.isfinite(x_T).all()
    assert abs(float(x_T.std()) - math.sqrt(prob.sig_T ** 2)) < 0.1      # N(0, sigma_c(T)^2) at c(T) ~ 0
    # two ode steps from the same draw: the sampler's run is a deterministic function of X_T
    z = x_T[None].clone()
    smp.run(z, x_T.clone(), seeds=torch.arange(7, 10))
    torch.testing.assert_close(z[0], batch[1], rtol=0, atol=0)


def test_missing_peers_is_one_message_and_exit_2(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "k_diffusion" else real(name, *a))
    monkeypatch.delitem(sys.modules, "k_diffusion", raising=False)
    assert peers.main(["--quick"]) == 2
    err = capsys.readouterr().err
    assert "pip install -e '.[peers]'" in err and err.count("\n") == 1
