// Shared-memory GEMM tiles used by both the forward and the backward kernel.
//
// Each engine computes, for one thread block,
//     out[r][c] = sum_k A[row0 + r, k] * W[col0 + c, k]     r < BM, c < BN
// i.e. one (BM, BN) tile of the projection A W^T (nn.Linear layout, W is
// (K, kdim)), accumulated in Acc and written to a shared-memory tile with leading
// dimension kLdOut.  Rows/columns outside the matrices read as zero.  Inputs are
// read through explicit strides, so non-contiguous x, y and weights need no copy.
//
//   FmaEngine<T, Acc, BM, BN>: CUDA-core FMA, 256 threads, each thread owns a
//     (BM/16, BN/16) register micro-tile; float and double; padded k-major staging
//     (no shared-memory bank conflicts, see the bank map in the struct).
//   WmmaEngine<T>: tensor cores through nvcuda::wmma (16x16x16, fp32 accumulate),
//     128 threads = 2x2 warps of 32x32; half and bfloat16; synchronous staging.
//   WmmaAsyncEngine<T>: the same tile fed by a 3-stage cp.async pipeline, fragments by
//     ldmatrix into mma.sync (sm_80+, 16-byte-aligned operands contiguous along K; never
//     run yet).
//   WmmaWideEngine<T>: a 128x128x32 tile, 256 threads, 4-stage cp.async pipeline, for
//     GPUs with >= 149 KiB of shared memory per block (sm_80, sm_90); never run yet.
//   WgmmaEngine<T>: Hopper's 128x128x64 tile, two warpgroups of wgmma fed by TMA bulk
//     tensor copies through a 4-stage mbarrier ring (sm_90a, half and bfloat16; never
//     run yet).  It reads its operands through tensor maps (gemm_tma), not Matrix.
//
// The caller provides `in_smem` (kInputBytes) for the staged input tiles; the
// output tile may alias it (the K loop ends with a barrier before the store).
// Output rows are 16-byte aligned (kLdOut % 4 == 0): the epilogues read four
// consecutive columns per thread as one vector (load4/store4 below).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "fbp_launch.h"
#include "fbp_tma.cuh"

#include <cstdint>
#include <type_traits>

namespace fbp {

// ----------------------------------------------------------------- conversions
template <typename Acc, typename T>
__device__ __forceinline__ Acc to_acc(T v) { return static_cast<Acc>(v); }
template <>
__device__ __forceinline__ float to_acc<float, __half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T, typename Acc>
__device__ __forceinline__ T from_acc(Acc v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

// Accumulation type: fp64 stays fp64, everything else accumulates in fp32.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// A 2-D operand read through strides (elements, not bytes); int64 offsets.
template <typename T>
struct Matrix {
  const T* ptr;
  int64_t rows;
  int64_t cols;
  int64_t stride_row;
  int64_t stride_col;
  __device__ __forceinline__ T at(int64_t r, int64_t c) const {
    return ptr[r * stride_row + c * stride_col];
  }
};

// Host side: the typed view of a launch argument.
template <typename T>
Matrix<T> as_matrix(const MatrixArg& m) {
  return Matrix<T>{static_cast<const T*>(m.ptr), m.rows, m.cols, m.stride_row, m.stride_col};
}

constexpr int round_up(int v, int to) { return (v + to - 1) / to * to; }

// ----------------------------------------------------------------- FMA engine
template <typename T, typename AccT, int BM_, int BN_>
struct FmaEngine {
  using Acc = AccT;
  static constexpr int BM = BM_, BN = BN_, BK = 16;
  static constexpr bool kTma = false;   // operands read through Matrix (gemm)
  static constexpr int kStages = 1;     // synchronous staging
  static constexpr int kThreads = 256;  // 16 x 16 threads
  static constexpr int TM = BM / 16, TN = BN / 16;
  // Staged tiles are k-major ([BK][BM + kPad], [BK][BN + kPad]) so that the inner
  // product reads a row of As (broadcast) and 16 consecutive words of Ws.  The store
  // walks k fastest (the contiguous direction of x and W in global memory): lane l of
  // a warp writes (r, kk) = (r0 + l / 16, l % 16) at word kk * ld + r.  Unpadded
  // (ld = 64) that is bank r for all 16 lanes of a row: a 16-way conflict.
  //   fp32 (4-byte words, 32 banks), kPad = 2, ld = 66: bank (2 kk + r) % 32, i.e.
  //     lanes 0-15 hit banks r0 + 0, 2, ..., 30 and lanes 16-31 banks r0 + 1, 3, ..., 31:
  //     all 32 lanes on distinct banks, conflict-free.
  //   fp64 (8-byte words, one half-warp per shared-memory wavefront, 16 double-wide
  //     banks), kPad = 1, ld = 33 / 65: lane l of a half-warp hits bank (kk * ld + r) % 16
  //     = (kk + r) % 16 with kk = l: 16 distinct banks, conflict-free.
  static constexpr int kPad = sizeof(Acc) == 4 ? 2 : 1;
  static constexpr int kLdA = BM + kPad, kLdW = BN + kPad;
  // Output tile [BM][BN + 4]: rows 16-byte aligned so the epilogue reads four
  // consecutive columns as one vector (float4 / 2 x double2).
  static constexpr int kLdOut = BN + 4;
  static constexpr int kInputBytes = (BK * kLdA + BK * kLdW) * int(sizeof(Acc));
  static_assert(BM % 16 == 0 && BN % 16 == 0, "tile sides must be multiples of 16");

  // out = A[row0:row0+BM, :] @ W[col0:col0+BN, :]^T, over the shared inner size.
  __device__ static void gemm(const Matrix<T>& A, int64_t row0, const Matrix<T>& W,
                              int64_t col0, unsigned char* in_smem, Acc* out) {
    Acc* As = reinterpret_cast<Acc*>(in_smem);  // [BK][kLdA], k-major: row reads broadcast
    Acc* Ws = As + BK * kLdA;                   // [BK][kLdW]
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int64_t kdim = A.cols;
    Acc acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = Acc(0);

    for (int64_t k0 = 0; k0 < kdim; k0 += BK) {
      // Consecutive threads walk k, the contiguous direction of x and W (banks: above).
      for (int e = tid; e < BM * BK; e += kThreads) {
        const int r = e / BK, kk = e % BK;
        const int64_t gr = row0 + r, gk = k0 + kk;
        As[kk * kLdA + r] = (gr < A.rows && gk < kdim) ? to_acc<Acc>(A.at(gr, gk)) : Acc(0);
      }
      for (int e = tid; e < BN * BK; e += kThreads) {
        const int c = e / BK, kk = e % BK;
        const int64_t gc = col0 + c, gk = k0 + kk;
        Ws[kk * kLdW + c] = (gc < W.rows && gk < kdim) ? to_acc<Acc>(W.at(gc, gk)) : Acc(0);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        Acc av[TM], wv[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) av[i] = As[kk * kLdA + ty + 16 * i];
#pragma unroll
        for (int j = 0; j < TN; ++j) wv[j] = Ws[kk * kLdW + tx + 16 * j];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] = fma(av[i], wv[j], acc[i][j]);
      }
      __syncthreads();  // before the next stage (or the aliasing store) overwrites
    }
    // fp32: lanes (tx, ty0 / ty0 + 1) hit banks (4 ty + tx) % 32: 2-way, once per tile.
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) out[(ty + 16 * i) * kLdOut + tx + 16 * j] = acc[i][j];
  }
};

