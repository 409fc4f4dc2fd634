// RMSNorm of blocks of a row (query/key heads, the residual's added outputs) in one pass over
// the rows, on the kernels' thread split (which stays on one thread while the cores are shared,
// where torch's own parallel ops would wait on a descheduled helper for each small op).

#include <torch/extension.h>

#include <cmath>
#include <cstdint>

#include "parallel.h"

// x float32 [T, width] (columns contiguous): each of the `blocks` blocks of dim = weight.numel()
// columns starting at column `first` becomes x * rsqrt(mean(x^2) + eps) * weight. Without
// `out`, in place (returns x); with `out` (float32 [T, blocks * dim], contiguous), the normed
// blocks are added into it instead and x is left alone (returns out).
torch::Tensor rms_norm_blocks(torch::Tensor x, int64_t first, int64_t blocks, torch::Tensor weight,
                              double eps, c10::optional<torch::Tensor> out) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.stride(1) == 1, "x");
  TORCH_CHECK(weight.dtype() == torch::kFloat32 && weight.is_contiguous() && weight.dim() == 1,
              "weight must be float32 [dim]");
  const int64_t T = x.size(0), dim = weight.numel();
  TORCH_CHECK(first >= 0 && blocks >= 0 && first + blocks * dim <= x.size(1),
              "the blocks must fit in a row");
  float* od = nullptr;
  int64_t ldo = 0;
  if (out.has_value()) {
    TORCH_CHECK(out->dtype() == torch::kFloat32 && out->is_contiguous() && out->dim() == 2 &&
                    out->size(0) == T && out->size(1) == blocks * dim,
                "out must be contiguous float32 [T, blocks * dim]");
    od = out->data_ptr<float>();
    ldo = blocks * dim;
  }
  float* xd = x.data_ptr<float>();
  const int64_t ld = x.stride(0);
  const float* w = weight.data_ptr<float>();
  const float e = static_cast<float>(eps);
  edge_parallel::parallel_chunks(T, (8192 + blocks * dim - 1) / std::max<int64_t>(1, blocks * dim),
                                 [&](int64_t a, int64_t z) {
    for (int64_t t = a; t < z; ++t)
      for (int64_t b = 0; b < blocks; ++b) {
        float* p = xd + t * ld + first + b * dim;
        float part[8] = {};  // eight running sums: vectorizable, where one is a serial chain
        int64_t i = 0;
        for (; i + 8 <= dim; i += 8)
          for (int j = 0; j < 8; ++j) part[j] += p[i + j] * p[i + j];
        float ss = 0.f;
        for (; i < dim; ++i) ss += p[i] * p[i];
        for (int j = 0; j < 8; ++j) ss += part[j];
        const float inv = 1.0f / std::sqrt(ss / static_cast<float>(dim) + e);
        if (od) {
          float* o = od + t * ldo + b * dim;
          for (i = 0; i < dim; ++i) o[i] += p[i] * inv * w[i];
        } else {
          for (i = 0; i < dim; ++i) p[i] = p[i] * inv * w[i];
        }
      }
  });
  return od ? *out : x;
}
