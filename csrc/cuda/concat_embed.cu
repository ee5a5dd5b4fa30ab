// Fused feature concatenation, CUDA face. Same contract and formulas as csrc/cpu/concat_embed.cpp.
//
// Forward: one warp per output row (kWarps rows per block). Each lane holds up to 32 values of the
// row in registers (D <= 1024), loaded as 16-byte vectors when D and every base pointer allow it
// (scalar loads with bounds checks otherwise): x = features + position + type in float32, warp
// reductions for the LayerNorm mean and (two-pass) variance, dropout from the shared hash, one
// vector store. One read of every input and one write of the output.
//
// Backward: one launch per modality; block (l, j) (kBwdThreads threads, kMaxD / kBwdThreads values
// per thread: <= 128 registers) owns position l for batch rows [j*bb, j*bb + bb). It recomputes x
// from the inputs, writes the feature-gradient rows (the LayerNorm row sums go through the block
// in warp order) and keeps float32 register accumulators; its partials (the position/type
// gradient row, the LayerNorm weight and bias rows) go to global memory, and stage 2 sums them
// with torch's sum. Deterministic, no atomics. The batch chunk bb is halved from
// kMaxBatchChunk until the grid has kBwdBlocksPerSm blocks per SM (B >= 8 fills an H100 at the
// usual lengths); each halving costs 16 bytes of partials per block and column, written and read
// once. Launched on the current stream with a device guard; no host synchronisation.
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"
#include "concat_embed.h"
#include "cuda/launch_config.h"

