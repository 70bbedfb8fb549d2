// gfdm_fast._C: the fused GFDM sampler ops on CPU (OpenMP over pixels), and the CUDA entry points
// (csrc/gfdm_ops_cuda.cu) when built with -DGFDM_WITH_CUDA.
//
// What is computed is defined by gfdm_fast.reference (em_step_planar, prior_planar, noising,
// exp_step_planar), the step-table row layouts by gfdm_fast.schedule and gfdm_fast.expint, the noise
// by gfdm_fast.philox:
//   Philox4x32-10, counter (element, step, stream, component), key (seed low32, seed high32),
//   u = ((x >> 9) * 2 + 1) 2^-24, normal = sqrt(-2 ln u0) cos(2 pi u1) in float32.
// log and cos (csrc/gfdm_shared.h) are branch-free series in double rounded once to float32
// (correctly rounded on all 2^23 uniforms Philox can produce, checked exhaustively), so the noise
// loop vectorises (glibc's logf/cosf are scalar calls) and matches torch's float32 transform to
// its own rounding. x86 CPUs with AVX2+FMA run an intrinsics Philox (philox_fill_avx2), others the
// portable loop; GFDM_CPU_ISA=generic forces the portable one.
#include <torch/extension.h>

#include "gfdm_shared.h"  // layout, streams, Philox + normal, per-pixel updates: shared with the .cu

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef GFDM_WITH_CUDA
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs the cuBLAS/cuSPARSE headers
#include <c10/cuda/CUDAGuard.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && !defined(__NO_MATH_ERRNO__)
#warning "gfdm_ops.cpp: compile with -fno-math-errno (setup.py does) or sqrtf keeps the Philox loop scalar"
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define GFDM_X86 1
#include <immintrin.h>
#define GFDM_INLINE inline __attribute__((always_inline))
#define GFDM_AVX2 __attribute__((target("avx2,fma")))
#else
#define GFDM_X86 0
#define GFDM_INLINE inline
#define GFDM_AVX2
#endif

namespace gfdm {

#ifdef GFDM_WITH_CUDA
// csrc/gfdm_ops_cuda.cu: launchers on the given stream, raw pointers only (the .cu needs no torch
// headers); they return nullptr or the CUDA error string. Arguments are checked here first.
const char* em_step_cuda_launch(float* z, const float* e, float* x_in, const float* table, int64_t steps,
                                const int64_t* step, const int64_t* seeds, const float* noise, int64_t B,
                                int64_t P, int K, void* stream);
const char* prior_cuda_launch(float* z, float* x_in, const float* prior, const int64_t* seeds, const float* noise,
                              int64_t B, int64_t P, int K, void* stream);
const char* noising_cuda_launch(const float* x0, const float* mean_scale, const float* sigma_c,
                                const int64_t* seeds, const int64_t* step, const float* eps, float* x_in,
                                float* eps_out, int64_t B, int64_t P, void* stream);
// order in 1..3 (hist: max(order-1, 1) planes); noise (K+1 planes) or seeds only read when noisy
const char* exp_step_cuda_launch(float* z, const float* e, float* x_in, float* hist, const float* table,
                                 int64_t steps, const int64_t* step, int order, const int64_t* seeds,
                                 const float* noise, bool noisy, int64_t B, int64_t P, int K, void* stream);
#endif

namespace {

constexpr int64_t kChunk = 1024;  // pixels per task: Philox buffer stays in L1 (4 KiB)

// out[j] = normal(element elem0 + j, step, stream, component) for one image's key.
GFDM_INLINE void philox_fill(float* __restrict out, int64_t elem0, int len, uint32_t step, uint32_t stream,
                             uint32_t comp, Key key) {
  const uint32_t e0 = uint32_t(elem0);
#pragma omp simd
  for (int j = 0; j < len; ++j) out[j] = philox_normal(e0 + uint32_t(j), step, stream, comp, key.k0, key.k1);
}

#if GFDM_X86
// The same normals, 8 lanes of AVX2 intrinsics. GCC does vectorise the loop above, but turns the
// 32x32 -> 64-bit Philox products into shuffle chains and keeps cos scalar (measured here: 35 ns
// per normal on one core, against the memory floor of ~6 ns per pixel per step at K = 3).
GFDM_AVX2 inline void mulhilo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                          // lanes 0, 2, 4, 6 as 64-bit
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);    // lanes 1, 3, 5, 7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

GFDM_AVX2 inline __m256 uniform8(__m256i x) {
  const __m256i m = _mm256_or_si256(_mm256_slli_epi32(_mm256_srli_epi32(x, 9), 1), _mm256_set1_epi32(1));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(m), _mm256_set1_ps(kTwoPowM24F));
}

// log_pos on 4 lanes: f = m - 1 and k as in log_pos, the series in double.
GFDM_AVX2 inline __m128 log_half(__m128 f4, __m128i k4) {
  const __m256d f = _mm256_cvtps_pd(f4);
  const __m256d s = _mm256_div_pd(f, _mm256_add_pd(f, _mm256_set1_pd(2.0)));
  const __m256d z = _mm256_mul_pd(s, s), s2 = _mm256_add_pd(s, s);
  __m256d p = _mm256_set1_pd(log_coef(0));
  for (int i = 1; i < kLogTerms; ++i) p = _mm256_fmadd_pd(p, z, _mm256_set1_pd(log_coef(i)));
  const __m256d lm = _mm256_fmadd_pd(_mm256_mul_pd(s2, z), p, s2);
  return _mm256_cvtpd_ps(_mm256_fmadd_pd(_mm256_cvtepi32_pd(k4), _mm256_set1_pd(kLn2), lm));
}

GFDM_AVX2 inline __m256 log8(__m256 u) {
  __m256i ix = _mm256_add_epi32(_mm256_castps_si256(u), _mm256_set1_epi32(int(kOneBits - kSqrtHalfBits)));
  const __m256i k = _mm256_sub_epi32(_mm256_srli_epi32(ix, 23), _mm256_set1_epi32(0x7f));
  ix = _mm256_add_epi32(_mm256_and_si256(ix, _mm256_set1_epi32(int(kMantissaMask))), _mm256_set1_epi32(int(kSqrtHalfBits)));
  const __m256 f = _mm256_sub_ps(_mm256_castsi256_ps(ix), _mm256_set1_ps(1.0f));
  return _mm256_set_m128(log_half(_mm256_extractf128_ps(f, 1), _mm256_extracti128_si256(k, 1)),
                         log_half(_mm256_castps256_ps128(f), _mm256_castsi256_si128(k)));
}

