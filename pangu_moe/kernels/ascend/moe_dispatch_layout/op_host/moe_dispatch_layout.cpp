// MoeDispatchLayout (op_host): tiling, shape/dtype inference and the op definition.
//   in:   pair_index [T, K] i32 (source_rank * E + expert, in [0, B)), slot [T, K] i32,
//         keep [T, K] bool, requested [T, K] bool (keep implies requested), options [1] i32 (C)
//   attr: num_ranks_held R, num_experts E, world_size W, nodes N (ints, required, in this order)
//   out:  flat_index [T*K] i32 (pair * C + slot if kept, else B*C), tokens_per_expert [R, E] i32 (requested),
//         kept_per_expert [R, E] i32, send_counts [R, W] i32 (kept, by destination rank),
//         node_counts [R, N] i32 (kept, by destination node)
// Mirrors kernels/cpu/moe_dispatch_layout.cc and the reference in pangu_moe/ops/layout.py; the contract
// is kernels/README.md. Never compiled or run (no CANN here).
#include <cstdint>

#include "moe_dispatch_layout_tiling.h"
#include "register/op_def_registry.h"
#include "tiling/platform/platform_ascendc.h"
#include "../../../common/moe_kernel_common.h"

namespace optiling {
namespace {

// Attribute order of the op definition below (MindSpore passes them positionally, in this order).
constexpr size_t kAttrRanks = 0;
constexpr size_t kAttrExperts = 1;
constexpr size_t kAttrWorld = 2;
constexpr size_t kAttrNodes = 3;

ge::graphStatus MoeDispatchLayoutTilingFunc(gert::TilingContext* context) {
  const gert::StorageShape* pairShape = context->GetInputShape(0);
  const gert::RuntimeAttrs* attrs = context->GetAttrs();
  if (pairShape == nullptr || attrs == nullptr) return ge::GRAPH_FAILED;
  const int64_t* ranks = attrs->GetInt(kAttrRanks);
  const int64_t* experts = attrs->GetInt(kAttrExperts);
  const int64_t* world = attrs->GetInt(kAttrWorld);
  const int64_t* nodes = attrs->GetInt(kAttrNodes);
  if (ranks == nullptr || experts == nullptr || world == nullptr || nodes == nullptr) return ge::GRAPH_FAILED;
  // The same topology checks as the CPU kernel: DestinationRank needs E % W == 0 or W % E == 0, and
  // NodeOfRank needs whole nodes (W % N == 0).
  if (*ranks < 0 || *experts <= 0 || *world <= 0 || *nodes <= 0 || *world % *nodes != 0) return ge::GRAPH_FAILED;
  if (*experts % *world != 0 && *world % *experts != 0) return ge::GRAPH_FAILED;
  const int64_t choices = pairShape->GetStorageShape().GetShapeSize();
  if (choices < 0 || choices > INT32_MAX) return ge::GRAPH_FAILED;

  // A sequential count over T*K choices: one core. The counts are read-modify-writes of shared
  // counters, which a multi-core split would have to merge; T*K scalar steps are cheap next to the
  // [B, C, H] data movement that follows.
  context->SetBlockDim(1);

  MoeDispatchLayoutTilingData tiling;
  tiling.set_numChoices(choices);
  tiling.set_numRanks(*ranks);
  tiling.set_numExperts(*experts);
  tiling.set_worldSize(*world);
  tiling.set_nodes(*nodes);
  tiling.SaveToBuffer(context->GetRawTilingData()->GetData(), context->GetRawTilingData()->GetCapacity());
  context->GetRawTilingData()->SetDataSize(tiling.GetDataSize());

  auto platform = platform_ascendc::PlatformAscendC(context->GetPlatformInfo());
  size_t* workspace = context->GetWorkspaceSizes(1);
  if (workspace == nullptr) return ge::GRAPH_FAILED;
  workspace[0] = platform.GetLibApiWorkSpaceSize();
  return ge::GRAPH_SUCCESS;
}

}  // namespace
}  // namespace optiling