namespace mmfast {
namespace {

constexpr int kMaxM = static_cast<int>(kConcatEmbedMaxModalities);
constexpr int kWarps = 4;          // rows per forward block
constexpr int kMaxD = 1024;        // forward registers per lane: kMaxD / 32 values
constexpr int kBwdThreads = 128;   // one position per backward block
constexpr int kMaxBatchChunk = 32; // most batch rows per backward block
constexpr int kBwdBlocksPerSm = 2; // backward grid target
// How the kernels are launched (and what kernels-report reads: csrc/cuda/launch_config.h)
constexpr LaunchConfig kFwdLaunch{kWarps * 32, 0, 0};
constexpr LaunchConfig kBwdLaunch{kBwdThreads, 0, 0};
using CudaTypes = TypeList<float, Half, BFloat16>;

// float32 / float16 / bfloat16 only (no float64 instantiations: compile time).
template <typename F>
void dispatch_cuda_types(ScalarType st, const char* arg, F&& f) {
  dispatch<float, Half, BFloat16>(st, arg, std::forward<F>(f));
}

struct Args {
  const void* feat[kMaxM];
  const float* pos[kMaxM];
  int64_t L[kMaxM];
  int64_t off[kMaxM + 1];
  const float* type;
  const float* w;
  const float* bias;
  const int64_t* seed;
  int64_t B, Ltot, D;
  int M;
  float eps, scale;
  uint32_t thresh;
  bool dropout, vec;
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

__device__ __forceinline__ uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

__device__ __forceinline__ bool dropout_keep(uint64_t idx, uint32_t k0, uint32_t k1, uint32_t thresh) {
  uint32_t h = fmix32(static_cast<uint32_t>(idx) ^ k0);
  h = fmix32(h ^ static_cast<uint32_t>(idx >> 32) ^ k1);
  return (h >> 8) >= thresh;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// VEC values of row `p` starting at column col0 (0 beyond D).
template <typename T, int VEC>
__device__ __forceinline__ void load_row(const T* p, int64_t col0, int64_t D, bool vec, float* out) {
  if (vec) {
    if (col0 < D) {
      const Vec<T, VEC> a = *reinterpret_cast<const Vec<T, VEC>*>(p + col0);
#pragma unroll
      for (int e = 0; e < VEC; ++e) out[e] = static_cast<float>(a.v[e]);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) out[e] = 0.f;
    }
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = col0 + e < D ? static_cast<float>(p[col0 + e]) : 0.f;
  }
}

// float32 parameter rows: VEC/4 16-byte loads in vector mode (col0 is a multiple of 4 there).
template <int VEC>
__device__ __forceinline__ void load_param(const float* p, int64_t col0, int64_t D, bool vec, float* out) {
  if (vec && VEC % 4 == 0) {
    if (col0 < D) {
#pragma unroll
      for (int q = 0; q < VEC / 4; ++q) {
        const float4 a = *reinterpret_cast<const float4*>(p + col0 + 4 * q);
        out[4 * q] = a.x;
        out[4 * q + 1] = a.y;
        out[4 * q + 2] = a.z;
        out[4 * q + 3] = a.w;
      }
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) out[e] = 0.f;
    }
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = col0 + e < D ? p[col0 + e] : 0.f;
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_row(T* p, int64_t col0, int64_t D, bool vec, const float* v) {
  if (vec) {
    if (col0 < D) {
      Vec<T, VEC> a;
#pragma unroll
      for (int e = 0; e < VEC; ++e) a.v[e] = static_cast<T>(v[e]);
      *reinterpret_cast<Vec<T, VEC>*>(p + col0) = a;
    }
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      if (col0 + e < D) p[col0 + e] = static_cast<T>(v[e]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) concat_embed_fwd_kernel(Args a, T* __restrict__ out,
                                                                       float* __restrict__ mean_out,
                                                                       float* __restrict__ rstd_out) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int CH = kMaxD / (32 * VEC);
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (r >= a.B * a.Ltot) return;  // the whole warp leaves together
  const int64_t b = r / a.Ltot, t = r - b * a.Ltot;
  int m = 0;
  while (m + 1 < a.M && t >= a.off[m + 1]) ++m;
  const int64_t l = t - a.off[m], D = a.D;
  const T* f = static_cast<const T*>(a.feat[m]) + (b * a.L[m] + l) * D;
  const float* pe = a.pos[m] ? a.pos[m] + l * D : nullptr;
  const float* te = a.type ? a.type + m * D : nullptr;

  float x[CH][VEC];
  float tmp[VEC];
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const int64_t col0 = (static_cast<int64_t>(c) * 32 + lane) * VEC;
    load_row<T, VEC>(f, col0, D, a.vec, x[c]);
    if (pe) {
      load_param<VEC>(pe, col0, D, a.vec, tmp);
#pragma unroll
      for (int e = 0; e < VEC; ++e) x[c][e] += tmp[e];
    }
    if (te) {
      load_param<VEC>(te, col0, D, a.vec, tmp);
#pragma unroll
      for (int e = 0; e < VEC; ++e) x[c][e] += tmp[e];
    }
  }
  if (a.w) {
    float s = 0.f;
#pragma unroll
    for (int c = 0; c < CH; ++c)
#pragma unroll
      for (int e = 0; e < VEC; ++e) s += x[c][e];  // columns >= D hold 0
    const float mean = warp_sum(s) / static_cast<float>(D);
    float q = 0.f;
#pragma unroll
    for (int c = 0; c < CH; ++c)
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int64_t col = (static_cast<int64_t>(c) * 32 + lane) * VEC + e;
        const float d = col < D ? x[c][e] - mean : 0.f;
        q += d * d;
      }
    const float rstd = 1.f / sqrtf(warp_sum(q) / static_cast<float>(D) + a.eps);
    if (lane == 0) {
      mean_out[r] = mean;
      rstd_out[r] = rstd;
    }
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      const int64_t col0 = (static_cast<int64_t>(c) * 32 + lane) * VEC;
      float wv[VEC], bv[VEC];
      load_param<VEC>(a.w, col0, D, a.vec, wv);
      if (a.bias) load_param<VEC>(a.bias, col0, D, a.vec, bv);
#pragma unroll
      for (int e = 0; e < VEC; ++e) x[c][e] = (x[c][e] - mean) * rstd * wv[e] + (a.bias ? bv[e] : 0.f);
    }
  }
  uint32_t k0 = 0, k1 = 0;
  if (a.dropout) {
    const uint64_t s = static_cast<uint64_t>(*a.seed);
    k0 = static_cast<uint32_t>(s);
    k1 = static_cast<uint32_t>(s >> 32);
  }
  T* o = out + r * D;
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const int64_t col0 = (static_cast<int64_t>(c) * 32 + lane) * VEC;
    if (a.dropout) {
      const uint64_t base = static_cast<uint64_t>(r * D + col0);
#pragma unroll
      for (int e = 0; e < VEC; ++e) x[c][e] = dropout_keep(base + e, k0, k1, a.thresh) ? x[c][e] * a.scale : 0.f;
    }
    store_row<T, VEC>(o, col0, D, a.vec, x[c]);
  }
}

// The sums of a and b over the block, the same in every thread: warp shuffles, then the warps in
// order (deterministic).
__device__ __forceinline__ float2 block_sum2(float a, float b, float2* red) {
  a = warp_sum(a);
  b = warp_sum(b);
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  if (lane == 0) red[warp] = make_float2(a, b);
  __syncthreads();
  float2 s = red[0];
#pragma unroll
  for (int w = 1; w < kBwdThreads / 32; ++w) {
    s.x += red[w].x;
    s.y += red[w].y;
  }
  __syncthreads();  // red is reused for the next row
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kBwdThreads) concat_embed_bwd_kernel(
    Args a, int m, int64_t batch_chunk, const T* __restrict__ gout, const float* __restrict__ mean_in,
    const float* __restrict__ rstd_in, T* __restrict__ gfeat, float* __restrict__ pg, float* __restrict__ pw,
    float* __restrict__ pb) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int CH = kMaxD / (kBwdThreads * VEC);  // CH * VEC = 8 values per thread and array
  __shared__ float2 red[kBwdThreads / 32];
  const int64_t D = a.D, L = a.L[m];
  const int64_t l = blockIdx.x;  // the grid has exactly L columns
  const bool ln = a.w != nullptr;
  const T* feat = static_cast<const T*>(a.feat[m]);
  const float* pe = a.pos[m] ? a.pos[m] + l * D : nullptr;
  const float* te = a.type ? a.type + m * D : nullptr;
  auto col0_of = [](int c) { return (static_cast<int64_t>(c) * kBwdThreads + threadIdx.x) * VEC; };

