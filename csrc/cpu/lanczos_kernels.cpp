// CPU kernels of the curvx ops (schemas in csrc/ops.cpp).
//
// Shapes: n rows (parameters), block size b, m or r earlier basis columns, p Lanczos blocks.
// The n-row matrices are float32, float64 or bfloat16; every product is accumulated in float64
// and only the n-row results are rounded back to the input dtype. Inputs whose rows are dense
// (a column slice of the solver's wider basis, say) are read in place, others copied once.
// Rows are processed in parallel with at::parallel_for (OpenMP); reductions over rows keep one
// float64 partial per fixed chunk of rows and sum the partials in chunk order, so results do
// not depend on the number of threads.
//
// Against the references (bench/test_bench_kernels.py; n = 199,210, basis a column slice, one
// thread, a shared 2-core VM): orthogonalize m = 64, b = 8: 1.8x (float64), 2.1x (float32),
// 1.9x (bfloat16); m = 32, b = 16, float64: 1.0x; lanczos_step b = 8: 1.3x (float64), 3.6x
// (float32), b = 16 float64: 1.1x; assemble_tridiag 11-20x. The float64 cases with 16-column
// blocks are kept at parity with MKL's DGEMM (memory-bound, one pass over the basis per product
// either way): the kernels are there for float32 and bfloat16 bases, which the references must
// first copy to float64, and for one implementation across block sizes. With two threads and
// narrow blocks (b = 1-3, a tracker's usual width) they lose to the composites (float64
// orthogonalize 2.3-2.5x slower, lanczos_step 1.6-2.2x; float32 1.5-2.3x), so curvx/_ops.py
// sends CPU blocks narrower than CPU_KERNEL_MIN_BLOCK = 8 to the composites.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../convert.h"
#include "../layout.h"
#include "../passes.h"

namespace curvx {
namespace {

// Reductions split the rows into at most kMaxChunks chunks of at least kMinChunkRows rows.
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kMinChunkRows = 512;
// Row-wise updates hand at::parallel_for this many rows per task at least.
constexpr int64_t kUpdateGrain = 256;

// C [m, b] = X^T Y for X [n, m], Y [n, b] (dense rows, ldx and ldy apart), accumulated in
// float64.
template <typename xt, typename yt>
void gram_t(const xt* X, int64_t ldx, const yt* Y, int64_t ldy, int64_t n, int64_t m, int64_t b,
            double* C) {
  std::fill(C, C + m * b, 0.0);
  if (n == 0 || m == 0 || b == 0) return;
  const int64_t rows = std::max(kMinChunkRows, ceil_div(n, kMaxChunks));
  const int64_t chunks = ceil_div(n, rows);
  std::vector<double> partial(chunks * m * b, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<double> y_row(b);
    for (int64_t c = c0; c < c1; ++c) {
      double* acc = partial.data() + c * m * b;
      const int64_t i1 = std::min(n, (c + 1) * rows);
      for (int64_t i = c * rows; i < i1; ++i) {
        // Widen row i of Y once, then add the outer product X[i, :]^T Y[i, :] to the partial.
        for (int64_t j = 0; j < b; ++j) y_row[j] = to_acc(Y[i * ldy + j]);
        const xt* x_row = X + i * ldx;
        for (int64_t k = 0; k < m; ++k) {
          const double x = to_acc(x_row[k]);
          double* acc_k = acc + k * b;
          for (int64_t j = 0; j < b; ++j) acc_k[j] += x * y_row[j];
        }
      }
    }
  });
  // Sum the chunk partials in a fixed order.
  for (int64_t c = 0; c < chunks; ++c) {
    const double* part = partial.data() + c * m * b;
    for (int64_t e = 0; e < m * b; ++e) C[e] += part[e];
  }
}

// out [n, b] (contiguous) = Y - X1 C1 - X2 C2 for Y [n, b], X1 [n, m1], X2 [n, m2] (dense rows,
// ldy, ld1 and ld2 apart), C1 [m1, b], C2 [m2, b], computed in float64 and rounded to `ot`.
// `out` may alias `Y` (then ldy = b): row i of Y is read before it is written.
template <typename xt, typename yt, typename ot>
void subtract_products(const yt* Y, int64_t ldy, const xt* X1, int64_t ld1, const double* C1,
                       int64_t m1, const xt* X2, int64_t ld2, const double* C2, int64_t m2,
                       int64_t n, int64_t b, ot* out) {
  if (n == 0 || b == 0) return;
  at::parallel_for(0, n, kUpdateGrain, [&](int64_t i0, int64_t i1) {
    std::vector<double> acc(b);
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t j = 0; j < b; ++j) acc[j] = to_acc(Y[i * ldy + j]);
      // acc -= X1[i, :] C1, one row of C1 at a time (contiguous inner loop).
      for (int64_t k = 0; k < m1; ++k) {
        const double x = to_acc(X1[i * ld1 + k]);
        for (int64_t j = 0; j < b; ++j) acc[j] -= x * C1[k * b + j];
      }
      // acc -= X2[i, :] C2.
      for (int64_t k = 0; k < m2; ++k) {
        const double x = to_acc(X2[i * ld2 + k]);
        for (int64_t j = 0; j < b; ++j) acc[j] -= x * C2[k * b + j];
      }
      for (int64_t j = 0; j < b; ++j) out[i * b + j] = from_acc<ot>(acc[j]);
    }
  });
}

