"""The score network: official fixtures, preset layouts, and every fast path against eager float32.

Tolerances follow the numerics rule in STYLE.md: a fast path's error against a
float64 run of the same weights may be at most about twice the error of the
plain path at the same precision, measured in the test itself on the same
inputs. Measured on this CPU (torch 2.14.1), errors relative to max|out|:
eager fp32 ~1e-6; SDPA fp32 ~9e-7; channels_last ~3e-7; compiled ~1e-6;
bf16 autocast 4e-3..6e-3 vs a bf16 copy of the weights 4e-3..5.5e-3; fp16
autocast ~6e-4. The small absolute floor (FLOOR) only guards against a plain
error that happens to be tiny.
"""
import copy
import json

import pytest
import torch

from gfdm_fast.models import (
    PRESETS,
    UNetConfig,
    UNetModel,
    autocast,
    compile_model,
    config_from_flags,
    set_sdpa,
    to_channels_last,
)
from gfdm_fast.models.unet import GroupNorm32

FLOOR = 1e-6   # relative to max|out|; float32 eps is 1.2e-7


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny convolutions: with 2 threads on a shared 2-core machine, OpenMP waits
    # made a 16x16 forward 1.4 s instead of 20 ms (measured).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel_err(a, b):
    b = b.double()
    return ((a.double() - b).abs().max() / b.abs().max()).item()


def random_net(seed=0, **overrides):
    """The fixture's small configuration with every weight ~ N(0, 0.05^2), so that
    the layers the official code zero-initialises contribute too."""
    kw = dict(image_size=16, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
              attention_resolutions=[2], dropout=0.0, channel_mult=[1, 2], num_classes=10)
    kw.update(overrides)
    g = torch.Generator().manual_seed(seed)
    net = UNetModel(**kw).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    x = torch.randn(4, kw["in_channels"], kw["image_size"], kw["image_size"], generator=g)
    t = torch.rand(4, generator=g) * 999
    y = torch.randint(0, kw["num_classes"], (4,), generator=g) if kw["num_classes"] else None
    return net, (x, t, y)


def run64(net, x, t, y):
    with torch.no_grad():
        return copy.deepcopy(net).double()(x.double(), t.double(), y)


# ----------------------------------------------------------------------------- official compatibility

