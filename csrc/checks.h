// Argument checks shared by the CPU and CUDA kernels of the curvx ops.
//
// Every message names the op, the argument and what was received. The Python references in
// curvx/_ops.py raise the same error classes (ValueError for dims and sizes, TypeError for
// dtypes, RuntimeError for devices) with the same wording, so both paths fail alike.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
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

// The parts of pack_block / pack_block_add_ and the numels of every block-layout op.
using OptionalTensorList = c10::List<std::optional<at::Tensor>>;

inline std::string indexed(const char* name, size_t i) {
  return std::string(name) + "[" + std::to_string(i) + "]";
}

inline void check_numels(const char* op, c10::IntArrayRef numels) {
  for (size_t i = 0; i < numels.size(); ++i) {
    TORCH_CHECK_VALUE(numels[i] >= 0, "curvx.", op, ": numels[", i, "] must be >= 0, got ",
                      numels[i]);
  }
}

inline int64_t sum_of(c10::IntArrayRef numels) {
  int64_t n = 0;
  for (const int64_t m : numels) n += m;
  return n;
}

inline void check_dtype_arg(const char* op, std::optional<at::ScalarType> dtype) {
  if (!dtype.has_value()) return;
  const auto s = *dtype;
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kBFloat16, "curvx.", op,
                   ": dtype must be torch.float32, torch.float64 or torch.bfloat16, got ",
                   dtype_name(s));
}

// parts[i] [k, *shape_i] holding k * numels[i] entries, or None; every part given has an n-row
// dtype, the dtype of the first part given, and the device of `block` (when given) or of the
// first part given. Returns the index of the first part given, -1 when there is none.
inline int64_t check_parts(const char* op, const OptionalTensorList& parts, c10::IntArrayRef numels,
                           int64_t k, double weight, const at::Tensor* block) {
  TORCH_CHECK_VALUE(std::isfinite(weight), "curvx.", op, ": weight must be finite, got ", weight);
  int64_t first = -1;
  for (size_t i = 0; i < parts.size(); ++i) {
    const std::optional<at::Tensor> part = parts[i];
    if (!part.has_value() || !part->defined()) continue;
    const at::Tensor& t = *part;
    const std::string name = indexed("parts", i);
    check_n_row_dtype(op, name.c_str(), t);
    if (first < 0) {
      first = static_cast<int64_t>(i);
    } else {
      const std::string ref = indexed("parts", first);
      check_same_dtype(op, name.c_str(), t, ref.c_str(), *parts.get(first));
    }
    if (block != nullptr) {
      check_same_device(op, name.c_str(), t, "block", *block);
    } else if (first != static_cast<int64_t>(i)) {
      const std::string ref = indexed("parts", first);
      check_same_device(op, name.c_str(), t, ref.c_str(), *parts.get(first));
    }
    TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(0) == k && t.numel() == k * numels[i], "curvx.", op,
                      ": ", name, " must have sizes [k, *shape] with k = ", k, " and k * numels[",
                      i, "] = ", k * numels[i], " entries, got sizes ", t.sizes());
  }
  return first;
}

// pack_block(parts, numels, k, weight, dtype): returns the index of the first part given.
inline int64_t check_pack_block_args(const OptionalTensorList& parts, c10::IntArrayRef numels,
                                     int64_t k, double weight,
                                     std::optional<at::ScalarType> dtype) {
  const char* op = "pack_block";
  TORCH_CHECK_VALUE(parts.size() == numels.size(), "curvx.", op,
                    ": parts and numels must have the same length, got ", parts.size(), " and ",
                    numels.size());
  check_numels(op, numels);
  TORCH_CHECK_VALUE(k >= 0, "curvx.", op, ": k must be >= 0, got ", k);
  check_dtype_arg(op, dtype);
  const int64_t first = check_parts(op, parts, numels, k, weight, nullptr);
  TORCH_CHECK_VALUE(first >= 0, "curvx.", op,
                    ": parts must hold at least one tensor, got only None (the Python wrapper "
                    "returns zeros for that case)");
  return first;
}

// pack_block_add_(block [n, k] with dense rows, parts, numels, weight).
inline void check_pack_block_add_args(const at::Tensor& block, const OptionalTensorList& parts,
                                      c10::IntArrayRef numels, double weight) {
  const char* op = "pack_block_add_";
  TORCH_CHECK_VALUE(parts.size() == numels.size(), "curvx.", op,
                    ": parts and numels must have the same length, got ", parts.size(), " and ",
                    numels.size());
  check_numels(op, numels);
  check_dim(op, "block", block, 2);
  check_n_row_dtype(op, "block", block);
  check_size(op, "block", block, 0, sum_of(numels), "sum(numels)");
  const bool dense = block.size(1) <= 1 || block.stride(1) == 1;
  const bool apart = block.size(0) <= 1 || block.stride(0) >= block.size(1);
  TORCH_CHECK_VALUE(dense && apart, "curvx.", op,
                    ": block must have rows of adjacent entries that do not overlap "
                    "(stride(1) == 1 and stride(0) >= size(1)), got strides ",
                    block.strides(), " for sizes ", block.sizes());
  check_parts(op, parts, numels, block.size(1), weight, &block);
}

// unpack_block(V [n, k], numels, dtype).
inline void check_unpack_block_args(const at::Tensor& V, c10::IntArrayRef numels,
                                    std::optional<at::ScalarType> dtype) {
  const char* op = "unpack_block";
  check_numels(op, numels);
  check_dim(op, "V", V, 2);
  check_n_row_dtype(op, "V", V);
  check_size(op, "V", V, 0, sum_of(numels), "sum(numels)");
  check_dtype_arg(op, dtype);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace curvx
