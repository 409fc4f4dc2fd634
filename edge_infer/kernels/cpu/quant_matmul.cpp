// Products of float32 activation rows with 4- or 8-bit affine weights (q * scale + bias per
// row and group), for every row count: each activation row is quantized to int8 per block of
// 32 (scale d = amax/127, as llama.cpp's Q8 blocks), the integer dot products of a block run
// on the CPU's byte instructions (AVX-512 VNNI vpdpbusd, AVX2 maddubs) and are scaled once per
// block. With two passes the rounding remainder is quantized again to int8 with scale d/254
// (x = d q1 + d/254 q2, about 16 bits): twice the integer work on the same weight bytes, and
// products as close to float32 ones as the agreement with a float64 reference needs. The weights are read once per call for up to NB activation rows at a time, so
// decoding streams them once and prefill reuses each weight tile for many rows. A row's
// arithmetic does not depend on which other rows share the call.
//
// Packed weight layout (see edge_infer/kernels/cpu/packing.py), tiles of 16 output rows:
//   qweight uint8 [tiles, K/32, CH, 16 rows, 4 bytes], CH = 4 (4 bits) or 8 (8 bits)
//     4 bits: byte i of row r in chunk m = q[k] | q[k + 16] << 4 with k = 32 b + 4 m + i
//     8 bits: byte i of row r in chunk m = q[k]                   with k = 32 b + 4 m + i
//   scales, biases float16 [tiles, K/group, 16 rows]
// so that one 64-byte load holds 4 consecutive weights of 16 rows, a 32-bit lane per row.

#include <torch/extension.h>

#include "parallel.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int TILE = 16;  // weight rows per tile
constexpr int QB = 32;    // activation values per quantization block

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

// Activation rows quantized per block of 32, with the sum of each weight group.
struct Act {
  const int8_t* q;   // [M, K]
  const int8_t* q2;  // [M, K]: the remainders' second pass (unused with one pass)
  const int16_t* a16;  // [M, K]: 254 q + q2, both passes in one value (two passes only)
  const float* d;    // [M, K/32]: block scales
  const float* sum;  // [M, K/group]: sum of the rounded values of each group
  int64_t K, blocks, groups;
};

struct Weights {
  const uint8_t* q;
  const uint16_t* s;
  const uint16_t* b;
  int64_t N, K, bits, group, tile_bytes, tile_params;
};

enum Prep : int64_t { PLAIN = 0, RMS_NORM = 1, SWIGLU = 2, GEGLU = 3 };

// the gated MLPs' steps: the gate half of the row times its activation, times the up half
inline bool gated(int64_t prep) { return prep == SWIGLU || prep == GEGLU; }

// 16 floats in the vector registers the build has (plain scalar code where it has none).
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

inline v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store16(float* p, v16f v) { std::memcpy(p, &v, sizeof(v)); }

inline v16f splat(float x) { return v16f{} + x; }

