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
#include <algorithm>
#include <cmath>
#include <type_traits>

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

template <class E>
Grid grid_for(int64_t rows, int64_t o, int64_t factor) {
  const int64_t bo = std::max<int64_t>(1, E::BN / factor);
  return Grid{(rows + E::BM - 1) / E::BM, (o + bo - 1) / bo};
}

template <typename T>
cudaError_t forward_typed(const ForwardArgs& a, cudaStream_t stream) {
  using E = typename EngineFor<T>::type;
  using Acc = typename E::Acc;
  const Grid grid = grid_for<E>(a.rows, a.o, a.factor);
  ForwardParams<T, Acc> p;
  p.x = as_matrix<T>(a.x);
  p.y = as_matrix<T>(a.y);
  p.wx = as_matrix<T>(a.weight_x);
  p.wy = as_matrix<T>(a.weight_y);
  p.bias_x = static_cast<const T*>(a.bias_x);
  p.bias_y = static_cast<const T*>(a.bias_y);
  p.out = static_cast<T*>(a.out);
  p.t_buf = nullptr;
  p.partial = nullptr;
  if (a.normalize) {
    // fp32/fp64: t goes straight into out and is scaled in place by the finisher;
    // fp16/bf16 need the fp32 scratch so that z is rounded once.
    if (!std::is_same<T, Acc>::value && a.t_scratch == nullptr) return cudaErrorInvalidValue;
    if (a.partial == nullptr || a.norm == nullptr) return cudaErrorInvalidValue;
    p.t_buf = static_cast<Acc*>(a.t_scratch != nullptr ? a.t_scratch : a.out);
    p.partial = static_cast<Acc*>(a.partial);
  }
  p.rows = a.rows;
  p.o = a.o;
  p.factor = a.factor;
  p.outs_per_tile = static_cast<int>(std::max<int64_t>(1, E::BN / a.factor));
  p.n_tiles = static_cast<int>(grid.y);
  p.eps = static_cast<Acc>(a.eps);
  p.sqrt_eps = static_cast<Acc>(std::sqrt(a.eps));
  p.dropout = a.dropout.enabled;
  p.rate = static_cast<float>(a.dropout.rate);
  p.scale = static_cast<Acc>(1.0 / (1.0 - a.dropout.rate));
  p.seed = a.dropout.seed;
  p.normalize = a.normalize;

  fused_forward_kernel<T, E><<<dim3(static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y)),
                               E::kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || !a.normalize) return err;
  constexpr int kRowsPerBlock = 8;
  finish_norm_kernel<T, Acc><<<static_cast<unsigned>((a.rows + kRowsPerBlock - 1) / kRowsPerBlock),
                               kRowsPerBlock * 32, 0, stream>>>(
      p.t_buf, p.partial, p.out, static_cast<Acc*>(a.norm), a.rows, a.o, p.n_tiles);
  return cudaGetLastError();
}

__global__ void dropout_keep_kernel(const int64_t* index, bool* keep, int64_t numel,
                                    uint64_t seed, float rate) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < numel) keep[i] = dropout_keep(seed, static_cast<uint64_t>(index[i]), rate);
}

}  // namespace

Grid forward_grid(DType dtype, int64_t rows, int64_t o, int64_t factor) {
  return dispatch_dtype(dtype, [&](auto tag) {
    return grid_for<typename EngineFor<typename decltype(tag)::type>::type>(rows, o, factor);
  });
}

cudaError_t launch_forward(const ForwardArgs& args, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  return dispatch_dtype(args.dtype, [&](auto tag) {
    return forward_typed<typename decltype(tag)::type>(args, stream);
  });
}

cudaError_t launch_dropout_keep(const int64_t* index, bool* keep, int64_t numel, uint64_t seed,
                                double rate, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  dropout_keep_kernel<<<static_cast<unsigned>((numel + kThreads - 1) / kThreads), kThreads, 0,
                        stream>>>(index, keep, numel, seed, static_cast<float>(rate));
  return cudaGetLastError();
}

}  // namespace fbp
