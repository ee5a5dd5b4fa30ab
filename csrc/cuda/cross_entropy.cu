// Softmax cross-entropy, CUDA face. One thread block per row: pass 1 reads the row once with an
// online max/sum-exp (plus the sums label smoothing needs), pass 2 writes the gradient times
// grad_scale, either into a new (N, C) tensor or over the logits themselves
// (cross_entropy_forward_inplace: every thread reads x[j] before it writes g[j] for the same j,
// and a block owns its row). Rows of up to kThreads * kMaxItems classes stay in registers from
// pass 1 to pass 2 (ITEMS values per thread, all loads issued at once): the kernel then reads the
// logits once; longer rows read them again in pass 2.
// Same formulas as csrc/cpu/cross_entropy.cpp. Launched on the current stream; no host sync.
// Compiled on a machine without a GPU: not yet run (see tests/test_cross_entropy_gpu.py).
#include <cmath>

#include "common.h"
#include "cross_entropy.h"
#include "cuda/launch_config.h"

namespace mmfast {
namespace {

constexpr int kThreads = 512;
constexpr int kMaxItems = 64;  // 32768 classes in registers (BERT's 30522); <= 128 registers/thread
constexpr int kShortItems = 8;  // rows up to 4096 classes: fewer registers
// How the kernel is launched (and what kernels-report reads: csrc/cuda/launch_config.h)
constexpr LaunchConfig kLaunch{kThreads, 0, 0};

struct RowStats {
  float max, sum_exp, sum_wx;
};

__device__ __forceinline__ RowStats merge(RowStats a, RowStats b) {
  const float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return {m, 0.f, a.sum_wx + b.sum_wx};
  return {m, a.sum_exp * __expf(a.max - m) + b.sum_exp * __expf(b.max - m), a.sum_wx + b.sum_wx};
}

__device__ RowStats block_reduce(RowStats v) {
  __shared__ RowStats warp_partials[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int off = 16; off > 0; off /= 2) {
    RowStats o{__shfl_down_sync(0xffffffff, v.max, off), __shfl_down_sync(0xffffffff, v.sum_exp, off),
               __shfl_down_sync(0xffffffff, v.sum_wx, off)};
    v = merge(v, o);
  }
  if (lane == 0) warp_partials[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_partials[lane] : RowStats{-INFINITY, 0.f, 0.f};
    for (int off = 16; off > 0; off /= 2) {
      RowStats o{__shfl_down_sync(0xffffffff, v.max, off), __shfl_down_sync(0xffffffff, v.sum_exp, off),
                 __shfl_down_sync(0xffffffff, v.sum_wx, off)};
      v = merge(v, o);
    }
    if (lane == 0) warp_partials[0] = v;
  }
  __syncthreads();
  return warp_partials[0];
}

__device__ float block_sum(float v) {
  __shared__ float partials[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffff, v, off);
  if (lane == 0) partials[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? partials[lane] : 0.f;
    for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffff, v, off);
    if (lane == 0) partials[0] = v;
  }
  __syncthreads();
  const float total = partials[0];
  __syncthreads();  // partials is reused by the next call
  return total;
}

// Pass 1, one element: the online max / sum-exp and the label-smoothing sums.
__device__ __forceinline__ void accumulate(RowStats& s, float& weight_total, float xj, int64_t j,
                                           const float* __restrict__ weight, float eps) {
  const float m = fmaxf(s.max, xj);
  if (m != -INFINITY) s.sum_exp = s.sum_exp * __expf(s.max - m) + __expf(xj - m);
  s.max = m;
  if (eps != 0.f) {
    const float wj = weight ? weight[j] : 1.f;
    s.sum_wx += wj * xj;
    weight_total += wj;
  }
}

// Pass 2: everything the gradient of one element needs.
struct GradCoef {
  float shift, inv_sum, ab, a, smooth, scale;  // smooth = eps / C
  int64_t t;
  __device__ __forceinline__ float operator()(float xj, int64_t j, const float* __restrict__ weight) const {
    // p_j = exp(x_j - max) / sum: x_j - max is exact, x_j - lse loses digits when |x| ~ 1e4.
    // A row of only -inf gives 0 * inf = NaN, as torch does.
    float gj = ab * (expf(xj - shift) * inv_sum);
    if (smooth != 0.f) gj -= smooth * (weight ? weight[j] : 1.f);
    if (j == t) gj -= a;
    return gj * scale;
  }
};

// ITEMS > 0: C <= ITEMS * kThreads, the row is held in registers (element threadIdx.x + i * kThreads
// in v[i]); ITEMS == 0: any C, pass 2 reads the row again.
template <typename scalar_t, int ITEMS>
__global__ void __launch_bounds__(kThreads) cross_entropy_forward_kernel(
    const scalar_t* logits, int64_t row_stride, const int64_t* __restrict__ target,
    const float* __restrict__ weight, int64_t C, int64_t ignore_index, float eps,
    const float* __restrict__ grad_scale, int64_t grad_scale_stride, float* __restrict__ loss,
    scalar_t* grad, int64_t grad_row_stride) {
  // No __restrict__ on logits/grad: they alias in the in-place variant.
  const int64_t row = blockIdx.x;  // int64 offsets: N*C may exceed 2^31
  const scalar_t* x = logits + row * row_stride;
  scalar_t* g = grad ? grad + row * grad_row_stride : nullptr;
  const int64_t t = target[row];

  if (t == ignore_index) {
    if (threadIdx.x == 0) loss[row] = 0.f;
    if (g)
      for (int64_t j = threadIdx.x; j < C; j += kThreads) g[j] = scalar_t(0);
    return;
  }
  if (t < 0 || t >= C) {  // never read out of bounds; poison the row and trap like torch does
    if (threadIdx.x == 0) loss[row] = NAN;
    if (g)
      for (int64_t j = threadIdx.x; j < C; j += kThreads) g[j] = scalar_t(NAN);
    CUDA_KERNEL_ASSERT(false && "mmfast cross_entropy: target index out of range");
    return;
  }

  RowStats s{-INFINITY, 0.f, 0.f};
  float weight_total = 0.f;
  float v[ITEMS > 0 ? ITEMS : 1];
  if constexpr (ITEMS > 0) {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {  // every load in flight before the first use
      const int64_t j = threadIdx.x + static_cast<int64_t>(i) * kThreads;
      v[i] = j < C ? static_cast<float>(x[j]) : -INFINITY;
    }
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(i) * kThreads;
      if (j < C) accumulate(s, weight_total, v[i], j, weight, eps);
    }
  } else {
    for (int64_t j = threadIdx.x; j < C; j += kThreads) accumulate(s, weight_total, static_cast<float>(x[j]), j, weight, eps);
  }
  s = block_reduce(s);
  if (eps != 0.f) weight_total = weight ? block_sum(weight_total) : static_cast<float>(C);
  // logf rather than __logf: the loss is what users compare against torch.
  const float lse = (s.max == -INFINITY ? 0.f : s.max) + logf(s.sum_exp);
  const float w_t = weight ? weight[t] : 1.f;
  const float a = (1.f - eps) * w_t;
  const float x_t = static_cast<float>(x[t]);  // every thread reads it before anyone overwrites x
  __syncthreads();
  if (threadIdx.x == 0) {
    float l = a * (lse - x_t);
    if (eps != 0.f) l += eps / C * (weight_total * lse - s.sum_wx);
    loss[row] = l;
  }
  if (!g) return;
  const GradCoef k{s.max == -INFINITY ? 0.f : s.max, 1.f / s.sum_exp, a + eps / C * weight_total, a, eps / C,
                   grad_scale ? grad_scale[row * grad_scale_stride] : 1.f, t};
  if constexpr (ITEMS > 0) {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(i) * kThreads;
      if (j < C) g[j] = static_cast<scalar_t>(k(v[i], j, weight));
    }
  } else {
    for (int64_t j = threadIdx.x; j < C; j += kThreads) g[j] = static_cast<scalar_t>(k(static_cast<float>(x[j]), j, weight));
  }
}


