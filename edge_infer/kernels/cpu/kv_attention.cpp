// Attention over KV caches held in the stored form: sealed blocks quantized (4 or 8 bits,
// affine groups, rotated by a Hadamard matrix) and a float16 tail; for single new tokens
// (decoding, several sequences at once) and for the tokens of a prefill chunk. Nothing is
// dequantized into a full-size buffer: each key and value is decoded once as it is read.
//
// Layouts (all contiguous along the last dimension):
//   packed  int32 [n_kv, cap, D*bits/32]  (element i of a row at bits i*bits, little endian)
//   scales, biases float16 [n_kv, cap, D/group]
//   tail    float16 [n_kv, tail_cap, D]   (tail row r holds token tail_offset + r)
// What attention reads for a sealed token is dequantize(stored) @ R; for a tail token the
// float16 row itself. R is symmetric or not: scores use q @ R^T, outputs acc @ R.

#include <torch/extension.h>

#include "parallel.h"
#include "vec16.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__SSE2__) || defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

inline f16x halves16(const uint16_t* p) {
  f16x v;
#if defined(__AVX512F__)
  __m512 x = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  std::memcpy(&v, &x, sizeof(v));
#elif defined(__F16C__) && defined(__AVX__)
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  std::memcpy(&v.p[0], &lo, 32);
  std::memcpy(&v.p[1], &hi, 32);
#else
  for (int i = 0; i < 16; ++i) set_lane(v, i, half_to_float(p[i]));
#endif
  return v;
}

inline float hsum(f16x v) {
#if defined(__AVX512F__)
  __m512 x;
  std::memcpy(&x, &v, sizeof(x));
  return _mm512_reduce_add_ps(x);
#else
  fpart s = v.p[0];
  for (int k = 1; k < NPART; ++k) s += v.p[k];
  float t = 0.f;
  for (int i = 0; i < PART; ++i) t += s[i];
  return t;
#endif
}

// The sums of four vectors, in out[0..3].
inline void hsum4(f16x a, f16x b, f16x c, f16x d, float* out) {
#if defined(__AVX512F__)
  __m512 x, y, z, w;
  std::memcpy(&x, &a, 64);
  std::memcpy(&y, &b, 64);
  std::memcpy(&z, &c, 64);
  std::memcpy(&w, &d, 64);
  // 256-bit halves: [a lo+hi | b lo+hi], [c lo+hi | d lo+hi]
  __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
  __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(z, w, 0x44), _mm512_shuffle_f32x4(z, w, 0xEE));
  // 128-bit quarters: one per vector, in the order a, b, c, d
  __m512 all = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  all = _mm512_add_ps(all, _mm512_permute_ps(all, 0x4E));
  all = _mm512_add_ps(all, _mm512_permute_ps(all, 0xB1));
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, all);
  out[0] = lanes[0];
  out[1] = lanes[4];
  out[2] = lanes[8];
  out[3] = lanes[12];
#else
  out[0] = hsum(a);
  out[1] = hsum(b);
  out[2] = hsum(c);
  out[3] = hsum(d);
#endif
}

// exp(x) for x <= 0 (softmax weights): 2^n * p(f), |relative error| < 2e-7.
__attribute__((always_inline)) inline f16x exp16(f16x x) {
  x = vmax(x, splat(-87.0f));
  const f16x magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  f16x n = (x * 1.44269504088896341f + magic) - magic;
  f16x f = x - n * 0.693359375f;
  f = f - n * -2.12194440e-4f;
  f16x p = splat(1.9875691500e-4f);
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  return p * pow2(n);
}

struct Layout {
  int64_t n_q, n_kv, bits, group, cap, tail_cap, sealed, length, tail_offset;
  int64_t window;  // a query at position i sees keys i-window+1..i; 0: all keys up to i
  // the stored row of each of the sealed tokens attended, in order (a selection of pages
  // read in place); null: rows 0..sealed-1
  const int32_t* rows = nullptr;
};

// Where sealed token j of kv head h is stored.
inline int64_t stored_row(const Layout& L, int64_t h, int64_t j) {
  return h * L.cap + (L.rows ? L.rows[j] : j);
}

// Pointers of one sequence's layer, as the Python side lists them.
struct LayerPtrs {
  const int32_t* kp;
  const uint16_t* ks;
  const uint16_t* kb;
  const int32_t* vp;
  const uint16_t* vs;
  const uint16_t* vb;
  const uint16_t* kt;
  const uint16_t* vt;
};

