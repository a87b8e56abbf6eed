// CUDA kernels of the curvx ops (schemas in csrc/ops.cpp).
//
// Shapes: n rows (parameters), block size b, m or r earlier basis columns, p Lanczos blocks.
// The n-row matrices are float32, float64 or bfloat16; every product is accumulated in float64
// and only the n-row results are rounded back to the input dtype. Reductions over rows are
// two-stage and deterministic: each row block writes a float64 partial, and a second kernel sums
// the partials in row-block order. Inputs whose rows are dense (a column slice of the solver's
// wider basis, say) are read in place, others copied once. Every launch runs on the current
// stream of the inputs' device, under a guard for that device.
//
// Whether each kernel earns its place (at least 1.2x its ATen composite on the same GPU) is
// measured by the CUDA rows of bench/test_bench_kernels.py, run by bench/gpu_check.sh; these
// kernels were written and compiled without a GPU at hand, so the figures are still to come.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../checks.h"
#include "../convert.h"
#include "../layout.h"
#include "../passes.h"

namespace curvx {
namespace {

constexpr int kThreads = 256;                  // threads per block, all kernels
constexpr int64_t kMaxRowBlocks = 1024;        // row blocks of one reduction
constexpr int64_t kMaxReductionBlocks = 4096;  // row blocks x output tiles of one reduction
constexpr int64_t kMaxElementwiseBlocks = 8192;
constexpr int64_t kRowsPerLane = 16;  // rows each reduction thread sums, at least

int64_t elementwise_blocks(int64_t numel) {
  return std::min(kMaxElementwiseBlocks, std::max<int64_t>(1, ceil_div(numel, kThreads)));
}

int next_pow2(int64_t x) {
  int p = 1;
  while (p < x && p < kThreads) p *= 2;
  return p;
}

// Stage 1 of C [m, b] = X^T Y for X [n, m], Y [n, b] (dense rows, ldx and ldy apart). A block owns
// a tile of tk x tj entries of C (blockIdx.y) and a strided subset of rows (blockIdx.x): its
// kThreads threads form kThreads / (tk * tj) row lanes of tk * tj threads, one thread per entry of
// the tile; neighbour threads read neighbour columns of X, so loads of a row of X are coalesced.
// Each thread sums its rows in float64, the lanes are summed in shared memory in lane order, and
// the block writes its partial sums to partial [gridDim.x, m, b].
template <typename xt, typename yt>
__global__ void __launch_bounds__(kThreads)
    gram_partial_kernel(const xt* __restrict__ X, int64_t ldx, const yt* __restrict__ Y,
                        int64_t ldy, int64_t n, int64_t m, int64_t b, int tk, int tj,
                        double* __restrict__ partial) {
  __shared__ double lane_sums[kThreads];
  const int tile = tk * tj;
  const int lanes = kThreads / tile;
  const int t = threadIdx.x;
  const int o = t % tile;  // entry of the tile owned by this thread
  const int lane = t / tile;
  const int64_t tiles_k = (m + tk - 1) / tk;
  const int64_t k = (blockIdx.y % tiles_k) * tk + o % tk;
  const int64_t j = (blockIdx.y / tiles_k) * tj + o / tk;
  const bool owns_entry = k < m && j < b;

  // Each lane walks rows lane, lane + lanes * gridDim.x, ... starting at this block's offset.
  double acc = 0.0;
  if (owns_entry) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * lanes;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * lanes + lane; i < n; i += stride) {
      acc += to_acc(X[i * ldx + k]) * to_acc(Y[i * ldy + j]);
    }
  }
  lane_sums[t] = acc;
  __syncthreads();

  // Lane 0 adds up the lanes in a fixed order and writes the block's partial.
  if (lane == 0 && owns_entry) {
    double s = 0.0;
    for (int l = 0; l < lanes; ++l) s += lane_sums[l * tile + o];
    partial[blockIdx.x * m * b + k * b + j] = s;
  }
}

// Stage 2: c [mb] = sum over row blocks of partial [blocks, mb]; c_total += c when given.
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const double* __restrict__ partial, int64_t blocks, int64_t mb,
                        double* __restrict__ c, double* __restrict__ c_total) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < mb;
       e += stride) {
    double s = 0.0;
    for (int64_t g = 0; g < blocks; ++g) s += partial[g * mb + e];
    c[e] = s;
    if (c_total != nullptr) c_total[e] += s;
  }
}

