// The per-pixel math of gfdm_fast._C, compiled by both the C++ (CPU) and the nvcc (CUDA) builds.
//
// What is here is the one C++ definition of: the step-table layout and Philox streams (mirrors of
// gfdm_fast/layout.py; tests/test_cuda_build.py checks them against it), the K switch, Philox4x32-10
// and its normal transform (gfdm_fast/philox.py), and the per-pixel Euler-Maruyama, prior and noising
// updates. csrc/gfdm_ops.cpp and csrc/gfdm_ops_cuda.cu keep only indexing, buffering and launch, so
// the CPU tests execute the arithmetic the CUDA kernels run.
//
// Contraction: nvcc is given --fmad=false (setup.py; no --use_fast_math) and the C++ compiler
// -ffp-contract=off, so neither fuses a * b + c into an FMA: every float operation below rounds
// once, in the order written, on both devices. The square root goes through sqrt_rn (IEEE on both, and
// immune to a fast-math flag). This holds for the specialised K <= kMaxKSpecialised: the generic-K
// paths of the .cpp (plane by plane) and the .cu keep their own order of operations, so above K = 8
// the backends agree within float32 rounding only (tests/test_ops.py: test_cpp_and_cuda_give_the_same_bits
// checks K = 0..8 on a GPU).
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>

#ifdef __CUDACC__
#define GFDM_HD __host__ __device__ __forceinline__
#else
#if defined(__GNUC__)
#define GFDM_HD inline __attribute__((always_inline))
#else
#define GFDM_HD inline
#endif
#endif

#ifdef __CUDACC__
#define GFDM_UNROLL _Pragma("unroll")
#define GFDM_NO_UNROLL _Pragma("unroll 1")
#else
#define GFDM_UNROLL _Pragma("GCC unroll 16")
#define GFDM_NO_UNROLL _Pragma("GCC unroll 1")
#endif

