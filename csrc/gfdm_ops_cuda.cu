// gfdm_fast._C CUDA kernels: the fused Euler-Maruyama step, the prior draw, the training noising and
// the exponential-integrator step.
//
// The same ops as csrc/gfdm_ops.cpp (defined by gfdm_fast.reference, gfdm_fast.schedule,
// gfdm_fast.expint and gfdm_fast.philox); gfdm_ops.cpp checks the arguments and calls the launchers
// below with raw pointers and the current stream, so this file needs no torch headers and compiles
// on its own.
// `step` is read on the device (no host sync: a step can be captured in a CUDA graph); a step
// outside the table cannot raise without a sync, so it writes NaN instead of reading past the table.
// The per-pixel arithmetic is csrc/gfdm_shared.h's, which the CPU build runs too; setup.py compiles with
// --fmad=false (no --use_fast_math), so nvcc contracts nothing and rounds as the CPU does.
#include <cuda_runtime.h>

#include <cstdint>

#include "gfdm_shared.h"  // layout, streams, the K switch, Philox + normal, per-pixel updates (shared with the .cpp)

namespace gfdm {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ Key key_of(const int64_t* seeds, int64_t b) { return gfdm::key_of(seeds[b]); }

// Grid: x over the pixels of one image (grid-stride), y over images (grid-stride), so the Philox
// key and element index need no division.
#define GFDM_FOR_PIXELS(B, P)                                                                        \
  for (int64_t b = blockIdx.y; b < (B); b += gridDim.y)                                              \
    for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < (P); p += int64_t(gridDim.x) * blockDim.x)

// Planes X = z, Y_k = z + (k+1) N with N = B P. KT >= 0: K fixed at compile time (registers);
// KT < 0: any K, reading each Y plane twice.
template <int KT>
__global__ void __launch_bounds__(kThreads) em_step_kernel(float* __restrict__ z, const float* __restrict__ e,
                                                           float* __restrict__ x_in,
                                                           const float* __restrict__ table, int64_t steps,
                                                           const int64_t* __restrict__ step,
                                                           const int64_t* __restrict__ seeds,
                                                           const float* __restrict__ noise, int64_t B, int64_t P,
                                                           int K_runtime) {
  const int K = KT >= 0 ? KT : K_runtime;
  const int64_t n = *step;
  const bool bad = n < 0 || n >= steps;
  const float* __restrict__ r = table + (bad ? 0 : n) * em_row_width(K);
  const float poison = bad ? __int_as_float(0x7fc00000) : 0.0f;
  const float nx = r[COL_NX], ny = r[COL_NY];
  const bool draw = noise == nullptr && (nx != 0.0f || ny != 0.0f);  // ode / last step: no Philox work
  const int64_t N = B * P;
  constexpr int KA = KT > 0 ? KT : 1;
  const EmCoef<KT >= 0 ? KT : 0> co(r);  // K fixed: the row's coefficients once per thread
  GFDM_FOR_PIXELS(B, P) {
    const int64_t i = b * P + p;
    float xi = 0.0f;
    if (noise) {
      xi = noise[i];
    } else if (draw) {
      const Key key = key_of(seeds, b);
      xi = philox_normal(uint32_t(p), uint32_t(n), kStreamEm, 0, key.k0, key.k1);
    }
    float xn, xin;
    if constexpr (KT >= 0) {  // the per-pixel update of csrc/gfdm_shared.h, as the CPU runs it
      float y[KA];
#pragma unroll
      for (int k = 0; k < KT; ++k) y[k] = z[(k + 1) * N + i];
      xn = em_pixel<KT>(co, z[i], e[i], xi, y, xin);
#pragma unroll
      for (int k = 0; k < KT; ++k) z[(k + 1) * N + i] = y[k] + poison;
    } else {
      const float ax = r[COL_AX], cg0 = r[COL_CG0], c = r[COL_C], u = r[COL_U];
      float qy = 0.0f, by = 0.0f;
      for (int k = 0; k < K; ++k) {
        const float y = z[(k + 1) * N + i];
        qy += r[kEmFixed + 2 * K + k] * y;
        by += r[kEmFixed + k] * y;
      }
      const float gs = u * e[i] - qy;
      xn = ax * z[i] + by + cg0 * gs + nx * xi;
      float ay_sum = 0.0f;
      for (int k = 0; k < K; ++k) {
        const float yn = r[kEmFixed + K + k] * z[(k + 1) * N + i] + c * gs + ny * xi;
        z[(k + 1) * N + i] = yn + poison;
        ay_sum += r[kEmFixed + 3 * K + k] * yn;
      }
      xin = xn - ay_sum;
    }
    z[i] = xn + poison;
    x_in[i] = xin + poison;  // next network input X' - alpha_next . Y'
  }
}