// Classical Gram-Schmidt against range(Q), repeated `passes` times (CGS2 for passes = 2).
std::tuple<at::Tensor, at::Tensor> orthogonalize_cpu(const at::Tensor& Q_in, const at::Tensor& V_in,
                                                     int64_t passes) {
  check_orthogonalize_args(Q_in, V_in, passes);
  const at::Tensor Q = with_dense_rows(Q_in);  // [n, m], rows ldq apart
  const at::Tensor V = with_dense_rows(V_in);  // [n, b], rows ldv apart
  const int64_t n = V.size(0), b = V.size(1), m = Q.size(1);
  const int64_t ldq = row_stride(Q), ldv = row_stride(V);
  GramSchmidtBuffers buffers(V, m, passes);
  at::Tensor W = buffers.W, C = buffers.C;
  std::vector<double> c(m * b);  // one pass's coefficients [m, b]

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, V.scalar_type(), "curvx_orthogonalize_cpu", [&] {
    const scalar_t* q = Q.const_data_ptr<scalar_t>();
    double* c_total = C.mutable_data_ptr<double>();
    // One pass: c = Q^T W_in; C += c; W_out = W_in - Q c.
    auto pass = [&](const auto* w_in, int64_t ld_in, auto* w_out) {
      gram_t(q, ldq, w_in, ld_in, n, m, b, c.data());
      for (int64_t e = 0; e < m * b; ++e) c_total[e] += c[e];
      subtract_products(w_in, ld_in, q, ldq, c.data(), m, q, ldq, c.data(), 0, n, b, w_out);
    };
    const scalar_t* v = V.const_data_ptr<scalar_t>();
    scalar_t* w = W.mutable_data_ptr<scalar_t>();
    run_gram_schmidt_passes(passes, v, ldv, b, w, buffers.w64(), pass);
  });
  return std::make_tuple(W, C);
}

