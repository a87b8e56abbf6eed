// Buffer schedule of repeated classical Gram-Schmidt, shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

namespace curvx {

// Runs `passes` Gram-Schmidt passes `pass(w_in, w_out)`: the first reads the input block V,
// the last writes the output block W (V's dtype), and the passes between read and write the
// float64 buffer W64, so that accumulation stays in float64 whatever the basis dtype. With a
// single pass W64 is unused (may be null); with a float64 V it may alias W.
template <typename scalar_t, typename Pass>
void run_gram_schmidt_passes(int64_t passes, const scalar_t* v, scalar_t* w, double* w64,
                             Pass&& pass) {
  for (int64_t k = 0; k < passes; ++k) {
    const bool first = k == 0, last = k == passes - 1;
    if (first && last) {
      pass(v, w);
    } else if (first) {
      pass(v, w64);
    } else if (last) {
      pass(static_cast<const double*>(w64), w);
    } else {
      pass(static_cast<const double*>(w64), w64);
    }
  }
}

}  // namespace curvx