// cos_2pi on 4 lanes: x, the quadrant kf and k as in cos_2pi, reduction and polynomials in double.
GFDM_AVX2 inline __m128 cos_half(__m128 x4, __m128 kf4, __m128i k4) {
  const __m256d r = _mm256_fnmadd_pd(_mm256_cvtps_pd(kf4), _mm256_set1_pd(kHalfPi), _mm256_cvtps_pd(x4));
  const __m256d z = _mm256_mul_pd(r, r);
  __m256d ps = _mm256_set1_pd(sin_coef(0)), pc = _mm256_set1_pd(cos_coef(0));
  for (int i = 1; i < kSinTerms; ++i) ps = _mm256_fmadd_pd(ps, z, _mm256_set1_pd(sin_coef(i)));
  for (int i = 1; i < kCosTerms; ++i) pc = _mm256_fmadd_pd(pc, z, _mm256_set1_pd(cos_coef(i)));
  const __m256d s = _mm256_fmadd_pd(_mm256_mul_pd(r, z), ps, r);
  const __m256d c = _mm256_fmadd_pd(z, pc, _mm256_set1_pd(1.0));
  const __m128i odd = _mm_cmpeq_epi32(_mm_and_si128(k4, _mm_set1_epi32(1)), _mm_set1_epi32(1));
  return _mm256_cvtpd_ps(_mm256_blendv_pd(c, s, _mm256_castsi256_pd(_mm256_cvtepi32_epi64(odd))));
}

GFDM_AVX2 inline __m256 cos2pi8(__m256 u) {
  const __m256 x = _mm256_mul_ps(_mm256_set1_ps(kTwoPiF), u);
  const __m256 kf = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kTwoOverPiF)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i k = _mm256_cvtps_epi32(kf);
  const __m256 v = _mm256_set_m128(
      cos_half(_mm256_extractf128_ps(x, 1), _mm256_extractf128_ps(kf, 1), _mm256_extracti128_si256(k, 1)),
      cos_half(_mm256_castps256_ps128(x), _mm256_castps256_ps128(kf), _mm256_castsi256_si128(k)));
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(_mm256_add_epi32(k, _mm256_set1_epi32(1)), _mm256_set1_epi32(2)), 30);
  return _mm256_xor_ps(v, _mm256_castsi256_ps(sign));  // quadrants 0..3: c, -s, -c, s
}

GFDM_AVX2 void philox_fill_avx2(float* __restrict out, int64_t elem0, int len, uint32_t step, uint32_t stream,
                                uint32_t comp, Key key) {
  const uint32_t e0 = uint32_t(elem0);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i m0 = _mm256_set1_epi32(int(kPhiloxM0)), m1 = _mm256_set1_epi32(int(kPhiloxM1));
  int j = 0;
  // two independent 8-lane blocks per iteration: one block's 10 rounds are a latency-bound chain
  for (; j + 16 <= len; j += 16) {
    __m256i c0[2], c1[2], c2[2], c3[2];
    for (int v = 0; v < 2; ++v) {
      c0[v] = _mm256_add_epi32(_mm256_set1_epi32(int(e0 + uint32_t(j + 8 * v))), lane);
      c1[v] = _mm256_set1_epi32(int(step));
      c2[v] = _mm256_set1_epi32(int(stream));
      c3[v] = _mm256_set1_epi32(int(comp));
    }
    uint32_t k0 = key.k0, k1 = key.k1;
#pragma GCC unroll 10
    for (int r = 0; r < kPhiloxRounds; ++r) {
      const __m256i kk0 = _mm256_set1_epi32(int(k0)), kk1 = _mm256_set1_epi32(int(k1));
#pragma GCC unroll 2
      for (int v = 0; v < 2; ++v) {
        __m256i hi0, lo0, hi1, lo1;
        mulhilo8(c0[v], m0, hi0, lo0);
        mulhilo8(c2[v], m1, hi1, lo1);
        c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[v]), kk0);
        c1[v] = lo1;
        c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[v]), kk1);
        c3[v] = lo0;
      }
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) {
      const __m256 r = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), log8(uniform8(c0[v]))));
      _mm256_storeu_ps(out + j + 8 * v, _mm256_mul_ps(r, cos2pi8(uniform8(c1[v]))));
    }
  }
  for (; j < len; ++j) out[j] = philox_normal(e0 + uint32_t(j), step, stream, comp, key.k0, key.k1);
}
#endif

// The Philox fill of the ISA a task body is compiled for.
template <bool Avx2>
GFDM_INLINE void fill_normals(float* __restrict out, int64_t elem0, int len, uint32_t step, uint32_t stream,
                              uint32_t comp, Key key) {
#if GFDM_X86
  if constexpr (Avx2) return philox_fill_avx2(out, elem0, len, step, stream, comp, key);
#endif
  philox_fill(out, elem0, len, step, stream, comp, key);
}

// Work is split into tasks of kChunk pixels inside one image, so one task has one Philox key.
struct Tiling {
  int64_t P, chunks;
  int64_t tasks(int64_t B) const { return B * chunks; }
};
inline Tiling tiling(int64_t P) { return {P, std::max<int64_t>(1, (P + kChunk - 1) / kChunk)}; }

struct Task { int64_t b, p0; int len; int64_t off; };
GFDM_INLINE Task task_of(const Tiling& t, int64_t i) {
  const int64_t b = i / t.chunks, p0 = (i - b * t.chunks) * kChunk;
  return {b, p0, int(std::min<int64_t>(kChunk, t.P - p0)), b * t.P + p0};
}

