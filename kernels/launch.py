"""Launch geometry shared by the one-pass pixel kernels, and the in-kernel step-index check."""
import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def checked_step(step_ptr, steps):
    """(row index, poison) for the step read on the device: a step outside [0, steps) reads row 0
    and gets poison = NaN (added to every output, as the CUDA kernels do); else poison = 0."""
    step = tl.load(step_ptr)
    bad = (step < 0) | (step >= steps)
    nan = tl.full([], 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
    return tl.where(bad, 0, step), tl.where(bad, nan, 0.0)


NUM_WARPS = 4                  # every pixel kernel: 128 threads per program
THREADS = 32 * NUM_WARPS
# Pixels per thread, by tile rows KP1, for the kernels that accumulate a (KP1, BLOCK) tile of outer
# products while drawing one Philox normal at a time (exp_step, prior): with these, every K = 0..8 stays
# within ~64 registers on sm_90 with no spills (benchmarks/triton_aot.py; RESULTS.md has before/after).
TILE_PIXELS_PER_THREAD = {1: 4, 2: 2, 4: 2}


def tile_pixels_per_thread(tile_rows, wide):
    """TILE_PIXELS_PER_THREAD, and 1 with 64-bit offsets (twice the address registers: at 2 pixels per
    thread exp_step K = 2, 3 spilled 8 bytes on sm_80)."""
    return 1 if wide else TILE_PIXELS_PER_THREAD.get(tile_rows, 1)


def block_size(tile_rows, pixels_per_thread=None):
    """Pixels per program at full size. Default: at most 16 tile elements and 4 pixels per thread
    (ptxas sm_90 gave 72 registers for em_step at K = 3 with BLOCK 512 against 153 with BLOCK 1024);
    a kernel whose registers grow faster (exp_step) passes its own ``pixels_per_thread``."""
    if pixels_per_thread is None:
        pixels_per_thread = max(1, min(4, 16 // tile_rows))
    return THREADS * pixels_per_thread


def pixel_launch(n_pixels, tile_rows, device, pixels_per_thread=None):
    """(BLOCK, grid, device guard) for a kernel holding ``tile_rows`` values per pixel in registers.

    Tiny inputs get a block no larger than needed. benchmarks/triton_aot.py compiles every kernel
    at the full-size block and reports registers and spills.
    """
    block = min(block_size(tile_rows, pixels_per_thread), max(triton.next_power_of_2(n_pixels), 16))
    grid = (triton.cdiv(n_pixels, block),)
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    return block, grid, guard
