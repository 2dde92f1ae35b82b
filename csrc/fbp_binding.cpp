// Operator registration for the CUDA backend: schemas, argument checks, Meta
// (shape-only) kernels for torch.compile/FakeTensor, and the CUDA kernels.
//
//   torch.ops.fbp_kernels_cuda.fbp_forward(x, y, weight_x, weight_y, bias_x, bias_y,
//       factor, dropout, seed, normalize, eps, activation=0, norm_group=1, keep_x=False,
//       keep_y=False, rows_per_x=1, rows_per_y=1, prev=None, chain=False)
//       -> (out (rows, o), norm (rows) or (0,), a (x rows, K) or (0,), c (y rows, K) or (0,),
//           p (rows, K) or (0,))
//   torch.ops.fbp_kernels_cuda.fbp_backward(grad, x, y, weight_x, weight_y, bias_x,
//       bias_y, out, norm, factor, dropout, seed, normalize, eps, activation=0,
//       norm_group=1, a=None, c=None, rows_per_x=1, rows_per_y=1, prev=None, carry=None,
//       carry_out=False)
//       -> (dx, dy, dweight_x, dweight_y, dbias_x or (0,), dbias_y or (0,), carry_next)
//       a, c: the raw projections x W_x^T, y W_y^T (no bias, before the activation) the
//       forward kept (the memory modes), read instead of recomputed.
//       rows_per_x / rows_per_y: broadcast row r reads row r / rows_per of that input
//       (co-attention: regions (B*R, m) with one question row per sample, rows_per_y = R),
//       rows = x rows * rows_per_x = y rows * rows_per_y; a shared input is projected
//       once per group (cuBLAS) and its gradient summed per group before its GEMMs.
//       prev / chain / carry / carry_out: one block of MFH (backends/cuda_mfh.py): the
//       previous block's product multiplied in, this block's product returned as p; in
//       backward the gradient later blocks pass to this block's product (carry) and the
//       one this block passes on (carry_next)
//       activation: 0 none, 1 relu, 2 tanh on both projections (fbp_math.cuh);
//       norm_group: rows per joint-normalisation group (norm_dims > 1; consecutive
//       rows, dividing rows), each row's norm entry holding its group's norm
//   torch.ops.fbp_kernels_cuda.dropout_keep(index, seed, rate) -> bool mask
//   torch.ops.fbp_kernels_cuda.philox4x32_10(counter (N, 4), key) -> (N, 4)  [CPU, tests]
//   torch.ops.fbp_kernels_cuda.row_norm(t (rows, o), outputs_per_tile, rows_per_group=1)
//       -> (rows)  [CPU, tests]
//   torch.ops.fbp_kernels_cuda.grad_pooled(grad, out, norm, eps, rows_per_group=1) -> ds
//       [CPU, tests]
//   torch.ops.fbp_kernels_cuda.activation(v, code) -> (act, d act / d v)  [CPU, tests]
//       the forward's overflow-safe row norm, the backward's dL/ds and the projection
//       activations, run on the CPU through the kernels' own __host__ __device__ math
//       (fbp_math.cuh)
//   torch.ops.fbp_kernels_cuda.cp_async_staging(x, y, weight_x, weight_y) -> bool
//       whether fp16/bf16 GEMM tiles would be fed by cp.async (FBP_CUDA_STAGING)
//   torch.ops.fbp_kernels_cuda.gemm_engine(x, y, weight_x, weight_y, rows=0, gemm_x=True,
//       gemm_y=True) -> str
//       which engine the fused kernels would run: "default", "async", "wide" or "wgmma", for
//       `rows` broadcast rows (0: x's) with GEMMs on the sides gemm_x / gemm_y
//   torch.ops.fbp_kernels_cuda.wgmma_built() -> bool
//       whether the loaded library holds sm_90a code (the wgmma engine can run)
//   torch.ops.fbp_kernels_cuda.engine_tile(engine, dtype) -> int[]
//       [BM, BN, BK, threads, stages, shared bytes per block] of an engine (fbp_tile.cuh)
//
// x and y are 2-D (rows, m) / (rows, n): the Python glue flattens and broadcasts
// leading dimensions (backends/_common.flatten_rows).  Any strides are accepted
// for x, y and the weights; biases are made contiguous (K values, cheap).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <Python.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <string>
#include <cmath>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "fbp_launch.h"
#include "fbp_math.cuh"

namespace fbp {
namespace {

using at::Tensor;

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_float(const Tensor& t, const char* name) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kHalf || d == at::kBFloat16 || d == at::kFloat || d == at::kDouble,
              "fbp: ", name, " has dtype ", d, "; supported: float16, bfloat16, float32, float64");
}

// The same rules as fbp_kernels.functional.check_inputs, for the 2-D operator form, where
// broadcast row r reads row r / rows_per_x of x and r / rows_per_y of y (co-attention: the
// shared input has one row per group of rows_per consecutive rows).  Returns the rows.
int64_t check_forward_args(const Tensor& x, const Tensor& y, const Tensor& wx, const Tensor& wy,
                           const std::optional<Tensor>& bx, const std::optional<Tensor>& by,
                           int64_t factor, double dropout, double eps, int64_t rows_per_x,
                           int64_t rows_per_y) {
  TORCH_CHECK(x.dim() == 2, "fbp: x must be 2-D (rows, m), got shape ", x.sizes());
  TORCH_CHECK(y.dim() == 2, "fbp: y must be 2-D (rows, n), got shape ", y.sizes());
  TORCH_CHECK(rows_per_x >= 1 && rows_per_y >= 1, "fbp: rows_per_x and rows_per_y must be >= 1, "
              "got ", rows_per_x, " and ", rows_per_y);
  const int64_t rows = x.size(0) * rows_per_x;
  TORCH_CHECK(rows == y.size(0) * rows_per_y, "fbp: x and y must have the same number of rows, "
              "got ", x.sizes(), " and ", y.sizes(), " (", rows_per_x, " and ", rows_per_y,
              " rows per row)");
  TORCH_CHECK(wx.dim() == 2 && wy.dim() == 2, "fbp: weight_x and weight_y must be 2-D, got ",
              wx.sizes(), " and ", wy.sizes());
  TORCH_CHECK(factor >= 1, "fbp: factor must be >= 1, got ", factor);
  const int64_t K = wx.size(0);
  TORCH_CHECK(K > 0 && K % factor == 0, "fbp: weight_x.shape[0] (= factor * out_features) must "
              "be a positive multiple of factor=", factor, ", got ", K);
  TORCH_CHECK(wy.size(0) == K, "fbp: weight_x and weight_y must have the same number of rows, "
              "got ", wx.sizes(), " and ", wy.sizes());
  TORCH_CHECK(wx.size(1) == x.size(1), "fbp: x has ", x.size(1), " features (shape ", x.sizes(),
              ") but weight_x expects ", wx.size(1), " (shape ", wx.sizes(), ")");
  TORCH_CHECK(wy.size(1) == y.size(1), "fbp: y has ", y.size(1), " features (shape ", y.sizes(),
              ") but weight_y expects ", wy.size(1), " (shape ", wy.sizes(), ")");
  check_float(x, "x");
  const Tensor* named[] = {&y, &wx, &wy};
  const char* names[] = {"y", "weight_x", "weight_y"};
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(named[i]->scalar_type() == x.scalar_type(), "fbp: all tensors must share one "
                "dtype, got x=", x.scalar_type(), " and ", names[i], "=", named[i]->scalar_type());
    TORCH_CHECK(named[i]->device() == x.device(), "fbp: all tensors must be on one device, got x "
                "on ", x.device(), " and ", names[i], " on ", named[i]->device());
  }
  for (const auto& [b, name] : {std::make_pair(&bx, "bias_x"), std::make_pair(&by, "bias_y")}) {
    if (!b->has_value()) continue;
    const Tensor& t = **b;
    TORCH_CHECK(t.dim() == 1 && t.size(0) == K, "fbp: ", name, " must have shape (", K,
                ",), got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fbp: ", name, " has dtype ",
                t.scalar_type(), " but x has ", x.scalar_type());
    TORCH_CHECK(t.device() == x.device(), "fbp: ", name, " is on ", t.device(),
                " but x is on ", x.device());
  }
  TORCH_CHECK(dropout >= 0.0 && dropout < 1.0, "fbp: dropout must be in [0, 1), got ", dropout);
  TORCH_CHECK(eps > 0.0 && std::isfinite(eps), "fbp: eps must be a finite float > 0, got ", eps);
  return rows;
}

