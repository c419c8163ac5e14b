// CUDA kernels of cdfast::competitive_ce.
//
// Forward: one kernel launch (after a 4-byte-per-group cudaMemsetAsync of the completion counters;
// a per-call buffer, not a persistent self-resetting one, so calls on concurrent streams never share it).
// Blocks tile (group x network, rows of the batch); a warp computes a row's log-sum-exp in one online
// pass over K; each block writes a partial CE sum; the last block of a group to finish (an acq_rel
// atomic counter) sums the partials in a fixed order (deterministic), writes ce and elects the teacher
// (the lowest finite CE; ties to the lowest index). Nothing is read on the host. A label outside
// [0, K) stops the kernel with a device-side assert, as nll_loss does.
// Backward: one elementwise launch, softmax minus the (mixed) one-hot target.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda/atomic>
#include <cuda_runtime.h>

#include "../competitive_ce.h"

namespace cdfast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// Element strides of a [groups, n, batch] label view: shared labels expanded over the networks
// (stride 0) are read in place, never copied per call.
struct Strides3 {
  int64_t g, n, b;
  __host__ __device__ int64_t at(int64_t group, int64_t net, int64_t row) const { return group * g + net * n + row * b; }
};

Strides3 label_view(const at::Tensor& labels, int64_t groups, int64_t n, int64_t batch, at::Tensor& view) {
  view = labels.reshape({groups, n, batch});  // a view whenever the layout allows it
  return {view.stride(0), view.stride(1), view.stride(2)};
}

int sm_count(int device) {
  static int cache[64] = {0};
  if (device < 64 && cache[device] > 0) return cache[device];
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (device < 64) cache[device] = sms;
  return sms;
}

#ifndef CUDA_KERNEL_ASSERT_MSG  // older torch headers
#define CUDA_KERNEL_ASSERT_MSG(cond, msg) CUDA_KERNEL_ASSERT(cond)
#endif

// One step of an online log-sum-exp: fold (m_o, s_o) into (m, s). A side whose max is -inf holds
// nothing (s = 0); it must not compute exp(-inf - -inf) = NaN.
template <typename acc>
__device__ __forceinline__ void lse_merge(acc& m, acc& s, acc m_o, acc s_o) {
  // fmax ignores a NaN operand; a NaN logit must give a NaN LSE (and a CE never elected)
  const acc m_new = (isnan(m) || isnan(m_o)) ? acc(NAN) : max(m, m_o);
  s = (m == -INFINITY ? acc(0) : s * exp(m - m_new)) + (m_o == -INFINITY ? acc(0) : s_o * exp(m_o - m_new));
  m = m_new;
}

