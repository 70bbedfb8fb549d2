"""The fused Sampler: official trajectories, reproducibility across batch sizes and backends, bad input."""
import pytest
import torch

from gfdm_fast import Sampler, make_dynamics, ops
from gfdm_fast.sampler import draw_labels, shard

from conftest import load_official, standin_net

FILES = ["fvp_H0.9_K3.npz", "fve_H0.9_K2.npz", "fvp_H0.5_K0.npz"]


def _planar(zT, K):
    return zT.permute(4, 0, 1, 2, 3).contiguous() if K else zT[None].contiguous()


@pytest.mark.parametrize("fname", FILES)
@pytest.mark.parametrize("backend", ops.available_backends("cpu"))
def test_fused_sampler_reproduces_official_trajectories(fname, backend):
    d = load_official(fname)
    K = int(d["num_aug"])
    dyn = make_dynamics(str(d["dynamics"]), hurst=float(d["hurst"]), num_aug=K, recipe="official")
    for mode in ("sde", "ode"):
        s = Sampler(dyn, standin_net, steps=int(d["traj_steps"]), eps=float(d["traj_eps"]), mode=mode, backend=backend)
        z = _planar(torch.from_numpy(d[f"traj_{mode}_zT"]), K)
        alpha0 = s.table.prior[(K + 1) ** 2:].reshape(K, 1, 1, 1, 1)
        x_in = (z[0] - (alpha0 * z[1:]).sum(0)).contiguous()
        s.run(z, x_in, noise=torch.from_numpy(d[f"traj_{mode}_noise"]))
        want = _planar(torch.from_numpy(d[f"traj_{mode}_out"]), K)
        rel = ((z - want).abs().max() / want.abs().max()).item()
        assert rel < 5e-4, (mode, rel)  # the fixture README's trajectory tolerance


@pytest.mark.parametrize("solver", ["em", "exp"])
def test_same_seed_same_images_for_any_batch_size_and_backend(solver):
    dyn = make_dynamics("fvp", hurst=0.9, num_aug=2)
    def net(x, s, y):
        return torch.tanh(x) * (1 + y.float()[:, None, None, None] / 10)
    runs = []
    for backend in ops.available_backends("cpu"):
        if solver == "exp" and backend not in ops.available_backends("cpu", "exp_step"):
            continue
        s = Sampler(dyn, net, steps=6, backend=backend, solver=solver, num_classes=10)
        for bs in (7, 3):
            runs.append((backend, bs, s.sample(7, (1, 5, 3), seed=11, batch_size=bs)))
    base = runs[0][2]
    assert base.abs().max() > 0.1
    for backend, bs, x in runs[1:]:
        assert ((x - base).abs().max() / base.abs().max()).item() <= 1e-4, (backend, bs)
    # a shard of the run reproduces the same images
    s = Sampler(dyn, net, steps=6, backend="torch", solver=solver, num_classes=10)
    part = list(s.iter_batches(7, (1, 5, 3), seed=11, batch_size=2, indices=shard(7, 1, 2)))
    idx = [i for chunk, _, _ in part for i in chunk]
    imgs = torch.cat([x for _, x, _ in part])
    assert idx == [4, 5, 6]
    assert ((imgs - base[4:]).abs().max() / base.abs().max()).item() <= 1e-4


def test_labels_drawn_per_seed():
    seeds = torch.arange(100, 140)
    a = draw_labels(seeds, 10)
    assert torch.equal(a[5:9], draw_labels(seeds[5:9], 10))
    assert a.min() >= 0 and a.max() < 10 and len(set(a.tolist())) > 5


def test_shard_covers_every_index_once():
    for num, world in ((10, 3), (7, 2), (3, 4)):
        got = [i for r in range(world) for i in shard(num, r, world)]
        assert got == list(range(num))


def test_peak_memory_independent_of_steps():
    """No per-step buffers: the state and input buffers are the same size for 5 or 50 steps."""
    dyn = make_dynamics("fvp", hurst=0.7, num_aug=2)
    seen = []

    def net(x, s, y):
        seen.append(x.data_ptr())
        return torch.zeros_like(x)

    for steps in (5, 50):
        seen.clear()
        Sampler(dyn, net, steps=steps, backend="torch").sample(2, (1, 4, 4))
        assert len(set(seen)) == 1   # one input buffer reused by every step


def test_sampler_bad_input():
    dyn = make_dynamics("fvp", hurst=0.7, num_aug=2)
    with pytest.raises(ValueError, match="unknown solver 'heun'"):
        Sampler(dyn, standin_net, solver="heun")
    with pytest.raises(ValueError, match="unknown precision"):
        Sampler(dyn, standin_net, precision="int8")
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        Sampler(dyn, standin_net, cuda_graphs=True, device="cpu")
    with pytest.raises(ValueError, match="belong to solver='exp'"):
        Sampler(dyn, standin_net, order=2)
    s = Sampler(dyn, standin_net, steps=3)
    with pytest.raises(ValueError, match="number of samples must be > 0"):
        s.sample(0, (1, 4, 4))
    with pytest.raises(ValueError, match=r"shape must be \(C, H, W\)"):
        s.sample(2, (4, 4))
    with pytest.raises(ValueError, match="one class per image"):
        s.sample(2, (1, 4, 4), labels=torch.zeros(2, 3, dtype=torch.long))
