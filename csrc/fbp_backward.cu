// FBP backward: the two fused kernels before the (cuBLAS) weight and input GEMMs.
//
// 1. grad_pooled_kernel, one warp per row: ds = dL/ds (rows, o) from g = dL/dz, the
//    output z and ||t|| (torch_backend.grad_pooled, SPEC.md):
//        r = max(||t||, delta);  dt = (g - z <z, g>) / r   (0 if ||t|| <= delta: a
//        degenerate row, e.g. all zeros, gets zero gradient; see reference.py)
//        t = z r;                ds = dt * 0.5 / (|t| + sqrt(eps))
//    With joint normalisation (norm_dims > 1) grad_pooled_group_kernel takes <z, g>
//    over each group of consecutive rows instead, one block per group.
// 2. projection_grads_kernel, per (BM rows, BN projected columns) tile: stage the
//    tile's biases in shared memory, recompute a and c with the forward's GEMM
//    tiles (or read a kept / shared projection), then, four consecutive columns per
//    thread (one Philox call per four)
//        dp = (ds[row, col / factor] + carry) * keep(seed, row*K + col) / (1 - rate)
//    (carry: MFH's gradient from later blocks; the carry to the previous block is
//    dp act(a) act(c), and MFH multiplies dp by the previous block's product first)
//        da = dp * act(c) act'(a),  dc = dp * act(a) act'(c)   (act: the activation,
//        identity by default; act' from the activated value, fbp_math.cuh)
//    written to two transient (rows, K) buffers in the input dtype.  The binding
//    then forms dx = da W_x, dW_x = da^T x, db_x = sum_rows da (same for y) with
//    cuBLAS and frees them.  Peak extra memory: 2 * rows * K input-dtype values plus
//    rows * o of ds.
#include <cmath>
#include <type_traits>

#include "fbp_launch.h"
#include "fbp_math.cuh"
#include "fbp_reduce.cuh"
#include "fbp_tile.cuh"
#include "fbp_tma.cuh"

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
  // pooled_grad (fbp_math.cuh): zero for a degenerate row (!(||t|| > delta)), as
  // torch_backend.grad_pooled; the CPU operator grad_pooled runs the same function.
  for (int64_t j = lane; j < o; j += 32)
    ds[row * o + j] = pooled_grad(to_acc<Acc>(g[j]), to_acc<Acc>(z[j]), dot, nrm, sqrt_eps);
}

// Joint normalisation (norm_dims > 1): one block of kGroupThreads per group of `group`
// consecutive rows, <z, g> over the group's group * o outputs (block_sum_fixed's fixed
// order), then ds as grad_pooled_kernel with the group's norm (held by every row).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kGroupThreads)
grad_pooled_group_kernel(const T* grad, const T* out, const Acc* norm, Acc* ds,
                         int64_t group, int64_t o, Acc sqrt_eps) {
  __shared__ Acc scratch[kGroupThreads / 32];
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * group;
  const int64_t begin = first_row * o, end = begin + group * o;
  Acc dot = Acc(0);
  for (int64_t j = begin + threadIdx.x; j < end; j += kGroupThreads)
    dot += to_acc<Acc>(out[j]) * to_acc<Acc>(grad[j]);
  dot = block_sum_fixed<kGroupThreads>(dot, scratch);
  const Acc nrm = norm[first_row];
  for (int64_t j = begin + threadIdx.x; j < end; j += kGroupThreads)
    ds[j] = pooled_grad(to_acc<Acc>(grad[j]), to_acc<Acc>(out[j]), dot, nrm, sqrt_eps);
}

