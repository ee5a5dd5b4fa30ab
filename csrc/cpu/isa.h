// Run-time choice of instruction set for the C++ CPU faces. The extension is built for the
// baseline x86-64 ISA (one wheel for every CPU); a hot loop is written once as always-inline code
// and instantiated in functions compiled for AVX-512 and AVX2 as well, and cpu_isa() picks one
// per call. GCC compiles what is inlined into a target("...") function for that target.
#pragma once

#include <cstdint>
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


// One 64-byte vector of T (an AVX-512 register; two AVX2 or four SSE registers on smaller ISAs),
// loaded and stored unaligned. GCC's vector extensions: the compiler maps them onto the ISA of the
// function they are inlined into.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64), aligned(sizeof(T))));
  static constexpr int64_t n = 64 / sizeof(T);
};
template <typename T>
using V = typename Vec<T>::type;
template <typename T>
MMFAST_INLINE V<T> vload(const T* p) { return *reinterpret_cast<const V<T>*>(p); }
template <typename T>
MMFAST_INLINE void vstore(T* p, V<T> x) { *reinterpret_cast<V<T>*>(p) = x; }
template <typename T>
MMFAST_INLINE V<T> vsplat(T x) { return V<T>{} + x; }

// A vector's lanes combined by halving (64 -> 32 -> 16 bytes, then 2-4 scalars): a few operations
// instead of a chain of one per lane. ``op`` combines two vectors or two scalars alike.
template <typename T, typename Op>
MMFAST_INLINE T vreduce(V<T> v, Op op) {
  typedef T half __attribute__((vector_size(32), aligned(sizeof(T))));
  typedef T quarter __attribute__((vector_size(16), aligned(sizeof(T))));
  half lo, hi;
  std::memcpy(&lo, &v, 32);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 32, 32);
  const half h = op(lo, hi);
  quarter ql, qh;
  std::memcpy(&ql, &h, 16);
  std::memcpy(&qh, reinterpret_cast<const char*>(&h) + 16, 16);
  const quarter q = op(ql, qh);
  T r = q[0];
  for (int c = 1; c < static_cast<int>(16 / sizeof(T)); ++c) r = op(r, q[c]);
  return r;
}

// The operations are always-inline functors (not lambdas) so that they compile for the instruction
// set of the function they end up in.
struct AddLanes {
  template <typename X>
  MMFAST_INLINE X operator()(X a, X b) const { return a + b; }
};
struct MaxLanes {
  template <typename X>
  MMFAST_INLINE X operator()(X a, X b) const { return a > b ? a : b; }
};

template <typename T>
MMFAST_INLINE T vsum(V<T> v) { return vreduce<T>(v, AddLanes{}); }

// Largest lane (exact in any order).
template <typename T>
MMFAST_INLINE T vmax(V<T> v) { return vreduce<T>(v, MaxLanes{}); }

}  // namespace mmfast