// One block three-term recurrence update: A = sym(Q_cur^T W),
// W_new = W - Q_cur A - Q_prev B_prev^T.
std::tuple<at::Tensor, at::Tensor> lanczos_step_cpu(const at::Tensor& W_in,
                                                    const at::Tensor& Q_cur_in,
                                                    const at::Tensor& Q_prev_in,
                                                    const at::Tensor& B_prev) {
  check_lanczos_step_args(W_in, Q_cur_in, Q_prev_in, B_prev);
  const at::Tensor W = with_dense_rows(W_in);            // [n, b]
  const at::Tensor Q_cur = with_dense_rows(Q_cur_in);    // [n, b]
  const at::Tensor Q_prev = with_dense_rows(Q_prev_in);  // [n, r]
  const at::Tensor B_t = B_prev.t().contiguous();        // [r, b] = B_prev^T
  const int64_t n = W.size(0), b = W.size(1), r = Q_prev.size(1);
  const int64_t ldw = row_stride(W), ldc = row_stride(Q_cur), ldp = row_stride(Q_prev);
  at::Tensor A = at::empty({b, b}, W.options().dtype(at::kDouble));
  at::Tensor W_new = at::empty({n, b}, W.options());

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, W.scalar_type(), "curvx_lanczos_step_cpu", [&] {
    const scalar_t* w = W.const_data_ptr<scalar_t>();
    const scalar_t* q_cur = Q_cur.const_data_ptr<scalar_t>();
    // M = Q_cur^T W [b, b], then A = (M + M^T) / 2.
    std::vector<double> M(b * b);
    gram_t(q_cur, ldc, w, ldw, n, b, b, M.data());
    double* a = A.mutable_data_ptr<double>();
    for (int64_t i = 0; i < b; ++i) {
      for (int64_t j = 0; j < b; ++j) a[i * b + j] = 0.5 * (M[i * b + j] + M[j * b + i]);
    }
    // W_new = W - Q_cur A - Q_prev B_prev^T.
    subtract_products(w, ldw, q_cur, ldc, a, b, Q_prev.const_data_ptr<scalar_t>(), ldp,
                      B_t.const_data_ptr<double>(), r, n, b, W_new.mutable_data_ptr<scalar_t>());
  });
  return std::make_tuple(W_new, A);
}

// Block tridiagonal Rayleigh-Ritz matrix with a thick-restart head, all float64:
//   T = [[head,        coupling^T,                    ]
//        [coupling,    alphas[0],   betas[0]^T,       ]
//        [             betas[0],    alphas[1],   ...  ]
//        [                          ...,         ...  ]]
at::Tensor assemble_tridiag_cpu(const at::Tensor& head_in, const at::Tensor& coupling_in,
                                const at::Tensor& alphas_in, const at::Tensor& betas_in) {
  check_assemble_tridiag_args(head_in, coupling_in, alphas_in, betas_in);
  const at::Tensor head = head_in.contiguous();          // [r, r]
  const at::Tensor coupling = coupling_in.contiguous();  // [b, r]
  const at::Tensor alphas = alphas_in.contiguous();      // [p, b, b]
  const at::Tensor betas = betas_in.contiguous();        // [max(p - 1, 0), b, b]
  const int64_t r = head.size(0), p = alphas.size(0), b = alphas.size(1);
  const int64_t N = r + p * b;
  at::Tensor T = at::zeros({N, N}, head.options());
  double* t = T.mutable_data_ptr<double>();
  const double* h = head.const_data_ptr<double>();
  const double* cp = coupling.const_data_ptr<double>();
  const double* al = alphas.const_data_ptr<double>();
  const double* be = betas.const_data_ptr<double>();
  // Leading r x r block: the restart head.
  for (int64_t i = 0; i < r; ++i) std::copy(h + i * r, h + (i + 1) * r, t + i * N);
  if (p == 0) return T;
  // First Lanczos block row couples to the head; its transpose fills the column.
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t j = 0; j < r; ++j) {
      t[(r + i) * N + j] = cp[i * r + j];
      t[j * N + r + i] = cp[i * r + j];
    }
  }
  for (int64_t k = 0; k < p; ++k) {
    const int64_t s = r + k * b;  // first row/column of block k
    for (int64_t i = 0; i < b; ++i) {
      // Diagonal block alphas[k].
      std::copy(al + (k * b + i) * b, al + (k * b + i + 1) * b, t + (s + i) * N + s);
      if (k + 1 == p) continue;
      // Subdiagonal block T[k+1, k] = betas[k] and superdiagonal T[k, k+1] = betas[k]^T.
      for (int64_t j = 0; j < b; ++j) {
        const double v = be[(k * b + i) * b + j];
        t[(s + b + i) * N + s + j] = v;
        t[(s + j) * N + s + b + i] = v;
      }
    }
  }
  return T;
}

}  // namespace
}  // namespace curvx

TORCH_LIBRARY_IMPL(curvx, CPU, m) {
  m.impl("orthogonalize", &curvx::orthogonalize_cpu);
  m.impl("lanczos_step", &curvx::lanczos_step_cpu);
  m.impl("assemble_tridiag", &curvx::assemble_tridiag_cpu);
}