namespace gfdm {

// ---- layout (gfdm_fast/layout.py) ---------------------------------------------------------------
constexpr int kEmFixed = 6;  // a_x, cG0, c, u, nx, ny, then b(K), a_y(K), q(K), alpha_next(K)
enum { COL_AX = 0, COL_CG0, COL_C, COL_U, COL_NX, COL_NY };
constexpr int kExpFixed = 2;  // p, q of d = p x_in + q e, then Phi, w_cur, w_hist, L, alpha_next
constexpr uint32_t kStreamEm = 0, kStreamPrior = 1, kStreamTrain = 2, kStreamExp = 3;
constexpr int kMaxKSpecialised = 8;  // compiled variants for K = 0..8 (GFDM_SWITCH_K); generic code above
constexpr int kExpCudaMaxK1 = 64;    // the generic-K CUDA exp kernel keeps K+1 values per pixel in an array
GFDM_HD constexpr int em_row_width(int K) { return kEmFixed + 4 * K; }
// exp row columns (layout.exp_offsets): p, q, Phi (K1 x K1), w_cur (K1), w_hist (nh x K1), L (K1 x K1), alpha_next (K)
struct ExpOffsets { int phi, w, h, L, a, width; };
GFDM_HD constexpr ExpOffsets exp_offsets(int K1, int nh) {
  return {kExpFixed, kExpFixed + K1 * K1, kExpFixed + K1 * K1 + K1, kExpFixed + K1 * K1 + K1 + nh * K1,
          kExpFixed + 2 * K1 * K1 + K1 + nh * K1, kExpFixed + 2 * K1 * K1 + K1 + nh * K1 + K1 - 1};
}
GFDM_HD constexpr int exp_row_width(int K, int R) { return exp_offsets(K + 1, R - 1).width; }

// LAUNCH(KT) for KT = K when 0 <= K <= kMaxKSpecialised, else LAUNCH(-1) (the generic-K variant).
#define GFDM_SWITCH_K(K, LAUNCH) \
  switch (K) {                   \
    case 0: LAUNCH(0); break;    \
    case 1: LAUNCH(1); break;    \
    case 2: LAUNCH(2); break;    \
    case 3: LAUNCH(3); break;    \
    case 4: LAUNCH(4); break;    \
    case 5: LAUNCH(5); break;    \
    case 6: LAUNCH(6); break;    \
    case 7: LAUNCH(7); break;    \
    case 8: LAUNCH(8); break;    \
    default: LAUNCH(-1); break;  \
  }
static_assert(kMaxKSpecialised == 8, "GFDM_SWITCH_K lists K = 0..8");

// ---- Philox4x32-10 (Salmon et al., SC'11) and the normal transform (gfdm_fast/philox.py) --------------
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;  // key bumps
constexpr int kPhiloxRounds = 10;

// Constants of the normal transform (the AVX2 path of gfdm_ops.cpp takes them from here too).
constexpr double kLn2 = 0.69314718055994531, kHalfPi = 1.5707963267948966;
constexpr float kTwoPiF = 6.28318548f;           // fl32(2 pi), as torch multiplies u by it
constexpr float kTwoOverPiF = 0.636619772f;      // quadrant estimate
constexpr float kRoundMagicF = 12582912.0f;      // 1.5 * 2^23: (x + m) - m rounds x to an integer
constexpr float kTwoPowM24F = 5.9604644775390625e-08f;
constexpr uint32_t kOneBits = 0x3f800000u, kSqrtHalfBits = 0x3f3504f3u, kMantissaMask = 0x007fffffu;  // float32 bits
// Horner coefficients, highest power first: ln m = 2s + 2s z P(z), z = s^2 (P: 1/15 .. 1/3);
// sin r = r + r z S(z), cos r = 1 + z C(z), z = r^2 (Taylor to r^13 / r^12).
constexpr int kLogTerms = 7, kSinTerms = 6, kCosTerms = 6;
GFDM_HD constexpr double log_coef(int i) { return 1.0 / (15 - 2 * i); }
GFDM_HD constexpr double sin_coef(int i) {
  return i == 0 ? 1.0 / 6227020800.0 : i == 1 ? -1.0 / 39916800 : i == 2 ? 1.0 / 362880 : i == 3 ? -1.0 / 5040
         : i == 4 ? 1.0 / 120 : -1.0 / 6;
}
GFDM_HD constexpr double cos_coef(int i) {
  return i == 0 ? 1.0 / 479001600.0 : i == 1 ? -1.0 / 3628800 : i == 2 ? 1.0 / 40320 : i == 3 ? -1.0 / 720
         : i == 4 ? 1.0 / 24 : -0.5;
}

// the bits of a value as another type of the same size (memcpy is a register move on host and device)
template <class To, class From>
GFDM_HD To bits_as(From v) {
  static_assert(sizeof(To) == sizeof(From), "bits_as needs types of one size");
  To t;
  memcpy(&t, &v, sizeof(To));
  return t;
}
GFDM_HD float sqrt_rn(float x) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

// ln(u) for normal u > 0: u = 2^k m with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s), s = (m-1)/(m+1),
// |s| <= 0.172, series to s^15 in double, rounded once (correctly rounded but for rare ties).
GFDM_HD float log_pos(float u) {
  uint32_t ix = bits_as<uint32_t>(u) + (kOneBits - kSqrtHalfBits);
  const int k = int(ix >> 23) - 0x7f;
  ix = (ix & kMantissaMask) + kSqrtHalfBits;
  const double f = double(bits_as<float>(ix)) - 1.0;
  const double s = f / (2.0 + f), z = s * s;
  double p = log_coef(0);
  GFDM_UNROLL
  for (int i = 1; i < kLogTerms; ++i) p = p * z + log_coef(i);
  const double lm = 2.0 * s + 2.0 * s * z * p;
  return float(double(k) * kLn2 + lm);
}

// cos(2 pi u) as torch computes it: cos of the float32 product fl(2 pi) * u, u in (0, 1). Reduced and
// evaluated in double (Taylor to r^13 on |r| <= pi/4), then rounded once: correctly rounded but for
// rare ties; float32 Cody-Waite + Cephes polynomials missed 18% of the values by 1 ulp. The quadrant is
// rounded with the 1.5 * 2^23 trick (vectorises on baseline x86, where rintf is a call).
GFDM_HD float cos_2pi(float u) {
  const float x = kTwoPiF * u;                                       // in (0, 2 pi]
  const float kf = (x * kTwoOverPiF + kRoundMagicF) - kRoundMagicF;  // nearest quadrant, 0..4
  const int k = int(kf);
  const double r = double(x) - double(kf) * kHalfPi, z = r * r;
  double ps = sin_coef(0), pc = cos_coef(0);
  GFDM_UNROLL
  for (int i = 1; i < kSinTerms; ++i) ps = ps * z + sin_coef(i);
  GFDM_UNROLL
  for (int i = 1; i < kCosTerms; ++i) pc = pc * z + cos_coef(i);
  const double s = r + r * z * ps, c = 1.0 + z * pc;
  const float v = float((k & 1) ? s : c);
  return ((k + 1) & 2) ? -v : v;  // quadrants 0..3: c, -s, -c, s
}

// uint32 bits -> ((x >> 9) * 2 + 1) 2^-24 in (0, 1), exact (fewer than 24 significant bits).
GFDM_HD float uniform_from_bits(uint32_t x) { return float(int32_t((x >> 9) * 2u + 1u)) * kTwoPowM24F; }

// Philox4x32-10 on counter (c0, c1, c2, c3), key (k0, k1) -> the normal from output words 0 and 1.
GFDM_HD float philox_normal(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#else
#pragma GCC unroll 10
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {  // fully unrolled, else GCC keeps the CPU loop scalar
    const uint64_t p0 = uint64_t(kPhiloxM0) * c0, p1 = uint64_t(kPhiloxM1) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0, n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p1);
    c3 = uint32_t(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;  // key bump between rounds (the bump after the last round is unused)
    k1 += kPhiloxW1;
  }
  return sqrt_rn(-2.0f * log_pos(uniform_from_bits(c0))) * cos_2pi(uniform_from_bits(c1));
}

struct Key { uint32_t k0, k1; };
GFDM_HD Key key_of(int64_t seed) { const uint64_t s = uint64_t(seed); return {uint32_t(s), uint32_t(s >> 32)}; }

// ---- per-pixel updates (gfdm_fast/reference.py) ---------------------------------------------------
// Euler-Maruyama coefficients of one table row, K fixed at compile time.
template <int K>
struct EmCoef {
  static constexpr int KA = K > 0 ? K : 1;
  float ax, cg0, c, u, nx, ny, b[KA], ay[KA], q[KA], an[KA];
  GFDM_HD explicit EmCoef(const float* r)
      : ax(r[COL_AX]), cg0(r[COL_CG0]), c(r[COL_C]), u(r[COL_U]), nx(r[COL_NX]), ny(r[COL_NY]) {
    GFDM_UNROLL
    for (int k = 0; k < K; ++k) {
      b[k] = r[kEmFixed + k]; ay[k] = r[kEmFixed + K + k];
      q[k] = r[kEmFixed + 2 * K + k]; an[k] = r[kEmFixed + 3 * K + k];
    }
  }
};

// One pixel's Euler-Maruyama step: y holds Y (K values) and receives Y'; returns X'; xin = X' - alpha_next . Y'.
//   gs = u e - q . Y,   X' = a_x X + b . Y + cG0 gs + nx xi,   Y' = a_y Y + c gs + ny xi
template <int K>
GFDM_HD float em_pixel(const EmCoef<K>& co, float X, float e, float xi, float* y, float& xin) {
  float qy = 0.0f, by = 0.0f;
  GFDM_UNROLL
  for (int k = 0; k < K; ++k) { qy += co.q[k] * y[k]; by += co.b[k] * y[k]; }
  const float gs = co.u * e - qy;  // G . score
  const float xn = co.ax * X + by + co.cg0 * gs + co.nx * xi;
  float ay_sum = 0.0f;
  GFDM_UNROLL
  for (int k = 0; k < K; ++k) {
    y[k] = co.ay[k] * y[k] + co.c * gs + co.ny * xi;
    ay_sum += co.an[k] * y[k];
  }
  xin = xn - ay_sum;
  return xn;
}

// One pixel's prior draw: z[row] = sum_c L[row, c] xi(c) (row-major L, (K+1)^2; c ascending), one
// component at a time so a single normal is live; returns x_in = X - alpha_0 . Y. ``xi(c)`` gives
// component c's normal (called once per c).
template <int K1, class Xi>
GFDM_HD float prior_pixel(int k1, const float* L, const float* alpha0, Xi xi, float* z) {
  const int n = K1 > 0 ? K1 : k1;  // K1 > 0: compile-time size (rows unrolled); 0: k1 at run time
  GFDM_NO_UNROLL                   // a loop: K+1 interleaved Philox chains would cost registers
  for (int c = 0; c < n; ++c) {
    const float x = xi(c);
    GFDM_UNROLL
    for (int row = 0; row < n; ++row) z[row] = c ? z[row] + L[row * n + c] * x : L[row * n] * x;
  }
  float xin = z[0];
  GFDM_UNROLL
  for (int row = 1; row < n; ++row) xin -= alpha0[row - 1] * z[row];
  return xin;
}

// Exponential-integrator step (gfdm_fast/expint.py row layout): the data prediction d = p x_in + q e ...
GFDM_HD float exp_data_prediction(float p, float q, float x_in, float e) { return p * x_in + q * e; }

// ... and the last stage of one pixel's step: acc holds w_cur d + sum_s w_hist[s] h_s (+ sum_c L[., c] xi_c),
// accumulated in that order; acc[row] += Phi[row, c] Z_c for c ascending (``zc(c)`` reads Z_c, once per c),
// so acc becomes Z'; returns x_in = X' - alpha_next . Y'. K1 > 0: compile-time size; 0: k1 at run time.
template <int K1, class Zc>
GFDM_HD float exp_pixel(int k1, const float* phi, const float* alpha_next, Zc zc, float* acc) {
  const int n = K1 > 0 ? K1 : k1;
  GFDM_UNROLL
  for (int c = 0; c < n; ++c) {
    const float v = zc(c);
    GFDM_UNROLL
    for (int row = 0; row < n; ++row) acc[row] += phi[row * n + c] * v;
  }
  float ay_sum = 0.0f;
  GFDM_UNROLL
  for (int row = 1; row < n; ++row) ay_sum += alpha_next[row - 1] * acc[row];
  return acc[0] - ay_sum;
}

// Training input of the reduced loss: c x0 + sigma_c eps.
GFDM_HD float noising_pixel(float mean_scale, float sigma_c, float x0, float eps) { return mean_scale * x0 + sigma_c * eps; }

}  // namespace gfdm
