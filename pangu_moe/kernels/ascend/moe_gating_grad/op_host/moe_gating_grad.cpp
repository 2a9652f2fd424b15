// MoeGatingGrad (op_host): tiling, shape/dtype inference and the op definition.
//   in:   logits [T, E_g] f32, group_ids [T] i32, options [2] i32 (C, mode), scores [T, E_g] f32,
//         expert_index [T, K] i32, gate [T, K] f32 (forward inputs and outputs),
//         d_scores [T, E_g] f32, d_gate [T, K] f32
//   attr: mode, top_k (ints, required, in this order)
//   out:  d_logits [T, E_g] f32
// d_scores gets d_gate at the chosen experts (through the renormalisation in mode 1 with K > 1), then
// the softmax backward; mode 2 multiplies by relu'(logits) = (logits > 0).
// Mirrors kernels/cpu/moe_gating.cc (MoeGatingGrad) and the reference in pangu_moe/ops/gating.py
// (MindSpore's gradient of reference_gating); the contract is kernels/README.md.
// Never compiled or run (no CANN here).
#include <algorithm>
#include <cstdint>

#include "moe_gating_grad_tiling.h"
#include "register/op_def_registry.h"
#include "tiling/platform/platform_ascendc.h"
#include "../../../common/moe_kernel_common.h"