  // Accumulators in registers; the weight, position and type rows are re-read each batch row
  // (they stay in L1) to keep register pressure down.
  float acc_g[CH][VEC], acc_w[CH][VEC], acc_b[CH][VEC];
#pragma unroll
  for (int c = 0; c < CH; ++c)
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc_g[c][e] = acc_w[c][e] = acc_b[c][e] = 0.f;
  uint32_t k0 = 0, k1 = 0;
  if (a.dropout) {
    const uint64_t s = static_cast<uint64_t>(*a.seed);
    k0 = static_cast<uint32_t>(s);
    k1 = static_cast<uint32_t>(s >> 32);
  }
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * batch_chunk;
  const int64_t b1 = b0 + batch_chunk < a.B ? b0 + batch_chunk : a.B;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t orow = b * a.Ltot + a.off[m] + l, frow = b * L + l;
    float g[CH][VEC];
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      const int64_t col0 = col0_of(c);
      load_row<T, VEC>(gout + orow * D, col0, D, a.vec, g[c]);
      if (a.dropout) {
        const uint64_t base = static_cast<uint64_t>(orow * D + col0);
#pragma unroll
        for (int e = 0; e < VEC; ++e) g[c][e] = dropout_keep(base + e, k0, k1, a.thresh) ? g[c][e] * a.scale : 0.f;
      }
    }
    if (ln) {
      const float mean = mean_in[orow], rstd = rstd_in[orow];
      float xh[CH][VEC];
      float s1 = 0.f, s2 = 0.f;
#pragma unroll
      for (int c = 0; c < CH; ++c) {
        const int64_t col0 = col0_of(c);
        float wv[VEC], tmp[VEC];
        load_row<T, VEC>(feat + frow * D, col0, D, a.vec, xh[c]);
        if (pe) {
          load_param<VEC>(pe, col0, D, a.vec, tmp);
#pragma unroll
          for (int e = 0; e < VEC; ++e) xh[c][e] += tmp[e];
        }
        if (te) {
          load_param<VEC>(te, col0, D, a.vec, tmp);
#pragma unroll
          for (int e = 0; e < VEC; ++e) xh[c][e] += tmp[e];
        }
        load_param<VEC>(a.w, col0, D, a.vec, wv);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const bool in = col0 + e < D;
          xh[c][e] = in ? (xh[c][e] - mean) * rstd : 0.f;
          acc_w[c][e] += g[c][e] * xh[c][e];
          acc_b[c][e] += g[c][e];
          g[c][e] *= wv[e];  // d/d(x-hat)
          s1 += g[c][e];
          s2 += g[c][e] * xh[c][e];
        }
      }
      const float2 sums = block_sum2(s1, s2, red);
      const float c1 = sums.x / static_cast<float>(D), c2 = sums.y / static_cast<float>(D);