// activation code and joint-normalisation group of the operators.
void check_drop_in_args(int64_t rows, int64_t activation, int64_t norm_group) {
  TORCH_CHECK(activation == kActNone || activation == kActRelu || activation == kActTanh,
              "fbp cuda: activation must be 0 (none), 1 (relu) or 2 (tanh), got ", activation);
  TORCH_CHECK(norm_group >= 1 && rows % norm_group == 0, "fbp cuda: norm_group (rows per "
              "joint-normalisation group) must be >= 1 and divide the ", rows, " rows, got ",
              norm_group);
  TORCH_CHECK(norm_group == 1 || rows / norm_group <= INT_MAX, "fbp cuda: too many "
              "normalisation groups for the grid (", rows / norm_group, ")");
}

// A projection the forward kept (keep_x / keep_y): (the side's rows, K) in x's dtype and
// device.
void check_kept(const std::optional<Tensor>& kept, const Tensor& side, const Tensor& x,
                const Tensor& wx, const char* name) {
  if (!kept.has_value()) return;
  const Tensor& t = *kept;
  TORCH_CHECK(t.dim() == 2 && t.size(0) == side.size(0) && t.size(1) == wx.size(0), "fbp: ",
              name, " (a kept projection) must have shape (", side.size(0), ", ", wx.size(0),
              "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device(), "fbp: ", name,
              " (a kept projection) must have x's dtype and device, got ", t.scalar_type(),
              " on ", t.device());
}

// An MFH chain buffer (a block product or the gradient passed along the chain): (rows, K)
// in x's dtype and device.
void check_chain(const std::optional<Tensor>& t, int64_t rows, const Tensor& x,
                 const Tensor& wx, const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 2 && t->size(0) == rows && t->size(1) == wx.size(0), "fbp: ", name,
              " (an MFH chain buffer) must have shape (", rows, ", ", wx.size(0), "), got ",
              t->sizes());
  TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(), "fbp: ", name,
              " (an MFH chain buffer) must have x's dtype and device, got ", t->scalar_type(),
              " on ", t->device());
}

void check_backward_args(const Tensor& grad, const Tensor& x, const Tensor& wx,
                         const Tensor& out, const Tensor& norm, int64_t factor,
                         bool normalize, int64_t rows) {
  const int64_t o = wx.size(0) / factor;
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == rows && grad.size(1) == o,
              "fbp: grad must have shape (", rows, ", ", o, "), got ", grad.sizes());
  TORCH_CHECK(out.sizes() == grad.sizes(), "fbp: out must have shape ", grad.sizes(), ", got ",
              out.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type(),
              "fbp: grad and out must have x's dtype ", x.scalar_type(), ", got ",
              grad.scalar_type(), " and ", out.scalar_type());
  // Raw pointers of all three reach the kernels: another device would be an illegal
  // address (or a silent cross-device read), not an error.
  TORCH_CHECK(grad.device() == x.device() && out.device() == x.device(),
              "fbp: grad and out must be on x's device ", x.device(), ", got ", grad.device(),
              " and ", out.device());
  if (normalize) {
    TORCH_CHECK(norm.dim() == 1 && norm.size(0) == rows, "fbp: norm must have shape (", rows,
                ",) when normalize=True, got ", norm.sizes());
    TORCH_CHECK(norm.device() == x.device(), "fbp: norm must be on x's device ", x.device(),
                ", got ", norm.device());
    TORCH_CHECK(norm.scalar_type() == acc_type(x.scalar_type()), "fbp: norm must be ",
                acc_type(x.scalar_type()), " for ", x.scalar_type(), " inputs, got ",
                norm.scalar_type());
  }
}

DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat;
    default: return DType::kDouble;  // check_float() admitted nothing else
  }
}

MatrixArg matrix_arg(const Tensor& t) {
  return MatrixArg{t.data_ptr(), t.size(0), t.size(1), t.stride(0), t.stride(1)};
}

DropoutArg dropout_arg(double rate, std::optional<int64_t> seed) {
  return DropoutArg{seed.has_value() && rate > 0.0, static_cast<uint64_t>(seed.value_or(0)), rate};
}

