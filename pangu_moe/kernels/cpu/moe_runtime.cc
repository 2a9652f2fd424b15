// Host-side entry points called through ctypes (not MindSpore): the OpenMP thread count, which
// `pangu-moe bench kernels` sets to measure whether threads pay off, and the shared tiling planner,
// which the tests check against the Ascend unified-buffer size.
#include <omp.h>

#include <atomic>
#include <cstdint>

#include "aot.h"

namespace {
std::atomic<int> g_threads{0};  // 0: every core OpenMP sees
}  // namespace

namespace pangu_moe {
int Threads() {
  const int threads = g_threads.load(std::memory_order_relaxed);
  return threads > 0 ? threads : omp_get_num_procs();
}
}  // namespace pangu_moe

// threads <= 0 restores the default (every core).
extern "C" void PanguMoeSetThreads(int threads) { g_threads.store(threads, std::memory_order_relaxed); }

extern "C" int PanguMoeThreads() { return pangu_moe::Threads(); }

// out: rows_per_tile, cols_per_tile, row_tiles, col_tiles, tile_bytes; returns 0 on success.
extern "C" int PanguMoePlanRowTiles(int64_t rows, int64_t row_elems, int64_t elem_bytes, int64_t ub_bytes,
                                    int64_t buffers, int64_t* out) {
  pangu_moe::RowTiling plan;
  if (!pangu_moe::PlanRowTiles(rows, row_elems, elem_bytes, ub_bytes, buffers, &plan)) return 1;
  out[0] = plan.rows_per_tile;
  out[1] = plan.cols_per_tile;
  out[2] = plan.row_tiles;
  out[3] = plan.col_tiles;
  out[4] = plan.tile_bytes;
  return 0;
}

extern "C" void PanguMoeSplitOverCores(int64_t items, int64_t cores, int64_t core, int64_t* out) {
  pangu_moe::SplitOverCores(items, cores, core, out, out + 1);
}
