// Autograd of cdfast::competitive_ce, in C++: a call never enters Python to build its graph node.
//
// Registered for the Autograd dispatch key, so every backend (CPU, CUDA) and torch.compile's
// tracing share it. Gradients flow to the logits only (labels and mixing weights get none, the
// teacher index is not differentiable). Grads are not materialised: an unused lse output costs
// nothing, and with neither ce nor lse used the backward does no work at all.
#include <torch/autograd.h>
#include <torch/library.h>

namespace cdfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

using OptInt = std::optional<int64_t>;

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_forward(const at::Tensor& logits, const at::Tensor& targets,
                                                            const OptTensor& targets_b, const OptTensor& lam,
                                                            double label_smoothing, OptInt ignore_index) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cdfast::competitive_ce", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, double, OptInt)>();
  return op.call(logits, targets, targets_b, lam, label_smoothing, ignore_index);
}

at::Tensor call_backward(const at::Tensor& grad_ce, const OptTensor& grad_lse, const at::Tensor& logits,
                         const at::Tensor& targets, const OptTensor& targets_b, const OptTensor& lam,
                         const at::Tensor& lse, double label_smoothing, OptInt ignore_index) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cdfast::competitive_ce_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                                         const OptTensor&, const OptTensor&, const at::Tensor&, double, OptInt)>();
  return op.call(grad_ce, grad_lse, logits, targets, targets_b, lam, lse, label_smoothing, ignore_index);
}

OptTensor defined_or_none(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

class CompetitiveCe : public torch::autograd::Function<CompetitiveCe> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& targets,
                               const OptTensor& targets_b, const OptTensor& lam, double label_smoothing,
                               OptInt ignore_index) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [ce, teacher, lse] = call_forward(logits, targets, targets_b, lam, label_smoothing, ignore_index);
    ctx->save_for_backward({logits, targets, targets_b.value_or(at::Tensor()), lam.value_or(at::Tensor()), lse});
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["ignore_index"] = ignore_index.has_value() ? c10::IValue(*ignore_index) : c10::IValue();
    ctx->mark_non_differentiable({teacher});
    ctx->set_materialize_grads(false);
    return {ce, teacher, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& logits = saved[0];
    const at::Tensor& lse = saved[4];
    const at::Tensor& grad_ce = grads[0];
    const at::Tensor& grad_lse = grads[2];
    if (!grad_ce.defined() && !grad_lse.defined()) return variable_list(6);
    // Only lse was used (rare): the ce part of the gradient is zero. Symbolic sizes keep this
    // traceable with dynamic shapes.
    const at::Tensor gce = grad_ce.defined() ? grad_ce : at::zeros_symint(lse.sym_sizes().slice(0, lse.dim() - 1), lse.options());
    const c10::IValue ignore = ctx->saved_data.at("ignore_index");
    at::Tensor grad = call_backward(gce, defined_or_none(grad_lse), logits, saved[1], defined_or_none(saved[2]),
                                    defined_or_none(saved[3]), lse, ctx->saved_data.at("label_smoothing").toDouble(),
                                    ignore.isNone() ? OptInt() : OptInt(ignore.toInt()));
    variable_list out(6);  // only the logits get a gradient
    out[0] = grad;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> competitive_ce_autograd(const at::Tensor& logits,
                                                                       const at::Tensor& targets,
                                                                       const OptTensor& targets_b,
                                                                       const OptTensor& lam, double label_smoothing,
                                                                       OptInt ignore_index) {
  auto out = CompetitiveCe::apply(logits, targets, targets_b, lam, label_smoothing, ignore_index);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(cdfast, Autograd, m) {
  m.impl("competitive_ce", &competitive_ce_autograd);
}

}  // namespace cdfast
