// Run-time choice of instruction set for the C++ CPU faces. The extension is built for the
// baseline x86-64 ISA (one wheel for every CPU); a hot loop is written once as always-inline code
// and instantiated in functions compiled for AVX-512 and AVX2 as well, and cpu_isa() picks one
// per call. GCC compiles what is inlined into a target("...") function for that target.
#pragma once

#include <cstdlib>
#include <cstring>

#define MMFAST_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) || defined(_M_X64)
#define MMFAST_HAVE_X86_ISAS 1
#define MMFAST_AVX512_ATTRS __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"), noinline))
#define MMFAST_AVX2_ATTRS __attribute__((target("avx2,fma"), noinline))
#endif
#define MMFAST_BASE_ATTRS __attribute__((noinline))

namespace mmfast {

enum class Isa { kBase, kAvx2, kAvx512 };

// The widest instruction set this CPU runs, decided once per process. MMFAST_CPU_ISA=base|avx2|avx512
// narrows it (tests run every instantiation on one machine this way); it never widens it past
// what the CPU has, and mmfast's Python side warns about a value it does not know.
inline Isa cpu_isa() {
#ifdef MMFAST_HAVE_X86_ISAS
  static const Isa isa = [] {
    __builtin_cpu_init();
    Isa widest = Isa::kBase;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      widest = Isa::kAvx512;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      widest = Isa::kAvx2;
    const char* asked = std::getenv("MMFAST_CPU_ISA");
    Isa cap = Isa::kAvx512;
    if (asked && std::strcmp(asked, "base") == 0) cap = Isa::kBase;
    if (asked && std::strcmp(asked, "avx2") == 0) cap = Isa::kAvx2;
    return static_cast<int>(cap) < static_cast<int>(widest) ? cap : widest;
  }();
  return isa;
#else
  return Isa::kBase;
#endif
}

}  // namespace mmfast