// ----------------------------------------------------------------- WMMA engine
// bfloat16 WMMA needs sm_80, half needs sm_70; the host refuses to launch on
// older GPUs, and the body compiles to a trap for such architectures.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
#define FBP_WMMA_HALF 0
#else
#define FBP_WMMA_HALF 1
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FBP_WMMA_BF16 0
#else
#define FBP_WMMA_BF16 1
#endif

template <typename T> struct WmmaSupported { static constexpr bool value = FBP_WMMA_HALF; };
template <> struct WmmaSupported<__nv_bfloat16> { static constexpr bool value = FBP_WMMA_BF16; };

template <typename T>
struct WmmaEngine {
  using Acc = float;
  static constexpr int BM = 64, BN = 64, BK = 32;
  static constexpr bool kTma = false;
  static constexpr int kStages = 1;      // synchronous: load, barrier, compute, barrier
  static constexpr int kThreads = 128;  // 4 warps, 2 x 2, each 32 x 32
  static constexpr int kLdIn = BK + 8;   // multiple of 8 halves (wmma), staggers banks
  static constexpr int kLdOut = BN + 4;  // multiple of 4 floats (wmma store)
  static constexpr int kInputBytes = (BM + BN) * kLdIn * int(sizeof(T));

  __device__ static void gemm(const Matrix<T>& A, int64_t row0, const Matrix<T>& W,
                              int64_t col0, unsigned char* in_smem, Acc* out) {
    if constexpr (!WmmaSupported<T>::value) {
      __trap();
    } else {
      using namespace nvcuda;
      T* As = reinterpret_cast<T*>(in_smem);  // [BM][kLdIn], row-major A tile
      T* Ws = As + BM * kLdIn;                // [BN][kLdIn]: B = W^T, column-major
      const int tid = threadIdx.x, warp = tid / 32;
      const int wr = warp / 2, wc = warp % 2;
      const int64_t kdim = A.cols;
      const T zero = from_acc<T>(0.0f);
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

      for (int64_t k0 = 0; k0 < kdim; k0 += BK) {
        for (int e = tid; e < BM * BK; e += kThreads) {
          const int r = e / BK, kk = e % BK;
          const int64_t gr = row0 + r, gk = k0 + kk;
          As[r * kLdIn + kk] = (gr < A.rows && gk < kdim) ? A.at(gr, gk) : zero;
        }
        for (int e = tid; e < BN * BK; e += kThreads) {
          const int c = e / BK, kk = e % BK;
          const int64_t gc = col0 + c, gk = k0 + kk;
          Ws[c * kLdIn + kk] = (gc < W.rows && gk < kdim) ? W.at(gc, gk) : zero;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
          for (int i = 0; i < 2; ++i)
            wmma::load_matrix_sync(fa[i], As + (wr * 32 + i * 16) * kLdIn + kk, kLdIn);
#pragma unroll
          for (int j = 0; j < 2; ++j)
            wmma::load_matrix_sync(fb[j], Ws + (wc * 32 + j * 16) * kLdIn + kk, kLdIn);
#pragma unroll
          for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        __syncthreads();
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
          wmma::store_matrix_sync(out + (wr * 32 + i * 16) * kLdOut + wc * 32 + j * 16,
                                  acc[i][j], kLdOut, wmma::mem_row_major);
    }
  }
};

// ----------------------------------------------------------------- cp.async engines
// WMMA tiles fed by a multi-stage cp.async pipeline: 16-byte cp.async.cg.shared.global
// copies (8 halves), one commit group per k-tile, kStages - 1 k-tiles in flight while
// one is multiplied, one barrier per k-step.
// Requires (checked on the host, fbp_launch.h: cp_async_operand_ok) operands
// contiguous along K with 16-byte-aligned rows (base pointer and row stride); the
// K tail and rows/columns outside the matrices are zero-filled by cp.async's
// src-size operand.  sm_80+ (the body traps below; the host never launches it there).
//
// NEVER RUN: compiled for sm_80 and sm_90 (cuda_compile reports LDGSTS + HMMA), but no
// GPU has executed it yet.  FBP_CUDA_STAGING=sync selects WmmaEngine instead.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FBP_CP_ASYNC 0
#else
#define FBP_CP_ASYNC 1
#endif

// dst (shared) <- src_bytes bytes at src (global), zero-filled up to 16 bytes.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
#if FBP_CP_ASYNC
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
               "r"(src_bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if FBP_CP_ASYNC
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Wait until at most N of this thread's commit groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if FBP_CP_ASYNC
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Four 8x8 matrices of 16-bit elements from shared memory (ldmatrix.x4): lane l gives
// the address of row l % 8 of matrix l / 8 (16 bytes, 16-byte aligned) and receives one
// 32-bit register (two elements) of each matrix in mma's fragment order.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if FBP_CP_ASYNC
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
#endif
}

// d += A (16 x 16, row-major fragment a) B (16 x 8, column-major fragment b0, b1), fp32
// accumulate: the instruction nvcuda::wmma's 16x16x16 tile issues twice (sm_80+).
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1);
template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                            uint32_t b0, uint32_t b1) {
#if FBP_CP_ASYNC
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                     uint32_t b0, uint32_t b1) {
#if FBP_CP_ASYNC
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// The cp.async main loop for a (BM, BN) tile computed by kWarpsM x kWarpsN warps, each
// owning a (BM / kWarpsM, BN / kWarpsN) block, fed by a kStages-deep pipeline of BK = 32
// k-tiles.  Fragments are loaded with ldmatrix.x4 (one instruction per 16x16 operand
// block, fp16 and bf16 alike: nvcuda::wmma loads bf16 fragments with scalar 32-bit
// loads) and multiplied with mma.sync m16n8k16, the instruction WMMA's 16x16x16 issues
// twice, over the same k order as WmmaEngine: the results are WmmaEngine's bit for bit.
// Two instances (below): the 64x64 tile of WmmaEngine's grid, and the 128x128 one.
template <typename T, int BM_, int BN_, int kWarpsM_, int kWarpsN_, int kStages_>
struct WmmaPipeline {
  using Acc = float;
  static constexpr int BM = BM_, BN = BN_, BK = 32;
  static constexpr bool kTma = false;
  static constexpr int kStages = kStages_;
  static constexpr int kWarpsM = kWarpsM_, kWarpsN = kWarpsN_;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kFragsM = BM / kWarpsM / 16, kFragsN = BN / kWarpsN / 16;
  // 40 halves = 80 bytes per row: 16-byte aligned for cp.async and wmma; ldmatrix's
  // 8 rows of 16 bytes start at banks 0, 20, 8, 28, 16, 4, 24, 12: conflict-free.
  static constexpr int kLdIn = BK + 8;
  // Output rows: the accumulator store's float2 writes (rows lane / 4, columns
  // 2 (lane % 4)) hit 32 distinct banks per half-warp at BN + 8; the 64-wide tile keeps
  // BN + 4 (a 2-way conflict once per tile) so that its 47.5 KiB stay a static array.
  static constexpr int kLdOut = BN >= 128 ? BN + 8 : BN + 4;
  static constexpr int kChunks = BK * int(sizeof(T)) / 16;  // 16-byte chunks per tile row
  static constexpr int kElemsPerChunk = 16 / int(sizeof(T));
  static constexpr int kStageElems = (BM + BN) * kLdIn;
  static constexpr int kInputBytes = kStages * kStageElems * int(sizeof(T));
  static constexpr int kCopiesPerThread = (BM + BN) * kChunks / kThreads;
  static_assert(sizeof(T) == 2 && (BM + BN) * kChunks % kThreads == 0, "tile split");
  static_assert(BM * kChunks % kThreads == 0, "A and W copies split at a fixed iteration");
  static_assert(kFragsM * kWarpsM * 16 == BM && kFragsN * kWarpsN * 16 == BN, "warp grid");

  // Issues the copies of k-tile [k0, k0 + BK) of A rows row0.. and W rows col0.. into
  // one stage buffer ([BM][kLdIn] A, then [BN][kLdIn] W).
  __device__ static void load_stage(const Matrix<T>& A, int64_t row0, const Matrix<T>& W,
                                    int64_t col0, int64_t k0, T* stage) {
    const int64_t kdim = A.cols;
#pragma unroll
    for (int i = 0; i < kCopiesPerThread; ++i) {
      const int e = threadIdx.x + i * kThreads;
      constexpr int kSplit = BM * kChunks / kThreads;  // iterations i < kSplit copy A
      const Matrix<T>& M = i < kSplit ? A : W;
      const int r = (i < kSplit ? e : e - BM * kChunks) / kChunks;  // constant divisor
      const int ch = e % kChunks;
      const int64_t g = (i < kSplit ? row0 : col0) + r;
      const int64_t k = k0 + ch * kElemsPerChunk;
      int bytes = 0;
      const T* src = M.ptr;  // any valid 16-byte-aligned address when nothing is read
      if (g < M.rows && k < kdim) {
        const int64_t left = kdim - k;
        bytes = int(left < kElemsPerChunk ? left : kElemsPerChunk) * int(sizeof(T));
        src = M.ptr + g * M.stride_row + k;
      }
      T* dst = stage + (i < kSplit ? 0 : BM * kLdIn) + r * kLdIn + ch * kElemsPerChunk;
      cp_async_16(dst, src, bytes);
    }
  }

  __device__ static void gemm(const Matrix<T>& A, int64_t row0, const Matrix<T>& W,
                              int64_t col0, unsigned char* in_smem, Acc* out) {
    if constexpr (!FBP_CP_ASYNC || !WmmaSupported<T>::value) {
      __trap();
    } else {
      T* stages = reinterpret_cast<T*>(in_smem);
      const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
      const int wr = warp / kWarpsN, wc = warp % kWarpsN;
      constexpr int kWarpRows = BM / kWarpsM, kWarpCols = BN / kWarpsN;
      constexpr int kN8 = 2 * kFragsN;  // m16n8 accumulators per 16-row block
      const int64_t ktiles = (A.cols + BK - 1) / BK;
      // acc[i][j]: the m16n8 block (16 i, 8 j) of this warp's (kWarpRows, kWarpCols)
      // part; four fp32 per thread (mma_m16n8k16's fragment).
      float acc[kFragsM][kN8][4];
#pragma unroll
      for (int i = 0; i < kFragsM; ++i)
#pragma unroll
        for (int j = 0; j < kN8; ++j)
#pragma unroll
          for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.0f;

      // Prologue: k-tiles 0 .. kStages-2 in flight, one commit group each (empty groups
      // past the end keep the group count uniform for wait_group).
#pragma unroll
      for (int s = 0; s < kStages - 1; ++s) {
        if (s < ktiles) load_stage(A, row0, W, col0, int64_t(s) * BK, stages + s * kStageElems);
        cp_async_commit();
      }
      // ldmatrix row addresses of this lane (ldmatrix_x4: lanes 8q .. 8q + 7 give the rows
      // of the q-th 8x8 matrix).  A (16 rows x 16 k, row-major): matrices (rows 0-7, k
      // 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) are mma's a0..a3.
      // W (16 columns x 16 k, k contiguous: B "col"): (n 0-7, k 0-7), (n 0-7, k 8-15),
      // (n 8-15, k 0-7), (n 8-15, k 8-15) are b0, b1 of the first n8 block, then the second.
      const int a_row = lane % 16, a_k = (lane / 16) * 8;
      const int b_row = lane % 8 + (lane / 16) * 8, b_k = ((lane / 8) % 2) * 8;
      for (int64_t kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<kStages - 2>();  // this thread's copies of k-tile kt have landed
        // Every thread's copies of k-tile kt are visible, and every thread is done with
        // k-tile kt - 1, whose buffer the prefetch below overwrites.
        __syncthreads();
        const int64_t next = kt + kStages - 1;
        if (next < ktiles)
          load_stage(A, row0, W, col0, next * BK, stages + int(next % kStages) * kStageElems);
        cp_async_commit();
        const T* As = stages + int(kt % kStages) * kStageElems;
        const T* Ws = As + BM * kLdIn;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
          uint32_t fa[kFragsM][4], fb[kFragsN][4];
#pragma unroll
          for (int i = 0; i < kFragsM; ++i)
            ldmatrix_x4(fa[i], As + (wr * kWarpRows + i * 16 + a_row) * kLdIn + kk + a_k);
#pragma unroll
          for (int j = 0; j < kFragsN; ++j)
            ldmatrix_x4(fb[j], Ws + (wc * kWarpCols + j * 16 + b_row) * kLdIn + kk + b_k);
#pragma unroll
          for (int i = 0; i < kFragsM; ++i)
#pragma unroll
            for (int j = 0; j < kN8; ++j)
              mma_m16n8k16<T>(acc[i][j], fa[i], fb[j / 2][2 * (j % 2)], fb[j / 2][2 * (j % 2) + 1]);
        }
      }
      cp_async_wait<0>();  // only empty groups remain; drain before the aliasing store
      __syncthreads();
      // mma's m16n8 fp32 fragment: rows lane / 4 (+ 8), columns 2 (lane % 4) (+ 1).
#pragma unroll
      for (int i = 0; i < kFragsM; ++i)
#pragma unroll
        for (int j = 0; j < kN8; ++j) {
          const int r = wr * kWarpRows + i * 16 + lane / 4;
          const int c = wc * kWarpCols + j * 8 + 2 * (lane % 4);
          *reinterpret_cast<float2*>(out + r * kLdOut + c) = make_float2(acc[i][j][0], acc[i][j][1]);
          *reinterpret_cast<float2*>(out + (r + 8) * kLdOut + c) =
              make_float2(acc[i][j][2], acc[i][j][3]);
        }
    }
  }
};

