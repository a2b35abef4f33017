// The CUDA self-test with the kernels' own source run on a CPU emulation of CUDA
// (cuda_emulation.h), for machines without a GPU: CMake target atpatch_cuda_selftest_emulated.
#define ATPATCH_CUDA_EMULATION 1
#include "cuda_kernel.cu"    // NOLINT(bugprone-suspicious-include): the device code under test
#include "cuda_fused.cu"     // NOLINT(bugprone-suspicious-include)
#include "cuda_selftest.cu"  // NOLINT(bugprone-suspicious-include)
