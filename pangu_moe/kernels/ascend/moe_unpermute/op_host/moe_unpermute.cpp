// MoeUnpermute (op_host): tiling, shape/dtype inference and the op definition.
//   in:  buffer [B, C, H] f32, flat_index [T*K] i32 (B*C = the sink), weight [T, K] f32 (gate * keep)
//   out: y [T, H] f32 = sum_k weight[t, k] * buffer row flat_index[t*K+k], summed in k order; the sink adds 0
// Mirrors kernels/cpu/moe_permute.cc (MoeUnpermute) and the reference in pangu_moe/ops/permute.py; the
// contract is kernels/README.md. Never compiled or run (no CANN here).
#include <algorithm>
#include <cstdint>

#include "moe_unpermute_tiling.h"
#include "register/op_def_registry.h"
#include "tiling/platform/platform_ascendc.h"
#include "../../../common/moe_kernel_common.h"

namespace optiling {
namespace {

// UB kept free of tiles, as slack. UNVERIFIED: whether any of the UB is taken by the framework.
constexpr int64_t kUbHeadroom = 8 * 1024;
// 2 in (buffer rows) + 2 out (y rows) + 1 product tile. Rows are gathered one at a time (they are
// scattered in the buffer), so the plan is for one row, split into column tiles if H is large.
constexpr int64_t kTileBuffers = 5;

ge::graphStatus MoeUnpermuteTilingFunc(gert::TilingContext* context) {
  const gert::StorageShape* bufferShape = context->GetInputShape(0);
  const gert::StorageShape* indexShape = context->GetInputShape(1);
  const gert::StorageShape* weightShape = context->GetInputShape(2);
  if (bufferShape == nullptr || indexShape == nullptr || weightShape == nullptr) return ge::GRAPH_FAILED;
  const gert::Shape& buffer = bufferShape->GetStorageShape();
  const gert::Shape& weight = weightShape->GetStorageShape();
  if (buffer.GetDimNum() != 3 || weight.GetDimNum() != 2 || indexShape->GetStorageShape().GetDimNum() != 1) {
    return ge::GRAPH_FAILED;
  }
  const int64_t rows = buffer.GetDim(0) * buffer.GetDim(1);
  const int64_t hidden = buffer.GetDim(2);
  const int64_t tokens = weight.GetDim(0);
  const int64_t topK = weight.GetDim(1);
  if (rows < 0 || hidden < 0 || tokens < 0 || topK < 0) return ge::GRAPH_FAILED;
  if (indexShape->GetStorageShape().GetDim(0) != tokens * topK || rows > INT32_MAX) return ge::GRAPH_FAILED;

  auto platform = platform_ascendc::PlatformAscendC(context->GetPlatformInfo());
  uint64_t ubBytes = 0;
  platform.GetCoreMemSize(platform_ascendc::CoreMemType::UB, ubBytes);
  const int64_t cores = static_cast<int64_t>(platform.GetCoreNumAiv());
  if (cores <= 0 || ubBytes == 0) return ge::GRAPH_FAILED;

  pangu_moe::RowTiling plan{1, 0, 1, 0, 32};  // H == 0: y is empty, nothing moves
  if (hidden > 0 && !pangu_moe::PlanRowTiles(1, hidden, sizeof(float), static_cast<int64_t>(ubBytes) - kUbHeadroom,
                                             kTileBuffers, &plan)) {
    return ge::GRAPH_FAILED;
  }

  // Each core owns whole output rows y[t], so the cores never share a write and need no barrier.
  const int64_t blocks = std::min(cores, std::max<int64_t>(tokens, 1));
  context->SetBlockDim(static_cast<uint32_t>(blocks));

  MoeUnpermuteTilingData tiling;
  tiling.set_numTokens(tokens);
  tiling.set_topK(topK);
  tiling.set_hidden(hidden);
  tiling.set_numRows(rows);
  tiling.set_colsPerTile(plan.cols_per_tile);
  tiling.set_colTiles(plan.col_tiles);
  tiling.set_tileBytes(plan.tile_bytes);
  tiling.SaveToBuffer(context->GetRawTilingData()->GetData(), context->GetRawTilingData()->GetCapacity());
  context->GetRawTilingData()->SetDataSize(tiling.GetDataSize());

  size_t* workspace = context->GetWorkspaceSizes(1);
  if (workspace == nullptr) return ge::GRAPH_FAILED;
  workspace[0] = platform.GetLibApiWorkSpaceSize();
  return ge::GRAPH_SUCCESS;
}

}  // namespace
}  // namespace optiling

namespace ge {
namespace {

graphStatus MoeUnpermuteInferShape(gert::InferShapeContext* context) {
  const gert::Shape* buffer = context->GetInputShape(0);
  const gert::Shape* weight = context->GetInputShape(2);
  gert::Shape* y = context->GetOutputShape(0);
  if (buffer == nullptr || weight == nullptr || y == nullptr) return GRAPH_FAILED;
  if (buffer->GetDimNum() != 3 || weight->GetDimNum() != 2) return GRAPH_FAILED;
  y->SetDimNum(2);
  y->SetDim(0, weight->GetDim(0));
  y->SetDim(1, buffer->GetDim(2));
  return GRAPH_SUCCESS;
}

graphStatus MoeUnpermuteInferDataType(gert::InferDataTypeContext* context) {
  context->SetOutputDataType(0, DT_FLOAT);
  return GRAPH_SUCCESS;
}

}  // namespace
}  // namespace ge

namespace ops {
class MoeUnpermute : public OpDef {
 public:
  explicit MoeUnpermute(const char* name) : OpDef(name) {
    this->Input("buffer").ParamType(REQUIRED).DataType({ge::DT_FLOAT}).Format({ge::FORMAT_ND});
    this->Input("flat_index").ParamType(REQUIRED).DataType({ge::DT_INT32}).Format({ge::FORMAT_ND});
    this->Input("weight").ParamType(REQUIRED).DataType({ge::DT_FLOAT}).Format({ge::FORMAT_ND});
    this->Output("y").ParamType(REQUIRED).DataType({ge::DT_FLOAT}).Format({ge::FORMAT_ND});
    this->SetInferShape(ge::MoeUnpermuteInferShape).SetInferDataType(ge::MoeUnpermuteInferDataType);
    this->AICore().SetTiling(optiling::MoeUnpermuteTilingFunc).AddConfig("ascend910b");
  }
};
OP_ADD(MoeUnpermute);
}  // namespace ops
