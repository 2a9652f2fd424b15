// MoePermute (op_host): tiling, shape/dtype inference and the op definition.
//   in:   x [T, H] f32, flat_index [T*K] i32 (row of each choice, B*C = the sink), capacity [C] i8
//         (a carrier: only its length is read)
//   attr: num_buffers (int, required) = B
//   out:  buffer [B, C, H] f32: row flat_index[t*K+k] = x[t], every other row 0
// Mirrors kernels/cpu/moe_permute.cc and the reference in pangu_moe/ops/permute.py; the contract is
// kernels/README.md. Never compiled or run (no CANN here).
#include <algorithm>
#include <cstdint>

#include "moe_permute_tiling.h"
#include "register/op_def_registry.h"
#include "tiling/platform/platform_ascendc.h"
#include "../../../common/moe_kernel_common.h"

namespace optiling {
namespace {

// UB kept free of tiles, as slack. UNVERIFIED: whether any of the UB is taken by the framework.
constexpr int64_t kUbHeadroom = 8 * 1024;
// Planned as 2 in + 2 out tiles; used by a double-buffered TQueBind (2 tiles) and one zero tile.
constexpr int64_t kTileBuffers = 4;
constexpr int64_t kMaxFlatIndex = INT32_MAX;  // flat_index is int32

ge::graphStatus MoePermuteTilingFunc(gert::TilingContext* context) {
  const gert::StorageShape* xShape = context->GetInputShape(0);
  const gert::StorageShape* indexShape = context->GetInputShape(1);
  const gert::StorageShape* capacityShape = context->GetInputShape(2);
  const gert::RuntimeAttrs* attrs = context->GetAttrs();
  if (xShape == nullptr || indexShape == nullptr || capacityShape == nullptr || attrs == nullptr) {
    return ge::GRAPH_FAILED;
  }
  const int64_t* numBuffers = attrs->GetInt(0);
  const gert::Shape& x = xShape->GetStorageShape();
  if (numBuffers == nullptr || x.GetDimNum() != 2 || indexShape->GetStorageShape().GetDimNum() != 1 ||
      capacityShape->GetStorageShape().GetDimNum() != 1) {
    return ge::GRAPH_FAILED;
  }
  const int64_t tokens = x.GetDim(0);
  const int64_t hidden = x.GetDim(1);
  const int64_t choices = indexShape->GetStorageShape().GetDim(0);
  const int64_t capacity = capacityShape->GetStorageShape().GetDim(0);
  const int64_t buffers = *numBuffers;
  if (tokens < 0 || hidden < 0 || buffers < 0 || capacity < 0) return ge::GRAPH_FAILED;
  if (tokens == 0 ? choices != 0 : choices % tokens != 0) return ge::GRAPH_FAILED;
  const int64_t topK = tokens == 0 ? 0 : choices / tokens;
  const int64_t rows = buffers * capacity;
  if (rows > kMaxFlatIndex) return ge::GRAPH_FAILED;  // the sink row B*C must be an int32 index

  auto platform = platform_ascendc::PlatformAscendC(context->GetPlatformInfo());
  uint64_t ubBytes = 0;
  platform.GetCoreMemSize(platform_ascendc::CoreMemType::UB, ubBytes);
  const int64_t cores = static_cast<int64_t>(platform.GetCoreNumAiv());
  if (cores <= 0 || ubBytes == 0) return ge::GRAPH_FAILED;

  pangu_moe::RowTiling plan{1, 0, 1, 0, 32};  // H == 0: nothing to move, one 32-byte tile keeps InitBuffer valid
  if (hidden > 0 && !pangu_moe::PlanRowTiles(std::max<int64_t>(rows, 1), hidden, sizeof(float),
                                             static_cast<int64_t>(ubBytes) - kUbHeadroom, kTileBuffers, &plan)) {
    return ge::GRAPH_FAILED;
  }

  // Every launched core takes part in the zero-fill, the SyncAll and the scatter, so the block count
  // may not exceed the physical AIV cores (a hard SyncAll over more blocks than cores deadlocks).
  const int64_t blocks = std::min(cores, std::max<int64_t>(std::max(rows, tokens), 1));
  context->SetBlockDim(static_cast<uint32_t>(blocks));

  MoePermuteTilingData tiling;
  tiling.set_numTokens(tokens);
  tiling.set_topK(topK);
  tiling.set_hidden(hidden);
  tiling.set_numRows(rows);
  tiling.set_rowsPerTile(plan.rows_per_tile);
  tiling.set_colsPerTile(plan.cols_per_tile);
  tiling.set_colTiles(plan.col_tiles);
  tiling.set_tileBytes(plan.tile_bytes);
  tiling.SaveToBuffer(context->GetRawTilingData()->GetData(), context->GetRawTilingData()->GetCapacity());
  context->GetRawTilingData()->SetDataSize(tiling.GetDataSize());

  // The hard SyncAll needs a non-zero workspace; the kernel itself uses none.
  size_t* workspace = context->GetWorkspaceSizes(1);
  if (workspace == nullptr) return ge::GRAPH_FAILED;
  workspace[0] = platform.GetLibApiWorkSpaceSize();
  return ge::GRAPH_SUCCESS;
}

}  // namespace
}  // namespace optiling

namespace ge {
namespace {

graphStatus MoePermuteInferShape(gert::InferShapeContext* context) {
  const gert::Shape* x = context->GetInputShape(0);
  const gert::Shape* capacity = context->GetInputShape(2);
  const gert::RuntimeAttrs* attrs = context->GetAttrs();
  gert::Shape* buffer = context->GetOutputShape(0);
  if (x == nullptr || capacity == nullptr || attrs == nullptr || buffer == nullptr) return GRAPH_FAILED;
  const int64_t* numBuffers = attrs->GetInt(0);
  if (numBuffers == nullptr || x->GetDimNum() != 2 || capacity->GetDimNum() != 1) return GRAPH_FAILED;
  buffer->SetDimNum(3);
  buffer->SetDim(0, *numBuffers);
  buffer->SetDim(1, capacity->GetDim(0));
  buffer->SetDim(2, x->GetDim(1));
  return GRAPH_SUCCESS;
}

graphStatus MoePermuteInferDataType(gert::InferDataTypeContext* context) {
  context->SetOutputDataType(0, DT_FLOAT);
  return GRAPH_SUCCESS;
}

}  // namespace
}  // namespace ge

namespace ops {
class MoePermute : public OpDef {
 public:
  explicit MoePermute(const char* name) : OpDef(name) {
    this->Input("x").ParamType(REQUIRED).DataType({ge::DT_FLOAT}).Format({ge::FORMAT_ND});
    this->Input("flat_index").ParamType(REQUIRED).DataType({ge::DT_INT32}).Format({ge::FORMAT_ND});
    this->Input("capacity").ParamType(REQUIRED).DataType({ge::DT_INT8}).Format({ge::FORMAT_ND});
    this->Output("buffer").ParamType(REQUIRED).DataType({ge::DT_FLOAT}).Format({ge::FORMAT_ND});
    this->Attr("num_buffers").AttrType(REQUIRED).Int();
    this->SetInferShape(ge::MoePermuteInferShape).SetInferDataType(ge::MoePermuteInferDataType);
    this->AICore().SetTiling(optiling::MoePermuteTilingFunc).AddConfig("ascend910b");
  }
};
OP_ADD(MoePermute);
}  // namespace ops
