// MoeGating tiling data: scores, top-K choice, gate and position slots under capacity in one op.
// Mirrors kernels/cpu/moe_gating.cc and the reference in pangu_moe/ops/gating.py.
// Never compiled or run (no CANN here); see kernels/ascend/README.md.
#ifndef PANGU_MOE_ASCEND_MOE_GATING_TILING_H_
#define PANGU_MOE_ASCEND_MOE_GATING_TILING_H_

#include "register/tilingdata_base.h"

namespace optiling {
BEGIN_TILING_DATA_DEF(MoeGatingTilingData)
TILING_DATA_FIELD_DEF(int64_t, numTokens);           // T
TILING_DATA_FIELD_DEF(int64_t, expertsPerGroup);     // E_g
TILING_DATA_FIELD_DEF(int64_t, expertsPerGroupPad);  // E_g rounded up to 8 floats: the UB row stride
TILING_DATA_FIELD_DEF(int64_t, topK);                // K (attr top_k)
TILING_DATA_FIELD_DEF(int64_t, topKPad);             // K rounded up to 8: the UB row stride of [T, K] tiles
TILING_DATA_FIELD_DEF(int64_t, numExperts);          // E (attr num_experts)
TILING_DATA_FIELD_DEF(int64_t, numGroups);           // G = E / E_g
TILING_DATA_FIELD_DEF(int64_t, mode);                // GatingMode (attr mode)
TILING_DATA_FIELD_DEF(int64_t, rowsPerTile);         // PlanRowTiles: token rows per UB tile
TILING_DATA_FIELD_DEF(int64_t, reduceWorkElems);     // ReduceSum work buffer for E_g floats
END_TILING_DATA_DEF;

REGISTER_TILING_DATA_CLASS(MoeGating, MoeGatingTilingData)
}  // namespace optiling

#endif  // PANGU_MOE_ASCEND_MOE_GATING_TILING_H_
