// MoeDispatchLayout (op_kernel): buffer rows and token counts from the routing.
//   in:  pair_index [T, K] i32, slot [T, K] i32, keep [T, K] bool, requested [T, K] bool, options [1] i32 (C)
//   out: flat_index [T*K] i32, tokens_per_expert [R, E] i32, kept_per_expert [R, E] i32,
//        send_counts [R, W] i32, node_counts [R, N] i32
// Mirrors kernels/cpu/moe_dispatch_layout.cc and the reference in pangu_moe/ops/layout.py.
// Never compiled or run (no CANN here).
//
// One core, scalar code: every output is written through GlobalTensor::SetValue, i.e. through this
// core's data cache, and flushed to GM once at the end. No other core touches these outputs, so the
// cache cannot clobber anyone else's data.
#include "kernel_operator.h"
// UNVERIFIED: that the device compiler accepts the <cstdint> this shared header includes.
#include "../../../common/moe_kernel_common.h"

namespace {

constexpr int64_t kMaxInt32 = 2147483647;  // flat_index is int32

class MoeDispatchLayoutKernel {
 public:
  __aicore__ inline MoeDispatchLayoutKernel() {}

  __aicore__ inline void Init(GM_ADDR pairIndex, GM_ADDR slot, GM_ADDR keep, GM_ADDR requested, GM_ADDR options,
                              GM_ADDR flatIndex, GM_ADDR tokensPerExpert, GM_ADDR keptPerExpert, GM_ADDR sendCounts,
                              GM_ADDR nodeCounts, int64_t numChoices, int64_t numRanks, int64_t numExperts,
                              int64_t worldSize, int64_t nodes) {
    numChoices_ = numChoices;
    numRanks_ = numRanks;
    numExperts_ = numExperts;
    worldSize_ = worldSize;
    nodes_ = nodes;
    const int64_t buffers = numRanks * numExperts;
    pairGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(pairIndex), numChoices);
    slotGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(slot), numChoices);
    keepGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint8_t*>(keep), numChoices);
    requestedGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint8_t*>(requested), numChoices);
    optionsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(options), 1);
    flatIndexGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(flatIndex), numChoices);
    tokensGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(tokensPerExpert), buffers);
    keptGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(keptPerExpert), buffers);
    sendGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(sendCounts), numRanks * worldSize);
    nodeGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(nodeCounts), numRanks * nodes);
  }

  __aicore__ inline void Process() {
    const int64_t capacity = optionsGm_.GetValue(0);
    const int64_t buffers = numRanks_ * numExperts_;
    // C < 0, or a sink row B*C beyond int32, is a bad option: stop rather than write wrapped rows.
    if (capacity < 0 || buffers * capacity > kMaxInt32) AscendC::Trap();
    const int64_t devicesPerNode = worldSize_ / nodes_;

    for (int64_t i = 0; i < buffers; ++i) {
      tokensGm_.SetValue(i, 0);
      keptGm_.SetValue(i, 0);
    }
    for (int64_t i = 0; i < numRanks_ * worldSize_; ++i) sendGm_.SetValue(i, 0);
    for (int64_t i = 0; i < numRanks_ * nodes_; ++i) nodeGm_.SetValue(i, 0);

    for (int64_t i = 0; i < numChoices_; ++i) {
      const int64_t pair = pairGm_.GetValue(i);
      if (pair < 0 || pair >= buffers) AscendC::Trap();  // never clamped
      const bool isRequested = requestedGm_.GetValue(i) != 0;
      // As the CPU kernel: a choice counts as kept only if it was also requested.
      const bool kept = keepGm_.GetValue(i) != 0 && isRequested;
      const int64_t slot = slotGm_.GetValue(i);
      if (kept && (slot < 0 || slot >= capacity)) AscendC::Trap();
      flatIndexGm_.SetValue(i, static_cast<int32_t>(pangu_moe::BufferRow(pair, slot, kept, capacity, buffers)));
      if (isRequested) tokensGm_.SetValue(pair, tokensGm_.GetValue(pair) + 1);
      if (!kept) continue;
      const int64_t source = pair / numExperts_;
      const int64_t destination = pangu_moe::DestinationRank(pair % numExperts_, numExperts_, worldSize_);
      const int64_t node = pangu_moe::NodeOfRank(destination, devicesPerNode);
      keptGm_.SetValue(pair, keptGm_.GetValue(pair) + 1);
      sendGm_.SetValue(source * worldSize_ + destination, sendGm_.GetValue(source * worldSize_ + destination) + 1);
      nodeGm_.SetValue(source * nodes_ + node, nodeGm_.GetValue(source * nodes_ + node) + 1);
    }
    // Write the scalar stores back to GM before the kernel ends (ENTIRE_DATA_CACHE flushes every line,
    // so one call covers all five outputs).
    AscendC::DataCacheCleanAndInvalid<int32_t, AscendC::CacheLine::ENTIRE_DATA_CACHE, AscendC::DcciDst::CACHELINE_OUT>(
        flatIndexGm_);
  }

 private:
  AscendC::GlobalTensor<int32_t> pairGm_;
  AscendC::GlobalTensor<int32_t> slotGm_;
  AscendC::GlobalTensor<uint8_t> keepGm_;
  AscendC::GlobalTensor<uint8_t> requestedGm_;
  AscendC::GlobalTensor<int32_t> optionsGm_;
  AscendC::GlobalTensor<int32_t> flatIndexGm_;
  AscendC::GlobalTensor<int32_t> tokensGm_;
  AscendC::GlobalTensor<int32_t> keptGm_;
  AscendC::GlobalTensor<int32_t> sendGm_;
  AscendC::GlobalTensor<int32_t> nodeGm_;
  int64_t numChoices_ = 0;
  int64_t numRanks_ = 0;
  int64_t numExperts_ = 1;
  int64_t worldSize_ = 1;
  int64_t nodes_ = 1;
};

}  // namespace

extern "C" __global__ __aicore__ void moe_dispatch_layout(GM_ADDR pair_index, GM_ADDR slot, GM_ADDR keep,
                                                          GM_ADDR requested, GM_ADDR options, GM_ADDR flat_index,
                                                          GM_ADDR tokens_per_expert, GM_ADDR kept_per_expert,
                                                          GM_ADDR send_counts, GM_ADDR node_counts, GM_ADDR workspace,
                                                          GM_ADDR tiling) {
  (void)workspace;
  // Vector-only kernel (no Cube instructions): launch on the AIV cores alone.
  KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_AIV_ONLY);
  GET_TILING_DATA(tilingData, tiling);
  MoeDispatchLayoutKernel op;
  op.Init(pair_index, slot, keep, requested, options, flat_index, tokens_per_expert, kept_per_expert, send_counts,
          node_counts, tilingData.numChoices, tilingData.numRanks, tilingData.numExperts, tilingData.worldSize,
          tilingData.nodes);
  op.Process();
}