bool cpu_has_avx2() {
#if GFDM_X86
  static const bool ok = [] {
    const char* isa = std::getenv("GFDM_CPU_ISA");  // "generic" forces the baseline build (for tests)
    if (isa && std::strcmp(isa, "generic") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}

// Run fn(args, task) for every task, OpenMP over tasks with torch's thread count.
template <class Args>
void run_tasks(void (*fn)(const Args&, int64_t), const Args& a, int64_t tasks, int64_t pixels) {
#ifdef _OPENMP
  const int threads = std::max(1, at::get_num_threads());
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && pixels >= 32768)
  for (int64_t i = 0; i < tasks; ++i) fn(a, i);
#else
  for (int64_t i = 0; i < tasks; ++i) fn(a, i);
#endif
}

// ---- Euler-Maruyama step (reference.em_step_planar) ---------------------------------------------
struct EmArgs {
  float* z; const float* e; float* x_in; const float* row; const float* noise; const int64_t* seeds;
  int64_t N;            // pixels per plane (B * P)
  int K; uint32_t step; bool draw;
  Tiling tile;
};

// Planes are X = z, Y_k = z + (k+1) N. KT >= 0: K fixed at compile time (one pass, registers);
// KT < 0: any K, plane by plane through small L1 buffers.
template <int KT, bool Avx2>
struct EmBody {
  using Args = EmArgs;
  static GFDM_INLINE void run(const EmArgs& a, int64_t i) {
    const Task t = task_of(a.tile, i);
    alignas(64) float xi_buf[kChunk];
    const float* xi = xi_buf;
    if (a.noise) {
      xi = a.noise + t.off;
    } else if (a.draw) {
      fill_normals<Avx2>(xi_buf, t.p0, t.len, a.step, kStreamEm, 0, key_of(a.seeds[t.b]));
    } else {
      std::fill(xi_buf, xi_buf + t.len, 0.0f);  // ode / last step: nx = ny = 0, no Philox work
    }
    const float* r = a.row;
    float* __restrict X = a.z + t.off;
    const float* __restrict e = a.e + t.off;
    float* __restrict xo = a.x_in + t.off;
    const int len = t.len;
    if constexpr (KT >= 0) {  // the per-pixel update of csrc/gfdm_shared.h, as the CUDA kernel runs it
      constexpr int K = KT, KA = KT > 0 ? KT : 1;
      const EmCoef<K> co(r);
      float* Y[KA];
      for (int k = 0; k < K; ++k) Y[k] = a.z + (k + 1) * a.N + t.off;
#pragma omp simd
      for (int j = 0; j < len; ++j) {
        float y[KA];
        for (int k = 0; k < K; ++k) y[k] = Y[k][j];
        float xin;
        const float xn = em_pixel<K>(co, X[j], e[j], xi[j], y, xin);
        for (int k = 0; k < K; ++k) Y[k][j] = y[k];
        X[j] = xn;
        xo[j] = xin;                                          // next network input X' - alpha_next . Y'
      }
    } else {
      const int K = a.K;
      const float ax = r[COL_AX], cg0 = r[COL_CG0], c = r[COL_C], u = r[COL_U], nx = r[COL_NX], ny = r[COL_NY];
      alignas(64) float gs[kChunk], xn[kChunk];
#pragma omp simd
      for (int j = 0; j < len; ++j) gs[j] = 0.0f;
      for (int k = 0; k < K; ++k) {
        const float q = r[kEmFixed + 2 * K + k], b = r[kEmFixed + k];
        const float* __restrict Y = a.z + (k + 1) * a.N + t.off;
#pragma omp simd
        for (int j = 0; j < len; ++j) { gs[j] += q * Y[j]; xn[j] = (k ? xn[j] : 0.0f) + b * Y[j]; }
      }
#pragma omp simd
      for (int j = 0; j < len; ++j) {
        gs[j] = u * e[j] - gs[j];
        xn[j] = ax * X[j] + (K ? xn[j] : 0.0f) + cg0 * gs[j] + nx * xi[j];
        X[j] = xn[j];
      }
      for (int k = 0; k < K; ++k) {
        const float ay = r[kEmFixed + K + k], an = r[kEmFixed + 3 * K + k];
        float* __restrict Y = a.z + (k + 1) * a.N + t.off;
#pragma omp simd
        for (int j = 0; j < len; ++j) {
          const float yn = ay * Y[j] + c * gs[j] + ny * xi[j];
          Y[j] = yn;
          xn[j] -= an * yn;
        }
      }
#pragma omp simd
      for (int j = 0; j < len; ++j) xo[j] = xn[j];
    }
  }
};

// ---- prior draw (reference.prior_planar): z = L xi, x_in = X - alpha_0 . Y -----------------------
struct PriorArgs {
  float* z; float* x_in; const float* prior; const float* noise; const int64_t* seeds;
  int64_t N; int K; Tiling tile;
};

template <bool Avx2>
struct PriorBody {
  using Args = PriorArgs;
  static GFDM_INLINE void run(const PriorArgs& a, int64_t i) {
    const Task t = task_of(a.tile, i);
    const int K = a.K, n = K + 1, len = t.len;
    std::vector<float> xi_buf(a.noise ? 0 : size_t(n) * kChunk);
    for (int c = 0; c < n && !a.noise; ++c)
      fill_normals<Avx2>(xi_buf.data() + c * kChunk, t.p0, len, 0, kStreamPrior, uint32_t(c), key_of(a.seeds[t.b]));
    const float* xi = a.noise ? a.noise + t.off : xi_buf.data();  // component c of pixel j: xi[c * stride + j]
    const int64_t stride = a.noise ? a.N : kChunk;
    const float* L = a.prior;            // (K+1)^2 row-major, then alpha_0 (K)
    float* __restrict z = a.z + t.off;
    float* __restrict xo = a.x_in + t.off;
    std::vector<float> zr(n);
    for (int j = 0; j < len; ++j) {      // the per-pixel draw of csrc/gfdm_shared.h (once per sample: not vectorised)
      xo[j] = prior_pixel<0>(n, L, L + n * n, [&](int c) { return xi[c * stride + j]; }, zr.data());
      for (int row = 0; row < n; ++row) z[row * a.N + j] = zr[row];
    }
  }
};

// ---- training noising (reference.noising): x_in = c x0 + sigma_c eps, eps_out = eps --------------
struct NoisingArgs {
  const float* x0; const float* mean_scale; const float* sigma_c; const int64_t* seeds; const float* eps;
  float* x_in; float* eps_out; uint32_t step; Tiling tile;
};

template <bool Avx2>
struct NoisingBody {
  using Args = NoisingArgs;
  static GFDM_INLINE void run(const NoisingArgs& a, int64_t i) {
    const Task t = task_of(a.tile, i);
    float* __restrict eo = a.eps_out + t.off;
    if (a.eps) std::memcpy(eo, a.eps + t.off, sizeof(float) * t.len);
    else fill_normals<Avx2>(eo, t.p0, t.len, a.step, kStreamTrain, 0, key_of(a.seeds[t.b]));
    const float c = a.mean_scale[t.b], s = a.sigma_c[t.b];
    const float* __restrict x0 = a.x0 + t.off;
    float* __restrict xo = a.x_in + t.off;
#pragma omp simd
    for (int j = 0; j < t.len; ++j) xo[j] = noising_pixel(c, s, x0[j], eo[j]);
  }
};

// ---- exponential-integrator step (reference.exp_step_planar, gfdm_fast.expint row layout) --------
// Row: p, q, Phi ((K+1)^2 row-major), w_cur (K+1), w_hist ((R-1)(K+1), ring-slot order), L ((K+1)^2
// row-major), alpha_next (K). d = p x_in + q e; Z' = Phi Z + w_cur d + sum_s w_hist[s] hist[s] (+ L xi);
// hist[step mod] = d; x_in = X' - alpha_next . Y'.
struct ExpArgs {
  float* z; const float* e; float* x_in; float* hist; const float* row; const float* noise; const int64_t* seeds;
  int64_t N;            // pixels per plane (B * P)
  int K, nh, slot;      // nh = R - 1 history planes, slot = step mod nh (the one written)
  uint32_t step; bool noisy;
  Tiling tile;
};

// A task of kChunk pixels is walked in blocks of kExpSub, so the K+1 noise and term buffers stay in L1.
constexpr int kExpSub = 256;

// The terms of one block that do not involve Z, plane by plane (any K, vectorised over pixels):
// acc_i = w_cur_i d + sum_s w_hist[s]_i hist[s] (+ sum_c L_ic xi_c), then hist[slot] = d once read.
// acc and xi_buf hold K1 planes of kExpSub floats.
template <bool Avx2>
GFDM_INLINE void exp_terms(const ExpArgs& a, int K1, const Task& t, int s0, int len, float* __restrict acc,
                           float* __restrict xi_buf) {
  const float* r = a.row;
  const ExpOffsets o = exp_offsets(K1, a.nh);
  const float *wc = r + o.w, *wh = r + o.h, *L = r + o.L;
  const int64_t off = t.off + s0;
  const float p = r[0], q = r[1];
  const float* __restrict x = a.x_in + off;
  const float* __restrict e = a.e + off;
  alignas(64) float d[kExpSub];
#pragma omp simd
  for (int j = 0; j < len; ++j) d[j] = exp_data_prediction(p, q, x[j], e[j]);  // x_in read before it is overwritten
  for (int i = 0; i < K1; ++i) {
    float* __restrict ai = acc + i * kExpSub;
    const float w = wc[i];
#pragma omp simd
    for (int j = 0; j < len; ++j) ai[j] = w * d[j];
    for (int s = 0; s < a.nh; ++s) {
      const float ws = wh[s * K1 + i];
      const float* __restrict h = a.hist + s * a.N + off;
#pragma omp simd
      for (int j = 0; j < len; ++j) ai[j] += ws * h[j];
    }
  }
  if (a.noisy) {
    if (!a.noise) {
      const Key key = key_of(a.seeds[t.b]);
      for (int c = 0; c < K1; ++c)
        fill_normals<Avx2>(xi_buf + c * kExpSub, t.p0 + s0, len, a.step, kStreamExp, uint32_t(c), key);
    }
    for (int c = 0; c < K1; ++c) {
      const float* __restrict xc = a.noise ? a.noise + c * a.N + off : xi_buf + c * kExpSub;
      for (int i = 0; i < K1; ++i) {
        const float l = L[i * K1 + c];  // the full matrix, as the reference multiplies it
        float* __restrict ai = acc + i * kExpSub;
#pragma omp simd
        for (int j = 0; j < len; ++j) ai[j] += l * xc[j];
      }
    }
  }
  if (a.nh > 0) {
    float* __restrict hw = a.hist + a.slot * a.N + off;
#pragma omp simd
    for (int j = 0; j < len; ++j) hw[j] = d[j];
  }
}

// KT >= 0: K fixed at compile time, Phi Z per pixel in registers; KT < 0: any K, plane by plane.
template <int KT, bool Avx2>
struct ExpBody {
  using Args = ExpArgs;
  static GFDM_INLINE void run(const ExpArgs& a, int64_t i) {
    const Task t = task_of(a.tile, i);
    const float* r = a.row;
    float* __restrict xo = a.x_in + t.off;
    if constexpr (KT >= 0) {
      constexpr int K1 = KT + 1, KA = KT > 0 ? KT : 1;
      const float* an_row = r + exp_offsets(K1, a.nh).a;
      float phi[K1 * K1], an[KA];
      float* Z[K1];
      for (int k = 0; k < K1 * K1; ++k) phi[k] = r[kExpFixed + k];
      for (int k = 0; k < KT; ++k) an[k] = an_row[k];
      for (int c = 0; c < K1; ++c) Z[c] = a.z + c * a.N + t.off;
      alignas(64) float acc[K1 * kExpSub];
      alignas(64) float xi_buf[K1 * kExpSub];
      for (int s0 = 0; s0 < t.len; s0 += kExpSub) {
        const int len = std::min(kExpSub, t.len - s0);
        exp_terms<Avx2>(a, K1, t, s0, len, acc, xi_buf);
        // Indexed by j alone (setup.py builds with Python's -fwrapv, under which s0 + j is not affine and
        // the loop stays scalar), and the K1 x K1 loops must unroll completely (GCC gives up at K = 8).
        float* Zs[K1];
        for (int c = 0; c < K1; ++c) Zs[c] = Z[c] + s0;
        float* xs = xo + s0;
#pragma omp simd
        for (int j = 0; j < len; ++j) {  // the per-pixel update of csrc/gfdm_shared.h, as the CUDA kernel runs it
          float zc[K1], v[K1];
#pragma GCC unroll 16
          for (int c = 0; c < K1; ++c) { zc[c] = Zs[c][j]; v[c] = acc[c * kExpSub + j]; }
          xs[j] = exp_pixel<K1>(K1, phi, an, [&](int c) { return zc[c]; }, v);  // next input X' - alpha_next . Y'
#pragma GCC unroll 16
          for (int row = 0; row < K1; ++row) Zs[row][j] = v[row];
        }
      }
    } else {
      const int K = a.K, K1 = K + 1;
      const float* phi = r + kExpFixed;
      const float* an = r + exp_offsets(K1, a.nh).a;
      std::vector<float> acc_v(size_t(K1) * kExpSub), xi_v(a.noisy && !a.noise ? size_t(K1) * kExpSub : 0);
      float* acc = acc_v.data();
      for (int s0 = 0; s0 < t.len; s0 += kExpSub) {
        const int len = std::min(kExpSub, t.len - s0);
        exp_terms<Avx2>(a, K1, t, s0, len, acc, xi_v.data());
        for (int row = 0; row < K1; ++row) {
          float* __restrict ar = acc + row * kExpSub;
          for (int c = 0; c < K1; ++c) {
            const float w = phi[row * K1 + c];
            const float* __restrict zc = a.z + c * a.N + t.off + s0;
#pragma omp simd
            for (int j = 0; j < len; ++j) ar[j] += w * zc[j];
          }
        }
        // all of Z read: write Z' and the next input
        float* __restrict x = xo + s0;
        for (int row = 0; row < K1; ++row) {
          const float* __restrict ar = acc + row * kExpSub;
          float* __restrict zr = a.z + row * a.N + t.off + s0;
          const float w = row ? -an[row - 1] : 1.0f;
#pragma omp simd
          for (int j = 0; j < len; ++j) {
            zr[j] = ar[j];
            x[j] = (row ? x[j] : 0.0f) + w * ar[j];
          }
        }
      }
    }
  }
};

// Each task body is compiled twice, for the baseline ISA and for AVX2+FMA (the always-inline body
// takes the ISA of its caller); cpu_has_avx2() picks one at run time.
using EmFn = void (*)(const EmArgs&, int64_t);
template <int KT> void em_task_base(const EmArgs& a, int64_t i) { EmBody<KT, false>::run(a, i); }
template <int KT> GFDM_AVX2 void em_task_avx2(const EmArgs& a, int64_t i) { EmBody<KT, bool(GFDM_X86)>::run(a, i); }
template <int KT> EmFn em_fn() { return cpu_has_avx2() ? &em_task_avx2<KT> : &em_task_base<KT>; }

void prior_task_base(const PriorArgs& a, int64_t i) { PriorBody<false>::run(a, i); }
GFDM_AVX2 void prior_task_avx2(const PriorArgs& a, int64_t i) { PriorBody<bool(GFDM_X86)>::run(a, i); }
void noising_task_base(const NoisingArgs& a, int64_t i) { NoisingBody<false>::run(a, i); }
GFDM_AVX2 void noising_task_avx2(const NoisingArgs& a, int64_t i) { NoisingBody<bool(GFDM_X86)>::run(a, i); }
using ExpFn = void (*)(const ExpArgs&, int64_t);
template <int KT> void exp_task_base(const ExpArgs& a, int64_t i) { ExpBody<KT, false>::run(a, i); }
template <int KT> GFDM_AVX2 void exp_task_avx2(const ExpArgs& a, int64_t i) { ExpBody<KT, bool(GFDM_X86)>::run(a, i); }
template <int KT> ExpFn exp_fn() { return cpu_has_avx2() ? &exp_task_avx2<KT> : &exp_task_base<KT>; }

// K as a compile-time constant for K <= 8 (unrolled, vectorised inner loops), a generic body beyond:
// the K switch of csrc/gfdm_shared.h.
template <typename Pick> auto pick_k(int64_t K, Pick pick) {
  decltype(pick(std::integral_constant<int, 0>{})) out{};
#define GFDM_PICK(KT) out = pick(std::integral_constant<int, KT>{})
  GFDM_SWITCH_K(K, GFDM_PICK)
#undef GFDM_PICK
  return out;
}

auto prior_fn() { return cpu_has_avx2() ? &prior_task_avx2 : &prior_task_base; }
auto noising_fn() { return cpu_has_avx2() ? &noising_task_avx2 : &noising_task_base; }

// ---- argument checks (ops.py checks first; these keep a direct call from crashing) --------------
void check_f32(const at::Tensor& x, const char* name, c10::DeviceType dev) {
  TORCH_CHECK(x.device().type() == dev, "gfdm: ", name, " must be on ", c10::DeviceTypeName(dev),
              ", got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "gfdm: ", name, " must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), "gfdm: ", name, " must be contiguous: pass ", name, ".contiguous()");
}

