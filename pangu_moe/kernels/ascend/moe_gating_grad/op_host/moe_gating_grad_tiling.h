// MoeGatingGrad tiling data: d_logits [T, E_g] f32, the backward of MoeGating.
// Mirrors kernels/cpu/moe_gating.cc (MoeGatingGrad) and the reference in pangu_moe/ops/gating.py.
// Never compiled or run (no CANN here); see kernels/ascend/README.md.
#ifndef PANGU_MOE_ASCEND_MOE_GATING_GRAD_TILING_H_
#define PANGU_MOE_ASCEND_MOE_GATING_GRAD_TILING_H_

#include "register/tilingdata_base.h"

namespace optiling {
BEGIN_TILING_DATA_DEF(MoeGatingGradTilingData)
TILING_DATA_FIELD_DEF(int64_t, numTokens);           // T
TILING_DATA_FIELD_DEF(int64_t, expertsPerGroup);     // E_g
TILING_DATA_FIELD_DEF(int64_t, expertsPerGroupPad);  // E_g rounded up to 8 floats: the UB row stride
TILING_DATA_FIELD_DEF(int64_t, topK);                // K (attr top_k, = expert_index.shape[1])
TILING_DATA_FIELD_DEF(int64_t, mode);                // GatingMode (attr mode)
TILING_DATA_FIELD_DEF(int64_t, rowsPerTile);         // PlanRowTiles: token rows per UB tile
TILING_DATA_FIELD_DEF(int64_t, reduceWorkElems);     // ReduceSum work buffer for E_g floats
END_TILING_DATA_DEF;

REGISTER_TILING_DATA_CLASS(MoeGatingGrad, MoeGatingGradTilingData)
}  // namespace optiling

#endif  // PANGU_MOE_ASCEND_MOE_GATING_GRAD_TILING_H_
