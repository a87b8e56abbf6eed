// Conversions between the n-row dtypes (float32, float64, bfloat16) and the float64 in which
// every kernel accumulates, for host (CPU kernels) and device (CUDA kernels) code alike.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>

namespace curvx {

template <typename T>
C10_HOST_DEVICE inline double to_acc(T x) {
  return static_cast<double>(x);
}
C10_HOST_DEVICE inline double to_acc(c10::BFloat16 x) {
  return static_cast<double>(static_cast<float>(x));
}

// Rounds to T; bfloat16 through float32, as torch's own conversion of float64 does.
template <typename T>
C10_HOST_DEVICE inline T from_acc(double x) {
  return static_cast<T>(x);
}
template <>
C10_HOST_DEVICE inline c10::BFloat16 from_acc<c10::BFloat16>(double x) {
  return c10::BFloat16(static_cast<float>(x));
}

}  // namespace curvx
