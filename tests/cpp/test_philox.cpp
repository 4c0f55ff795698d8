// csrc/include/t1t2/philox.h on its own (no torch): Random123's known-answer vectors, then, for
// every "seed offset" line on stdin (decimal, two's complement int64 allowed), the bits of
// randn(seed, offset) as 8 hex digits. tests/test_rng.py compares those with t1t2_fast/rng.py.
#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "t1t2/philox.h"

namespace {

struct Kat {
  int rounds;
  uint32_t counter[4], key[2], expected[4];
};

// Random123 1.14, tests/kat_vectors, the philox4x32 lines.
const Kat kKats[] = {
    {7, {0, 0, 0, 0}, {0, 0}, {0x5f6fb709, 0x0d893f64, 0x4f121f81, 0x4f730a48}},
    {7, {0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff},
     {0x5207ddc2, 0x45165e59, 0x4d8ee751, 0x8c52f662}},
    {7, {0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0},
     {0x4dfccaba, 0x190a87f0, 0xc47362ba, 0xb6b5242a}},
    {10, {0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
    {10, {0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff},
     {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
    {10, {0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0},
     {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
};

}  // namespace

int main() {
  int failures = 0;
  for (const Kat& k : kKats) {
    const auto w = t1t2::philox::philox4x32(k.counter[0], k.counter[1], k.counter[2], k.counter[3], k.key[0],
                                            k.key[1], k.rounds);
    const uint32_t got[4] = {w.w0, w.w1, w.w2, w.w3};
    if (std::memcmp(got, k.expected, sizeof got) != 0) {
      ++failures;
      std::printf("FAIL philox4x32-%d: got %08x %08x %08x %08x\n", k.rounds, got[0], got[1], got[2], got[3]);
    }
  }
  int64_t seed, offset;
  while (std::scanf("%" SCNd64 " %" SCNd64, &seed, &offset) == 2) {
    const float e = t1t2::philox::randn(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
    std::printf("%08x\n", t1t2::ieee::float_bits(e));
  }
  return failures == 0 ? 0 : 1;
}
