// Argument checks for rarefy's C++ ops, with messages built without iostreams.
//
// On the lent GPU machines' image (torch 2.11.0+cu130, g++ 13.3) inserting any number into
// an ostream from extension code crashes the process (a segmentation fault in the numeric
// facet), so TORCH_CHECK's own message builder, which streams every argument, cannot be
// given an integer or a shape there; std::to_string and plain strings are fine. These macros
// build the message here and hand TORCH_CHECK one string (docs/results/lowbit-composition.md,
// section 5). The message is built only when the check fails.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <string>
#include <type_traits>

namespace rarefy {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? "true" : "false"; }
inline void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) {
  s += c10::DeviceTypeName(v.type(), /*lower_case=*/true);
  if (v.has_index()) s += ":" + std::to_string(static_cast<int>(v.index()));
}
inline void append(std::string& s, c10::IntArrayRef v) {
  s += "[";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += "]";
}
template <class T, std::enable_if_t<std::is_arithmetic_v<T> && !std::is_same_v<T, bool> && !std::is_same_v<T, char>, int> = 0>
inline void append(std::string& s, T v) { s += std::to_string(v); }

template <class... A>
inline std::string msg(const A&... a) {
  std::string s;
  (append(s, a), ...);
  return s;
}

inline std::string shape_str(const at::Tensor& t) { return msg(t.sizes()); }

}  // namespace rarefy

#define RAREFY_CHECK_VALUE(cond, ...) \
  do { if (!(cond)) TORCH_CHECK_VALUE(false, ::rarefy::msg(__VA_ARGS__)); } while (0)
#define RAREFY_CHECK_TYPE(cond, ...) \
  do { if (!(cond)) TORCH_CHECK_TYPE(false, ::rarefy::msg(__VA_ARGS__)); } while (0)
