#include "cpu/perturb.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "checks.h"

namespace t1t2 {
namespace {

constexpr int64_t kChunk = 16384;

// (tensor, chunk start) work items over a list of tensors: one parallel loop for all of them.
template <typename F>
void for_each_chunk(at::TensorList params, F fn) {
  std::vector<std::pair<size_t, int64_t>> items;
  for (size_t i = 0; i < params.size(); ++i)
    for (int64_t s = 0; s < params[i].numel(); s += kChunk) items.emplace_back(i, s);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const auto [i, begin] = items[k];
      fn(i, begin, std::min(params[i].numel(), begin + kChunk));
    }
  });
}

}  // namespace

void perturb_cpu(at::TensorList params, at::TensorList save, at::TensorList base, at::TensorList direction,
                 double scale) {
  check_perturb_inputs(params, save, base, direction, at::kCPU);
  if (params.empty()) return;
  const at::ScalarType dtype = params[0].scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "perturb_", [&] {
    using T = at::opmath_type<scalar_t>;
    const T r = static_cast<T>(scale);
    for_each_chunk(params, [&](size_t i, int64_t begin, int64_t end) {
      scalar_t* p = params[i].data_ptr<scalar_t>();
      const T* b = base[i].const_data_ptr<T>();
      const T* d = direction[i].const_data_ptr<T>();
      if (!save.empty()) std::memcpy(save[i].data_ptr<scalar_t>() + begin, p + begin, (end - begin) * sizeof(scalar_t));
      for (int64_t k = begin; k < end; ++k) p[k] = static_cast<scalar_t>(b[k] + r * d[k]);
    });
  });
}

void restore_cpu(at::TensorList params, at::TensorList save) {
  check_restore_inputs(params, save, at::kCPU);
  if (params.empty()) return;
  const size_t element = params[0].element_size();
  for_each_chunk(params, [&](size_t i, int64_t begin, int64_t end) {
    auto* dst = static_cast<char*>(params[i].data_ptr());
    const auto* src = static_cast<const char*>(save[i].const_data_ptr());
    std::memcpy(dst + begin * element, src + begin * element, (end - begin) * element);
  });
}

}  // namespace t1t2