const void* optional_ptr(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

void check_grid(const Grid& grid, const char* what, int64_t size) {
  TORCH_CHECK(grid.y <= 65535, "fbp cuda: ", what, " = ", size, " needs ", grid.y,
              " tiles, more than the grid's 65535");
  TORCH_CHECK(grid.x <= INT_MAX, "fbp cuda: too many rows for the grid (", grid.x, " tiles)");
}

Tensor maybe_contiguous(const std::optional<Tensor>& b) {
  return b.has_value() ? b->contiguous() : Tensor();
}

Tensor empty_marker(const Tensor& like) { return at::empty({0}, like.options()); }

// ------------------------------------------------------------------ operand staging
// FBP_CUDA_STAGING selects the GEMM engine of the fp16/bf16 fused kernels: "auto"
// (default), when every operand a GEMM reads allows cp.async: the wgmma + TMA engine
// (WgmmaEngine) on an sm_90 GPU with an sm_90a build and operands a tensor map can
// describe, at any row count; else above kWideEngineAboveRows rows the 128x128 cp.async
// engine (WmmaWideEngine) when the GPU's per-block shared memory holds it, and at or
// below them the 64x64 cp.async one (WmmaAsyncEngine); operands cp.async cannot read:
// the synchronous one.
// "sync" always the synchronous one; "async", "wide" and "wgmma" always that engine, an
// error when the operands, the GPU or the build do not allow it (tests use them to know
// which path ran; fp32/fp64 have no cp.async engine and are unaffected).  Read per call,
// so a test can switch it.  FBP_CUDA_BROKEN_ENGINES (comma-separated wgmma, wide, async:
// what make gpu-check's engine smoke found wrong or hanging) takes those engines out of
// auto's choice, which then falls back to the next one the operands allow; forced modes
// are not affected.  CPU tensors (the gemm_engine operator) are judged by the
// operand rules alone; auto then answers as for an sm_80 GPU (no wgmma).
enum class Staging { kAuto, kSync, kAsync, kWide, kWgmma };

Staging staging_mode() {
  const char* v = std::getenv("FBP_CUDA_STAGING");
  const std::string mode = v == nullptr ? "" : v;
  if (mode.empty() || mode == "auto") return Staging::kAuto;
  if (mode == "sync") return Staging::kSync;
  if (mode == "async") return Staging::kAsync;
  if (mode == "wide") return Staging::kWide;
  if (mode == "wgmma") return Staging::kWgmma;
  TORCH_CHECK(false, "fbp cuda: FBP_CUDA_STAGING must be auto, sync, async, wide or wgmma, got '",
              mode, "'");
}

// Whether FBP_CUDA_BROKEN_ENGINES names `engine` (read per call, like the mode).
bool engine_broken(const char* engine) {
  const char* v = std::getenv("FBP_CUDA_BROKEN_ENGINES");
  if (v == nullptr) return false;
  const std::string list = std::string(",") + v + ",";
  return list.find(std::string(",") + engine + ",") != std::string::npos;
}

const char* staging_name(Staging mode) {
  switch (mode) {
    case Staging::kSync: return "sync";
    case Staging::kAsync: return "async";
    case Staging::kWide: return "wide";
    case Staging::kWgmma: return "wgmma";
    default: return "auto";
  }
}

constexpr const char* kOperandNames[] = {"x", "y", "weight_x", "weight_y"};

MatrixArg matrix_of(const Tensor& t) {
  return MatrixArg{t.data_ptr(), t.size(0), t.size(1), t.stride(0), t.stride(1)};
}

// Why x, y and the weights cannot take a cp.async engine ("" when they can).  Only the
// operands a GEMM reads count: a side whose projection is given (kept, or co-attention's
// shared input projected by cuBLAS) is never staged.  The compute-capability part applies
// to CUDA tensors only.
std::string cp_async_refusal(const Tensor& x, const Tensor& y, const Tensor& wx,
                             const Tensor& wy, bool gemm_x = true, bool gemm_y = true) {
  const auto d = x.scalar_type();
  if (d != at::kHalf && d != at::kBFloat16)
    return std::string("the dtype is ") + c10::toString(d) +
           " (only float16 and bfloat16 have a cp.async engine)";
  const Tensor* operands[] = {&x, &y, &wx, &wy};
  const bool staged[] = {gemm_x, gemm_y, gemm_x, gemm_y};
  for (int i = 0; i < 4; ++i) {
    const Tensor& t = *operands[i];
    if (staged[i] && !cp_async_operand_ok(matrix_of(t), 2))
      return std::string(kOperandNames[i]) + " is not contiguous along its last dimension with "
             "16-byte-aligned rows (strides " + c10::str(t.strides()) + ", data pointer % 16 = " +
             std::to_string(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16) + ")";
  }
  if (x.is_cuda() && at::cuda::getDeviceProperties(x.get_device())->major < 8)
    return "the GPU's compute capability is below 8.0 (cp.async)";
  return "";
}

// Why an engine of `bytes` of shared memory per block does not fit the GPU ("" when it
// does; CPU tensors: as on a GPU with room for it).
std::string smem_refusal(const Tensor& x, Engine engine, const char* what) {
  if (!x.is_cuda()) return "";
  const EngineInfo info = engine_info(kernel_dtype(x.scalar_type()), engine);
  const size_t limit = at::cuda::getDeviceProperties(x.get_device())->sharedMemPerBlockOptin;
  if (static_cast<size_t>(info.smem_bytes) <= limit) return "";
  return "the GPU allows " + std::to_string(limit) + " bytes of shared memory per block, the " +
         what + " engine needs " + std::to_string(info.smem_bytes);
}

// Why the wgmma + TMA engine cannot run these operands ("" when it can, given that
// cp_async_refusal is empty): the build, the GPU (CUDA tensors), the tensor-map rules.
std::string wgmma_refusal(const Tensor& x, const Tensor& y, const Tensor& wx, const Tensor& wy,
                          bool gemm_x, bool gemm_y) {
  if (!wgmma_built())
    return "this build has no sm_90a code (TORCH_CUDA_ARCH_LIST must name 9.0a)";
  if (x.is_cuda()) {
    const auto* props = at::cuda::getDeviceProperties(x.get_device());
    if (!tma_encoder_available())
      return "the CUDA driver provides no cuTensorMapEncodeTiled (TMA tensor maps)";
    if (props->major != 9)
      return "the GPU's compute capability is " + std::to_string(props->major) + "." +
             std::to_string(props->minor) + " (wgmma and TMA need 9.0)";
    const std::string room = smem_refusal(x, Engine::kWgmma, "wgmma");
    if (!room.empty()) return room;
  }
  const Tensor* operands[] = {&x, &y, &wx, &wy};
  const bool staged[] = {gemm_x, gemm_y, gemm_x, gemm_y};
  for (int i = 0; i < 4; ++i)
    if (staged[i] && !tma_operand_ok(matrix_of(*operands[i]), 2))
      return std::string(kOperandNames[i]) + " (sizes " + c10::str(operands[i]->sizes()) +
             ", strides " + c10::str(operands[i]->strides()) + ") cannot be read through a "
             "TMA tensor map: an empty dimension, overlapping rows (a broadcast row), or a "
             "dimension of 2^31 or more (the copies' coordinates are 32-bit)";
  return "";
}

// The engine for these operands, `rows` broadcast rows, and the sides a GEMM reads.
Engine choose_engine(const Tensor& x, const Tensor& y, const Tensor& wx, const Tensor& wy,
                     int64_t rows, bool gemm_x = true, bool gemm_y = true) {
  const Staging mode = staging_mode();
  const auto d = x.scalar_type();
  if (mode == Staging::kSync || (d != at::kHalf && d != at::kBFloat16)) return Engine::kDefault;
  const std::string refusal = cp_async_refusal(x, y, wx, wy, gemm_x, gemm_y);
  TORCH_CHECK(mode == Staging::kAuto || refusal.empty(), "fbp cuda: FBP_CUDA_STAGING=",
              staging_name(mode), ", but ", refusal);
  if (!refusal.empty()) return Engine::kDefault;
  if (mode == Staging::kAsync) return Engine::kAsync;
  if (mode == Staging::kWgmma) {
    const std::string why = wgmma_refusal(x, y, wx, wy, gemm_x, gemm_y);
    TORCH_CHECK(why.empty(), "fbp cuda: FBP_CUDA_STAGING=wgmma, but ", why);
    return Engine::kWgmma;
  }
  const std::string too_big = smem_refusal(x, Engine::kAsyncWide, "128x128");
  TORCH_CHECK(mode != Staging::kWide || too_big.empty(), "fbp cuda: FBP_CUDA_STAGING=wide, but ",
              too_big);
  if (mode == Staging::kAuto) {
    if (x.is_cuda() && !engine_broken("wgmma") &&
        wgmma_refusal(x, y, wx, wy, gemm_x, gemm_y).empty())
      return Engine::kWgmma;
    const bool wide_ok = too_big.empty() && !engine_broken("wide");
    const bool async_ok = !engine_broken("async");
    if (rows <= kWideEngineAboveRows)
      return async_ok ? Engine::kAsync : wide_ok ? Engine::kAsyncWide : Engine::kDefault;
    return wide_ok ? Engine::kAsyncWide : async_ok ? Engine::kAsync : Engine::kDefault;
  }
  return Engine::kAsyncWide;  // kWide (its refusals checked above)
}

const char* engine_name(Engine engine) {
  switch (engine) {
    case Engine::kWgmma: return "wgmma";
    case Engine::kAsyncWide: return "wide";
    case Engine::kAsync: return "async";
    default: return "default";
  }
}

// A fused kernel's launch status as an error that names the kernel and its engine (and,
// for the wgmma engine, what avoids it: its tensor maps are encoded at launch).
void check_launch(cudaError_t err, const char* kernel, Engine engine) {
  TORCH_CHECK(err == cudaSuccess, "fbp cuda: the ", kernel, " kernel failed to launch on the ",
              engine_name(engine), " engine: ", cudaGetErrorString(err),
              engine == Engine::kWgmma
                  ? " (its TMA tensor maps are encoded at launch; FBP_CUDA_STAGING=wide runs "
                    "the cp.async engine instead)"
                  : "");
}

void check_operands_2d(const Tensor& x, const Tensor& y, const Tensor& wx, const Tensor& wy,
                       const char* op) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && wx.dim() == 2 && wy.dim() == 2,
              "fbp: ", op, " takes the 2-D operands of fbp_forward");
}