// The shared checks plus what only this face cannot do.
CrossEntropyInputs check_cuda_inputs(const Tensor& logits, const Tensor& target, const std::optional<Tensor>& weight,
                                     const std::optional<Tensor>& grad_scale) {
  MMFAST_CHECK_ARG(logits.scalar_type() != ScalarType::Double, "logits",
                   "float64 is not supported by the CUDA kernel (use backend='torch')");
  MMFAST_CHECK_ARG(logits.dim() != 2 || logits.size(0) <= 2147483647LL, "logits",
                   "at most 2^31-1 rows are supported, got ", logits.size(0));  // grid.x limit
  return check_cross_entropy_inputs(logits, target, weight, grad_scale);
}

void launch(const Tensor& logits, const Tensor* grad, const CrossEntropyInputs& c, int64_t ignore_index,
            double label_smoothing, const Tensor& loss) {
  const int64_t N = logits.size(0), C = logits.size(1);
  if (N == 0) return;
  const cudaStream_t stream = current_cuda_stream(logits);
  dispatch<float, Half, BFloat16>(logits.scalar_type(), "logits", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    auto run = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(N), kLaunch.threads, kLaunch.dynamic_smem_bytes, stream>>>(
          logits.const_data_ptr<scalar_t>(), logits.stride(0), c.target.const_data_ptr<int64_t>(),
          c.weight ? c.weight->const_data_ptr<float>() : nullptr, C, ignore_index,
          static_cast<float>(label_smoothing), c.scale ? c.scale->const_data_ptr<float>() : nullptr, c.scale_stride,
          loss.mutable_data_ptr<float>(), grad ? grad->mutable_data_ptr<scalar_t>() : nullptr,
          grad ? grad->stride(0) : 0);
    };
    if (C <= kShortItems * kThreads)
      run(cross_entropy_forward_kernel<scalar_t, kShortItems>);
    else if (C <= kMaxItems * kThreads)
      run(cross_entropy_forward_kernel<scalar_t, kMaxItems>);
    else
      run(cross_entropy_forward_kernel<scalar_t, 0>);
  });
  check_launch("cross_entropy_forward_kernel");
}