#pragma unroll
      for (int c = 0; c < CH; ++c)
#pragma unroll
        for (int e = 0; e < VEC; ++e) g[c][e] = rstd * (g[c][e] - c1 - xh[c][e] * c2);
    }
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      const int64_t col0 = col0_of(c);
      store_row<T, VEC>(gfeat + frow * D, col0, D, a.vec, g[c]);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc_g[c][e] += col0 + e < D ? g[c][e] : 0.f;
    }
  }
  // This block's partials: row (blockIdx.y, l) of the (chunks, L, D) buffers.
  const int64_t part = (static_cast<int64_t>(blockIdx.y) * L + l) * D;
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const int64_t col0 = col0_of(c);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      if (col0 + e >= D) continue;
      if (pg) pg[part + col0 + e] = acc_g[c][e];
      if (ln) {
        pw[part + col0 + e] = acc_w[c][e];
        pb[part + col0 + e] = acc_b[c][e];
      }
    }
  }
}

// Batch rows per backward block for a modality of L positions: the largest power of two <= 32
// whose grid reaches kBwdBlocksPerSm blocks per SM (1 when even that is not enough).
int64_t backward_batch_chunk(int64_t B, int64_t L, int sms) {
  int64_t bb = kMaxBatchChunk;
  auto blocks = [&](int64_t c) { return L * ((B + c - 1) / c); };
  while (bb > 1 && blocks(bb) < static_cast<int64_t>(kBwdBlocksPerSm) * sms && (B + bb - 1) / bb < B) bb /= 2;
  return bb;
}

