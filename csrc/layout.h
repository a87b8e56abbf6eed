// Memory layouts the CPU and CUDA kernels share: matrices read in place with a row stride,
// and the row and tile ranges of per-parameter parts stacked in one n-row block.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "checks.h"

namespace curvx {

// Whether the kernels can read the matrix t [rows, cols] in place: the entries of a row are
// adjacent (stride(1) == 1, or at most one column) and rows are row_stride(t) apart, as in a
// column slice Q[:, :cols] of a wider basis.
inline bool dense_rows(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1; }

// t itself when its rows are dense, else a contiguous copy.
inline at::Tensor with_dense_rows(const at::Tensor& t) {
  return dense_rows(t) ? t : t.contiguous();
}

// Distance between consecutive rows of a matrix with dense rows (BLAS's leading dimension).
inline int64_t row_stride(const at::Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

// P parts stacked in an n-row block: part p owns rows [row_begin[p], row_begin[p + 1]) and,
// cut into tiles of at most tile_rows rows, tiles [tile_begin[p], tile_begin[p + 1]). Empty
// parts own no tile.
struct Segments {
  std::vector<int64_t> row_begin, tile_begin;

  Segments(c10::IntArrayRef numels, int64_t tile_rows)
      : row_begin(numels.size() + 1, 0), tile_begin(numels.size() + 1, 0) {
    for (size_t p = 0; p < numels.size(); ++p) {
      row_begin[p + 1] = row_begin[p] + numels[p];
      tile_begin[p + 1] = tile_begin[p] + ceil_div(numels[p], tile_rows);
    }
  }

  int64_t parts() const { return static_cast<int64_t>(row_begin.size()) - 1; }
  int64_t rows() const { return row_begin.back(); }
  int64_t tiles() const { return tile_begin.back(); }

  // The part that owns tile t (0 <= t < tiles()).
  int64_t part_of_tile(int64_t t) const {
    return std::upper_bound(tile_begin.begin(), tile_begin.end(), t) - tile_begin.begin() - 1;
  }
};

}  // namespace curvx
