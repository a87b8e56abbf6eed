// CPU kernels of the block-layout ops (schemas in csrc/ops.cpp): moving a block of k vectors
// between the solver's [n, k] layout and the model's per-parameter [k, *shape_i] tensors.
//
// Part p holds numels[p] rows of the block, rows [row_begin[p], row_begin[p + 1]). Both
// directions walk tiles of kTileRows rows of one part in parallel (at::parallel_for), reading
// and writing each tile once; values pass through float64 only when a dtype changes or a weight
// is applied, so plain copies are exact.
//
// Against the ATen composites (bench/test_bench_kernels.py; fc-tanh, n = 199,210, k = 8, one
// thread, a shared 2-core VM): unpack 1.3x, unpack with float64 -> float32 1.4x, accumulating
// float32 products into a float64 block 2.5x, into a float32 block 1.1x, pack 0.9-1.0x. Pack is
// kept below the 1.2x floor on purpose: on the CPU both are one memory-bound pass (torch.cat of
// transposed views copies each part once), while the same op is what flatten_batched calls on
// every device, and on the GPU the composite costs one launch per parameter.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../convert.h"
#include "../layout.h"

namespace curvx {
namespace {

constexpr int64_t kTileRows = 256;  // rows of one part handled by one task step
constexpr int64_t kTileGrain = 4;   // tiles per parallel task, at least

// Runs f(part, first_row_in_part, rows) over every tile of `segments` in parallel.
template <typename F>
void for_each_tile(const Segments& segments, F&& f) {
  at::parallel_for(0, segments.tiles(), kTileGrain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p = segments.part_of_tile(t);
      const int64_t m = segments.row_begin[p + 1] - segments.row_begin[p];
      const int64_t r0 = (t - segments.tile_begin[p]) * kTileRows;
      f(p, r0, std::min(kTileRows, m - r0));
    }
  });
}

// out [n, k] (dense rows, ldo apart) = weight * packed, or += weight * packed when accumulating,
// where packed holds parts[p] [k, numels[p]] (contiguous; null for zeros) transposed in rows
// [row_begin[p], row_begin[p + 1]).
template <typename pt, typename ot>
void pack_tiles(const Segments& segments, const std::vector<const pt*>& src, int64_t k,
                double weight, bool accumulate, ot* out, int64_t ldo) {
  const bool scaled = weight != 1.0;
  for_each_tile(segments, [&](int64_t p, int64_t r0, int64_t rows) {
    const pt* part = src[p];
    if (part == nullptr && accumulate) return;
    const int64_t m = segments.row_begin[p + 1] - segments.row_begin[p];
    ot* dst = out + (segments.row_begin[p] + r0) * ldo;
    const pt* col = part == nullptr ? nullptr : part + r0;  // entry (j, r) at col[j * m + r]
    for (int64_t r = 0; r < rows; ++r) {
      ot* row = dst + r * ldo;
      if (col == nullptr) {
        std::fill(row, row + k, from_acc<ot>(0.0));
      } else if (accumulate) {
        for (int64_t j = 0; j < k; ++j) {
          row[j] = from_acc<ot>(to_acc(row[j]) + weight * to_acc(col[j * m + r]));
        }
      } else if (scaled) {
        for (int64_t j = 0; j < k; ++j) row[j] = from_acc<ot>(weight * to_acc(col[j * m + r]));
      } else if constexpr (std::is_same_v<pt, ot>) {
        for (int64_t j = 0; j < k; ++j) row[j] = col[j * m + r];
      } else {
        for (int64_t j = 0; j < k; ++j) row[j] = from_acc<ot>(to_acc(col[j * m + r]));
      }
    }
  });
}

// Contiguous copies of the parts given (kept alive in `held`) and their data pointers.
template <typename pt>
std::vector<const pt*> part_pointers(const OptionalTensorList& parts,
                                     std::vector<at::Tensor>& held) {
  std::vector<const pt*> src(parts.size(), nullptr);
  for (size_t i = 0; i < parts.size(); ++i) {
    const std::optional<at::Tensor> part = parts[i];
    if (!part.has_value() || !part->defined()) continue;
    held.push_back(part->contiguous());
    src[i] = held.back().const_data_ptr<pt>();
  }
  return src;
}

