"""The one home of the step-table layout and the Philox stream numbers (pure constants, no imports).

Every backend (gfdm_fast.reference, the Triton kernels in kernels/, csrc/gfdm_shared.h) and every
caller that draws counter-based noise (sampler labels, training times/noise) takes these from here;
csrc/gfdm_shared.h mirrors them for C++/CUDA and tests/test_cuda_build.py checks the two agree.

Euler-Maruyama row (gfdm_fast.schedule): [a_x, cG0, c, u, nx, ny, b(K), a_y(K), q(K), alpha_next(K)].
Exponential-integrator row (gfdm_fast.expint), order R:
[p, q, Phi ((K+1)^2 row-major), w_cur (K+1), w_hist ((R-1)(K+1)), L ((K+1)^2 row-major), alpha_next (K)].
"""

# ---- Euler-Maruyama rows -------------------------------------------------------------------------
EM_FIXED = 6          # a_x, cG0, c, u, nx, ny
COL_AX, COL_CG0, COL_C, COL_U, COL_NX, COL_NY = range(EM_FIXED)


def em_row_width(num_aug):
    return EM_FIXED + 4 * num_aug


# ---- exponential-integrator rows -----------------------------------------------------------------
EXP_FIXED = 2         # p, q of the data prediction d = p x_in + q e


def exp_offsets(num_aug, order):
    """Column offsets (Phi, w_cur, w_hist, L, alpha_next, row width) of an exp row for K, order R."""
    k1 = num_aug + 1
    o_phi = EXP_FIXED
    o_w = o_phi + k1 * k1
    o_h = o_w + k1
    o_l = o_h + (order - 1) * k1
    o_a = o_l + k1 * k1
    return o_phi, o_w, o_h, o_l, o_a, o_a + num_aug


def exp_row_width(num_aug, order):
    return exp_offsets(num_aug, order)[-1]


# ---- kernel specialisation -----------------------------------------------------------------------
MAX_K_SPECIALISED = 8   # the compiled kernels have one variant per K = 0..8 (the K switch); above, generic code
EXP_CUDA_MAX_K1 = 64    # the CUDA generic-K exp kernel keeps K+1 values per pixel in a fixed array

# ---- Philox streams (counter word 2) -------------------------------------------------------------
STREAM_EM = 0         # Euler-Maruyama step noise
STREAM_PRIOR = 1      # prior draw
STREAM_TRAIN = 2      # training noise (component 0) and training times (component 1)
STREAM_EXP = 3        # exponential-integrator step noise
STREAM_LABEL = 4      # class labels drawn from the image seed
