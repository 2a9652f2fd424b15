// MoeGatingGrad (op_kernel): the backward of MoeGating.
//   in:  logits [T, E_g] f32, group_ids [T] i32, options [2] i32 (C, mode), scores [T, E_g] f32,
//        expert_index [T, K] i32, gate [T, K] f32, d_scores [T, E_g] f32, d_gate [T, K] f32
//   out: d_logits [T, E_g] f32
// Per token: d = d_scores with d_gate added at the chosen experts (mode 1 with K > 1: through the
// renormalisation, d s_k = (d gate_k - sum_j d gate_j * gate_j) / sum_j s_j), then the softmax backward
// d_logits = s * (d - dot(d, s)); mode 2 zeroes the entries whose logit is not > 0 (relu').
// Mirrors kernels/cpu/moe_gating.cc (MoeGatingGrad) and the reference in pangu_moe/ops/gating.py.
// Never compiled or run (no CANN here).
//
// Tokens are split over the cores (SplitOverCores); rows are independent, so no barrier between cores.
#include "kernel_operator.h"
// UNVERIFIED: that the device compiler accepts the <cstdint> this shared header includes.
#include "../../../common/moe_kernel_common.h"

namespace {

class MoeGatingGradKernel {
 public:
  __aicore__ inline MoeGatingGradKernel() {}

