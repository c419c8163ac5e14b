// CPU kernels of cdfast::competitive_ce.
//
// The O(B*K) work (log-softmax, softmax) runs as ATen's vectorized, multi-threaded CPU ops in
// the accumulation precision; the O(B) work (picking the target logits, batch means in a fixed
// order, the election) is a plain loop. One call instead of N cross-entropies + stack + argmin.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>

#include "../competitive_ce.h"

namespace cdfast {
namespace {

at::ScalarType acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_label_range(const at::Tensor& labels, int64_t classes, const char* name) {
  const auto lo = labels.min().item<int64_t>(), hi = labels.max().item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0 && hi < classes, "cdfast::competitive_ce: ", name, " hold class indices in [", lo, ", ", hi,
              "] but the logits have ", classes, " classes; labels must lie in [0, ", classes, ")");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> competitive_ce_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                                                  const std::optional<at::Tensor>& targets_b,
                                                                  const std::optional<at::Tensor>& lam) {
  const CeShape s = check_competitive_ce_args(logits, targets, targets_b, lam);
  check_label_range(targets, s.classes, "targets");
  const bool mixed = targets_b.has_value();
  if (mixed) check_label_range(*targets_b, s.classes, "targets_b");

  const auto z = logits.to(acc_dtype(logits)).contiguous();
  // One fused, vectorized, max-subtracted pass; per row, lse = z[t] - log_softmax(z)[t].
  const auto logp = at::_log_softmax(z, -1, false);
  auto lse = at::empty(lead_shape(logits, 1), z.options());
  const auto ta = targets.contiguous();
  const auto tb = mixed ? targets_b->contiguous() : ta;
  const auto weight = mixed ? lam->to(at::kDouble).contiguous() : at::ones({s.groups * s.n}, at::kDouble);
  auto ce = at::empty(lead_shape(logits, 2), z.options());
  auto teacher = at::empty(lead_shape(logits, 3), logits.options().dtype(at::kLong));

  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "competitive_ce_cpu", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* pp = logp.const_data_ptr<scalar_t>();
    scalar_t* lp = lse.mutable_data_ptr<scalar_t>();
    const int64_t* ap = ta.const_data_ptr<int64_t>();
    const int64_t* bp = tb.const_data_ptr<int64_t>();
    const double* wp = weight.const_data_ptr<double>();
    scalar_t* cep = ce.mutable_data_ptr<scalar_t>();
    int64_t* tp = teacher.mutable_data_ptr<int64_t>();
    for (int64_t g = 0; g < s.groups; ++g) {
      int64_t best = 0;
      for (int64_t i = 0; i < s.n; ++i) {
        const int64_t gi = g * s.n + i;
        double total_a = 0, total_b = 0;  // fixed summation order: deterministic
        for (int64_t b = 0; b < s.batch; ++b) {
          const int64_t r = gi * s.batch + b, a = r * s.classes + ap[r];
          lp[r] = zp[a] - pp[a];
          total_a -= static_cast<double>(pp[a]);
          if (mixed) total_b -= static_cast<double>(pp[r * s.classes + bp[r]]);
        }
        const double w = wp[gi];
        cep[gi] = static_cast<scalar_t>((mixed ? w * total_a + (1.0 - w) * total_b : total_a) / s.batch);
        // First minimum among the finite CEs (ties: lowest index); a NaN/inf CE is never elected.
        // All non-finite: network 0 (the caller's metrics read reports the non-finite CE).
        const scalar_t cur = cep[gi], top = cep[g * s.n + best];
        if (std::isfinite(cur) && (!std::isfinite(top) || cur < top)) best = i;
      }
      tp[g] = best;
    }
  });
  return {ce, teacher, lse};
}

at::Tensor competitive_ce_backward_cpu(const at::Tensor& grad_ce, const std::optional<at::Tensor>& grad_lse,
                                       const at::Tensor& logits, const at::Tensor& targets,
                                       const std::optional<at::Tensor>& targets_b, const std::optional<at::Tensor>& lam,
                                       const at::Tensor& lse) {
  const CeShape s = check_competitive_ce_args(logits, targets, targets_b, lam);
  const bool mixed = targets_b.has_value();
  const auto acc = acc_dtype(logits);
  const auto z = logits.to(acc);
  const auto scale = grad_ce.to(acc) / static_cast<double>(s.batch);  // [*G, N]
  auto soft_scale = scale.unsqueeze(-1);                               // [*G, N, 1]
  if (grad_lse.has_value() && grad_lse->defined()) soft_scale = soft_scale + grad_lse->to(acc);
  // d/dz of scale * (lse - lam z_a - (1 - lam) z_b) + grad_lse * lse: softmax minus the mixed one-hot.
  auto grad = (at::exp(z - lse.to(acc).unsqueeze(-1)) * soft_scale.unsqueeze(-1)).contiguous();

  const auto ta = targets.contiguous();
  const auto tb = mixed ? targets_b->contiguous() : ta;
  const auto weight = mixed ? lam->to(at::kDouble).contiguous() : at::ones({s.groups * s.n}, at::kDouble);
  const auto scale_c = scale.to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "competitive_ce_backward_cpu", [&] {
    scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
    const int64_t* ap = ta.const_data_ptr<int64_t>();
    const int64_t* bp = tb.const_data_ptr<int64_t>();
    const double* wp = weight.const_data_ptr<double>();
    const double* sp = scale_c.const_data_ptr<double>();
    const int64_t rows = s.groups * s.n * s.batch;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t gi = r / s.batch;
      const double w = mixed ? wp[gi] : 1.0;
      gp[r * s.classes + ap[r]] -= static_cast<scalar_t>(sp[gi] * w);
      if (mixed) gp[r * s.classes + bp[r]] -= static_cast<scalar_t>(sp[gi] * (1.0 - w));
    }
  });
  return grad.to(logits.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(cdfast, CPU, m) {
  m.impl("competitive_ce", &competitive_ce_cpu);
  m.impl("competitive_ce_backward", &competitive_ce_backward_cpu);
}

}  // namespace cdfast
