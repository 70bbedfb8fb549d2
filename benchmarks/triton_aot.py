"""Ahead-of-time compile of every Triton kernel specialisation the engine launches; no GPU needed.

For each kernel (em_step, prior, noising, exp_step), every K = 0..8, order 1..3, sde/ode, Philox
or given noise, narrow (int32) or wide (int64) offsets, at the block size and warps the launcher
uses for a full-size input: ``triton.compile(..., target=GPUTarget("cuda", arch, 32))``, then
ptxas -v on the PTX (Triton's bundled ptxas) for registers, stack frame and spills, and Triton's
metadata for shared memory. Writes one JSON row per (kernel, specialisation, arch).

    python benchmarks/triton_aot.py --json benchmarks/triton_aot.json               # everything: sm_90a, sm_80, sm_100a
    python benchmarks/triton_aot.py --subset --arch 90                               # the CI-sized set
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"          # compile, never interpret (must precede the triton import)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gfdm_fast.layout import MAX_K_SPECIALISED

POINTERS_I64 = {"step_ptr", "seeds_ptr"}
SCALARS = {"steps", "N", "CHW"}


def _module(kernel):
    from gfdm_fast.kernels import em_step, exp_step, noising, prior
    return {"em_step": em_step, "prior": prior, "noising": noising, "exp_step": exp_step}[kernel]


def specialisations(subset=False):
    """Every (kernel, constexprs) the launchers in kernels/ can produce (subset: a representative few)."""
    Ks = (0, 1, 3, 8) if subset else range(MAX_K_SPECIALISED + 1)
    wides = (False,) if subset else (False, True)
    for K in Ks:
        for wide in wides:
            for has_noise in (False, True):
                yield "em_step", dict(K=K, KP=triton.next_power_of_2(max(K, 1)), HAS_NOISE=has_noise, WIDE=wide)
                yield "prior", dict(K=K, KP1=triton.next_power_of_2(K + 1), HAS_NOISE=has_noise, WIDE=wide)
            for R in ((2,) if subset and K != 3 else (1, 2, 3)):
                for noisy, has_noise in ((False, False), (True, False), (True, True)):
                    if subset and has_noise:
                        continue
                    yield "exp_step", dict(K=K, KP1=triton.next_power_of_2(K + 1), R=R, NOISY=noisy,
                                           HAS_NOISE=has_noise, WIDE=wide)
    for wide in wides:
        for has_eps in (False, True):
            yield "noising", dict(HAS_EPS=has_eps, WIDE=wide)


def launch_block(kernel, const):
    """The BLOCK the launcher picks for a full-size input (kernels/launch.py)."""
    from gfdm_fast.kernels import launch
    if kernel == "noising":
        return launch.block_size(1)
    if kernel == "em_step":
        return launch.block_size(const["KP"])
    # exp_step, prior
    return launch.block_size(const["KP1"], launch.tile_pixels_per_thread(const["KP1"], const["WIDE"]))


def _ptxas(arch):
    """The ptxas Triton itself uses for ``arch`` (a separate one for sm_100+ in Triton >= 3.5)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    except ImportError:
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_one(kernel, const, arch):
    from gfdm_fast.kernels import launch
    mod = _module(kernel)
    fn = getattr(mod, f"_{kernel}_kernel")
    const = dict(const, BLOCK=launch_block(kernel, const))
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name in SCALARS:
            sig[name] = "i64" if const.get("WIDE") and name == "N" else "i32"
        else:
            sig[name] = "*i64" if name in POINTERS_I64 else "*fp32"
    # torch tensors are 16-byte aligned: the launcher specialises pointers that way
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n].startswith("*")}
    t0 = time.perf_counter()
    ck = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                        options={"num_warps": launch.NUM_WARPS})
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        ptx = Path(d) / "k.ptx"
        ptx.write_text(ck.asm["ptx"])
        proc = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={gpu}", str(ptx), "-o", str(Path(d) / "k.cubin")],
                              capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {kernel} {const} {gpu}:\n{log[-2000:]}")
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"kernel": kernel, **const, "num_warps": launch.NUM_WARPS, "arch": gpu,
            "registers": int(regs.group(1)), "stack": int(frame.group(1)), "spill_stores": int(frame.group(2)),
            "spill_loads": int(frame.group(3)), "shared": int(ck.metadata.shared),
            "compile_s": round(time.perf_counter() - t0, 2)}


def _compile_args(args):
    return compile_one(*args)


def known_archs(wanted):
    """The requested archs this Triton can target (a version without sm_100 support is skipped)."""
    out = []
    for arch in wanted:
        try:
            from triton.backends.nvidia.compiler import CUDABackend
            CUDABackend(GPUTarget("cuda", arch, 32))
            out.append(arch)
        except Exception as err:  # report, don't fail
            print(f"triton {triton.__version__} cannot target sm_{arch}: {err}", file=sys.stderr)
    return out


def run(archs=(90, 80, 100), subset=False, jobs=1):
    archs = known_archs(archs)
    work = [(k, c, a) for a in archs for k, c in specialisations(subset)]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            return list(pool.map(_compile_args, work))
    return [compile_one(*w) for w in work]


def summary(rows):
    """Max registers and total spills per (kernel, K, arch)."""
    lines = ["kernel     arch    K  max_regs  max_stack  spills  max_shared"]
    keys = sorted({(r["kernel"], r["arch"], r.get("K", -1)) for r in rows})
    for kernel, arch, K in keys:
        sel = [r for r in rows if (r["kernel"], r["arch"], r.get("K", -1)) == (kernel, arch, K)]
        lines.append(f"{kernel:<10} {arch:<7} {'' if K < 0 else K:>2} {max(r['registers'] for r in sel):>9}"
                     f" {max(r['stack'] for r in sel):>10} {sum(r['spill_stores'] + r['spill_loads'] for r in sel):>7}"
                     f" {max(r['shared'] for r in sel):>11}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80, 100], help="compute capabilities (90 = sm_90a)")
    ap.add_argument("--subset", action="store_true", help="a representative subset (CI)")
    ap.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(args.arch, args.subset, args.jobs)
    print(summary(rows))
    print(f"{len(rows)} compiles with triton {triton.__version__} in {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1))
    spills = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    for r in spills:
        print("SPILL:", r, file=sys.stderr)
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