// out [n, b] (contiguous) = Y - X1 C1 - X2 C2 for Y [n, b], X1 [n, m1], X2 [n, m2] (dense rows,
// ldy, ld1 and ld2 apart), C1 [m1, b], C2 [m2, b]: one thread per entry (grid-stride), float64
// arithmetic, rounded to `ot`. `out` may alias `Y` (then ldy = b; each thread reads its own
// entry of Y before writing it), so neither is marked __restrict__.
template <typename xt, typename yt, typename ot>
__global__ void __launch_bounds__(kThreads)
    subtract_products_kernel(const yt* Y, int64_t ldy, const xt* __restrict__ X1, int64_t ld1,
                             const double* __restrict__ C1, int64_t m1, const xt* __restrict__ X2,
                             int64_t ld2, const double* __restrict__ C2, int64_t m2, int64_t n,
                             int64_t b, ot* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n * b;
       e += stride) {
    const int64_t i = e / b, j = e % b;
    double acc = to_acc(Y[i * ldy + j]);
    for (int64_t k = 0; k < m1; ++k) acc -= to_acc(X1[i * ld1 + k]) * C1[k * b + j];
    for (int64_t k = 0; k < m2; ++k) acc -= to_acc(X2[i * ld2 + k]) * C2[k * b + j];
    out[e] = from_acc<ot>(acc);
  }
}

// A [b, b] = (M + M^T) / 2.
__global__ void __launch_bounds__(kThreads)
    symmetrize_kernel(const double* __restrict__ M, int64_t b, double* __restrict__ A) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < b * b;
       e += stride) {
    const int64_t i = e / b, j = e % b;
    A[e] = 0.5 * (M[i * b + j] + M[j * b + i]);
  }
}

// B_t [r, b] = B^T for B [b, r].
__global__ void __launch_bounds__(kThreads)
    transpose_kernel(const double* __restrict__ B, int64_t b, int64_t r, double* __restrict__ B_t) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < r * b;
       e += stride) {
    const int64_t l = e / b, j = e % b;
    B_t[e] = B[j * r + l];
  }
}

// T [N, N], N = r + p * b: one thread per entry picks its value from head [r, r],
// coupling [b, r], alphas [p, b, b] or betas [p - 1, b, b], or writes zero.
__global__ void __launch_bounds__(kThreads)
    assemble_tridiag_kernel(const double* __restrict__ head, const double* __restrict__ coupling,
                            const double* __restrict__ alphas, const double* __restrict__ betas,
                            int64_t r, int64_t p, int64_t b, double* __restrict__ T) {
  const int64_t N = r + p * b;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < N * N;
       e += stride) {
    const int64_t row = e / N, col = e % N;
    double v = 0.0;
    if (row < r && col < r) {
      v = head[row * r + col];  // restart head
    } else if (row < r) {
      // Row of the head, column of a Lanczos block: coupling^T next to the first block.
      if (col < r + b) v = coupling[(col - r) * r + row];
    } else if (col < r) {
      if (row < r + b) v = coupling[(row - r) * r + col];
    } else {
      const int64_t bi = (row - r) / b, ii = (row - r) % b;
      const int64_t bj = (col - r) / b, jj = (col - r) % b;
      if (bi == bj) {
        v = alphas[(bi * b + ii) * b + jj];  // diagonal block alphas[bi]
      } else if (bi == bj + 1) {
        v = betas[(bj * b + ii) * b + jj];  // subdiagonal block betas[bj]
      } else if (bj == bi + 1) {
        v = betas[(bi * b + jj) * b + ii];  // superdiagonal block betas[bi]^T
      }
    }
    T[e] = v;
  }
}

