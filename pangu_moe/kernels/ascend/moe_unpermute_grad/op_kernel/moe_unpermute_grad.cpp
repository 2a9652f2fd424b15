// MoeUnpermuteGrad (op_kernel): the backward of MoeUnpermute.
//   in:  buffer [B, C, H] f32, flat_index [T*K] i32, weight [T, K] f32, d_y [T, H] f32
//   out: d_buffer [B, C, H] f32: row flat_index[t*K+k] = weight[t, k] * d_y[t], every other row 0
//        d_weight [T, K] f32: dot(buffer row flat_index[t*K+k], d_y[t]); 0 for the sink row B*C
// Mirrors kernels/cpu/moe_permute.cc (MoeUnpermuteGrad) and the reference in pangu_moe/ops/permute.py.
// Never compiled or run (no CANN here).
//
// Same two phases as MoePermute: every core zero-fills its share of the B*C rows, SyncAll, then each
// core handles its share of the tokens (kept rows are distinct, so no two cores write one row).
// The dot product is a ReduceSum per column tile, added up over the tiles in order: float, as the CPU
// kernel's, which adds in h order, so the two differ in the last bits.
#include "kernel_operator.h"
// UNVERIFIED: that the device compiler accepts the <cstdint> this shared header includes.
#include "../../../common/moe_kernel_common.h"

namespace {

constexpr int32_t kQueueDepth = 2;

class MoeUnpermuteGradKernel {
 public:
  __aicore__ inline MoeUnpermuteGradKernel() {}