// WmmaEngine's 64x64x32 tile (4 warps of 32x32, the same grid), 3 stages: 47.5 KiB of
// shared memory, so it runs wherever the synchronous engine does (sm_80+).
template <typename T>
struct WmmaAsyncEngine : WmmaPipeline<T, 64, 64, 2, 2, 3> {};

// The 128x128x32 tile, 8 warps of 64x32, 4 stages: 64 FLOP per byte staged (twice the
// 64x64 tile's, which the cost model finds L2-bound at training sizes on an H200) and
// three 16 KiB k-tiles in flight.  ~149 KiB of dynamic shared memory (one CTA per SM):
// within sm_80's and sm_90's opt-in limits (163 / 227 KiB), not sm_86/sm_89's (99 KiB),
// where the binding keeps WmmaAsyncEngine.
template <typename T>
struct WmmaWideEngine : WmmaPipeline<T, 128, 128, 2, 4, 4> {};

// ----------------------------------------------------------------- wgmma + TMA engine
// Hopper's main loop (sm_90a): a 128x128x64 tile computed by two warpgroups, each owning
// 64 rows, with wgmma.mma_async m64n128k16 reading both operands straight from shared
// memory (no ldmatrix, no register staging).  The operand k-tiles arrive by TMA bulk
// tensor copies (fbp_tma.cuh; one thread issues them, the hardware zero-fills rows and
// K outside the tensors) into a ring of kStages 128-byte-swizzled stages, each stage's
// arrival tracked by an mbarrier that counts its bytes.  Per k-tile: wait for the stage,
// issue its four wgmma, let the previous k-tile's group retire (wait_group 1), one CTA
// barrier (both warpgroups are done with that stage), refill it with k-tile kt + 3; so
// the tensor cores run across the barrier and three k-tiles are always in flight.
//   64 FLOP per staged byte, 3 x 32 KiB = 96 KiB in flight, one CTA per SM (~198 KiB of
//   shared memory: 4 stages of 32 KiB, the fp32 a tile, biases); 64 accumulator
//   registers per thread.
// Operands: tma_operand_ok (fbp_launch.h), maps encoded by the launcher
// (encode_operand_map) and read from the kernel's __grid_constant__ parameters.
// NEVER RUN: compiled for sm_90a (cuda_compile reports HGMMA and UTMALDG), no GPU has
// executed it yet.  FBP_CUDA_STAGING=wide selects the cp.async engine instead.
template <typename T>
struct WgmmaEngine {
  using Acc = float;
  static constexpr bool kTma = true;
  static constexpr int BM = kTmaBoxRows, BN = kTmaBoxRows, BK = kTmaBoxK;
  static constexpr int kStages = 4;
  static constexpr int kThreads = 256;  // two warpgroups
  // 136 floats: the fragment store's float2 writes (rows lane / 4, columns 2 (lane % 4))
  // fall on 32 distinct banks per half-warp (BN + 4 would pair rows 0 and 1 on banks 4-7).
  static constexpr int kLdOut = BN + 8;
  static constexpr int kOperandBytes = kTmaBoxRows * kTmaBoxK * 2;  // one box: 16 KiB
  static constexpr int kStageBytes = 2 * kOperandBytes;             // A and W k-tiles
  // The stages start at the first 1024-byte boundary of the buffer (the 128-byte swizzle
  // repeats every 8 rows of 128 bytes; wgmma's descriptors assume that alignment), so the
  // buffer has 1 KiB of slack; the mbarriers follow the stages.
  static constexpr int kAlign = 1024;
  static constexpr int kBarrierOffset = kAlign + kStages * kStageBytes;
  static constexpr int kInputBytes = kBarrierOffset + 8 * kStages;
  static_assert(sizeof(T) == 2, "wgmma engine: half and bfloat16 only");
  static_assert(kTmaBoxK * sizeof(T) == 128, "a box row is one 128-byte swizzle span");
  static_assert(kOperandBytes % kAlign == 0 && kStageBytes % kAlign == 0,
                "every operand tile starts on a swizzle-pattern boundary");
  // The c tile aliases the stages from the buffer's start: it must end before the
  // barriers (which stay initialised only within gemm_tma, but are not generic memory).
  static_assert(BM * kLdOut * int(sizeof(float)) <= kBarrierOffset, "c tile vs barriers");