inline float hsum(v16f v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

inline v16f vabs(v16f v) {
  v16i i;
  std::memcpy(&i, &v, sizeof(i));
  i &= 0x7fffffff;
  std::memcpy(&v, &i, sizeof(v));
  return v;
}

inline v16f vmax(v16f a, v16f b) { return a > b ? a : b; }

inline v16f vmin(v16f a, v16f b) { return a < b ? a : b; }

// x rounded to the nearest integer (ties to even) for |x| < 2^22
inline v16f vround(v16f x) {
  const v16f magic = splat(12582912.0f);  // 1.5 * 2^23
  return (x + magic) - magic;
}

// exp(x), clamped to [-87, 88]: 2^n * p(f), relative error below 2e-7 (Cephes' expf)
inline v16f vexp(v16f x) {
  x = vmin(vmax(x, splat(-87.0f)), splat(88.0f));
  const v16f n = vround(x * 1.44269504088896341f);
  v16f f = x - n * 0.693359375f;
  f = f - n * -2.12194440e-4f;
  v16f p = splat(1.9875691500e-4f);
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  const v16i e = (__builtin_convertvector(n, v16i) + 127) << 23;
  v16f scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

// The values a row is multiplied as (after the fused step), into y[K]; K % 32 == 0.
void prepared_row(const float* x, int64_t K, int64_t prep, const float* norm, float eps,
                  float* y) {
  if (prep == RMS_NORM) {
    v16f ss = {};
    for (int64_t k = 0; k < K; k += 16) {
      const v16f v = load16(x + k);
      ss += v * v;
    }
    const float inv = 1.0f / std::sqrt(hsum(ss) / static_cast<float>(K) + eps);
    for (int64_t k = 0; k < K; k += 16) store16(y + k, load16(x + k) * inv * load16(norm + k));
  } else if (prep == SWIGLU) {
    for (int64_t k = 0; k < K; k += 16) {
      const v16f g = load16(x + k), u = load16(x + K + k);
      store16(y + k, g * u / (1.0f + vexp(-g)));
    }
  } else if (prep == GEGLU) {
    // GELU's tanh form, 0.5 g (1 + tanh(a)) with a = sqrt(2/pi) (g + 0.044715 g^3), is
    // g * sigmoid(2a): one exp, as SiLU
    for (int64_t k = 0; k < K; k += 16) {
      const v16f g = load16(x + k), u = load16(x + K + k);
      const v16f a2 = (g + g * g * g * 0.044715f) * 1.5957691216057308f;  // 2 sqrt(2/pi)
      store16(y + k, g * u / (1.0f + vexp(-a2)));
    }
  } else {
    std::memcpy(y, x, K * sizeof(float));
  }
}

constexpr float FINE = 254.0f;  // second-pass steps per first-pass step: |q2| <= 127

// Quantizes one prepared row: q = round(y * 127 / amax) per block, d = amax / 127, and with
// q2 given the remainder q2 = round((y / d - q) * 254); and the sum of each group's rounded
// values (d * sum q + d / 254 * sum q2), which the weights' biases multiply: the product is
// then exactly W times the rounded row, whose errors partly cancel.
void quantize_row(const float* y, int64_t K, int64_t group, int8_t* q, int8_t* q2,
                  int16_t* a16, float* d, float* sum) {
  const int64_t bpg = group / QB;
  for (int64_t g = 0; g < K / group; ++g) {
    float s = 0.f;
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      const v16f v0 = load16(y + b * QB), v1 = load16(y + b * QB + 16);
      const v16f m = vmax(vabs(v0), vabs(v1));
      float amax = 0.f;
      for (int i = 0; i < 16; ++i) amax = std::max(amax, m[i]);
      const float inv = amax > 0.f ? 127.0f / amax : 0.f;
      d[b] = amax / 127.0f;
      const v16f s0 = v0 * inv, s1 = v1 * inv;
      const v16f f0 = vround(s0), f1 = vround(s1);
      const v16i r0 = __builtin_convertvector(f0, v16i);
      const v16i r1 = __builtin_convertvector(f1, v16i);
      const v16i both = r0 + r1;
      int32_t total = 0;
      for (int i = 0; i < 16; ++i) {
        q[b * QB + i] = static_cast<int8_t>(r0[i]);
        q[b * QB + 16 + i] = static_cast<int8_t>(r1[i]);
        total += both[i];
      }
      s += d[b] * static_cast<float>(total);
      if (q2) {
        const v16i e0 = __builtin_convertvector(vround((s0 - f0) * FINE), v16i);
        const v16i e1 = __builtin_convertvector(vround((s1 - f1) * FINE), v16i);
        const v16i both2 = e0 + e1;
        int32_t total2 = 0;
        for (int i = 0; i < 16; ++i) {
          q2[b * QB + i] = static_cast<int8_t>(e0[i]);
          q2[b * QB + 16 + i] = static_cast<int8_t>(e1[i]);
          a16[b * QB + i] = static_cast<int16_t>(r0[i] * 254 + e0[i]);
          a16[b * QB + 16 + i] = static_cast<int16_t>(r1[i] * 254 + e1[i]);
          total2 += both2[i];
        }
        s += d[b] / FINE * static_cast<float>(total2);
      }
    }
    sum[g] = s;
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// ---- AVX-512: a vector holds one 32-bit lane per row of a 16-row tile ----
constexpr int PASSES = 1;  // vectors per tile
constexpr int NBMAX = 8;
typedef __m512i vi;
typedef __m512 vf;
inline vi load_i(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline vi nibbles_lo(vi v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0F)); }
inline vi nibbles_hi(vi v) {
  return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F));
}
inline vi bcast4(const int8_t* p) {
  int32_t x;
  std::memcpy(&x, p, 4);
  return _mm512_set1_epi32(x);
}
inline vi zero_i() { return _mm512_setzero_si512(); }
// acc += sum over each lane's 4 bytes of w (unsigned) * a (signed)
#if defined(__AVX512VNNI__)
#define EDGE_VNNI 1
inline vi dpbusd(vi acc, vi w, vi a) { return _mm512_dpbusd_epi32(acc, w, a); }
#endif
inline vi pairs16(vi w, vi a) { return _mm512_maddubs_epi16(w, a); }  // i16 pair sums
inline vi add16(vi a, vi b) { return _mm512_add_epi16(a, b); }
inline vi add32(vi a, vi b) { return _mm512_add_epi32(a, b); }
inline vi widen(vi x, int16_t f) { return _mm512_madd_epi16(x, _mm512_set1_epi16(f)); }
inline vf halves(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline vf zero_f() { return _mm512_setzero_ps(); }
inline vf set1_f(float x) { return _mm512_set1_ps(x); }
inline vf to_float(vi x) { return _mm512_cvtepi32_ps(x); }
inline vf fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline void store_rows(float* out, vf v, int valid, bool accumulate) {
  const __mmask16 m = static_cast<__mmask16>((1u << valid) - 1);
  if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, out));
  _mm512_mask_storeu_ps(out, m, v);
}
#define EDGE_SIMD 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// ---- AVX2: a vector holds 8 rows, a tile takes two passes ----
constexpr int PASSES = 2;
// 6 activation rows per weight load: spills a few of the 16 registers but reuses each decoded
// weight vector more; measured 10-25% faster than 4 rows on prefill shapes (2 or 3 are slower)
constexpr int NBMAX = 6;
typedef __m256i vi;
typedef __m256 vf;
inline vi load_i(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const vi*>(p)); }
inline vi nibbles_lo(vi v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
inline vi nibbles_hi(vi v) {
  return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F));
}
inline vi bcast4(const int8_t* p) {
  int32_t x;
  std::memcpy(&x, p, 4);
  return _mm256_set1_epi32(x);
}
inline vi zero_i() { return _mm256_setzero_si256(); }
#if defined(__AVXVNNI__)
#define EDGE_VNNI 1
inline vi dpbusd(vi acc, vi w, vi a) { return _mm256_dpbusd_avx_epi32(acc, w, a); }
#endif
inline vi pairs16(vi w, vi a) { return _mm256_maddubs_epi16(w, a); }
inline vi add16(vi a, vi b) { return _mm256_add_epi16(a, b); }
inline vi add32(vi a, vi b) { return _mm256_add_epi32(a, b); }
inline vi widen(vi x, int16_t f) { return _mm256_madd_epi16(x, _mm256_set1_epi16(f)); }
inline vf halves(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline vf zero_f() { return _mm256_setzero_ps(); }
inline vf set1_f(float x) { return _mm256_set1_ps(x); }
inline vf to_float(vi x) { return _mm256_cvtepi32_ps(x); }
inline vf fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline void store_rows(float* out, vf v, int valid, bool accumulate) {
  if (valid >= 8) {
    if (accumulate) v = _mm256_add_ps(v, _mm256_loadu_ps(out));
    _mm256_storeu_ps(out, v);
    return;
  }
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, v);
  for (int i = 0; i < valid; ++i) out[i] = accumulate ? out[i] + tmp[i] : tmp[i];
}
#define EDGE_SIMD 1
#endif

