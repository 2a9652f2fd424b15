// MoeDispatchLayout tiling data: buffer rows in node-major send order and the per-expert, per-rank and
// per-node counts, from the routing. Mirrors kernels/cpu/moe_dispatch_layout.cc and the reference in
// pangu_moe/ops/layout.py. Never compiled or run (no CANN here); see kernels/ascend/README.md.
#ifndef PANGU_MOE_ASCEND_MOE_DISPATCH_LAYOUT_TILING_H_
#define PANGU_MOE_ASCEND_MOE_DISPATCH_LAYOUT_TILING_H_

#include "register/tilingdata_base.h"

namespace optiling {
BEGIN_TILING_DATA_DEF(MoeDispatchLayoutTilingData)
TILING_DATA_FIELD_DEF(int64_t, numChoices);  // T * K
TILING_DATA_FIELD_DEF(int64_t, numRanks);    // R, source ranks held (attr num_ranks_held)
TILING_DATA_FIELD_DEF(int64_t, numExperts);  // E (attr num_experts)
TILING_DATA_FIELD_DEF(int64_t, worldSize);   // W (attr world_size)
TILING_DATA_FIELD_DEF(int64_t, nodes);       // N (attr nodes)
END_TILING_DATA_DEF;

REGISTER_TILING_DATA_CLASS(MoeDispatchLayout, MoeDispatchLayoutTilingData)
}  // namespace optiling

#endif  // PANGU_MOE_ASCEND_MOE_DISPATCH_LAYOUT_TILING_H_