template <typename scalar_t, typename acc>
__global__ void competitive_ce_forward_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ ta,
                                              Strides3 sa, const int64_t* __restrict__ tb, Strides3 sb,
                                              const acc* __restrict__ lam,
                                              acc* __restrict__ ce, int64_t* __restrict__ teacher,
                                              acc* __restrict__ lse, acc* __restrict__ partial,
                                              int* __restrict__ counter, int n, int64_t batch, int64_t k,
                                              int64_t rows_per_block) {
  const int chunk = blockIdx.x, chunks = gridDim.x;
  const int64_t gi = blockIdx.y;  // group * n + network
  const int64_t group = gi / n, net = gi - group * n;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row_begin = chunk * rows_per_block;
  const int64_t row_end = min(batch, row_begin + rows_per_block);
  const acc w = lam != nullptr ? lam[gi] : acc(1);

  acc warp_sum = 0;  // only lane 0's value is used
  for (int64_t b = row_begin + warp; b < row_end; b += kWarps) {
    const int64_t r = gi * batch + b;
    const scalar_t* row = logits + r * k;
    acc m = -INFINITY, s = 0;
    for (int64_t c = lane; c < k; c += 32) {  // online softmax: running max and rescaled sum
      lse_merge(m, s, static_cast<acc>(row[c]), acc(1));
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      const acc m_o = __shfl_down_sync(0xffffffff, m, offset);
      const acc s_o = __shfl_down_sync(0xffffffff, s, offset);
      lse_merge(m, s, m_o, s_o);
    }
    if (lane == 0) {
      const acc l = m + log(s);  // all -inf: -inf, and the CE below is NaN, as torch gives
      lse[r] = l;
      const int64_t a = ta[sa.at(group, net, b)];
      CUDA_KERNEL_ASSERT_MSG(a >= 0 && a < k, "cdfast::competitive_ce: a label in targets lies outside [0, K)");
      acc v = l - static_cast<acc>(row[a]);
      if (tb != nullptr) {
        const int64_t bb = tb[sb.at(group, net, b)];
        CUDA_KERNEL_ASSERT_MSG(bb >= 0 && bb < k, "cdfast::competitive_ce: a label in targets_b lies outside [0, K)");
        v = w * v + (acc(1) - w) * (l - static_cast<acc>(row[bb]));
      }
      warp_sum += v;
    }
  }

  __shared__ acc warp_sums[kWarps];
  if (lane == 0) warp_sums[warp] = warp_sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    acc total = 0;
    for (int i = 0; i < kWarps; ++i) total += warp_sums[i];  // fixed order: deterministic
    partial[gi * chunks + chunk] = total;
  }

  // The last block of this group to finish reduces the partials and elects the teacher. Thread 0
  // wrote this block's partial; its acq_rel increment releases it and, in the last block, acquires
  // every other block's. The barrier and an acquire fence carry that to the block's other threads.
  __shared__ bool is_last;
  if (threadIdx.x == 0) {
    cuda::atomic_ref<int, cuda::thread_scope_device> done_ref(counter[group]);
    const int done = done_ref.fetch_add(1, cuda::memory_order_acq_rel);
    is_last = (done == n * chunks - 1);
  }
  __syncthreads();
  if (!is_last) return;
  cuda::atomic_thread_fence(cuda::memory_order_acquire, cuda::thread_scope_device);
  if (threadIdx.x < n) {
    const int64_t j = group * n + threadIdx.x;
    const acc* p = partial + j * chunks;
    acc total = 0;
    for (int c = 0; c < chunks; ++c) total += p[c];
    ce[j] = total / static_cast<acc>(batch);
  }
  __syncthreads();  // ce of the group, written by this block's threads, is visible to thread 0
  if (threadIdx.x == 0) {
    const acc* cg = ce + group * n;
    int best = 0;
    for (int i = 1; i < n; ++i) {  // first minimum among finite CEs; a NaN/inf CE is never elected
      const acc cur = cg[i], top = cg[best];
      if (isfinite(cur) && (!isfinite(top) || cur < top)) best = i;
    }
    teacher[group] = best;
    counter[group] = 0;
  }
}

template <typename scalar_t, typename acc>
__global__ void competitive_ce_backward_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ ta,
                                               Strides3 sa, const int64_t* __restrict__ tb, Strides3 sb,
                                               const acc* __restrict__ lam, const acc* __restrict__ grad_ce,
                                               int64_t grad_ce_sg, int64_t grad_ce_sn,
                                               const acc* __restrict__ grad_lse, const acc* __restrict__ lse,
                                               scalar_t* __restrict__ grad, int64_t total, int n, int64_t batch,
                                               int64_t k) {
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = idx / k, c = idx - r * k, gi = r / batch, row = r - gi * batch;
    const int64_t group = gi / n, net = gi - group * n;
    const acc scale = grad_ce[group * grad_ce_sg + net * grad_ce_sn] / static_cast<acc>(batch);
    const acc soft = scale + (grad_lse != nullptr ? grad_lse[r] : acc(0));
    acc v = soft * exp(static_cast<acc>(logits[idx]) - lse[r]);
    const acc w = lam != nullptr ? lam[gi] : acc(1);
    if (c == ta[sa.at(group, net, row)]) v -= scale * w;
    if (tb != nullptr && c == tb[sb.at(group, net, row)]) v -= scale * (acc(1) - w);
    grad[idx] = static_cast<scalar_t>(v);
  }
}

