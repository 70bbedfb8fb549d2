"""Smoke test of the throughput benchmark (gfdm_fast.bench, benchmarks/throughput.py, gfdm-fast bench).

Timings are never asserted (STYLE.md): only the rows' keys, variant names and sanity of the values.
A 1-level network stands in for the presets so the test stays within a few seconds.
"""
import json
import subprocess
import sys

import pytest
import torch

from gfdm_fast import bench
from gfdm_fast.cli import main
from gfdm_fast.models import UNetConfig


@pytest.fixture()
def tiny_preset(monkeypatch):
    from gfdm_fast.models import presets
    tiny = UNetConfig(image_size=8, in_channels=1, model_channels=8, out_channels=1, num_res_blocks=1,
                      attention_resolutions=(2,), channel_mult=(1, 2), num_classes=10)
    monkeypatch.setitem(presets.PRESETS, "mnist", tiny)
    return "mnist"


def test_rows_have_the_exact_keys_and_variant_names(tiny_preset):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a loaded 2-core machine: a second OpenMP thread only waits
    try:
        with torch.no_grad():
            rows = bench.run_benchmark("cpu", quick=True, presets=(tiny_preset,),
                                       variants=("official", "fused"), ks=(0, 2), batch=2, steps=2,
                                       repeats=1, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    assert len(rows) == 4
    for r in rows:
        assert tuple(r) == bench.ROW_KEYS
        assert r["variant"] in bench.VARIANTS and r["device"] == "cpu" and r["preset"] == "mnist"
        assert r["batch"] == 2 and r["K"] in (0, 2)
        assert r["images_nfe_per_s"] > 0 and r["step_over_forward"] > 0 and r["peak_mem_mb"] > 0
    assert {r["variant"] for r in rows} >= {"official", "fused"}
    json.dumps(rows)                                   # the JSON array is plain data
    text = bench.format_table(rows)
    assert "official" in text and "fused" in text


def test_plan_skips_what_a_cpu_cannot_run_quickly():
    todo, skipped = bench.plan(torch.device("cpu"), True)
    names = {v for _, v in todo}
    assert "cuda_graphs" not in names and "compiled" not in names and "all" not in names
    assert all(why for _, _, why in skipped)
    assert {v for _, v, _ in skipped} >= {"cuda_graphs", "compiled", "all"}


def test_plot_is_a_png(tmp_path):
    rows = [{"variant": v, "preset": p, "batch": 2, "K": K, "device": "cpu", "images_nfe_per_s": 1.0 + i,
             "step_over_forward": 1.0, "peak_mem_mb": 1.0}
            for i, v in enumerate(("official", "fused")) for p in ("mnist", "cifar10") for K in (0, 2)]
    out = bench.plot_bars(rows, tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bench_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--json" in out and "--device" in out


def test_cli_bench_bad_device_is_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    assert main(["bench", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_throughput_script_help():
    out = subprocess.run([sys.executable, "benchmarks/throughput.py", "--help"], capture_output=True, text=True,
                         cwd=__import__("pathlib").Path(__file__).resolve().parents[1], timeout=60)
    assert out.returncode == 0 and "--num-aug" in out.stdout
