// Schemas of the curvx ops (namespace torch.ops.curvx), declared once here.
//
// Each backend registers its kernels at the foot of its own files: csrc/cpu/*.cpp (CPU) and
// csrc/cuda/*.cu (CUDA). Fake (meta) kernels are registered from Python in curvx/_ops.py.
// Shapes: n rows, block size b (k for the block-layout ops), m or r earlier columns, p blocks.
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

TORCH_LIBRARY(curvx, m) {
  // Q [n, m], V [n, b] -> W [n, b] (V's dtype), C [m, b] float64, with V = Q C + W.
  m.def("orthogonalize(Tensor Q, Tensor V, int passes=2) -> (Tensor, Tensor)");
  // W [n, b], Q_cur [n, b], Q_prev [n, r], B_prev [b, r] -> W_new [n, b], A [b, b] float64.
  m.def("lanczos_step(Tensor W, Tensor Q_cur, Tensor Q_prev, Tensor B_prev) -> (Tensor, Tensor)");
  // head [r, r], coupling [b, r], alphas [p, b, b], betas [p-1, b, b] -> T [r+p*b, r+p*b].
  m.def("assemble_tridiag(Tensor head, Tensor coupling, Tensor alphas, Tensor betas) -> Tensor");

  // Block layout: a block [n, k] of k vectors against the model's per-parameter tensors
  // [k, *shape_p], part p holding numels[p] = prod(shape_p) rows, n = sum(numels).
  // parts [k, *shape_p] (None for zeros) -> block [n, k] = weight * stack, in dtype (the parts'
  // by default).
  m.def(
      "pack_block(Tensor?[] parts, int[] numels, int k, float weight=1.0, ScalarType? dtype=None) "
      "-> Tensor");
  // block [n, k] (dense rows) += weight * stack of parts (None parts add nothing).
  m.def("pack_block_add_(Tensor(a!) block, Tensor?[] parts, int[] numels, float weight=1.0) -> ()");
  // V [n, k] -> flat [k * n] holding part p as a contiguous [k, numels[p]] at k * sum(numels[:p]).
  m.def("unpack_block(Tensor V, int[] numels, ScalarType? dtype=None) -> Tensor");
}

#define CURVX_STR_(x) #x
#define CURVX_STR(x) CURVX_STR_(x)

// `import curvx._C` loads this library, which runs the registrations above. The module
// itself only carries two facts about the build, which curvx/_ops.py checks on load.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                   "Compiled kernels of curvx (see torch.ops.curvx).", -1};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef CURVX_WITH_CUDA
  const long cuda_kernels = 1;
#else
  const long cuda_kernels = 0;
#endif
  const char* torch_version = CURVX_STR(TORCH_VERSION_MAJOR) "." CURVX_STR(
      TORCH_VERSION_MINOR) "." CURVX_STR(TORCH_VERSION_PATCH);
  if (PyModule_AddIntConstant(module, "cuda_kernels", cuda_kernels) < 0 ||
      PyModule_AddStringConstant(module, "torch_version", torch_version) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