template <typename T, typename Acc>
struct ProjectionGradParams {
  Matrix<T> x, y, wx, wy;
  const T* bias_x;
  const T* bias_y;
  const Acc* ds;  // (rows, o)
  const T* src_x;  // (rows / div_x, K) or nullptr: a projection read instead of recomputed
  const T* src_y;
  int64_t div_x, div_y;
  const T* prev;       // (rows, K) or nullptr: MFH's previous block product p_{l-1}
  const T* carry_in;   // (rows, K) or nullptr: the gradient later blocks pass to p_l
  T* carry_out;        // (rows, K) or nullptr: the gradient this block passes to p_{l-1}
  T* da;          // (rows, K)
  T* dc;
  int64_t rows, o, factor;
  float rate;
  Acc scale;
  uint64_t seed;
  int activation;  // Activation code (fbp_math.cuh), block-uniform
  bool dropout;
  TmaMaps maps;    // WgmmaEngine's operand maps (zero for the other engines)
};

// Four consecutive elements of the input dtype to global memory (p 4-element aligned).
__device__ __forceinline__ void store4_global(__half* p, const float v[4]) {
  const __half2 lo = __floats2half2_rn(v[0], v[1]), hi = __floats2half2_rn(v[2], v[3]);
  uint2 bits;
  bits.x = *reinterpret_cast<const uint32_t*>(&lo);
  bits.y = *reinterpret_cast<const uint32_t*>(&hi);
  *reinterpret_cast<uint2*>(p) = bits;
}
__device__ __forceinline__ void store4_global(__nv_bfloat16* p, const float v[4]) {
  const __nv_bfloat162 lo = __floats2bfloat162_rn(v[0], v[1]);
  const __nv_bfloat162 hi = __floats2bfloat162_rn(v[2], v[3]);
  uint2 bits;
  bits.x = *reinterpret_cast<const uint32_t*>(&lo);
  bits.y = *reinterpret_cast<const uint32_t*>(&hi);
  *reinterpret_cast<uint2*>(p) = bits;
}
__device__ __forceinline__ void store4_global(float* p, const float v[4]) { store4(p, v); }
__device__ __forceinline__ void store4_global(double* p, const double v[4]) { store4(p, v); }

// CTAs per SM that ptxas must fit (__launch_bounds__ minBlocks: a register cap of
// 65536 / (minBlocks * threads)).  The highest value without spills on sm_80 and sm_90
// (python -m fbp_kernels.backends.cuda_compile; tests/test_cuda_compile.py fails on a
// spill): WMMA 4 (128 registers; shared memory allows 4 on sm_80), FMA 3 (80).
template <class E> struct BackwardMinBlocks { static constexpr int value = 3; };
template <typename T> struct BackwardMinBlocks<WmmaEngine<T>> { static constexpr int value = 4; };
template <typename T> struct BackwardMinBlocks<WmmaAsyncEngine<T>> {
  static constexpr int value = 4;
};
// One 149 KiB CTA per SM: the whole register file (255 per thread) is allowed.
template <typename T> struct BackwardMinBlocks<WmmaWideEngine<T>> {
  static constexpr int value = 1;
};
// One ~198 KiB CTA per SM, as the wide engine.
template <typename T> struct BackwardMinBlocks<WgmmaEngine<T>> {
  static constexpr int value = 1;
};