// The operator forms (CPU and CUDA): whether the kernels would stage these operands
// with cp.async, and with which engine, under the current FBP_CUDA_STAGING.
bool cp_async_staging_op(const Tensor& x, const Tensor& y, const Tensor& wx, const Tensor& wy) {
  check_operands_2d(x, y, wx, wy, "cp_async_staging");
  return choose_engine(x, y, wx, wy, x.size(0)) != Engine::kDefault;
}

std::string gemm_engine_op(const Tensor& x, const Tensor& y, const Tensor& wx, const Tensor& wy,
                           int64_t rows, bool gemm_x, bool gemm_y) {
  check_operands_2d(x, y, wx, wy, "gemm_engine");
  return engine_name(choose_engine(x, y, wx, wy, rows > 0 ? rows : x.size(0), gemm_x, gemm_y));
}

// [BM, BN, BK, threads, stages, shared bytes per block] of engine "default" / "async" /
// "wide" / "wgmma" for `dtype` (empty when the dtype has no such engine): the tile table of the
// compile report and the cost model, from the headers themselves.
std::vector<int64_t> engine_tile_op(c10::string_view engine, at::ScalarType dtype) {
  check_float(at::empty({0}, at::TensorOptions().dtype(dtype)), "dtype");
  const std::string name(engine);
  TORCH_CHECK(name == "default" || name == "async" || name == "wide" || name == "wgmma",
              "fbp: engine must be default, async, wide or wgmma, got '", name, "'");
  const Engine e = name == "wgmma"  ? Engine::kWgmma
                   : name == "wide" ? Engine::kAsyncWide
                   : name == "async" ? Engine::kAsync
                                     : Engine::kDefault;
  const EngineInfo info = engine_info(kernel_dtype(dtype), e);
  if (info.threads == 0) return {};
  return {info.bm, info.bn, info.bk, info.threads, info.stages, info.smem_bytes};
}

// ------------------------------------------------------------------ forward
// (out, norm, a, c, p): a and c are the raw projections x W_x^T (x's rows, K) and y W_y^T
// (y's rows, K) in the input dtype when keep_x / keep_y (the memory modes that keep them
// for backward), else (0,) markers; p (rows, K) is the block's product when chain (MFH:
// what the next block multiplies in), else a marker.
using ForwardOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

ForwardOut forward_meta(const Tensor& x, const Tensor& y, const Tensor& wx, const Tensor& wy,
                        const std::optional<Tensor>& bx, const std::optional<Tensor>& by,
                        int64_t factor, double dropout, std::optional<int64_t> seed,
                        bool normalize, double eps, int64_t activation, int64_t norm_group,
                        bool keep_x, bool keep_y, int64_t rows_per_x, int64_t rows_per_y,
                        const std::optional<Tensor>& prev, bool chain) {
  const int64_t rows = check_forward_args(x, y, wx, wy, bx, by, factor, dropout, eps,
                                          rows_per_x, rows_per_y);
  check_drop_in_args(rows, activation, norm_group);
  const int64_t K = wx.size(0), o = K / factor;
  check_chain(prev, rows, x, wx, "prev");
  Tensor out = at::empty({rows, o}, x.options());
  Tensor norm = normalize ? at::empty({rows}, x.options().dtype(acc_type(x.scalar_type())))
                          : empty_marker(x);
  Tensor a = keep_x ? at::empty({x.size(0), K}, x.options()) : empty_marker(x);
  Tensor c = keep_y ? at::empty({y.size(0), K}, x.options()) : empty_marker(x);
  Tensor p = chain ? at::empty({rows, K}, x.options()) : empty_marker(x);
  return {out, norm, a, c, p};
}

// The raw projection of a shared input (rows_per > 1: one row per group), formed once by
// cuBLAS for the kernels to read per group; undefined for a per-row input.
Tensor shared_projection(const Tensor& side, const Tensor& w, int64_t rows_per,
                         const std::optional<Tensor>& kept) {
  if (rows_per == 1) return Tensor();
  return kept.has_value() ? kept->contiguous() : at::mm(side, w.t());
}