void check_same(const at::Tensor& x, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(x.device() == ref.device(), "gfdm: ", name, " is on ", x.device(), " but the state is on ",
              ref.device());
}

void check_shape(const at::Tensor& x, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(x.sizes() == shape, "gfdm: ", name, " must have shape ", shape, ", got ", x.sizes());
}

void check_seeds(const std::optional<at::Tensor>& seeds, int64_t B, const at::Tensor& ref) {
  TORCH_CHECK(seeds.has_value(), "gfdm: pass per-image seeds (B,) int64 or explicit noise");
  const at::Tensor& s = *seeds;
  check_same(s, "seeds", ref);
  TORCH_CHECK(s.scalar_type() == at::kLong, "gfdm: seeds must be int64, got ", s.scalar_type());
  TORCH_CHECK(s.dim() == 1 && s.size(0) == B, "gfdm: seeds must have shape (", B, ",), got ", s.sizes());
  TORCH_CHECK(s.is_contiguous(), "gfdm: seeds must be contiguous");
}

// Explicit noise of ``shape`` (float32, on z's device) or per-image seeds for the Philox draw.
void check_noise_or_seeds(const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& noise,
                          at::IntArrayRef shape, const at::Tensor& z, c10::DeviceType dev) {
  if (noise.has_value()) {
    check_same(*noise, "noise", z);
    check_f32(*noise, "noise", dev);
    check_shape(*noise, "noise", shape);
  } else {
    check_seeds(seeds, z.size(1), z);
  }
}

