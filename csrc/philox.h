#pragma once
// The attention dropout generator shared by the C++ faces (CPU and CUDA), header-only, no torch.
// The contract (the same as the Triton face; executable specification: mmfast/reference/dropout.py):
//   key     (k0, k1)         = (seed & 0xffffffff, seed >> 32)
//   counter (c0, c1, c2, c3) = (j >> 2, i, bh, 0)      bh = b * H + h, query row i, key column j
//   word                     = philox4x32_10(counter, key)[j & 3]
//   keep                     = word >= dropout_threshold(p)
// One Philox call serves four neighbouring key columns.
#include <cstdint>

#if defined(__CUDACC__)
#define MMFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MMFAST_HOST_DEVICE inline
#endif

namespace mmfast {

struct PhiloxWords {
  uint32_t w[4];
};

MMFAST_HOST_DEVICE uint32_t philox_mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10 (Salmon et al. 2011), bit-identical to cuRAND's and Triton's tl.philox.
MMFAST_HOST_DEVICE PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                             uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_a = philox_mulhi(0xD2511F53u, c0), lo_a = 0xD2511F53u * c0;
    const uint32_t hi_b = philox_mulhi(0xCD9E8D57u, c2), lo_b = 0xCD9E8D57u * c2;
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return PhiloxWords{{c0, c1, c2, c3}};
}

// A word below the threshold drops its element: probability p, exact to 2^-32. Computed on the host
// from the double p of the op's schema (never from a float32 copy: 0.1f would give another threshold);
// kernels take the uint32 threshold as an argument.
inline uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

// The four words of key columns 4g .. 4g+3 of row i of batch-head bh.
MMFAST_HOST_DEVICE PhiloxWords dropout_words4(uint64_t seed, uint32_t bh, uint32_t i, uint32_t g) {
  return philox4x32_10(g, i, bh, 0u, static_cast<uint32_t>(seed & 0xFFFFFFFFu), static_cast<uint32_t>(seed >> 32));
}

}  // namespace mmfast
