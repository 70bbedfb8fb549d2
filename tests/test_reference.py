"""The pure-PyTorch reference against the official fixtures, and its own invariants."""
import pytest
import torch

from gfdm_fast import make_dynamics
from gfdm_fast import reference as ref

from conftest import load_official, standin_net

ALL_FILES = ["fvp_H0.7_K2.npz", "fvp_H0.9_K3.npz", "fve_H0.9_K2.npz", "fvp_H0.5_K0.npz", "fve_H0.5_K0.npz"]
AUG_FILES = ALL_FILES[:3]


def _dyn(d, recipe="official"):
    return make_dynamics(str(d["dynamics"]), hurst=float(d["hurst"]), num_aug=int(d["num_aug"]),
                         gamma_max=float(d["gamma_max"]), T=float(d["T"]), norm=bool(d["norm"]), recipe=recipe)


def _rel(a, b):
    """max |a - b| / max |b|: the trajectory measure of the fixture README."""
    b = torch.as_tensor(b, dtype=torch.float64)
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fname", ALL_FILES)
def test_official_recipe_reproduces_score_and_trajectories(fname, dtype):
    d = load_official(fname)
    dyn = _dyn(d)
    def T(k):
        return torch.from_numpy(d[k]).to(dtype)
    score = ref.augmented_score(standin_net, dyn, T("score_z"), T("score_t"))
    assert _rel(score, d["score"]) < 1e-4
    for mode in ("sde", "ode"):
        out = ref.sample_em(standin_net, dyn, T(f"traj_{mode}_zT"), T(f"traj_{mode}_noise"),
                            steps=int(d["traj_steps"]), eps=float(d["traj_eps"]), mode=mode)
        assert out.dtype == dtype and out.shape == d[f"traj_{mode}_out"].shape
        assert _rel(out, d[f"traj_{mode}_out"]) < 5e-4, mode  # README: ~5e-4 (float32 rounding of the official run)


@pytest.mark.parametrize("fname", AUG_FILES)
def test_official_recipe_reproduces_training_pair(fname):
    d = load_official(fname)
    dyn = _dyn(d)
    def T(k):
        return torch.from_numpy(d[k])
    x_in, target = ref.training_pair(dyn, T("train_x0"), T("train_t"), form="joint", z=T("train_z"))
    assert _rel(x_in, d["train_input"]) < 1e-5
    assert _rel(target, d["train_target"]) < 2e-4   # target divides by sigma_c (~1e-4 in the README)


@pytest.mark.parametrize("fname,tol", [("fvp_H0.7_K2.npz", 5e-3), ("fvp_H0.9_K3.npz", 2e-2), ("fve_H0.9_K2.npz", 1e-3)])
def test_exact_recipe_close_to_official_trajectories(fname, tol):
    """The recipes differ by up to 7% in sigma_c at H = 0.9, K = 3; trajectories move by ~1e-2 there."""
    d = load_official(fname)
    dyn = _dyn(d, "exact")
    def T(k):
        return torch.from_numpy(d[k]).double()
    for mode in ("sde", "ode"):
        out = ref.sample_em(standin_net, dyn, T(f"traj_{mode}_zT"), T(f"traj_{mode}_noise"),
                            steps=int(d["traj_steps"]), eps=float(d["traj_eps"]), mode=mode)
        assert _rel(out, d[f"traj_{mode}_out"]) < tol


@pytest.mark.parametrize("name,K", [("fvp", 3), ("fve", 2), ("fvp", 1)])
def test_joint_and_reduced_training_pairs_agree_in_distribution(name, K):
    """xi - alpha.eta is exactly N(0, sigma_c^2): both forms give the same law of (input, target) given x0."""
    dyn = make_dynamics(name, hurst=0.9, num_aug=K)
    gen = torch.Generator().manual_seed(7)
    n = 200_000
    x0 = torch.rand(n, 1, 1, 1, generator=gen, dtype=torch.float64) * 2 - 1
    t = torch.full((n,), 0.3, dtype=torch.float64)
    st = dyn.marginal_stats([0.3])
    c, sig = st.mean_scale.item(), st.sigma_c.item()
    for form in ("joint", "reduced"):
        x_in, target = ref.training_pair(dyn, x0, t, form=form, generator=gen)
        x_in, target, x = x_in.flatten(), target.flatten(), x0.flatten()
        se = 1 / n ** 0.5
        assert abs(target.mean().item()) < 4 * se
        assert abs(target.var().item() - 1) < 4 * 2 ** 0.5 * se
        assert abs(torch.corrcoef(torch.stack([target, x]))[0, 1].item()) < 4 * se
        resid = x_in - c * x
        assert abs(resid.mean().item()) < 4 * sig * se
        assert abs(resid.std().item() / sig - 1) < 4 * se
        assert torch.allclose(resid, sig * target, atol=1e-12)   # input = c x0 + sigma_c target in both forms


def test_prior_sample_has_sreg_T_covariance():
    dyn = make_dynamics("fvp", hurst=0.7, num_aug=2)
    z = ref.prior_sample(dyn, (4000, 1, 4, 4), torch.Generator().manual_seed(0), dtype=torch.float64)
    S = torch.cov(z.reshape(-1, 3).T)
    want = dyn.marginal_stats([1.0]).cov[0]
    se = torch.sqrt((want.diagonal()[:, None] * want.diagonal()[None, :] + want ** 2) / (4000 * 16))
    assert ((S - want) / se).abs().max() < 4.5


def test_sample_em_k0_matches_closed_form_drift():
    """K = 0, ode, with a zero network: dX = mu X dt backwards, i.e. X scales by prod(1 - mu dt)."""
    dyn = make_dynamics("fvp", hurst=0.5, num_aug=0)
    z = torch.ones(2, 1, 2, 2, dtype=torch.float64)
    out = ref.sample_em(lambda x, s, y: torch.zeros_like(x), dyn, z, None, steps=5, mode="ode")
    t, dt = ref.time_grid(dyn, 5)
    expect = torch.prod(1 - dyn.mu(t) * dt)
    assert torch.allclose(out, expect * z)


def test_reference_bad_input():
    dyn = make_dynamics("fvp", hurst=0.7, num_aug=2)
    z = torch.zeros(2, 1, 3, 3, 2)
    with pytest.raises(ValueError, match=r"expects z of shape \(B, C, H, W, 3\)"):
        ref.augmented_score(standin_net, dyn, z, torch.ones(2))
    with pytest.raises(ValueError, match="unknown mode 'euler'"):
        ref.sample_em(standin_net, dyn, torch.zeros(2, 1, 3, 3, 3), None, steps=4, mode="euler")
    with pytest.raises(ValueError, match="noise must be"):
        ref.sample_em(standin_net, dyn, torch.zeros(2, 1, 3, 3, 3), torch.zeros(2, 2, 1, 3, 3), steps=4)
    with pytest.raises(ValueError, match="steps must be >= 2"):
        ref.time_grid(dyn, 1)
    with pytest.raises(ValueError, match="unknown form"):
        ref.training_pair(dyn, torch.zeros(2, 1, 2, 2), torch.ones(2), form="both")
