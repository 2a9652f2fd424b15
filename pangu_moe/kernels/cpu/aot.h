// The MindSpore CPU AOT calling convention (kernels/README.md) and small helpers.
// params holds the inputs, then the outputs; a non-zero return makes MindSpore raise RuntimeError.
#ifndef PANGU_MOE_CPU_AOT_H_
#define PANGU_MOE_CPU_AOT_H_

#include <cstdint>

#include "../common/moe_kernel_common.h"

#define PANGU_MOE_AOT(name) \
  extern "C" int name(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream, \
                      void* extra)

namespace pangu_moe {

// Error codes returned to MindSpore (its message names the kernel and the code).
enum AotError : int { kOk = 0, kBadArity = 1, kBadShape = 2, kBadIndex = 3, kBadOption = 4 };

inline int64_t NumElements(int ndim, const int64_t* shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

// Elements copied before an OpenMP fork pays off (permute/unpermute; `pangu-moe bench kernels` measures
// 1 thread against the default).
constexpr int64_t kParallelElements = 1 << 16;

// OpenMP threads of the kernels' parallel loops (moe_runtime.cc). A library-wide setting rather than
// omp_set_num_threads, which would only reach the calling thread, not MindSpore's kernel threads.
int Threads();

}  // namespace pangu_moe

#endif  // PANGU_MOE_CPU_AOT_H_