void check_step(const at::Tensor& step, const at::Tensor& ref) {
  check_same(step, "step", ref);
  TORCH_CHECK(step.numel() == 1 && step.scalar_type() == at::kLong, "gfdm: step must be a 1-element int64 tensor, got ",
              step.scalar_type(), " of shape ", step.sizes());
}

// Shared by the CPU and CUDA entry points; returns K.
int64_t check_em(const at::Tensor& z, const at::Tensor& e, const at::Tensor& x_in, const at::Tensor& table,
                 const at::Tensor& step, const std::optional<at::Tensor>& seeds,
                 const std::optional<at::Tensor>& noise, c10::DeviceType dev) {
  check_f32(z, "z", dev);
  TORCH_CHECK(z.dim() == 5, "gfdm: z must be the planar augmented state (K+1, B, C, H, W), got ", z.sizes());
  const int64_t K = z.size(0) - 1;
  TORCH_CHECK(K >= 0, "gfdm: z needs at least the X plane");
  const auto img = z.sizes().slice(1);
  for (auto [x, name] : {std::pair<const at::Tensor&, const char*>{e, "e"}, {x_in, "x_in"}, {table, "table"}}) {
    check_same(x, name, z);
    check_f32(x, name, dev);
  }
  check_shape(e, "e", img);
  check_shape(x_in, "x_in", img);
  TORCH_CHECK(table.dim() == 2 && table.size(1) == em_row_width(K), "gfdm: the step table must be (steps, ",
              em_row_width(K), ") for K = ", K, ", got ", table.sizes(), ": build it from the dynamics that made z");
  TORCH_CHECK(table.size(0) > 0, "gfdm: the step table is empty");
  check_step(step, z);
  check_noise_or_seeds(seeds, noise, img, z, dev);
  TORCH_CHECK(z.size(1) == 0 || z[0][0].numel() <= (int64_t(1) << 32), "gfdm: images of more than 2^32 pixels "
              "exceed the Philox element counter");
  return K;
}

