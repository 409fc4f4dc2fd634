// The Python module of the CPU kernels: attention over stored KV caches (kv_attention.cpp)
// quantized-weight products (quant_matmul.cpp), rotary embedding (rope.cpp) and RMSNorm of
// head blocks (norm.cpp), built into one extension.

#include <torch/extension.h>

#include <string>
#include <vector>

torch::Tensor attend_new_token(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                               const std::vector<int64_t>& ptrs, const std::vector<int64_t>& meta,
                               torch::Tensor R, torch::Tensor Rt, int64_t bits, int64_t group,
                               const std::vector<int64_t>& rows);
torch::Tensor attend_chunk(torch::Tensor q, const std::vector<int64_t>& ptrs,
                           const std::vector<int64_t>& meta, int64_t start, int64_t n_kv,
                           torch::Tensor R, torch::Tensor Rt, int64_t bits, int64_t group);
torch::Tensor quant_linear(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                           torch::Tensor biases, int64_t rows, int64_t bits, int64_t group,
                           int64_t prep, c10::optional<torch::Tensor> norm, double eps,
                           c10::optional<torch::Tensor> out, int64_t passes);
torch::Tensor rescore_top(torch::Tensor logits, torch::Tensor h, torch::Tensor qweight,
                          torch::Tensor scales, torch::Tensor biases, int64_t rows, int64_t bits,
                          int64_t group, int64_t k);
torch::Tensor weight_rows(torch::Tensor ids, torch::Tensor qweight, torch::Tensor scales,
                          torch::Tensor biases, int64_t rows, int64_t bits, int64_t group);
torch::Tensor rope_inplace(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, int64_t heads,
                           int64_t dim);
std::vector<torch::Tensor> requantize4(torch::Tensor qweight, torch::Tensor scales,
                                       torch::Tensor biases, int64_t rows, int64_t bits,
                                       int64_t group);
torch::Tensor rms_norm_blocks(torch::Tensor x, int64_t first, int64_t blocks, torch::Tensor weight,
                              double eps, c10::optional<torch::Tensor> out);
std::string quant_matmul_isa();

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend_new_token", &attend_new_token, "store one new token's K/V, attend over all",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("ptrs"),
        pybind11::arg("meta"), pybind11::arg("R"), pybind11::arg("Rt"), pybind11::arg("bits"),
        pybind11::arg("group"), pybind11::arg("rows") = std::vector<int64_t>{});
  m.def("attend_chunk", &attend_chunk, "causal attention of a stored prefill chunk");
  m.def("quant_linear", &quant_linear, "float rows times 4/8-bit packed weights");
  m.def("rescore_top", &rescore_top, "exact logits of each row's top candidates");
  m.def("weight_rows", &weight_rows, "dequantized rows of a packed weight");
  m.def("rope_inplace", &rope_inplace, "rotary embedding of the query and key heads, in place");
  m.def("requantize4", &requantize4, "a 4-bit copy of a packed weight, in the same tiles");
  m.def("rms_norm_blocks", &rms_norm_blocks, "RMSNorm of blocks of rows, in place or added");
  m.def("isa", &quant_matmul_isa, "the SIMD path this build runs");
}
