// moe_gating on CPU: scores, top-K (chosen on the logits, ties to the lower id), gate, position
// slots under capacity and demand per expert, in one pass. Contract: kernels/README.md; reference:
// pangu_moe/ops/gating.py.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#if defined(__x86_64__)
#include <xmmintrin.h>
extern "C" __m128 _ZGVbN4v_expf(__m128);  // glibc libmvec (linked with -lmvec by pangu_moe/ops/build.py)
#endif

#include "aot.h"

namespace {

using pangu_moe::GatingMode;

constexpr int64_t kBlockRows = 64;  // rows whose exps go through the vector exp together

// exp of n floats in place. On x86-64, glibc's libmvec SSE expf (four lanes, within an ulp or so), the last
// n mod 4 through the same vector call on a padded copy: a value's exp must not depend on where it sits.
void ExpInPlace(float* x, int64_t n) {
  int64_t i = 0;
#if defined(__x86_64__)
  for (; i + 4 <= n; i += 4) _mm_storeu_ps(x + i, _ZGVbN4v_expf(_mm_loadu_ps(x + i)));
  if (i < n) {
    float tail[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    std::memcpy(tail, x + i, sizeof(float) * (n - i));
    _mm_storeu_ps(tail, _ZGVbN4v_expf(_mm_loadu_ps(tail)));
    std::memcpy(x + i, tail, sizeof(float) * (n - i));
  }
#else
  for (; i < n; ++i) x[i] = std::exp(x[i]);
#endif
}

// softmax over each of `rows` rows of n logits (relu first in GrAP mode), in float32, into out [rows, n]: the
// precision of the Ascend kernel and of the reference on every device. Its exp and sum are not MindSpore's, so
// the scores agree with the reference's to float tolerance, not bit for bit (kernels/README.md, Numerics).
void SoftmaxBlock(const float* logits, int64_t rows, int64_t n, bool relu, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = logits + r * n;
    float max_value = -INFINITY;
    for (int64_t i = 0; i < n; ++i) {
      out[r * n + i] = relu && row[i] < 0.0f ? 0.0f : row[i];
      max_value = out[r * n + i] > max_value ? out[r * n + i] : max_value;
    }
    for (int64_t i = 0; i < n; ++i) out[r * n + i] -= max_value;
  }
  ExpInPlace(out, rows * n);
  for (int64_t r = 0; r < rows; ++r) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; ++i) sum += out[r * n + i];
    for (int64_t i = 0; i < n; ++i) out[r * n + i] /= sum;
  }
}

// Top-k indices of one row, largest first, ties to the lower index: one pass keeping the k best in
// order (insertion moves an entry only past strictly smaller values, so an earlier index stays ahead).
void TopKRow(const float* values, int64_t n, int64_t k, int32_t* index) {
  int64_t filled = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (filled == k && !(values[i] > values[index[k - 1]])) continue;
    int64_t p = filled < k ? filled++ : k - 1;
    while (p > 0 && values[i] > values[index[p - 1]]) {
      index[p] = index[p - 1];
      --p;
    }
    index[p] = static_cast<int32_t>(i);
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
  if (num_tokens < 1 || top_k < 1 || top_k > experts_per_group || num_experts % experts_per_group) {
    return pangu_moe::kBadShape;
  }
  const int64_t num_groups = num_experts / experts_per_group;
  // One thread: two made it slower (pangu-moe bench kernels; MindSpore's pool competes for the cores).
  for (int64_t first = 0; first < num_tokens; first += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, num_tokens - first);
    SoftmaxBlock(logits + first * experts_per_group, rows, experts_per_group, mode == pangu_moe::kGrap,
                 scores + first * experts_per_group);
    for (int64_t t = first; t < first + rows; ++t) {
      const float* row = logits + t * experts_per_group;
      float* row_scores = scores + t * experts_per_group;
      int32_t* row_index = expert_index + t * top_k;
      float* row_gate = gate + t * top_k;
      const int32_t group = group_ids[t];
      if (group < 0 || group >= num_groups) return pangu_moe::kBadIndex;
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
  }
  // The slots are a prefix count in service order, so this part is sequential.
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
  for (int64_t t = 0; t < num_tokens; ++t) {
    const float* row_scores = scores + t * experts_per_group;
    const int64_t offset = static_cast<int64_t>(group_ids[t]) * experts_per_group;
    std::memcpy(d_row.data(), d_scores + t * experts_per_group, sizeof(float) * experts_per_group);
    for (int64_t k = 0; k < top_k; ++k) {  // the forward's outputs, but never write out of the row
      const int64_t local = expert_index[t * top_k + k] - offset;
      if (local < 0 || local >= experts_per_group) return pangu_moe::kBadIndex;
    }
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
    // The softmax backward from the forward's float32 scores, as the reference's softmax gradient does.
    float dot = 0.0f;
    for (int64_t i = 0; i < experts_per_group; ++i) dot += d_row[i] * row_scores[i];
    float* out = d_logits + t * experts_per_group;
    for (int64_t i = 0; i < experts_per_group; ++i) {
      out[i] = row_scores[i] * (d_row[i] - dot);
      if (mode == pangu_moe::kGrap && !(logits[t * experts_per_group + i] > 0.0f)) out[i] = 0.0f;
    }
  }
  return pangu_moe::kOk;
}
