// Shapes in error messages, formatted by hand.
//
// Streaming `t.sizes()` (c10::IntArrayRef) into a TORCH_CHECK message crashes the process
// (segmentation fault while the message is built) with torch 2.11.0+cu130 and g++ 13.3, the
// lent GPU machines' image; scalars, dtypes and devices stream fine there. Every C++ op in
// rarefy formats shapes with this helper instead (docs/results/lowbit-composition.md, 5).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace rarefy {

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + "]";
}

}  // namespace rarefy
