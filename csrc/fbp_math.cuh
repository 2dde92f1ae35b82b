// Math shared by the forward and backward kernels (and, for Philox, the CPU
// test operator): the zero-safe signed square root, its derivative, the projection
// activations, and the counter-based dropout mask.  Everything here is __host__ __device__ so the
// binding file can compile it for the CPU too.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FBP_HD __host__ __device__ __forceinline__
#else
#define FBP_HD inline
#endif

namespace fbp {

// Lower bound on the row norm in the L2 normalisation (F.normalize's eps).
constexpr double kNormDelta = 1e-12;

// t(s) = s / (sqrt(|s| + eps) + sqrt(eps)) = sign(s) (sqrt(|s|+eps) - sqrt(eps)).
// Written as a quotient: no cancellation for small |s| (reference.py).
template <typename Acc>
FBP_HD Acc signed_sqrt(Acc s, Acc eps, Acc sqrt_eps) {
  using std::abs;
  using std::sqrt;
  return s / (sqrt(abs(s) + eps) + sqrt_eps);
}

// t'(s) = 0.5 / sqrt(|s| + eps) = 0.5 / (|t| + sqrt(eps)): the backward only has
// t = z * ||t||, never s, so it uses the second form.
template <typename Acc>
FBP_HD Acc signed_sqrt_grad_from_t(Acc t, Acc sqrt_eps) {
  using std::abs;
  return Acc(0.5) / (abs(t) + sqrt_eps);
}

// ---------------------------------------------------------------------------
// Projection activations (the `activation` option), applied to both projections
// (bias included) before the product.  Codes as the Triton kernels' ACTIVATION
// constexpr (fbp_kernels/backends/_common.ACTIVATION_CODES): 0 none, 1 relu, 2 tanh.
// The backward needs only the activated value: relu' = (act > 0), 0 at the kink as
// torch.relu's; tanh' = 1 - act^2 (PyTorch's tanh backward).  So the kernels never
// keep a pre-activation.
enum Activation : int { kActNone = 0, kActRelu = 1, kActTanh = 2 };

template <typename Acc>
FBP_HD Acc activate(Acc v, int activation) {
  using std::tanh;
  // NaN passes through, as torch.relu's.
  if (activation == kActRelu) return v < Acc(0) ? Acc(0) : v;
  if (activation == kActTanh) return tanh(v);
  return v;
}

// d activate / d v, from act = activate(v) alone.
template <typename Acc>
FBP_HD Acc activation_grad(Acc act, int activation) {
  if (activation == kActRelu) return act > Acc(0) ? Acc(1) : Acc(0);
  if (activation == kActTanh) return Acc(1) - act * act;
  return Acc(1);
}

// ---------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al., SC'11), the generator behind curand's Philox and
// torch's CUDA RNG.  A pure function of (counter, key): the forward and the
// backward regenerate the same dropout mask from (seed, element index) without
// storing it.  Known-answer vectors are checked in tests/test_cuda_backend.py.
struct Philox4 {
  uint32_t x, y, z, w;
};

FBP_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

FBP_HD Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kM0, ctr.x, hi0, lo0);
    mulhilo32(kM1, ctr.z, hi1, lo1);
    ctr = Philox4{hi1 ^ ctr.y ^ k0, lo1, hi0 ^ ctr.w ^ k1, lo0};
    k0 += kW0;
    k1 += kW1;
  }
  return ctr;
}

// ---------------------------------------------------------------------------
// The dropout rule: a pure function of (seed, element), four elements per Philox call,
// the Triton kernels' rule (fbp_kernels/backends/triton_dropout.py), so every GPU
// backend draws the same mask.  Element (row, col) of the (rows, K) product (K =
// factor*o) has the stream index i = row * K4 + col, K4 = K rounded up to a multiple of
// 4 (dropout_index; int64): four consecutive columns of one row form group g = i >> 2 =
// row * ceil(K / 4) + col / 4 (a row's last group may be short).  It is kept when
//     u = uniform(word[i & 3]) >= rate,
//     word = philox4x32_10(counter = (lo32(g), hi32(g), 0, 0),
//                          key = (lo32(seed), hi32(seed)))
// (word[0..3] = x, y, z, w), uniform = Triton's uint_to_uniform_float: the word as
// int32, negative values bit-flipped, times 4.6566127342e-10 in fp32.  A thread that
// walks consecutive columns of a row draws one Philox per four elements.

FBP_HD uint64_t dropout_index(int64_t row, int64_t col, int64_t K) {
  return static_cast<uint64_t>(row) * static_cast<uint64_t>((K + 3) & ~int64_t(3)) +
         static_cast<uint64_t>(col);
}

