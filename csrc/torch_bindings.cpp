// Registers torch.ops._refreekv_C.compute_cuts (schema with mutation annotations) and its CUDA
// implementation from last_row_scores.cu. Its scratch layout comes from the caller
// (refreekv_vllm/ops/workspace.py, shared with the Triton kernels).

#include <Python.h>
#include <torch/all.h>
#include <torch/library.h>

#include <optional>

void compute_cuts(const at::Tensor& query, const at::Tensor& key_cache,
                  const at::Tensor& block_tables, const at::Tensor& prompt_lens,
                  const at::Tensor& window_lens, const at::Tensor& thresholds, at::Tensor& cuts,
                  at::Tensor& workspace, const std::optional<at::Tensor>& curve,
                  const std::optional<at::Tensor>& window_lse, int64_t num_sink_tokens,
                  double scale, bool agg_max, int64_t chunk_size, int64_t max_prompt_len,
                  c10::IntArrayRef workspace_offsets);

TORCH_LIBRARY(_refreekv_C, m) {
  // cuts, workspace and curve are written; everything else is read-only. window_lse: the
  // window rows' natural-log softmax normalisers (the prefill attention's), or None.
  // workspace_offsets: where each scratch section starts, then the total.
  m.def(
      "compute_cuts(Tensor query, Tensor key_cache, Tensor block_tables, Tensor prompt_lens, "
      "Tensor window_lens, Tensor thresholds, Tensor(a!) cuts, Tensor(b!) workspace, "
      "Tensor(c!)? curve, Tensor? window_lse, int num_sink_tokens, float scale, bool agg_max, "
      "int chunk_size, int max_prompt_len, int[] workspace_offsets) -> ()");
}

TORCH_LIBRARY_IMPL(_refreekv_C, CUDA, m) { m.impl("compute_cuts", &compute_cuts); }

// Lets the ahead-of-time build be imported as a Python module (refreekv_vllm._refreekv_C);
// importing it runs the registrations above.
extern "C" PyObject* PyInit__refreekv_C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_refreekv_C", nullptr, 0, nullptr};
  return PyModule_Create(&module);
}
