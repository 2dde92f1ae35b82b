// FBP backward: the two fused kernels before the (cuBLAS) weight and input GEMMs.
//
// 1. grad_pooled_kernel, one warp per row: ds = dL/ds (rows, o) from g = dL/dz, the
//    output z and ||t|| (torch_backend.grad_pooled, SPEC.md):
//        r = max(||t||, delta);  dt = (g - z <z, g>) / r   (g / delta if ||t|| <= delta)
//        t = z r;                ds = dt * 0.5 / (|t| + sqrt(eps))
// 2. projection_grads_kernel, per (BM rows, BN projected columns) tile: recompute a
//    and c with the forward's GEMM tiles, then
//        dp = ds[row, col / factor] * keep(seed, row*K + col) / (1 - rate)
//        da = dp * c,  dc = dp * a
//    written to two transient (rows, K) buffers in the input dtype.  The binding
//    then forms dx = da W_x, dW_x = da^T x, db_x = sum_rows da (same for y) with
//    cuBLAS and frees them.  Peak extra memory: 2 * rows * K input-dtype values plus
//    rows * o of ds.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "fbp_launch.h"
#include "fbp_math.cuh"
#include "fbp_tile.cuh"

namespace fbp {
namespace {

template <typename T, typename Acc>
__global__ void grad_pooled_kernel(const T* grad, const T* out, const Acc* norm, Acc* ds,
                                   int64_t rows, int64_t o, Acc sqrt_eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // warp-uniform
  const T* g = grad + row * o;
  const T* z = out + row * o;
  Acc dot = Acc(0);
  for (int64_t j = lane; j < o; j += 32) dot += to_acc<Acc>(z[j]) * to_acc<Acc>(g[j]);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
  const Acc nrm = norm[row];
  const Acc delta = Acc(kNormDelta);
  const bool clamped = !(nrm > delta);
  const Acc r = clamped ? delta : nrm;
  for (int64_t j = lane; j < o; j += 32) {
    const Acc gj = to_acc<Acc>(g[j]), zj = to_acc<Acc>(z[j]);
    const Acc dt = clamped ? gj / delta : (gj - zj * dot) / r;
    ds[row * o + j] = dt * signed_sqrt_grad_from_t(zj * r, sqrt_eps);
  }
}

template <typename T, typename Acc>
struct ProjectionGradParams {
  Matrix<T> x, y, wx, wy;
  const T* bias_x;
  const T* bias_y;
  const Acc* ds;  // (rows, o)
  T* da;          // (rows, K)
  T* dc;
  int64_t rows, o, factor;
  float rate;
  Acc scale;
  uint64_t seed;
  bool dropout;
};

template <typename T, class E>
// minBlocks = 1: without it ptxas (CUDA 13) capped registers and spilled.
__global__ void __launch_bounds__(E::kThreads, 1)
projection_grads_kernel(const ProjectionGradParams<T, typename E::Acc> p) {
  using Acc = typename E::Acc;
  using Smem = TileSmem<E>;
  __shared__ __align__(128) unsigned char smem[Smem::kBytes];
  Acc* pc = reinterpret_cast<Acc*>(smem);
  Acc* pa = reinterpret_cast<Acc*>(smem + Smem::kUnionBytes);
  constexpr int kLd = E::kLdOut;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * E::BM;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * E::BN;
  const int64_t K = p.o * p.factor;

  E::gemm(p.x, row0, p.wx, col0, smem, pa);
  E::gemm(p.y, row0, p.wy, col0, smem, pc);
  __syncthreads();
  // Consecutive threads take consecutive columns: coalesced da/dc stores.
  for (int e = threadIdx.x; e < E::BM * E::BN; e += E::kThreads) {
    const int r = e / E::BN, cc = e % E::BN;
    const int64_t row = row0 + r, col = col0 + cc;
    if (row >= p.rows || col >= K) continue;
    Acc a = pa[r * kLd + cc], c = pc[r * kLd + cc];
    if (p.bias_x) a += to_acc<Acc>(p.bias_x[col]);
    if (p.bias_y) c += to_acc<Acc>(p.bias_y[col]);
    Acc dp = p.ds[row * p.o + col / p.factor];
    if (p.dropout)
      dp = dropout_keep(p.seed, static_cast<uint64_t>(row * K + col), p.rate) ? dp * p.scale
                                                                             : Acc(0);
    p.da[row * K + col] = from_acc<T>(dp * c);
    p.dc[row * K + col] = from_acc<T>(dp * a);
  }
}

template <typename T>
void launch_grad_pooled(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& norm,
                        double eps, at::Tensor& ds) {
  using Acc = typename AccOf<T>::type;
  const int64_t rows = grad.size(0), o = grad.size(1);
  constexpr int kRowsPerBlock = 8;
  grad_pooled_kernel<T, Acc><<<static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock),
                               kRowsPerBlock * 32, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(grad.data_ptr()), reinterpret_cast<const T*>(out.data_ptr()),
      reinterpret_cast<const Acc*>(norm.data_ptr()), reinterpret_cast<Acc*>(ds.data_ptr()), rows,
      o, static_cast<Acc>(std::sqrt(eps)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_projection_grads(const at::Tensor& ds, const at::Tensor& x, const at::Tensor& y,
                             const at::Tensor& wx, const at::Tensor& wy, const at::Tensor& bx,
                             const at::Tensor& by, int64_t factor, double dropout,
                             std::optional<int64_t> seed, at::Tensor& da, at::Tensor& dc) {
  using E = typename EngineFor<T>::type;
  using Acc = typename E::Acc;
  const int64_t rows = x.size(0), K = wx.size(0);
  const int64_t row_tiles = (rows + E::BM - 1) / E::BM, col_tiles = (K + E::BN - 1) / E::BN;
  TORCH_CHECK(col_tiles <= 65535, "fbp cuda: factor * out_features = ", K,
              " is too large for the backward grid");
  TORCH_CHECK(row_tiles <= INT32_MAX, "fbp cuda: too many rows (", rows, ")");
  ProjectionGradParams<T, Acc> p;
  p.x = matrix<T>(x);
  p.y = matrix<T>(y);
  p.wx = matrix<T>(wx);
  p.wy = matrix<T>(wy);
  p.bias_x = optional_ptr<T>(bx);
  p.bias_y = optional_ptr<T>(by);
  p.ds = reinterpret_cast<const Acc*>(ds.data_ptr());
  p.da = reinterpret_cast<T*>(da.data_ptr());
  p.dc = reinterpret_cast<T*>(dc.data_ptr());
  p.rows = rows;
  p.o = K / factor;
  p.factor = factor;
  p.dropout = seed.has_value() && dropout > 0.0;
  p.rate = static_cast<float>(dropout);
  p.scale = static_cast<Acc>(1.0 / (1.0 - dropout));
  p.seed = static_cast<uint64_t>(seed.value_or(0));
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles));
  projection_grads_kernel<T, E><<<grid, E::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor grad_pooled_cuda(const at::Tensor& grad, const at::Tensor& out,
                            const at::Tensor& norm, double eps) {
  auto g = grad.contiguous();
  auto z = out.contiguous();
  auto nrm = norm.contiguous();
  auto ds = at::empty(g.sizes(), nrm.options());
  if (g.numel() == 0) return ds;
  switch (g.scalar_type()) {
    case at::kHalf: launch_grad_pooled<__half>(g, z, nrm, eps, ds); break;
    case at::kBFloat16: launch_grad_pooled<__nv_bfloat16>(g, z, nrm, eps, ds); break;
    case at::kFloat: launch_grad_pooled<float>(g, z, nrm, eps, ds); break;
    case at::kDouble: launch_grad_pooled<double>(g, z, nrm, eps, ds); break;
    default: TORCH_CHECK(false, "fbp cuda: unsupported dtype ", g.scalar_type());
  }
  return ds;
}

void projection_grads_cuda(const at::Tensor& ds, const at::Tensor& x, const at::Tensor& y,
                           const at::Tensor& weight_x, const at::Tensor& weight_y,
                           const at::Tensor& bias_x, const at::Tensor& bias_y,
                           int64_t factor, double dropout, std::optional<int64_t> seed,
                           at::Tensor& da, at::Tensor& dc) {
  if (x.size(0) == 0) return;
  switch (x.scalar_type()) {
    case at::kHalf:
      return launch_projection_grads<__half>(ds, x, y, weight_x, weight_y, bias_x, bias_y,
                                             factor, dropout, seed, da, dc);
    case at::kBFloat16:
      return launch_projection_grads<__nv_bfloat16>(ds, x, y, weight_x, weight_y, bias_x,
                                                    bias_y, factor, dropout, seed, da, dc);
    case at::kFloat:
      return launch_projection_grads<float>(ds, x, y, weight_x, weight_y, bias_x, bias_y,
                                            factor, dropout, seed, da, dc);
    case at::kDouble:
      return launch_projection_grads<double>(ds, x, y, weight_x, weight_y, bias_x, bias_y,
                                             factor, dropout, seed, da, dc);
    default:
      TORCH_CHECK(false, "fbp cuda: unsupported dtype ", x.scalar_type());
  }
}

}  // namespace fbp