  // out = A[row0:row0+BM, :kdim] @ W[col0:col0+BN, :kdim]^T through the maps of A and W.
  __device__ static void gemm_tma(const CUtensorMap* map_a, const CUtensorMap* map_w,
                                  int64_t row0, int64_t col0, int64_t kdim,
                                  unsigned char* in_smem, Acc* out) {
#if !FBP_WGMMA
    __trap();
#else
    const int tid = threadIdx.x;
    const int wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
    const uint32_t raw = smem_addr(in_smem);
    unsigned char* stages = in_smem + (kAlign - raw % kAlign) % kAlign;
    uint64_t* full = reinterpret_cast<uint64_t*>(in_smem + kBarrierOffset);
    const int ktiles = static_cast<int>((kdim + BK - 1) / BK);
    const int r0 = static_cast<int>(row0), c0 = static_cast<int>(col0);  // < 2^31: binding

    // This thread's earlier generic writes to these bytes (the tile that aliased them)
    // are ordered before the bulk copies issued after the barrier below.
    fence_proxy_async();
    if (tid == 0) {
      // Fresh barriers per call: every phase of the previous call has completed and
      // been invalidated, so the parity of k-tile kt is simply (kt / kStages) & 1.
      for (int s = 0; s < kStages; ++s) mbarrier_init(&full[s], 1);
      fence_mbarrier_init();
    }
    __syncthreads();
    auto issue = [&](int kt) {  // thread 0 only
      unsigned char* stage = stages + (kt % kStages) * kStageBytes;
      uint64_t* bar = &full[kt % kStages];
      mbarrier_arrive_expect_tx(bar, kStageBytes);
      tma_load_2d(stage, map_a, kt * BK, r0, bar);
      tma_load_2d(stage + kOperandBytes, map_w, kt * BK, c0, bar);
    };
    if (tid == 0)
      for (int kt = 0; kt < kStages - 1 && kt < ktiles; ++kt) issue(kt);

    float d[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) d[i] = 0.0f;
    for (int kt = 0; kt < ktiles; ++kt) {
      const int s = kt % kStages;
      mbarrier_wait(&full[s], static_cast<unsigned>(kt / kStages) & 1u);
      // This warpgroup's 64 rows of A; all 128 rows (columns of the product) of W.
      const uint32_t a = smem_addr(stages + s * kStageBytes) + wg * 64 * 128;
      const uint32_t w = smem_addr(stages + s * kStageBytes + kOperandBytes);
#pragma unroll
      for (int i = 0; i < 64; ++i) wgmma_fence_operand(d[i]);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk)  // 16 elements = 32 bytes along K per step
        wgmma_m64n128k16<T>(d, wgmma_desc(a + kk * 32), wgmma_desc(w + kk * 32));
      wgmma_commit();
      wgmma_wait<1>();  // k-tile kt - 1's group has retired: its stage is read
#pragma unroll
      for (int i = 0; i < 64; ++i) wgmma_fence_operand(d[i]);
      __syncthreads();  // ... by both warpgroups
      if (tid == 0 && kt + kStages - 1 < ktiles) issue(kt + kStages - 1);  // into that stage
    }
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < 64; ++i) wgmma_fence_operand(d[i]);
    __syncthreads();  // every wgmma has read its stages: the out tile may alias them
    if (tid == 0)
      for (int s = 0; s < kStages; ++s) mbarrier_inval(&full[s]);
    // The m64n128 accumulator fragment (PTX ISA, "wgmma .m64nNk16 register fragment D"):
    // warp w of the warpgroup holds rows 16 w + lane / 4 (+ 8), and for each 8-column
    // chunk j the columns 8 j + 2 (lane % 4) (+ 1): d[4 j .. 4 j + 3].
    const int row = wg * 64 + warp * 16 + lane / 4;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const int col = 8 * j + 2 * (lane % 4);
      *reinterpret_cast<float2*>(out + row * kLdOut + col) = make_float2(d[4 * j], d[4 * j + 1]);
      *reinterpret_cast<float2*>(out + (row + 8) * kLdOut + col) =
          make_float2(d[4 * j + 2], d[4 * j + 3]);
    }