// The pointers listed for one sequence's layer (addresses as int64).
LayerPtrs layer_ptrs(const int64_t* x) {
  return LayerPtrs{reinterpret_cast<const int32_t*>(x[0]), reinterpret_cast<const uint16_t*>(x[1]),
                   reinterpret_cast<const uint16_t*>(x[2]), reinterpret_cast<const int32_t*>(x[3]),
                   reinterpret_cast<const uint16_t*>(x[4]), reinterpret_cast<const uint16_t*>(x[5]),
                   reinterpret_cast<const uint16_t*>(x[6]), reinterpret_cast<const uint16_t*>(x[7])};
}

// A stored row decoded into D floats held in C = D/16 vectors. For 4 bits the vectors hold
// the even elements first, then the odd ones (a byte holds element 2i in its low nibble and
// 2i+1 in its high one); callers lay out their other operand the same way.
template <int D>
inline void decode_row(int64_t bits, const int32_t* packed, f16x* out) {
  constexpr int C = D / 16;
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(packed);
  if (bits == 4) {
    for (int c = 0; c < C / 2; ++c) {
      u8x16 raw;
      std::memcpy(&raw, bytes + 16 * c, 16);
      out[c] = bytes_to_float(raw & 15);
      out[C / 2 + c] = bytes_to_float(raw >> 4);
    }
  } else {
    for (int c = 0; c < C; ++c) {
      u8x16 raw;
      std::memcpy(&raw, bytes + 16 * c, 16);
      out[c] = bytes_to_float(raw);
    }
  }
}

// A stored row's per-group scales and biases, as floats.
inline void group_params(const uint16_t* scales, const uint16_t* biases, int64_t row,
                         int64_t groups, float* s, float* b) {
  for (int64_t k = 0; k < groups; ++k) {
    s[k] = half_to_float(scales[row * groups + k]);
    b[k] = half_to_float(biases[row * groups + k]);
  }
}

// Index, in decode_row's order, of the group holding vector c.
inline int64_t group_of(int64_t bits, int64_t group, int c, int D) {
  const int64_t first = bits == 4 ? (c < D / 32 ? 32 * c : 32 * (c - D / 32)) : 16 * c;
  return first / group;
}

// Writes one float row as float16 (round to nearest even, as torch's conversion does).
inline void store_half_row(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
#if defined(__F16C__)
    dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
#else
    dst[i] = c10::Half(src[i]).x;
#endif
  }
}

