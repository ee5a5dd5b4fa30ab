#pragma once
// Where the blocks of csrc/cuda/attention_varlen.cu work: the (sequence, head, tile) of a block of the
// grid, and the offsets of the rows it writes in the packed outputs. Host/device and torch-free:
// tests/test_attention_varlen.py compiles this header with the host C++ compiler and checks that the
// blocks of a grid write every row of out, lse, dk and dv exactly once, with the dropout counters
// (bh = b * H + h, row within the sequence) of the contract.
#include <cstdint>

#include "philox.h"  // MMFAST_HOST_DEVICE

namespace mmfast {
namespace varlen {

constexpr int64_t kTileRows = 64;  // rows of a block's tile (attention_fa2.h's kTileRows)

// A block's sequence b and head h (bh = b * H + h, the dropout batch-head) and its sequence's rows:
// queries [q0, q0 + Lq) and keys [k0, k0 + Lk) of the packed tensors.
struct Seq {
  int64_t b, h, bh;
  int64_t q0, Lq, k0, Lk;
};

// Tiles per (sequence, head) for sequences of at most max_len rows (>= 1: the grid's divisor).
MMFAST_HOST_DEVICE int64_t tiles_of(int64_t max_len) {
  const int64_t n = (max_len + kTileRows - 1) / kTileRows;
  return n > 0 ? n : 1;
}

// Block `block` of a grid of num_tiles blocks per (sequence, head): its (sequence, head).
MMFAST_HOST_DEVICE Seq block_seq(const int32_t* cu_q, const int32_t* cu_k, int64_t H, int64_t block,
                                 int64_t num_tiles) {
  Seq s;
  s.bh = block / num_tiles;
  s.b = s.bh / H;
  s.h = s.bh % H;
  s.q0 = cu_q[s.b];
  s.Lq = cu_q[s.b + 1] - s.q0;
  s.k0 = cu_k[s.b];
  s.Lk = cu_k[s.b + 1] - s.k0;
  return s;
}

// Its tile: in reverse order when longest_first (the causal forward's long tiles start first).
MMFAST_HOST_DEVICE int64_t block_tile(int64_t block, int64_t num_tiles, bool longest_first) {
  const int64_t t = block % num_tiles;
  return longest_first ? num_tiles - 1 - t : t;
}

// Element offset of packed row `row`, head h, in a contiguous (total, H, D) tensor (out, dq, dk, dv,
// the fp32 dq accumulator): consecutive rows of one head are H * D apart.
MMFAST_HOST_DEVICE int64_t packed_off(int64_t row, int64_t h, int64_t H, int64_t D) { return (row * H + h) * D; }

// Offset of packed query row `row`, head h, in lse and delta (H, total_q).
MMFAST_HOST_DEVICE int64_t lse_off(int64_t row, int64_t h, int64_t total_q) { return h * total_q + row; }

}  // namespace varlen
}  // namespace mmfast
