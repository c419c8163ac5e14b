// The cdfast op library: schemas of every op (namespace "cdfast") and the Python module stub.
//
// Kernels register per backend in cpu/ and cuda/. Importing cdfast._C loads this
// library, which makes the ops available as torch.ops.cdfast.*.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty module: importing it is only the way to load the library from Python.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
#ifdef CDFAST_WITH_CUDA
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  return module;
}
}

TORCH_LIBRARY(cdfast, m) {
  // Per-network mean cross-entropy of a group, the elected teacher (argmin, ties to the lowest
  // index) and the per-row log-sum-exp. logits [*G, N, B, K]; targets [*G, N, B] int64 class
  // indices or [*G, N, B, K] class probabilities; mixed labels: targets_b like targets and
  // lam [*G, N] (weight of targets).
  // label_smoothing and ignore_index as in F.cross_entropy (None: nothing ignored); each label
  // set's CE is the mean over its kept rows (none kept: NaN, as F.cross_entropy).
  // Returns ce [*G, N], teacher [*G] int64, lse [*G, N, B] (of every row); ce and lse are float32
  // (float64 for float64 logits).
  m.def(
      "competitive_ce(Tensor logits, Tensor targets, Tensor? targets_b, Tensor? lam, float label_smoothing=0.0, "
      "int? ignore_index=None) -> (Tensor, Tensor, Tensor)");
  // Gradient w.r.t. the logits given the gradients of ce (and optionally of lse).
  m.def(
      "competitive_ce_backward(Tensor grad_ce, Tensor? grad_lse, Tensor logits, Tensor targets, Tensor? targets_b, "
      "Tensor? lam, Tensor lse, float label_smoothing=0.0, int? ignore_index=None) -> Tensor");
}