// NR query rows of one (sequence, kv head), held in registers while every key and value of
// the sequence is decoded once.
template <int D, int NR>
void attend_rows(const Layout& L, const LayerPtrs& p, int64_t h, const float* qrows,
                 const float* R, const float* Rt, float* orows, std::vector<float>& scores) {
  constexpr int C = D / 16;
  const int64_t n = L.length, groups = D / L.group, words = D * L.bits / 32;
  const bool quantized = L.bits < 16;
  const int64_t qs = quantized ? L.sealed : 0;  // tokens read from the quantized store
  const int64_t lo = L.window > 0 ? std::max<int64_t>(0, n - L.window) : 0;  // first key seen
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t n_pad = (n + 15) / 16 * 16;
  scores.resize(static_cast<size_t>(NR) * n_pad);

  f16x plain[NR][C], rot[NR][C];
  float sums[NR][16] = {};
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < C; ++c) plain[r][c] = load16(qrows + r * D + 16 * c) * scale;
  if (qs > 0) {
    // rot = (q @ R^T) in decode_row's order; sums: its sum over each group
    for (int r = 0; r < NR; ++r) {
      f16x rq[C] = {};
      for (int d = 0; d < D; ++d) {
        const float qd = qrows[r * D + d] * scale;
        for (int c = 0; c < C; ++c) rq[c] += load16(Rt + d * D + 16 * c) * qd;
      }
      float flat[D], ordered[D];
      for (int c = 0; c < C; ++c) store16(flat + 16 * c, rq[c]);
      for (int e = 0; e < D; ++e) {
        ordered[L.bits == 4 ? (e % 2 ? D / 2 + e / 2 : e / 2) : e] = flat[e];
        sums[r][e / L.group] += flat[e];
      }
      for (int c = 0; c < C; ++c) rot[r][c] = load16(ordered + 16 * c);
    }
  }

  // scores; single-group rows four keys at a time (one reduction for four dot products)
  int64_t j0 = lo;
  if (groups == 1) {
    for (; j0 + 4 <= qs; j0 += 4) {
      f16x kv[4][C];
      float sk[4], bk[4];
      for (int u = 0; u < 4; ++u) {
        const int64_t row = stored_row(L, h, j0 + u);
        decode_row<D>(L.bits, p.kp + row * words, kv[u]);
        sk[u] = half_to_float(p.ks[row]);
        bk[u] = half_to_float(p.kb[row]);
      }
      for (int r = 0; r < NR; ++r) {
        f16x acc[4];
        for (int u = 0; u < 4; ++u) {
          acc[u] = kv[u][0] * rot[r][0];
          for (int c = 1; c < C; ++c) acc[u] += kv[u][c] * rot[r][c];
        }
        float dots[4];
        hsum4(acc[0], acc[1], acc[2], acc[3], dots);
        for (int u = 0; u < 4; ++u)
          scores[r * n_pad + j0 + u] = sk[u] * dots[u] + bk[u] * sums[r][0];
      }
    }
  }
  for (int64_t j = j0; j < qs; ++j) {
    const int64_t row = stored_row(L, h, j);
    f16x kv[C];
    decode_row<D>(L.bits, p.kp + row * words, kv);
    if (groups == 1) {
      const float sk = half_to_float(p.ks[row]), bk = half_to_float(p.kb[row]);
      for (int r = 0; r < NR; ++r) {
        f16x acc = kv[0] * rot[r][0];
        for (int c = 1; c < C; ++c) acc += kv[c] * rot[r][c];
        scores[r * n_pad + j] = sk * hsum(acc) + bk * sums[r][0];
      }
    } else {
      float s[16], b[16];
      group_params(p.ks, p.kb, row, groups, s, b);
      for (int r = 0; r < NR; ++r) {
        float total = 0.f;
        for (int c = 0; c < C; ++c)
          total += s[group_of(L.bits, L.group, c, D)] * hsum(kv[c] * rot[r][c]);
        for (int64_t k = 0; k < groups; ++k) total += b[k] * sums[r][k];
        scores[r * n_pad + j] = total;
      }
    }
  }
  int64_t t0 = std::max(qs, lo);
  for (; t0 + 4 <= n; t0 += 4) {
    f16x kv[4][C];
    for (int u = 0; u < 4; ++u) {
      const uint16_t* kr = p.kt + (h * L.tail_cap + (t0 + u - L.tail_offset)) * D;
      for (int c = 0; c < C; ++c) kv[u][c] = halves16(kr + 16 * c);
    }
    for (int r = 0; r < NR; ++r) {
      f16x acc[4];
      for (int u = 0; u < 4; ++u) {
        acc[u] = kv[u][0] * plain[r][0];
        for (int c = 1; c < C; ++c) acc[u] += kv[u][c] * plain[r][c];
      }
      hsum4(acc[0], acc[1], acc[2], acc[3], scores.data() + r * n_pad + t0);
    }
  }
  for (int64_t j = t0; j < n; ++j) {
    const uint16_t* kr = p.kt + (h * L.tail_cap + (j - L.tail_offset)) * D;
    f16x kv[C];
    for (int c = 0; c < C; ++c) kv[c] = halves16(kr + 16 * c);
    for (int r = 0; r < NR; ++r) {
      f16x acc = kv[0] * plain[r][0];
      for (int c = 1; c < C; ++c) acc += kv[c] * plain[r][c];
      scores[r * n_pad + j] = hsum(acc);
    }
  }

  // softmax over each row's n scores: padding lanes are left out of the max, zeroed after exp
  float inv[NR];
  for (int r = 0; r < NR; ++r) {
    float* sr = scores.data() + r * n_pad;
    for (int64_t j = n; j < n_pad; ++j) sr[j] = -INFINITY;
    for (int64_t j = 0; j < lo; ++j) sr[j] = -INFINITY;  // outside the window
    f16x m = splat(-INFINITY);
    for (int64_t j = 0; j < n_pad; j += 16) m = vmax(m, load16(sr + j));
    float mx = lane(m, 0);
    for (int i = 1; i < 16; ++i) mx = std::max(mx, lane(m, i));
    f16x total = {};
    for (int64_t j = 0; j < n_pad; j += 16) {
      f16x e = exp16(load16(sr + j) - mx);
      if (j + 16 > n)
        for (int i = static_cast<int>(n - j); i < 16; ++i) set_lane(e, i, 0.f);
      store16(sr + j, e);
      total += e;
    }
    inv[r] = 1.0f / hsum(total);
  }

  // weighted values: quantized part in the stored (rotated) domain, tail in the plain one
  f16x acc[NR][C] = {}, accp[NR][C] = {};
  float bias_acc[NR][16] = {};
  for (int64_t j = lo; j < qs; ++j) {
    const int64_t row = stored_row(L, h, j);
    f16x vv[C];
    decode_row<D>(L.bits, p.vp + row * words, vv);
    if (groups == 1) {
      const float sv = half_to_float(p.vs[row]), bv = half_to_float(p.vb[row]);
      for (int r = 0; r < NR; ++r) {
        const float w = scores[r * n_pad + j];
        const float ws = w * sv;
        for (int c = 0; c < C; ++c) acc[r][c] += vv[c] * ws;
        bias_acc[r][0] += w * bv;
      }
    } else {
      float s[16], b[16];
      group_params(p.vs, p.vb, row, groups, s, b);
      for (int r = 0; r < NR; ++r) {
        const float w = scores[r * n_pad + j];
        for (int c = 0; c < C; ++c) acc[r][c] += vv[c] * (w * s[group_of(L.bits, L.group, c, D)]);
        for (int64_t k = 0; k < groups; ++k) bias_acc[r][k] += w * b[k];
      }
    }
  }
  for (int64_t j = std::max(qs, lo); j < n; ++j) {
    const uint16_t* vr = p.vt + (h * L.tail_cap + (j - L.tail_offset)) * D;
    f16x vv[C];
    for (int c = 0; c < C; ++c) vv[c] = halves16(vr + 16 * c);
    for (int r = 0; r < NR; ++r) {
      const float w = scores[r * n_pad + j];
      for (int c = 0; c < C; ++c) accp[r][c] += vv[c] * w;
    }
  }

  // out = (acc in natural order + biases) @ R + accp, all over the softmax total
  for (int r = 0; r < NR; ++r) {
    float* o = orows + r * D;
    f16x res[C];
    for (int c = 0; c < C; ++c) res[c] = accp[r][c] * inv[r];
    if (qs > 0) {
      float stored[D];
      for (int c = 0; c < C; ++c) store16(stored + 16 * c, acc[r][c]);
      for (int e = 0; e < D; ++e) {
        const float v = L.bits == 4 ? (e % 2 ? stored[D / 2 + e / 2] : stored[e / 2]) : stored[e];
        const float x = (v + bias_acc[r][e / L.group]) * inv[r];
        for (int c = 0; c < C; ++c) res[c] += load16(R + e * D + 16 * c) * x;
      }
    }
    for (int c = 0; c < C; ++c) store16(o + 16 * c, res[c]);
  }
}

