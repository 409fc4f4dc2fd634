// Attention of single new tokens over KV caches held in the stored form: sealed blocks
// quantized (4 or 8 bits, affine groups, rotated by a Hadamard matrix) and a float16 tail.
// Nothing is dequantized into a full-size buffer: each key and value is decoded once, in
// registers, as it is read. Also a fast dequantizer for the paths that want float32 rows.
//
// Layouts (all contiguous along the last dimension):
//   packed  int32 [n_kv, cap, D*bits/32]  (element i of a row at bits i*bits, little endian)
//   scales, biases float16 [n_kv, cap, D/group]
//   tail    float16 [n_kv, tail_cap, D]   (tail row r holds token tail_offset + r)
// What attention reads for a sealed token is dequantize(stored) @ R; for a tail token the
// float16 row itself. R is symmetric or not: scores use q @ R^T, outputs acc @ R.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

typedef float f16x __attribute__((vector_size(64)));     // 16 float lanes
typedef uint8_t u8x16 __attribute__((vector_size(16)));  // 16 bytes
typedef int32_t i32x16 __attribute__((vector_size(64)));

inline float half_to_float(uint16_t h) {
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

inline f16x load16(const float* p) {
  f16x v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store16(float* p, f16x v) { std::memcpy(p, &v, sizeof(v)); }

inline f16x halves16(const uint16_t* p) {
#if defined(__F16C__)
  f16x v;
  __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  __m256 b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  std::memcpy(&v, &a, 32);
  std::memcpy(reinterpret_cast<char*>(&v) + 32, &b, 32);
  return v;
#else
  f16x v;
  for (int i = 0; i < 16; ++i) v[i] = half_to_float(p[i]);
  return v;
#endif
}

inline f16x bytes_to_float(u8x16 b) {
  i32x16 w = __builtin_convertvector(b, i32x16);
  return __builtin_convertvector(w, f16x);
}

inline float hsum(f16x v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

struct Layout {
  int64_t n_q, n_kv, dim, bits, group, cap, tail_cap, sealed, length, tail_offset;
};

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

// Query rows prepared for one stored row format. For 4 bits the rotated query is split into
// its even and odd elements (a byte holds element 2i in its low and 2i+1 in its high nibble).
struct Prepared {
  std::vector<float> plain;   // [g, D]
  std::vector<float> rot;     // [g, D]: q @ R^T, or (4 bits) [g, evens D/2 | odds D/2]
  std::vector<float> gsum;    // [g, D/group]: sum of the rotated query over each group
};

// Score of g query rows against one sealed row.
inline void sealed_scores(const Layout& L, const Prepared& P, int g, const int32_t* packed,
                          const uint16_t* sc, const uint16_t* bi, float* out, int64_t stride) {
  const int64_t D = L.dim, groups = D / L.group;
  float s[16], b[16];
  for (int64_t k = 0; k < groups; ++k) {
    s[k] = half_to_float(sc[k]);
    b[k] = half_to_float(bi[k]);
  }
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(packed);
  for (int r = 0; r < g; ++r) {
    const float* qr = P.rot.data() + r * D;
    const float* gs = P.gsum.data() + r * groups;
    float total = 0.f;
    if (L.bits == 4) {
      // chunk c: 16 bytes = elements 32c..32c+31 (evens 16c.., odds 16c.. of the halves)
      for (int64_t c = 0; c < D / 32; ++c) {
        u8x16 raw;
        std::memcpy(&raw, bytes + 16 * c, 16);
        f16x lo = bytes_to_float(raw & 15), hi = bytes_to_float(raw >> 4);
        f16x acc = lo * load16(qr + 16 * c) + hi * load16(qr + D / 2 + 16 * c);
        total += s[(32 * c) / L.group] * hsum(acc);
      }
    } else {
      for (int64_t c = 0; c < D / 16; ++c) {
        u8x16 raw;
        std::memcpy(&raw, bytes + 16 * c, 16);
        total += s[(16 * c) / L.group] * hsum(bytes_to_float(raw) * load16(qr + 16 * c));
      }
    }
    for (int64_t k = 0; k < groups; ++k) total += b[k] * gs[k];
    out[r * stride] = total;
  }
}

// One (sequence, kv head): softmax(q K^T / sqrt(D)) V for its g query rows.
void attend_head(const Layout& L, const LayerPtrs& p, int64_t h, const float* q, const float* R,
                 float* out) {
  const int g = static_cast<int>(L.n_q / L.n_kv);
  const int64_t D = L.dim, n = L.length, S = L.sealed, groups = D / L.group;
  const int64_t words = D * L.bits / 32;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const bool quantized = L.bits < 16;

  Prepared P;
  P.plain.assign(q + h * g * D, q + (h + 1) * g * D);
  P.rot.assign(g * D, 0.f);
  P.gsum.assign(g * groups, 0.f);
  if (quantized) {
    std::vector<float> rot(D);
    for (int r = 0; r < g; ++r) {
      const float* qr = P.plain.data() + r * D;
      for (int64_t e = 0; e < D; ++e) {
        float acc = 0.f;
        for (int64_t d = 0; d < D; ++d) acc += qr[d] * R[e * D + d];
        rot[e] = acc;
      }
      for (int64_t e = 0; e < D; ++e) P.gsum[r * groups + e / L.group] += rot[e];
      float* dst = P.rot.data() + r * D;
      if (L.bits == 4) {
        for (int64_t i = 0; i < D / 2; ++i) {
          dst[i] = rot[2 * i];
          dst[D / 2 + i] = rot[2 * i + 1];
        }
      } else {
        std::memcpy(dst, rot.data(), D * sizeof(float));
      }
    }
  }

  // scores [g, n]
  std::vector<float> scores(static_cast<size_t>(g) * n);
  const int64_t qs = quantized ? S : 0;  // tokens read from the quantized store
  for (int64_t j = 0; j < qs; ++j) {
    const int64_t row = h * L.cap + j;
    sealed_scores(L, P, g, p.kp + row * words, p.ks + row * groups, p.kb + row * groups,
                  scores.data() + j, n);
  }
  for (int64_t j = qs; j < n; ++j) {
    const uint16_t* kr = p.kt + (h * L.tail_cap + (j - L.tail_offset)) * D;
    for (int r = 0; r < g; ++r) {
      const float* qr = P.plain.data() + r * D;
      f16x acc = {};
      for (int64_t c = 0; c < D / 16; ++c) acc += halves16(kr + 16 * c) * load16(qr + 16 * c);
      scores[r * n + j] = hsum(acc);
    }
  }
  // softmax, folded into the weights
  for (int r = 0; r < g; ++r) {
    float* sr = scores.data() + r * n;
    float m = -INFINITY;
    for (int64_t j = 0; j < n; ++j) m = std::max(m, sr[j] * scale);
    float total = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      sr[j] = std::exp(sr[j] * scale - m);
      total += sr[j];
    }
    const float inv = 1.0f / total;
    for (int64_t j = 0; j < n; ++j) sr[j] *= inv;
  }
  // weighted values: quantized part in the stored (rotated) domain, tail in the plain one
  std::vector<float> acc_rot(g * D, 0.f), acc_plain(g * D, 0.f), bias_acc(g * groups, 0.f);
  for (int64_t j = 0; j < qs; ++j) {
    const int64_t row = h * L.cap + j;
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(p.vp + row * words);
    float s[16], b[16];
    for (int64_t k = 0; k < groups; ++k) {
      s[k] = half_to_float(p.vs[row * groups + k]);
      b[k] = half_to_float(p.vb[row * groups + k]);
    }
    if (L.bits == 4) {
      for (int64_t c = 0; c < D / 32; ++c) {
        u8x16 raw;
        std::memcpy(&raw, bytes + 16 * c, 16);
        f16x lo = bytes_to_float(raw & 15), hi = bytes_to_float(raw >> 4);
        const float sk = s[(32 * c) / L.group];
        for (int r = 0; r < g; ++r) {
          const float w = scores[r * n + j] * sk;
          float* a = acc_rot.data() + r * D;
          store16(a + 16 * c, load16(a + 16 * c) + lo * w);
          store16(a + D / 2 + 16 * c, load16(a + D / 2 + 16 * c) + hi * w);
        }
      }
    } else {
      for (int64_t c = 0; c < D / 16; ++c) {
        u8x16 raw;
        std::memcpy(&raw, bytes + 16 * c, 16);
        f16x vals = bytes_to_float(raw);
        const float sk = s[(16 * c) / L.group];
        for (int r = 0; r < g; ++r) {
          float* a = acc_rot.data() + r * D;
          store16(a + 16 * c, load16(a + 16 * c) + vals * (scores[r * n + j] * sk));
        }
      }
    }
    for (int r = 0; r < g; ++r)
      for (int64_t k = 0; k < groups; ++k) bias_acc[r * groups + k] += scores[r * n + j] * b[k];
  }
  for (int64_t j = qs; j < n; ++j) {
    const uint16_t* vr = p.vt + (h * L.tail_cap + (j - L.tail_offset)) * D;
    for (int64_t c = 0; c < D / 16; ++c) {
      f16x vals = halves16(vr + 16 * c);
      for (int r = 0; r < g; ++r) {
        float* a = acc_plain.data() + r * D;
        store16(a + 16 * c, load16(a + 16 * c) + vals * scores[r * n + j]);
      }
    }
  }
  // out = acc_rot (natural order, biases added) @ R + acc_plain
  std::vector<float> nat(D);
  for (int r = 0; r < g; ++r) {
    float* o = out + (h * g + r) * D;
    const float* a = acc_rot.data() + r * D;
    const float* ap = acc_plain.data() + r * D;
    if (!quantized) {
      std::memcpy(o, ap, D * sizeof(float));
      continue;
    }
    for (int64_t i = 0; i < D; ++i) {
      const float v = L.bits == 4 ? (i % 2 == 0 ? a[i / 2] : a[D / 2 + i / 2]) : a[i];
      nat[i] = v + bias_acc[r * groups + i / L.group];
    }
    for (int64_t d = 0; d < D; ++d) o[d] = ap[d];
    for (int64_t e = 0; e < D; ++e) {
      const float v = nat[e];
      const float* Re = R + e * D;
      for (int64_t d = 0; d < D; ++d) o[d] += v * Re[d];
    }
  }
}

}  // namespace

// q float32 [B, n_q, D]; ptrs int64 [B, 8] (kp, ks, kb, vp, vs, vb, kt, vt);
// meta int64 [B, 5] (cap, tail_cap, sealed, length, tail_offset); R float32 [D, D].
torch::Tensor attend_one_token(torch::Tensor q, torch::Tensor ptrs, torch::Tensor meta,
                               torch::Tensor R, int64_t n_kv, int64_t bits, int64_t group) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && q.dim() == 3 && q.is_contiguous(), "q");
  TORCH_CHECK(ptrs.dtype() == torch::kInt64 && ptrs.size(1) == 8, "ptrs");
  TORCH_CHECK(meta.dtype() == torch::kInt64 && meta.size(1) == 5, "meta");
  const int64_t B = q.size(0), n_q = q.size(1), D = q.size(2);
  TORCH_CHECK(D % 32 == 0 && n_q % n_kv == 0, "head_dim must be a multiple of 32");
  TORCH_CHECK(bits == 16 || (group % 32 == 0 && D % group == 0 && D / group <= 16), "group");
  auto out = torch::empty_like(q);
  auto P = ptrs.contiguous();
  auto M = meta.contiguous();
  auto Rc = R.contiguous();
  const int64_t* pp = P.data_ptr<int64_t>();
  const int64_t* mm = M.data_ptr<int64_t>();
  const float* qd = q.data_ptr<float>();
  const float* rd = Rc.data_ptr<float>();
  float* od = out.data_ptr<float>();
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) work += mm[b * 5 + 3];
  const int64_t grain = work * n_kv < 8192 ? B * n_kv : 1;  // tiny jobs stay on one thread
  at::parallel_for(0, B * n_kv, grain, [&](int64_t a, int64_t z) {
    for (int64_t item = a; item < z; ++item) {
      const int64_t b = item / n_kv, h = item % n_kv;
      const int64_t* m = mm + b * 5;
      Layout L{n_q, n_kv, D, bits, group, m[0], m[1], m[2], m[3], m[4]};
      const int64_t* x = pp + b * 8;
      LayerPtrs p{reinterpret_cast<const int32_t*>(x[0]), reinterpret_cast<const uint16_t*>(x[1]),
                  reinterpret_cast<const uint16_t*>(x[2]), reinterpret_cast<const int32_t*>(x[3]),
                  reinterpret_cast<const uint16_t*>(x[4]), reinterpret_cast<const uint16_t*>(x[5]),
                  reinterpret_cast<const uint16_t*>(x[6]), reinterpret_cast<const uint16_t*>(x[7])};
      attend_head(L, p, h, qd + b * n_q * D, rd, od + b * n_q * D);
    }
  });
  return out;
}