inline uint32_t dropout_threshold(double p) {
  const double t = std::floor(p * 16777216.0 + 0.5);
  return t >= 16777216.0 ? 16777216u : static_cast<uint32_t>(t);
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The CUDA-only checks, the shared ones (check_concat_embed_inputs), and the kernel arguments.
Args make_args(const std::vector<Tensor>& feats, const std::optional<Tensor>& type_emb, const std::vector<Tensor>& pos,
               const std::vector<int64_t>& pos_index, const std::optional<Tensor>& ln_weight,
               const std::optional<Tensor>& ln_bias, double eps, double dropout_p, const std::optional<Tensor>& seed) {
  const Tensor& f0 = feats[0];
  MMFAST_CHECK_ARG(f0.dim() != 3 || f0.is_cuda(), "features", "expected CUDA tensors, got ", device_name(f0));
  const ScalarType st = f0.scalar_type();
  MMFAST_CHECK_ARG(st == ScalarType::Float || st == ScalarType::Half || st == ScalarType::BFloat16, "features",
                   "the CUDA face supports float32, float16 and bfloat16, got ", st);
  check_concat_embed_inputs(feats, type_emb, pos, pos_index, ln_weight, ln_bias, dropout_p, seed, ScalarType::Float);
  Args a{};
  const int64_t M = static_cast<int64_t>(feats.size());
  a.M = static_cast<int>(M);
  a.B = f0.size(0);
  a.D = f0.size(2);
  MMFAST_CHECK_ARG(a.D <= kMaxD, "features", "the CUDA face supports hidden sizes up to ", kMaxD, ", got ", a.D,
                   " (use the Triton face)");
  // 16-byte vector loads need D to fill whole vectors and every row pointer 16-byte aligned.
  const int vec_elems = 16 / static_cast<int>(f0.element_size());
  bool vec = a.D % vec_elems == 0;
  for (int64_t m = 0; m < M; ++m) {
    a.feat[m] = feats[m].const_data_ptr();
    vec = vec && aligned16(a.feat[m]);
    a.L[m] = feats[m].size(1);
    a.off[m + 1] = a.off[m] + a.L[m];
    a.pos[m] = nullptr;
    if (pos_index[m] >= 0) {
      a.pos[m] = pos[pos_index[m]].const_data_ptr<float>();
      vec = vec && aligned16(a.pos[m]);
    }
  }
  a.Ltot = a.off[M];
  if (type_emb.has_value()) {
    a.type = type_emb->const_data_ptr<float>();
    vec = vec && aligned16(a.type);
  }
  if (ln_weight.has_value()) {
    a.w = ln_weight->const_data_ptr<float>();
    vec = vec && aligned16(a.w);
  }
  if (ln_bias.has_value()) {
    a.bias = ln_bias->const_data_ptr<float>();
    vec = vec && aligned16(a.bias);
  }
  a.eps = static_cast<float>(eps);
  if (dropout_p > 0.0) {
    a.dropout = true;
    a.seed = seed->const_data_ptr<int64_t>();  // read on the device: no host sync
    a.thresh = dropout_threshold(dropout_p);
    a.scale = dropout_p < 1.0 ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 0.f;
  }
  a.vec = vec;
  return a;
}

std::tuple<Tensor, Tensor, Tensor> concat_embed_forward_cuda(
    const std::vector<Tensor>& feats, const std::optional<Tensor>& type_emb, const std::vector<Tensor>& pos,
    const std::vector<int64_t>& pos_index, const std::optional<Tensor>& ln_weight,
    const std::optional<Tensor>& ln_bias, double eps, double dropout_p, const std::optional<Tensor>& seed) {
  MMFAST_CHECK_ARG(!feats.empty(), "features", "expected at least one modality");
  const CudaDeviceGuard guard(feats[0]);
  Args a = make_args(feats, type_emb, pos, pos_index, ln_weight, ln_bias, eps, dropout_p, seed);
  const Tensor out = empty({a.B, a.Ltot, a.D}, feats[0].scalar_type(), feats[0]);
  const std::vector<int64_t> stats = a.w ? std::vector<int64_t>{a.B, a.Ltot} : std::vector<int64_t>{0};
  const Tensor mean = empty(stats, ScalarType::Float, feats[0]), rstd = empty(stats, ScalarType::Float, feats[0]);
  a.vec = a.vec && aligned16(out.const_data_ptr());
  const int64_t rows = a.B * a.Ltot;
  if (rows == 0 || a.D == 0) return {out, mean, rstd};
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  MMFAST_CHECK_ARG(blocks < (int64_t(1) << 31), "features", "too many rows (", rows, ")");
  const cudaStream_t stream = current_cuda_stream(feats[0]);
  dispatch_cuda_types(out.scalar_type(), "features", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    concat_embed_fwd_kernel<scalar_t><<<static_cast<unsigned>(blocks), kFwdLaunch.threads,
                                        kFwdLaunch.dynamic_smem_bytes, stream>>>(
        a, out.mutable_data_ptr<scalar_t>(), a.w ? mean.mutable_data_ptr<float>() : nullptr,
        a.w ? rstd.mutable_data_ptr<float>() : nullptr);
  });
  check_launch("concat_embed_fwd_kernel");
  return {out, mean, rstd};
}

