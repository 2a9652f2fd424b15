// MoePermute (op_kernel): routed tokens into the send buffer.
//   in:  x [T, H] f32, flat_index [T*K] i32, capacity [C] i8 (carrier, unused here)
//   out: buffer [B, C, H] f32: row flat_index[t*K+k] = x[t]; every other row 0; the sink B*C is skipped
// Mirrors kernels/cpu/moe_permute.cc and the reference in pangu_moe/ops/permute.py.
// Never compiled or run (no CANN here).
//
// Two phases over all launched cores: each core zero-fills its share of the B*C rows, SyncAll, then
// each core copies its share of the tokens into their rows. The barrier is what makes "every other
// row 0" safe: without it a late zero-fill could overwrite a token another core already placed.
// Kept rows are distinct (contract), so the scatter phase has no write conflicts.
#include "kernel_operator.h"
// UNVERIFIED: that the device compiler accepts the <cstdint> this shared header includes.
#include "../../../common/moe_kernel_common.h"

namespace {

constexpr int32_t kQueueDepth = 2;  // double buffering: the next row is read while this one is written

class MoePermuteKernel {
 public:
  __aicore__ inline MoePermuteKernel() {}

  __aicore__ inline void Init(GM_ADDR x, GM_ADDR flatIndex, GM_ADDR buffer, int64_t numTokens, int64_t topK,
                              int64_t hidden, int64_t numRows, int64_t rowsPerTile, int64_t colsPerTile,
                              int64_t colTiles, int64_t tileBytes) {
    numTokens_ = numTokens;
    topK_ = topK;
    hidden_ = hidden;
    numRows_ = numRows;
    rowsPerTile_ = rowsPerTile;
    colsPerTile_ = colsPerTile;
    colTiles_ = colTiles;
    tileElems_ = tileBytes / static_cast<int64_t>(sizeof(float));
    xGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(x), numTokens * hidden);
    indexGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(flatIndex), numTokens * topK);
    bufferGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(buffer), numRows * hidden);
    pipe_.InitBuffer(moveQueue_, kQueueDepth, static_cast<uint32_t>(tileBytes));
    pipe_.InitBuffer(zeroBuf_, static_cast<uint32_t>(tileBytes));
  }

  __aicore__ inline void Process() {
    ZeroRows();
    // The zero tile's DMA writes must have left this core before the barrier releases the others.
    AscendC::PipeBarrier<PIPE_ALL>();
    AscendC::SyncAll();
    ScatterTokens();
  }

 private:
  __aicore__ inline void ZeroRows() {
    int64_t begin = 0;
    int64_t end = 0;
    pangu_moe::SplitOverCores(numRows_, AscendC::GetBlockNum(), AscendC::GetBlockIdx(), &begin, &end);
    if (begin >= end || hidden_ == 0) return;
    AscendC::LocalTensor<float> zero = zeroBuf_.Get<float>();
    AscendC::Duplicate(zero, 0.0f, static_cast<int32_t>(tileElems_));
    const event_t vectorDone = static_cast<event_t>(pipe_.FetchEventID(AscendC::HardEvent::V_MTE3));
    AscendC::SetFlag<AscendC::HardEvent::V_MTE3>(vectorDone);
    AscendC::WaitFlag<AscendC::HardEvent::V_MTE3>(vectorDone);
    if (colTiles_ == 1) {
      // Whole rows fit a tile and consecutive rows are contiguous in GM: one DMA per group of rows.
      for (int64_t row = begin; row < end; row += rowsPerTile_) {
        const int64_t rows = (end - row < rowsPerTile_) ? end - row : rowsPerTile_;
        const AscendC::DataCopyExtParams copy{1, static_cast<uint32_t>(rows * hidden_ * sizeof(float)), 0, 0, 0};
        AscendC::DataCopyPad(bufferGm_[row * hidden_], zero, copy);
      }
      return;
    }
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t c = 0; c < colTiles_; ++c) {
        const int64_t first = c * colsPerTile_;
        const int64_t cols = (hidden_ - first < colsPerTile_) ? hidden_ - first : colsPerTile_;
        const AscendC::DataCopyExtParams copy{1, static_cast<uint32_t>(cols * sizeof(float)), 0, 0, 0};
        AscendC::DataCopyPad(bufferGm_[row * hidden_ + first], zero, copy);
      }
    }
  }

  // Out-of-range rows stop the kernel (AscendC::Trap: MindSpore then raises on the launch) before any
  // of this token's data moves; indices are never clamped. row == numRows_ is the sink.
  __aicore__ inline void CheckRows(int64_t token) {
    for (int64_t k = 0; k < topK_; ++k) {
      const int64_t row = indexGm_.GetValue(token * topK_ + k);
      if (row < 0 || row > numRows_) AscendC::Trap();
    }
  }

  __aicore__ inline void ScatterTokens() {
    int64_t begin = 0;
    int64_t end = 0;
    pangu_moe::SplitOverCores(numTokens_, AscendC::GetBlockNum(), AscendC::GetBlockIdx(), &begin, &end);
    const AscendC::DataCopyPadExtParams<float> noPad{false, 0, 0, 0.0f};
    for (int64_t t = begin; t < end; ++t) {
      CheckRows(t);
      for (int64_t c = 0; c < colTiles_; ++c) {
        const int64_t first = c * colsPerTile_;
        const int64_t cols = (hidden_ - first < colsPerTile_) ? hidden_ - first : colsPerTile_;
        const AscendC::DataCopyExtParams copy{1, static_cast<uint32_t>(cols * sizeof(float)), 0, 0, 0};
        // Read the token's column block once and write it to each of its K rows: TQueBind lets the
        // DMA write straight from the VECIN buffer, with no vector copy in between.
        AscendC::LocalTensor<float> tile = moveQueue_.AllocTensor<float>();
        AscendC::DataCopyPad(tile, xGm_[t * hidden_ + first], copy, noPad);
        moveQueue_.EnQue(tile);
        tile = moveQueue_.DeQue<float>();
        for (int64_t k = 0; k < topK_; ++k) {
          const int64_t row = indexGm_.GetValue(t * topK_ + k);
          if (row == numRows_) continue;  // dropped choice: the sink receives nothing
          AscendC::DataCopyPad(bufferGm_[row * hidden_ + first], tile, copy);
        }
        moveQueue_.FreeTensor(tile);
      }
    }
  }

  AscendC::TPipe pipe_;
  AscendC::TQueBind<AscendC::TPosition::VECIN, AscendC::TPosition::VECOUT, kQueueDepth> moveQueue_;
  AscendC::TBuf<AscendC::TPosition::VECCALC> zeroBuf_;
  AscendC::GlobalTensor<float> xGm_;
  AscendC::GlobalTensor<int32_t> indexGm_;
  AscendC::GlobalTensor<float> bufferGm_;
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

extern "C" __global__ __aicore__ void moe_permute(GM_ADDR x, GM_ADDR flat_index, GM_ADDR capacity, GM_ADDR buffer,
                                                  GM_ADDR workspace, GM_ADDR tiling) {
  (void)capacity;  // C reached the host through the carrier's shape; the values are never read
  (void)workspace;
  // Vector-only kernel: launch on the AIV cores alone, which is also what SyncAll<isAIVOnly = true> expects.
  KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_AIV_ONLY);
  GET_TILING_DATA(tilingData, tiling);
  MoePermuteKernel op;
  op.Init(x, flat_index, buffer, tilingData.numTokens, tilingData.topK, tilingData.hidden, tilingData.numRows,
          tilingData.rowsPerTile, tilingData.colsPerTile, tilingData.colTiles, tilingData.tileBytes);
  op.Process();
}