// z = L xi per pixel (xi_c: Philox stream 1, step 0, component c; or noise plane c), x_in = X - alpha_0 . Y.
template <int KT>
__global__ void __launch_bounds__(kThreads) prior_kernel(float* __restrict__ z, float* __restrict__ x_in,
                                                         const float* __restrict__ prior,
                                                         const int64_t* __restrict__ seeds,
                                                         const float* __restrict__ noise, int64_t B, int64_t P,
                                                         int K_runtime) {
  const int K = KT >= 0 ? KT : K_runtime, n = K + 1;
  const int64_t N = B * P;
  const float* __restrict__ L = prior;              // (K+1)^2 row-major
  const float* __restrict__ alpha0 = prior + n * n;  // K
  GFDM_FOR_PIXELS(B, P) {
    const int64_t i = b * P + p;
    Key key{0, 0};
    if (!noise) key = key_of(seeds, b);
    float xin = 0.0f;
    if constexpr (KT >= 0) {  // the per-pixel draw of csrc/gfdm_shared.h, as the CPU runs it
      float zr[KT + 1];
      xin = prior_pixel<KT + 1>(KT + 1, L, alpha0, [&](int c) {
        return noise ? noise[c * N + i] : philox_normal(uint32_t(p), 0, kStreamPrior, uint32_t(c), key.k0, key.k1);
      }, zr);
#pragma unroll
      for (int row = 0; row <= KT; ++row) z[row * N + i] = zr[row];
    } else {
      // any K: accumulate L[:, c] xi_c into the planes, one component at a time
      for (int c = 0; c < n; ++c) {
        const float xc = noise ? noise[c * N + i] : philox_normal(uint32_t(p), 0, kStreamPrior, uint32_t(c), key.k0, key.k1);
        for (int row = 0; row < n; ++row) z[row * N + i] = (c ? z[row * N + i] : 0.0f) + L[row * n + c] * xc;
      }
      for (int row = 0; row < n; ++row) xin += row ? -alpha0[row - 1] * z[row * N + i] : z[i];
    }
    x_in[i] = xin;
  }
}

// x_in = c x0 + sigma_c eps, eps_out = eps (Philox stream 2 at `step`, or the given eps).
__global__ void __launch_bounds__(kThreads) noising_kernel(const float* __restrict__ x0,
                                                           const float* __restrict__ mean_scale,
                                                           const float* __restrict__ sigma_c,
                                                           const int64_t* __restrict__ seeds,
                                                           const int64_t* __restrict__ step,
                                                           const float* __restrict__ eps, float* __restrict__ x_in,
                                                           float* __restrict__ eps_out, int64_t B, int64_t P) {
  const uint32_t n = eps ? 0u : uint32_t(uint64_t(*step));
  GFDM_FOR_PIXELS(B, P) {
    const int64_t i = b * P + p;
    float ep;
    if (eps) {
      ep = eps[i];
    } else {
      const Key key = key_of(seeds, b);
      ep = philox_normal(uint32_t(p), n, kStreamTrain, 0, key.k0, key.k1);
    }
    eps_out[i] = ep;
    x_in[i] = noising_pixel(mean_scale[b], sigma_c[b], x0[i], ep);
  }
}

// Exponential-integrator step (reference.exp_step_planar; row layout of gfdm_fast.expint): per pixel
// d = p x_in + q e, Z' = Phi Z + w_cur d + sum_s w_hist[s] hist[s] (+ L xi when noisy; xi_c: Philox
// stream 3, component c, or noise plane c), hist[step mod (R-1)] = d, x_in = X' - alpha_next . Y'.
// Each row of Z' accumulates w_cur d, the history, L xi one component at a time (so only one normal
// is live), then Phi Z column by column: Z is read in full before it is written.
// KT >= 0: K fixed at compile time (unrolled, Z' in registers, the row staged in shared memory);
// KT < 0: any K up to kExpCudaMaxK1 - 1, the row read from global memory, Z' in a local array.

