// Shared declarations and argument checks of the cdfast::competitive_ce op.
#pragma once

#include <ATen/ATen.h>
#include <optional>

namespace cdfast {

// Shapes of a call: logits [*G, N, B, K] flattened to groups x N x B x K.
struct CeShape {
  int64_t groups, n, batch, classes;
  bool soft;  // targets are class probabilities [*G, N, B, K] (else int64 class indices [*G, N, B])
};

// Checks everything that does not need the tensors' values; returns the flattened shape.
// Bad shapes raise ValueError in Python, bad dtypes TypeError.
inline CeShape check_competitive_ce_args(const at::Tensor& logits, const at::Tensor& targets,
                                         const std::optional<at::Tensor>& targets_b,
                                         const std::optional<at::Tensor>& lam) {
  TORCH_CHECK_VALUE(logits.dim() >= 3,
              "cdfast::competitive_ce: logits must be [N, B, K] (optionally with leading group dims), got ",
              logits.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()),
              "cdfast::competitive_ce: logits must be float32, float16, bfloat16 or float64, got ",
              logits.scalar_type());
  const int64_t d = logits.dim();
  const int64_t n = logits.size(d - 3), batch = logits.size(d - 2), classes = logits.size(d - 1);
  TORCH_CHECK_VALUE(n >= 2, "cdfast::competitive_ce: a group needs N >= 2 networks, got N = ", n);
  TORCH_CHECK_VALUE(batch >= 1 && classes >= 1, "cdfast::competitive_ce: empty batch or class dim in logits ",
              logits.sizes());
  auto label_shape = logits.sizes().slice(0, d - 1);
  const bool soft = at::isFloatingType(targets.scalar_type());
  TORCH_CHECK_TYPE(soft || targets.scalar_type() == at::kLong,
              "cdfast::competitive_ce: targets must be int64 class indices or floating-point class probabilities, got ",
              targets.scalar_type());
  if (soft) {
    TORCH_CHECK_VALUE(targets.sizes() == logits.sizes(), "cdfast::competitive_ce: class-probability targets must have "
                "the logits' shape ", logits.sizes(), ", got ", targets.sizes());
  } else {
    TORCH_CHECK_VALUE(targets.sizes() == label_shape, "cdfast::competitive_ce: targets must have shape ", label_shape,
                " (one label per network and sample), got ", targets.sizes());
  }
  TORCH_CHECK_VALUE(targets.device() == logits.device(), "cdfast::competitive_ce: targets are on ", targets.device(),
              " but logits on ", logits.device());
  TORCH_CHECK_VALUE(targets_b.has_value() == lam.has_value(),
              "cdfast::competitive_ce: mixed labels need both targets_b and lam (or neither)");
  if (targets_b.has_value()) {
    const bool soft_b = at::isFloatingType(targets_b->scalar_type());
    TORCH_CHECK_TYPE(soft_b == soft && (soft || targets_b->scalar_type() == at::kLong),
                "cdfast::competitive_ce: targets_b must be like targets: ",
                soft ? "floating-point class probabilities" : "int64 class indices", ", got ", targets_b->scalar_type());
    TORCH_CHECK_VALUE(targets_b->sizes() == (soft ? logits.sizes() : label_shape),
                "cdfast::competitive_ce: targets_b must have shape ", soft ? logits.sizes() : label_shape, ", got ",
                targets_b->sizes());
    TORCH_CHECK_VALUE(targets_b->device() == logits.device(), "cdfast::competitive_ce: targets_b is on ",
                targets_b->device(), " but logits on ", logits.device());
    TORCH_CHECK_VALUE(lam->sizes() == logits.sizes().slice(0, d - 2),
                "cdfast::competitive_ce: lam must hold one weight per network, shape ",
                logits.sizes().slice(0, d - 2), ", got ", lam->sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(lam->scalar_type()), "cdfast::competitive_ce: lam must be floating point, got ",
                lam->scalar_type());
    TORCH_CHECK_VALUE(lam->device() == logits.device(), "cdfast::competitive_ce: lam is on ", lam->device(),
                " but logits on ", logits.device());
  }
  const int64_t groups = logits.numel() / (n * batch * classes);
  return {groups, n, batch, classes, soft};
}

// label_smoothing must lie in [0, 1], as F.cross_entropy asks; ignore_index applies to class indices.
inline void check_options(const CeShape& s, double label_smoothing, std::optional<int64_t> ignore_index) {
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "cdfast::competitive_ce: label_smoothing must lie in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(!(s.soft && ignore_index.has_value()),
                    "cdfast::competitive_ce: ignore_index applies to class indices, not to class probabilities");
}

// Output shapes: ce [*G, N], teacher [*G], lse [*G, N, B].
inline std::vector<int64_t> lead_shape(const at::Tensor& logits, int64_t drop) {
  auto s = logits.sizes();
  return std::vector<int64_t>(s.begin(), s.end() - drop);
}

}  // namespace cdfast