std::tuple<Tensor, Tensor> cross_entropy_forward_cuda(const Tensor& logits, const Tensor& target,
                                                      const std::optional<Tensor>& weight, int64_t ignore_index,
                                                      double label_smoothing, bool compute_grad,
                                                      const std::optional<Tensor>& grad_scale) {
  const CudaDeviceGuard guard(logits);
  const CrossEntropyInputs c = check_cuda_inputs(logits, target, weight, grad_scale);
  const int64_t N = logits.size(0), C = logits.size(1);
  const Tensor loss = empty({N}, ScalarType::Float, logits);
  const Tensor grad = compute_grad ? empty({N, C}, logits.scalar_type(), logits) : empty({0}, logits.scalar_type(), logits);
  launch(logits, compute_grad ? &grad : nullptr, c, ignore_index, label_smoothing, loss);
  return {loss, grad};
}

Tensor cross_entropy_forward_inplace_cuda(const Tensor& logits, const Tensor& target,
                                          const std::optional<Tensor>& weight, int64_t ignore_index,
                                          double label_smoothing, const std::optional<Tensor>& grad_scale) {
  const CudaDeviceGuard guard(logits);
  const CrossEntropyInputs c = check_cuda_inputs(logits, target, weight, grad_scale);
  const Tensor loss = empty({logits.size(0)}, ScalarType::Float, logits);
  launch(logits, &logits, c, ignore_index, label_smoothing, loss);  // the gradient overwrites the logits
  return loss;
}

// Every instantiation's launch configuration, for kernels-report.
[[maybe_unused]] const bool kLaunchConfigsDeclared = [] {
  TypeList<float, Half, BFloat16>::for_each([](auto elem) {
    const std::string t = arg_name<typename decltype(elem)::type>();
    for (const int items : {kShortItems, kMaxItems, 0})
      declare_launch("cross_entropy", kernel_name("cross_entropy_forward_kernel", {t, std::to_string(items)}), kLaunch);
  });
  return true;
}();

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(mmfast_C, CUDA, m) {
  m.impl("cross_entropy_forward", TORCH_BOX(&cross_entropy_forward_cuda));
  m.impl("cross_entropy_forward_inplace", TORCH_BOX(&cross_entropy_forward_inplace_cuda));
}

}  // namespace mmfast
