// moe_dispatch_layout on CPU: buffer rows in node-major send order and the per-expert, per-rank and
// per-node counts. Contract: kernels/README.md; reference: pangu_moe/ops/layout.py.
#include <cstring>

#include "aot.h"

// in: pair_index [T, K] i32, slot [T, K] i32, keep [T, K] bool, requested [T, K] bool, options [1] i32 (C)
// out: flat_index [T*K] i32, tokens_per_expert [R, E] i32, kept_per_expert [R, E] i32,
//      send_counts [R, W] i32, node_counts [R, N] i32
PANGU_MOE_AOT(MoeDispatchLayout) {
  if (nparam != 10) return pangu_moe::kBadArity;
  const int32_t* pair_index = static_cast<const int32_t*>(params[0]);
  const int32_t* slot = static_cast<const int32_t*>(params[1]);
  const bool* keep = static_cast<const bool*>(params[2]);
  const bool* requested = static_cast<const bool*>(params[3]);
  const int64_t capacity = static_cast<const int32_t*>(params[4])[0];
  int32_t* flat_index = static_cast<int32_t*>(params[5]);
  int32_t* tokens_per_expert = static_cast<int32_t*>(params[6]);
  int32_t* kept_per_expert = static_cast<int32_t*>(params[7]);
  int32_t* send_counts = static_cast<int32_t*>(params[8]);
  int32_t* node_counts = static_cast<int32_t*>(params[9]);
  const int64_t choices = pangu_moe::NumElements(ndims[0], shapes[0]);
  const int64_t ranks = shapes[6][0], num_experts = shapes[6][1];
  const int64_t world = shapes[8][1], nodes = shapes[9][1];
  if (world <= 0 || nodes <= 0 || world % nodes) return pangu_moe::kBadShape;
  if (num_experts % world && world % num_experts) return pangu_moe::kBadShape;
  if (capacity < 0) return pangu_moe::kBadOption;
  const int64_t buffers = ranks * num_experts;
  const int64_t devices_per_node = world / nodes;
  std::memset(tokens_per_expert, 0, sizeof(int32_t) * buffers);
  std::memset(kept_per_expert, 0, sizeof(int32_t) * buffers);
  std::memset(send_counts, 0, sizeof(int32_t) * ranks * world);
  std::memset(node_counts, 0, sizeof(int32_t) * ranks * nodes);
  for (int64_t i = 0; i < choices; ++i) {
    const int64_t pair = pair_index[i];
    if (pair < 0 || pair >= buffers) return pangu_moe::kBadIndex;
    const bool kept = keep[i];
    if (kept && (!requested[i] || slot[i] < 0 || slot[i] >= capacity)) return pangu_moe::kBadIndex;
    flat_index[i] = static_cast<int32_t>(pangu_moe::BufferRow(pair, slot[i], kept, capacity, buffers));
    tokens_per_expert[pair] += requested[i];
    if (!kept) continue;
    const int64_t source = pair / num_experts;
    const int64_t destination = pangu_moe::DestinationRank(pair % num_experts, num_experts, world);
    kept_per_expert[pair] += 1;
    send_counts[source * world + destination] += 1;
    node_counts[source * nodes + pangu_moe::NodeOfRank(destination, devices_per_node)] += 1;
  }
  return pangu_moe::kOk;
}
