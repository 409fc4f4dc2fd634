// 16 float lanes for the attention kernel, in whatever registers the build has.
//
// With AVX-512 a 64-byte GCC vector is one register. Without it GCC moves such vectors
// through memory an element at a time (tens of times slower), so there the 16 lanes are held
// as parts of the widest native vector (8 lanes with AVX, 4 otherwise), with the same
// operators. Code that needs single lanes uses lane() / set_lane().
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef uint8_t u8x16 __attribute__((vector_size(16)));  // 16 bytes

#if defined(__AVX512F__)

typedef float f16x __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

inline f16x load16(const float* p) {
  f16x v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store16(float* p, f16x v) { std::memcpy(p, &v, sizeof(v)); }
inline f16x splat(float x) { return f16x{} + x; }
inline float lane(const f16x& v, int i) { return v[i]; }
inline void set_lane(f16x& v, int i, float x) { v[i] = x; }
inline f16x vmax(f16x a, f16x b) { return a > b ? a : b; }
inline f16x bytes_to_float(u8x16 b) {
  return __builtin_convertvector(__builtin_convertvector(b, i32x16), f16x);
}
// 2^n for integral n in [-126, 127]
inline f16x pow2(f16x n) {
  const i32x16 e = (__builtin_convertvector(n, i32x16) + 127) << 23;
  f16x out;
  std::memcpy(&out, &e, sizeof(out));
  return out;
}

#else

#if defined(__AVX__)
constexpr int PART = 8;
#else
constexpr int PART = 4;
#endif
constexpr int NPART = 16 / PART;
typedef float fpart __attribute__((vector_size(PART * 4)));
typedef int32_t ipart __attribute__((vector_size(PART * 4)));

struct f16x {
  fpart p[NPART];
};

#define EDGE_VEC16_OP(op)                                                  \
  inline f16x operator op(const f16x& a, const f16x& b) {                  \
    f16x r;                                                                \
    for (int k = 0; k < NPART; ++k) r.p[k] = a.p[k] op b.p[k];             \
    return r;                                                              \
  }                                                                        \
  inline f16x operator op(const f16x& a, float b) {                        \
    f16x r;                                                                \
    for (int k = 0; k < NPART; ++k) r.p[k] = a.p[k] op b;                  \
    return r;                                                              \
  }                                                                        \
  inline f16x operator op(float a, const f16x& b) {                        \
    f16x r;                                                                \
    for (int k = 0; k < NPART; ++k) r.p[k] = a op b.p[k];                  \
    return r;                                                              \
  }                                                                        \
  inline f16x& operator op##=(f16x& a, const f16x& b) { return a = a op b; } \
  inline f16x& operator op##=(f16x& a, float b) { return a = a op b; }
EDGE_VEC16_OP(+)
EDGE_VEC16_OP(-)
EDGE_VEC16_OP(*)
EDGE_VEC16_OP(/)
#undef EDGE_VEC16_OP

inline f16x operator-(const f16x& a) {
  f16x r;
  for (int k = 0; k < NPART; ++k) r.p[k] = -a.p[k];
  return r;
}

// whole native vectors at a time: a 64-byte copy would be split into 16-byte moves, and
// reading them back as wider vectors stalls on store forwarding
inline f16x load16(const float* p) {
  f16x r;
  for (int k = 0; k < NPART; ++k) std::memcpy(&r.p[k], p + k * PART, sizeof(fpart));
  return r;
}

inline void store16(float* p, const f16x& v) {
  for (int k = 0; k < NPART; ++k) std::memcpy(p + k * PART, &v.p[k], sizeof(fpart));
}

inline f16x splat(float x) {
  f16x r;
  for (int k = 0; k < NPART; ++k) r.p[k] = fpart{} + x;
  return r;
}

inline float lane(const f16x& v, int i) { return v.p[i / PART][i % PART]; }
inline void set_lane(f16x& v, int i, float x) { v.p[i / PART][i % PART] = x; }

inline f16x vmax(f16x a, f16x b) {
  f16x r;
  for (int k = 0; k < NPART; ++k) r.p[k] = a.p[k] > b.p[k] ? a.p[k] : b.p[k];
  return r;
}

inline f16x bytes_to_float(u8x16 b) {
  f16x r;
#if defined(__AVX2__)
  __m128i x;
  std::memcpy(&x, &b, 16);
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(x));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(x, 8)));
  std::memcpy(&r.p[0], &lo, 32);
  std::memcpy(&r.p[1], &hi, 32);
#else
  for (int k = 0; k < NPART; ++k)
    for (int i = 0; i < PART; ++i) r.p[k][i] = static_cast<float>(b[k * PART + i]);
#endif
  return r;
}

inline f16x pow2(f16x n) {
  f16x r;
  for (int k = 0; k < NPART; ++k) {
    const ipart e = (__builtin_convertvector(n.p[k], ipart) + 127) << 23;
    std::memcpy(&r.p[k], &e, sizeof(e));
  }
  return r;
}

#endif
