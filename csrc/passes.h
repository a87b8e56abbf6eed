// Buffer schedule of repeated classical Gram-Schmidt, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cstdint>

namespace curvx {

// Outputs and scratch of orthogonalize for V [n, b] against m basis columns: W [n, b] in V's
// dtype, C [m, b] float64 (the passes' summed coefficients), and W64 [n, b] float64 between
// passes (W itself for float64 input or a single pass).
struct GramSchmidtBuffers {
  at::Tensor W, C, W64;

  GramSchmidtBuffers(const at::Tensor& V, int64_t m, int64_t passes) {
    const auto f64 = V.options().dtype(at::kDouble);
    W = at::empty({V.size(0), V.size(1)}, V.options());
    C = at::zeros({m, V.size(1)}, f64);
    const bool wide_scratch = passes > 1 && V.scalar_type() != at::kDouble;
    W64 = wide_scratch ? at::empty({V.size(0), V.size(1)}, f64) : W;
  }

  // The float64 scratch pointer (null when W is not float64 and no scratch exists).
  double* w64() {
    return W64.scalar_type() == at::kDouble ? W64.mutable_data_ptr<double>() : nullptr;
  }
};

// Runs `passes` Gram-Schmidt passes `pass(w_in, ld_in, w_out)`: the first reads the input block
// V (rows ldv apart, a column slice of a wider matrix, say), the last writes the output block W
// (V's dtype), and the passes between read and write the float64 buffer W64, so that
// accumulation stays in float64 whatever the basis dtype. W and W64 are contiguous (rows b
// apart). With a single pass W64 is unused (may be null); with a float64 V it may alias W.
template <typename scalar_t, typename Pass>
void run_gram_schmidt_passes(int64_t passes, const scalar_t* v, int64_t ldv, int64_t b, scalar_t* w,
                             double* w64, Pass&& pass) {
  for (int64_t k = 0; k < passes; ++k) {
    const bool first = k == 0, last = k == passes - 1;
    if (first && last) {
      pass(v, ldv, w);
    } else if (first) {
      pass(v, ldv, w64);
    } else if (last) {
      pass(static_cast<const double*>(w64), b, w);
    } else {
      pass(static_cast<const double*>(w64), b, w64);
    }
  }
}

}  // namespace curvx
