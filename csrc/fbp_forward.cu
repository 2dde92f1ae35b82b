// Fused FBP forward: both projections, product, dropout, sum over `factor`
// consecutive columns, zero-safe signed square root and L2 normalisation.
//
// Grid: (row tiles of BM, output tiles of BO = max(1, BN / factor) outputs).  A
// block owns BM rows x BO outputs, i.e. the BO * factor projected columns that
// feed them, walked in chunks of BN columns (one chunk unless factor > BN).  For
// each chunk it stages the chunk's biases in shared memory, computes the a and c
// tiles into shared memory (fp32/fp64; a side whose projection is given -- co-attention's
// shared input, formed once per group by the binding -- is loaded instead), then
//   1. an elementwise pass: each thread takes four consecutive columns of a row
//      (16-byte vector reads), forms act(a + b_x) act(c + b_y) (times MFH's previous
//      block product `prev`), applies dropout (one Philox call per four columns) and
//      writes the product back over the a tile; the memory modes write the raw a / c
//      here and MFH's chained blocks their product (`keep_x/keep_y`, `chain`);
//   2. a pooling pass over the block's valid (row, output) pairs only: each thread
//      sums the `factor` products of each of its pairs and writes the result out
//      (s, or t and its copy for the row norm) at once.  The pair index advances by a
//      precomputed (rows, outputs) step: no division in the loop, no array of sums.
// No (rows, factor*o) intermediate reaches global memory unless asked for: a kept
// projection (the memory modes) or MFH's chained product.
//
// Row norms need every output of a row, which lives in several blocks.  Each block
// writes t = signed_sqrt(s) (to `out` itself for fp32/fp64, to an fp32 (rows, o)
// scratch for half types, so z is rounded once) and its part of the row's sum of
// squares as a power-of-two-scaled pair (e, q) (fbp_math.cuh: norm_partial; no
// overflow for fp32 t near 1e19-1e20, no underflow for tiny t) to a
// (rows, output tiles, 2) buffer; a small finishing kernel (one warp per row)
// combines the parts in a fixed order (deterministic), writes ||t|| and scales the
// row.  Extra global memory: (rows, 2 n_tiles) partials, plus (rows, o) fp32 for
// fp16/bf16.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "fbp_launch.h"
#include "fbp_math.cuh"
#include "fbp_reduce.cuh"
#include "fbp_tile.cuh"
#include "fbp_tma.cuh"

namespace fbp {

// ------------------------------------------------------------------ TMA tensor maps
// cuTensorMapEncodeTiled from the driver torch has loaded (the runtime's entry-point
// query: no link against libcuda), looked up once.
using EncodeTiledFn = PFN_cuTensorMapEncodeTiled_v12000;

static EncodeTiledFn encode_tiled() {
  static const EncodeTiledFn fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult status;
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000,
                                                             cudaEnableDefault, &status);
#else
    const cudaError_t err =
        cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &status);
#endif
    if (err != cudaSuccess) (void)cudaGetLastError();  // reported as "no encoder", once
    return err == cudaSuccess && status == cudaDriverEntryPointSuccess
               ? reinterpret_cast<EncodeTiledFn>(f)
               : nullptr;
  }();
  return fn;
}

