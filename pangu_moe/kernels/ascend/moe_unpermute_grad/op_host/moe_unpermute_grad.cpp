// MoeUnpermuteGrad (op_host): tiling, shape/dtype inference and the op definition.
//   in:  buffer [B, C, H] f32, flat_index [T*K] i32 (B*C = the sink), weight [T, K] f32, d_y [T, H] f32
//   out: d_buffer [B, C, H] f32 (row flat_index[t*K+k] = weight[t, k] * d_y[t], every other row 0),
//        d_weight [T, K] f32 (dot(buffer row, d_y[t]); 0 for the sink)
// Mirrors kernels/cpu/moe_permute.cc (MoeUnpermuteGrad) and the reference in pangu_moe/ops/permute.py
// (MindSpore's gradient of reference_unpermute); the contract is kernels/README.md.
// Never compiled or run (no CANN here).
#include <algorithm>
#include <cstdint>

#include "moe_unpermute_grad_tiling.h"
#include "register/op_def_registry.h"
#include "tiling/platform/platform_ascendc.h"
#include "../../../common/moe_kernel_common.h"

namespace optiling {
namespace {

// UB kept free of tiles, as slack. UNVERIFIED: whether any of the UB is taken by the framework.
constexpr int64_t kUbHeadroom = 8 * 1024;
// 2 d_y tiles + 2 buffer-row tiles + 2 d_buffer tiles (double-buffered queues) + 1 product/zero tile.
constexpr int64_t kTileBuffers = 7;
constexpr int64_t kBlockBytes = 32;

// Elements of the work buffer ReduceSum needs for n floats: one partial per 256-byte repeat,
// rounded up to a 32-byte block (the CANN ReduceSum workLocal formula).
int64_t ReduceWorkElems(int64_t n) {
  const int64_t repeats = std::max<int64_t>((n + 63) / 64, 1);
  return pangu_moe::AlignUp(repeats, 8);
}

ge::graphStatus MoeUnpermuteGradTilingFunc(gert::TilingContext* context) {
  const gert::StorageShape* bufferShape = context->GetInputShape(0);
  const gert::StorageShape* indexShape = context->GetInputShape(1);
  const gert::StorageShape* weightShape = context->GetInputShape(2);
  const gert::StorageShape* dyShape = context->GetInputShape(3);
  if (bufferShape == nullptr || indexShape == nullptr || weightShape == nullptr || dyShape == nullptr) {
    return ge::GRAPH_FAILED;
  }
  const gert::Shape& buffer = bufferShape->GetStorageShape();
  const gert::Shape& weight = weightShape->GetStorageShape();
  const gert::Shape& dy = dyShape->GetStorageShape();
  if (buffer.GetDimNum() != 3 || weight.GetDimNum() != 2 || dy.GetDimNum() != 2 ||
      indexShape->GetStorageShape().GetDimNum() != 1) {
    return ge::GRAPH_FAILED;
  }
  const int64_t rows = buffer.GetDim(0) * buffer.GetDim(1);
  const int64_t hidden = buffer.GetDim(2);
  const int64_t tokens = weight.GetDim(0);
  const int64_t topK = weight.GetDim(1);
  if (rows < 0 || hidden < 0 || tokens < 0 || topK < 0 || rows > INT32_MAX) return ge::GRAPH_FAILED;
  if (indexShape->GetStorageShape().GetDim(0) != tokens * topK || dy.GetDim(0) != tokens || dy.GetDim(1) != hidden) {
    return ge::GRAPH_FAILED;
  }

  auto platform = platform_ascendc::PlatformAscendC(context->GetPlatformInfo());
  uint64_t ubBytes = 0;
  platform.GetCoreMemSize(platform_ascendc::CoreMemType::UB, ubBytes);
  const int64_t cores = static_cast<int64_t>(platform.GetCoreNumAiv());
  if (cores <= 0 || ubBytes == 0) return ge::GRAPH_FAILED;

  // Small buffers outside the tile budget: ReduceSum work and result, and one token's K d_weight values.
  const int64_t ub = static_cast<int64_t>(ubBytes) - kUbHeadroom;
  const int64_t topKPad = std::max<int64_t>(pangu_moe::AlignUp(topK, 8), 8);
  const int64_t reserve = ReduceWorkElems(std::min<int64_t>(hidden, ub / 4)) * 4 + kBlockBytes + topKPad * 4;
  pangu_moe::RowTiling plan{1, 0, 1, 0, 32};  // H == 0: no data moves; d_weight is all 0
  if (hidden > 0 && !pangu_moe::PlanRowTiles(std::max<int64_t>(rows, 1), hidden, sizeof(float), ub - reserve,
                                             kTileBuffers, &plan)) {
    return ge::GRAPH_FAILED;
  }

  // All launched cores zero-fill, meet at a hard SyncAll, then scatter: no more blocks than AIV cores.
  const int64_t blocks = std::min(cores, std::max<int64_t>(std::max(rows, tokens), 1));
  context->SetBlockDim(static_cast<uint32_t>(blocks));

  MoeUnpermuteGradTilingData tiling;
  tiling.set_numTokens(tokens);
  tiling.set_topK(topK);
  tiling.set_hidden(hidden);
  tiling.set_numRows(rows);
  tiling.set_rowsPerTile(plan.rows_per_tile);
  tiling.set_colsPerTile(plan.cols_per_tile);
  tiling.set_colTiles(plan.col_tiles);
  tiling.set_tileBytes(plan.tile_bytes);
  tiling.set_reduceWorkElems(ReduceWorkElems(plan.cols_per_tile));
  tiling.set_topKPad(topKPad);
  tiling.SaveToBuffer(context->GetRawTilingData()->GetData(), context->GetRawTilingData()->GetCapacity());
  context->GetRawTilingData()->SetDataSize(tiling.GetDataSize());

  size_t* workspace = context->GetWorkspaceSizes(1);
  if (workspace == nullptr) return ge::GRAPH_FAILED;
  workspace[0] = platform.GetLibApiWorkSpaceSize();  // non-zero, as the hard SyncAll requires
  return ge::GRAPH_SUCCESS;
}

}  // namespace
}  // namespace optiling

