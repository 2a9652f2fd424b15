// MoeGating (op_kernel): scores, top-K choice, gate and position slots under capacity.
//   in:  logits [T, E_g] f32, group_ids [T] i32, options [2] i32 (C, mode)
//   out: scores [T, E_g] f32 = softmax(logits) (mode 2: softmax(relu(logits))),
//        expert_index [T, K] i32 = group * E_g + local, top-K of the logits, ties to the lower id,
//        gate [T, K] f32 = scores at the choice (mode 1 with K > 1: divided by their sum over K),
//        slot [T, K] i32 = arrival position at the expert in service order k*T + t (may be >= C),
//        keep [T, K] bool = slot < C, tokens_per_expert [E] i32 (demand before dropping)
// Mirrors kernels/cpu/moe_gating.cc and the reference in pangu_moe/ops/gating.py.
// Never compiled or run (no CANN here).
//
// Phase 1, all cores: the tokens are split with SplitOverCores; each core moves tiles of token rows
// through the UB, chooses top-K by scalar scans, computes the softmax with vector ops, and writes
// scores, expert_index and gate by DMA.
// Phase 2, core 0 only, after a SyncAll: the slots. A slot is a prefix count over the service order
// k*T + t (pangu_moe::ServiceOrder), which runs across every core's tokens, so one core walks it
// sequentially. Chosen over per-core histograms plus a prefix: simpler, and T*K scalar steps are cheap.
#include "kernel_operator.h"
// UNVERIFIED: that the device compiler accepts the <cstdint> this shared header includes.
#include "../../../common/moe_kernel_common.h"

namespace {

class MoeGatingKernel {
 public:
  __aicore__ inline MoeGatingKernel() {}

