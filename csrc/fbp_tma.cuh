// Hopper (sm_90a) building blocks of WgmmaEngine (fbp_tile.cuh): TMA tensor maps
// (encoded on the host), mbarriers, bulk tensor copies and wgmma, as inline PTX.
//
// CUTLASS/CuTe is not on the GPU machines (no network), so these are the few PTX
// instructions the engine needs, each wrapped once.  Everything device-side compiles
// to nothing unless the target is sm_90a (`__CUDA_ARCH_FEAT_SM90_ALL`): wgmma does not
// exist for plain sm_90, and the engine's body traps there (the binding never chooses
// it then: wgmma_built(), fbp_launch.h).
//
// Layout contract between the two halves (PTX ISA, "Tensor copy", "Matrix descriptor"):
// a tensor map with a box of {64 elements along K, 128 rows} and 128-byte swizzling
// writes row r of the box to bytes [128 r, 128 r + 128) of a 1024-byte-aligned stage,
// its 16-byte chunk j at chunk j ^ (r % 8).  That is the canonical K-major SW128 layout
// wgmma reads through a shared-memory descriptor with stride-dimension offset 1024
// (eight rows of 128 bytes), swizzle mode 1 and the leading-dimension offset unused;
// the k-th 16-element step of a 64-wide k-tile starts 32 k bytes further.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda.h>  // CUtensorMap and its enums (types only: the encoder comes from the driver)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>

#include "fbp_launch.h"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FBP_WGMMA 1
#else
#define FBP_WGMMA 0
#endif

namespace fbp {

// The four operand maps of a fused kernel (x, W_x, y, W_y), passed by value in the
// kernel's __grid_constant__ parameters: bulk tensor copies read a map from parameter
// space, and a CUDA graph captures it with the launch (no device state to go stale).
// Unused (zeroed) for the other engines and for a side whose projection is given.
struct TmaMaps {
  CUtensorMap x, wx, y, wy;
};
static_assert(alignof(TmaMaps) >= 64, "bulk tensor copies read 64-byte-aligned maps");

// Box of every operand map: 64 elements (128 bytes, one swizzle span) along K times 128
// rows: one operand's k-tile of WgmmaEngine.
constexpr int kTmaBoxK = 64;
constexpr int kTmaBoxRows = 128;

// Host: encode the map of a (rows, cols) operand, K = cols contiguous (tma_operand_ok,
// fbp_launch.h).  cudaErrorNotSupported when the driver has no cuTensorMapEncodeTiled.
cudaError_t encode_operand_map(const MatrixArg& m, DType dtype, CUtensorMap* map);

// The operand maps of engine E's fused kernels: the sides a GEMM reads (gemm_x, gemm_y)
// for the TMA engine, zero otherwise.
template <class E>
cudaError_t operand_maps(DType dtype, const MatrixArg& x, const MatrixArg& wx, bool gemm_x,
                         const MatrixArg& y, const MatrixArg& wy, bool gemm_y, TmaMaps* maps) {
  std::memset(maps, 0, sizeof(TmaMaps));
  if constexpr (E::kTma) {
    cudaError_t err = cudaSuccess;
    if (gemm_x && err == cudaSuccess) err = encode_operand_map(x, dtype, &maps->x);
    if (gemm_x && err == cudaSuccess) err = encode_operand_map(wx, dtype, &maps->wx);
    if (gemm_y && err == cudaSuccess) err = encode_operand_map(y, dtype, &maps->y);
    if (gemm_y && err == cudaSuccess) err = encode_operand_map(wy, dtype, &maps->wy);
    return err;
  }
  return cudaSuccess;
}

// ------------------------------------------------------------------ device PTX wrappers
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Generic-proxy writes to shared memory (this thread's) ordered before later async-proxy
// accesses (bulk copies into the same bytes) once a barrier has been passed.
__device__ __forceinline__ void fence_proxy_async() {
#if FBP_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, unsigned count) {
#if FBP_WGMMA
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count)
               : "memory");
#endif
}