void pack_into(const at::Tensor& out, const OptionalTensorList& parts, at::IntArrayRef numels,
               at::ScalarType part_dtype, double weight, bool accumulate) {
  const int64_t k = out.size(1);
  if (out.size(0) == 0 || k == 0) return;
  const Segments segments(numels, kTileRows);
  const int64_t ldo = row_stride(out);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, part_dtype, "curvx_pack_block_cpu", [&] {
    using pt = scalar_t;
    std::vector<at::Tensor> held;
    const std::vector<const pt*> src = part_pointers<pt>(parts, held);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, out.scalar_type(), "curvx_pack_block_cpu", [&] {
      pack_tiles(segments, src, k, weight, accumulate, out.mutable_data_ptr<scalar_t>(), ldo);
    });
  });
}

// block [n, k] = weight * (parts [k, *shape_i] transposed and stacked), None parts as zeros.
at::Tensor pack_block_cpu(const OptionalTensorList& parts, at::IntArrayRef numels, int64_t k,
                          double weight, std::optional<at::ScalarType> dtype) {
  const int64_t first = check_pack_block_args(parts, numels, k, weight, dtype);
  const at::Tensor ref = *parts.get(first);
  const at::Tensor out =
      at::empty({sum_of(numels), k}, ref.options().dtype(dtype.value_or(ref.scalar_type())));
  pack_into(out, parts, numels, ref.scalar_type(), weight, /*accumulate=*/false);
  return out;
}

// block [n, k] += weight * (parts transposed and stacked); None parts add nothing.
void pack_block_add_cpu(const at::Tensor& block, const OptionalTensorList& parts,
                        at::IntArrayRef numels, double weight) {
  check_pack_block_add_args(block, parts, numels, weight);
  at::ScalarType part_dtype = block.scalar_type();
  for (size_t i = 0; i < parts.size(); ++i) {
    const std::optional<at::Tensor> part = parts[i];
    if (part.has_value() && part->defined()) {
      part_dtype = part->scalar_type();
      break;
    }
  }
  pack_into(block, parts, numels, part_dtype, weight, /*accumulate=*/true);
}

// V [n, k] -> one flat buffer [k * n] that holds part p as a contiguous [k, numels[p]] at offset
// k * row_begin[p], in `dtype` (V's by default).
at::Tensor unpack_block_cpu(const at::Tensor& V_in, at::IntArrayRef numels,
                            std::optional<at::ScalarType> dtype) {
  check_unpack_block_args(V_in, numels, dtype);
  const at::Tensor V = with_dense_rows(V_in);
  const int64_t n = V.size(0), k = V.size(1), ldv = row_stride(V);
  at::Tensor out = at::empty({k * n}, V.options().dtype(dtype.value_or(V.scalar_type())));
  if (n == 0 || k == 0) return out;
  const Segments segments(numels, kTileRows);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, V.scalar_type(), "curvx_unpack_block_cpu", [&] {
    using vt = scalar_t;
    const vt* v = V.const_data_ptr<vt>();
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, out.scalar_type(), "curvx_unpack_block_cpu", [&] {
      using ot = scalar_t;
      ot* o = out.mutable_data_ptr<ot>();
      for_each_tile(segments, [&](int64_t p, int64_t r0, int64_t rows) {
        const int64_t m = segments.row_begin[p + 1] - segments.row_begin[p];
        const vt* src = v + (segments.row_begin[p] + r0) * ldv;
        ot* dst = o + k * segments.row_begin[p] + r0;
        for (int64_t j = 0; j < k; ++j) {
          for (int64_t r = 0; r < rows; ++r) {
            if constexpr (std::is_same_v<vt, ot>) {
              dst[j * m + r] = src[r * ldv + j];
            } else {
              dst[j * m + r] = from_acc<ot>(to_acc(src[r * ldv + j]));
            }
          }
        }
      });
    });
  });
  return out;
}

}  // namespace
}  // namespace curvx

TORCH_LIBRARY_IMPL(curvx, CPU, m) {
  m.impl("pack_block", &curvx::pack_block_cpu);
  m.impl("pack_block_add_", &curvx::pack_block_add_cpu);
  m.impl("unpack_block", &curvx::unpack_block_cpu);
}
