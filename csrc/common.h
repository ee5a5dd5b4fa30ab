#pragma once
// What every C++/CUDA face shares, written against the LibTorch stable ABI only
// (torch/csrc/stable, torch/headeronly; built with -DTORCH_TARGET_VERSION=2.11), so one binary
// loads into every torch >= 2.11:
//   argument checks whose message names the argument (they reach Python users unchanged),
//   dtype dispatch (the stable counterpart of AT_DISPATCH_*),
//   parallel_for that keeps a worker's error message on every torch version,
//   with USE_CUDA: the current CUDA stream, a device guard and the kernel-launch check.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <exception>
#include <mutex>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef USE_CUDA
#include <cuda_runtime.h>
#endif

namespace mmfast {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;
using IntArrayRef = torch::headeronly::IntHeaderOnlyArrayRef;

// ------------------------------------------------------------------ messages
// Printable forms of what error messages mention (the stable types have no operator<<).
struct Shape {
  IntArrayRef v;
};
inline std::ostream& operator<<(std::ostream& os, Shape s) {
  os << "(";
  for (size_t i = 0; i < s.v.size(); ++i) os << (i ? ", " : "") << s.v[i];
  return os << (s.v.size() == 1 ? ",)" : ")");
}
inline Shape shape(const Tensor& t) { return {t.sizes()}; }
inline Shape strides(const Tensor& t) { return {t.strides()}; }

struct DeviceName {
  torch::stable::Device d;
};
inline std::ostream& operator<<(std::ostream& os, DeviceName n) {
  os << (n.d.is_cpu() ? "cpu" : n.d.is_cuda() ? "cuda" : "device type " + std::to_string(static_cast<int>(n.d.type())));
  if (n.d.has_index()) os << ":" << n.d.index();
  return os;
}
inline DeviceName device_name(const Tensor& t) { return {t.device()}; }

namespace detail {
template <typename... Args>
std::string str(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  // std::runtime_error crosses the stable ABI (torch turns it into a Python RuntimeError); the
  // message is the one line the user sees, without torch's file/function prefix.
  throw std::runtime_error(::mmfast::detail::str(args...));  // qualified: no ADL (c10::str)
}
}  // namespace detail

#define MMFAST_CHECK_ARG(cond, name, ...) \
  do {                                    \
    if (!(cond)) ::mmfast::detail::fail("mmfast: argument '", name, "': ", __VA_ARGS__); \
  } while (0)

#define MMFAST_CHECK(cond, ...)                                  \
  do {                                                           \
    if (!(cond)) ::mmfast::detail::fail("mmfast: ", __VA_ARGS__); \
  } while (0)

inline void check_dim(const Tensor& t, const char* name, int64_t dim) {
  MMFAST_CHECK_ARG(t.dim() == dim, name, "expected a ", dim, "-D tensor, got shape ", shape(t));
}

inline void check_same_device(const Tensor& t, const Tensor& ref, const char* name) {
  MMFAST_CHECK_ARG(t.device() == ref.device(), name, "expected device ", device_name(ref), ", got ",
                   device_name(t));
}

// ------------------------------------------------------------------ dtype dispatch
template <typename T>
struct TypeTag {
  using type = T;
};

template <typename T>
constexpr ScalarType scalar_type_of = torch::headeronly::CppTypeToScalarType<T>::value;

// Calls f(TypeTag<T>{}) for the T in Ts whose dtype is `st`; any other dtype fails naming `arg`.
// The stable counterpart of AT_DISPATCH_*: the face lists exactly the types it instantiates.
//   dispatch<float, double, Half, BFloat16>(x.scalar_type(), "logits", [&](auto tag) {
//     using scalar_t = typename decltype(tag)::type; ... });
template <typename... Ts, typename F>
void dispatch(ScalarType st, const char* arg, F&& f) {
  const bool found = ((st == scalar_type_of<Ts> ? (f(TypeTag<Ts>{}), true) : false) || ...);
  if (!found) {
    std::string expected;
    ((expected += (expected.empty() ? "" : ", "), expected += torch::headeronly::toString(scalar_type_of<Ts>)), ...);
    detail::fail("mmfast: argument '", arg, "': expected one of the dtypes ", expected, ", got ",
                 torch::headeronly::toString(st));
  }
}

// The dtypes most C++ faces take.
template <typename F>
void dispatch_floating(ScalarType st, const char* arg, F&& f) {
  dispatch<float, double, Half, BFloat16>(st, arg, std::forward<F>(f));
}

// ------------------------------------------------------------------ CPU parallelism
// torch::stable::parallel_for (torch's thread pool) with the first error of any worker rethrown
// here: an exception escaping the callback would cross the C shim, which keeps its message only
// on torch >= 2.13.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  std::exception_ptr error;
  std::mutex error_lock;
  torch::stable::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    try {
      f(b, e);
    } catch (...) {
      const std::lock_guard<std::mutex> lock(error_lock);
      if (!error) error = std::current_exception();
    }
  });
  if (error) std::rethrow_exception(error);
}

// ------------------------------------------------------------------ tensors
// torch::stable::contiguous without its dispatcher call (an operator looked up by name) when the
// tensor already is contiguous, the common case.
inline Tensor as_contiguous(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

// torch::stable::empty with the device of `like` (the stable counterpart of at::empty(size, like.options().dtype(d))).
inline Tensor empty(std::initializer_list<int64_t> size, ScalarType dtype, const Tensor& like) {
  return torch::stable::new_empty(like, IntArrayRef(size), dtype);
}
inline Tensor empty(const std::vector<int64_t>& size, ScalarType dtype, const Tensor& like) {
  return torch::stable::new_empty(like, IntArrayRef(size), dtype);
}
inline Tensor zeros(const std::vector<int64_t>& size, ScalarType dtype, const Tensor& like) {
  return torch::stable::new_zeros(like, IntArrayRef(size), dtype);
}

// ------------------------------------------------------------------ CUDA
#ifdef USE_CUDA
// The stream torch will run the next op on, for the tensor's device (c10::cuda::getCurrentCUDAStream).
inline cudaStream_t current_cuda_stream(const Tensor& on) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(on.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

// Makes the tensor's device current for the scope (c10::cuda::CUDAGuard).
struct CudaDeviceGuard {
  explicit CudaDeviceGuard(const Tensor& on) : guard(on.get_device_index()) {}
  torch::stable::accelerator::DeviceGuard guard;
};

// After a launch: a bad configuration fails here, with the kernel's name (C10_CUDA_KERNEL_LAUNCH_CHECK).
inline void check_launch(const char* kernel) {
  const cudaError_t e = cudaGetLastError();
  MMFAST_CHECK(e == cudaSuccess, "CUDA kernel ", kernel, " failed to launch: ", cudaGetErrorString(e));
}
#endif

}  // namespace mmfast