template <typename T, class E>
__global__ void __launch_bounds__(E::kThreads, BackwardMinBlocks<E>::value)
projection_grads_kernel(const __grid_constant__ ProjectionGradParams<T, typename E::Acc> p) {
  using Acc = typename E::Acc;
  using Smem = TileSmem<E>;
  unsigned char* smem = tile_smem<E>();
  Acc* pc = reinterpret_cast<Acc*>(smem);
  Acc* pa = reinterpret_cast<Acc*>(smem + Smem::kUnionBytes);
  Acc* bx_s = reinterpret_cast<Acc*>(smem + Smem::kBiasOffset);
  Acc* by_s = bx_s + E::BN;
  constexpr int kLd = E::kLdOut;
  constexpr int kQuads = E::BN / 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * E::BM;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * E::BN;
  const int64_t K = p.o * p.factor;
  const int nr = static_cast<int>(p.rows - row0 < E::BM ? p.rows - row0 : E::BM);
  const int width = static_cast<int>(K - col0 < E::BN ? K - col0 : E::BN);
  // Rows of da/dc start 4-element aligned when K is a multiple of 4: vector stores.
  const bool vec_store = (K & 3) == 0;

  stage_biases<E>(p.bias_x, p.bias_y, col0, K, bx_s, by_s);
  project_tiles<E>(p.x, p.wx, p.src_x, p.div_x, p.y, p.wy, p.src_y, p.div_y, row0, nr, col0,
                   width, K, p.maps, smem, pa, pc);
  __syncthreads();
  DropoutStream drop(p.seed, p.rate);
  // Four consecutive columns per thread (one Philox call per four elements when
  // K % 4 == 0, else at most two); consecutive threads take consecutive quads of a row.
  for (int e = threadIdx.x; e < nr * kQuads; e += E::kThreads) {
    const int r = e / kQuads, c4 = (e % kQuads) * 4;  // constant divisor: shifts
    if (c4 >= width) continue;
    Acc a[4], c[4], bx[4], by[4], da[4], dc[4];
    load4(pa + r * kLd + c4, a);
    load4(pc + r * kLd + c4, c);
    load4(bx_s + c4, bx);
    load4(by_s + c4, by);
    const int64_t row = row0 + r, col = col0 + c4;
    // Output of the first column and the position in its group: one division per quad.
    int64_t j = col / p.factor, f = col - j * p.factor;
    const Acc* ds_row = p.ds + row * p.o;
    const uint64_t index = dropout_index(row, col, K);
    const int64_t at = row * K + col;  // (row, column) in the (rows, K) MFH buffers
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      // MFH (torch_mfh's notation): G = e + carry (e: this block's pooled gradient
      // repeated, carry: what later blocks pass back), u = G * dropout, dq = u * p_{l-1};
      // the carry to block l-1 is u * q with q = act(a) act(c).  FBP: dq = u = e * drop.
      Acc dp = Acc(0);
      const bool valid = c4 + u < width;
      if (valid) {
        dp = ds_row[j];
        if (p.carry_in != nullptr) dp += to_acc<Acc>(p.carry_in[at + u]);
        if (p.dropout) dp = drop.keep(index + u) ? dp * p.scale : Acc(0);
      }
      // Gradients at the pre-activations, from the activated values alone.
      const Acc av = activate(a[u] + bx[u], p.activation);
      const Acc cv = activate(c[u] + by[u], p.activation);
      if (p.carry_out != nullptr && valid) p.carry_out[at + u] = from_acc<T>(dp * av * cv);
      const Acc dq = p.prev != nullptr && valid ? dp * to_acc<Acc>(p.prev[at + u]) : dp;
      da[u] = dq * cv * activation_grad(av, p.activation);
      dc[u] = dq * av * activation_grad(cv, p.activation);
      if (++f == p.factor) {
        f = 0;
        ++j;
      }
    }
    T* da_out = p.da + row * K + col;
    T* dc_out = p.dc + row * K + col;
    if (vec_store && c4 + 4 <= width) {
      store4_global(da_out, da);
      store4_global(dc_out, dc);
    } else {
      for (int u = 0; u < 4 && c4 + u < width; ++u) {
        da_out[u] = from_acc<T>(da[u]);
        dc_out[u] = from_acc<T>(dc[u]);
      }
    }
  }
}

template <class E>
Grid grid_for(int64_t rows, int64_t K) {
  return Grid{(rows + E::BM - 1) / E::BM, (K + E::BN - 1) / E::BN};
}