FBP_HD Philox4 dropout_block(uint64_t seed, uint64_t group) {
  return philox4x32_10(
      Philox4{static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), 0u, 0u},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

FBP_HD uint32_t philox_word(const Philox4& r, unsigned component) {
  return component == 0 ? r.x : component == 1 ? r.y : component == 2 ? r.z : r.w;
}

// Keep-test of one Philox word (u >= rate keeps), u as Triton's uint_to_uniform_float
// forms it: ~s equals Triton's -s - 1 for negative s without its int32 overflow at
// INT_MIN; int32 -> fp32 rounds to nearest there as here, then one fp32 multiply.
FBP_HD bool keep_word(uint32_t word, float rate) {
  int32_t s = static_cast<int32_t>(word);
  if (s < 0) s = ~s;
  return static_cast<float>(s) * 4.6566127342e-10f >= rate;
}

// Keep-mask of one element by its stream index (one Philox call; the CPU/GPU mask op
// and tests).
FBP_HD bool dropout_keep(uint64_t seed, uint64_t index, float rate) {
  return keep_word(philox_word(dropout_block(seed, index >> 2), index & 3u), rate);
}

// The same mask for a thread walking indices in order: one Philox call per group of
// four, reused while the index stays in the group.  Registers only (no arrays).
struct DropoutStream {
  uint64_t seed;
  float rate;
  uint64_t group;
  Philox4 words;
  FBP_HD DropoutStream(uint64_t seed_, float rate_)
      : seed(seed_), rate(rate_), group(~uint64_t(0)), words{0u, 0u, 0u, 0u} {}
  FBP_HD bool keep(uint64_t index) {
    if ((index >> 2) != group) {  // ~0 never equals index >> 2 (< 2^62)
      group = index >> 2;
      words = dropout_block(seed, group);
    }
    return keep_word(philox_word(words, static_cast<unsigned>(index & 3u)), rate);
  }
};

// ---------------------------------------------------------------------------
// Overflow-safe row norm, shared by the forward kernel, its finisher and the CPU
// test operator.  Squaring fp32 t overflows for |t| >~ 1.8e19 (t^2 > 3.4e38), and a
// sum of a few such squares sooner; tiny t underflows.  So each block reduces its
// part of a row to a power-of-two-scaled pair (e, q):
//     e = frexp exponent of max|t| (max|t| = m 2^e, m in [0.5, 1)),  q = sum (t 2^-e)^2
// (each term <= 1), and the finisher combines the parts with the largest exponent E
// of a non-empty part:
//     ||t|| = 2^E sqrt(sum_i q_i 2^(2 (e_i - E))).
// Scaling by powers of two is exact (ldexp), so where nothing over- or underflows the
// result equals the plain sqrt(sum t^2) in the same order (as reference.row_norm,
// which scales the same way).  Exponents travel as values of the accumulation type.

FBP_HD float fbp_ldexp(float v, int e) { return ldexpf(v, e); }
FBP_HD double fbp_ldexp(double v, int e) { return ldexp(v, e); }
FBP_HD int fbp_exponent(float v) {
  int e = 0;
  frexpf(v, &e);
  return e;
}
FBP_HD int fbp_exponent(double v) {
  int e = 0;
  frexp(v, &e);
  return e;
}

// Scaled partial (e, q) of n values t[0], t[stride], ...; (0, 0) when all are zero.
template <typename Acc>
FBP_HD void norm_partial(const Acc* t, int n, int stride, Acc& e_out, Acc& q_out) {
  using std::abs;
  Acc mx = Acc(0);
  for (int i = 0; i < n; ++i) mx = abs(t[i * stride]) > mx ? abs(t[i * stride]) : mx;
  // NaN stays NaN through q (the comparison above skips it, the sum below does not).
  const int e = mx > Acc(0) ? fbp_exponent(mx) : 0;
  Acc q = Acc(0);
  for (int i = 0; i < n; ++i) {
    const Acc v = fbp_ldexp(t[i * stride], -e);
    q += v * v;
  }
  e_out = static_cast<Acc>(e);
  q_out = q;
}

// Exponent below every real one: marks "no non-empty part yet" in the combine.
constexpr int kNoExponent = -100000;

// Part (e, q) rescaled to the common exponent E (E >= e for every non-empty part).
template <typename Acc>
FBP_HD Acc norm_rescale(Acc e, Acc q, int E) {
  return q > Acc(0) || q != q ? fbp_ldexp(q, 2 * (static_cast<int>(e) - E)) : Acc(0);
}

// ||t|| from the common exponent and the rescaled sum.
template <typename Acc>
FBP_HD Acc norm_from(int E, Acc q_sum) {
  using std::sqrt;
  return E == kNoExponent ? (q_sum != q_sum ? q_sum : Acc(0)) : fbp_ldexp(sqrt(q_sum), E);
}

// ---------------------------------------------------------------------------
// dL/ds of one output from g = dL/dz, z, <z, g> of its row and ||t|| (SPEC.md,
// torch_backend.grad_pooled):
//     r = max(||t||, delta);  dt = (g - z <z, g>) / r, or 0 when !(||t|| > delta)
//     (a degenerate row -- all zeros, or every product dropped -- gets zero gradient,
//     finite in every dtype);  t = z r;  ds = dt * 0.5 / (|t| + sqrt(eps)).
template <typename Acc>
FBP_HD Acc pooled_grad(Acc g, Acc z, Acc zg, Acc norm, Acc sqrt_eps) {
  const Acc delta = Acc(kNormDelta);
  const bool degenerate = !(norm > delta);
  const Acc r = degenerate ? delta : norm;
  const Acc dt = degenerate ? Acc(0) : (g - z * zg) / r;
  return dt * signed_sqrt_grad_from_t(z * r, sqrt_eps);
}

}  // namespace fbp
