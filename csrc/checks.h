// Argument checks shared by the CPU and CUDA kernels of the curvx ops.
//
// Every message names the op, the argument and what was received. The Python references in
// curvx/_ops.py raise the same error classes (ValueError for dims and sizes, TypeError for
// dtypes, RuntimeError for devices) with the same wording, so both paths fail alike.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace curvx {

// Python spelling of a dtype ("torch.float32"), as the Python references print it.
inline std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return "torch.float32";
    case at::kDouble:
      return "torch.float64";
    case at::kBFloat16:
      return "torch.bfloat16";
    case at::kHalf:
      return "torch.float16";
    case at::kComplexFloat:
      return "torch.complex64";
    case at::kComplexDouble:
      return "torch.complex128";
    case at::kByte:
      return "torch.uint8";
    case at::kChar:
      return "torch.int8";
    case at::kShort:
      return "torch.int16";
    case at::kInt:
      return "torch.int32";
    case at::kLong:
      return "torch.int64";
    case at::kBool:
      return "torch.bool";
    default:
      return std::string("torch.") + c10::toString(dtype);
  }
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, "curvx.", op, ": ", name, " must be a ", dim,
                    "-D tensor, got a ", t.dim(), "-D tensor of sizes ", t.sizes());
}

// t.size(d) must equal `expected`, which the caller names in `what` (e.g. "V.size(0)").
inline void check_size(const char* op, const char* name, const at::Tensor& t, int64_t d,
                       int64_t expected, const char* what) {
  TORCH_CHECK_VALUE(t.size(d) == expected, "curvx.", op, ": ", name, ".size(", d, ") must equal ",
                    what, " = ", expected, ", got ", name, " of sizes ", t.sizes());
}

// The n-row matrices (Q, V, W) may be float32, float64 or bfloat16.
inline void check_n_row_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kBFloat16, "curvx.", op, ": ",
                   name, " must be torch.float32, torch.float64 or torch.bfloat16, got ",
                   dtype_name(s));
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t,
                             const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "curvx.", op, ": ", name,
                   " must have the same dtype as ", ref_name, " (", dtype_name(ref.scalar_type()),
                   "), got ", dtype_name(t.scalar_type()));
}

// The small matrices (A, B, C, T and their inputs) are float64.
inline void check_float64(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble, "curvx.", op, ": ", name,
                   " must be torch.float64, got ", dtype_name(t.scalar_type()));
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "curvx.", op, ": ", name,
              " must be on the same device as ", ref_name, " (", ref.device(), "), got ",
              t.device());
}

// orthogonalize(Q [n, m], V [n, b], passes >= 1).
inline void check_orthogonalize_args(const at::Tensor& Q, const at::Tensor& V, int64_t passes) {
  const char* op = "orthogonalize";
  check_dim(op, "Q", Q, 2);
  check_dim(op, "V", V, 2);
  check_n_row_dtype(op, "V", V);
  check_same_dtype(op, "Q", Q, "V", V);
  check_same_device(op, "Q", Q, "V", V);
  check_size(op, "Q", Q, 0, V.size(0), "V.size(0)");
  TORCH_CHECK_VALUE(passes >= 1, "curvx.", op, ": passes must be >= 1, got ", passes);
}

// lanczos_step(W [n, b], Q_cur [n, b], Q_prev [n, r], B_prev [b, r] float64).
inline void check_lanczos_step_args(const at::Tensor& W, const at::Tensor& Q_cur,
                                    const at::Tensor& Q_prev, const at::Tensor& B_prev) {
  const char* op = "lanczos_step";
  check_dim(op, "W", W, 2);
  check_dim(op, "Q_cur", Q_cur, 2);
  check_dim(op, "Q_prev", Q_prev, 2);
  check_dim(op, "B_prev", B_prev, 2);
  check_n_row_dtype(op, "W", W);
  check_same_dtype(op, "Q_cur", Q_cur, "W", W);
  check_same_dtype(op, "Q_prev", Q_prev, "W", W);
  check_float64(op, "B_prev", B_prev);
  check_same_device(op, "Q_cur", Q_cur, "W", W);
  check_same_device(op, "Q_prev", Q_prev, "W", W);
  check_same_device(op, "B_prev", B_prev, "W", W);
  check_size(op, "Q_cur", Q_cur, 0, W.size(0), "W.size(0)");
  check_size(op, "Q_cur", Q_cur, 1, W.size(1), "W.size(1)");
  check_size(op, "Q_prev", Q_prev, 0, W.size(0), "W.size(0)");
  check_size(op, "B_prev", B_prev, 0, W.size(1), "W.size(1)");
  check_size(op, "B_prev", B_prev, 1, Q_prev.size(1), "Q_prev.size(1)");
}

// assemble_tridiag(head [r, r], coupling [b, r], alphas [p, b, b], betas [max(p-1, 0), b, b]).
inline void check_assemble_tridiag_args(const at::Tensor& head, const at::Tensor& coupling,
                                        const at::Tensor& alphas, const at::Tensor& betas) {
  const char* op = "assemble_tridiag";
  check_dim(op, "head", head, 2);
  check_dim(op, "coupling", coupling, 2);
  check_dim(op, "alphas", alphas, 3);
  check_dim(op, "betas", betas, 3);
  check_float64(op, "head", head);
  check_float64(op, "coupling", coupling);
  check_float64(op, "alphas", alphas);
  check_float64(op, "betas", betas);
  check_same_device(op, "coupling", coupling, "head", head);
  check_same_device(op, "alphas", alphas, "head", head);
  check_same_device(op, "betas", betas, "head", head);
  const int64_t p = alphas.size(0);
  check_size(op, "head", head, 1, head.size(0), "head.size(0)");
  check_size(op, "alphas", alphas, 2, alphas.size(1), "alphas.size(1)");
  check_size(op, "coupling", coupling, 0, alphas.size(1), "alphas.size(1)");
  check_size(op, "coupling", coupling, 1, head.size(0), "head.size(0)");
  check_size(op, "betas", betas, 0, p > 0 ? p - 1 : 0, "max(alphas.size(0) - 1, 0)");
  check_size(op, "betas", betas, 1, alphas.size(1), "alphas.size(1)");
  check_size(op, "betas", betas, 2, alphas.size(1), "alphas.size(1)");
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace curvx
