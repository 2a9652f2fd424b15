// MoeUnpermute (op_kernel): the gate-weighted sum of each token's buffer rows.
//   in:  buffer [B, C, H] f32, flat_index [T*K] i32, weight [T, K] f32
//   out: y [T, H] f32 = sum_k weight[t, k] * buffer row flat_index[t*K+k], in k order; the sink row B*C adds 0
// Mirrors kernels/cpu/moe_permute.cc (MoeUnpermute) and the reference in pangu_moe/ops/permute.py.
// Never compiled or run (no CANN here).
//
// Tokens are split over the cores (SplitOverCores); a core builds y[t] one column tile at a time:
// acc = 0, then for k in order acc += weight * row. The product is rounded before the add (Muls then
// Add, not a fused multiply-add), as the CPU kernel and the reference compute it.
#include "kernel_operator.h"
// UNVERIFIED: that the device compiler accepts the <cstdint> this shared header includes.
#include "../../../common/moe_kernel_common.h"

namespace {

constexpr int32_t kQueueDepth = 2;

class MoeUnpermuteKernel {
 public:
  __aicore__ inline MoeUnpermuteKernel() {}

  __aicore__ inline void Init(GM_ADDR buffer, GM_ADDR flatIndex, GM_ADDR weight, GM_ADDR y, int64_t numTokens,
                              int64_t topK, int64_t hidden, int64_t numRows, int64_t colsPerTile, int64_t colTiles,
                              int64_t tileBytes) {
    numTokens_ = numTokens;
    topK_ = topK;
    hidden_ = hidden;
    numRows_ = numRows;
    colsPerTile_ = colsPerTile;
    colTiles_ = colTiles;
    bufferGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(buffer), numRows * hidden);
    indexGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(flatIndex), numTokens * topK);
    weightGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(weight), numTokens * topK);
    yGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(y), numTokens * hidden);
    pipe_.InitBuffer(inQueue_, kQueueDepth, static_cast<uint32_t>(tileBytes));
    pipe_.InitBuffer(outQueue_, kQueueDepth, static_cast<uint32_t>(tileBytes));
    pipe_.InitBuffer(productBuf_, static_cast<uint32_t>(tileBytes));
  }

  __aicore__ inline void Process() {
    int64_t begin = 0;
    int64_t end = 0;
    pangu_moe::SplitOverCores(numTokens_, AscendC::GetBlockNum(), AscendC::GetBlockIdx(), &begin, &end);
    for (int64_t t = begin; t < end; ++t) {
      CheckRows(t);
      for (int64_t c = 0; c < colTiles_; ++c) {
        AccumulateTile(t, c);
      }
    }
  }

 private:
  // Out-of-range rows stop the kernel (never clamped); row == numRows_ is the sink.
  __aicore__ inline void CheckRows(int64_t token) {
    for (int64_t k = 0; k < topK_; ++k) {
      const int64_t row = indexGm_.GetValue(token * topK_ + k);
      if (row < 0 || row > numRows_) AscendC::Trap();
    }
  }

  __aicore__ inline void AccumulateTile(int64_t token, int64_t colTile) {
    const int64_t first = colTile * colsPerTile_;
    const int64_t cols64 = (hidden_ - first < colsPerTile_) ? hidden_ - first : colsPerTile_;
    const int32_t cols = static_cast<int32_t>(cols64);
    const AscendC::DataCopyExtParams copy{1, static_cast<uint32_t>(cols64 * sizeof(float)), 0, 0, 0};
    const AscendC::DataCopyPadExtParams<float> noPad{false, 0, 0, 0.0f};
    AscendC::LocalTensor<float> product = productBuf_.Get<float>();
    AscendC::LocalTensor<float> acc = outQueue_.AllocTensor<float>();
    AscendC::Duplicate(acc, 0.0f, cols);
    for (int64_t k = 0; k < topK_; ++k) {
      const int64_t row = indexGm_.GetValue(token * topK_ + k);
      if (row == numRows_) continue;  // the sink: a dropped choice adds nothing
      const float w = weightGm_.GetValue(token * topK_ + k);
      AscendC::LocalTensor<float> in = inQueue_.AllocTensor<float>();
      AscendC::DataCopyPad(in, bufferGm_[row * hidden_ + first], copy, noPad);
      inQueue_.EnQue(in);
      in = inQueue_.DeQue<float>();
      AscendC::Muls(product, in, w, cols);
      AscendC::PipeBarrier<PIPE_V>();
      AscendC::Add(acc, acc, product, cols);
      // The next choice's Muls rewrites `product`: keep it behind this Add.
      AscendC::PipeBarrier<PIPE_V>();
      inQueue_.FreeTensor(in);
    }
    outQueue_.EnQue(acc);
    acc = outQueue_.DeQue<float>();
    AscendC::DataCopyPad(yGm_[token * hidden_ + first], acc, copy);
    outQueue_.FreeTensor(acc);
  }

  AscendC::TPipe pipe_;
  AscendC::TQue<AscendC::TPosition::VECIN, kQueueDepth> inQueue_;
  AscendC::TQue<AscendC::TPosition::VECOUT, kQueueDepth> outQueue_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> productBuf_;
  AscendC::GlobalTensor<float> bufferGm_;
  AscendC::GlobalTensor<int32_t> indexGm_;
  AscendC::GlobalTensor<float> weightGm_;
  AscendC::GlobalTensor<float> yGm_;
  int64_t numTokens_ = 0;
  int64_t topK_ = 0;
  int64_t hidden_ = 0;
  int64_t numRows_ = 0;
  int64_t colsPerTile_ = 0;
  int64_t colTiles_ = 0;
};

}  // namespace

extern "C" __global__ __aicore__ void moe_unpermute(GM_ADDR buffer, GM_ADDR flat_index, GM_ADDR weight, GM_ADDR y,
                                                    GM_ADDR workspace, GM_ADDR tiling) {
  (void)workspace;
  // Vector-only kernel (no Cube instructions): launch on the AIV cores alone.
  KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_AIV_ONLY);
  GET_TILING_DATA(tilingData, tiling);
  MoeUnpermuteKernel op;
  op.Init(buffer, flat_index, weight, y, tilingData.numTokens, tilingData.topK, tilingData.hidden,
          tilingData.numRows, tilingData.colsPerTile, tilingData.colTiles, tilingData.tileBytes);
  op.Process();
}
