// Index and tiling logic shared by the CPU kernels (kernels/cpu) and the Ascend C kernels
// (kernels/ascend/<op>): one definition of the buffer-row layout, the position slot policy's
// order, and the unified-buffer tiling, so the CPU parity tests vouch for the Ascend index math.
//
// Everything here is scalar code on plain integers: it compiles as host C++ (CPU kernels, Ascend
// op_host tiling) and as Ascend C device code (PANGU_MOE_INLINE adds __aicore__ there).
#ifndef PANGU_MOE_KERNEL_COMMON_H_
#define PANGU_MOE_KERNEL_COMMON_H_

#include <cstdint>

#if defined(__CCE_KT_TEST__) || defined(__CCE_AICORE__)
#define PANGU_MOE_INLINE __aicore__ inline
#else
#define PANGU_MOE_INLINE inline
#endif

namespace pangu_moe {

// Gating modes (the `mode` entry of the gating options tensor).
//   kSoftmax:          scores = softmax(logits); choose top-K of logits; gate = scores at the choice.
//   kSoftmaxNormalize: as kSoftmax, then the K gates are renormalised to sum to 1 (GShard).
//   kGrap:             input = GrAP pre-ReLU logits; scores = softmax(relu(input)); choose top-K of the
//                      input; gate = scores at the choice (LocMoE).
// Top-K is chosen on the logits, not on the scores: softmax is monotone, and choosing on the input
// values makes the choice independent of how exp/sum round. Ties go to the lower expert id.
enum GatingMode : int32_t { kSoftmax = 0, kSoftmaxNormalize = 1, kGrap = 2 };

// Buffer row of a choice in the node-major send buffer [R*E, C] (R source ranks held, E experts):
// pair = source_rank * E + expert, and expert e lives on rank DestinationRank(e) of node rank / D, so rows
// are ordered (source rank, destination node, destination device, local expert, slot).
// Dropped choices go to the sink row R*E*C, which reads zeros and receives nothing.
PANGU_MOE_INLINE int64_t BufferRow(int64_t pair, int64_t slot, bool keep, int64_t capacity, int64_t num_buffers) {
  return keep ? pair * capacity + slot : num_buffers * capacity;
}

// The (first) rank hosting an expert, as `dispatch.topology.Topology.expert_rank`: E >= W places
// E / W consecutive experts per rank; E < W spreads each expert over W / E ranks (E % W == 0 or W % E == 0).
PANGU_MOE_INLINE int64_t DestinationRank(int64_t expert, int64_t num_experts, int64_t world) {
  return num_experts >= world ? expert / (num_experts / world) : expert * (world / num_experts);
}

PANGU_MOE_INLINE int64_t NodeOfRank(int64_t rank, int64_t devices_per_node) { return rank / devices_per_node; }

// Position policy: choice (t, k) is served at step k * T + t (every first choice before any
// second choice, tokens in order), so its slot is the number of earlier requested choices of the
// same expert in that order.
PANGU_MOE_INLINE int64_t ServiceOrder(int64_t token, int64_t choice, int64_t num_tokens) {
  return choice * num_tokens + token;
}

// Tiling of a [rows, row_elems] copy through the unified buffer (UB) of an AI Core.
struct RowTiling {
  int64_t rows_per_tile;  // rows moved per tile (>= 1)
  int64_t cols_per_tile;  // elements of a row per tile (= row_elems unless one row exceeds the UB share)
  int64_t row_tiles;      // ceil(rows / rows_per_tile)
  int64_t col_tiles;      // ceil(row_elems / cols_per_tile)
  int64_t tile_bytes;     // bytes of one tile, 32-byte aligned (the DataCopy granularity)
};

PANGU_MOE_INLINE int64_t AlignUp(int64_t value, int64_t align) { return (value + align - 1) / align * align; }

// Plan tiles so that `buffers` tiles (double buffering: 2 in + 2 out = 4) fit in `ub_bytes`.
// Returns false if not even a 32-byte tile fits.
PANGU_MOE_INLINE bool PlanRowTiles(int64_t rows, int64_t row_elems, int64_t elem_bytes, int64_t ub_bytes,
                                   int64_t buffers, RowTiling* plan) {
  const int64_t share = ub_bytes / buffers / 32 * 32;  // bytes one tile may use
  if (rows <= 0 || row_elems <= 0 || elem_bytes <= 0 || share < 32) return false;
  const int64_t row_bytes = AlignUp(row_elems * elem_bytes, 32);
  if (row_bytes <= share) {
    plan->cols_per_tile = row_elems;
    plan->rows_per_tile = share / row_bytes;
    if (plan->rows_per_tile > rows) plan->rows_per_tile = rows;
    plan->tile_bytes = plan->rows_per_tile * row_bytes;
  } else {  // one row is larger than a tile: split the row into 32-byte-aligned column blocks
    plan->rows_per_tile = 1;
    plan->cols_per_tile = share / elem_bytes;
    plan->tile_bytes = AlignUp(plan->cols_per_tile * elem_bytes, 32);
  }
  plan->row_tiles = (rows + plan->rows_per_tile - 1) / plan->rows_per_tile;
  plan->col_tiles = (row_elems + plan->cols_per_tile - 1) / plan->cols_per_tile;
  return true;
}

// Split `items` over `cores` as evenly as possible: core c gets [*begin, *end).
PANGU_MOE_INLINE void SplitOverCores(int64_t items, int64_t cores, int64_t core, int64_t* begin, int64_t* end) {
  const int64_t base = items / cores, extra = items % cores;
  *begin = core * base + (core < extra ? core : extra);
  *end = *begin + base + (core < extra ? 1 : 0);
}

}  // namespace pangu_moe

#endif  // PANGU_MOE_KERNEL_COMMON_H_