#ifdef EDGE_SIMD
constexpr int LANES = TILE / PASSES;
constexpr int64_t PF_DIST = 2048;  // bytes ahead the weight stream is prefetched

// NB activation rows (n0..) times the LANES weight rows of pass `pass` of tile t; TWO: the
// activations' second int8 pass too, on the same weight registers.
template <int NB, int BITS, bool TWO>
void rows_pass(const Weights& W, const Act& A, int64_t t, int pass, int64_t n0, float* out,
               int64_t ldo, bool accumulate) {
  constexpr int NP = TWO ? 2 : 1;  // activation passes
  const int64_t bpg = W.group / QB;
  const uint8_t* wq = W.q + t * W.tile_bytes + pass * (64 / PASSES);
  const uint16_t* ws = W.s + t * W.tile_params + pass * LANES;
  const uint16_t* wb = W.b + t * W.tile_params + pass * LANES;
  const int8_t* aq[NP][NB];
  const float* ad[NB];
  const float* as[NB];
  for (int n = 0; n < NB; ++n) {
    aq[0][n] = A.q + (n0 + n) * A.K;
    if (TWO) aq[NP - 1][n] = A.q2 + (n0 + n) * A.K;
    ad[n] = A.d + (n0 + n) * A.blocks;
    as[n] = A.sum + (n0 + n) * A.groups;
  }
  vf acc[NB];
  for (int n = 0; n < NB; ++n) acc[n] = zero_f();
  for (int64_t g = 0; g < A.groups; ++g) {
    const vf sv = halves(ws + g * TILE), bv = halves(wb + g * TILE);
    for (int n = 0; n < NB; ++n) acc[n] = fmadd(bv, set1_f(as[n][g]), acc[n]);
    for (int64_t bb = 0; bb < bpg; ++bb) {
      const int64_t blk = g * bpg + bb;
      vi dots[NP][NB];
#if defined(EDGE_VNNI)
      for (int p = 0; p < NP; ++p)
        for (int n = 0; n < NB; ++n) dots[p][n] = zero_i();
      if (BITS == 4) {
        for (int m = 0; m < 4; ++m, wq += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(wq) + PF_DIST, _MM_HINT_T0);
          const vi v = load_i(wq);
          const vi lo = nibbles_lo(v), hi = nibbles_hi(v);
          for (int p = 0; p < NP; ++p)
            for (int n = 0; n < NB; ++n) {
              dots[p][n] = dpbusd(dots[p][n], lo, bcast4(aq[p][n] + blk * QB + 4 * m));
              dots[p][n] = dpbusd(dots[p][n], hi, bcast4(aq[p][n] + blk * QB + 16 + 4 * m));
            }
        }
      } else {
        for (int m = 0; m < 8; ++m, wq += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(wq) + PF_DIST, _MM_HINT_T0);
          const vi v = load_i(wq);
          for (int p = 0; p < NP; ++p)
            for (int n = 0; n < NB; ++n)
              dots[p][n] = dpbusd(dots[p][n], v, bcast4(aq[p][n] + blk * QB + 4 * m));
        }
      }
#else
      // maddubs pair sums kept in 16 bits over the block: nibbles times int8 give at most
      // 2 * 15 * 127 per pair, 8 of them fit
      if (BITS == 4) {
        vi s16[NP][NB];
        for (int p = 0; p < NP; ++p)
          for (int n = 0; n < NB; ++n) s16[p][n] = zero_i();
        for (int m = 0; m < 4; ++m, wq += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(wq) + PF_DIST, _MM_HINT_T0);
          const vi v = load_i(wq);
          const vi lo = nibbles_lo(v), hi = nibbles_hi(v);
          for (int p = 0; p < NP; ++p)
            for (int n = 0; n < NB; ++n) {
              s16[p][n] = add16(s16[p][n], pairs16(lo, bcast4(aq[p][n] + blk * QB + 4 * m)));
              s16[p][n] =
                  add16(s16[p][n], pairs16(hi, bcast4(aq[p][n] + blk * QB + 16 + 4 * m)));
            }
        }
        for (int p = 0; p < NP; ++p)
          for (int n = 0; n < NB; ++n) dots[p][n] = widen(s16[p][n], 1);
      } else {  // bytes split into nibbles, the high ones weighted 16 at the end
        vi lo16[NP][NB], hi16[NP][NB];
        for (int p = 0; p < NP; ++p)
          for (int n = 0; n < NB; ++n) lo16[p][n] = hi16[p][n] = zero_i();
        for (int m = 0; m < 8; ++m, wq += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(wq) + PF_DIST, _MM_HINT_T0);
          const vi v = load_i(wq);
          const vi lo = nibbles_lo(v), hi = nibbles_hi(v);
          for (int p = 0; p < NP; ++p)
            for (int n = 0; n < NB; ++n) {
              const vi a = bcast4(aq[p][n] + blk * QB + 4 * m);
              lo16[p][n] = add16(lo16[p][n], pairs16(lo, a));
              hi16[p][n] = add16(hi16[p][n], pairs16(hi, a));
            }
        }
        for (int p = 0; p < NP; ++p)
          for (int n = 0; n < NB; ++n)
            dots[p][n] = add32(widen(lo16[p][n], 1), widen(hi16[p][n], 16));
      }