int64_t check_prior(const at::Tensor& z, const at::Tensor& x_in, const at::Tensor& prior,
                    const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& noise,
                    c10::DeviceType dev) {
  check_f32(z, "z", dev);
  TORCH_CHECK(z.dim() == 5, "gfdm: z must be the planar augmented state (K+1, B, C, H, W), got ", z.sizes());
  const int64_t K = z.size(0) - 1;
  TORCH_CHECK(K >= 0, "gfdm: z needs at least the X plane");
  check_same(x_in, "x_in", z);
  check_f32(x_in, "x_in", dev);
  check_shape(x_in, "x_in", z.sizes().slice(1));
  check_same(prior, "prior", z);
  check_f32(prior, "prior", dev);
  TORCH_CHECK(prior.dim() == 1 && prior.size(0) == (K + 1) * (K + 1) + K, "gfdm: prior must hold (K+1)^2 + K = ",
              (K + 1) * (K + 1) + K, " coefficients for K = ", K, ", got ", prior.sizes());
  check_noise_or_seeds(seeds, noise, z.sizes(), z, dev);
  return K;
}

void check_noising(const at::Tensor& x0, const at::Tensor& mean_scale, const at::Tensor& sigma_c,
                   const std::optional<at::Tensor>& seeds, const at::Tensor& step, const at::Tensor& x_in,
                   const at::Tensor& eps_out, const std::optional<at::Tensor>& eps, c10::DeviceType dev) {
  check_f32(x0, "x0", dev);
  TORCH_CHECK(x0.dim() >= 1, "gfdm: x0 must be a (B, ...) tensor");
  const int64_t B = x0.size(0);
  for (auto [x, name] : {std::pair<const at::Tensor&, const char*>{mean_scale, "mean_scale"}, {sigma_c, "sigma_c"}}) {
    check_same(x, name, x0);
    check_f32(x, name, dev);
    check_shape(x, name, {B});
  }
  for (auto [x, name] : {std::pair<const at::Tensor&, const char*>{x_in, "x_in"}, {eps_out, "eps_out"}}) {
    check_same(x, name, x0);
    check_f32(x, name, dev);
    check_shape(x, name, x0.sizes());
  }
  if (eps.has_value()) {
    check_same(*eps, "eps", x0);
    check_f32(*eps, "eps", dev);
    check_shape(*eps, "eps", x0.sizes());
  } else {
    check_seeds(seeds, B, x0);
    check_step(step, x0);
  }
}

// Returns K. `noise` and `seeds` are only needed (and checked) when `noisy`.
int64_t check_exp(const at::Tensor& z, const at::Tensor& e, const at::Tensor& x_in, const at::Tensor& hist,
                  const at::Tensor& table, const at::Tensor& step, int64_t order,
                  const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& noise, bool noisy,
                  c10::DeviceType dev) {
  check_f32(z, "z", dev);
  TORCH_CHECK(z.dim() == 5, "gfdm: z must be the planar augmented state (K+1, B, C, H, W), got ", z.sizes());
  const int64_t K = z.size(0) - 1;
  TORCH_CHECK(K >= 0, "gfdm: z needs at least the X plane");
  TORCH_CHECK(order >= 1 && order <= 3, "gfdm: order must be 1, 2 or 3, got ", order);
  const auto img = z.sizes().slice(1);
  for (auto [x, name] : {std::pair<const at::Tensor&, const char*>{e, "e"}, {x_in, "x_in"}, {hist, "hist"},
                         {table, "table"}}) {
    check_same(x, name, z);
    check_f32(x, name, dev);
  }
  check_shape(e, "e", img);
  check_shape(x_in, "x_in", img);
  std::vector<int64_t> hist_shape{std::max<int64_t>(order - 1, 1)};
  hist_shape.insert(hist_shape.end(), img.begin(), img.end());
  check_shape(hist, "hist", hist_shape);
  const int64_t K1 = K + 1, width = exp_row_width(int(K), int(order));
  TORCH_CHECK(table.dim() == 2 && table.size(1) == width, "gfdm: the exp step table must be (steps, ", width,
              ") for K = ", K, ", order = ", order, ", got ", table.sizes(), ": build it from the dynamics that made z");
  TORCH_CHECK(table.size(0) > 0, "gfdm: the step table is empty");
  check_step(step, z);
  if (noisy) check_noise_or_seeds(seeds, noise, z.sizes(), z, dev);
  TORCH_CHECK(z.size(1) == 0 || z[0][0].numel() <= (int64_t(1) << 32), "gfdm: images of more than 2^32 pixels "
              "exceed the Philox element counter");
  return K;
}

}  // namespace

