// Launch parameters shared by fbp_binding.cpp and the .cu files.
//
// Deliberately free of ATen/torch headers: parsing them costs about a minute of
// compile time per .cu file for two architectures, more than the kernels.  The
// binding checks arguments, allocates with ATen and passes raw pointers, sizes and
// strides (in elements) here; launchers return the CUDA launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fbp {

enum class DType : int { kHalf, kBFloat16, kFloat, kDouble };

// A 2-D operand of the input dtype, read through its strides: no copies for
// transposed or sliced x, y or weights.
struct MatrixArg {
  const void* ptr;
  int64_t rows, cols, stride_row, stride_col;
};

// The GEMM engine of the fused kernels (csrc/fbp_tile.cuh):
//   kDefault   EngineFor<T>: synchronous WMMA 64x64 (fp16/bf16), FMA (fp32/fp64)
//   kAsync     WmmaAsyncEngine: the 64x64 tile, 3-stage cp.async (fp16/bf16, sm_80+)
//   kAsyncWide WmmaWideEngine: 128x128, 4-stage cp.async, ~149 KiB of shared memory
//              (fp16/bf16, GPUs whose per-block opt-in limit holds it: sm_80, sm_90)
//   kWgmma     WgmmaEngine: 128x128x64, wgmma + TMA, 4 stages, ~198 KiB (fp16/bf16,
//              sm_90 with an sm_90a build: wgmma_built())
enum class Engine : int { kDefault, kAsync, kAsyncWide, kWgmma };

// Whether this build holds sm_90a machine code (TORCH_CUDA_ARCH_LIST names 9.0a, and
// cuda_build / setup.py then define FBP_SM90A): without it WgmmaEngine's body is a trap
// and the binding never chooses it.
bool wgmma_built();

// FBP_CUDA_STAGING=auto takes the cp.async 128x128 engine (WmmaWideEngine) only above
// this many rows: up to one 128-row tile, the 64x64 tile's twice-as-many output tiles
// keep more SMs streaming the weights (the cost model, A100 bf16 at the MFB widths:
// forward 50 us against 64 us at rows <= 128, 94 against 64 us at 256;
// costmodel.CUDA_WIDE_ABOVE_ROWS).  The wgmma engine has no such threshold: on an H200
// the model puts it at or below the 64x64 tile at every row count (forward 30.4
// against 34.6 us at one row, 30.5 against 31.2 us at 16-128 rows).
constexpr int64_t kWideEngineAboveRows = 128;

// Whether the driver provides cuTensorMapEncodeTiled (the wgmma engine's tensor maps;
// CUDA 12+ drivers do); looked up once.
bool tma_encoder_available();

// What the binding needs to know of an engine (host side, fbp_forward.cu): its tile
// and the shared memory one block of either fused kernel takes (TileSmem); threads == 0
// when `dtype` has no such engine.
struct EngineInfo {
  int bm, bn, bk, threads, stages, smem_bytes;
};
EngineInfo engine_info(DType dtype, Engine engine);

// Can this operand be staged with 16-byte cp.async (WmmaAsyncEngine, fp16/bf16)?
// Contiguous along K, and every row starts 16-byte aligned: the base pointer and the
// row stride (in elements of element_bytes each) are multiples of 16 bytes.
inline bool cp_async_operand_ok(const MatrixArg& m, int element_bytes) {
  const int64_t per_chunk = 16 / element_bytes;
  const bool contiguous_k = m.stride_col == 1 || m.cols <= 1;
  const bool rows_aligned = m.rows <= 1 || m.stride_row % per_chunk == 0;
  return element_bytes == 2 && contiguous_k && rows_aligned &&
         reinterpret_cast<uintptr_t>(m.ptr) % 16 == 0;
}

// Can this operand be read through a TMA tensor map (WgmmaEngine)?  What cp.async needs
// (a row stride that is a multiple of 16 bytes, a 16-byte-aligned base), at least one
// column (a map has no empty dimension), rows that do not overlap (cuTensorMapEncodeTiled
// wants a row stride of at least a row's bytes, below 2^40: a broadcast row of stride 0
// is refused), and rows and columns below 2^31 (the copies' coordinates are 32-bit).
inline bool tma_operand_ok(const MatrixArg& m, int element_bytes) {
  constexpr int64_t kMaxCoordinate = (int64_t(1) << 31) - 1;
  const bool rows_ok = m.rows <= 1 || (m.stride_row >= m.cols &&
                                       m.stride_row * element_bytes < (int64_t(1) << 40));
  return cp_async_operand_ok(m, element_bytes) && m.rows >= 1 && m.cols >= 1 && rows_ok &&
         m.rows <= kMaxCoordinate && m.cols <= kMaxCoordinate;
}

struct DropoutArg {
  bool enabled;  // training with rate > 0 and a seed
  uint64_t seed;
  double rate;
};

