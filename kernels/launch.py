"""Launch geometry shared by the one-pass pixel kernels."""
import contextlib

import torch
import triton


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