// A (rows, cols) operand, cols contiguous, as a 2-D map with a {kTmaBoxK, kTmaBoxRows}
// box, 128-byte swizzle (fbp_tma.cuh's layout contract) and zero fill outside.
cudaError_t encode_operand_map(const MatrixArg& m, DType dtype, CUtensorMap* map) {
  const EncodeTiledFn encode = encode_tiled();
  if (encode == nullptr) return cudaErrorNotSupported;
  if (!tma_operand_ok(m, 2)) return cudaErrorInvalidValue;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(m.cols), static_cast<cuuint64_t>(m.rows)};
  // One row: its stride is never used, but must be a multiple of 16 bytes.
  const int64_t row_bytes = m.rows > 1 ? m.stride_row * 2 : (m.cols * 2 + 15) / 16 * 16;
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(row_bytes)};
  const cuuint32_t box[2] = {kTmaBoxK, kTmaBoxRows};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult res = encode(
      map, dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
      2, const_cast<void*>(m.ptr), dims, strides, box, element_strides,
      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return res == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

bool tma_encoder_available() { return encode_tiled() != nullptr; }

bool wgmma_built() {
#ifdef FBP_SM90A
  return true;
#else
  return false;
#endif
}

namespace {

template <typename T, typename Acc>
struct ForwardParams {
  Matrix<T> x, y, wx, wy;  // (rows, m), (rows, n), (K, m), (K, n)
  const T* bias_x;         // (K) or nullptr
  const T* bias_y;
  T* out;                  // (rows, o)
  Acc* t_buf;              // (rows, o): may alias out when T == Acc
  Acc* partial;            // (rows, n_tiles, 2) scaled parts (e, q) of sum t^2
  T* keep_x;               // (rows, K) or nullptr: the raw projections, kept for backward
  T* keep_y;
  const T* src_x;          // (rows / div_x, K) or nullptr: a projection given, not computed
  const T* src_y;
  int64_t div_x, div_y;
  const T* prev;           // (rows, K) or nullptr: MFH's previous block product, multiplied in
  T* chain;                // (rows, K) or nullptr: this block's product, for the next block
  int64_t rows, o, factor;
  int outs_per_tile;       // BO
  int n_tiles;
  Acc eps, sqrt_eps;
  float rate;              // dropout rate; keep when u >= rate
  Acc scale;               // 1 / (1 - rate)
  uint64_t seed;
  int activation;          // Activation code (fbp_math.cuh), block-uniform
  bool dropout, normalize;
  TmaMaps maps;            // WgmmaEngine's operand maps (zero for the other engines)
};

// CTAs per SM that ptxas must fit (__launch_bounds__ minBlocks: a register cap of
// 65536 / (minBlocks * threads)).  The highest value without spills on sm_80 and sm_90
// (python -m fbp_kernels.backends.cuda_compile; tests/test_cuda_compile.py fails on a
// spill): 3 for the 64-row engines (WMMA and mma.sync 114-158 registers, fp32 FMA 79-80), except
// the ones below.
template <class E> struct ForwardMinBlocks { static constexpr int value = 3; };
// One 149 KiB CTA per SM: the whole register file (255 per thread) is allowed.
template <typename T> struct ForwardMinBlocks<WmmaWideEngine<T>> {
  static constexpr int value = 1;
};
// One ~198 KiB CTA per SM (shared memory allows no second): 255 registers allowed.
template <typename T> struct ForwardMinBlocks<WgmmaEngine<T>> {
  static constexpr int value = 1;
};
// fp64 (gradcheck precision): with the kept-projection stores and the given-projection
// loads it spills at 80 and at 128 registers (3 and 2 CTAs per SM); one CTA allows 255.
template <> struct ForwardMinBlocks<EngineFor<double>::type> { static constexpr int value = 1; };

template <typename T, class E>
__global__ void __launch_bounds__(E::kThreads, ForwardMinBlocks<E>::value)
fused_forward_kernel(const __grid_constant__ ForwardParams<T, typename E::Acc> p) {
  using Acc = typename E::Acc;
  using Smem = TileSmem<E>;
  unsigned char* smem = tile_smem<E>();
  Acc* pc = reinterpret_cast<Acc*>(smem);  // aliases the staged inputs
  Acc* pa = reinterpret_cast<Acc*>(smem + Smem::kUnionBytes);
  Acc* bx_s = reinterpret_cast<Acc*>(smem + Smem::kBiasOffset);
  Acc* by_s = bx_s + E::BN;
  constexpr int kLd = E::kLdOut;
  constexpr int kQuads = E::BN / 4;                        // 4-column groups per tile row

  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * E::BM;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * p.outs_per_tile;
  const int64_t K = p.o * p.factor;
  // Valid rows and outputs of this block: the pair loops visit only these.
  const int nr = static_cast<int>(p.rows - row0 < E::BM ? p.rows - row0 : E::BM);
  const int nb = static_cast<int>(p.o - j0 < p.outs_per_tile ? p.o - j0 : p.outs_per_tile);
  // Pair idx = tid + q * kThreads is (r, jo) = (idx / nb, idx % nb).  This thread's
  // first pair and the step to its next one are the only divisions.
  const int r_first = threadIdx.x / nb, j_first = threadIdx.x % nb;
  const int step_r = E::kThreads / nb, step_j = E::kThreads % nb;
  const int64_t col_begin = j0 * p.factor, col_end = (j0 + nb) * p.factor;
  // More than one chunk happens only when factor > BN, and then BO == 1: thread tid
  // owns row tid (one pair) in every chunk and carries its running sum.
  const bool chunked = p.factor > E::BN;
  // t per (row, output) of this block, for the row-norm part: the c tile's space,
  // free once the elementwise pass of the last chunk has read it.
  Acc* t_tile = pc;

  Acc carry = Acc(0);
  for (int64_t cbeg = col_begin;; cbeg += E::BN) {
    stage_biases<E>(p.bias_x, p.bias_y, cbeg, K, bx_s, by_s);
    const int width = static_cast<int>(col_end - cbeg < E::BN ? col_end - cbeg : E::BN);
    project_tiles<E>(p.x, p.wx, p.src_x, p.div_x, p.y, p.wy, p.src_y, p.div_y, row0, nr, cbeg,
                     width, K, p.maps, smem, pa, pc);
    __syncthreads();
    const bool last = cbeg + E::BN >= col_end;

    // 1. Elementwise: pa <- dropout(act(a + b_x) act(c + b_y) [* prev]), four columns per
    // thread; MFH's chained blocks multiply the previous block's product in and store
    // their own (input dtype, as eager rounds it) for the next block.  The memory modes
    // that keep a projection write the raw a / c here, by the thread that overwrites
    // them (a separate pass over pa would race with this one's stores).
    DropoutStream drop(p.seed, p.rate);  // per chunk: no RNG state live across the GEMMs
    for (int e = threadIdx.x; e < nr * kQuads; e += E::kThreads) {
      const int r = e / kQuads, c4 = (e % kQuads) * 4;  // constant divisor: shifts
      if (c4 >= width) continue;
      Acc a[4], c[4], bx[4], by[4];
      load4(pa + r * kLd + c4, a);
      load4(pc + r * kLd + c4, c);
      load4(bx_s + c4, bx);
      load4(by_s + c4, by);
      const uint64_t index = dropout_index(row0 + r, cbeg + c4, K);
      const int64_t at = (row0 + r) * K + cbeg + c4;  // (row, column) in the (rows, K) chain
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const bool valid = c4 + u < width;
        if (p.keep_x != nullptr && valid) p.keep_x[at + u] = from_acc<T>(a[u]);
        if (p.keep_y != nullptr && valid) p.keep_y[at + u] = from_acc<T>(c[u]);
        Acc prod = activate(a[u] + bx[u], p.activation) * activate(c[u] + by[u], p.activation);
        if (p.prev != nullptr && valid) prod *= to_acc<Acc>(p.prev[at + u]);
        if (p.dropout && valid) prod = drop.keep(index + u) ? prod * p.scale : Acc(0);
        if (p.chain != nullptr && valid) p.chain[at + u] = from_acc<T>(prod);
        a[u] = prod;
      }
      store4(pa + r * kLd + c4, a);
    }
    __syncthreads();

    // 2. Pooling over the valid (row, output) pairs of this thread.  A finished pair
    // (last chunk) goes straight out: s to `out`, or t to t_buf and t_tile.  No
    // per-thread array of sums, so nothing is live across the GEMMs but `carry`.
    const int64_t local0 = cbeg - col_begin;  // chunk start within the block's columns
    for (int r = r_first, jo = j_first; r < nr;) {
      const int64_t first = jo * p.factor - local0, end = first + p.factor;
      const int lo = static_cast<int>(first > 0 ? first : 0);
      const int hi = static_cast<int>(end < width ? end : width);
      const Acc* prow = pa + r * kLd;
      Acc sum = Acc(0);
      for (int cc = lo; cc < hi; ++cc) sum += prow[cc];
      if (chunked) {
        sum += carry;
        carry = sum;
      }
      if (last) {
        const int64_t at = (row0 + r) * p.o + j0 + jo;
        if (!p.normalize) {
          p.out[at] = from_acc<T>(sum);
        } else {
          const Acc t = signed_sqrt(sum, p.eps, p.sqrt_eps);
          p.t_buf[at] = t;
          t_tile[r * kLd + jo] = t;
        }
      }
      r += step_r;
      jo += step_j;
      if (jo >= nb) {
        jo -= nb;
        ++r;
      }
    }
    __syncthreads();  // pa and pc are overwritten next (next chunk), t_tile read below
    if (last) break;
  }
  if (!p.normalize) return;  // block-uniform

  if (threadIdx.x < nr) {
    const int r = threadIdx.x;
    Acc e, q;
    norm_partial(t_tile + r * kLd, nb, 1, e, q);
    Acc* part = p.partial + ((row0 + r) * p.n_tiles + blockIdx.y) * 2;
    part[0] = e;
    part[1] = q;
  }
}

// Joint normalisation (norm_dims > 1), one block of kGroupThreads per group of
// `group` consecutive rows: ||t|| of the group from its group * n_tiles parts (a
// contiguous run of `partial`), combined as finish_norm_kernel does (largest exponent,
// rescaled sums) in block_sum_fixed's order; every row of the group gets the group's
// norm, and the group's group * o outputs are scaled by it.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kGroupThreads)
finish_group_norm_kernel(const Acc* t_buf, const Acc* partial, T* out, Acc* norm,
                         int64_t group, int64_t o, int n_tiles) {
  __shared__ int e_scratch[kGroupThreads / 32];
  __shared__ Acc q_scratch[kGroupThreads / 32];
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * group;
  const int64_t n_parts = group * n_tiles;
  const Acc* part = partial + first_row * 2 * n_tiles;
  int E = kNoExponent;
  for (int64_t i = threadIdx.x; i < n_parts; i += kGroupThreads) {
    const int e = static_cast<int>(part[2 * i]);
    if (part[2 * i + 1] > Acc(0) && e > E) E = e;
  }
  E = block_max<kGroupThreads>(E, e_scratch);
  Acc q = Acc(0);
  for (int64_t i = threadIdx.x; i < n_parts; i += kGroupThreads)
    q += norm_rescale(part[2 * i], part[2 * i + 1], E);
  const Acc nrm = norm_from(E, block_sum_fixed<kGroupThreads>(q, q_scratch));
  for (int64_t r = threadIdx.x; r < group; r += kGroupThreads) norm[first_row + r] = nrm;
  const Acc denom = nrm > Acc(kNormDelta) ? nrm : Acc(kNormDelta);
  const int64_t begin = first_row * o, end = begin + group * o;
  for (int64_t j = begin + threadIdx.x; j < end; j += kGroupThreads)
    out[j] = from_acc<T>(t_buf[j] / denom);
}

// One warp per row: ||t|| from the scaled parts (e_i, q_i) in a fixed order, then
// z = t / max(||t||, delta).  The common exponent E is the largest e_i of a
// non-empty part (an integer max: order-free); the rescaled q_i are summed per lane
// and then by a fixed butterfly, so the result is deterministic.
template <typename T, typename Acc>
__global__ void finish_norm_kernel(const Acc* t_buf, const Acc* partial, T* out, Acc* norm,
                                   int64_t rows, int64_t o, int n_tiles) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // warp-uniform
  const Acc* part = partial + row * 2 * n_tiles;
  int E = kNoExponent;
  for (int i = lane; i < n_tiles; i += 32) {
    const int e = static_cast<int>(part[2 * i]);
    if (part[2 * i + 1] > Acc(0) && e > E) E = e;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const int other = __shfl_xor_sync(0xffffffffu, E, offset);
    E = other > E ? other : E;
  }
  Acc total = Acc(0);
  for (int i = lane; i < n_tiles; i += 32) total += norm_rescale(part[2 * i], part[2 * i + 1], E);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    total += __shfl_xor_sync(0xffffffffu, total, offset);
  const Acc nrm = norm_from(E, total);
  if (lane == 0) norm[row] = nrm;
  const Acc denom = nrm > Acc(kNormDelta) ? nrm : Acc(kNormDelta);
  for (int64_t j = lane; j < o; j += 32) out[row * o + j] = from_acc<T>(t_buf[row * o + j] / denom);
}

