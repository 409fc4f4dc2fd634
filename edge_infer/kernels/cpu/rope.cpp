// Rotary position embedding applied in place to the query and key heads of projection rows.

#include <torch/extension.h>

#include <cstdint>

#include "parallel.h"

// x float32 [T, width] (rows contiguous): the first `heads` blocks of `dim` columns of each
// row are rotated in halves, (a, b) -> (a cos - b sin, b cos + a sin), with cos, sin float32
// [T, dim/2] for row t. Returns x.
torch::Tensor rope_inplace(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, int64_t heads,
                           int64_t dim) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.stride(1) == 1, "x");
  const int64_t T = x.size(0), half = dim / 2;
  TORCH_CHECK(dim % 2 == 0 && heads * dim <= x.size(1), "heads * dim must fit in a row");
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK(t->dtype() == torch::kFloat32 && t->is_contiguous() && t->dim() == 2 &&
                    t->size(0) == T && t->size(1) == half,
                "cos/sin must be float32 [T, dim/2]");
  float* xd = x.data_ptr<float>();
  const int64_t ld = x.stride(0);
  const float* cd = cos.data_ptr<float>();
  const float* sd = sin.data_ptr<float>();
  edge_parallel::parallel_chunks(T, (8192 + heads * dim - 1) / (heads * dim), [&](int64_t a, int64_t z) {
    for (int64_t t = a; t < z; ++t) {
      const float* c = cd + t * half;
      const float* s = sd + t * half;
      for (int64_t h = 0; h < heads; ++h) {
        float* p = xd + t * ld + h * dim;
        for (int64_t i = 0; i < half; ++i) {
          const float a0 = p[i], b0 = p[half + i];
          p[i] = a0 * c[i] - b0 * s[i];
          p[half + i] = b0 * c[i] + a0 * s[i];
        }
      }
    }
  });
  return x;
}