#endif
      for (int n = 0; n < NB; ++n) {
        if (TWO)  // d q1 + d/254 q2 = (254 q1 + q2) d/254
          acc[n] = fmadd(fmadd(to_float(dots[0][n]), set1_f(FINE), to_float(dots[NP - 1][n])),
                         mul(sv, set1_f(ad[n][blk] / FINE)), acc[n]);
        else
          acc[n] = fmadd(to_float(dots[0][n]), mul(sv, set1_f(ad[n][blk])), acc[n]);
      }
    }
  }
  const int64_t row0 = t * TILE + pass * LANES;
  const int valid = static_cast<int>(std::min<int64_t>(LANES, W.N - row0));
  if (valid <= 0) return;
  for (int n = 0; n < NB; ++n) store_rows(out + (n0 + n) * ldo + row0, acc[n], valid, accumulate);
}

#if !defined(EDGE_VNNI) && !defined(__AVX512F__)
#define EDGE_W16 1
// 8-bit weights times both activation passes at once, without VNNI: maddubs on full bytes
// would saturate, and nibbles cost two of them per pass. The passes' values 254 q + q2 fit
// 16 bits, so the weights widened to 16 bits take one madd_epi16 per 2 columns: half the
// instructions, and the same integer sums, hence the same result, as the two passes.
// A 32-byte load holds 8 rows x 4 columns; widened, rows 0-3 and rows 4-7 give pair sums that
// one hadd per block folds into lanes holding rows order[j].
template <int NB>
void rows_pass_w16(const Weights& W, const Act& A, int64_t t, int pass, int64_t n0, float* out,
                   int64_t ldo, bool accumulate) {
  const int64_t bpg = W.group / QB;
  const uint8_t* wq = W.q + t * W.tile_bytes + pass * 32;
  const uint16_t* ws = W.s + t * W.tile_params + pass * LANES;
  const uint16_t* wb = W.b + t * W.tile_params + pass * LANES;
  const __m256i order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);  // its own inverse
  const int16_t* a[NB];
  const float* ad[NB];
  const float* as[NB];
  for (int n = 0; n < NB; ++n) {
    a[n] = A.a16 + (n0 + n) * A.K;
    ad[n] = A.d + (n0 + n) * A.blocks;
    as[n] = A.sum + (n0 + n) * A.groups;
  }
  vf acc[NB];
  for (int n = 0; n < NB; ++n) acc[n] = zero_f();
  for (int64_t g = 0; g < A.groups; ++g) {
    const vf sv = _mm256_permutevar8x32_ps(halves(ws + g * TILE), order);
    const vf bv = _mm256_permutevar8x32_ps(halves(wb + g * TILE), order);
    for (int n = 0; n < NB; ++n) acc[n] = fmadd(bv, set1_f(as[n][g]), acc[n]);
    for (int64_t bb = 0; bb < bpg; ++bb) {
      const int64_t blk = g * bpg + bb;
      vi lo[NB], hi[NB];
      for (int n = 0; n < NB; ++n) lo[n] = hi[n] = zero_i();
      for (int m = 0; m < 8; ++m, wq += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(wq) + PF_DIST, _MM_HINT_T0);
        const vi v = load_i(wq);
        const vi w0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(v));
        const vi w1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(v, 1));
        for (int n = 0; n < NB; ++n) {
          int64_t four;
          std::memcpy(&four, a[n] + blk * QB + 4 * m, 8);
          const vi av = _mm256_set1_epi64x(four);
          lo[n] = add32(lo[n], _mm256_madd_epi16(w0, av));
          hi[n] = add32(hi[n], _mm256_madd_epi16(w1, av));
        }
      }
      for (int n = 0; n < NB; ++n)
        acc[n] = fmadd(to_float(_mm256_hadd_epi32(lo[n], hi[n])),
                       mul(sv, set1_f(ad[n][blk] / FINE)), acc[n]);
    }
  }
  const int64_t row0 = t * TILE + pass * LANES;
  const int valid = static_cast<int>(std::min<int64_t>(LANES, W.N - row0));
  if (valid <= 0) return;
  for (int n = 0; n < NB; ++n)
    store_rows(out + (n0 + n) * ldo + row0, _mm256_permutevar8x32_ps(acc[n], order), valid,
               accumulate);
}
#endif

