// Fused FBP forward: both projections, product, dropout, sum over `factor`
// consecutive columns, zero-safe signed square root and L2 normalisation.
//
// Grid: (row tiles of BM, output tiles of BO = max(1, BN / factor) outputs).  A
// block owns BM rows x BO outputs, i.e. the BO * factor projected columns that
// feed them, walked in chunks of BN columns (one chunk unless factor > BN).  For
// each chunk it computes the a and c tiles into shared memory (fp32/fp64), then
// each thread sums the products of its (row, output) pairs into registers.  No
// (rows, factor*o) intermediate ever reaches global memory.
//
// Row norms need every output of a row, which lives in several blocks.  Each block
// writes t = signed_sqrt(s) (to `out` itself for fp32/fp64, to an fp32 (rows, o)
// scratch for half types, so z is rounded once) and its partial sum of t^2 to a
// (rows, output tiles) buffer; a small finishing kernel (one warp per row) sums the
// partials in a fixed order (deterministic), writes ||t|| and scales the row.
// Extra global memory: (rows, n_tiles) partials, plus (rows, o) fp32 for fp16/bf16.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "fbp_launch.h"
#include "fbp_math.cuh"
#include "fbp_tile.cuh"

namespace fbp {
namespace {

template <typename T, typename Acc>
struct ForwardParams {
  Matrix<T> x, y, wx, wy;  // (rows, m), (rows, n), (K, m), (K, n)
  const T* bias_x;         // (K) or nullptr
  const T* bias_y;
  T* out;                  // (rows, o)
  Acc* t_buf;              // (rows, o): may alias out when T == Acc
  Acc* partial;            // (rows, n_tiles) partial sums of t^2
  int64_t rows, o, factor;
  int outs_per_tile;       // BO
  int n_tiles;
  Acc eps, sqrt_eps;
  float rate;              // dropout rate; keep when u >= rate
  Acc scale;               // 1 / (1 - rate)
  uint64_t seed;
  bool dropout, normalize;
};

template <typename T, class E>
// minBlocks = 1: without it ptxas (CUDA 13) capped registers and spilled.
__global__ void __launch_bounds__(E::kThreads, 1)
fused_forward_kernel(const ForwardParams<T, typename E::Acc> p) {
  using Acc = typename E::Acc;
  using Smem = TileSmem<E>;
  __shared__ __align__(128) unsigned char smem[Smem::kBytes];
  Acc* pc = reinterpret_cast<Acc*>(smem);  // aliases the staged inputs
  Acc* pa = reinterpret_cast<Acc*>(smem + Smem::kUnionBytes);
  constexpr int kLd = E::kLdOut;
  constexpr int kPairsPerThread = E::BM * E::BN / E::kThreads;

  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * E::BM;
  const int bo = p.outs_per_tile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * bo;
  const int64_t j_end = j0 + bo < p.o ? j0 + bo : p.o;
  const int64_t K = p.o * p.factor;

  // Pairs (row, output) of this block: idx = tid + q * kThreads, r = idx / bo, jo = idx % bo.
  // s[] lives only within one chunk's epilogue (not across the GEMMs, which need the
  // registers).  More than one chunk happens only when factor > BN, and then bo == 1:
  // thread tid owns row tid (q = 0) in every chunk and carries its running sum.
  Acc s[kPairsPerThread];
  Acc carry = Acc(0);
  const int64_t col_end = j_end * p.factor;
  for (int64_t cbeg = j0 * p.factor;; cbeg += E::BN) {
    E::gemm(p.x, row0, p.wx, cbeg, smem, pa);
    E::gemm(p.y, row0, p.wy, cbeg, smem, pc);
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kPairsPerThread; ++q) {
      s[q] = Acc(0);
      const int idx = threadIdx.x + q * E::kThreads;
      const int r = idx / bo, jo = idx % bo;
      const int64_t row = row0 + r, j = j0 + jo;
      if (r >= E::BM || row >= p.rows || j >= j_end) continue;
      const int64_t lo = j * p.factor > cbeg ? j * p.factor : cbeg;
      const int64_t hi = (j + 1) * p.factor < cbeg + E::BN ? (j + 1) * p.factor : cbeg + E::BN;
      Acc sum = Acc(0);
      for (int64_t col = lo; col < hi; ++col) {
        const int cc = static_cast<int>(col - cbeg);
        Acc a = pa[r * kLd + cc], c = pc[r * kLd + cc];
        if (p.bias_x) a += to_acc<Acc>(p.bias_x[col]);
        if (p.bias_y) c += to_acc<Acc>(p.bias_y[col]);
        Acc prod = a * c;
        if (p.dropout)
          prod = dropout_keep(p.seed, static_cast<uint64_t>(row * K + col), p.rate)
                     ? prod * p.scale : Acc(0);
        sum += prod;
      }
      if (bo == 1) {
        sum += carry;
        carry = sum;
      }
      s[q] = sum;
    }
    __syncthreads();  // pa and pc are overwritten next (next chunk, or t^2 below)
    if (cbeg + E::BN >= col_end) break;
  }