namespace ge {
namespace {

void SetShape2(gert::Shape* shape, int64_t d0, int64_t d1) {
  shape->SetDimNum(2);
  shape->SetDim(0, d0);
  shape->SetDim(1, d1);
}

graphStatus MoeDispatchLayoutInferShape(gert::InferShapeContext* context) {
  const gert::Shape* pair = context->GetInputShape(0);
  const gert::RuntimeAttrs* attrs = context->GetAttrs();
  if (pair == nullptr || attrs == nullptr) return GRAPH_FAILED;
  const int64_t* ranks = attrs->GetInt(0);
  const int64_t* experts = attrs->GetInt(1);
  const int64_t* world = attrs->GetInt(2);
  const int64_t* nodes = attrs->GetInt(3);
  gert::Shape* flatIndex = context->GetOutputShape(0);
  gert::Shape* tokensPerExpert = context->GetOutputShape(1);
  gert::Shape* keptPerExpert = context->GetOutputShape(2);
  gert::Shape* sendCounts = context->GetOutputShape(3);
  gert::Shape* nodeCounts = context->GetOutputShape(4);
  if (ranks == nullptr || experts == nullptr || world == nullptr || nodes == nullptr || flatIndex == nullptr ||
      tokensPerExpert == nullptr || keptPerExpert == nullptr || sendCounts == nullptr || nodeCounts == nullptr ||
      pair->GetDimNum() != 2) {
    return GRAPH_FAILED;
  }
  flatIndex->SetDimNum(1);
  flatIndex->SetDim(0, pair->GetDim(0) * pair->GetDim(1));
  SetShape2(tokensPerExpert, *ranks, *experts);
  SetShape2(keptPerExpert, *ranks, *experts);
  SetShape2(sendCounts, *ranks, *world);
  SetShape2(nodeCounts, *ranks, *nodes);
  return GRAPH_SUCCESS;
}

graphStatus MoeDispatchLayoutInferDataType(gert::InferDataTypeContext* context) {
  for (size_t i = 0; i < 5; ++i) context->SetOutputDataType(i, DT_INT32);
  return GRAPH_SUCCESS;
}

}  // namespace
}  // namespace ge

namespace ops {
class MoeDispatchLayout : public OpDef {
 public:
  explicit MoeDispatchLayout(const char* name) : OpDef(name) {
    this->Input("pair_index").ParamType(REQUIRED).DataType({ge::DT_INT32}).Format({ge::FORMAT_ND});
    this->Input("slot").ParamType(REQUIRED).DataType({ge::DT_INT32}).Format({ge::FORMAT_ND});
    this->Input("keep").ParamType(REQUIRED).DataType({ge::DT_BOOL}).Format({ge::FORMAT_ND});
    this->Input("requested").ParamType(REQUIRED).DataType({ge::DT_BOOL}).Format({ge::FORMAT_ND});
    this->Input("options").ParamType(REQUIRED).DataType({ge::DT_INT32}).Format({ge::FORMAT_ND});
    this->Output("flat_index").ParamType(REQUIRED).DataType({ge::DT_INT32}).Format({ge::FORMAT_ND});
    this->Output("tokens_per_expert").ParamType(REQUIRED).DataType({ge::DT_INT32}).Format({ge::FORMAT_ND});
    this->Output("kept_per_expert").ParamType(REQUIRED).DataType({ge::DT_INT32}).Format({ge::FORMAT_ND});
    this->Output("send_counts").ParamType(REQUIRED).DataType({ge::DT_INT32}).Format({ge::FORMAT_ND});
    this->Output("node_counts").ParamType(REQUIRED).DataType({ge::DT_INT32}).Format({ge::FORMAT_ND});
    // Attribute order = the attrs dict order in pangu_moe/ops/layout.py (CustomLayout).
    // UNVERIFIED: that MindSpore's Ascend C path passes attributes in reg_info order.
    this->Attr("num_ranks_held").AttrType(REQUIRED).Int();
    this->Attr("num_experts").AttrType(REQUIRED).Int();
    this->Attr("world_size").AttrType(REQUIRED).Int();
    this->Attr("nodes").AttrType(REQUIRED).Int();
    this->SetInferShape(ge::MoeDispatchLayoutInferShape).SetInferDataType(ge::MoeDispatchLayoutInferDataType);
    this->AICore().SetTiling(optiling::MoeDispatchLayoutTilingFunc).AddConfig("ascend910b");
  }
};
OP_ADD(MoeDispatchLayout);
}  // namespace ops
