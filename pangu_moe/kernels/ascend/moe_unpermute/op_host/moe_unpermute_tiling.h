// MoeUnpermute tiling data: y [T, H] f32 = sum_k weight[t, k] * buffer[flat_index[t*K+k]] over the send
// buffer [B, C, H] f32. Mirrors kernels/cpu/moe_permute.cc and the reference in pangu_moe/ops/permute.py.
// Never compiled or run (no CANN here); see kernels/ascend/README.md.
#ifndef PANGU_MOE_ASCEND_MOE_UNPERMUTE_TILING_H_
#define PANGU_MOE_ASCEND_MOE_UNPERMUTE_TILING_H_

#include "register/tilingdata_base.h"

namespace optiling {
BEGIN_TILING_DATA_DEF(MoeUnpermuteTilingData)
TILING_DATA_FIELD_DEF(int64_t, numTokens);    // T
TILING_DATA_FIELD_DEF(int64_t, topK);         // K
TILING_DATA_FIELD_DEF(int64_t, hidden);       // H
TILING_DATA_FIELD_DEF(int64_t, numRows);      // B * C, also the sink row's index
TILING_DATA_FIELD_DEF(int64_t, colsPerTile);  // PlanRowTiles: elements of one row per tile
TILING_DATA_FIELD_DEF(int64_t, colTiles);     // PlanRowTiles: tiles per row
TILING_DATA_FIELD_DEF(int64_t, tileBytes);    // PlanRowTiles: bytes of one UB tile
END_TILING_DATA_DEF;

REGISTER_TILING_DATA_CLASS(MoeUnpermute, MoeUnpermuteTilingData)
}  // namespace optiling

#endif  // PANGU_MOE_ASCEND_MOE_UNPERMUTE_TILING_H_
