// moe_permute / moe_unpermute on CPU: gather the routed tokens into the send buffer [B, C, H] and
// the gate-weighted sum back, with the backward of moe_unpermute. Contract: kernels/README.md;
// reference: pangu_moe/ops/permute.py. Each output byte is written once (no memset-then-copy).
#include <cstring>
#include <vector>

#include "aot.h"

namespace {

// Map buffer rows to the choice (t * K + k) that fills them, -1 for empty rows; false on a bad index.
bool RowChoices(const int32_t* flat_index, int64_t choices, int64_t rows, std::vector<int64_t>* row_choice) {
  row_choice->assign(rows, -1);
  for (int64_t i = 0; i < choices; ++i) {
    const int64_t row = flat_index[i];
    if (row < 0 || row > rows) return false;
    if (row < rows) (*row_choice)[row] = i;
  }
  return true;
}

}  // namespace

// in: x [T, H] f32, flat_index [T*K] i32, capacity carrier [C] i8   out: buffer [B, C, H] f32
PANGU_MOE_AOT(MoePermute) {
  if (nparam != 4) return pangu_moe::kBadArity;
  const float* x = static_cast<const float*>(params[0]);
  const int32_t* flat_index = static_cast<const int32_t*>(params[1]);
  float* buffer = static_cast<float*>(params[3]);
  const int64_t num_tokens = shapes[0][0], hidden = shapes[0][1], choices = shapes[1][0];
  const int64_t rows = shapes[3][0] * shapes[3][1];
  if (shapes[3][2] != hidden || num_tokens == 0 || choices % num_tokens) return pangu_moe::kBadShape;
  const int64_t top_k = choices / num_tokens;
  std::vector<int64_t> row_choice;
  if (!RowChoices(flat_index, choices, rows, &row_choice)) return pangu_moe::kBadIndex;
  const size_t row_bytes = sizeof(float) * hidden;
#pragma omp parallel for schedule(static) num_threads(pangu_moe::Threads()) if (rows * hidden >= pangu_moe::kParallelElements)
  for (int64_t row = 0; row < rows; ++row) {
    float* out = buffer + row * hidden;
    if (row_choice[row] < 0) {
      std::memset(out, 0, row_bytes);
    } else {
      std::memcpy(out, x + (row_choice[row] / top_k) * hidden, row_bytes);
    }
  }
  return pangu_moe::kOk;
}

// in: buffer [B, C, H] f32, flat_index [T*K] i32, weight [T, K] f32   out: y [T, H] f32
PANGU_MOE_AOT(MoeUnpermute) {
  if (nparam != 4) return pangu_moe::kBadArity;
  const float* buffer = static_cast<const float*>(params[0]);
  const int32_t* flat_index = static_cast<const int32_t*>(params[1]);
  const float* weight = static_cast<const float*>(params[2]);
  float* y = static_cast<float*>(params[3]);
  const int64_t rows = shapes[0][0] * shapes[0][1], hidden = shapes[0][2];
  const int64_t num_tokens = shapes[2][0], top_k = shapes[2][1];
  if (shapes[1][0] != num_tokens * top_k || shapes[3][1] != hidden) return pangu_moe::kBadShape;
  for (int64_t i = 0; i < num_tokens * top_k; ++i) {
    if (flat_index[i] < 0 || flat_index[i] > rows) return pangu_moe::kBadIndex;
  }
#pragma omp parallel for schedule(static) num_threads(pangu_moe::Threads()) if (num_tokens * hidden >= pangu_moe::kParallelElements)
  for (int64_t t = 0; t < num_tokens; ++t) {
    float* out = y + t * hidden;
    std::memset(out, 0, sizeof(float) * hidden);
    for (int64_t k = 0; k < top_k; ++k) {
      const int64_t row = flat_index[t * top_k + k];
      if (row == rows) continue;  // the sink: a dropped choice adds nothing
      const float w = weight[t * top_k + k];
      const float* in = buffer + row * hidden;
      for (int64_t h = 0; h < hidden; ++h) out[h] += w * in[h];
    }
  }
  return pangu_moe::kOk;
}

// in: buffer [B, C, H] f32, flat_index [T*K] i32, weight [T, K] f32, d_y [T, H] f32
// out: d_buffer [B, C, H] f32, d_weight [T, K] f32
PANGU_MOE_AOT(MoeUnpermuteGrad) {
  if (nparam != 6) return pangu_moe::kBadArity;
  const float* buffer = static_cast<const float*>(params[0]);
  const int32_t* flat_index = static_cast<const int32_t*>(params[1]);
  const float* weight = static_cast<const float*>(params[2]);
  const float* d_y = static_cast<const float*>(params[3]);
  float* d_buffer = static_cast<float*>(params[4]);
  float* d_weight = static_cast<float*>(params[5]);
  const int64_t rows = shapes[0][0] * shapes[0][1], hidden = shapes[0][2];
  const int64_t num_tokens = shapes[2][0], top_k = shapes[2][1], choices = num_tokens * top_k;
  if (shapes[1][0] != choices || shapes[3][1] != hidden) return pangu_moe::kBadShape;
  std::vector<int64_t> row_choice;
  if (!RowChoices(flat_index, choices, rows, &row_choice)) return pangu_moe::kBadIndex;
#pragma omp parallel for schedule(static) num_threads(pangu_moe::Threads()) if (rows * hidden >= pangu_moe::kParallelElements)
  for (int64_t row = 0; row < rows; ++row) {
    float* out = d_buffer + row * hidden;
    const int64_t i = row_choice[row];
    if (i < 0) {
      std::memset(out, 0, sizeof(float) * hidden);
      continue;
    }
    const float w = weight[i];
    const float* grad = d_y + (i / top_k) * hidden;
    for (int64_t h = 0; h < hidden; ++h) out[h] = w * grad[h];
  }
#pragma omp parallel for schedule(static) num_threads(pangu_moe::Threads()) if (choices * hidden >= pangu_moe::kParallelElements)
  for (int64_t i = 0; i < choices; ++i) {
    const int64_t row = flat_index[i];
    float dot = 0.0f;  // float32, as on Ascend; the reference's order of additions is MindSpore's, so the two agree
                       // to float tolerance
    if (row < rows) {
      const float* in = buffer + row * hidden;
      const float* grad = d_y + (i / top_k) * hidden;
      for (int64_t h = 0; h < hidden; ++h) dot += in[h] * grad[h];
    }
    d_weight[i] = dot;
  }
  return pangu_moe::kOk;
}

// A plain copy of n floats: the bandwidth yardstick of `pangu-moe bench kernels` (permute_bw_fraction),
// called through the same AOT path so both pay the same call overhead.
// in: x [n] f32   out: y [n] f32
PANGU_MOE_AOT(MoeMemCopy) {
  if (nparam != 2) return pangu_moe::kBadArity;
  const int64_t n = pangu_moe::NumElements(ndims[0], shapes[0]);
  std::memcpy(params[1], params[0], sizeof(float) * n);
  return pangu_moe::kOk;
}