// ---- CPU entry points --------------------------------------------------------------------------
void em_step_cpu(at::Tensor z, const at::Tensor& e, at::Tensor x_in, const at::Tensor& table, const at::Tensor& step,
                 const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& noise) {
  const int64_t K = check_em(z, e, x_in, table, step, seeds, noise, c10::kCPU);
  const int64_t n = step.item<int64_t>(), steps = table.size(0);
  TORCH_CHECK(0 <= n && n < steps, "gfdm: step ", n, " is outside the step table (", steps, " steps)");
  const int64_t B = z.size(1);
  if (B == 0 || z[0][0].numel() == 0) return;
  const float* row = table.data_ptr<float>() + n * table.size(1);
  EmArgs a{z.data_ptr<float>(), e.data_ptr<float>(), x_in.data_ptr<float>(), row,
           noise ? noise->data_ptr<float>() : nullptr, seeds ? seeds->data_ptr<int64_t>() : nullptr,
           z[0].numel(), int(K), uint32_t(uint64_t(n)),
           row[COL_NX] != 0.0f || row[COL_NY] != 0.0f, tiling(z[0][0].numel())};
  const EmFn fn = pick_k(K, [](auto k) { return em_fn<decltype(k)::value>(); });
  run_tasks(fn, a, a.tile.tasks(B), a.N);
}

void prior_cpu(at::Tensor z, at::Tensor x_in, const at::Tensor& prior, const std::optional<at::Tensor>& seeds,
               const std::optional<at::Tensor>& noise) {
  const int64_t K = check_prior(z, x_in, prior, seeds, noise, c10::kCPU);
  const int64_t B = z.size(1);
  if (B == 0 || z[0][0].numel() == 0) return;
  PriorArgs a{z.data_ptr<float>(), x_in.data_ptr<float>(), prior.data_ptr<float>(),
              noise ? noise->data_ptr<float>() : nullptr, seeds ? seeds->data_ptr<int64_t>() : nullptr,
              z[0].numel(), int(K), tiling(z[0][0].numel())};
  run_tasks(prior_fn(), a, a.tile.tasks(B), a.N * (K + 1));
}

void noising_cpu(const at::Tensor& x0, const at::Tensor& mean_scale, const at::Tensor& sigma_c,
                 const std::optional<at::Tensor>& seeds, const at::Tensor& step, at::Tensor x_in, at::Tensor eps_out,
                 const std::optional<at::Tensor>& eps) {
  check_noising(x0, mean_scale, sigma_c, seeds, step, x_in, eps_out, eps, c10::kCPU);
  const int64_t B = x0.size(0);
  if (B == 0 || x0.numel() == 0) return;
  const int64_t P = x0.numel() / B;
  TORCH_CHECK(P <= (int64_t(1) << 32), "gfdm: images of more than 2^32 pixels exceed the Philox element counter");
  NoisingArgs a{x0.data_ptr<float>(), mean_scale.data_ptr<float>(), sigma_c.data_ptr<float>(),
                seeds ? seeds->data_ptr<int64_t>() : nullptr, eps ? eps->data_ptr<float>() : nullptr,
                x_in.data_ptr<float>(), eps_out.data_ptr<float>(),
                eps ? 0u : uint32_t(uint64_t(step.item<int64_t>())), tiling(P)};
  run_tasks(noising_fn(), a, a.tile.tasks(B), x0.numel());
}

void exp_step_cpu(at::Tensor z, const at::Tensor& e, at::Tensor x_in, at::Tensor hist, const at::Tensor& table,
                  const at::Tensor& step, int64_t order, const std::optional<at::Tensor>& seeds,
                  const std::optional<at::Tensor>& noise, bool noisy) {
  const int64_t K = check_exp(z, e, x_in, hist, table, step, order, seeds, noise, noisy, c10::kCPU);
  const int64_t n = step.item<int64_t>(), steps = table.size(0);
  TORCH_CHECK(0 <= n && n < steps, "gfdm: step ", n, " is outside the step table (", steps, " steps)");
  const int64_t B = z.size(1);
  if (B == 0 || z[0][0].numel() == 0) return;
  const int nh = int(order) - 1;
  ExpArgs a{z.data_ptr<float>(), e.data_ptr<float>(), x_in.data_ptr<float>(), hist.data_ptr<float>(),
            table.data_ptr<float>() + n * table.size(1), noisy && noise ? noise->data_ptr<float>() : nullptr,
            noisy && !noise ? seeds->data_ptr<int64_t>() : nullptr, z[0].numel(), int(K), nh,
            nh > 0 ? int(n % nh) : 0, uint32_t(uint64_t(n)), noisy, tiling(z[0][0].numel())};
  const ExpFn fn = pick_k(K, [](auto k) { return exp_fn<decltype(k)::value>(); });
  run_tasks(fn, a, a.tile.tasks(B), a.N * (K + 1));
}

#ifdef GFDM_WITH_CUDA
// ---- CUDA entry points: same checks, then the launchers of csrc/gfdm_ops_cuda.cu -----------------
namespace {
template <class T> T* ptr(const std::optional<at::Tensor>& x) { return x ? x->data_ptr<T>() : nullptr; }
void cuda_ok(const char* err, const char* op) {
  TORCH_CHECK(err == nullptr, "gfdm: CUDA ", op, " kernel failed to launch: ", err ? err : "");
}
}  // namespace

void em_step_cuda(at::Tensor z, const at::Tensor& e, at::Tensor x_in, const at::Tensor& table,
                  const at::Tensor& step, const std::optional<at::Tensor>& seeds,
                  const std::optional<at::Tensor>& noise) {
  const int64_t K = check_em(z, e, x_in, table, step, seeds, noise, c10::kCUDA);
  const int64_t B = z.size(1);
  if (B == 0 || z[0][0].numel() == 0) return;
  const c10::cuda::CUDAGuard guard(z.device());
  // step stays on the device: no host sync, so the step can be captured in a CUDA graph
  cuda_ok(em_step_cuda_launch(z.data_ptr<float>(), e.data_ptr<float>(), x_in.data_ptr<float>(),
                              table.data_ptr<float>(), table.size(0), step.data_ptr<int64_t>(),
                              noise ? nullptr : ptr<int64_t>(seeds), ptr<float>(noise), B, z[0][0].numel(), int(K),
                              c10::cuda::getCurrentCUDAStream().stream()),
          "em_step");
}