// Threads of the blocks that finish a joint-normalisation group (norm_dims > 1; one
// block per group, fbp_reduce.cuh), 8 warps: a group of R regions at the MFB widths
// holds R * 1000 outputs, and one warp per group (the per-row kernels' shape) would
// leave most SMs idle at batch 64.  The CPU mirror of the row norm uses it too.
constexpr int kGroupThreads = 256;

struct Grid {
  int64_t x, y;  // x: row tiles, y: output (forward) or column (backward) tiles
};

// Fused forward.  Accumulation dtype ("acc"): fp64 for fp64 inputs, else fp32.
struct ForwardArgs {
  DType dtype;
  MatrixArg x, y, weight_x, weight_y;  // (rows, m), (rows, n), (K, m), (K, n)
  const void* bias_x;                  // contiguous (K) or nullptr
  const void* bias_y;
  void* out;        // (rows, o) contiguous, input dtype
  void* norm;       // (rows) acc dtype; nullptr when !normalize
  void* t_scratch;  // (rows, o) acc dtype for fp16/bf16 with normalize; else nullptr
  void* partial;    // (rows, 2 * forward_grid().y) acc dtype when normalize; else nullptr:
                    // per output tile the scaled part (e, q) of the row's sum of t^2
  void* keep_x;     // (rows, K) contiguous input dtype or nullptr: the raw projection
  void* keep_y;     // x W_x^T (no bias, before the activation) written for backward
  // A side's raw projection given instead of computed (co-attention: the shared input,
  // projected once per group by the binding), (rows / div, K) contiguous input dtype,
  // broadcast row r reading row r / div; nullptr: that side's GEMM runs.
  const void* src_x;
  const void* src_y;
  int64_t div_x, div_y;
  // MFH's chained blocks (fbp_kernels/backends/cuda_mfh.py), (rows, K) contiguous input
  // dtype or nullptr: the previous block's product, multiplied into this block's
  // before dropout and pooling; and this block's product, written for the next.
  const void* prev;
  void* chain;
  int64_t rows, o, factor;
  DropoutArg dropout;
  bool normalize;
  double eps;
  int activation;      // fbp_math.cuh Activation code, on both projections (bias included)
  int64_t norm_group;  // rows per joint-normalisation group (norm_dims > 1), divides rows
  Engine engine;       // kAsync/kAsyncWide: every operand cp_async_operand_ok, sm_80+
};
Grid forward_grid(DType dtype, Engine engine, int64_t rows, int64_t o, int64_t factor);
cudaError_t launch_forward(const ForwardArgs& args, cudaStream_t stream);

// ds = dL/ds (rows, o) acc dtype, from grad and out (rows, o) contiguous input
// dtype and norm (rows) acc dtype; with norm_group > 1, <z, g> is taken over each group
// of norm_group consecutive rows (whose norm entries all hold the group's norm).
struct GradPooledArgs {
  DType dtype;
  const void* grad;
  const void* out;
  const void* norm;
  void* ds;
  int64_t rows, o;
  double eps;
  int64_t norm_group;
};
cudaError_t launch_grad_pooled(const GradPooledArgs& args, cudaStream_t stream);

// da = dp * act(c) * act'(a) and dc = dp * act(a) * act'(c) (gradients with respect to
// the pre-activation projections, bias included), (rows, K) contiguous input dtype,
// projections recomputed tile by tile, dp = ds[row, col / factor] * keep / (1 - rate).
struct ProjectionGradArgs {
  DType dtype;
  MatrixArg x, y, weight_x, weight_y;
  const void* bias_x;
  const void* bias_y;
  const void* ds;  // (rows, o) acc dtype, contiguous
  // A side's raw projection read instead of recomputed (the forward kept it, or the
  // co-attention binding projected the shared input once), as ForwardArgs::src_x.
  const void* src_x;
  const void* src_y;
  int64_t div_x, div_y;
  // MFH's backward through the chain, (rows, K) contiguous input dtype or nullptr:
  // the previous block's product; the gradient later blocks pass to this block's
  // product (added to its pooled gradient); the gradient this block passes on.
  const void* prev;
  const void* carry_in;
  void* carry_out;
  void* da;
  void* dc;
  int64_t rows, o, factor;
  DropoutArg dropout;
  int activation;      // as ForwardArgs::activation
  Engine engine;       // as ForwardArgs::engine
};
Grid projection_grads_grid(DType dtype, Engine engine, int64_t rows, int64_t K);
cudaError_t launch_projection_grads(const ProjectionGradArgs& args, cudaStream_t stream);

// keep[i] = dropout keep-mask of linear element index[i] (fbp_math.cuh: dropout_keep).
cudaError_t launch_dropout_keep(const int64_t* index, bool* keep, int64_t numel, uint64_t seed,
                                double rate, cudaStream_t stream);

}  // namespace fbp