template <int BITS, bool TWO>
void tile_rows(const Weights& W, const Act& A, int64_t t, int64_t n0, int64_t n1, float* out,
               int64_t ldo, bool accumulate) {
#ifdef EDGE_W16
  if (BITS == 8 && TWO) {
    for (int pass = 0; pass < PASSES; ++pass) {
      int64_t n = n0;
      for (; n + 4 <= n1; n += 4) rows_pass_w16<4>(W, A, t, pass, n, out, ldo, accumulate);
      for (; n < n1; ++n) rows_pass_w16<1>(W, A, t, pass, n, out, ldo, accumulate);
    }
    return;
  }
#endif
  for (int pass = 0; pass < PASSES; ++pass) {
    int64_t n = n0;
    for (; n + NBMAX <= n1; n += NBMAX)
      rows_pass<NBMAX, BITS, TWO>(W, A, t, pass, n, out, ldo, accumulate);
    int64_t left = n1 - n;
    if (NBMAX > 4 && left >= 4) {
      rows_pass<4, BITS, TWO>(W, A, t, pass, n, out, ldo, accumulate);
      n += 4;
      left -= 4;
    }
    if (left == 3) rows_pass<3, BITS, TWO>(W, A, t, pass, n, out, ldo, accumulate);
    if (left == 2) rows_pass<2, BITS, TWO>(W, A, t, pass, n, out, ldo, accumulate);
    if (left == 1) rows_pass<1, BITS, TWO>(W, A, t, pass, n, out, ldo, accumulate);
  }
}

// NB float rows y[n * K + k] times a dequantized tile wt[k * 16 + r]: each output is one
// fused multiply-add per k in order of k, whichever rows share the call.
#else
// ---- portable: one activation row at a time, plain C++ ----
template <int BITS, bool TWO>
void tile_rows(const Weights& W, const Act& A, int64_t t, int64_t n0, int64_t n1, float* out,
               int64_t ldo, bool accumulate) {
  constexpr int CH = BITS == 4 ? 4 : 8;
  const int64_t bpg = W.group / QB;
  const int valid = static_cast<int>(std::min<int64_t>(TILE, W.N - t * TILE));
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* aq = A.q + n * A.K;
    const int8_t* aq2 = TWO ? A.q2 + n * A.K : aq;
    const float* ad = A.d + n * A.blocks;
    const float* as = A.sum + n * A.groups;
    float acc[TILE] = {};
    const uint8_t* wq = W.q + t * W.tile_bytes;
    const uint16_t* ws = W.s + t * W.tile_params;
    const uint16_t* wb = W.b + t * W.tile_params;
    for (int64_t g = 0; g < A.groups; ++g) {
      float sv[TILE];
      for (int r = 0; r < TILE; ++r) {
        sv[r] = half_to_float(ws[g * TILE + r]);
        acc[r] += half_to_float(wb[g * TILE + r]) * as[g];
      }
      for (int64_t bb = 0; bb < bpg; ++bb) {
        const int64_t blk = g * bpg + bb;
        const int8_t* a = aq + blk * QB;
        const int8_t* a2 = aq2 + blk * QB;
        int32_t dots[TILE] = {}, dots2[TILE] = {};
        for (int m = 0; m < CH; ++m, wq += 64) {
          for (int r = 0; r < TILE; ++r) {
            int32_t s = 0, s2 = 0;
            for (int i = 0; i < 4; ++i) {
              const int32_t byte = wq[r * 4 + i];
              if (BITS == 4) {
                s += (byte & 15) * a[4 * m + i] + (byte >> 4) * a[16 + 4 * m + i];
                if (TWO) s2 += (byte & 15) * a2[4 * m + i] + (byte >> 4) * a2[16 + 4 * m + i];
              } else {
                s += byte * a[4 * m + i];
                if (TWO) s2 += byte * a2[4 * m + i];
              }
            }
            dots[r] += s;
            dots2[r] += s2;
          }
        }
        for (int r = 0; r < TILE; ++r) {
          if (TWO)
            acc[r] += (static_cast<float>(dots[r]) * FINE + static_cast<float>(dots2[r])) *
                      (sv[r] * (ad[blk] / FINE));
          else
            acc[r] += static_cast<float>(dots[r]) * (sv[r] * ad[blk]);
        }
      }
    }
    float* o = out + n * ldo + t * TILE;
    for (int r = 0; r < valid; ++r) o[r] = accumulate ? o[r] + acc[r] : acc[r];
  }
}