void prior_cuda(at::Tensor z, at::Tensor x_in, const at::Tensor& prior, const std::optional<at::Tensor>& seeds,
                const std::optional<at::Tensor>& noise) {
  const int64_t K = check_prior(z, x_in, prior, seeds, noise, c10::kCUDA);
  const int64_t B = z.size(1);
  if (B == 0 || z[0][0].numel() == 0) return;
  const c10::cuda::CUDAGuard guard(z.device());
  cuda_ok(prior_cuda_launch(z.data_ptr<float>(), x_in.data_ptr<float>(), prior.data_ptr<float>(),
                            noise ? nullptr : ptr<int64_t>(seeds), ptr<float>(noise), B, z[0][0].numel(), int(K),
                            c10::cuda::getCurrentCUDAStream().stream()),
          "prior");
}

void noising_cuda(const at::Tensor& x0, const at::Tensor& mean_scale, const at::Tensor& sigma_c,
                  const std::optional<at::Tensor>& seeds, const at::Tensor& step, at::Tensor x_in,
                  at::Tensor eps_out, const std::optional<at::Tensor>& eps) {
  check_noising(x0, mean_scale, sigma_c, seeds, step, x_in, eps_out, eps, c10::kCUDA);
  const int64_t B = x0.size(0);
  if (B == 0 || x0.numel() == 0) return;
  const int64_t P = x0.numel() / B;
  TORCH_CHECK(P <= (int64_t(1) << 32), "gfdm: images of more than 2^32 pixels exceed the Philox element counter");
  const c10::cuda::CUDAGuard guard(x0.device());
  cuda_ok(noising_cuda_launch(x0.data_ptr<float>(), mean_scale.data_ptr<float>(), sigma_c.data_ptr<float>(),
                              eps ? nullptr : ptr<int64_t>(seeds), eps ? nullptr : step.data_ptr<int64_t>(),
                              ptr<float>(eps), x_in.data_ptr<float>(), eps_out.data_ptr<float>(), B, P,
                              c10::cuda::getCurrentCUDAStream().stream()),
          "noising");
}
void exp_step_cuda(at::Tensor z, const at::Tensor& e, at::Tensor x_in, at::Tensor hist, const at::Tensor& table,
                   const at::Tensor& step, int64_t order, const std::optional<at::Tensor>& seeds,
                   const std::optional<at::Tensor>& noise, bool noisy) {
  const int64_t K = check_exp(z, e, x_in, hist, table, step, order, seeds, noise, noisy, c10::kCUDA);
  TORCH_CHECK(K + 1 <= kExpCudaMaxK1, "gfdm: the CUDA exp_step supports K <= ", kExpCudaMaxK1 - 1, ", got K = ", K,
              ": use backend='torch'");
  const int64_t B = z.size(1);
  if (B == 0 || z[0][0].numel() == 0) return;
  const c10::cuda::CUDAGuard guard(z.device());
  // step stays on the device (no host sync): the kernel picks the row and the history slot
  cuda_ok(exp_step_cuda_launch(z.data_ptr<float>(), e.data_ptr<float>(), x_in.data_ptr<float>(),
                               hist.data_ptr<float>(), table.data_ptr<float>(), table.size(0),
                               step.data_ptr<int64_t>(), int(order), noisy && !noise ? ptr<int64_t>(seeds) : nullptr,
                               noisy ? ptr<float>(noise) : nullptr, noisy, B, z[0][0].numel(), int(K),
                               c10::cuda::getCurrentCUDAStream().stream()),
          "exp_step");
}
#endif

bool has_cuda() {
#ifdef GFDM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace gfdm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gfdm-fast fused sampler ops (C++/OpenMP; CUDA when built with nvcc)";
  using namespace pybind11::literals;
  m.def("em_step", &gfdm::em_step_cpu, "Fused Euler-Maruyama step in place (CPU)", "z"_a, "e"_a, "x_in"_a, "table"_a,
        "step"_a, "seeds"_a = pybind11::none(), "noise"_a = pybind11::none());
  m.def("prior", &gfdm::prior_cpu, "Prior draw z_T = L xi and first network input (CPU)", "z"_a, "x_in"_a, "prior"_a,
        "seeds"_a = pybind11::none(), "noise"_a = pybind11::none());
  m.def("noising", &gfdm::noising_cpu, "Training input c x0 + sigma_c eps and eps (CPU)", "x0"_a, "mean_scale"_a,
        "sigma_c"_a, "seeds"_a, "step"_a, "x_in"_a, "eps_out"_a, "eps"_a = pybind11::none());
  m.def("exp_step", &gfdm::exp_step_cpu, "Fused exponential-integrator step in place (CPU)", "z"_a, "e"_a, "x_in"_a,
        "hist"_a, "table"_a, "step"_a, "order"_a, "seeds"_a = pybind11::none(), "noise"_a = pybind11::none(),
        "noisy"_a = false);
  m.def("has_cuda", &gfdm::has_cuda, "Whether the CUDA kernels were compiled in");
  m.def("cpu_isa", [] { return gfdm::cpu_has_avx2() ? "avx2" : "generic"; }, "Instruction set the CPU kernels use");
#ifdef GFDM_WITH_CUDA
  m.def("em_step_cuda", &gfdm::em_step_cuda, "Fused Euler-Maruyama step in place (CUDA)", "z"_a, "e"_a, "x_in"_a,
        "table"_a, "step"_a, "seeds"_a = pybind11::none(), "noise"_a = pybind11::none());
  m.def("prior_cuda", &gfdm::prior_cuda, "Prior draw (CUDA)", "z"_a, "x_in"_a, "prior"_a,
        "seeds"_a = pybind11::none(), "noise"_a = pybind11::none());
  m.def("noising_cuda", &gfdm::noising_cuda, "Training noising (CUDA)", "x0"_a, "mean_scale"_a, "sigma_c"_a,
        "seeds"_a, "step"_a, "x_in"_a, "eps_out"_a, "eps"_a = pybind11::none());
  m.def("exp_step_cuda", &gfdm::exp_step_cuda, "Fused exponential-integrator step in place (CUDA)", "z"_a, "e"_a,
        "x_in"_a, "hist"_a, "table"_a, "step"_a, "order"_a, "seeds"_a = pybind11::none(),
        "noise"_a = pybind11::none(), "noisy"_a = false);
#endif
}
