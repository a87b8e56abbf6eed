// CUDA kernels of the block-layout ops (schemas in csrc/ops.cpp; the CPU kernels in
// csrc/cpu/block_kernels.cpp say what they compute).
//
// One launch covers every part. The grid's x dimension enumerates tiles of at most `rows` rows
// of one part (the parts own consecutive tiles; a block finds its part by binary search in the
// tile table), its y dimension chunks of at most kMaxTileCols of the k columns. A block stages
// its tile in shared memory, so that the [n, k] side (rows of k adjacent entries) and the
// per-parameter side (k rows of numels[p] adjacent entries) are both read and written in
// coalesced runs. The table (row and tile offsets, and the parts' addresses for pack) reaches
// the device in one copy from pinned host memory. Everything runs on the current stream of the
// block's device, under a guard for that device.
//
// Whether each kernel earns its place (at least 1.2x its ATen composite on the same GPU) is
// measured by the CUDA rows of bench/test_bench_kernels.py, run by bench/gpu_check.sh; these
// kernels were written and compiled without a GPU at hand, so the figures are still to come.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../convert.h"
#include "../layout.h"

namespace curvx {
namespace {

constexpr int kThreads = 256;       // threads per block
constexpr int kTileEntries = 2048;  // entries of one tile, at most
constexpr int kMaxTileCols = 64;    // columns of one tile, at most

// A tile of `rows` x `cols` entries, staged in shared memory with rows `ld` apart (odd, so that
// walking down a column touches distinct banks).
struct TileShape {
  int rows, cols, ld;
  explicit TileShape(int64_t k)
      : rows(kTileEntries / static_cast<int>(std::min<int64_t>(k, kMaxTileCols))),
        cols(static_cast<int>(std::min<int64_t>(k, kMaxTileCols))),
        ld(cols | 1) {}
  template <typename T>
  size_t shared_bytes() const {
    return sizeof(T) * static_cast<size_t>(rows) * ld;
  }
};

// The layout of a tile table on the device: row_begin [P + 1], tile_begin [P + 1], then (for
// pack) the parts' addresses [P], all int64.
struct TileTable {
  const int64_t* row_begin;
  const int64_t* tile_begin;
  const int64_t* address;
};

__device__ __forceinline__ TileTable table_at(const int64_t* table, int64_t parts) {
  return {table, table + parts + 1, table + 2 * (parts + 1)};
}

// The part that owns tile t: the last p with tile_begin[p] <= t (empty parts own no tile).
__device__ int64_t find_part(const int64_t* __restrict__ tile_begin, int64_t parts, int64_t t) {
  int64_t lo = 0, hi = parts;  // tile_begin[lo] <= t < tile_begin[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (tile_begin[mid] <= t) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Where a block's tile lies: part p, its rows [r0, r0 + rows) within the part (of m rows), and
// columns [j0, j0 + cols).
struct TilePlace {
  int64_t p, m, r0, j0;
  int rows, cols;
};

__device__ __forceinline__ TilePlace place_tile(const TileTable& table, int64_t parts, int64_t k,
                                                int tile_rows, int tile_cols) {
  __shared__ int64_t part;
  if (threadIdx.x == 0) part = find_part(table.tile_begin, parts, blockIdx.x);
  __syncthreads();
  TilePlace at;
  at.p = part;
  at.m = table.row_begin[at.p + 1] - table.row_begin[at.p];
  at.r0 = (static_cast<int64_t>(blockIdx.x) - table.tile_begin[at.p]) * tile_rows;
  at.j0 = static_cast<int64_t>(blockIdx.y) * tile_cols;
  const int64_t rows_left = at.m - at.r0, cols_left = k - at.j0;
  at.rows = static_cast<int>(rows_left < tile_rows ? rows_left : tile_rows);
  at.cols = static_cast<int>(cols_left < tile_cols ? cols_left : tile_cols);
  return at;
}

// out [n, k] (dense rows, ldo apart) = weight * stack, or += weight * stack when accumulating;
// the stack holds part p [k, m_p] (contiguous, at address[p]; 0 for zeros) transposed in rows
// [row_begin[p], row_begin[p + 1]).
template <typename pt, typename ot>
__global__ void __launch_bounds__(kThreads)
    pack_block_kernel(const int64_t* __restrict__ table_data, int64_t parts, int64_t k,
                      int tile_rows, int tile_cols, double weight, bool accumulate,
                      ot* __restrict__ out, int64_t ldo) {
  extern __shared__ __align__(16) unsigned char shared[];
  pt* tile = reinterpret_cast<pt*>(shared);
  const TileTable table = table_at(table_data, parts);
  const TilePlace at = place_tile(table, parts, k, tile_rows, tile_cols);
  const pt* part = reinterpret_cast<const pt*>(static_cast<intptr_t>(table.address[at.p]));
  if (part == nullptr && accumulate) return;  // the same for the whole block
  const int ld = tile_cols | 1;
  const int count = at.rows * at.cols;
  if (part != nullptr) {
    // Stage: neighbour threads read neighbour entries of one row of the part.
    const pt* src = part + at.j0 * at.m + at.r0;  // entry (j, r) at src[j * m + r]
    for (int e = threadIdx.x; e < count; e += kThreads) {
      const int j = e / at.rows, r = e - j * at.rows;
      tile[r * ld + j] = src[j * at.m + r];
    }
    __syncthreads();
  }
  // Write: neighbour threads write neighbour entries of a row of the block.
  ot* dst =
      out + (table.row_begin[at.p] + at.r0) * ldo + at.j0;  // entry (r, j) at dst[r * ldo + j]
  for (int e = threadIdx.x; e < count; e += kThreads) {
    const int r = e / at.cols, j = e - r * at.cols;
    ot* o = dst + r * ldo + j;
    if (part == nullptr) {
      *o = from_acc<ot>(0.0);
    } else if (accumulate) {
      *o = from_acc<ot>(to_acc(*o) + weight * to_acc(tile[r * ld + j]));
    } else if (weight != 1.0) {
      *o = from_acc<ot>(weight * to_acc(tile[r * ld + j]));
    } else if constexpr (std::is_same_v<pt, ot>) {
      *o = tile[r * ld + j];
    } else {
      *o = from_acc<ot>(to_acc(tile[r * ld + j]));
    }
  }
}

// out (flat [k * n]) holds part p as a contiguous [k, m_p] at k * row_begin[p]: the transpose
// of rows [row_begin[p], row_begin[p + 1]) of V [n, k] (dense rows, ldv apart).
template <typename vt, typename ot>
__global__ void __launch_bounds__(kThreads)
    unpack_block_kernel(const vt* __restrict__ V, int64_t ldv,
                        const int64_t* __restrict__ table_data, int64_t parts, int64_t k,
                        int tile_rows, int tile_cols, ot* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char shared[];
  vt* tile = reinterpret_cast<vt*>(shared);
  const TileTable table = table_at(table_data, parts);
  const TilePlace at = place_tile(table, parts, k, tile_rows, tile_cols);
  const int ld = tile_cols | 1;
  const int count = at.rows * at.cols;
  // Stage: neighbour threads read neighbour entries of a row of V.
  const vt* src = V + (table.row_begin[at.p] + at.r0) * ldv + at.j0;  // (r, j) at src[r * ldv + j]
  for (int e = threadIdx.x; e < count; e += kThreads) {
    const int r = e / at.cols, j = e - r * at.cols;
    tile[r * ld + j] = src[r * ldv + j];
  }
  __syncthreads();
  // Write: neighbour threads write neighbour entries of one row of the part.
  ot* dst = out + k * table.row_begin[at.p] + at.j0 * at.m + at.r0;  // (j, r) at dst[j * m + r]
  for (int e = threadIdx.x; e < count; e += kThreads) {
    const int j = e / at.rows, r = e - j * at.rows;
    if constexpr (std::is_same_v<vt, ot>) {
      dst[j * at.m + r] = tile[r * ld + j];
    } else {
      dst[j * at.m + r] = from_acc<ot>(to_acc(tile[r * ld + j]));
    }
  }
}

// The tile table of `segments` (and the parts' addresses, when given) on `device`, through one
// non-blocking copy from pinned memory on the current stream (the caching host allocator keeps
// the pinned buffer until the copy is done).
at::Tensor device_table(const Segments& segments, const std::vector<const void*>* addresses,
                        const at::Device& device) {
  const int64_t parts = segments.parts();
  const int64_t size = 2 * (parts + 1) + (addresses != nullptr ? parts : 0);
  at::Tensor host = at::empty({size}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.mutable_data_ptr<int64_t>();
  std::copy(segments.row_begin.begin(), segments.row_begin.end(), h);
  std::copy(segments.tile_begin.begin(), segments.tile_begin.end(), h + parts + 1);
  if (addresses != nullptr) {
    for (int64_t p = 0; p < parts; ++p) {
      h[2 * (parts + 1) + p] = static_cast<int64_t>(reinterpret_cast<intptr_t>((*addresses)[p]));
    }
  }
  return host.to(at::TensorOptions().device(device), /*non_blocking=*/true);
}

dim3 tile_grid(const char* op, const Segments& segments, int64_t k, const TileShape& shape) {
  const int64_t column_chunks = ceil_div(k, shape.cols);
  TORCH_CHECK(segments.tiles() <= std::numeric_limits<int32_t>::max() && column_chunks <= 65535,
              "curvx.", op, ": a block of ", segments.rows(), " x ", k,
              " entries is too large for one launch");
  return dim3(static_cast<unsigned>(segments.tiles()), static_cast<unsigned>(column_chunks));
}

void pack_into_cuda(const at::Tensor& out, const OptionalTensorList& parts, at::IntArrayRef numels,
                    at::ScalarType part_dtype, double weight, bool accumulate) {
  const char* op = accumulate ? "pack_block_add_" : "pack_block";
  const int64_t k = out.size(1);
  if (out.size(0) == 0 || k == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const TileShape shape(k);
  const Segments segments(numels, shape.rows);
  // Contiguous parts, kept alive until the launch is queued (the caching allocator orders reuse
  // of their memory after it on this stream).
  std::vector<at::Tensor> held;
  std::vector<const void*> addresses(parts.size(), nullptr);
  for (size_t i = 0; i < parts.size(); ++i) {
    const std::optional<at::Tensor> part = parts[i];
    if (!part.has_value() || !part->defined()) continue;
    held.push_back(part->contiguous());
    addresses[i] = held.back().const_data_ptr();
  }
  if (accumulate && held.empty()) return;  // nothing to add
  const at::Tensor table = device_table(segments, &addresses, out.device());
  const dim3 grid = tile_grid(op, segments, k, shape);
  const int64_t ldo = row_stride(out);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, part_dtype, "curvx_pack_block_cuda", [&] {
    using pt = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, out.scalar_type(), "curvx_pack_block_cuda", [&] {
      pack_block_kernel<pt, scalar_t><<<grid, kThreads, shape.shared_bytes<pt>(), stream>>>(
          table.const_data_ptr<int64_t>(), segments.parts(), k, shape.rows, shape.cols, weight,
          accumulate, out.mutable_data_ptr<scalar_t>(), ldo);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor pack_block_cuda(const OptionalTensorList& parts, at::IntArrayRef numels, int64_t k,
                           double weight, std::optional<at::ScalarType> dtype) {
  const int64_t first = check_pack_block_args(parts, numels, k, weight, dtype);
  const at::Tensor ref = *parts.get(first);
  const c10::cuda::CUDAGuard guard(ref.device());
  const at::Tensor out =
      at::empty({sum_of(numels), k}, ref.options().dtype(dtype.value_or(ref.scalar_type())));
  pack_into_cuda(out, parts, numels, ref.scalar_type(), weight, /*accumulate=*/false);
  return out;
}

void pack_block_add_cuda(const at::Tensor& block, const OptionalTensorList& parts,
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
  pack_into_cuda(block, parts, numels, part_dtype, weight, /*accumulate=*/true);
}

at::Tensor unpack_block_cuda(const at::Tensor& V_in, at::IntArrayRef numels,
                             std::optional<at::ScalarType> dtype) {
  check_unpack_block_args(V_in, numels, dtype);
  const c10::cuda::CUDAGuard guard(V_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor V = with_dense_rows(V_in);
  const int64_t n = V.size(0), k = V.size(1), ldv = row_stride(V);
  at::Tensor out = at::empty({k * n}, V.options().dtype(dtype.value_or(V.scalar_type())));
  if (n == 0 || k == 0) return out;
  const TileShape shape(k);
  const Segments segments(numels, shape.rows);
  const at::Tensor table = device_table(segments, nullptr, V.device());
  const dim3 grid = tile_grid("unpack_block", segments, k, shape);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, V.scalar_type(), "curvx_unpack_block_cuda", [&] {
    using vt = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND(
        at::kBFloat16, out.scalar_type(), "curvx_unpack_block_cuda", [&] {
          unpack_block_kernel<vt, scalar_t><<<grid, kThreads, shape.shared_bytes<vt>(), stream>>>(
              V.const_data_ptr<vt>(), ldv, table.const_data_ptr<int64_t>(), segments.parts(), k,
              shape.rows, shape.cols, out.mutable_data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  });
  return out;
}

}  // namespace
}  // namespace curvx

TORCH_LIBRARY_IMPL(curvx, CUDA, m) {
  m.impl("pack_block", &curvx::pack_block_cuda);
  m.impl("pack_block_add_", &curvx::pack_block_add_cuda);
  m.impl("unpack_block", &curvx::unpack_block_cuda);
}
