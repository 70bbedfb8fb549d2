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


def pixel_launch(n_pixels, tile_rows, device):
    """(BLOCK, grid, device guard) for a kernel holding ``tile_rows`` values per pixel in registers.

    At most 16 tile elements per thread with 4 warps: ptxas sm_90 gave 72 registers for em_step at
    K = 3 with BLOCK 512 against 153 with BLOCK 1024. Tiny inputs get a block no larger than needed.
    """
    block = min(512, 2048 // tile_rows)
    block = min(block, max(triton.next_power_of_2(n_pixels), 16))
    grid = (triton.cdiv(n_pixels, block),)
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    return block, grid, guard