// One (sequence, kv head): its g query rows, NR at a time.
template <int D>
void attend_head(const Layout& L, const LayerPtrs& p, int64_t h, const float* q, const float* R,
                 const float* Rt, float* out, std::vector<float>& scores) {
  const int g = static_cast<int>(L.n_q / L.n_kv);
  for (int r = 0; r < g;) {
    const float* qr = q + (h * g + r) * D;
    float* orow = out + (h * g + r) * D;
    switch (std::min(g - r, 4)) {
      case 4: attend_rows<D, 4>(L, p, h, qr, R, Rt, orow, scores); r += 4; break;
      case 3: attend_rows<D, 3>(L, p, h, qr, R, Rt, orow, scores); r += 3; break;
      case 2: attend_rows<D, 2>(L, p, h, qr, R, Rt, orow, scores); r += 2; break;
      default: attend_rows<D, 1>(L, p, h, qr, R, Rt, orow, scores); r += 1; break;
    }
  }
}

using HeadFn = void (*)(const Layout&, const LayerPtrs&, int64_t, const float*, const float*,
                        const float*, float*, std::vector<float>&);

HeadFn head_fn(int64_t dim) {
  switch (dim) {
    case 32: return attend_head<32>;
    case 64: return attend_head<64>;
    case 128: return attend_head<128>;
    case 256: return attend_head<256>;
    default: return nullptr;
  }
}

}  // namespace

