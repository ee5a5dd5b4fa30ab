#pragma once
// Which shared-memory row each lane of a warp hands to ldmatrix.x4 in csrc/cuda/attention.cu, so that
// the four 8x8 matrices it loads land in exactly the A or B fragment registers of mma.sync m16n8k16
// (the PTX ISA layouts; lane = 4g + t). Host/device and torch-free: tests/test_attention_cuda.py
// compiles this header with g++ and checks every product the kernels compose with these addresses
// against an emulation of the two instructions.
//
// Each function gives (row, column) offsets of the lane's 16-byte row inside a 16 x 16 operand block.

#if defined(__CUDACC__)
#define MMFAST_FRAGMENT_FN __host__ __device__ __forceinline__ constexpr
#else
#define MMFAST_FRAGMENT_FN inline constexpr
#endif

namespace mmfast {
namespace fragment {

// A (16 x 16) from a shared [M][K] array: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7),
// (rows 0-7, k 8-15), (rows 8-15, k 8-15) = a[0..3].
MMFAST_FRAGMENT_FN int a_row(int lane) { return lane & 15; }
MMFAST_FRAGMENT_FN int a_col(int lane) { return (lane >> 4) * 8; }
// B of two n-tiles from a shared [N][K] array (B = stored^T, no .trans): r[0..1] = b of n-tile 0
// (k 0-7, k 8-15), r[2..3] = b of n-tile 1.
MMFAST_FRAGMENT_FN int bn_row(int lane) { return (lane & 7) + ((lane >> 4) << 3); }
MMFAST_FRAGMENT_FN int bn_col(int lane) { return ((lane >> 3) & 1) * 8; }
// B of two n-tiles from a shared [K][N] array (with .trans): r[0..1] = n-tile 0, r[2..3] = n-tile 1.
MMFAST_FRAGMENT_FN int bt_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
MMFAST_FRAGMENT_FN int bt_col(int lane) { return (lane >> 4) * 8; }
// A (16 x 16) from a shared [K][M] array (A = stored^T, with .trans).
MMFAST_FRAGMENT_FN int at_row(int lane) { return (lane & 7) + (lane >> 4) * 8; }
MMFAST_FRAGMENT_FN int at_col(int lane) { return ((lane >> 3) & 1) * 8; }

}  // namespace fragment
}  // namespace mmfast