ForwardOut forward_impl(const Tensor& x, const Tensor& y, const Tensor& wx, const Tensor& wy,
                        const std::optional<Tensor>& bx, const std::optional<Tensor>& by,
                        int64_t factor, double dropout, std::optional<int64_t> seed,
                        bool normalize, double eps, int64_t activation, int64_t norm_group,
                        bool keep_x, bool keep_y, int64_t rows_per_x, int64_t rows_per_y,
                        const std::optional<Tensor>& prev, bool chain) {
  auto [out, norm, a, c, p] =
      forward_meta(x, y, wx, wy, bx, by, factor, dropout, seed, normalize, eps, activation,
                   norm_group, keep_x, keep_y, rows_per_x, rows_per_y, prev, chain);
  TORCH_CHECK(x.is_cuda(), "fbp cuda: expected CUDA tensors, got ", x.device());
  if (x.scalar_type() == at::kBFloat16) {
    TORCH_CHECK(at::cuda::getDeviceProperties(x.get_device())->major >= 8,
                "fbp cuda: bfloat16 needs compute capability >= 8.0 (tensor-core bf16)");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = out.size(0), o = out.size(1);
  if (rows == 0) return {out, norm, a, c, p};
  const DType dtype = kernel_dtype(x.scalar_type());
  const Engine engine = choose_engine(x, y, wx, wy, rows, rows_per_x == 1, rows_per_y == 1);
  const Grid grid = forward_grid(dtype, engine, rows, o, factor);
  check_grid(grid, "out_features", o);
  const Tensor bias_x = maybe_contiguous(bx), bias_y = maybe_contiguous(by);
  // A shared input's projection, once per group (and it is what keep returns for it).
  const Tensor px = shared_projection(x, wx, rows_per_x, std::nullopt);
  const Tensor py = shared_projection(y, wy, rows_per_y, std::nullopt);
  if (keep_x && px.defined()) a = px;
  if (keep_y && py.defined()) c = py;
  // Scratch, freed on return (stream-ordered by the caching allocator): per output
  // tile the power-of-two-scaled part (e, q) of each row's sum of t^2, and for
  // fp16/bf16 the fp32 t itself.
  const auto acc_opts = x.options().dtype(acc_type(x.scalar_type()));
  Tensor partial, t_scratch;
  if (normalize) {
    partial = at::empty({rows, 2 * grid.y}, acc_opts);
    if (acc_type(x.scalar_type()) != x.scalar_type()) t_scratch = at::empty({rows, o}, acc_opts);
  }
  ForwardArgs args{};
  args.dtype = dtype;
  args.x = matrix_arg(x);
  args.y = matrix_arg(y);
  args.weight_x = matrix_arg(wx);
  args.weight_y = matrix_arg(wy);
  args.bias_x = optional_ptr(bias_x);
  args.bias_y = optional_ptr(bias_y);
  args.out = out.data_ptr();
  args.norm = normalize ? norm.data_ptr() : nullptr;
  args.t_scratch = t_scratch.defined() ? t_scratch.data_ptr() : nullptr;
  args.partial = partial.defined() ? partial.data_ptr() : nullptr;
  args.keep_x = keep_x && !px.defined() ? a.data_ptr() : nullptr;
  args.keep_y = keep_y && !py.defined() ? c.data_ptr() : nullptr;
  args.src_x = optional_ptr(px);
  args.src_y = optional_ptr(py);
  args.div_x = rows_per_x;
  args.div_y = rows_per_y;
  const Tensor prev_c = maybe_contiguous(prev);
  args.prev = optional_ptr(prev_c);
  args.chain = chain ? p.data_ptr() : nullptr;
  args.rows = rows;
  args.o = o;
  args.factor = factor;
  args.dropout = dropout_arg(dropout, seed);
  args.normalize = normalize;
  args.eps = eps;
  args.activation = static_cast<int>(activation);
  args.norm_group = norm_group;
  args.engine = engine;
  check_launch(launch_forward(args, at::cuda::getCurrentCUDAStream()), "fused forward", engine);
  return {out, norm, a, c, p};
}

// ------------------------------------------------------------------ backward
// (dx, dy, dW_x, dW_y, db_x, db_y, carry): carry (rows, K) is the gradient an MFH block
// passes to the previous block's product when carry_out, else a marker.
using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

int64_t check_all_backward_args(const Tensor& grad, const Tensor& x, const Tensor& y,
                                const Tensor& wx, const Tensor& wy,
                                const std::optional<Tensor>& bx,
                                const std::optional<Tensor>& by, const Tensor& out,
                                const Tensor& norm, int64_t factor, double dropout,
                                bool normalize, double eps, int64_t activation,
                                int64_t norm_group, const std::optional<Tensor>& a,
                                const std::optional<Tensor>& c, int64_t rows_per_x,
                                int64_t rows_per_y, const std::optional<Tensor>& prev,
                                const std::optional<Tensor>& carry) {
  const int64_t rows = check_forward_args(x, y, wx, wy, bx, by, factor, dropout, eps,
                                          rows_per_x, rows_per_y);
  check_drop_in_args(rows, activation, norm_group);
  check_backward_args(grad, x, wx, out, norm, factor, normalize, rows);
  check_kept(a, x, x, wx, "a");
  check_kept(c, y, x, wx, "c");
  check_chain(prev, rows, x, wx, "prev");
  check_chain(carry, rows, x, wx, "carry");
  return rows;
}

Grads backward_meta(const Tensor& grad, const Tensor& x, const Tensor& y, const Tensor& wx,
                    const Tensor& wy, const std::optional<Tensor>& bx,
                    const std::optional<Tensor>& by, const Tensor& out, const Tensor& norm,
                    int64_t factor, double dropout, std::optional<int64_t> seed, bool normalize,
                    double eps, int64_t activation, int64_t norm_group,
                    const std::optional<Tensor>& a, const std::optional<Tensor>& c,
                    int64_t rows_per_x, int64_t rows_per_y, const std::optional<Tensor>& prev,
                    const std::optional<Tensor>& carry, bool carry_out) {
  const int64_t rows =
      check_all_backward_args(grad, x, y, wx, wy, bx, by, out, norm, factor, dropout, normalize,
                              eps, activation, norm_group, a, c, rows_per_x, rows_per_y, prev,
                              carry);
  return {at::empty_like(x, at::MemoryFormat::Contiguous),
          at::empty_like(y, at::MemoryFormat::Contiguous),
          at::empty_like(wx, at::MemoryFormat::Contiguous),
          at::empty_like(wy, at::MemoryFormat::Contiguous),
          bx.has_value() ? at::empty_like(*bx) : empty_marker(x),
          by.has_value() ? at::empty_like(*by) : empty_marker(x),
          carry_out ? at::empty({rows, wx.size(0)}, x.options()) : empty_marker(x)};
}

// dx, dW, db of one side from its (rows, K) projection gradient d: a shared input's
// gradient is first summed over each group of rows_per rows (deterministic, one pass),
// so its GEMMs run on its own rows.
std::tuple<Tensor, Tensor, Tensor> side_grads(Tensor d, const Tensor& side, const Tensor& w,
                                              bool has_bias, int64_t rows_per) {
  if (rows_per > 1) d = d.view({side.size(0), rows_per, d.size(1)}).sum(1);
  Tensor dside = at::mm(d, w);
  Tensor dw = at::mm(d.t(), side);
  Tensor db = has_bias ? d.sum(0) : empty_marker(side);
  return {dside, dw, db};
}

Grads backward_impl(const Tensor& grad, const Tensor& x, const Tensor& y, const Tensor& wx,
                    const Tensor& wy, const std::optional<Tensor>& bx,
                    const std::optional<Tensor>& by, const Tensor& out, const Tensor& norm,
                    int64_t factor, double dropout, std::optional<int64_t> seed, bool normalize,
                    double eps, int64_t activation, int64_t norm_group,
                    const std::optional<Tensor>& a, const std::optional<Tensor>& c,
                    int64_t rows_per_x, int64_t rows_per_y, const std::optional<Tensor>& prev,
                    const std::optional<Tensor>& carry, bool carry_out) {
  const int64_t rows =
      check_all_backward_args(grad, x, y, wx, wy, bx, by, out, norm, factor, dropout, normalize,
                              eps, activation, norm_group, a, c, rows_per_x, rows_per_y, prev,
                              carry);
  TORCH_CHECK(x.is_cuda(), "fbp cuda: expected CUDA tensors, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_type(x.scalar_type());
  const DType dtype = kernel_dtype(x.scalar_type());
  const int64_t K = wx.size(0), o = K / factor;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // The sides a GEMM reads (the others' projections are given: kept, or shared).
  const bool gemm_x = rows_per_x == 1 && !a.has_value();
  const bool gemm_y = rows_per_y == 1 && !c.has_value();
  const Engine engine =
      rows > 0 ? choose_engine(x, y, wx, wy, rows, gemm_x, gemm_y) : Engine::kDefault;
  const Grid grid = projection_grads_grid(dtype, engine, rows, K);
  check_grid(grid, "factor * out_features", K);
  // dL/ds (rows, o) in the accumulation dtype.
  Tensor ds;
  if (normalize) {
    const Tensor g = grad.contiguous(), z = out.contiguous(), nrm = norm.contiguous();
    ds = at::empty({rows, o}, x.options().dtype(acc));
    GradPooledArgs pooled{dtype, g.data_ptr(), z.data_ptr(), nrm.data_ptr(), ds.data_ptr(),
                          rows, o, eps, norm_group};
    C10_CUDA_CHECK(launch_grad_pooled(pooled, stream));
  } else {
    ds = grad.to(acc).contiguous();
  }
  Tensor da = at::empty({rows, K}, x.options());
  Tensor dc = at::empty({rows, K}, x.options());
  const Tensor bias_x = maybe_contiguous(bx), bias_y = maybe_contiguous(by);
  // Each side's projection is read where it exists (kept, or a shared input's, formed
  // here when not kept: one row per group), else recomputed tile by tile.
  Tensor px = shared_projection(x, wx, rows_per_x, a);
  Tensor py = shared_projection(y, wy, rows_per_y, c);
  if (!px.defined() && a.has_value()) px = a->contiguous();
  if (!py.defined() && c.has_value()) py = c->contiguous();
  ProjectionGradArgs args{};
  args.dtype = dtype;
  args.x = matrix_arg(x);
  args.y = matrix_arg(y);
  args.weight_x = matrix_arg(wx);
  args.weight_y = matrix_arg(wy);
  args.bias_x = optional_ptr(bias_x);
  args.bias_y = optional_ptr(bias_y);
  args.ds = ds.data_ptr();
  args.src_x = optional_ptr(px);
  args.src_y = optional_ptr(py);
  args.div_x = rows_per_x;
  args.div_y = rows_per_y;
  const Tensor prev_c = maybe_contiguous(prev), carry_c = maybe_contiguous(carry);
  Tensor carry_next = carry_out ? at::empty({rows, K}, x.options()) : empty_marker(x);
  args.prev = optional_ptr(prev_c);
  args.carry_in = optional_ptr(carry_c);
  args.carry_out = carry_out ? carry_next.data_ptr() : nullptr;
  args.da = da.data_ptr();
  args.dc = dc.data_ptr();
  args.rows = rows;
  args.o = o;
  args.factor = factor;
  args.dropout = dropout_arg(dropout, seed);
  args.activation = static_cast<int>(activation);
  args.engine = engine;
  check_launch(launch_projection_grads(args, stream), "projection-gradient", engine);
  ds.reset();  // the transient buffers go as soon as the GEMMs have consumed them
  px.reset();
  py.reset();
  auto [dx, dwx, dbx] = side_grads(std::move(da), x, wx, bx.has_value(), rows_per_x);
  auto [dy, dwy, dby] = side_grads(std::move(dc), y, wy, by.has_value(), rows_per_y);
  return {dx, dy, dwx, dwy, dbx, dby, carry_next};
}

// ------------------------------------------------------------------ dropout mask
Tensor dropout_keep_meta(const Tensor& index, int64_t seed, double rate) {
  return at::empty(index.sizes(), index.options().dtype(at::kBool));
}

void check_keep_args(const Tensor& index, double rate) {
  TORCH_CHECK(index.scalar_type() == at::kLong, "fbp: index must be int64, got ",
              index.scalar_type());
  TORCH_CHECK(rate >= 0.0 && rate < 1.0, "fbp: dropout rate must be in [0, 1), got ", rate);
}

Tensor dropout_keep_cpu(const Tensor& index, int64_t seed, double rate) {
  check_keep_args(index, rate);
  auto idx = index.contiguous();
  auto keep = at::empty(idx.sizes(), idx.options().dtype(at::kBool));
  const int64_t* src = idx.data_ptr<int64_t>();
  bool* dst = keep.data_ptr<bool>();
  for (int64_t i = 0; i < idx.numel(); ++i)
    dst[i] = dropout_keep(static_cast<uint64_t>(seed), static_cast<uint64_t>(src[i]),
                          static_cast<float>(rate));
  return keep;
}

Tensor dropout_keep_gpu(const Tensor& index, int64_t seed, double rate) {
  check_keep_args(index, rate);
  const c10::cuda::CUDAGuard guard(index.device());
  const Tensor idx = index.contiguous();
  Tensor keep = at::empty(idx.sizes(), idx.options().dtype(at::kBool));
  C10_CUDA_CHECK(launch_dropout_keep(idx.data_ptr<int64_t>(), keep.data_ptr<bool>(), idx.numel(),
                                     static_cast<uint64_t>(seed), rate,
                                     at::cuda::getCurrentCUDAStream()));
  return keep;
}

// Raw Philox4x32-10 on the CPU: counter words and output words as int64 in [0, 2^32).
Tensor philox_cpu(const Tensor& counter, int64_t key) {
  TORCH_CHECK(counter.scalar_type() == at::kLong && counter.dim() == 2 && counter.size(1) == 4,
              "fbp: counter must be an int64 (N, 4) tensor, got ", counter.scalar_type(), " ",
              counter.sizes());
  auto ctr = counter.contiguous();
  auto result = at::empty_like(ctr);
  const int64_t* c = ctr.data_ptr<int64_t>();
  int64_t* r = result.data_ptr<int64_t>();
  const auto k = static_cast<uint64_t>(key);
  for (int64_t i = 0; i < ctr.size(0); ++i) {
    const Philox4 out = philox4x32_10(
        Philox4{static_cast<uint32_t>(c[4 * i]), static_cast<uint32_t>(c[4 * i + 1]),
                static_cast<uint32_t>(c[4 * i + 2]), static_cast<uint32_t>(c[4 * i + 3])},
        static_cast<uint32_t>(k), static_cast<uint32_t>(k >> 32));
    r[4 * i] = out.x;
    r[4 * i + 1] = out.y;
    r[4 * i + 2] = out.z;
    r[4 * i + 3] = out.w;
  }
  return result;
}

// ------------------------------------------------------------------ host mirrors (tests)
// The kernels' per-row math run on the CPU through the same __host__ __device__
// functions (fbp_math.cuh), so the parts that decide finiteness can be tested
// without a GPU.

// The finishing kernels' combine of n scaled parts (e, q), in their order: `threads`
// threads (32: finish_norm_kernel's warp per row; kGroupThreads: a joint-normalisation
// group's block, fbp_reduce.cuh) each add parts t, t + threads, ... rescaled to the
// largest exponent; each warp adds its lanes by the xor butterfly (every lane ends with
// the same bits: IEEE addition commutes); the warp totals are added in warp order.
template <typename Acc>
Acc combine_parts(const Acc* parts, int64_t n, int threads) {
  int E = kNoExponent;
  for (int64_t i = 0; i < n; ++i) {
    const int e = static_cast<int>(parts[2 * i]);
    if (parts[2 * i + 1] > Acc(0) && e > E) E = e;
  }
  std::vector<Acc> lanes(threads, Acc(0));
  for (int l = 0; l < threads; ++l)
    for (int64_t i = l; i < n; i += threads)
      lanes[l] += norm_rescale(parts[2 * i], parts[2 * i + 1], E);
  Acc total = Acc(0);
  for (int w = 0; w < threads / 32; ++w) {
    Acc* warp = lanes.data() + 32 * w;
    for (int offset = 16; offset > 0; offset /= 2) {
      Acc next[32];
      for (int l = 0; l < 32; ++l) next[l] = warp[l] + warp[l ^ offset];
      std::copy(next, next + 32, warp);
    }
    // finish_norm_kernel uses the butterfly's result directly: 0 + x == x here.
    total += warp[0];
  }
  return norm_from(E, total);
}

// ||t|| per row (or per group of `group` consecutive rows, written to each of its rows)
// of t (rows, o): the forward kernel's parts, one per (row, output tile of per_tile
// outputs), then the finisher's combine.
template <typename Acc>
void row_norm_rows(const Acc* t, Acc* norm, int64_t rows, int64_t o, int64_t per_tile,
                   int64_t group) {
  const int64_t n_tiles = (o + per_tile - 1) / per_tile;
  std::vector<Acc> parts(2 * n_tiles * group);
  for (int64_t row0 = 0; row0 < rows; row0 += group) {
    for (int64_t r = 0; r < group; ++r) {
      const Acc* trow = t + (row0 + r) * o;
      for (int64_t i = 0; i < n_tiles; ++i) {
        const int64_t j0 = i * per_tile, n = std::min<int64_t>(per_tile, o - j0);
        Acc* part = parts.data() + 2 * (r * n_tiles + i);
        norm_partial(trow + j0, static_cast<int>(n), 1, part[0], part[1]);
      }
    }
    const Acc nrm = combine_parts(parts.data(), group * n_tiles, group > 1 ? kGroupThreads : 32);
    for (int64_t r = 0; r < group; ++r) norm[row0 + r] = nrm;
  }
}

void check_group(int64_t rows, int64_t group) {
  TORCH_CHECK(group >= 1 && rows % group == 0, "fbp: rows_per_group must be >= 1 and divide "
              "the ", rows, " rows, got ", group);
}

// ||t|| per row of t (rows, o), fp32 or fp64, as the forward kernel and its finisher
// compute it with `outputs_per_tile` outputs per block (per group of rows_per_group
// consecutive rows with joint normalisation).
Tensor row_norm_cpu(const Tensor& t, int64_t outputs_per_tile, int64_t rows_per_group) {
  TORCH_CHECK(t.dim() == 2 && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
              "fbp: t must be a 2-D float32 or float64 tensor, got ", t.scalar_type(), " ",
              t.sizes());
  TORCH_CHECK(outputs_per_tile >= 1, "fbp: outputs_per_tile must be >= 1, got ",
              outputs_per_tile);
  check_group(t.size(0), rows_per_group);
  const Tensor tc = t.contiguous();
  Tensor norm = at::empty({t.size(0)}, t.options());
  if (t.scalar_type() == at::kFloat)
    row_norm_rows(tc.data_ptr<float>(), norm.data_ptr<float>(), t.size(0), t.size(1),
                  outputs_per_tile, rows_per_group);
  else
    row_norm_rows(tc.data_ptr<double>(), norm.data_ptr<double>(), t.size(0), t.size(1),
                  outputs_per_tile, rows_per_group);
  return norm;
}

// ds per element, <z, g> taken over each group of `group` consecutive rows (the
// kernels' rule; summed here in plain order, the kernels in their reduction order).
template <typename Acc>
void grad_pooled_rows(const Acc* g, const Acc* z, const Acc* norm, Acc* ds, int64_t rows,
                      int64_t o, Acc sqrt_eps, int64_t group) {
  for (int64_t row0 = 0; row0 < rows; row0 += group) {
    const int64_t begin = row0 * o, end = begin + group * o;
    Acc dot = Acc(0);
    for (int64_t j = begin; j < end; ++j) dot += z[j] * g[j];
    for (int64_t j = begin; j < end; ++j)
      ds[j] = pooled_grad(g[j], z[j], dot, norm[row0], sqrt_eps);
  }
}

// ds = dL/ds (rows, o) from grad, out (rows, o) and norm (rows), all in one dtype
// (fp32 or fp64): what grad_pooled_kernel (grad_pooled_group_kernel for
// rows_per_group > 1) computes per element.
Tensor grad_pooled_cpu(const Tensor& grad, const Tensor& out, const Tensor& norm, double eps,
                       int64_t rows_per_group) {
  TORCH_CHECK(grad.dim() == 2 && out.sizes() == grad.sizes() && norm.dim() == 1 &&
                  norm.size(0) == grad.size(0),
              "fbp: grad_pooled needs grad, out (rows, o) and norm (rows,), got ", grad.sizes(),
              ", ", out.sizes(), ", ", norm.sizes());
  const auto d = grad.scalar_type();
  TORCH_CHECK((d == at::kFloat || d == at::kDouble) && out.scalar_type() == d &&
                  norm.scalar_type() == d,
              "fbp: grad_pooled needs one dtype, float32 or float64");
  check_group(grad.size(0), rows_per_group);
  const Tensor g = grad.contiguous(), z = out.contiguous(), n = norm.contiguous();
  Tensor ds = at::empty_like(g);
  if (d == at::kFloat)
    grad_pooled_rows(g.data_ptr<float>(), z.data_ptr<float>(), n.data_ptr<float>(),
                     ds.data_ptr<float>(), g.size(0), g.size(1),
                     static_cast<float>(std::sqrt(eps)), rows_per_group);
  else
    grad_pooled_rows(g.data_ptr<double>(), z.data_ptr<double>(), n.data_ptr<double>(),
                     ds.data_ptr<double>(), g.size(0), g.size(1), std::sqrt(eps),
                     rows_per_group);
  return ds;
}

// (activate(v), its derivative from the activated value) elementwise, fp32 or fp64:
// the kernels' activation math on the CPU.
std::tuple<Tensor, Tensor> activation_cpu(const Tensor& v, int64_t code) {
  TORCH_CHECK(v.scalar_type() == at::kFloat || v.scalar_type() == at::kDouble,
              "fbp: activation takes float32 or float64, got ", v.scalar_type());
  check_drop_in_args(0, code, 1);
  const Tensor vc = v.contiguous();
  Tensor act = at::empty_like(vc), grad = at::empty_like(vc);
  const int c = static_cast<int>(code);
  auto run = [&](auto* src, auto* a, auto* g) {
    for (int64_t i = 0; i < vc.numel(); ++i) {
      a[i] = activate(src[i], c);
      g[i] = activation_grad(a[i], c);
    }
  };
  if (v.scalar_type() == at::kFloat)
    run(vc.data_ptr<float>(), act.data_ptr<float>(), grad.data_ptr<float>());
  else
    run(vc.data_ptr<double>(), act.data_ptr<double>(), grad.data_ptr<double>());
  return {act, grad};
}

}  // namespace
}  // namespace fbp

