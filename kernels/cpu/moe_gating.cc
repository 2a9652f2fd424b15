// moe_gating on CPU: scores, top-K (chosen on the logits, ties to the lower id), gate, position
// slots under capacity and demand per expert, in one pass. Contract: kernels/README.md; reference:
// pangu_moe/ops/gating.py.
#include <cmath>
#include <cstring>
#include <vector>

#include "aot.h"

namespace {

using pangu_moe::GatingMode;

// softmax over one row of n logits (relu first in GrAP mode), in double and rounded once to float:
// the reference computes it in float64 too, so both give the correctly rounded value and agree
// bit for bit (a float32 softmax rounds differently in every implementation, and the difference
// grows through training).
void SoftmaxRow(const float* logits, int64_t n, bool relu, double* scores) {
  double max_value = -INFINITY;
  for (int64_t i = 0; i < n; ++i) {
    const double v = relu && logits[i] < 0.0f ? 0.0 : logits[i];
    max_value = v > max_value ? v : max_value;
  }
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double v = relu && logits[i] < 0.0f ? 0.0 : logits[i];
    scores[i] = std::exp(v - max_value);
    sum += scores[i];
  }
  for (int64_t i = 0; i < n; ++i) scores[i] /= sum;
}

// Top-k indices of one row by repeated first-maximum scans (k is 1 or 2 in practice).
void TopKRow(const float* values, int64_t n, int64_t k, int32_t* index) {
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    for (int64_t i = 0; i < n; ++i) {
      bool taken = false;
      for (int64_t p = 0; p < j; ++p) taken |= index[p] == i;
      if (!taken && (best < 0 || values[i] > values[best])) best = i;
    }
    index[j] = static_cast<int32_t>(best);
  }
}

}  // namespace

// in: logits [T, E_g] f32, group_ids [T] i32, options [2] i32 (C, mode)
// out: scores [T, E_g] f32, expert_index [T, K] i32, gate [T, K] f32, slot [T, K] i32, keep [T, K] bool,
//      tokens_per_expert [E] i32
PANGU_MOE_AOT(MoeGating) {
  if (nparam != 9) return pangu_moe::kBadArity;
  const float* logits = static_cast<const float*>(params[0]);
  const int32_t* group_ids = static_cast<const int32_t*>(params[1]);
  const int32_t* options = static_cast<const int32_t*>(params[2]);
  float* scores = static_cast<float*>(params[3]);
  int32_t* expert_index = static_cast<int32_t*>(params[4]);
  float* gate = static_cast<float*>(params[5]);
  int32_t* slot = static_cast<int32_t*>(params[6]);
  bool* keep = static_cast<bool*>(params[7]);
  int32_t* tokens_per_expert = static_cast<int32_t*>(params[8]);
  const int64_t num_tokens = shapes[0][0], experts_per_group = shapes[0][1];
  const int64_t top_k = shapes[4][1], num_experts = shapes[8][0];
  const int64_t capacity = options[0], mode = options[1];
  if (mode < pangu_moe::kSoftmax || mode > pangu_moe::kGrap || capacity < 0) return pangu_moe::kBadOption;
  if (top_k > experts_per_group || num_experts % experts_per_group) return pangu_moe::kBadShape;
  const int64_t num_groups = num_experts / experts_per_group;
  std::vector<double> exact(experts_per_group);
  for (int64_t t = 0; t < num_tokens; ++t) {
    const float* row = logits + t * experts_per_group;
    float* row_scores = scores + t * experts_per_group;
    int32_t* row_index = expert_index + t * top_k;
    float* row_gate = gate + t * top_k;
    const int32_t group = group_ids[t];
    if (group < 0 || group >= num_groups) return pangu_moe::kBadIndex;
    SoftmaxRow(row, experts_per_group, mode == pangu_moe::kGrap, exact.data());
    for (int64_t i = 0; i < experts_per_group; ++i) row_scores[i] = static_cast<float>(exact[i]);
    TopKRow(row, experts_per_group, top_k, row_index);
    float gate_sum = 0.0f;
    for (int64_t k = 0; k < top_k; ++k) {
      row_gate[k] = row_scores[row_index[k]];
      gate_sum += row_gate[k];
    }
    if (mode == pangu_moe::kSoftmaxNormalize && top_k > 1) {
      for (int64_t k = 0; k < top_k; ++k) row_gate[k] /= gate_sum;
    }
    for (int64_t k = 0; k < top_k; ++k) row_index[k] += static_cast<int32_t>(group * experts_per_group);
  }
  std::memset(tokens_per_expert, 0, sizeof(int32_t) * num_experts);
  for (int64_t k = 0; k < top_k; ++k) {  // the position policy's service order k * T + t
    for (int64_t t = 0; t < num_tokens; ++t) {
      const int64_t i = t * top_k + k;
      slot[i] = tokens_per_expert[expert_index[i]]++;
      keep[i] = slot[i] < capacity;
    }
  }
  return pangu_moe::kOk;
}