// c [m, b] = X^T Y (float64), and c_total += c when c_total is not null.
template <typename xt, typename yt>
void gram_t_cuda(const xt* X, int64_t ldx, const yt* Y, int64_t ldy, int64_t n, int64_t m,
                 int64_t b, double* c, double* c_total, const at::TensorOptions& f64,
                 cudaStream_t stream) {
  if (m == 0 || b == 0) return;
  if (n == 0) {
    C10_CUDA_CHECK(cudaMemsetAsync(c, 0, sizeof(double) * m * b, stream));
    return;
  }
  // Tile of C per block: tj up to 8 columns of Y, tk columns of X to fill kThreads threads.
  const int tj = next_pow2(std::min<int64_t>(b, 8));
  const int tk = std::min(next_pow2(m), kThreads / tj);
  const int lanes = kThreads / (tk * tj);
  const int64_t tiles = ceil_div(m, tk) * ceil_div(b, tj);
  TORCH_CHECK(tiles <= 65535, "curvx: output of ", m, " x ", b, " entries is too large");
  const int64_t row_blocks = std::max<int64_t>(
      1, std::min({ceil_div(n, lanes * kRowsPerLane), kMaxRowBlocks, kMaxReductionBlocks / tiles}));
  at::Tensor partial = at::empty({row_blocks, m, b}, f64);
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(tiles));
  gram_partial_kernel<xt, yt><<<grid, kThreads, 0, stream>>>(X, ldx, Y, ldy, n, m, b, tk, tj,
                                                             partial.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sum_partials_kernel<<<elementwise_blocks(m * b), kThreads, 0, stream>>>(
      partial.const_data_ptr<double>(), row_blocks, m * b, c, c_total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename xt, typename yt, typename ot>
void subtract_products_cuda(const yt* Y, int64_t ldy, const xt* X1, int64_t ld1, const double* C1,
                            int64_t m1, const xt* X2, int64_t ld2, const double* C2, int64_t m2,
                            int64_t n, int64_t b, ot* out, cudaStream_t stream) {
  if (n * b == 0) return;
  subtract_products_kernel<xt, yt, ot><<<elementwise_blocks(n * b), kThreads, 0, stream>>>(
      Y, ldy, X1, ld1, C1, m1, X2, ld2, C2, m2, n, b, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Classical Gram-Schmidt against range(Q), repeated `passes` times (CGS2 for passes = 2).
std::tuple<at::Tensor, at::Tensor> orthogonalize_cuda(const at::Tensor& Q_in,
                                                      const at::Tensor& V_in, int64_t passes) {
  check_orthogonalize_args(Q_in, V_in, passes);
  const c10::cuda::CUDAGuard guard(V_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor Q = with_dense_rows(Q_in);  // [n, m], rows ldq apart
  const at::Tensor V = with_dense_rows(V_in);  // [n, b], rows ldv apart
  const int64_t n = V.size(0), b = V.size(1), m = Q.size(1);
  const int64_t ldq = row_stride(Q), ldv = row_stride(V);
  const auto f64 = V.options().dtype(at::kDouble);
  GramSchmidtBuffers buffers(V, m, passes);
  at::Tensor W = buffers.W, C = buffers.C;
  at::Tensor c = at::empty({m, b}, f64);  // one pass's coefficients

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, V.scalar_type(), "curvx_orthogonalize_cuda", [&] {
    const scalar_t* q = Q.const_data_ptr<scalar_t>();
    double* c_pass = c.mutable_data_ptr<double>();
    double* c_total = C.mutable_data_ptr<double>();
    // One pass: c = Q^T W_in and C += c; then W_out = W_in - Q c.
    auto pass = [&](const auto* w_in, int64_t ld_in, auto* w_out) {
      gram_t_cuda(q, ldq, w_in, ld_in, n, m, b, c_pass, c_total, f64, stream);
      subtract_products_cuda(w_in, ld_in, q, ldq, static_cast<const double*>(c_pass), m, q, ldq,
                             static_cast<const double*>(c_pass), 0, n, b, w_out, stream);
    };
    const scalar_t* v = V.const_data_ptr<scalar_t>();
    scalar_t* w = W.mutable_data_ptr<scalar_t>();
    run_gram_schmidt_passes(passes, v, ldv, b, w, buffers.w64(), pass);
  });
  return std::make_tuple(W, C);
}

// One block three-term recurrence update: A = sym(Q_cur^T W),
// W_new = W - Q_cur A - Q_prev B_prev^T.
std::tuple<at::Tensor, at::Tensor> lanczos_step_cuda(const at::Tensor& W_in,
                                                     const at::Tensor& Q_cur_in,
                                                     const at::Tensor& Q_prev_in,
                                                     const at::Tensor& B_prev_in) {
  check_lanczos_step_args(W_in, Q_cur_in, Q_prev_in, B_prev_in);
  const c10::cuda::CUDAGuard guard(W_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor W = with_dense_rows(W_in);            // [n, b]
  const at::Tensor Q_cur = with_dense_rows(Q_cur_in);    // [n, b]
  const at::Tensor Q_prev = with_dense_rows(Q_prev_in);  // [n, r]
  const at::Tensor B_prev = B_prev_in.contiguous();      // [b, r]
  const int64_t n = W.size(0), b = W.size(1), r = Q_prev.size(1);
  const int64_t ldw = row_stride(W), ldc = row_stride(Q_cur), ldp = row_stride(Q_prev);
  const auto f64 = W.options().dtype(at::kDouble);
  at::Tensor M = at::empty({b, b}, f64);
  at::Tensor A = at::empty({b, b}, f64);
  at::Tensor B_t = at::empty({r, b}, f64);
  at::Tensor W_new = at::empty({n, b}, W.options());
  if (r * b > 0) {
    transpose_kernel<<<elementwise_blocks(r * b), kThreads, 0, stream>>>(
        B_prev.const_data_ptr<double>(), b, r, B_t.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, W.scalar_type(), "curvx_lanczos_step_cuda", [&] {
    const scalar_t* w = W.const_data_ptr<scalar_t>();
    const scalar_t* q_cur = Q_cur.const_data_ptr<scalar_t>();
    // M = Q_cur^T W, then A = (M + M^T) / 2.
    gram_t_cuda(q_cur, ldc, w, ldw, n, b, b, M.mutable_data_ptr<double>(), nullptr, f64, stream);
    if (b > 0) {
      symmetrize_kernel<<<elementwise_blocks(b * b), kThreads, 0, stream>>>(
          M.const_data_ptr<double>(), b, A.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // W_new = W - Q_cur A - Q_prev B_prev^T.
    subtract_products_cuda(w, ldw, q_cur, ldc, A.const_data_ptr<double>(), b,
                           Q_prev.const_data_ptr<scalar_t>(), ldp, B_t.const_data_ptr<double>(), r,
                           n, b, W_new.mutable_data_ptr<scalar_t>(), stream);
  });
  return std::make_tuple(W_new, A);
}

// Block tridiagonal Rayleigh-Ritz matrix with a thick-restart head (see the CPU kernel).
at::Tensor assemble_tridiag_cuda(const at::Tensor& head_in, const at::Tensor& coupling_in,
                                 const at::Tensor& alphas_in, const at::Tensor& betas_in) {
  check_assemble_tridiag_args(head_in, coupling_in, alphas_in, betas_in);
  const c10::cuda::CUDAGuard guard(head_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor head = head_in.contiguous();          // [r, r]
  const at::Tensor coupling = coupling_in.contiguous();  // [b, r]
  const at::Tensor alphas = alphas_in.contiguous();      // [p, b, b]
  const at::Tensor betas = betas_in.contiguous();        // [max(p - 1, 0), b, b]
  const int64_t r = head.size(0), p = alphas.size(0), b = alphas.size(1);
  const int64_t N = r + p * b;
  at::Tensor T = at::empty({N, N}, head.options());
  if (N == 0) return T;
  assemble_tridiag_kernel<<<elementwise_blocks(N * N), kThreads, 0, stream>>>(
      head.const_data_ptr<double>(), coupling.const_data_ptr<double>(),
      alphas.const_data_ptr<double>(), betas.const_data_ptr<double>(), r, p, b,
      T.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return T;
}

}  // namespace
}  // namespace curvx

TORCH_LIBRARY_IMPL(curvx, CUDA, m) {
  m.impl("orthogonalize", &curvx::orthogonalize_cuda);
  m.impl("lanczos_step", &curvx::lanczos_step_cuda);
  m.impl("assemble_tridiag", &curvx::assemble_tridiag_cuda);
}