namespace ge {
namespace {

graphStatus MoeUnpermuteGradInferShape(gert::InferShapeContext* context) {
  const gert::Shape* buffer = context->GetInputShape(0);
  const gert::Shape* weight = context->GetInputShape(2);
  gert::Shape* dBuffer = context->GetOutputShape(0);
  gert::Shape* dWeight = context->GetOutputShape(1);
  if (buffer == nullptr || weight == nullptr || dBuffer == nullptr || dWeight == nullptr) return GRAPH_FAILED;
  *dBuffer = *buffer;
  *dWeight = *weight;
  return GRAPH_SUCCESS;
}

graphStatus MoeUnpermuteGradInferDataType(gert::InferDataTypeContext* context) {
  context->SetOutputDataType(0, DT_FLOAT);
  context->SetOutputDataType(1, DT_FLOAT);
  return GRAPH_SUCCESS;
}

}  // namespace
}  // namespace ge

namespace ops {
class MoeUnpermuteGrad : public OpDef {
 public:
  explicit MoeUnpermuteGrad(const char* name) : OpDef(name) {
    this->Input("buffer").ParamType(REQUIRED).DataType({ge::DT_FLOAT}).Format({ge::FORMAT_ND});
    this->Input("flat_index").ParamType(REQUIRED).DataType({ge::DT_INT32}).Format({ge::FORMAT_ND});
    this->Input("weight").ParamType(REQUIRED).DataType({ge::DT_FLOAT}).Format({ge::FORMAT_ND});
    this->Input("d_y").ParamType(REQUIRED).DataType({ge::DT_FLOAT}).Format({ge::FORMAT_ND});
    this->Output("d_buffer").ParamType(REQUIRED).DataType({ge::DT_FLOAT}).Format({ge::FORMAT_ND});
    this->Output("d_weight").ParamType(REQUIRED).DataType({ge::DT_FLOAT}).Format({ge::FORMAT_ND});
    this->SetInferShape(ge::MoeUnpermuteGradInferShape).SetInferDataType(ge::MoeUnpermuteGradInferDataType);
    this->AICore().SetTiling(optiling::MoeUnpermuteGradTilingFunc).AddConfig("ascend910b");
  }
};
OP_ADD(MoeUnpermuteGrad);
}  // namespace ops