TORCH_LIBRARY(fbp_kernels_cuda, m) {
  m.def("fbp_forward(Tensor x, Tensor y, Tensor weight_x, Tensor weight_y, Tensor? bias_x, "
        "Tensor? bias_y, int factor, float dropout, int? seed, bool normalize, float eps, "
        "int activation=0, int norm_group=1, bool keep_x=False, bool keep_y=False, "
        "int rows_per_x=1, int rows_per_y=1, Tensor? prev=None, bool chain=False) "
        "-> (Tensor out, Tensor norm, Tensor a, Tensor c, Tensor p)");
  m.def("fbp_backward(Tensor grad, Tensor x, Tensor y, Tensor weight_x, Tensor weight_y, "
        "Tensor? bias_x, Tensor? bias_y, Tensor out, Tensor norm, int factor, float dropout, "
        "int? seed, bool normalize, float eps, int activation=0, int norm_group=1, "
        "Tensor? a=None, Tensor? c=None, int rows_per_x=1, int rows_per_y=1, Tensor? prev=None, "
        "Tensor? carry=None, bool carry_out=False) "
        "-> (Tensor dx, Tensor dy, Tensor dweight_x, Tensor dweight_y, Tensor dbias_x, "
        "Tensor dbias_y, Tensor carry_next)");
  m.def("dropout_keep(Tensor index, int seed, float rate) -> Tensor");
  m.def("philox4x32_10(Tensor counter, int key) -> Tensor");
  m.def("row_norm(Tensor t, int outputs_per_tile, int rows_per_group=1) -> Tensor");
  m.def("grad_pooled(Tensor grad, Tensor out, Tensor norm, float eps, int rows_per_group=1) "
        "-> Tensor");
  m.def("activation(Tensor v, int code) -> (Tensor act, Tensor grad)");
  m.def("cp_async_staging(Tensor x, Tensor y, Tensor weight_x, Tensor weight_y) -> bool");
  m.def("gemm_engine(Tensor x, Tensor y, Tensor weight_x, Tensor weight_y, int rows=0, "
        "bool gemm_x=True, bool gemm_y=True) -> str");
  // No tensor arguments, so no dispatch key: one kernel for every backend.
  m.def("engine_tile(str engine, ScalarType dtype) -> int[]", &fbp::engine_tile_op);
  m.def("wgmma_built() -> bool", &fbp::wgmma_built);
}

