#include "cpu/perturb.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

namespace t1t2 {
namespace {

constexpr int64_t kChunk = 16384;

void check_like(const at::Tensor& t, const at::Tensor& p, at::ScalarType dtype, const char* op, const char* name,
                size_t i) {
  TORCH_CHECK(t.sizes() == p.sizes(), op, ": ", name, "[", i, "] has shape ", t.sizes(), " but params[", i, "] has ",
              p.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, "[", i, "] has dtype ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, "[", i, "] is on ", t.device(), ", expected cpu");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", i, "] must be contiguous");
}

void check_params(at::TensorList params, const char* op) {
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].device().is_cpu(), op, ": params[", i, "] is on ", params[i].device(), ", expected cpu");
    TORCH_CHECK(params[i].is_contiguous(), op, ": params[", i, "] must be contiguous (it is written in place)");
    TORCH_CHECK(params[i].scalar_type() == params[0].scalar_type(), op, ": params[", i, "] has dtype ",
                params[i].scalar_type(), " but params[0] has ", params[0].scalar_type());
  }
}

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
  constexpr const char* op = "t1t2::perturb_";
  const size_t n = params.size();
  TORCH_CHECK(base.size() == n && direction.size() == n, op, ": got ", n, " params, ", base.size(), " base and ",
              direction.size(), " direction tensors");
  TORCH_CHECK(save.empty() || save.size() == n, op, ": save must be empty or have one tensor per parameter (", n,
              "), got ", save.size());
  if (n == 0) return;
  check_params(params, op);
  const at::ScalarType dtype = params[0].scalar_type();
  const at::ScalarType compute = dtype == at::kDouble ? at::kDouble : at::kFloat;
  for (size_t i = 0; i < n; ++i) {
    check_like(base[i], params[i], compute, op, "base", i);
    check_like(direction[i], params[i], compute, op, "direction", i);
    if (!save.empty()) check_like(save[i], params[i], dtype, op, "save", i);
  }
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
  constexpr const char* op = "t1t2::restore_";
  TORCH_CHECK(save.size() == params.size(), op, ": got ", params.size(), " params but ", save.size(), " saved");
  if (params.empty()) return;
  check_params(params, op);
  for (size_t i = 0; i < params.size(); ++i) check_like(save[i], params[i], params[0].scalar_type(), op, "save", i);
  const size_t element = params[0].element_size();
  for_each_chunk(params, [&](size_t i, int64_t begin, int64_t end) {
    auto* dst = static_cast<char*>(params[i].data_ptr());
    const auto* src = static_cast<const char*>(save[i].const_data_ptr());
    std::memcpy(dst + begin * element, src + begin * element, (end - begin) * element);
  });
}

}  // namespace t1t2