// in: logits, group_ids, options, scores, expert_index, gate (forward inputs and outputs),
//     d_scores [T, E_g] f32, d_gate [T, K] f32
// out: d_logits [T, E_g] f32
PANGU_MOE_AOT(MoeGatingGrad) {
  if (nparam != 9) return pangu_moe::kBadArity;
  const float* logits = static_cast<const float*>(params[0]);
  const int32_t* group_ids = static_cast<const int32_t*>(params[1]);
  const int32_t* options = static_cast<const int32_t*>(params[2]);
  const float* scores = static_cast<const float*>(params[3]);
  const int32_t* expert_index = static_cast<const int32_t*>(params[4]);
  const float* gate = static_cast<const float*>(params[5]);
  const float* d_scores = static_cast<const float*>(params[6]);
  const float* d_gate = static_cast<const float*>(params[7]);
  float* d_logits = static_cast<float*>(params[8]);
  const int64_t num_tokens = shapes[0][0], experts_per_group = shapes[0][1], top_k = shapes[4][1];
  const int64_t mode = options[1];
  std::vector<float> d_row(experts_per_group);
  std::vector<double> exact(experts_per_group);
  for (int64_t t = 0; t < num_tokens; ++t) {
    const float* row_scores = scores + t * experts_per_group;
    const int64_t offset = static_cast<int64_t>(group_ids[t]) * experts_per_group;
    std::memcpy(d_row.data(), d_scores + t * experts_per_group, sizeof(float) * experts_per_group);
    if (mode == pangu_moe::kSoftmaxNormalize && top_k > 1) {
      // gate_k = s_k / S with S = sum_j s_j: d s_k = (d gate_k - sum_j d gate_j * gate_j) / S
      float chosen_sum = 0.0f, weighted = 0.0f;
      for (int64_t k = 0; k < top_k; ++k) {
        chosen_sum += row_scores[expert_index[t * top_k + k] - offset];
        weighted += d_gate[t * top_k + k] * gate[t * top_k + k];
      }
      for (int64_t k = 0; k < top_k; ++k) {
        d_row[expert_index[t * top_k + k] - offset] += (d_gate[t * top_k + k] - weighted) / chosen_sum;
      }
    } else {
      for (int64_t k = 0; k < top_k; ++k) d_row[expert_index[t * top_k + k] - offset] += d_gate[t * top_k + k];
    }
    // The softmax backward in double from the double scores, as the reference's float64 softmax does.
    SoftmaxRow(logits + t * experts_per_group, experts_per_group, mode == pangu_moe::kGrap, exact.data());
    double dot = 0.0;
    for (int64_t i = 0; i < experts_per_group; ++i) dot += d_row[i] * exact[i];
    float* out = d_logits + t * experts_per_group;
    for (int64_t i = 0; i < experts_per_group; ++i) {
      out[i] = static_cast<float>(exact[i] * (d_row[i] - dot));
      if (mode == pangu_moe::kGrap && !(logits[t * experts_per_group + i] > 0.0f)) out[i] = 0.0f;
    }
  }
  return pangu_moe::kOk;
}
