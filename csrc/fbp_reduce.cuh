// Deterministic reductions over one thread block, for the kernels that finish a
// joint-normalisation group (norm_dims > 1: the rows of a group are consecutive, so a
// group is one contiguous run of G * o outputs and G * n_tiles norm parts).
//
// Fixed order, so every launch gives the same bits: thread t takes elements t, t +
// kThreads, ... in order; each warp adds its 32 lanes by the xor butterfly; every thread
// then adds the kWarps warp totals in warp order.  The CPU mirror of the row
// norm (fbp_binding.cpp: combine_parts) reproduces exactly this order.
#pragma once

#include "fbp_launch.h"  // kGroupThreads
#include "fbp_math.cuh"

namespace fbp {

// Sum of v over the block, in the fixed order above; every thread gets the result.
// `scratch` holds kThreads / 32 values; the call begins with a barrier (no thread
// overwrites scratch while another still reads the previous call's), so a block may
// call it repeatedly with the same scratch.
template <int kThreads, typename Acc>
__device__ __forceinline__ Acc block_sum_fixed(Acc v, Acc* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  Acc total = Acc(0);
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  return total;
}

// Largest of e over the block (an integer max: order-free); every thread gets it.
template <int kThreads>
__device__ __forceinline__ int block_max(int e, int* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const int other = __shfl_xor_sync(0xffffffffu, e, offset);
    e = other > e ? other : e;
  }
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = e;
  __syncthreads();
  int best = scratch[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) best = scratch[w] > best ? scratch[w] : best;
  return best;
}

}  // namespace fbp