std::vector<Tensor> concat_embed_backward_cuda(
    const Tensor& grad_out, const std::vector<Tensor>& feats, const std::optional<Tensor>& type_emb,
    const std::vector<Tensor>& pos, const std::vector<int64_t>& pos_index, const std::optional<Tensor>& ln_weight,
    const std::optional<Tensor>& ln_bias, const Tensor& mean, const Tensor& rstd, double dropout_p,
    const std::optional<Tensor>& seed) {
  MMFAST_CHECK_ARG(!feats.empty(), "features", "expected at least one modality");
  const CudaDeviceGuard guard(feats[0]);
  Args a = make_args(feats, type_emb, pos, pos_index, ln_weight, ln_bias, 0.0, dropout_p, seed);
  const IntArrayRef go_sizes = grad_out.sizes();
  MMFAST_CHECK_ARG(go_sizes.size() == 3 && go_sizes[0] == a.B && go_sizes[1] == a.Ltot && go_sizes[2] == a.D,
                   "grad_out", "expected shape (", a.B, ", ", a.Ltot, ", ", a.D, "), got ", shape(grad_out));
  MMFAST_CHECK_ARG(grad_out.scalar_type() == feats[0].scalar_type(), "grad_out", "expected dtype ",
                   feats[0].scalar_type(), ", got ", grad_out.scalar_type());
  check_same_device(grad_out, feats[0], "grad_out");
  const Tensor go = as_contiguous(grad_out);
  std::optional<Tensor> mean_c, rstd_c;
  if (a.w) {
    MMFAST_CHECK_ARG(mean.numel() == a.B * a.Ltot && mean.scalar_type() == ScalarType::Float, "mean", "expected ",
                     a.B * a.Ltot, " float32 values from the forward, got ", shape(mean));
    MMFAST_CHECK_ARG(rstd.numel() == a.B * a.Ltot && rstd.scalar_type() == ScalarType::Float, "rstd", "expected ",
                     a.B * a.Ltot, " float32 values from the forward, got ", shape(rstd));
    check_same_device(mean, feats[0], "mean");
    check_same_device(rstd, feats[0], "rstd");
    mean_c = as_contiguous(mean);
    rstd_c = as_contiguous(rstd);
  }
  const Tensor& f0 = feats[0];
  std::vector<Tensor> grads;  // [grad_features..., grad_type, grad_pos..., grad_ln_weight, grad_ln_bias]
  for (const auto& f : feats) {
    grads.push_back(torch::stable::empty_like(f));
    a.vec = a.vec && aligned16(grads.back().const_data_ptr());
  }
  a.vec = a.vec && aligned16(go.const_data_ptr());
  Tensor gtype = type_emb.has_value() ? torch::stable::new_zeros(*type_emb, type_emb->sizes()) : empty({0}, ScalarType::Float, f0);
  std::vector<Tensor> gpos;
  for (const auto& t : pos) gpos.push_back(torch::stable::new_zeros(t, t.sizes()));
  // One buffer for every modality's per-block LayerNorm partials, so stage 2 is one sum each.
  int sms = 0;
  MMFAST_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, f0.get_device_index()) == cudaSuccess,
               "concat_embed: cannot read the GPU's SM count");
  std::vector<int64_t> chunk(a.M), nbc(a.M);
  int64_t ln_rows = 0;
  for (int m = 0; m < a.M; ++m) {
    chunk[m] = backward_batch_chunk(a.B, a.L[m], sms);
    nbc[m] = (a.B + chunk[m] - 1) / chunk[m];
    ln_rows += nbc[m] * a.L[m];
  }
  const Tensor pw = empty({a.w ? ln_rows : 0, a.D}, ScalarType::Float, f0);
  const Tensor pb = empty({a.w ? ln_rows : 0, a.D}, ScalarType::Float, f0);
  const std::vector<int64_t> dim0{0}, dim01{0, 1};
  const cudaStream_t stream = current_cuda_stream(f0);
  int64_t ln_row0 = 0;
  for (int m = 0; m < a.M; ++m) {
    const int64_t L = a.L[m], k = pos_index[m];
    // the position / type gradient partial of every (batch chunk, position)
    const Tensor pg = empty({(k >= 0 || a.type) ? nbc[m] : 0, L, a.D}, ScalarType::Float, f0);
    if (nbc[m] > 0 && a.D > 0) {
      MMFAST_CHECK_ARG(L < (int64_t(1) << 31) && nbc[m] < 65536, "features", "too many positions or batch rows");
      const dim3 grid(static_cast<unsigned>(L), static_cast<unsigned>(nbc[m]));
      float* pw_m = a.w ? pw.mutable_data_ptr<float>() + ln_row0 * a.D : nullptr;
      float* pb_m = a.w ? pb.mutable_data_ptr<float>() + ln_row0 * a.D : nullptr;
      dispatch_cuda_types(go.scalar_type(), "grad_out", [&](auto tag) {
        using scalar_t = typename decltype(tag)::type;
        concat_embed_bwd_kernel<scalar_t><<<grid, kBwdLaunch.threads, kBwdLaunch.dynamic_smem_bytes, stream>>>(
            a, m, chunk[m], go.const_data_ptr<scalar_t>(), a.w ? mean_c->const_data_ptr<float>() : nullptr,
            a.w ? rstd_c->const_data_ptr<float>() : nullptr, grads[m].mutable_data_ptr<scalar_t>(),
            (k >= 0 || a.type) ? pg.mutable_data_ptr<float>() : nullptr, pw_m, pb_m);
      });
      check_launch("concat_embed_bwd_kernel");
    }
    ln_row0 += nbc[m] * L;
    // Stage 2 (deterministic torch reductions over the partials), written into the gradient rows.
    if (k >= 0 && nbc[m] > 0) {
      Tensor rows = torch::stable::narrow(gpos[k], 0, 0, L);
      torch::stable::sum_out(rows, pg, IntArrayRef(dim0));
    }
    if (a.type && nbc[m] > 0) {
      Tensor row = torch::stable::select(gtype, 0, m);
      torch::stable::sum_out(row, pg, IntArrayRef(dim01));
    }
  }
  grads.push_back(gtype);
  for (auto& g : gpos) grads.push_back(g);
  // With no batch rows the partial buffers are empty and their sums are the zero gradients.
  grads.push_back(a.w ? torch::stable::sum(pw, IntArrayRef(dim0)) : empty({0}, ScalarType::Float, f0));
  grads.push_back(a.bias ? torch::stable::sum(pb, IntArrayRef(dim0)) : empty({0}, ScalarType::Float, f0));
  return grads;
}

// Every instantiation's launch configuration, for kernels-report.
[[maybe_unused]] const bool kLaunchConfigsDeclared = [] {
  CudaTypes::for_each([](auto elem) {
    const std::string t = arg_name<typename decltype(elem)::type>();
    declare_launch("concat_embed", kernel_name("concat_embed_fwd_kernel", {t}), kFwdLaunch);
    declare_launch("concat_embed", kernel_name("concat_embed_bwd_kernel", {t}), kBwdLaunch);
  });
  return true;
}();

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(mmfast_C, CUDA, m) {
  m.impl("concat_embed_forward", TORCH_BOX(&concat_embed_forward_cuda));
  m.impl("concat_embed_backward", TORCH_BOX(&concat_embed_backward_cuda));
}

}  // namespace mmfast