// One new token per sequence. q float32 [B, n_q, D] (rope applied); k, v float32
// [B, n_kv, D]: the token's key and value, written (as float16) into the sequence's tail row
// length-1 before attending; ptrs [B * 8] (addresses of kp, ks, kb, vp, vs, vb, kt, vt per
// sequence); meta [B * 6] (cap, tail_cap, sealed, length, tail_offset, window); R and its
// transpose float32 [D, D]; rows: empty, or [B] addresses of int32 arrays, each the stored
// rows (below cap) of a sequence's `sealed` attended tokens in order (0: rows 0..sealed-1),
// so that a selection of pages is read where it is stored. Returns softmax(q K^T / sqrt(D))
// V, float32 [B, n_q, D].
torch::Tensor attend_new_token(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                               const std::vector<int64_t>& ptrs, const std::vector<int64_t>& meta,
                               torch::Tensor R, torch::Tensor Rt, int64_t bits, int64_t group,
                               const std::vector<int64_t>& rows) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && q.dim() == 3 && q.is_contiguous(), "q");
  const int64_t B = q.size(0), n_q = q.size(1), D = q.size(2);
  TORCH_CHECK(k.dtype() == torch::kFloat32 && k.is_contiguous() && k.dim() == 3 &&
                  k.size(0) == B && k.size(2) == D && v.sizes() == k.sizes() &&
                  v.dtype() == torch::kFloat32 && v.is_contiguous(),
              "k, v");
  const int64_t n_kv = k.size(1);
  TORCH_CHECK(static_cast<int64_t>(ptrs.size()) == 8 * B, "ptrs");
  TORCH_CHECK(static_cast<int64_t>(meta.size()) == 6 * B, "meta");
  TORCH_CHECK(rows.empty() || static_cast<int64_t>(rows.size()) == B, "rows");
  TORCH_CHECK(R.dtype() == torch::kFloat32 && R.is_contiguous() && Rt.is_contiguous() &&
                  R.numel() == D * D && Rt.numel() == D * D,
              "rotation");
  HeadFn fn = head_fn(D);
  TORCH_CHECK(fn != nullptr && n_q % n_kv == 0, "head_dim must be 32, 64, 128 or 256");
  TORCH_CHECK(bits == 16 || (group % 32 == 0 && D % group == 0), "group size");
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* m = meta.data() + b * 6;
    TORCH_CHECK(m[3] >= 1 && m[3] - 1 - m[4] >= 0 && m[3] - 1 - m[4] < m[1] && m[5] >= 0,
                "tail row");
    // a window counts tokens, a list of rows counts attended rows: not both
    TORCH_CHECK(rows.empty() || rows[b] == 0 || m[5] == 0, "rows with a window");
  }
  auto out = torch::empty_like(q);
  const int64_t* pp = ptrs.data();
  const int64_t* mm = meta.data();
  const float* qd = q.data_ptr<float>();
  const float* kd = k.data_ptr<float>();
  const float* vd = v.data_ptr<float>();
  const float* rd = R.data_ptr<float>();
  const float* rtd = Rt.data_ptr<float>();
  float* od = out.data_ptr<float>();
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) work += mm[b * 6 + 3];
  const int64_t grain = work * n_kv < 1024 ? B * n_kv : 1;  // tiny jobs stay on one thread
  edge_parallel::parallel_chunks(B * n_kv, grain, [&](int64_t a, int64_t z) {
    std::vector<float> scores;
    for (int64_t item = a; item < z; ++item) {
      const int64_t b = item / n_kv, h = item % n_kv;
      const int64_t* m = mm + b * 6;
      Layout L{n_q, n_kv, bits, group, m[0], m[1], m[2], m[3], m[4], m[5]};
      if (!rows.empty()) L.rows = reinterpret_cast<const int32_t*>(rows[b]);
      const int64_t* x = pp + b * 8;
      const LayerPtrs p = layer_ptrs(x);
      const int64_t tail_row = (h * L.tail_cap + (L.length - 1 - L.tail_offset)) * D;
      store_half_row(kd + (b * n_kv + h) * D, const_cast<uint16_t*>(p.kt) + tail_row, D);
      store_half_row(vd + (b * n_kv + h) * D, const_cast<uint16_t*>(p.vt) + tail_row, D);
      fn(L, p, h, qd + b * n_q * D, rd, rtd, od + b * n_q * D, scores);
    }
  });
  return out;
}