  if (!p.normalize) {  // block-uniform
#pragma unroll
    for (int q = 0; q < kPairsPerThread; ++q) {
      const int idx = threadIdx.x + q * E::kThreads;
      const int r = idx / bo, jo = idx % bo;
      const int64_t row = row0 + r, j = j0 + jo;
      if (r < E::BM && row < p.rows && j < j_end) p.out[row * p.o + j] = from_acc<T>(s[q]);
    }
    return;
  }

  Acc* t_sq = pa;  // reuse as [BM][kLd]: t^2 per (row, output) of this block
#pragma unroll
  for (int q = 0; q < kPairsPerThread; ++q) {
    const int idx = threadIdx.x + q * E::kThreads;
    const int r = idx / bo, jo = idx % bo;
    const int64_t row = row0 + r, j = j0 + jo;
    if (r >= E::BM || row >= p.rows || j >= j_end) continue;
    const Acc t = signed_sqrt(s[q], p.eps, p.sqrt_eps);
    p.t_buf[row * p.o + j] = t;
    t_sq[r * kLd + jo] = t * t;
  }
  __syncthreads();
  if (threadIdx.x < E::BM && row0 + threadIdx.x < p.rows) {
    const int r = threadIdx.x;
    Acc acc = Acc(0);
    for (int jo = 0; jo < j_end - j0; ++jo) acc += t_sq[r * kLd + jo];
    p.partial[(row0 + r) * p.n_tiles + blockIdx.y] = acc;
  }
}

// One warp per row: ||t|| from the partials (fixed order), then z = t / max(||t||, delta).
template <typename T, typename Acc>
__global__ void finish_norm_kernel(const Acc* t_buf, const Acc* partial, T* out, Acc* norm,
                                   int64_t rows, int64_t o, int n_tiles) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // warp-uniform
  Acc total = Acc(0);
  for (int i = lane; i < n_tiles; i += 32) total += partial[row * n_tiles + i];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    total += __shfl_xor_sync(0xffffffffu, total, offset);
  const Acc nrm = sqrt(total);
  if (lane == 0) norm[row] = nrm;
  const Acc denom = nrm > Acc(kNormDelta) ? nrm : Acc(kNormDelta);
  for (int64_t j = lane; j < o; j += 32) out[row * o + j] = from_acc<T>(t_buf[row * o + j] / denom);
}