#endif
  }
};

// Shared memory of a fused kernel: the staged inputs, aliased by the c tile (used
// only after the last K stage), then the a tile, then the BN-column slices of both
// biases (staged once per block and column chunk, not re-read per (pair, column)).
// 128-byte aligned for wmma.  Up to 48 KiB it is a static array (visible in ptxas's
// report); beyond, dynamic shared memory the launcher opts into (kDynamic).
// cuda_compile.tile_smem_bytes mirrors this layout.
template <class E>
struct TileSmem {
  using Acc = typename E::Acc;
  static constexpr int kTileBytes = E::BM * E::kLdOut * int(sizeof(Acc));
  static constexpr int kUnionBytes =
      round_up(E::kInputBytes > kTileBytes ? E::kInputBytes : kTileBytes, 128);
  static constexpr int kBiasOffset = kUnionBytes + round_up(kTileBytes, 128);
  static constexpr int kBytes = kBiasOffset + round_up(2 * E::BN * int(sizeof(Acc)), 128);
  static constexpr bool kDynamic = kBytes > 48 * 1024;
  static_assert(E::kLdOut % 4 == 0, "epilogue reads 4 columns as one 16-byte vector");
};

// The fused kernels' shared buffer: a static array, or the dynamic allocation.
template <class E>
__device__ __forceinline__ unsigned char* tile_smem() {
  if constexpr (TileSmem<E>::kDynamic) {
    extern __shared__ __align__(128) unsigned char fbp_dynamic_smem[];
    return fbp_dynamic_smem;
  } else {
    __shared__ __align__(128) unsigned char buffer[TileSmem<E>::kBytes];
    return buffer;
  }
}