template <class E>
Grid grid_for(int64_t rows, int64_t o, int64_t factor) {
  const int64_t bo = std::max<int64_t>(1, E::BN / factor);
  return Grid{(rows + E::BM - 1) / E::BM, (o + bo - 1) / bo};
}

template <typename T, class E>
cudaError_t forward_with(const ForwardArgs& a, cudaStream_t stream) {
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
  p.keep_x = static_cast<T*>(a.keep_x);
  p.keep_y = static_cast<T*>(a.keep_y);
  p.src_x = static_cast<const T*>(a.src_x);
  p.src_y = static_cast<const T*>(a.src_y);
  p.div_x = a.div_x;
  p.div_y = a.div_y;
  p.prev = static_cast<const T*>(a.prev);
  p.chain = static_cast<T*>(a.chain);
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
  p.activation = a.activation;
  p.normalize = a.normalize;
  cudaError_t err = operand_maps<E>(a.dtype, a.x, a.weight_x, a.src_x == nullptr, a.y,
                                    a.weight_y, a.src_y == nullptr, &p.maps);
  if (err != cudaSuccess) return err;

  int dynamic_smem = 0;
  err = launch_smem<E>(fused_forward_kernel<T, E>, &dynamic_smem);
  if (err != cudaSuccess) return err;
  fused_forward_kernel<T, E><<<dim3(static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y)),
                               E::kThreads, dynamic_smem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess || !a.normalize) return err;
  if (a.norm_group > 1) {
    finish_group_norm_kernel<T, Acc><<<static_cast<unsigned>(a.rows / a.norm_group),
                                       kGroupThreads, 0, stream>>>(
        p.t_buf, p.partial, p.out, static_cast<Acc*>(a.norm), a.norm_group, a.o, p.n_tiles);
    return cudaGetLastError();
  }
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

Grid forward_grid(DType dtype, Engine engine, int64_t rows, int64_t o, int64_t factor) {
  return dispatch_engine(dtype, engine, Grid{0, 0}, [&](auto, auto e) {
    return grid_for<typename decltype(e)::type>(rows, o, factor);
  });
}

EngineInfo engine_info(DType dtype, Engine engine) {
  return dispatch_engine(dtype, engine, EngineInfo{0, 0, 0, 0, 0, 0}, [&](auto, auto e) {
    using E = typename decltype(e)::type;
    return EngineInfo{E::BM, E::BN, E::BK, E::kThreads, E::kStages, TileSmem<E>::kBytes};
  });
}

// On the engine the binding chose (every operand cp_async_operand_ok for the cp.async
// ones, and the wide one only where the GPU's shared memory holds it); an engine the
// dtype does not have is an invalid value.
cudaError_t launch_forward(const ForwardArgs& args, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  return dispatch_engine(args.dtype, args.engine, cudaErrorInvalidValue, [&](auto t, auto e) {
    return forward_with<typename decltype(t)::type, typename decltype(e)::type>(args, stream);
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