@pytest.mark.parametrize("prefix", ["", "uncond_"])
def test_official_fixture_outputs(official_dir, prefix):
    d = torch.load(official_dir / "unet_small_io.pt", weights_only=False)
    net = UNetModel(**d[prefix + "config"]).eval()
    net.load_state_dict(d[prefix + "state_dict"], strict=True)
    y = None if prefix else d["y"]
    with torch.no_grad():
        out = net(d["x"], d["timesteps"][:, None], y)     # as the official code calls it
        out_flat = net(d["x"], d["timesteps"], y)          # (B,) timesteps are the same
    torch.testing.assert_close(out, d[prefix + "out"], atol=1e-5, rtol=0)   # measured 1.6e-7
    torch.testing.assert_close(out_flat, out, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_preset_layout_matches_official(official_dir, name):
    ref = json.loads((official_dir / f"unet_{name}_keys.json").read_text())
    config = PRESETS[name]
    assert UNetConfig.from_dict(ref["config"]) == config
    with torch.device("meta"):                 # layout only: no memory, no init
        net = UNetModel(**config.to_kwargs())
    got = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert list(got) == list(ref["state_dict_shapes"])
    assert got == ref["state_dict_shapes"]
    assert sum(p.numel() for p in net.parameters()) == ref["num_params"]


def test_config_from_official_flags():
    mnist = config_from_flags(channels=1, image_size=28, model_channels=64, num_res_blocks=3,
                              attn_resolutions="4,2", channel_mult="1,2,4", dropout=0.0, num_classes=10)
    cifar = config_from_flags(channels=3, image_size=32, model_channels=128, num_res_blocks=4,
                              attn_resolutions="8", channel_mult=[1, 2, 2, 2], dropout=0.1, num_classes=10)
    assert (mnist, cifar) == (PRESETS["mnist"], PRESETS["cifar10"])
    uncond = config_from_flags(channels=1, image_size=28, model_channels=64, num_res_blocks=3,
                               attn_resolutions="4,2", channel_mult="1,2,4", num_classes=0)
    assert uncond.num_classes is None
    from gfdm_fast.errors import UserError
    with pytest.raises(UserError, match="--attn_resolutions"):
        config_from_flags(channels=1, image_size=28, model_channels=64, num_res_blocks=3,
                          attn_resolutions="4;2", channel_mult="1,2,4")


def test_labels_required_exactly_for_conditional_nets():
    net, (x, t, y) = random_net()
    with pytest.raises(ValueError, match="num_classes"):
        net(x, t)


@pytest.mark.parametrize("overrides", [
    dict(use_scale_shift_norm=True), dict(resblock_updown=True),
    dict(num_head_channels=16, use_new_attention_order=True), dict(num_classes=None)])
def test_guided_diffusion_options_run(overrides):
    net, (x, t, y) = random_net(**overrides)
    with torch.no_grad():
        assert net(x, t, y).shape == x.shape


# ----------------------------------------------------------------------------- fast paths

@pytest.mark.parametrize("order", ["legacy", "new"])
def test_sdpa_is_the_legacy_attention_in_float64(order):
    # Four heads, so a wrong head split would show; float64 removes rounding.
    net, (x, t, y) = random_net(num_heads=4, use_new_attention_order=(order == "new"))
    ref = run64(net, x, t, y)
    net64 = set_sdpa(copy.deepcopy(net).double(), True)
    with torch.no_grad():
        out = net64(x.double(), t.double(), y)
    assert rel_err(out, ref) < 1e-12      # measured ~1e-15


@pytest.mark.parametrize("path", ["sdpa", "channels_last", "sdpa+channels_last"])
def test_fast_path_float32(path):
    net, (x, t, y) = random_net(seed=1, num_heads=2)
    ref = run64(net, x, t, y)
    with torch.no_grad():
        plain = net(x, t, y)
        fast = copy.deepcopy(net)
        xin = x
        if "sdpa" in path:
            set_sdpa(fast, True)
        if "channels_last" in path:
            to_channels_last(fast)
            xin = x.to(memory_format=torch.channels_last)
        out = fast(xin, t, y)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) <= 2 * rel_err(plain, ref) + FLOOR


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_against_plain_half_precision(dtype):
    # Plain PyTorch at the same precision: a copy of the weights in `dtype`.
    net, (x, t, y) = random_net(seed=2)
    ref = run64(net, x, t, y)
    with torch.no_grad():
        plain_half = copy.deepcopy(net).to(dtype)(x.to(dtype), t, y)
        with autocast("cpu", dtype):
            out = net(x, t, y)
    assert out.dtype == dtype
    plain_err = rel_err(plain_half, ref)
    assert plain_err < 3e-2                            # sanity: the reference itself is sane
    assert rel_err(out, ref) <= 2 * plain_err + FLOOR


def test_groupnorm_statistics_in_float32_under_autocast(seed):
    gn = GroupNorm32(8, 32)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    x = (torch.randn(2, 32, 5, 5) * 3 + 100).bfloat16()   # large mean: bf16 statistics would fail
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gn(x)
    expect = torch.nn.functional.group_norm(x.float(), 8, gn.weight, gn.bias, gn.eps).bfloat16()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expect, atol=0, rtol=0)


def _tiny_net():
    # One level: few distinct kernels, so a cold inductor compile stays short.
    net, _ = random_net(seed=3, image_size=8, in_channels=2, out_channels=2, model_channels=16,
                        channel_mult=[1], attention_resolutions=[1], num_classes=3)
    g = torch.Generator().manual_seed(4)
    x, t, y = torch.randn(2, 2, 8, 8, generator=g), torch.tensor([3.0, 900.0]), torch.tensor([0, 2])
    return net, (x, t, y)


@pytest.mark.parametrize("sdpa", [False, True])
def test_forward_has_no_graph_breaks(sdpa):
    net, args = _tiny_net()
    set_sdpa(net, sdpa)
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="eager", fullgraph=True)   # raises on any graph break
    with torch.no_grad():
        compiled(*args)


@pytest.mark.slow
def test_compiled_matches_eager():
    # Default mode (inductor). A cold inductor cache costs ~70 s of C++ builds on 2
    # cores, a warm one ~10 s.
    net, args = _tiny_net()
    set_sdpa(net, True)
    ref = run64(net, *args)
    with torch.no_grad():
        plain = net(*args)
    torch._dynamo.reset()
    compiled = compile_model(net, example_inputs=args, fullgraph=True, warmup=1)
    with torch.no_grad():
        out = compiled(*args)
    assert rel_err(out, ref) <= 2 * rel_err(plain, ref) + FLOOR
