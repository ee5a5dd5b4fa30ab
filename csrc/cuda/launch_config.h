#pragma once
// The launch configuration of every CUDA kernel (threads per block, dynamic shared memory per block,
// the blocks per SM it is built for), declared once beside the constants its launcher uses and
// exported from mmfast._C_cuda as a plain C table, mmfast_cuda_launch_configs() (csrc/cuda/module.cpp).
// `mmfast kernels-report` reads that table through ctypes (no GPU needed) and joins it with the
// registers and static shared memory cuobjdump reports per kernel: cuobjdump knows neither the block
// size nor the dynamic shared memory, and without both the occupancy cannot be computed. A kernel in
// the library without a declared configuration, or a declaration without its kernel, fails
// `kernels-report --check`.
//
// Usage in a .cu file: one LaunchConfig constant per kernel, used by the launch itself
// (kernel<<<grid, cfg.threads, cfg.dynamic_smem_bytes, stream>>>), and a static initialiser that
// declares every instantiation:
//   [[maybe_unused]] const bool kDeclared = [] {
//     declare_launch("op", kernel_name("my_kernel", {arg_name<T>(), std::to_string(N)}), kMyLaunch);
//     return true; }();

#include <cstdint>
#include <initializer_list>
#include <string>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>
#endif

// One row of the exported table (plain C: read with ctypes by mmfast/kernels_report.py).
extern "C" {
struct MmfastLaunchConfig {
  const char* op;      // the op family: "attention", "concat_embed", "cross_entropy"
  const char* kernel;  // "name<template args>" as the demangled symbol spells it, without namespaces
  int32_t threads;     // per block
  int32_t dynamic_smem_bytes;  // per block (static shared memory is in the binary: cuobjdump)
  int32_t min_blocks_per_sm;   // the residency the kernel is built for (__launch_bounds__), 0: none
};
}

namespace mmfast {

struct LaunchConfig {
  int threads;
  int dynamic_smem_bytes;
  int min_blocks_per_sm;
};

// Adds one kernel instantiation to the table (from static initialisers; defined in module.cpp).
void declare_launch(const char* op, const std::string& kernel, const LaunchConfig& config);

// "name<a, b>"
inline std::string kernel_name(const char* name, std::initializer_list<std::string> template_args) {
  std::string s = std::string(name) + "<";
  const char* sep = "";
  for (const auto& a : template_args) {
    s += sep + a;
    sep = ", ";
  }
  return s + ">";
}

#if defined(__CUDACC__)
// A template type argument as the demangled kernel symbol spells it (namespaces dropped). No
// spelling for T: declaring a kernel instantiated over it does not compile.
template <typename T>
struct ArgName;
template <>
struct ArgName<float> {
  static constexpr const char* value = "float";
};
template <>
struct ArgName<__half> {
  static constexpr const char* value = "__half";
};
template <>
struct ArgName<__nv_bfloat16> {
  static constexpr const char* value = "__nv_bfloat16";
};
template <>
struct ArgName<torch::headeronly::Half> {
  static constexpr const char* value = "Half";
};
template <>
struct ArgName<torch::headeronly::BFloat16> {
  static constexpr const char* value = "BFloat16";
};

template <typename T>
std::string arg_name() {
  return ArgName<T>::value;
}

template <typename T>
struct Elem {
  using type = T;
};

// f(Elem<T>{}) for every T of the list: the instantiations to declare.
template <typename... Ts>
struct TypeList {
  template <typename F>
  static void for_each(F&& f) {
    (f(Elem<Ts>{}), ...);
  }
};
#endif

}  // namespace mmfast