#endif

// Scratch of the calling thread for the quantized activation.
struct ActBuffers {
  std::vector<int8_t> q, q2;
  std::vector<int16_t> a16;
  std::vector<float> d, sum, y;
};

ActBuffers& act_buffers() {
  static thread_local ActBuffers buffers;
  return buffers;
}

Weights weights_of(const torch::Tensor& qweight, const torch::Tensor& scales,
                   const torch::Tensor& biases, int64_t rows, int64_t bits, int64_t group) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(group % QB == 0 && group > 0, "group size must be a multiple of 32");
  TORCH_CHECK(qweight.dtype() == torch::kUInt8 && qweight.dim() == 3 && qweight.is_contiguous(),
              "qweight must be uint8 [tiles, K/32, bytes]");
  const int64_t tiles = qweight.size(0), K = qweight.size(1) * QB;
  TORCH_CHECK(qweight.size(2) == (bits == 4 ? 4 : 8) * 64, "qweight chunk size");
  TORCH_CHECK(rows > (tiles - 1) * TILE && rows <= tiles * TILE, "rows do not match the tiles");
  TORCH_CHECK(K % group == 0, "K must be a multiple of the group size");
  for (const auto* t : {&scales, &biases})
    TORCH_CHECK(t->dtype() == torch::kFloat16 && t->is_contiguous() && t->dim() == 3 &&
                    t->size(0) == tiles && t->size(1) == K / group && t->size(2) == TILE,
                "scales/biases must be float16 [tiles, K/group, 16]");
  return Weights{qweight.data_ptr<uint8_t>(),
                 reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
                 reinterpret_cast<const uint16_t*>(biases.data_ptr<at::Half>()),
                 rows,
                 K,
                 bits,
                 group,
                 qweight.size(1) * qweight.size(2),
                 (K / group) * TILE};
}

// Row r of the weight as floats (q * scale + bias), into w[K].
void weight_row(const Weights& W, int64_t r, float* w) {
  const int64_t t = r / TILE, rr = r % TILE, chunks = W.bits == 4 ? 4 : 8;
  const uint8_t* wq = W.q + t * W.tile_bytes;
  for (int64_t b = 0; b < W.K / QB; ++b) {
    for (int64_t m = 0; m < chunks; ++m) {
      const uint8_t* bytes = wq + (b * chunks + m) * 64 + rr * 4;
      for (int i = 0; i < 4; ++i) {
        if (W.bits == 4) {
          w[b * QB + 4 * m + i] = static_cast<float>(bytes[i] & 15);
          w[b * QB + 16 + 4 * m + i] = static_cast<float>(bytes[i] >> 4);
        } else {
          w[b * QB + 4 * m + i] = static_cast<float>(bytes[i]);
        }
      }
    }
  }
  const uint16_t* ws = W.s + t * W.tile_params;
  const uint16_t* wb = W.b + t * W.tile_params;
  for (int64_t g = 0; g < W.K / W.group; ++g) {  // scale and bias converted once per group
    const float sc = half_to_float(ws[g * TILE + rr]), bias = half_to_float(wb[g * TILE + rr]);
    float* x = w + g * W.group;
    for (int64_t k = 0; k < W.group; ++k) x[k] = x[k] * sc + bias;
  }
}


}  // namespace

// The weight requantized to 4 bits in groups of 32 (min/max per group), in the same tiles:
// (qweight, scales, biases). A coarser copy for a first pass whose best candidates are then
// recomputed from the original.
std::vector<torch::Tensor> requantize4(torch::Tensor qweight, torch::Tensor scales,
                                       torch::Tensor biases, int64_t rows, int64_t bits,
                                       int64_t group) {
  const Weights W = weights_of(qweight, scales, biases, rows, bits, group);
  const int64_t tiles = qweight.size(0), blocks = W.K / QB;
  auto q4 = torch::zeros({tiles, blocks, 4 * 64}, torch::dtype(torch::kUInt8));
  auto s4 = torch::zeros({tiles, blocks, TILE}, torch::dtype(torch::kFloat16));
  auto b4 = torch::zeros({tiles, blocks, TILE}, torch::dtype(torch::kFloat16));
  uint8_t* qd = q4.data_ptr<uint8_t>();
  uint16_t* sd = reinterpret_cast<uint16_t*>(s4.data_ptr<at::Half>());
  uint16_t* bd = reinterpret_cast<uint16_t*>(b4.data_ptr<at::Half>());
  edge_parallel::parallel_chunks(rows, 64, [&](int64_t a, int64_t z) {
    std::vector<float> w(W.K);
    for (int64_t r = a; r < z; ++r) {
      weight_row(W, r, w.data());
      const int64_t t = r / TILE, rr = r % TILE;
      for (int64_t b = 0; b < blocks; ++b) {
        const float* v = w.data() + b * QB;
        float lo = v[0], hi = v[0];
        for (int i = 1; i < QB; ++i) lo = std::min(lo, v[i]), hi = std::max(hi, v[i]);
        const c10::Half sh((hi - lo) / 15.0f), bh(lo);
        const float sc = static_cast<float>(sh), bias = static_cast<float>(bh);
        sd[(t * blocks + b) * TILE + rr] = sh.x;
        bd[(t * blocks + b) * TILE + rr] = bh.x;
        uint8_t* chunk = qd + (t * blocks + b) * 4 * 64;
        for (int k = 0; k < QB; ++k) {
          const float x = sc > 0.f ? std::nearbyint((v[k] - bias) / sc) : 0.f;
          const uint8_t q = static_cast<uint8_t>(std::min(15.f, std::max(0.f, x)));
          const int m = (k % 16) / 4, i = k % 4;
          chunk[m * 64 + rr * 4 + i] |= k < 16 ? q : static_cast<uint8_t>(q << 4);
        }
      }
    }
  });
  return {q4, s4, b4};
}

