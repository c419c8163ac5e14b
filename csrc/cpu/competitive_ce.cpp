// CPU kernels of cdfast::competitive_ce.
//
// The O(B*K) work (log-softmax, softmax) runs as ATen's vectorized, multi-threaded CPU ops in
// the accumulation precision; the O(B) work (picking the target logits, batch means in a fixed
// order, the election) is a plain loop. One call instead of N cross-entropies + stack + argmin.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../competitive_ce.h"

namespace cdfast {
namespace {

at::ScalarType acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Labels equal to ignore_index are neither in nor out of range.
void check_label_range(const at::Tensor& labels, int64_t classes, const char* name, std::optional<int64_t> ignore) {
  const auto kept = ignore.has_value() ? labels.masked_select(labels.ne(*ignore)) : labels;
  if (kept.numel() == 0) return;
  const auto lo = kept.min().item<int64_t>(), hi = kept.max().item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0 && hi < classes, "cdfast::competitive_ce: ", name, " hold class indices in [", lo, ", ", hi,
              "] but the logits have ", classes, " classes; labels must lie in [0, ", classes, ")");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> competitive_ce_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                                                  const std::optional<at::Tensor>& targets_b,
                                                                  const std::optional<at::Tensor>& lam,
                                                                  double label_smoothing,
                                                                  std::optional<int64_t> ignore_index) {
  const CeShape s = check_competitive_ce_args(logits, targets, targets_b, lam);
  check_options(s, label_smoothing, ignore_index);
  const bool mixed = targets_b.has_value();
  if (!s.soft) {
    check_label_range(targets, s.classes, "targets", ignore_index);
    if (mixed) check_label_range(*targets_b, s.classes, "targets_b", ignore_index);
  }
  const bool ignoring = ignore_index.has_value(), smooth = label_smoothing > 0.0;
  const int64_t ignore = ignore_index.value_or(0);
  const double eps = label_smoothing;

  const auto z = logits.to(acc_dtype(logits)).contiguous();
  // One fused, vectorized, max-subtracted pass; per row, lse = z[t] - log_softmax(z)[t] at its own label.
  const auto logp = at::_log_softmax(z, -1, false);
  // A row without a label to read lse at (ignored, or class probabilities): lse from logsumexp.
  const auto lse_all = ignoring || s.soft ? at::logsumexp(z, -1).contiguous() : at::Tensor();
  // The smoothing term of a row: -mean_k log p_k (F.cross_entropy's eps/K over every class).
  const auto mean_logp = smooth ? logp.mean(-1).contiguous() : at::Tensor();
  // Class probabilities: each row's -sum_k q'_k log p_k with the smoothed target q' = (1 - eps) q + eps/K,
  // as the reference (q' = 0 at a masked class: 0 * -inf = NaN, as torch gives).
  auto soft_nll = [&](const at::Tensor& q) {
    auto smoothed_q = q.to(z.scalar_type());
    if (smooth) smoothed_q = smoothed_q * (1.0 - eps) + eps / static_cast<double>(s.classes);
    return (-(smoothed_q * logp).sum(-1)).contiguous();
  };
  const auto nll_a = s.soft ? soft_nll(targets) : at::Tensor();
  const auto nll_b = s.soft && mixed ? soft_nll(*targets_b) : at::Tensor();
  auto lse = at::empty(lead_shape(logits, 1), z.options());
  const auto ta = s.soft ? at::Tensor() : targets.contiguous();
  const auto tb = s.soft || !mixed ? ta : targets_b->contiguous();
  const auto weight = mixed ? lam->to(at::kDouble).contiguous() : at::ones({s.groups * s.n}, at::kDouble);
  auto ce = at::empty(lead_shape(logits, 2), z.options());
  auto teacher = at::empty(lead_shape(logits, 3), logits.options().dtype(at::kLong));

  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "competitive_ce_cpu", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* pp = logp.const_data_ptr<scalar_t>();
    const scalar_t* allp = lse_all.defined() ? lse_all.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* mp = smooth ? mean_logp.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* qa = s.soft ? nll_a.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* qb = s.soft && mixed ? nll_b.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* lp = lse.mutable_data_ptr<scalar_t>();
    const int64_t* ap = s.soft ? nullptr : ta.const_data_ptr<int64_t>();
    const int64_t* bp = s.soft ? nullptr : tb.const_data_ptr<int64_t>();
    const double* wp = weight.const_data_ptr<double>();
    scalar_t* cep = ce.mutable_data_ptr<scalar_t>();
    int64_t* tp = teacher.mutable_data_ptr<int64_t>();
    // CE of a kept row whose unsmoothed CE is nll: (1 - eps) * nll + eps * (-mean_k log p_k)
    auto smoothed = [&](double nll, int64_t r) { return smooth ? (1.0 - eps) * nll - eps * static_cast<double>(mp[r]) : nll; };
    // lse = z_t - log p_t at the row's label; a masked label (z_t = -inf) would give -inf - -inf = NaN,
    // so such a row sums its exponentials itself (rare)
    auto row_lse = [&](int64_t r, int64_t t) -> scalar_t {
      const scalar_t at_label = zp[r * s.classes + t] - pp[r * s.classes + t];
      if (!std::isnan(at_label)) return at_label;
      const scalar_t* row = zp + r * s.classes;
      scalar_t m = -std::numeric_limits<scalar_t>::infinity();
      for (int64_t c = 0; c < s.classes; ++c) m = std::isnan(row[c]) ? row[c] : std::max(m, row[c]);
      if (!std::isfinite(m)) return m;  // NaN, or every class -inf (-inf) or some +inf (+inf)
      double sum = 0;
      for (int64_t c = 0; c < s.classes; ++c) sum += std::exp(static_cast<double>(row[c] - m));
      return static_cast<scalar_t>(m + std::log(sum));
    };
    for (int64_t g = 0; g < s.groups; ++g) {
      int64_t best = 0;
      for (int64_t i = 0; i < s.n; ++i) {
        const int64_t gi = g * s.n + i;
        double total_a = 0, total_b = 0;  // fixed summation order: deterministic
        int64_t kept_a = 0, kept_b = 0;
        for (int64_t b = 0; b < s.batch; ++b) {
          const int64_t r = gi * s.batch + b;
          if (s.soft) {
            lp[r] = allp[r];
            total_a += qa[r], ++kept_a;  // smoothed already
            if (mixed) total_b += qb[r], ++kept_b;
            continue;
          }
          lp[r] = ignoring ? allp[r] : row_lse(r, ap[r]);
          if (!ignoring || ap[r] != ignore) total_a += smoothed(-pp[r * s.classes + ap[r]], r), ++kept_a;
          if (mixed && (!ignoring || bp[r] != ignore)) total_b += smoothed(-pp[r * s.classes + bp[r]], r), ++kept_b;
        }
        // every label ignored: 0 / 0 = NaN, as F.cross_entropy
        const double ce_a = total_a / static_cast<double>(kept_a);
        const double w = wp[gi];
        cep[gi] = static_cast<scalar_t>(mixed ? w * ce_a + (1.0 - w) * (total_b / static_cast<double>(kept_b)) : ce_a);
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
                                       const at::Tensor& lse, double label_smoothing,
                                       std::optional<int64_t> ignore_index) {
  const CeShape s = check_competitive_ce_args(logits, targets, targets_b, lam);
  check_options(s, label_smoothing, ignore_index);
  const bool mixed = targets_b.has_value(), ignoring = ignore_index.has_value();
  const int64_t ignore = ignore_index.value_or(0);
  const double eps = label_smoothing;
  const auto acc = acc_dtype(logits);
  // softmax, turned into the gradient in place, row by row
  auto grad = at::exp(logits.to(acc) - lse.to(acc).unsqueeze(-1)).contiguous();
  const bool has_glse = grad_lse.has_value() && grad_lse->defined();
  const auto glse = has_glse ? grad_lse->to(at::kDouble).contiguous() : at::Tensor();
  const auto gce = grad_ce.to(at::kDouble).contiguous();
  // class indices, or class probabilities in the gradient's dtype
  const auto ta = s.soft ? targets.to(acc).contiguous() : targets.contiguous();
  const auto tb = mixed ? (s.soft ? targets_b->to(acc).contiguous() : targets_b->contiguous()) : ta;
  const auto weight = mixed ? lam->to(at::kDouble).contiguous() : at::ones({s.groups * s.n}, at::kDouble);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "competitive_ce_backward_cpu", [&] {
    scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
    const int64_t* ap = s.soft ? nullptr : ta.const_data_ptr<int64_t>();
    const int64_t* bp = s.soft ? nullptr : tb.const_data_ptr<int64_t>();
    const scalar_t* qa = s.soft ? ta.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* qb = s.soft ? tb.const_data_ptr<scalar_t>() : nullptr;
    const double* wp = weight.const_data_ptr<double>();
    const double* cp = gce.const_data_ptr<double>();
    const double* lp = has_glse ? glse.const_data_ptr<double>() : nullptr;
    const double uniform = eps / static_cast<double>(s.classes);
    for (int64_t gi = 0; gi < s.groups * s.n; ++gi) {
      int64_t kept_a = s.batch, kept_b = s.batch;
      if (ignoring) {  // (class indices only)
        kept_a = kept_b = 0;
        for (int64_t b = 0; b < s.batch; ++b) {
          kept_a += ap[gi * s.batch + b] != ignore;
          kept_b += bp[gi * s.batch + b] != ignore;
        }
      }
      const double w = mixed ? wp[gi] : 1.0;
      // d ce / d row-CE of each label set: the set's weight over its kept rows (used on kept rows only)
      const double scale_a = cp[gi] * w / static_cast<double>(kept_a);
      const double scale_b = mixed ? cp[gi] * (1.0 - w) / static_cast<double>(kept_b) : 0.0;
      for (int64_t b = 0; b < s.batch; ++b) {
        const int64_t r = gi * s.batch + b;
        scalar_t* row = gp + r * s.classes;
        const double glse_r = lp != nullptr ? lp[r] : 0.0;
        if (s.soft) {
          // d/dz of sa * CE(q_a) + sb * CE(q_b): sum_X sX * (S_X * softmax - (1 - eps) q_X - eps/K),
          // S_X = (1 - eps) sum_k q_X + eps (1 for normalized q)
          const scalar_t* ra = qa + r * s.classes;
          const scalar_t* rb = mixed ? qb + r * s.classes : nullptr;
          double sum_a = 0, sum_b = 0;
          for (int64_t c = 0; c < s.classes; ++c) sum_a += ra[c], sum_b += rb != nullptr ? rb[c] : 0.0;
          const double sa = scale_a, sb = scale_b;
          const double coef = sa * ((1.0 - eps) * sum_a + eps) + (mixed ? sb * ((1.0 - eps) * sum_b + eps) : 0.0) + glse_r;
          for (int64_t c = 0; c < s.classes; ++c) {
            const double target = (1.0 - eps) * (sa * ra[c] + (rb != nullptr ? sb * rb[c] : 0.0));
            row[c] = static_cast<scalar_t>(row[c] * coef - uniform * (sa + sb) - target);
          }
          continue;
        }
        const int64_t a = ap[r], bl = bp[r];
        const bool use_a = !ignoring || a != ignore, use_b = mixed && (!ignoring || bl != ignore);
        const double sa = use_a ? scale_a : 0.0, sb = use_b ? scale_b : 0.0;
        // d/dz of sa * CE_a + sb * CE_b + grad_lse * lse = coef * softmax - eps/K * (sa + sb) - (1 - eps) * one-hots
        const double coef = sa + sb + glse_r;
        for (int64_t c = 0; c < s.classes; ++c) row[c] = static_cast<scalar_t>(row[c] * coef - uniform * (sa + sb));
        if (use_a) row[a] -= static_cast<scalar_t>((1.0 - eps) * sa);
        if (use_b) row[bl] -= static_cast<scalar_t>((1.0 - eps) * sb);
      }
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