// Stages bias[col0 : col0 + BN] (zero outside [0, K) or without a bias) of both
// projections into shared memory, in the accumulation type.  The caller's next
// barrier (the GEMM's first one) publishes it.
template <class E, typename T>
__device__ __forceinline__ void stage_biases(const T* bias_x, const T* bias_y, int64_t col0,
                                             int64_t K, typename E::Acc* bx_s,
                                             typename E::Acc* by_s) {
  using Acc = typename E::Acc;
  for (int c = threadIdx.x; c < E::BN; c += E::kThreads) {
    const int64_t col = col0 + c;
    const bool in = col < K;
    bx_s[c] = bias_x != nullptr && in ? to_acc<Acc>(bias_x[col]) : Acc(0);
    by_s[c] = bias_y != nullptr && in ? to_acc<Acc>(bias_y[col]) : Acc(0);
  }
}

// A given projection's (BM, BN) tile into shared memory, broadcast row r
// reading row r / div of src (rows / div, K) (div 1: a kept projection; > 1: the shared
// input of co-attention, one row per group), zero outside the valid part (as the GEMM
// engines leave it).  The caller's next barrier publishes it.
template <class E, typename T>
__device__ __forceinline__ void load_tile(const T* src, int64_t div, int64_t row0, int nr,
                                          int64_t col0, int width, int64_t K,
                                          typename E::Acc* tile) {
  using Acc = typename E::Acc;
  for (int e = threadIdx.x; e < E::BM * E::BN; e += E::kThreads) {
    const int r = e / E::BN, c = e % E::BN;
    const int64_t src_row = div == 1 ? row0 + r : (row0 + r) / div;
    tile[r * E::kLdOut + c] =
        r < nr && c < width ? to_acc<Acc>(src[src_row * K + col0 + c]) : Acc(0);
  }
}