template <int KT>
__global__ void __launch_bounds__(kThreads) exp_step_kernel(float* __restrict__ z, const float* __restrict__ e,
                                                            float* __restrict__ x_in, float* __restrict__ hist,
                                                            const float* __restrict__ table, int64_t steps,
                                                            const int64_t* __restrict__ step, int R,
                                                            const int64_t* __restrict__ seeds,
                                                            const float* __restrict__ noise, bool noisy, int64_t B,
                                                            int64_t P, int K_runtime) {
  const int K = KT >= 0 ? KT : K_runtime, K1 = K + 1, nh = R - 1, width = exp_row_width(K, R);
  constexpr int KC = KT >= 0 ? KT + 1 : kExpCudaMaxK1;
  const int64_t n = *step;
  const bool bad = n < 0 || n >= steps;
  const float* __restrict__ r = table + (bad ? 0 : n) * width;
  if constexpr (KT >= 0) {
    __shared__ float srow[exp_row_width(KT, 3)];
    for (int j = threadIdx.x; j < width; j += blockDim.x) srow[j] = r[j];
    __syncthreads();
    r = srow;
  }
  const float poison = bad ? __int_as_float(0x7fc00000) : 0.0f;
  const int64_t slot = nh > 0 && !bad ? n % nh : 0;
  const bool draw = noisy && noise == nullptr;
  const int64_t N = B * P;
  // row offsets: Phi, w_cur, w_hist, L, alpha_next
  const ExpOffsets o = exp_offsets(K1, nh);
  const int oP = o.phi, ow = o.w, oh = o.h, oL = o.L, oa = o.a;
  GFDM_FOR_PIXELS(B, P) {
    const int64_t i = b * P + p;
    const float d = exp_data_prediction(r[0], r[1], x_in[i], e[i]);  // x_in read before it is overwritten
    float zn[KC];
#pragma unroll
    for (int rw = 0; rw < K1; ++rw) zn[rw] = r[ow + rw] * d;
#pragma unroll
    for (int s = 0; s < 2; ++s) {  // nh <= 2 (order <= 3): unrolled, so zn stays in registers
      if (s >= nh) break;
      const float h = hist[s * N + i];
#pragma unroll
      for (int rw = 0; rw < K1; ++rw) zn[rw] += r[oh + s * K1 + rw] * h;
    }
    if (noisy) {
      const Key key = draw ? key_of(seeds, b) : Key{0, 0};
#pragma unroll 1
      for (int c = 0; c < K1; ++c) {  // not unrolled: K+1 interleaved Philox chains cost registers
        const float xc = draw ? philox_normal(uint32_t(p), uint32_t(n), kStreamExp, uint32_t(c), key.k0, key.k1)
                              : noise[c * N + i];
#pragma unroll
        for (int rw = 0; rw < K1; ++rw) zn[rw] += r[oL + rw * K1 + c] * xc;  // the full L, as the reference
      }
    }
    // + Phi Z and the next input: the per-pixel update of csrc/gfdm_shared.h, as the CPU runs it
    const float xin = exp_pixel<KT >= 0 ? KT + 1 : 0>(K1, r + oP, r + oa, [&](int c) { return z[c * N + i]; }, zn);
#pragma unroll
    for (int rw = 0; rw < K1; ++rw) z[rw * N + i] = zn[rw] + poison;
    if (nh > 0) hist[slot * N + i] = d + poison;
    x_in[i] = xin + poison;  // next network input X' - alpha_next . Y'
  }
}

dim3 grid_for(int64_t B, int64_t P) {
  const int64_t gx = (P + kThreads - 1) / kThreads;
  return dim3(unsigned(gx < 65535 ? gx : 65535), unsigned(B < 65535 ? B : 65535));
}

const char* launch_status() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

// ---- launchers (declared in csrc/gfdm_ops.cpp) --------------------------------------------------
const char* em_step_cuda_launch(float* z, const float* e, float* x_in, const float* table, int64_t steps,
                                const int64_t* step, const int64_t* seeds, const float* noise, int64_t B,
                                int64_t P, int K, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
#define GFDM_LAUNCH_EM(KT) \
  em_step_kernel<KT><<<grid_for(B, P), kThreads, 0, s>>>(z, e, x_in, table, steps, step, seeds, noise, B, P, K)
  GFDM_SWITCH_K(K, GFDM_LAUNCH_EM)
#undef GFDM_LAUNCH_EM
  return launch_status();
}

const char* prior_cuda_launch(float* z, float* x_in, const float* prior, const int64_t* seeds, const float* noise,
                              int64_t B, int64_t P, int K, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
#define GFDM_LAUNCH_PRIOR(KT) \
  prior_kernel<KT><<<grid_for(B, P), kThreads, 0, s>>>(z, x_in, prior, seeds, noise, B, P, K)
  GFDM_SWITCH_K(K, GFDM_LAUNCH_PRIOR)
#undef GFDM_LAUNCH_PRIOR
  return launch_status();
}

const char* noising_cuda_launch(const float* x0, const float* mean_scale, const float* sigma_c,
                                const int64_t* seeds, const int64_t* step, const float* eps, float* x_in,
                                float* eps_out, int64_t B, int64_t P, void* stream) {
  noising_kernel<<<grid_for(B, P), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      x0, mean_scale, sigma_c, seeds, step, eps, x_in, eps_out, B, P);
  return launch_status();
}

const char* exp_step_cuda_launch(float* z, const float* e, float* x_in, float* hist, const float* table,
                                 int64_t steps, const int64_t* step, int order, const int64_t* seeds,
                                 const float* noise, bool noisy, int64_t B, int64_t P, int K, void* stream) {
  if (order < 1 || order > 3) return "exp_step: order must be 1, 2 or 3";
  if (K < 0 || K + 1 > kExpCudaMaxK1) return "exp_step: K + 1 exceeds the kernel's bound of 64 planes";
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
#define GFDM_LAUNCH_EXP(KT)                                                                                 \
  exp_step_kernel<KT><<<grid_for(B, P), kThreads, 0, s>>>(z, e, x_in, hist, table, steps, step, order, seeds, \
                                                          noise, noisy, B, P, K)
  GFDM_SWITCH_K(K, GFDM_LAUNCH_EXP)
#undef GFDM_LAUNCH_EXP
  return launch_status();
}

}  // namespace gfdm