  __aicore__ inline void Init(GM_ADDR logits, GM_ADDR groupIds, GM_ADDR options, GM_ADDR scores, GM_ADDR expertIndex,
                              GM_ADDR gate, GM_ADDR dScores, GM_ADDR dGate, GM_ADDR dLogits, int64_t numTokens,
                              int64_t expertsPerGroup, int64_t expertsPerGroupPad, int64_t topK, int64_t mode,
                              int64_t rowsPerTile, int64_t reduceWorkElems) {
    numTokens_ = numTokens;
    expertsPerGroup_ = expertsPerGroup;
    ePad_ = expertsPerGroupPad;
    topK_ = topK;
    mode_ = mode;
    rowsPerTile_ = rowsPerTile;
    const int64_t rowElems = numTokens * expertsPerGroup;
    logitsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(logits), rowElems);
    groupGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(groupIds), numTokens);
    optionsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(options), 2);
    scoresGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(scores), rowElems);
    expertGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(expertIndex), numTokens * topK);
    gateGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(gate), numTokens * topK);
    dScoresGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(dScores), rowElems);
    dGateGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(dGate), numTokens * topK);
    dLogitsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(dLogits), rowElems);
    const uint32_t tile = static_cast<uint32_t>(rowsPerTile * ePad_ * sizeof(float));
    pipe_.InitBuffer(scoresBuf_, tile);
    pipe_.InitBuffer(gradBuf_, tile);
    pipe_.InitBuffer(logitsBuf_, tile);
    pipe_.InitBuffer(outBuf_, tile);
    pipe_.InitBuffer(productBuf_, static_cast<uint32_t>(ePad_ * sizeof(float)));
    pipe_.InitBuffer(workBuf_, static_cast<uint32_t>(reduceWorkElems * sizeof(float)));
    pipe_.InitBuffer(sumBuf_, 32);
  }

  __aicore__ inline void Process() {
    if (optionsGm_.GetValue(1) != mode_) AscendC::Trap();  // options' mode must be the tiled mode
    int64_t begin = 0;
    int64_t end = 0;
    pangu_moe::SplitOverCores(numTokens_, AscendC::GetBlockNum(), AscendC::GetBlockIdx(), &begin, &end);
    for (int64_t row = begin; row < end; row += rowsPerTile_) {
      Tile(row, (end - row < rowsPerTile_) ? end - row : rowsPerTile_);
    }
  }

 private:
  __aicore__ inline void SyncScalarAfterVector() {
    const event_t id = static_cast<event_t>(pipe_.FetchEventID(AscendC::HardEvent::V_S));
    AscendC::SetFlag<AscendC::HardEvent::V_S>(id);
    AscendC::WaitFlag<AscendC::HardEvent::V_S>(id);
  }

  __aicore__ inline void SyncVectorAfterScalar() {
    const event_t id = static_cast<event_t>(pipe_.FetchEventID(AscendC::HardEvent::S_V));
    AscendC::SetFlag<AscendC::HardEvent::S_V>(id);
    AscendC::WaitFlag<AscendC::HardEvent::S_V>(id);
  }

  // Each row lands on its own 32-byte-aligned UB row of ePad_ floats (DataCopyPad pads every block).
  __aicore__ inline void Tile(int64_t first, int64_t rows) {
    AscendC::LocalTensor<float> scores = scoresBuf_.Get<float>();
    AscendC::LocalTensor<float> grad = gradBuf_.Get<float>();
    AscendC::LocalTensor<float> logits = logitsBuf_.Get<float>();
    AscendC::LocalTensor<float> out = outBuf_.Get<float>();
    const AscendC::DataCopyExtParams copy{static_cast<uint16_t>(rows),
                                          static_cast<uint32_t>(expertsPerGroup_ * sizeof(float)), 0, 0, 0};
    const AscendC::DataCopyPadExtParams<float> noPad{false, 0, 0, 0.0f};
    const int64_t offset = first * expertsPerGroup_;
    AscendC::DataCopyPad(scores, scoresGm_[offset], copy, noPad);
    AscendC::DataCopyPad(grad, dScoresGm_[offset], copy, noPad);
    if (mode_ == pangu_moe::kGrap) AscendC::DataCopyPad(logits, logitsGm_[offset], copy, noPad);
    AscendC::PipeBarrier<PIPE_ALL>();  // the row loop reads the tiles with both scalar and vector ops
    for (int64_t i = 0; i < rows; ++i) {
      Row(first + i, i, scores, grad, logits, out);
    }
    AscendC::PipeBarrier<PIPE_ALL>();
    AscendC::DataCopyPad(dLogitsGm_[offset], out, copy);
    AscendC::PipeBarrier<PIPE_ALL>();  // the next tile may not overwrite the UB before the DMA has read it
  }

  __aicore__ inline void Row(int64_t token, int64_t i, AscendC::LocalTensor<float>& scores,
                             AscendC::LocalTensor<float>& grad, AscendC::LocalTensor<float>& logits,
                             AscendC::LocalTensor<float>& out) {
    AscendC::LocalTensor<float> scoreRow = scores[i * ePad_];
    AscendC::LocalTensor<float> gradRow = grad[i * ePad_];
    AscendC::LocalTensor<float> outRow = out[i * ePad_];
    const int64_t offset = static_cast<int64_t>(groupGm_.GetValue(token)) * expertsPerGroup_;
    const int64_t c0 = token * topK_;
    // The local ids index this row: an id outside [0, E_g) stops the kernel (never clamped).
    for (int64_t k = 0; k < topK_; ++k) {
      const int64_t local = expertGm_.GetValue(c0 + k) - offset;
      if (local < 0 || local >= expertsPerGroup_) AscendC::Trap();
    }
    if (mode_ == pangu_moe::kSoftmaxNormalize && topK_ > 1) {
      float chosenSum = 0.0f;
      float weighted = 0.0f;
      for (int64_t k = 0; k < topK_; ++k) {
        chosenSum += scoreRow.GetValue(expertGm_.GetValue(c0 + k) - offset);
        weighted += dGateGm_.GetValue(c0 + k) * gateGm_.GetValue(c0 + k);
      }
      for (int64_t k = 0; k < topK_; ++k) {
        const int64_t local = expertGm_.GetValue(c0 + k) - offset;
        gradRow.SetValue(local, gradRow.GetValue(local) + (dGateGm_.GetValue(c0 + k) - weighted) / chosenSum);
      }
    } else {
      for (int64_t k = 0; k < topK_; ++k) {
        const int64_t local = expertGm_.GetValue(c0 + k) - offset;
        gradRow.SetValue(local, gradRow.GetValue(local) + dGateGm_.GetValue(c0 + k));
      }
    }

    // Softmax backward on the row: out = s * (d - dot(d, s)).
    const int32_t n = static_cast<int32_t>(expertsPerGroup_);
    AscendC::LocalTensor<float> product = productBuf_.Get<float>();
    AscendC::LocalTensor<float> work = workBuf_.Get<float>();
    AscendC::LocalTensor<float> sum = sumBuf_.Get<float>();
    SyncVectorAfterScalar();         // the scalar updates of gradRow are visible to the vector unit
    AscendC::PipeBarrier<PIPE_V>();  // `product` is reused: order after the previous row's Mul
    AscendC::Mul(product, gradRow, scoreRow, n);
    AscendC::PipeBarrier<PIPE_V>();
    AscendC::ReduceSum(sum, product, work, n);
    SyncScalarAfterVector();
    const float dot = sum.GetValue(0);
    AscendC::Adds(product, gradRow, -dot, n);
    AscendC::PipeBarrier<PIPE_V>();
    AscendC::Mul(outRow, scoreRow, product, n);
    if (mode_ == pangu_moe::kGrap) {
      // relu'(logits) = (logits > 0); NaN and 0 give 0, as the CPU kernel's !(x > 0).
      AscendC::LocalTensor<float> logitRow = logits[i * ePad_];
      SyncScalarAfterVector();
      for (int64_t j = 0; j < expertsPerGroup_; ++j) {
        if (!(logitRow.GetValue(j) > 0.0f)) outRow.SetValue(j, 0.0f);
      }
    }
  }

  AscendC::TPipe pipe_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> scoresBuf_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> gradBuf_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> logitsBuf_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> outBuf_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> productBuf_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> workBuf_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> sumBuf_;
  AscendC::GlobalTensor<float> logitsGm_;
  AscendC::GlobalTensor<int32_t> groupGm_;
  AscendC::GlobalTensor<int32_t> optionsGm_;
  AscendC::GlobalTensor<float> scoresGm_;
  AscendC::GlobalTensor<int32_t> expertGm_;
  AscendC::GlobalTensor<float> gateGm_;
  AscendC::GlobalTensor<float> dScoresGm_;
  AscendC::GlobalTensor<float> dGateGm_;
  AscendC::GlobalTensor<float> dLogitsGm_;
  int64_t numTokens_ = 0;
  int64_t expertsPerGroup_ = 1;
  int64_t ePad_ = 8;
  int64_t topK_ = 1;
  int64_t mode_ = 0;
  int64_t rowsPerTile_ = 1;
};

}  // namespace

extern "C" __global__ __aicore__ void moe_gating_grad(GM_ADDR logits, GM_ADDR group_ids, GM_ADDR options,
                                                      GM_ADDR scores, GM_ADDR expert_index, GM_ADDR gate,
                                                      GM_ADDR d_scores, GM_ADDR d_gate, GM_ADDR d_logits,
                                                      GM_ADDR workspace, GM_ADDR tiling) {
  (void)workspace;
  // Vector-only kernel (no Cube instructions): launch on the AIV cores alone.
  KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_AIV_ONLY);
  GET_TILING_DATA(tilingData, tiling);
  MoeGatingGradKernel op;
  op.Init(logits, group_ids, options, scores, expert_index, gate, d_scores, d_gate, d_logits, tilingData.numTokens,
          tilingData.expertsPerGroup, tilingData.expertsPerGroupPad, tilingData.topK, tilingData.mode,
          tilingData.rowsPerTile, tilingData.reduceWorkElems);
  op.Process();
}