// Both projection tiles of a fused kernel: each side's GEMM, or its given projection
// (load_tile).  x's side first: the GEMM's stages alias the c tile, which a given c is
// loaded into only after it (the engines end with a barrier once the stages are read).
// `maps`: the kernel's operand tensor maps, read by the TMA engine only.
template <class E, typename T>
__device__ __forceinline__ void project_tiles(const Matrix<T>& x, const Matrix<T>& wx,
                                              const T* src_x, int64_t div_x,
                                              const Matrix<T>& y, const Matrix<T>& wy,
                                              const T* src_y, int64_t div_y, int64_t row0,
                                              int nr, int64_t col0, int width, int64_t K,
                                              const TmaMaps& maps, unsigned char* smem,
                                              typename E::Acc* pa, typename E::Acc* pc) {
  if (src_x != nullptr) {
    load_tile<E>(src_x, div_x, row0, nr, col0, width, K, pa);
  } else if constexpr (E::kTma) {
    E::gemm_tma(&maps.x, &maps.wx, row0, col0, x.cols, smem, pa);
  } else {
    E::gemm(x, row0, wx, col0, smem, pa);
  }
  if (src_y != nullptr) {
    load_tile<E>(src_y, div_y, row0, nr, col0, width, K, pc);
  } else if constexpr (E::kTma) {
    E::gemm_tma(&maps.y, &maps.wy, row0, col0, y.cols, smem, pc);
  } else {
    E::gemm(y, row0, wy, col0, smem, pc);
  }
}