// Rows ids [n] (int64) of the weight, dequantized: float32 [n, K] (embedding lookups).
torch::Tensor weight_rows(torch::Tensor ids, torch::Tensor qweight, torch::Tensor scales,
                          torch::Tensor biases, int64_t rows, int64_t bits, int64_t group) {
  const Weights W = weights_of(qweight, scales, biases, rows, bits, group);
  TORCH_CHECK(ids.dtype() == torch::kInt64 && ids.dim() == 1 && ids.is_contiguous(),
              "ids must be int64 [n]");
  const int64_t n = ids.size(0);
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(id[i] >= 0 && id[i] < rows, "row id out of range");
  auto out = torch::empty({n, W.K}, torch::dtype(torch::kFloat32));
  float* od = out.data_ptr<float>();
  edge_parallel::parallel_chunks(n, 64, [&](int64_t a, int64_t z) {
    for (int64_t i = a; i < z; ++i) weight_row(W, id[i], od + i * W.K);
  });
  return out;
}


// y = prep(x) @ W^T for float32 x [M, K], or [M, 2K] for the gated steps (SWIGLU:
// silu(x[:, :K]) * x[:, K:], GEGLU: gelu_tanh(x[:, :K]) * x[:, K:]); RMS_NORM:
// x * rsqrt(mean(x^2) + eps) * norm. With `out` given ([M, N] float32), the product is added
// to it in place and `out` is returned; otherwise a new [M, N] tensor. `passes` (1 or 2): the
// activations' int8 passes (see the top of this file).
torch::Tensor quant_linear(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                           torch::Tensor biases, int64_t rows, int64_t bits, int64_t group,
                           int64_t prep, c10::optional<torch::Tensor> norm, double eps,
                           c10::optional<torch::Tensor> out, int64_t passes) {
  const Weights W = weights_of(qweight, scales, biases, rows, bits, group);
  const int64_t K = W.K;
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "x must be contiguous float32 [M, K]");
  TORCH_CHECK(x.size(1) == (gated(prep) ? 2 * K : K), "x has the wrong width");
  TORCH_CHECK(prep >= PLAIN && prep <= GEGLU, "prep");
  TORCH_CHECK(passes == 1 || passes == 2, "passes must be 1 or 2");
  const bool two = passes == 2;
  const float* nw = nullptr;
  if (prep == RMS_NORM) {
    TORCH_CHECK(norm.has_value() && norm->dtype() == torch::kFloat32 && norm->numel() == K &&
                    norm->is_contiguous(),
                "norm must be float32 [K]");
    nw = norm->data_ptr<float>();
  }
  const int64_t M = x.size(0);
  torch::Tensor result;
  bool accumulate = false;
  if (out.has_value()) {
    result = *out;
    TORCH_CHECK(result.dtype() == torch::kFloat32 && result.is_contiguous() &&
                    result.dim() == 2 && result.size(0) == M && result.size(1) == rows,
                "out must be contiguous float32 [M, N]");
    accumulate = true;
  } else {
    result = torch::empty({M, rows}, x.options());
  }
  if (M == 0) return result;

  ActBuffers& buf = act_buffers();
  const int64_t blocks = K / QB, groups = K / group;
  buf.q.resize(M * K);
  if (two) buf.q2.resize(M * K), buf.a16.resize(M * K);
  buf.d.resize(M * blocks);
  buf.sum.resize(M * groups);
  const float* xd = x.data_ptr<float>();
  const int64_t width = x.size(1);
  edge_parallel::parallel_chunks(M, (16384 + K - 1) / K, [&](int64_t a, int64_t z) {
    std::vector<float> y(K);  // rows: K % 32 == 0
    for (int64_t n = a; n < z; ++n) {
      prepared_row(xd + n * width, K, prep, nw, static_cast<float>(eps), y.data());
      quantize_row(y.data(), K, group, buf.q.data() + n * K,
                   two ? buf.q2.data() + n * K : nullptr, two ? buf.a16.data() + n * K : nullptr,
                   buf.d.data() + n * blocks, buf.sum.data() + n * groups);
    }
  });
  const Act A{buf.q.data(), two ? buf.q2.data() : nullptr, two ? buf.a16.data() : nullptr,
              buf.d.data(), buf.sum.data(), K, blocks, groups};

  float* od = result.data_ptr<float>();
  const int64_t tiles = qweight.size(0);
  // rows in blocks that keep their quantized activations in the core's cache
  const int64_t mblock = std::max<int64_t>(1, std::min<int64_t>(M, 65536 / K * 2 / passes));
  // chunks of at least 32 KB of weights times rows: smaller ones cost more to hand out
  const int64_t grain = (32768 + W.tile_bytes * M - 1) / (W.tile_bytes * M);
  edge_parallel::parallel_chunks(tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t m0 = 0; m0 < M; m0 += mblock) {
      const int64_t m1 = std::min(M, m0 + mblock);
      for (int64_t t = t0; t < t1; ++t) {
        if (bits == 4 && two)
          tile_rows<4, true>(W, A, t, m0, m1, od, rows, accumulate);
        else if (bits == 4)
          tile_rows<4, false>(W, A, t, m0, m1, od, rows, accumulate);
        else if (two)
          tile_rows<8, true>(W, A, t, m0, m1, od, rows, accumulate);
        else
          tile_rows<8, false>(W, A, t, m0, m1, od, rows, accumulate);
      }
    }
  });
  return result;
}