namespace {

// Prefill chunks: the T new tokens of one sequence (already stored in its tail) attend over
// all its tokens. The rows of one kv head (g query heads x T tokens) are taken LANES at a
// time, one row per float lane, so that keys and values are decoded once per LANES rows, the
// scores of a key are two vectors, and softmax runs down the lanes with no reductions.
constexpr int LANES = 32;
// micro-tiles sized to the vector registers: 32 with AVX-512, 16 (of half the width) below
#if defined(__AVX512F__)
constexpr int KEYS = 8;    // keys per score micro-tile
constexpr int VCHUNK = 8;  // output dims per value micro-tile
#else
constexpr int KEYS = 2;
constexpr int VCHUNK = 2;
#endif

// Rows j..j+n-1 of kv head h's keys (or values) as attention reads them in their domain:
// sealed rows dequantized (still rotated, in decode_row's order), tail rows as stored.
template <int D, bool SEALED>
inline void read_rows(const Layout& L, const LayerPtrs& p, bool values, int64_t h, int64_t j,
                      int n, float (*out)[D]) {
  constexpr int C = D / 16;
  if (!SEALED) {
    const uint16_t* tail = values ? p.vt : p.kt;
    for (int u = 0; u < n; ++u) {
      const uint16_t* row = tail + (h * L.tail_cap + (j + u - L.tail_offset)) * D;
      for (int c = 0; c < C; ++c) store16(out[u] + 16 * c, halves16(row + 16 * c));
    }
    return;
  }
  const int32_t* packed = values ? p.vp : p.kp;
  const uint16_t* scales = values ? p.vs : p.ks;
  const uint16_t* biases = values ? p.vb : p.kb;
  const int64_t groups = D / L.group, words = D * L.bits / 32;
  for (int u = 0; u < n; ++u) {
    const int64_t row = h * L.cap + j + u;
    f16x raw[C];
    decode_row<D>(L.bits, packed + row * words, raw);
    float s[16], b[16];
    group_params(scales, biases, row, groups, s, b);
    for (int c = 0; c < C; ++c) {
      const int64_t k = group_of(L.bits, L.group, c, D);
      store16(out[u] + 16 * c, raw[c] * s[k] + b[k]);
    }
  }
}

// scores[j][lanes] = q[lanes] . key j for keys j0..j1, queries laid out [D][LANES].
template <int D, bool SEALED>
void chunk_scores(const Layout& L, const LayerPtrs& p, int64_t h, int64_t j0, int64_t j1,
                  const float* qt, float* scores) {
  alignas(64) float kd[KEYS][D];
  for (int64_t j = j0; j < j1; j += KEYS) {
    const int n = static_cast<int>(std::min<int64_t>(KEYS, j1 - j));
    read_rows<D, SEALED>(L, p, false, h, j, n, kd);
    for (int u = n; u < KEYS; ++u) std::memset(kd[u], 0, sizeof(kd[u]));
    f16x acc[KEYS][2] = {};
    for (int d = 0; d < D; ++d) {
      const f16x a0 = load16(qt + d * LANES), a1 = load16(qt + d * LANES + 16);
      for (int u = 0; u < KEYS; ++u) {
        acc[u][0] += a0 * kd[u][d];
        acc[u][1] += a1 * kd[u][d];
      }
    }
    for (int u = 0; u < n; ++u) {
      store16(scores + (j + u) * LANES, acc[u][0]);
      store16(scores + (j + u) * LANES + 16, acc[u][1]);
    }
  }
}

// out[D][lanes] += sum over keys j0..j1 of weights[j][lanes] * value j.
template <int D, bool SEALED>
void chunk_values(const Layout& L, const LayerPtrs& p, int64_t h, int64_t j0, int64_t j1,
                  const float* weights, float* out) {
  constexpr int TILE = 16;
  alignas(64) float vd[TILE][D];
  for (int64_t j = j0; j < j1; j += TILE) {
    const int n = static_cast<int>(std::min<int64_t>(TILE, j1 - j));
    read_rows<D, SEALED>(L, p, true, h, j, n, vd);
    for (int d0 = 0; d0 < D; d0 += VCHUNK) {
      f16x acc[VCHUNK][2];
      for (int i = 0; i < VCHUNK; ++i) {
        acc[i][0] = load16(out + (d0 + i) * LANES);
        acc[i][1] = load16(out + (d0 + i) * LANES + 16);
      }
      for (int u = 0; u < n; ++u) {
        const f16x w0 = load16(weights + (j + u) * LANES);
        const f16x w1 = load16(weights + (j + u) * LANES + 16);
        for (int i = 0; i < VCHUNK; ++i) {
          acc[i][0] += w0 * vd[u][d0 + i];
          acc[i][1] += w1 * vd[u][d0 + i];
        }
      }
      for (int i = 0; i < VCHUNK; ++i) {
        store16(out + (d0 + i) * LANES, acc[i][0]);
        store16(out + (d0 + i) * LANES + 16, acc[i][1]);
      }
    }
  }
}

// Rows row0.. (at most LANES) of kv head h: row r is token r / g of query head h * g + r % g.
// q, out float32 [n_q, T, D]; the tokens sit at positions start..start+T-1.
template <int D>
void chunk_rows(const Layout& L, const LayerPtrs& p, int64_t h, int64_t start, int64_t T,
                int64_t row0, const float* q, const float* R, const float* Rt, float* out) {
  constexpr int C = D / 16;
  const int64_t g = L.n_q / L.n_kv, rows = g * T;
  const int nr = static_cast<int>(std::min<int64_t>(LANES, rows - row0));
  const int64_t first = start + row0 / g, last = start + (row0 + nr - 1) / g;
  const int64_t n = last + 1;  // keys any of these rows sees
  // the first key any of them sees, and the last position whose window holds every key
  const int64_t lo = L.window > 0 ? std::max<int64_t>(0, first - L.window + 1) : 0;
  const int64_t qs = L.bits < 16 ? std::min(L.sealed, n) : 0;
  const int64_t tlo = std::max(lo, qs);  // first tail key seen
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<float> plain(D * LANES, 0.f), rotated(D * LANES, 0.f), scores(n * LANES);
  std::vector<float> acc_plain(D * LANES, 0.f), acc_rot(D * LANES, 0.f);
  int64_t pos[LANES];
  for (int lane = 0; lane < LANES; ++lane) {
    const int64_t r = row0 + std::min(lane, nr - 1);  // padding lanes repeat the last row
    pos[lane] = start + r / g;
    const float* qv = q + ((h * g + r % g) * T + r / g) * D;
    for (int d = 0; d < D; ++d) plain[d * LANES + lane] = qv[d] * scale;
    if (qs > 0) {  // q @ R^T, in decode_row's order
      f16x rq[C] = {};
      for (int d = 0; d < D; ++d)
        for (int c = 0; c < C; ++c) rq[c] += load16(Rt + d * D + 16 * c) * (qv[d] * scale);
      float flat[D];
      for (int c = 0; c < C; ++c) store16(flat + 16 * c, rq[c]);
      for (int e = 0; e < D; ++e) {
        const int at = L.bits == 4 ? (e % 2 ? D / 2 + e / 2 : e / 2) : e;
        rotated[at * LANES + lane] = flat[e];
      }
    }
  }

  chunk_scores<D, true>(L, p, h, lo, qs, rotated.data(), scores.data());
  chunk_scores<D, false>(L, p, h, tlo, n, plain.data(), scores.data());

  // softmax down each lane; a row sees the keys up to its own position (and in its window)
  const int64_t all_see = L.window > 0 ? last - L.window + 1 : 0;  // keys from here: all rows
  auto hidden = [&](int64_t j, int lane) {
    return pos[lane] < j || (L.window > 0 && j <= pos[lane] - L.window);
  };
  f16x mx[2] = {splat(-INFINITY), splat(-INFINITY)};
  for (int64_t j = lo; j < n; ++j) {
    float* sj = scores.data() + j * LANES;
    if (j > first || j < all_see)
      for (int lane = 0; lane < LANES; ++lane)
        if (hidden(j, lane)) sj[lane] = -INFINITY;
    mx[0] = vmax(mx[0], load16(sj));
    mx[1] = vmax(mx[1], load16(sj + 16));
  }
  f16x total[2] = {};
  for (int64_t j = lo; j < n; ++j) {
    float* sj = scores.data() + j * LANES;
    for (int k = 0; k < 2; ++k) {
      f16x e = exp16(load16(sj + 16 * k) - mx[k]);
      store16(sj + 16 * k, e);
    }
    if (j > first || j < all_see)
      for (int lane = 0; lane < LANES; ++lane)
        if (hidden(j, lane)) sj[lane] = 0.f;
    total[0] += load16(sj);
    total[1] += load16(sj + 16);
  }

  chunk_values<D, true>(L, p, h, lo, qs, scores.data(), acc_rot.data());
  chunk_values<D, false>(L, p, h, tlo, n, scores.data(), acc_plain.data());

  // out = (acc_rot in natural order) @ R + acc_plain, over the softmax total
  for (int lane = 0; lane < nr; ++lane) {
    const int64_t r = row0 + lane;
    const float inv = 1.0f / (lane < 16 ? ::lane(total[0], lane) : ::lane(total[1], lane - 16));
    f16x res[C];
    for (int c = 0; c < C; ++c) {
      float col[16];
      for (int i = 0; i < 16; ++i) col[i] = acc_plain[(16 * c + i) * LANES + lane];
      res[c] = load16(col);
    }
    if (qs > 0) {
      for (int e = 0; e < D; ++e) {
        const int at = L.bits == 4 ? (e % 2 ? D / 2 + e / 2 : e / 2) : e;
        const float x = acc_rot[at * LANES + lane];
        for (int c = 0; c < C; ++c) res[c] += load16(R + e * D + 16 * c) * x;
      }
    }
    float* o = out + ((h * g + r % g) * T + r / g) * D;
    for (int c = 0; c < C; ++c) store16(o + 16 * c, res[c] * inv);
  }
}

using ChunkFn = void (*)(const Layout&, const LayerPtrs&, int64_t, int64_t, int64_t, int64_t,
                         const float*, const float*, const float*, float*);

ChunkFn chunk_fn(int64_t dim) {
  switch (dim) {
    case 32: return chunk_rows<32>;
    case 64: return chunk_rows<64>;
    case 128: return chunk_rows<128>;
    case 256: return chunk_rows<256>;
    default: return nullptr;
  }
}

}  // namespace