// Four consecutive accumulator values from / to shared memory, 16-byte aligned.
__device__ __forceinline__ void load4(const float* p, float v[4]) {
  const float4 q = *reinterpret_cast<const float4*>(p);
  v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
}
__device__ __forceinline__ void load4(const double* p, double v[4]) {
  const double2 a = reinterpret_cast<const double2*>(p)[0];
  const double2 b = reinterpret_cast<const double2*>(p)[1];
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}
__device__ __forceinline__ void store4(float* p, const float v[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store4(double* p, const double v[4]) {
  reinterpret_cast<double2*>(p)[0] = make_double2(v[0], v[1]);
  reinterpret_cast<double2*>(p)[1] = make_double2(v[2], v[3]);
}

// The engine each input dtype uses (the only instantiations the library builds).
template <typename T> struct EngineFor;
template <> struct EngineFor<__half> { using type = WmmaEngine<__half>; };
template <> struct EngineFor<__nv_bfloat16> { using type = WmmaEngine<__nv_bfloat16>; };
template <> struct EngineFor<float> { using type = FmaEngine<float, float, 64, 64>; };
template <> struct EngineFor<double> { using type = FmaEngine<double, double, 32, 64>; };

// The cp.async engines of a dtype, where there are (fp16, bf16); `void` otherwise.
// AsyncEngineFor tiles like EngineFor<T> (same grid); WideEngineFor has its own
// (forward_grid and projection_grads_grid take the engine).
template <typename T> struct AsyncEngineFor { using type = void; };
template <> struct AsyncEngineFor<__half> { using type = WmmaAsyncEngine<__half>; };
template <> struct AsyncEngineFor<__nv_bfloat16> { using type = WmmaAsyncEngine<__nv_bfloat16>; };
template <typename T> struct WideEngineFor { using type = void; };
template <typename T> struct WgmmaEngineFor { using type = void; };
template <> struct WgmmaEngineFor<__half> { using type = WgmmaEngine<__half>; };
template <> struct WgmmaEngineFor<__nv_bfloat16> { using type = WgmmaEngine<__nv_bfloat16>; };
template <> struct WideEngineFor<__half> { using type = WmmaWideEngine<__half>; };
template <> struct WideEngineFor<__nv_bfloat16> { using type = WmmaWideEngine<__nv_bfloat16>; };
static_assert(WmmaAsyncEngine<__half>::BM == WmmaEngine<__half>::BM &&
                  WmmaAsyncEngine<__half>::BN == WmmaEngine<__half>::BN,
              "the cp.async engine must share the synchronous engine's grid");

// The engine `engine` selects for element type T (void: none for this dtype).
template <typename T, Engine engine>
struct EngineSelect {
  using type = std::conditional_t<
      engine == Engine::kWgmma, typename WgmmaEngineFor<T>::type,
      std::conditional_t<engine == Engine::kAsyncWide, typename WideEngineFor<T>::type,
                         std::conditional_t<engine == Engine::kAsync,
                                            typename AsyncEngineFor<T>::type,
                                            typename EngineFor<T>::type>>>;
};


// Calls f(Tag<T>{}) with the kernel element type of `dtype` (host side).
template <typename T> struct Tag { using type = T; };
template <class F>
auto dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kHalf: return f(Tag<__half>{});
    case DType::kBFloat16: return f(Tag<__nv_bfloat16>{});
    case DType::kFloat: return f(Tag<float>{});
    default: return f(Tag<double>{});
  }
}

// Calls f(Tag<T>{}, Tag<E>{}) with the element type of `dtype` and the engine `engine`
// selects for it, or returns `none` where that dtype has no such engine (host side).
template <class R, class F>
R dispatch_engine(DType dtype, Engine engine, R none, F&& f) {
  return dispatch_dtype(dtype, [&](auto tag) -> R {
    using T = typename decltype(tag)::type;
    auto call = [&](auto e) -> R {
      if constexpr (std::is_void<typename decltype(e)::type>::value) {
        return none;
      } else {
        return f(tag, e);
      }
    };
    switch (engine) {
      case Engine::kWgmma: return call(Tag<typename EngineSelect<T, Engine::kWgmma>::type>{});
      case Engine::kAsyncWide: return call(Tag<typename EngineSelect<T, Engine::kAsyncWide>::type>{});
      case Engine::kAsync: return call(Tag<typename EngineSelect<T, Engine::kAsync>::type>{});
      default: return call(Tag<typename EngineSelect<T, Engine::kDefault>::type>{});
    }
  });
}

// Dynamic shared memory to launch `kernel` (a fused kernel on engine E) with: 0 for a
// static buffer; else TileSmem<E>::kBytes, after opting the kernel into it on the
// current device (per call: the attribute is per device, and the call is cheap host
// work, not a stream operation, so CUDA-graph capture is unaffected).
template <class E, class Kernel>
cudaError_t launch_smem(Kernel kernel, int* bytes) {
  *bytes = 0;
  if constexpr (TileSmem<E>::kDynamic) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, TileSmem<E>::kBytes);
    if (err != cudaSuccess) {
      // Returned to the caller, who raises it: cleared here, so that the next,
      // unrelated launch check does not report it again against the wrong op.
      (void)cudaGetLastError();
      return err;
    }
    *bytes = TileSmem<E>::kBytes;
  }
  return cudaSuccess;
}

}  // namespace fbp