// The k largest logits of each row [M, V] recomputed exactly (float32 dequantized weights
// times float32 h [M, K]) in place; returns their indices [M, k] (int64), largest first.
torch::Tensor rescore_top(torch::Tensor logits, torch::Tensor h, torch::Tensor qweight,
                          torch::Tensor scales, torch::Tensor biases, int64_t rows, int64_t bits,
                          int64_t group, int64_t k) {
  const Weights W = weights_of(qweight, scales, biases, rows, bits, group);
  TORCH_CHECK(logits.dtype() == torch::kFloat32 && logits.is_contiguous() && logits.dim() == 2 &&
                  logits.size(1) == rows,
              "logits must be contiguous float32 [M, N]");
  TORCH_CHECK(h.dtype() == torch::kFloat32 && h.is_contiguous() && h.dim() == 2 &&
                  h.size(0) == logits.size(0) && h.size(1) == W.K,
              "h must be contiguous float32 [M, K]");
  const int64_t M = logits.size(0), V = rows, K = W.K;
  k = std::max<int64_t>(1, std::min(k, V));
  auto idx = torch::empty({M, k}, logits.options().dtype(torch::kInt64));
  float* lg = logits.data_ptr<float>();
  const float* hd = h.data_ptr<float>();
  int64_t* id = idx.data_ptr<int64_t>();
  using Scored = std::pair<float, int64_t>;
  auto greater = [](const Scored& x, const Scored& y) {
    return x.first > y.first || (x.first == y.first && x.second < y.second);
  };
  // each row's vocabulary in S spans searched apart (a single row would use one thread),
  // then the spans' best are merged
  const int64_t S = M < at::get_num_threads() ? at::get_num_threads() : 1;
  std::vector<std::vector<Scored>> found(M * S);
  edge_parallel::parallel_chunks(M * S, 1, [&](int64_t a, int64_t z) {
    for (int64_t p = a; p < z; ++p) {
      const float* row = lg + (p / S) * V;
      const int64_t j0 = V * (p % S) / S, j1 = V * (p % S + 1) / S;
      // min-heap of the k best so far: most values fail the first comparison
      std::vector<Scored>& heap = found[p];
      for (int64_t j = j0; j < j1; ++j) {
        if (static_cast<int64_t>(heap.size()) == k && (j & 15) == 0 && j + 16 <= j1) {
          float top = row[j];
          for (int i = 1; i < 16; ++i) top = std::max(top, row[j + i]);
          if (top <= heap.front().first) {
            j += 15;
            continue;
          }
        }
        const float v = row[j];
        if (static_cast<int64_t>(heap.size()) < k) {
          heap.emplace_back(v, j);
          std::push_heap(heap.begin(), heap.end(), greater);
        } else if (v > heap.front().first) {
          std::pop_heap(heap.begin(), heap.end(), greater);
          heap.back() = {v, j};
          std::push_heap(heap.begin(), heap.end(), greater);
        }
      }
    }
  });
  for (int64_t n = 0; n < M; ++n) {
    std::vector<Scored> all;
    for (int64_t p = n * S; p < (n + 1) * S; ++p) all.insert(all.end(), found[p].begin(), found[p].end());
    std::partial_sort(all.begin(), all.begin() + k, all.end(), greater);
    for (int64_t c = 0; c < k; ++c) id[n * k + c] = all[c].second;
  }
  // the candidates' exact products, spread over the threads (one row decodes alone)
  edge_parallel::parallel_chunks(M * k, 32, [&](int64_t a, int64_t z) {
    std::vector<float> w(K);
    for (int64_t p = a; p < z; ++p) {
      const int64_t n = p / k, r = id[p];
      weight_row(W, r, w.data());
      const float* hn = hd + n * K;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t kk = 0; kk < K; ++kk) dot += w[kk] * hn[kk];
      lg[n * V + r] = dot;
    }
  });
  return idx;
}

// Which code path this build runs, for reports.
std::string quant_matmul_isa() {
#if defined(__AVX512F__) && defined(__AVX512BW__)
#if defined(__AVX512VNNI__)
  return "avx512-vnni";
#else
  return "avx512";
#endif
#elif defined(EDGE_SIMD)
#if defined(__AVXVNNI__)
  return "avx2-vnni";
#else
  return "avx2";
#endif
#else
  return "generic";
#endif
}