TORCH_LIBRARY_IMPL(fbp_kernels_cuda, CUDA, m) {
  m.impl("fbp_forward", &fbp::forward_impl);
  m.impl("fbp_backward", &fbp::backward_impl);
  m.impl("dropout_keep", &fbp::dropout_keep_gpu);
  m.impl("cp_async_staging", &fbp::cp_async_staging_op);
  m.impl("gemm_engine", &fbp::gemm_engine_op);
}

TORCH_LIBRARY_IMPL(fbp_kernels_cuda, Meta, m) {
  m.impl("fbp_forward", &fbp::forward_meta);
  m.impl("fbp_backward", &fbp::backward_meta);
  m.impl("dropout_keep", &fbp::dropout_keep_meta);
}

TORCH_LIBRARY_IMPL(fbp_kernels_cuda, CPU, m) {
  m.impl("dropout_keep", &fbp::dropout_keep_cpu);
  m.impl("philox4x32_10", &fbp::philox_cpu);
  m.impl("row_norm", &fbp::row_norm_cpu);
  m.impl("grad_pooled", &fbp::grad_pooled_cpu);
  m.impl("activation", &fbp::activation_cpu);
  m.impl("cp_async_staging", &fbp::cp_async_staging_op);
  m.impl("gemm_engine", &fbp::gemm_engine_op);
}

// Lets `import fbp_kernels._C` (the ahead-of-time build) load the library and so
// register the operators above; the just-in-time build loads it with
// torch.ops.load_library instead and never calls this.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
