#pragma once
// Which attention probabilities the CUDA face keeps under dropout: the indexing of the Philox
// contract of csrc/philox.h, in the exact functions the kernels of csrc/cuda/attention.cu call.
// Host/device and torch-free, so that tests/test_attention_cuda.py compiles this header with g++ and
// compares it bit for bit with mmfast/reference/dropout.py.
#include "philox.h"

namespace mmfast {

// Key column j of query row i of batch-head bh: kept iff its Philox word >= threshold.
MMFAST_HOST_DEVICE bool dropout_keep(uint64_t seed, uint32_t bh, uint32_t i, uint32_t j, uint32_t threshold) {
  const PhiloxWords w = dropout_words4(seed, bh, i, j >> 2);
  const uint32_t s = j & 3u;  // a select chain, not w.w[s]: a run-time index would put w in local memory
  const uint32_t word = s == 0 ? w.w[0] : s == 1 ? w.w[1] : s == 2 ? w.w[2] : w.w[3];
  return word >= threshold;
}

// Key columns j and j + 1 (j even) of row i, from one Philox call: bit 0 = column j, bit 1 = j + 1.
// The forward's register layout gives each thread such pairs.
MMFAST_HOST_DEVICE uint32_t dropout_keep_pair(uint64_t seed, uint32_t bh, uint32_t i, uint32_t j, uint32_t threshold) {
  const PhiloxWords w = dropout_words4(seed, bh, i, j >> 2);
  const bool upper = (j & 2u) != 0;
  const uint32_t lo = upper ? w.w[2] : w.w[0], hi = upper ? w.w[3] : w.w[1];
  return (lo >= threshold ? 1u : 0u) | (hi >= threshold ? 2u : 0u);
}

}  // namespace mmfast
