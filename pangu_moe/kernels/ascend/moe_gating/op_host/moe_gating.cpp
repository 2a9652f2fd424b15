// MoeGating (op_host): tiling, shape/dtype inference and the op definition.
//   in:   logits [T, E_g] f32, group_ids [T] i32 in [0, G), options [2] i32 (C >= 0, mode)
//   attr: mode, top_k (K), num_experts (E) (ints, required, in this order)
//   out:  scores [T, E_g] f32, expert_index [T, K] i32 (group * E_g + local), gate [T, K] f32,
//         slot [T, K] i32, keep [T, K] bool, tokens_per_expert [E] i32
// Mirrors kernels/cpu/moe_gating.cc and the reference in pangu_moe/ops/gating.py; the contract is
// kernels/README.md. Never compiled or run (no CANN here).
//
// mode, K and E are attributes because the tiling (and the output shapes) must know them on the host,
// which cannot read device tensors. options keeps its CPU meaning: the kernel reads C from it and stops
// if its mode disagrees with the attribute.
#include <algorithm>
#include <cstdint>

#include "moe_gating_tiling.h"
#include "register/op_def_registry.h"
#include "tiling/platform/platform_ascendc.h"
#include "../../../common/moe_kernel_common.h"

namespace optiling {
namespace {

// UB kept free of tiles, as slack. UNVERIFIED: whether any of the UB is taken by the framework.
constexpr int64_t kUbHeadroom = 8 * 1024;
constexpr size_t kAttrMode = 0;
constexpr size_t kAttrTopK = 1;
constexpr size_t kAttrExperts = 2;
// Full-size tiles: logits and scores [rows, E_g], expert_index and gate [rows, K] (K <= E_g, so a
// K-wide tile never needs more than an E_g-wide share).
constexpr int64_t kTileBuffers = 4;
constexpr int64_t kBlockBytes = 32;
constexpr int64_t kMaxBlockCount = 4095;  // DataCopyPad moves at most 4095 rows per call

int64_t ReduceWorkElems(int64_t n) {
  const int64_t repeats = std::max<int64_t>((n + 63) / 64, 1);  // one partial per 256-byte repeat
  return pangu_moe::AlignUp(repeats, 8);
}

ge::graphStatus MoeGatingTilingFunc(gert::TilingContext* context) {
  const gert::StorageShape* logitsShape = context->GetInputShape(0);
  const gert::StorageShape* groupShape = context->GetInputShape(1);
  const gert::StorageShape* optionsShape = context->GetInputShape(2);
  const gert::RuntimeAttrs* attrs = context->GetAttrs();
  if (logitsShape == nullptr || groupShape == nullptr || optionsShape == nullptr || attrs == nullptr) {
    return ge::GRAPH_FAILED;
  }
  const int64_t* modeAttr = attrs->GetInt(kAttrMode);
  const int64_t* topKAttr = attrs->GetInt(kAttrTopK);
  const int64_t* expertsAttr = attrs->GetInt(kAttrExperts);
  if (modeAttr == nullptr || topKAttr == nullptr || expertsAttr == nullptr) return ge::GRAPH_FAILED;
  const gert::Shape& logits = logitsShape->GetStorageShape();
  if (logits.GetDimNum() != 2 || groupShape->GetStorageShape().GetShapeSize() != logits.GetDim(0) ||
      optionsShape->GetStorageShape().GetShapeSize() < 2) {
    return ge::GRAPH_FAILED;
  }
  const int64_t tokens = logits.GetDim(0);
  const int64_t expertsPerGroup = logits.GetDim(1);
  const int64_t topK = *topKAttr;
  const int64_t experts = *expertsAttr;
  const int64_t mode = *modeAttr;
  // The CPU kernel's checks: K <= E_g, E a whole number of groups, a known mode.
  if (tokens < 0 || expertsPerGroup <= 0 || topK < 1 || topK > expertsPerGroup) return ge::GRAPH_FAILED;
  if (experts < expertsPerGroup || experts % expertsPerGroup != 0) return ge::GRAPH_FAILED;
  if (mode < pangu_moe::kSoftmax || mode > pangu_moe::kGrap || tokens * topK > INT32_MAX) return ge::GRAPH_FAILED;

  auto platform = platform_ascendc::PlatformAscendC(context->GetPlatformInfo());
  uint64_t ubBytes = 0;
  platform.GetCoreMemSize(platform_ascendc::CoreMemType::UB, ubBytes);
  const int64_t cores = static_cast<int64_t>(platform.GetCoreNumAiv());
  if (cores <= 0 || ubBytes == 0) return ge::GRAPH_FAILED;

  // Per-row scratch outside the tiles: the shifted exponentials, the broadcast denominator, and the
  // ReduceSum work and result.
  const int64_t rowBytes = pangu_moe::AlignUp(expertsPerGroup * static_cast<int64_t>(sizeof(float)), kBlockBytes);
  const int64_t reserve = 2 * rowBytes + ReduceWorkElems(expertsPerGroup) * 4 + kBlockBytes;
  pangu_moe::RowTiling plan{};
  if (!pangu_moe::PlanRowTiles(std::max<int64_t>(tokens, 1), expertsPerGroup, sizeof(float),
                               static_cast<int64_t>(ubBytes) - kUbHeadroom - reserve, kTileBuffers, &plan) ||
      plan.col_tiles != 1) {
    return ge::GRAPH_FAILED;  // a softmax row must fit the UB whole
  }
  const int64_t rowsPerTile = std::min(plan.rows_per_tile, kMaxBlockCount);

  // Phase 1 (softmax, top-K, gate) splits the tokens over the cores; phase 2 (slots) runs on core 0
  // after a hard SyncAll, so the block count may not exceed the physical AIV cores.
  const int64_t blocks = std::min(cores, std::max<int64_t>(tokens, 1));
  context->SetBlockDim(static_cast<uint32_t>(blocks));

  MoeGatingTilingData tiling;
  tiling.set_numTokens(tokens);
  tiling.set_expertsPerGroup(expertsPerGroup);
  tiling.set_expertsPerGroupPad(rowBytes / static_cast<int64_t>(sizeof(float)));
  tiling.set_topK(topK);
  tiling.set_topKPad(pangu_moe::AlignUp(topK, 8));
  tiling.set_numExperts(experts);
  tiling.set_numGroups(experts / expertsPerGroup);
  tiling.set_mode(mode);
  tiling.set_rowsPerTile(rowsPerTile);
  tiling.set_reduceWorkElems(ReduceWorkElems(expertsPerGroup));
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

graphStatus MoeGatingInferShape(gert::InferShapeContext* context) {
  const gert::Shape* logits = context->GetInputShape(0);
  const gert::RuntimeAttrs* attrs = context->GetAttrs();
  if (logits == nullptr || attrs == nullptr || logits->GetDimNum() != 2) return GRAPH_FAILED;
  const int64_t* topK = attrs->GetInt(1);
  const int64_t* experts = attrs->GetInt(2);
  if (topK == nullptr || experts == nullptr) return GRAPH_FAILED;
  for (size_t i = 0; i < 6; ++i) {
    if (context->GetOutputShape(i) == nullptr) return GRAPH_FAILED;
  }
  *context->GetOutputShape(0) = *logits;  // scores
  for (size_t i = 1; i <= 4; ++i) {       // expert_index, gate, slot, keep: [T, K]
    gert::Shape* choices = context->GetOutputShape(i);
    choices->SetDimNum(2);
    choices->SetDim(0, logits->GetDim(0));
    choices->SetDim(1, *topK);
  }
  gert::Shape* tokensPerExpert = context->GetOutputShape(5);
  tokensPerExpert->SetDimNum(1);
  tokensPerExpert->SetDim(0, *experts);
  return GRAPH_SUCCESS;
}

graphStatus MoeGatingInferDataType(gert::InferDataTypeContext* context) {
  context->SetOutputDataType(0, DT_FLOAT);  // scores
  context->SetOutputDataType(1, DT_INT32);  // expert_index
  context->SetOutputDataType(2, DT_FLOAT);  // gate
  context->SetOutputDataType(3, DT_INT32);  // slot
  context->SetOutputDataType(4, DT_BOOL);   // keep
  context->SetOutputDataType(5, DT_INT32);  // tokens_per_expert
  return GRAPH_SUCCESS;
}

}  // namespace
}  // namespace ge

namespace ops {
class MoeGating : public OpDef {
 public:
  explicit MoeGating(const char* name) : OpDef(name) {
    this->Input("logits").ParamType(REQUIRED).DataType({ge::DT_FLOAT}).Format({ge::FORMAT_ND});
    this->Input("group_ids").ParamType(REQUIRED).DataType({ge::DT_INT32}).Format({ge::FORMAT_ND});
    this->Input("options").ParamType(REQUIRED).DataType({ge::DT_INT32}).Format({ge::FORMAT_ND});
    this->Output("scores").ParamType(REQUIRED).DataType({ge::DT_FLOAT}).Format({ge::FORMAT_ND});
    this->Output("expert_index").ParamType(REQUIRED).DataType({ge::DT_INT32}).Format({ge::FORMAT_ND});
    this->Output("gate").ParamType(REQUIRED).DataType({ge::DT_FLOAT}).Format({ge::FORMAT_ND});
    this->Output("slot").ParamType(REQUIRED).DataType({ge::DT_INT32}).Format({ge::FORMAT_ND});
    this->Output("keep").ParamType(REQUIRED).DataType({ge::DT_BOOL}).Format({ge::FORMAT_ND});
    this->Output("tokens_per_expert").ParamType(REQUIRED).DataType({ge::DT_INT32}).Format({ge::FORMAT_ND});
    // Attribute order = the attrs dict order in pangu_moe/ops/gating.py (CustomGating).
    // UNVERIFIED: that MindSpore's Ascend C path passes attributes in reg_info order.
    this->Attr("mode").AttrType(REQUIRED).Int();
    this->Attr("top_k").AttrType(REQUIRED).Int();
    this->Attr("num_experts").AttrType(REQUIRED).Int();
    this->SetInferShape(ge::MoeGatingInferShape).SetInferDataType(ge::MoeGatingInferDataType);
    this->AICore().SetTiling(optiling::MoeGatingTilingFunc).AddConfig("ascend910b");
  }
};
OP_ADD(MoeGating);
}  // namespace ops
