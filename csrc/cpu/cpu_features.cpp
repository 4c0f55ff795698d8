#include "cpu/cpu_features.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace t1t2 {

namespace {

bool cpu_has_avx2() {
#if T1T2_AVX2_CLONES
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
#else
  return false;
#endif
}

}  // namespace

bool use_avx2() {
  const char* forced = std::getenv("T1T2_CPU_CAPABILITY");
  if (forced == nullptr || *forced == '\0') return cpu_has_avx2();
  if (std::strcmp(forced, "default") == 0) return false;
  TORCH_CHECK(std::strcmp(forced, "avx2") == 0, "T1T2_CPU_CAPABILITY must be 'default' or 'avx2', got '", forced,
              "'");
  TORCH_CHECK(cpu_has_avx2(), "T1T2_CPU_CAPABILITY=avx2, but ",
              T1T2_AVX2_CLONES ? "this CPU has no AVX2" : "this build has no AVX2 kernels (not x86-64 GCC/Clang)");
  return true;
}

std::string cpu_capability() { return use_avx2() ? "avx2" : "default"; }

}  // namespace t1t2
