// Runtime choice of the instruction set for the CPU kernels' inner loops.
//
// The extension is compiled for baseline x86-64 (SSE2), like the torch wheel it loads into, so a
// loop the compiler vectorizes uses 4 floats or 2 doubles per instruction. On machines with AVX2
// the hot loops run a second copy compiled with __attribute__((target("avx2"))) (8 floats / 4
// doubles), picked once per call, as ATen picks its CPU_CAPABILITY kernels.
//
// Both copies compute bit-identical results: the loops are written so that vectorizing them never
// reorders a floating-point operation (reductions keep explicit, fixed lanes), and AVX2 without
// FMA gives the compiler no fused multiply-add to contract a*b+c into. tests/compiled/test_cpu_capability.py
// checks that every op returns the same bits under T1T2_CPU_CAPABILITY=default and =avx2.
#pragma once

#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(T1T2_NO_AVX2)
#define T1T2_AVX2_CLONES 1
#define T1T2_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define T1T2_AVX2_CLONES 0
#define T1T2_TARGET_AVX2
#endif

#if defined(__GNUC__) || defined(__clang__)
// The shared body of both copies: inlined into each, so each is compiled for its own target.
#define T1T2_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define T1T2_ALWAYS_INLINE inline
#endif

namespace t1t2 {

// True when the AVX2 copies should run: the CPU has AVX2 (checked once) and the environment does
// not force the baseline with T1T2_CPU_CAPABILITY=default. Read on every call so tests can switch.
bool use_avx2();

// "avx2" or "default": what use_avx2() picks now (exposed as torch.ops.t1t2.cpu_capability()).
std::string cpu_capability();

}  // namespace t1t2