__device__ __forceinline__ void mbarrier_inval(uint64_t* bar) {
#if FBP_WGMMA
  asm volatile("mbarrier.inval.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar)) : "memory");
#endif
}

// Makes mbarrier.init visible to the async proxy (and, after a barrier, to other threads).
__device__ __forceinline__ void fence_mbarrier_init() {
#if FBP_WGMMA
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// One arrival that also expects `bytes` of bulk-copy transactions in the current phase.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, unsigned bytes) {
#if FBP_WGMMA
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
#endif
}

// Blocks until the phase of parity `parity` of `bar` has completed.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, unsigned parity) {
#if FBP_WGMMA
  const uint32_t addr = smem_addr(bar);
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n"
        " mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  } while (!done);
  __syncwarp();  // reconverge before the .aligned wgmma instructions that follow
#endif
}

// The box of `map` at (k0 along K, row0) into shared memory `dst` (1024-byte aligned),
// completing `bytes` (the whole box: rows and columns outside the tensor are written as
// zero and still counted) on `bar`.  Coordinates are 32-bit: the binding keeps rows and
// K below 2^31 for this engine.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int k0, int row0,
                                            uint64_t* bar) {
#if FBP_WGMMA
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(k0), "r"(row0), "r"(smem_addr(bar))
      : "memory");
#endif
}

// wgmma shared-memory matrix descriptor of a K-major, 128-byte-swizzled operand
// starting at shared address `addr` (see the layout contract above).
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t addr) {
  uint64_t d = 0;
  d |= static_cast<uint64_t>((addr & 0x3FFFF) >> 4);  // bits 0-13: start address / 16
  d |= static_cast<uint64_t>(16 >> 4) << 16;          // leading-dim offset (unused: SW128 K-major)
  d |= static_cast<uint64_t>(1024 >> 4) << 32;        // stride-dim offset: 8 rows x 128 B
  d |= static_cast<uint64_t>(1) << 62;                // swizzle mode 1: 128 bytes
  return d;
}

__device__ __forceinline__ void wgmma_fence() {
#if FBP_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if FBP_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if FBP_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// Keeps the compiler from moving accesses of the accumulator registers across the
// asynchronous wgmma instructions that own them.
__device__ __forceinline__ void wgmma_fence_operand(float& r) {
  asm volatile("" : "+f"(r)::"memory");
}

// d (64 x 128 fp32, the m64n128 fragment: 64 registers per thread of the warpgroup)
// += A (64 x 16, descriptor) B (16 x 128, descriptor), both K-major.
#define FBP_WGMMA_OPERANDS                                                                   \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "   \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "    \
  "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "    \
  "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, 1, 1, 1, 0, 0;\n"
#define FBP_WGMMA_D(d)                                                                       \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),        \
      "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),             \
      "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),          \
      "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),          \
      "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),          \
      "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),          \
      "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),          \
      "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),          \
      "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]),          \
      "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]),          \
      "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// The immediate operands (scale-d 1: accumulate; scale-a/b 1; no transposes) are the
// trailing "1, 1, 1, 0, 0" of FBP_WGMMA_OPERANDS; d starts zeroed by the caller.
template <typename T>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b);

template <>
__device__ __forceinline__ void wgmma_m64n128k16<__nv_bfloat16>(float (&d)[64], uint64_t desc_a,
                                                                uint64_t desc_b) {
#if FBP_WGMMA
  asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " FBP_WGMMA_OPERANDS
               : FBP_WGMMA_D(d)
               : "l"(desc_a), "l"(desc_b));
#endif
}
template <>
__device__ __forceinline__ void wgmma_m64n128k16<__half>(float (&d)[64], uint64_t desc_a,
                                                         uint64_t desc_b) {
#if FBP_WGMMA
  asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " FBP_WGMMA_OPERANDS
               : FBP_WGMMA_D(d)
               : "l"(desc_a), "l"(desc_b));
#endif
}
#undef FBP_WGMMA_D
#undef FBP_WGMMA_OPERANDS

}  // namespace fbp