// packed int32 [H, N, W], scales/biases float16 [H, N, G] (strided along H) -> out float32
// [H, N, D] (strided along H): the stored values, dequantized (still rotated).
void dequantize_into(torch::Tensor packed, torch::Tensor scales, torch::Tensor biases,
                     torch::Tensor out, int64_t bits, int64_t group) {
  const int64_t H = packed.size(0), N = packed.size(1), W = packed.size(2), D = out.size(2);
  const int64_t G = scales.size(2);
  TORCH_CHECK(packed.stride(2) == 1 && packed.stride(1) == W && scales.stride(1) == G &&
                  biases.stride(1) == G && out.stride(2) == 1 && out.stride(1) == D,
              "rows must be contiguous");
  TORCH_CHECK(D * bits == W * 32 && D == G * group, "shapes");
  const uint8_t* pk = reinterpret_cast<const uint8_t*>(packed.data_ptr<int32_t>());
  const uint16_t* sc = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const uint16_t* bi = reinterpret_cast<const uint16_t*>(biases.data_ptr<at::Half>());
  float* od = out.data_ptr<float>();
  const int64_t ps = packed.stride(0) * 4, ss = scales.stride(0), bs = biases.stride(0),
                os = out.stride(0);
  at::parallel_for(0, H * N, 256, [&](int64_t a, int64_t z) {
    for (int64_t item = a; item < z; ++item) {
      const int64_t h = item / N, j = item % N;
      const uint8_t* bytes = pk + h * ps + j * W * 4;
      const uint16_t* s = sc + h * ss + j * G;
      const uint16_t* b = bi + h * bs + j * G;
      float* o = od + h * os + j * D;
      for (int64_t k = 0; k < G; ++k) {
        const float sk = half_to_float(s[k]), bk = half_to_float(b[k]);
        float* og = o + k * group;
        if (bits == 4) {
          const uint8_t* bg = bytes + k * group / 2;
          for (int64_t i = 0; i < group / 2; ++i) {
            og[2 * i] = static_cast<float>(bg[i] & 15) * sk + bk;
            og[2 * i + 1] = static_cast<float>(bg[i] >> 4) * sk + bk;
          }
        } else {
          const uint8_t* bg = bytes + k * group;
          for (int64_t i = 0; i < group; ++i) og[i] = static_cast<float>(bg[i]) * sk + bk;
        }
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend_one_token", &attend_one_token, "one-token attention over stored KV");
  m.def("dequantize_into", &dequantize_into, "dequantize stored KV rows into float32");
}