template <typename T>
cudaError_t grad_pooled_typed(const GradPooledArgs& a, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  if (a.norm_group > 1) {
    grad_pooled_group_kernel<T, Acc><<<static_cast<unsigned>(a.rows / a.norm_group),
                                       kGroupThreads, 0, stream>>>(
        static_cast<const T*>(a.grad), static_cast<const T*>(a.out),
        static_cast<const Acc*>(a.norm), static_cast<Acc*>(a.ds), a.norm_group, a.o,
        static_cast<Acc>(std::sqrt(a.eps)));
    return cudaGetLastError();
  }
  constexpr int kRowsPerBlock = 8;
  grad_pooled_kernel<T, Acc><<<static_cast<unsigned>((a.rows + kRowsPerBlock - 1) / kRowsPerBlock),
                               kRowsPerBlock * 32, 0, stream>>>(
      static_cast<const T*>(a.grad), static_cast<const T*>(a.out),
      static_cast<const Acc*>(a.norm), static_cast<Acc*>(a.ds), a.rows, a.o,
      static_cast<Acc>(std::sqrt(a.eps)));
  return cudaGetLastError();
}

template <typename T, class E>
cudaError_t projection_grads_with(const ProjectionGradArgs& a, cudaStream_t stream) {
  using Acc = typename E::Acc;
  const Grid grid = grid_for<E>(a.rows, a.o * a.factor);
  ProjectionGradParams<T, Acc> p;
  p.x = as_matrix<T>(a.x);
  p.y = as_matrix<T>(a.y);
  p.wx = as_matrix<T>(a.weight_x);
  p.wy = as_matrix<T>(a.weight_y);
  p.bias_x = static_cast<const T*>(a.bias_x);
  p.bias_y = static_cast<const T*>(a.bias_y);
  p.ds = static_cast<const Acc*>(a.ds);
  p.src_x = static_cast<const T*>(a.src_x);
  p.src_y = static_cast<const T*>(a.src_y);
  p.div_x = a.div_x;
  p.div_y = a.div_y;
  p.prev = static_cast<const T*>(a.prev);
  p.carry_in = static_cast<const T*>(a.carry_in);
  p.carry_out = static_cast<T*>(a.carry_out);
  p.da = static_cast<T*>(a.da);
  p.dc = static_cast<T*>(a.dc);
  p.rows = a.rows;
  p.o = a.o;
  p.factor = a.factor;
  p.dropout = a.dropout.enabled;
  p.rate = static_cast<float>(a.dropout.rate);
  p.scale = static_cast<Acc>(1.0 / (1.0 - a.dropout.rate));
  p.seed = a.dropout.seed;
  p.activation = a.activation;
  cudaError_t err = operand_maps<E>(a.dtype, a.x, a.weight_x, a.src_x == nullptr, a.y,
                                    a.weight_y, a.src_y == nullptr, &p.maps);
  if (err != cudaSuccess) return err;
  int dynamic_smem = 0;
  err = launch_smem<E>(projection_grads_kernel<T, E>, &dynamic_smem);
  if (err != cudaSuccess) return err;
  projection_grads_kernel<T, E><<<dim3(static_cast<unsigned>(grid.x),
                                       static_cast<unsigned>(grid.y)),
                                  E::kThreads, dynamic_smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

Grid projection_grads_grid(DType dtype, Engine engine, int64_t rows, int64_t K) {
  return dispatch_engine(dtype, engine, Grid{0, 0}, [&](auto, auto e) {
    return grid_for<typename decltype(e)::type>(rows, K);
  });
}

cudaError_t launch_grad_pooled(const GradPooledArgs& args, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  return dispatch_dtype(args.dtype, [&](auto tag) {
    return grad_pooled_typed<typename decltype(tag)::type>(args, stream);
  });
}

// On the engine the binding chose, as launch_forward (fbp_forward.cu).
cudaError_t launch_projection_grads(const ProjectionGradArgs& args, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  return dispatch_engine(args.dtype, args.engine, cudaErrorInvalidValue, [&](auto t, auto e) {
    return projection_grads_with<typename decltype(t)::type, typename decltype(e)::type>(args,
                                                                                          stream);
  });
}

}  // namespace fbp