// The T tokens of a prefill chunk, stored (float16, in the tail) at positions start.. of one
// sequence, attend causally over all its tokens. q float32 [n_q, T, D] (rope applied); ptrs
// [8] and meta [6] as for attend_new_token (meta's length = start + T); R, Rt as there.
// Returns float32 [n_q, T, D].
torch::Tensor attend_chunk(torch::Tensor q, const std::vector<int64_t>& ptrs,
                           const std::vector<int64_t>& meta, int64_t start, int64_t n_kv,
                           torch::Tensor R, torch::Tensor Rt, int64_t bits, int64_t group) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && q.dim() == 3 && q.is_contiguous(), "q");
  const int64_t n_q = q.size(0), T = q.size(1), D = q.size(2);
  TORCH_CHECK(ptrs.size() == 8 && meta.size() == 6 && meta[5] >= 0, "ptrs, meta");
  TORCH_CHECK(R.dtype() == torch::kFloat32 && R.is_contiguous() && Rt.is_contiguous() &&
                  R.numel() == D * D && Rt.numel() == D * D,
              "rotation");
  ChunkFn fn = chunk_fn(D);
  TORCH_CHECK(fn != nullptr && n_kv > 0 && n_q % n_kv == 0, "head_dim must be 32, 64, 128 or 256");
  TORCH_CHECK(bits == 16 || (group % 32 == 0 && D % group == 0), "group size");
  Layout L{n_q, n_kv, bits, group, meta[0], meta[1], meta[2], meta[3], meta[4], meta[5]};
  TORCH_CHECK(T >= 1 && start >= 0 && L.length == start + T, "length must be start + T");
  TORCH_CHECK(start + T - 1 - L.tail_offset < L.tail_cap && start - L.tail_offset >= 0 &&
                  (bits == 16 || L.sealed <= start),
              "the chunk must lie in the tail");
  const LayerPtrs p = layer_ptrs(ptrs.data());
  auto out = torch::empty_like(q);
  const int64_t per_head = (n_q / n_kv * T + LANES - 1) / LANES;
  const float* qd = q.data_ptr<float>();
  const float* rd = R.data_ptr<float>();
  const float* rtd = Rt.data_ptr<float>();
  float* od = out.data_ptr<float>();
  edge_parallel::parallel_chunks(n_kv * per_head, 1, [&](int64_t a, int64_t z) {
    for (int64_t task = a; task < z; ++task) {
      const int64_t h = task / per_head, row0 = (task % per_head) * LANES;
      fn(L, p, h, start, T, row0, qd, rd, rtd, od);
    }
  });
  return out;
}