at::ScalarType acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> competitive_ce_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                                                   const std::optional<at::Tensor>& targets_b,
                                                                   const std::optional<at::Tensor>& lam) {
  const CeShape s = check_competitive_ce_args(logits, targets, targets_b, lam);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto z = logits.contiguous();
  const bool mixed = targets_b.has_value();
  const auto acc_opts = logits.options().dtype(acc_dtype(logits));
  auto ce = at::empty(lead_shape(logits, 2), acc_opts);
  auto teacher = at::empty(lead_shape(logits, 3), logits.options().dtype(at::kLong));
  auto lse = at::empty(lead_shape(logits, 1), acc_opts);
  if (s.groups == 0) return {ce, teacher, lse};  // empty leading group dims: nothing to launch
  at::Tensor ta, tb;
  const Strides3 sa = label_view(targets, s.groups, s.n, s.batch, ta);
  const Strides3 sb = mixed ? label_view(*targets_b, s.groups, s.n, s.batch, tb) : sa;
  const auto w = mixed ? lam->to(acc_opts).contiguous() : at::Tensor();

  // Enough blocks to fill the GPU; at least one row per warp in a block.
  const int64_t pairs = s.groups * s.n;
  const int64_t target_blocks = 4 * sm_count(logits.get_device());
  const int64_t max_chunks = (s.batch + kWarps - 1) / kWarps;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(max_chunks, (target_blocks + pairs - 1) / pairs));
  const int64_t rows_per_block = (s.batch + chunks - 1) / chunks;
  TORCH_CHECK(pairs <= 65535, "cdfast::competitive_ce: at most 65535 groups x networks per call, got ", pairs);
  TORCH_CHECK(s.n <= kThreads, "cdfast::competitive_ce: at most ", kThreads, " networks per group on CUDA, got ", s.n);
  auto partial = at::empty({pairs * chunks}, acc_opts);
  // Zeroed with a memset (no kernel); the kernel's last block leaves it at zero again.
  auto counter = at::empty({s.groups}, logits.options().dtype(at::kInt));
  C10_CUDA_CHECK(cudaMemsetAsync(counter.data_ptr(), 0, s.groups * sizeof(int), stream));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "competitive_ce_cuda", [&] {
    using acc = typename Acc<scalar_t>::type;
    competitive_ce_forward_kernel<scalar_t, acc><<<dim3(chunks, pairs), kThreads, 0, stream>>>(
        z.const_data_ptr<scalar_t>(), ta.const_data_ptr<int64_t>(), sa,
        mixed ? tb.const_data_ptr<int64_t>() : nullptr, sb,
        mixed ? w.const_data_ptr<acc>() : nullptr, ce.mutable_data_ptr<acc>(), teacher.mutable_data_ptr<int64_t>(),
        lse.mutable_data_ptr<acc>(), partial.mutable_data_ptr<acc>(), counter.mutable_data_ptr<int>(),
        static_cast<int>(s.n), s.batch, s.classes, rows_per_block);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {ce, teacher, lse};
}

at::Tensor competitive_ce_backward_cuda(const at::Tensor& grad_ce, const std::optional<at::Tensor>& grad_lse,
                                        const at::Tensor& logits, const at::Tensor& targets,
                                        const std::optional<at::Tensor>& targets_b,
                                        const std::optional<at::Tensor>& lam, const at::Tensor& lse) {
  const CeShape s = check_competitive_ce_args(logits, targets, targets_b, lam);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto acc_opts = logits.options().dtype(acc_dtype(logits));
  const auto z = logits.contiguous();
  auto grad = at::empty_like(z);
  const int64_t total = z.numel();
  if (total == 0) return grad;  // empty leading group dims: nothing to launch
  const bool mixed = targets_b.has_value();
  at::Tensor ta, tb;
  const Strides3 sa = label_view(targets, s.groups, s.n, s.batch, ta);
  const Strides3 sb = mixed ? label_view(*targets_b, s.groups, s.n, s.batch, tb) : sa;
  const auto w = mixed ? lam->to(acc_opts).contiguous() : at::Tensor();
  // grad_ce is often ones expanded from a scalar (loss.sum()): read through its strides, no copy
  const auto gce = grad_ce.to(acc_opts).reshape({s.groups, s.n});
  const bool has_glse = grad_lse.has_value() && grad_lse->defined();
  const auto glse = has_glse ? grad_lse->to(acc_opts).contiguous() : at::Tensor();
  const auto lse_c = lse.to(acc_opts).contiguous();
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 32 * sm_count(logits.get_device()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "competitive_ce_backward_cuda", [&] {
    using acc = typename Acc<scalar_t>::type;
    competitive_ce_backward_kernel<scalar_t, acc><<<blocks, kThreads, 0, stream>>>(
        z.const_data_ptr<scalar_t>(), ta.const_data_ptr<int64_t>(), sa,
        mixed ? tb.const_data_ptr<int64_t>() : nullptr, sb, mixed ? w.const_data_ptr<acc>() : nullptr,
        gce.const_data_ptr<acc>(), gce.stride(0), gce.stride(1),
        has_glse ? glse.const_data_ptr<acc>() : nullptr, lse_c.const_data_ptr<acc>(), grad.mutable_data_ptr<scalar_t>(),
        total, static_cast<int>(s.n), s.batch, s.classes);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(cdfast, CUDA, m) {
  m.impl("competitive_ce", &competitive_ce_cuda);
  m.impl("competitive_ce_backward", &competitive_ce_backward_cuda);
}

}  // namespace cdfast