  __aicore__ inline void Init(GM_ADDR buffer, GM_ADDR flatIndex, GM_ADDR weight, GM_ADDR dY, GM_ADDR dBuffer,
                              GM_ADDR dWeight, int64_t numTokens, int64_t topK, int64_t hidden, int64_t numRows,
                              int64_t rowsPerTile, int64_t colsPerTile, int64_t colTiles, int64_t tileBytes,
                              int64_t reduceWorkElems, int64_t topKPad) {
    numTokens_ = numTokens;
    topK_ = topK;
    hidden_ = hidden;
    numRows_ = numRows;
    rowsPerTile_ = rowsPerTile;
    colsPerTile_ = colsPerTile;
    colTiles_ = colTiles;
    tileElems_ = tileBytes / static_cast<int64_t>(sizeof(float));
    bufferGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(buffer), numRows * hidden);
    indexGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(flatIndex), numTokens * topK);
    weightGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(weight), numTokens * topK);
    dyGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(dY), numTokens * hidden);
    dBufferGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(dBuffer), numRows * hidden);
    dWeightGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(dWeight), numTokens * topK);
    pipe_.InitBuffer(dyQueue_, kQueueDepth, static_cast<uint32_t>(tileBytes));
    pipe_.InitBuffer(rowQueue_, kQueueDepth, static_cast<uint32_t>(tileBytes));
    pipe_.InitBuffer(outQueue_, kQueueDepth, static_cast<uint32_t>(tileBytes));
    pipe_.InitBuffer(scratchBuf_, static_cast<uint32_t>(tileBytes));
    pipe_.InitBuffer(workBuf_, static_cast<uint32_t>(reduceWorkElems * sizeof(float)));
    pipe_.InitBuffer(sumBuf_, 32);
    pipe_.InitBuffer(dWeightBuf_, static_cast<uint32_t>(topKPad * sizeof(float)));
  }

  __aicore__ inline void Process() {
    ZeroRows();
    AscendC::PipeBarrier<PIPE_ALL>();
    AscendC::SyncAll();
    int64_t begin = 0;
    int64_t end = 0;
    pangu_moe::SplitOverCores(numTokens_, AscendC::GetBlockNum(), AscendC::GetBlockIdx(), &begin, &end);
    for (int64_t t = begin; t < end; ++t) {
      Token(t);
    }
  }

 private:
  __aicore__ inline void SyncScalarAfterVector() {
    const event_t id = static_cast<event_t>(pipe_.FetchEventID(AscendC::HardEvent::V_S));
    AscendC::SetFlag<AscendC::HardEvent::V_S>(id);
    AscendC::WaitFlag<AscendC::HardEvent::V_S>(id);
  }

  __aicore__ inline void ZeroRows() {
    int64_t begin = 0;
    int64_t end = 0;
    pangu_moe::SplitOverCores(numRows_, AscendC::GetBlockNum(), AscendC::GetBlockIdx(), &begin, &end);
    if (begin >= end || hidden_ == 0) return;
    AscendC::LocalTensor<float> zero = scratchBuf_.Get<float>();
    AscendC::Duplicate(zero, 0.0f, static_cast<int32_t>(tileElems_));
    const event_t vectorDone = static_cast<event_t>(pipe_.FetchEventID(AscendC::HardEvent::V_MTE3));
    AscendC::SetFlag<AscendC::HardEvent::V_MTE3>(vectorDone);
    AscendC::WaitFlag<AscendC::HardEvent::V_MTE3>(vectorDone);
    if (colTiles_ == 1) {
      for (int64_t row = begin; row < end; row += rowsPerTile_) {
        const int64_t rows = (end - row < rowsPerTile_) ? end - row : rowsPerTile_;
        const AscendC::DataCopyExtParams copy{1, static_cast<uint32_t>(rows * hidden_ * sizeof(float)), 0, 0, 0};
        AscendC::DataCopyPad(dBufferGm_[row * hidden_], zero, copy);
      }
      return;
    }
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t c = 0; c < colTiles_; ++c) {
        const int64_t first = c * colsPerTile_;
        const int64_t cols = (hidden_ - first < colsPerTile_) ? hidden_ - first : colsPerTile_;
        const AscendC::DataCopyExtParams copy{1, static_cast<uint32_t>(cols * sizeof(float)), 0, 0, 0};
        AscendC::DataCopyPad(dBufferGm_[row * hidden_ + first], zero, copy);
      }
    }
  }

  __aicore__ inline void Token(int64_t token) {
    // Out-of-range rows stop the kernel before this token writes anything (never clamped).
    for (int64_t k = 0; k < topK_; ++k) {
      const int64_t row = indexGm_.GetValue(token * topK_ + k);
      if (row < 0 || row > numRows_) AscendC::Trap();
    }
    AscendC::LocalTensor<float> dWeight = dWeightBuf_.Get<float>();
    for (int64_t k = 0; k < topK_; ++k) dWeight.SetValue(k, 0.0f);  // the sink keeps 0
    for (int64_t c = 0; c < colTiles_; ++c) {
      ColumnTile(token, c, dWeight);
    }
    // d_weight leaves through the DMA, not scalar GM stores: a scalar store goes through this core's
    // data cache, whose write-back could clobber a neighbouring core's d_weight in the same cache line.
    AscendC::PipeBarrier<PIPE_ALL>();
    const AscendC::DataCopyExtParams copy{1, static_cast<uint32_t>(topK_ * sizeof(float)), 0, 0, 0};
    if (topK_ > 0) AscendC::DataCopyPad(dWeightGm_[token * topK_], dWeight, copy);
    // The next token's scalar zeroing must wait until the DMA has read this token's values.
    AscendC::PipeBarrier<PIPE_ALL>();
  }

  __aicore__ inline void ColumnTile(int64_t token, int64_t colTile, AscendC::LocalTensor<float>& dWeight) {
    const int64_t first = colTile * colsPerTile_;
    const int64_t cols64 = (hidden_ - first < colsPerTile_) ? hidden_ - first : colsPerTile_;
    const int32_t cols = static_cast<int32_t>(cols64);
    const AscendC::DataCopyExtParams copy{1, static_cast<uint32_t>(cols64 * sizeof(float)), 0, 0, 0};
    const AscendC::DataCopyPadExtParams<float> noPad{false, 0, 0, 0.0f};
    AscendC::LocalTensor<float> product = scratchBuf_.Get<float>();
    AscendC::LocalTensor<float> work = workBuf_.Get<float>();
    AscendC::LocalTensor<float> sum = sumBuf_.Get<float>();

    AscendC::LocalTensor<float> dy = dyQueue_.AllocTensor<float>();
    AscendC::DataCopyPad(dy, dyGm_[token * hidden_ + first], copy, noPad);
    dyQueue_.EnQue(dy);
    dy = dyQueue_.DeQue<float>();
    for (int64_t k = 0; k < topK_; ++k) {
      const int64_t row = indexGm_.GetValue(token * topK_ + k);
      if (row == numRows_) continue;  // the sink: no gradient row, d_weight stays 0
      const float w = weightGm_.GetValue(token * topK_ + k);

      AscendC::LocalTensor<float> rowIn = rowQueue_.AllocTensor<float>();
      AscendC::DataCopyPad(rowIn, bufferGm_[row * hidden_ + first], copy, noPad);
      rowQueue_.EnQue(rowIn);
      rowIn = rowQueue_.DeQue<float>();

      AscendC::LocalTensor<float> out = outQueue_.AllocTensor<float>();
      AscendC::Muls(out, dy, w, cols);
      outQueue_.EnQue(out);

      // `product` and `sum` are reused per choice: order this Mul after the previous ReduceSum.
      AscendC::PipeBarrier<PIPE_V>();
      AscendC::Mul(product, rowIn, dy, cols);
      AscendC::PipeBarrier<PIPE_V>();
      AscendC::ReduceSum(sum, product, work, cols);
      rowQueue_.FreeTensor(rowIn);
      SyncScalarAfterVector();
      dWeight.SetValue(k, dWeight.GetValue(k) + sum.GetValue(0));

      out = outQueue_.DeQue<float>();
      AscendC::DataCopyPad(dBufferGm_[row * hidden_ + first], out, copy);
      outQueue_.FreeTensor(out);
    }
    dyQueue_.FreeTensor(dy);
  }

  AscendC::TPipe pipe_;
  AscendC::TQue<AscendC::TPosition::VECIN, kQueueDepth> dyQueue_;
  AscendC::TQue<AscendC::TPosition::VECIN, kQueueDepth> rowQueue_;
  AscendC::TQue<AscendC::TPosition::VECOUT, kQueueDepth> outQueue_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> scratchBuf_;  // zero tile, then the row * d_y products
  AscendC::TBuf<AscendC::TPosition::VECCALC> workBuf_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> sumBuf_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> dWeightBuf_;
  AscendC::GlobalTensor<float> bufferGm_;
  AscendC::GlobalTensor<int32_t> indexGm_;
  AscendC::GlobalTensor<float> weightGm_;
  AscendC::GlobalTensor<float> dyGm_;
  AscendC::GlobalTensor<float> dBufferGm_;
  AscendC::GlobalTensor<float> dWeightGm_;
  int64_t numTokens_ = 0;
  int64_t topK_ = 0;
  int64_t hidden_ = 0;
  int64_t numRows_ = 0;
  int64_t rowsPerTile_ = 1;
  int64_t colsPerTile_ = 0;
  int64_t colTiles_ = 0;
  int64_t tileElems_ = 0;
};

}  // namespace

extern "C" __global__ __aicore__ void moe_unpermute_grad(GM_ADDR buffer, GM_ADDR flat_index, GM_ADDR weight,
                                                         GM_ADDR d_y, GM_ADDR d_buffer, GM_ADDR d_weight,
                                                         GM_ADDR workspace, GM_ADDR tiling) {
  (void)workspace;
  // Vector-only kernel: launch on the AIV cores alone, which is also what SyncAll<isAIVOnly = true> expects.
  KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_AIV_ONLY);
  GET_TILING_DATA(tilingData, tiling);
  MoeUnpermuteGradKernel op;
  op.Init(buffer, flat_index, weight, d_y, d_buffer, d_weight, tilingData.numTokens, tilingData.topK,
          tilingData.hidden, tilingData.numRows, tilingData.rowsPerTile, tilingData.colsPerTile,
          tilingData.colTiles, tilingData.tileBytes, tilingData.reduceWorkElems, tilingData.topKPad);
  op.Process();
}