  __aicore__ inline void Init(GM_ADDR logits, GM_ADDR groupIds, GM_ADDR options, GM_ADDR scores, GM_ADDR expertIndex,
                              GM_ADDR gate, GM_ADDR slot, GM_ADDR keep, GM_ADDR tokensPerExpert, int64_t numTokens,
                              int64_t expertsPerGroup, int64_t expertsPerGroupPad, int64_t topK, int64_t topKPad,
                              int64_t numExperts, int64_t numGroups, int64_t mode, int64_t rowsPerTile,
                              int64_t reduceWorkElems) {
    numTokens_ = numTokens;
    expertsPerGroup_ = expertsPerGroup;
    ePad_ = expertsPerGroupPad;
    topK_ = topK;
    kPad_ = topKPad;
    numExperts_ = numExperts;
    numGroups_ = numGroups;
    mode_ = mode;
    rowsPerTile_ = rowsPerTile;
    logitsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(logits), numTokens * expertsPerGroup);
    groupGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(groupIds), numTokens);
    optionsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(options), 2);
    scoresGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(scores), numTokens * expertsPerGroup);
    expertGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(expertIndex), numTokens * topK);
    gateGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(gate), numTokens * topK);
    slotGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(slot), numTokens * topK);
    keepGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint8_t*>(keep), numTokens * topK);
    tokensGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(tokensPerExpert), numExperts);
    const uint32_t wideTile = static_cast<uint32_t>(rowsPerTile * ePad_ * sizeof(float));
    const uint32_t narrowTile = static_cast<uint32_t>(rowsPerTile * kPad_ * sizeof(float));
    pipe_.InitBuffer(logitsBuf_, wideTile);
    pipe_.InitBuffer(scoresBuf_, wideTile);
    pipe_.InitBuffer(indexBuf_, narrowTile);
    pipe_.InitBuffer(gateBuf_, narrowTile);
    pipe_.InitBuffer(expBuf_, static_cast<uint32_t>(ePad_ * sizeof(float)));
    pipe_.InitBuffer(denomBuf_, static_cast<uint32_t>(ePad_ * sizeof(float)));
    pipe_.InitBuffer(workBuf_, static_cast<uint32_t>(reduceWorkElems * sizeof(float)));
    pipe_.InitBuffer(sumBuf_, 32);
  }

  __aicore__ inline void Process() {
    const int64_t capacity = optionsGm_.GetValue(0);
    // C < 0 is a bad option; options' mode must be the mode the host tiled for.
    if (capacity < 0 || optionsGm_.GetValue(1) != mode_) AscendC::Trap();
    int64_t begin = 0;
    int64_t end = 0;
    pangu_moe::SplitOverCores(numTokens_, AscendC::GetBlockNum(), AscendC::GetBlockIdx(), &begin, &end);
    for (int64_t row = begin; row < end; row += rowsPerTile_) {
      ScoreTile(row, (end - row < rowsPerTile_) ? end - row : rowsPerTile_);
    }
    AscendC::PipeBarrier<PIPE_ALL>();  // this core's expert_index DMA has landed before the barrier
    AscendC::SyncAll();
    if (AscendC::GetBlockIdx() == 0) AssignSlots(capacity);
  }

 private:
  __aicore__ inline void SyncScalarAfterVector() {
    const event_t id = static_cast<event_t>(pipe_.FetchEventID(AscendC::HardEvent::V_S));
    AscendC::SetFlag<AscendC::HardEvent::V_S>(id);
    AscendC::WaitFlag<AscendC::HardEvent::V_S>(id);
  }

  // Rows [first, first + rows) of this core's share. DataCopyPad lands each logits row at its own
  // 32-byte-aligned UB row of ePad_ floats (vector ops need 32-byte-aligned starts) and writes the
  // rows back the same way.
  __aicore__ inline void ScoreTile(int64_t first, int64_t rows) {
    AscendC::LocalTensor<float> logits = logitsBuf_.Get<float>();
    AscendC::LocalTensor<float> scores = scoresBuf_.Get<float>();
    AscendC::LocalTensor<int32_t> index = indexBuf_.Get<int32_t>();
    AscendC::LocalTensor<float> gate = gateBuf_.Get<float>();
    const AscendC::DataCopyExtParams wide{static_cast<uint16_t>(rows),
                                          static_cast<uint32_t>(expertsPerGroup_ * sizeof(float)), 0, 0, 0};
    // expert_index (int32) and gate (float) rows: both 4-byte elements, K per row.
    const AscendC::DataCopyExtParams narrow{static_cast<uint16_t>(rows), static_cast<uint32_t>(topK_ * 4), 0, 0, 0};
    const AscendC::DataCopyPadExtParams<float> noPad{false, 0, 0, 0.0f};
    AscendC::DataCopyPad(logits, logitsGm_[first * expertsPerGroup_], wide, noPad);
    // The row loop mixes scalar reads and vector ops on the tile: simplest correct order is a full barrier.
    AscendC::PipeBarrier<PIPE_ALL>();
    for (int64_t i = 0; i < rows; ++i) {
      ScoreRow(first + i, i, logits, scores, index, gate);
    }
    AscendC::PipeBarrier<PIPE_ALL>();  // scalar and vector writes of the tile are done before the DMA reads it
    AscendC::DataCopyPad(scoresGm_[first * expertsPerGroup_], scores, wide);
    AscendC::DataCopyPad(expertGm_[first * topK_], index, narrow);
    AscendC::DataCopyPad(gateGm_[first * topK_], gate, narrow);
    AscendC::PipeBarrier<PIPE_ALL>();  // the next tile may not overwrite the UB before the DMA has read it
  }

  __aicore__ inline void ScoreRow(int64_t token, int64_t i, AscendC::LocalTensor<float>& logits,
                                  AscendC::LocalTensor<float>& scores, AscendC::LocalTensor<int32_t>& index,
                                  AscendC::LocalTensor<float>& gate) {
    const int64_t group = groupGm_.GetValue(token);
    if (group < 0 || group >= numGroups_) AscendC::Trap();  // never clamped
    AscendC::LocalTensor<float> logitRow = logits[i * ePad_];
    AscendC::LocalTensor<float> scoreRow = scores[i * ePad_];
    const int64_t k0 = i * kPad_;
    const int32_t n = static_cast<int32_t>(expertsPerGroup_);

    // Top-K of the logits by repeated first-maximum scans over the experts not yet taken: the strict
    // `>` keeps the lower id on ties, as the CPU kernel's TopKRow.
    for (int64_t k = 0; k < topK_; ++k) {
      int64_t best = -1;
      float bestValue = 0.0f;
      for (int64_t j = 0; j < expertsPerGroup_; ++j) {
        bool taken = false;
        for (int64_t p = 0; p < k; ++p) taken = taken || index.GetValue(k0 + p) == j;
        if (taken) continue;
        const float v = logitRow.GetValue(j);
        if (best < 0 || v > bestValue) {
          best = j;
          bestValue = v;
        }
      }
      index.SetValue(k0 + k, static_cast<int32_t>(best));
    }

    // Softmax, shifted by the row maximum: the first choice is the largest logit, and relu is
    // monotone, so max(relu(logits)) = relu(that logit) in mode 2.
    const float top = logitRow.GetValue(index.GetValue(k0));
    const float shift = (mode_ == pangu_moe::kGrap && !(top > 0.0f)) ? 0.0f : top;
    AscendC::LocalTensor<float> expRow = expBuf_.Get<float>();
    AscendC::LocalTensor<float> denom = denomBuf_.Get<float>();
    AscendC::LocalTensor<float> work = workBuf_.Get<float>();
    AscendC::LocalTensor<float> sum = sumBuf_.Get<float>();
    AscendC::PipeBarrier<PIPE_V>();  // expRow and denom are reused: order after the previous row's Div
    if (mode_ == pangu_moe::kGrap) {
      AscendC::Relu(expRow, logitRow, n);
      AscendC::PipeBarrier<PIPE_V>();
      AscendC::Adds(expRow, expRow, -shift, n);
    } else {
      AscendC::Adds(expRow, logitRow, -shift, n);
    }
    AscendC::PipeBarrier<PIPE_V>();
    AscendC::Exp(expRow, expRow, n);
    AscendC::PipeBarrier<PIPE_V>();
    AscendC::ReduceSum(sum, expRow, work, n);
    SyncScalarAfterVector();
    const float total = sum.GetValue(0);
    // A true division by the sum (not a multiply by its reciprocal), as the CPU kernel does.
    AscendC::Duplicate(denom, total, n);
    AscendC::PipeBarrier<PIPE_V>();
    AscendC::Div(scoreRow, expRow, denom, n);
    SyncScalarAfterVector();

    float gateSum = 0.0f;
    for (int64_t k = 0; k < topK_; ++k) {
      const float g = scoreRow.GetValue(index.GetValue(k0 + k));
      gate.SetValue(k0 + k, g);
      gateSum += g;
    }
    if (mode_ == pangu_moe::kSoftmaxNormalize && topK_ > 1) {
      for (int64_t k = 0; k < topK_; ++k) gate.SetValue(k0 + k, gate.GetValue(k0 + k) / gateSum);
    }
    for (int64_t k = 0; k < topK_; ++k) {
      index.SetValue(k0 + k, static_cast<int32_t>(index.GetValue(k0 + k) + group * expertsPerGroup_));
    }
  }

  // Core 0: slot of choice (t, k) = number of earlier choices of the same expert in service order
  // pangu_moe::ServiceOrder(t, k, T) = k*T + t; the loop nest below visits exactly that order.
  // The outputs are written by scalar stores (through core 0's data cache; no other core writes
  // them) and flushed once at the end.
  __aicore__ inline void AssignSlots(int64_t capacity) {
    // expert_index came from other cores' DMA: drop any stale cached line before reading it.
    AscendC::DataCacheCleanAndInvalid<int32_t, AscendC::CacheLine::ENTIRE_DATA_CACHE,
                                      AscendC::DcciDst::CACHELINE_OUT>(expertGm_);
    for (int64_t e = 0; e < numExperts_; ++e) tokensGm_.SetValue(e, 0);
    for (int64_t k = 0; k < topK_; ++k) {
      for (int64_t t = 0; t < numTokens_; ++t) {
        const int64_t i = t * topK_ + k;
        const int64_t expert = expertGm_.GetValue(i);
        const int32_t arrival = tokensGm_.GetValue(expert);
        slotGm_.SetValue(i, arrival);
        keepGm_.SetValue(i, static_cast<uint8_t>(arrival < capacity ? 1 : 0));
        tokensGm_.SetValue(expert, arrival + 1);
      }
    }
    AscendC::DataCacheCleanAndInvalid<int32_t, AscendC::CacheLine::ENTIRE_DATA_CACHE,
                                      AscendC::DcciDst::CACHELINE_OUT>(slotGm_);
  }

  AscendC::TPipe pipe_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> logitsBuf_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> scoresBuf_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> indexBuf_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> gateBuf_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> expBuf_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> denomBuf_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> workBuf_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> sumBuf_;
  AscendC::GlobalTensor<float> logitsGm_;
  AscendC::GlobalTensor<int32_t> groupGm_;
  AscendC::GlobalTensor<int32_t> optionsGm_;
  AscendC::GlobalTensor<float> scoresGm_;
  AscendC::GlobalTensor<int32_t> expertGm_;
  AscendC::GlobalTensor<float> gateGm_;
  AscendC::GlobalTensor<int32_t> slotGm_;
  AscendC::GlobalTensor<uint8_t> keepGm_;
  AscendC::GlobalTensor<int32_t> tokensGm_;
  int64_t numTokens_ = 0;
  int64_t expertsPerGroup_ = 1;
  int64_t ePad_ = 8;
  int64_t topK_ = 1;
  int64_t kPad_ = 8;
  int64_t numExperts_ = 1;
  int64_t numGroups_ = 1;
  int64_t mode_ = 0;
  int64_t rowsPerTile_ = 1;
};

}  // namespace

extern "C" __global__ __aicore__ void moe_gating(GM_ADDR logits, GM_ADDR group_ids, GM_ADDR options, GM_ADDR scores,
                                                 GM_ADDR expert_index, GM_ADDR gate, GM_ADDR slot, GM_ADDR keep,
                                                 GM_ADDR tokens_per_expert, GM_ADDR workspace, GM_ADDR tiling) {
  (void)workspace;
  // Vector-only kernel: launch on the AIV cores alone, which is also what SyncAll<isAIVOnly = true> expects.
  KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_AIV_ONLY);
  GET_TILING_DATA(tilingData, tiling);
  MoeGatingKernel op;
  op.Init(logits, group_ids, options, scores, expert_index, gate, slot, keep, tokens_per_expert,
          tilingData.numTokens, tilingData.expertsPerGroup, tilingData.expertsPerGroupPad, tilingData.topK,
          tilingData.topKPad, tilingData.numExperts, tilingData.numGroups, tilingData.mode, tilingData.rowsPerTile,
          tilingData.reduceWorkElems);
  op.Process();
}