namespace optiling {
namespace {

// UB kept free of tiles, as slack. UNVERIFIED: whether any of the UB is taken by the framework.
constexpr int64_t kUbHeadroom = 8 * 1024;
constexpr size_t kAttrMode = 0;
constexpr size_t kAttrTopK = 1;
// Full-size [rows, E_g] tiles: scores, d_scores (accumulates the gate gradient in place), logits, d_logits.
constexpr int64_t kTileBuffers = 4;
constexpr int64_t kBlockBytes = 32;
constexpr int64_t kMaxBlockCount = 4095;  // DataCopyPad moves at most 4095 rows per call

int64_t ReduceWorkElems(int64_t n) {
  const int64_t repeats = std::max<int64_t>((n + 63) / 64, 1);  // one partial per 256-byte repeat
  return pangu_moe::AlignUp(repeats, 8);
}

ge::graphStatus MoeGatingGradTilingFunc(gert::TilingContext* context) {
  const gert::StorageShape* logitsShape = context->GetInputShape(0);
  const gert::StorageShape* groupShape = context->GetInputShape(1);
  const gert::StorageShape* optionsShape = context->GetInputShape(2);
  const gert::StorageShape* scoresShape = context->GetInputShape(3);
  const gert::StorageShape* expertShape = context->GetInputShape(4);
  const gert::StorageShape* gateShape = context->GetInputShape(5);
  const gert::StorageShape* dScoresShape = context->GetInputShape(6);
  const gert::StorageShape* dGateShape = context->GetInputShape(7);
  const gert::RuntimeAttrs* attrs = context->GetAttrs();
  if (logitsShape == nullptr || groupShape == nullptr || optionsShape == nullptr || scoresShape == nullptr ||
      expertShape == nullptr || gateShape == nullptr || dScoresShape == nullptr || dGateShape == nullptr ||
      attrs == nullptr) {
    return ge::GRAPH_FAILED;
  }
  const int64_t* modeAttr = attrs->GetInt(kAttrMode);
  const int64_t* topKAttr = attrs->GetInt(kAttrTopK);
  if (modeAttr == nullptr || topKAttr == nullptr) return ge::GRAPH_FAILED;
  const gert::Shape& logits = logitsShape->GetStorageShape();
  const gert::Shape& experts = expertShape->GetStorageShape();
  if (logits.GetDimNum() != 2 || experts.GetDimNum() != 2) return ge::GRAPH_FAILED;
  const int64_t tokens = logits.GetDim(0);
  const int64_t expertsPerGroup = logits.GetDim(1);
  const int64_t topK = experts.GetDim(1);
  const int64_t mode = *modeAttr;
  if (tokens < 0 || expertsPerGroup <= 0 || topK != *topKAttr || topK < 1 || topK > expertsPerGroup ||
      experts.GetDim(0) != tokens || mode < pangu_moe::kSoftmax || mode > pangu_moe::kGrap) {
    return ge::GRAPH_FAILED;
  }
  const int64_t rowElems = tokens * expertsPerGroup;
  const int64_t choiceElems = tokens * topK;
  if (groupShape->GetStorageShape().GetShapeSize() != tokens || optionsShape->GetStorageShape().GetShapeSize() < 2 ||
      scoresShape->GetStorageShape().GetShapeSize() != rowElems ||
      dScoresShape->GetStorageShape().GetShapeSize() != rowElems ||
      gateShape->GetStorageShape().GetShapeSize() != choiceElems ||
      dGateShape->GetStorageShape().GetShapeSize() != choiceElems) {
    return ge::GRAPH_FAILED;
  }

  auto platform = platform_ascendc::PlatformAscendC(context->GetPlatformInfo());
  uint64_t ubBytes = 0;
  platform.GetCoreMemSize(platform_ascendc::CoreMemType::UB, ubBytes);
  const int64_t cores = static_cast<int64_t>(platform.GetCoreNumAiv());
  if (cores <= 0 || ubBytes == 0) return ge::GRAPH_FAILED;

  // Per-row scratch outside the tiles: one product row, the ReduceSum work and result.
  const int64_t rowBytes = pangu_moe::AlignUp(expertsPerGroup * static_cast<int64_t>(sizeof(float)), kBlockBytes);
  const int64_t reserve = rowBytes + ReduceWorkElems(expertsPerGroup) * 4 + kBlockBytes;
  pangu_moe::RowTiling plan{};
  if (!pangu_moe::PlanRowTiles(std::max<int64_t>(tokens, 1), expertsPerGroup, sizeof(float),
                               static_cast<int64_t>(ubBytes) - kUbHeadroom - reserve, kTileBuffers, &plan) ||
      plan.col_tiles != 1) {
    return ge::GRAPH_FAILED;  // a softmax row must fit the UB whole
  }

  // Rows are independent: tokens split over the cores, no barrier.
  const int64_t blocks = std::min(cores, std::max<int64_t>(tokens, 1));
  context->SetBlockDim(static_cast<uint32_t>(blocks));

  MoeGatingGradTilingData tiling;
  tiling.set_numTokens(tokens);
  tiling.set_expertsPerGroup(expertsPerGroup);
  tiling.set_expertsPerGroupPad(rowBytes / static_cast<int64_t>(sizeof(float)));
  tiling.set_topK(topK);
  tiling.set_mode(mode);
  tiling.set_rowsPerTile(std::min(plan.rows_per_tile, kMaxBlockCount));
  tiling.set_reduceWorkElems(ReduceWorkElems(expertsPerGroup));
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

graphStatus MoeGatingGradInferShape(gert::InferShapeContext* context) {
  const gert::Shape* logits = context->GetInputShape(0);
  gert::Shape* dLogits = context->GetOutputShape(0);
  if (logits == nullptr || dLogits == nullptr) return GRAPH_FAILED;
  *dLogits = *logits;
  return GRAPH_SUCCESS;
}

graphStatus MoeGatingGradInferDataType(gert::InferDataTypeContext* context) {
  context->SetOutputDataType(0, DT_FLOAT);
  return GRAPH_SUCCESS;
}

}  // namespace
}  // namespace ge

namespace ops {
class MoeGatingGrad : public OpDef {
 public:
  explicit MoeGatingGrad(const char* name) : OpDef(name) {
    this->Input("logits").ParamType(REQUIRED).DataType({ge::DT_FLOAT}).Format({ge::FORMAT_ND});
    this->Input("group_ids").ParamType(REQUIRED).DataType({ge::DT_INT32}).Format({ge::FORMAT_ND});
    this->Input("options").ParamType(REQUIRED).DataType({ge::DT_INT32}).Format({ge::FORMAT_ND});
    this->Input("scores").ParamType(REQUIRED).DataType({ge::DT_FLOAT}).Format({ge::FORMAT_ND});
    this->Input("expert_index").ParamType(REQUIRED).DataType({ge::DT_INT32}).Format({ge::FORMAT_ND});
    this->Input("gate").ParamType(REQUIRED).DataType({ge::DT_FLOAT}).Format({ge::FORMAT_ND});
    this->Input("d_scores").ParamType(REQUIRED).DataType({ge::DT_FLOAT}).Format({ge::FORMAT_ND});
    this->Input("d_gate").ParamType(REQUIRED).DataType({ge::DT_FLOAT}).Format({ge::FORMAT_ND});
    this->Output("d_logits").ParamType(REQUIRED).DataType({ge::DT_FLOAT}).Format({ge::FORMAT_ND});
    // Attribute order = the attrs dict order in pangu_moe/ops/gating.py (CustomGating's grad).
    // UNVERIFIED: that MindSpore's Ascend C path passes attributes in reg_info order.
    this->Attr("mode").AttrType(REQUIRED).Int();
    this->Attr("top_k").AttrType(REQUIRED).Int();
    this->SetInferShape(ge::MoeGatingGradInferShape).SetInferDataType(ge::MoeGatingGradInferDataType);
    this->AICore().SetTiling(optiling::MoeGatingGradTilingFunc).AddConfig("ascend910b");
  }
};
OP_ADD(MoeGatingGrad);
}  // namespace ops
