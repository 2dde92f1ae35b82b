// Math shared by the forward and backward kernels (and, for Philox, the CPU
// test operator): the zero-safe signed square root, its derivative, and the
// counter-based dropout mask.  Everything here is __host__ __device__ so the
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

// Uniform in [0, 1) with 24 random bits (exact in float) for element `index`
// of the (rows, factor*o) product under `seed`.
FBP_HD float dropout_uniform(uint64_t seed, uint64_t index) {
  const Philox4 r = philox4x32_10(
      Philox4{static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), 0u, 0u},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return static_cast<float>(r.x >> 8) * (1.0f / 16777216.0f);
}

// Keep-mask: the same comparison as the torch backend (u >= rate keeps).
FBP_HD bool dropout_keep(uint64_t seed, uint64_t index, float rate) {
  return dropout_uniform(seed, index) >= rate;
}

}  // namespace fbp