template <typename T>
void launch_forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& wx,
                    const at::Tensor& wy, const at::Tensor& bx, const at::Tensor& by,
                    int64_t factor, double dropout, std::optional<int64_t> seed,
                    bool normalize, double eps, at::Tensor& out, at::Tensor& norm) {
  using E = typename EngineFor<T>::type;
  using Acc = typename E::Acc;
  const int64_t rows = x.size(0), K = wx.size(0), o = K / factor;
  const int bo = static_cast<int>(std::max<int64_t>(1, E::BN / factor));
  const int64_t n_tiles = (o + bo - 1) / bo;
  const int64_t row_tiles = (rows + E::BM - 1) / E::BM;
  TORCH_CHECK(n_tiles <= 65535, "fbp cuda: too many output tiles (", n_tiles,
              ") for the grid; out_features=", o, ", factor=", factor);
  TORCH_CHECK(row_tiles <= INT32_MAX, "fbp cuda: too many rows (", rows, ")");
  auto acc_opts = x.options().dtype(std::is_same<Acc, double>::value ? at::kDouble : at::kFloat);

  ForwardParams<T, Acc> p;
  p.x = matrix<T>(x);
  p.y = matrix<T>(y);
  p.wx = matrix<T>(wx);
  p.wy = matrix<T>(wy);
  p.bias_x = optional_ptr<T>(bx);
  p.bias_y = optional_ptr<T>(by);
  p.out = reinterpret_cast<T*>(out.data_ptr());
  at::Tensor t_buf, partial;
  if (normalize) {
    // fp32/fp64: t goes straight into out and is scaled in place by the finisher.
    t_buf = std::is_same<T, Acc>::value ? out : at::empty({rows, o}, acc_opts);
    partial = at::empty({rows, n_tiles}, acc_opts);
    p.t_buf = reinterpret_cast<Acc*>(t_buf.data_ptr());
    p.partial = reinterpret_cast<Acc*>(partial.data_ptr());
  } else {
    p.t_buf = nullptr;
    p.partial = nullptr;
  }
  p.rows = rows;
  p.o = o;
  p.factor = factor;
  p.outs_per_tile = bo;
  p.n_tiles = static_cast<int>(n_tiles);
  p.eps = static_cast<Acc>(eps);
  p.sqrt_eps = static_cast<Acc>(std::sqrt(eps));
  p.dropout = seed.has_value() && dropout > 0.0;
  p.rate = static_cast<float>(dropout);
  p.scale = static_cast<Acc>(1.0 / (1.0 - dropout));
  p.seed = static_cast<uint64_t>(seed.value_or(0));
  p.normalize = normalize;

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(n_tiles));
  fused_forward_kernel<T, E><<<grid, E::kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (normalize) {
    constexpr int kRowsPerBlock = 8;
    finish_norm_kernel<T, Acc><<<static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock),
                                 kRowsPerBlock * 32, 0, stream>>>(
        p.t_buf, p.partial, p.out, reinterpret_cast<Acc*>(norm.data_ptr()), rows, o, p.n_tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

__global__ void dropout_keep_kernel(const int64_t* index, bool* keep, int64_t numel,
                                    uint64_t seed, float rate) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < numel) keep[i] = dropout_keep(seed, static_cast<uint64_t>(index[i]), rate);
}

}  // namespace

void forward_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight_x,
                  const at::Tensor& weight_y, const at::Tensor& bias_x,
                  const at::Tensor& bias_y, int64_t factor, double dropout,
                  std::optional<int64_t> seed, bool normalize, double eps, at::Tensor& out,
                  at::Tensor& norm) {
  switch (x.scalar_type()) {
    case at::kHalf:
      return launch_forward<__half>(x, y, weight_x, weight_y, bias_x, bias_y, factor, dropout,
                                    seed, normalize, eps, out, norm);
    case at::kBFloat16:
      return launch_forward<__nv_bfloat16>(x, y, weight_x, weight_y, bias_x, bias_y, factor,
                                           dropout, seed, normalize, eps, out, norm);
    case at::kFloat:
      return launch_forward<float>(x, y, weight_x, weight_y, bias_x, bias_y, factor, dropout,
                                   seed, normalize, eps, out, norm);
    case at::kDouble:
      return launch_forward<double>(x, y, weight_x, weight_y, bias_x, bias_y, factor, dropout,
                                    seed, normalize, eps, out, norm);
    default:
      TORCH_CHECK(false, "fbp cuda: unsupported dtype ", x.scalar_type());
  }
}

at::Tensor dropout_keep_cuda(const at::Tensor& index, int64_t seed, double rate) {
  auto idx = index.contiguous();
  auto keep = at::empty(idx.sizes(), idx.options().dtype(at::kBool));
  const int64_t numel = idx.numel();
  if (numel == 0) return keep;
  constexpr int kThreads = 256;
  dropout_keep_kernel<<<static_cast<unsigned>((numel + kThreads - 1) / kThreads), kThreads, 0,
                        at::cuda::getCurrentCUDAStream()>>>(
      idx.data_ptr<int64_t>(), keep.data_ptr<bool>(), numel, static_cast<uint64_t>(seed),
      static_cast<float>(rate));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return keep;
}

}  // namespace fbp
