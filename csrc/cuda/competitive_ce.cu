// CUDA kernels of cdfast::competitive_ce.
//
// Forward: one kernel launch (after a 4-byte-per-group cudaMemsetAsync of the completion counters).
// Blocks tile (group x network, rows of the batch); a warp computes a row's log-sum-exp in one online pass over K; each block writes a
// partial CE sum; the last block of a group to finish (atomic counter) sums the partials in a
// fixed order (deterministic), writes ce and elects the teacher. Nothing is read on the host.
// Backward: one elementwise launch, softmax minus the (mixed) one-hot target.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

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

int sm_count(int device) {
  static int cache[64] = {0};
  if (device < 64 && cache[device] > 0) return cache[device];
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (device < 64) cache[device] = sms;
  return sms;
}

template <typename acc>
__device__ __forceinline__ acc nan_value() {
  return static_cast<acc>(NAN);
}

template <typename scalar_t, typename acc>
__global__ void competitive_ce_forward_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ ta,
                                              const int64_t* __restrict__ tb, const acc* __restrict__ lam,
                                              acc* __restrict__ ce, int64_t* __restrict__ teacher,
                                              acc* __restrict__ lse, acc* __restrict__ partial,
                                              int* __restrict__ counter, int n, int64_t batch, int64_t k,
                                              int64_t rows_per_block) {
  const int chunk = blockIdx.x, chunks = gridDim.x;
  const int64_t gi = blockIdx.y;  // group * n + network
  const int64_t group = gi / n;
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
      const acc x = static_cast<acc>(row[c]);
      const acc m_new = max(m, x);
      s = s * exp(m - m_new) + exp(x - m_new);
      m = m_new;
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      const acc m_o = __shfl_down_sync(0xffffffff, m, offset);
      const acc s_o = __shfl_down_sync(0xffffffff, s, offset);
      const acc m_new = max(m, m_o);
      s = (m == -INFINITY ? acc(0) : s * exp(m - m_new)) + (m_o == -INFINITY ? acc(0) : s_o * exp(m_o - m_new));
      m = m_new;
    }
    if (lane == 0) {
      const acc l = m + log(s);
      lse[r] = l;
      const int64_t a = ta[r];
      acc v = (a >= 0 && a < k) ? l - static_cast<acc>(row[a]) : nan_value<acc>();
      if (tb != nullptr) {
        const int64_t bb = tb[r];
        const acc vb = (bb >= 0 && bb < k) ? l - static_cast<acc>(row[bb]) : nan_value<acc>();
        v = w * v + (acc(1) - w) * vb;
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

  // The last block of this group to finish reduces the partials and elects the teacher.
  __shared__ bool is_last;
  if (threadIdx.x == 0) {
    __threadfence();
    const int done = atomicAdd(counter + group, 1);
    is_last = (done == n * chunks - 1);
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  if (threadIdx.x < n) {
    const int64_t j = group * n + threadIdx.x;
    const volatile acc* p = partial + j * chunks;
    acc total = 0;
    for (int c = 0; c < chunks; ++c) total += p[c];
    ce[j] = total / static_cast<acc>(batch);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const volatile acc* cg = ce + group * n;
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
                                               const int64_t* __restrict__ tb, const acc* __restrict__ lam,
                                               const acc* __restrict__ grad_ce, const acc* __restrict__ grad_lse,
                                               const acc* __restrict__ lse, scalar_t* __restrict__ grad,
                                               int64_t total, int64_t batch, int64_t k) {
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = idx / k, c = idx - r * k, gi = r / batch;
    const acc scale = grad_ce[gi] / static_cast<acc>(batch);
    const acc soft = scale + (grad_lse != nullptr ? grad_lse[r] : acc(0));
    acc v = soft * exp(static_cast<acc>(logits[idx]) - lse[r]);
    const acc w = lam != nullptr ? lam[gi] : acc(1);
    if (c == ta[r]) v -= scale * w;
    if (tb != nullptr && c == tb[r]) v -= scale * (acc(1) - w);
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
  const auto ta = targets.contiguous();
  const bool mixed = targets_b.has_value();
  const auto tb = mixed ? targets_b->contiguous() : at::Tensor();
  const auto acc_opts = logits.options().dtype(acc_dtype(logits));
  const auto w = mixed ? lam->to(acc_opts).contiguous() : at::Tensor();
  auto ce = at::empty(lead_shape(logits, 2), acc_opts);
  auto teacher = at::empty(lead_shape(logits, 3), logits.options().dtype(at::kLong));
  auto lse = at::empty(lead_shape(logits, 1), acc_opts);

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
        z.const_data_ptr<scalar_t>(), ta.const_data_ptr<int64_t>(), mixed ? tb.const_data_ptr<int64_t>() : nullptr,
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
  const auto ta = targets.contiguous();
  const bool mixed = targets_b.has_value();
  const auto tb = mixed ? targets_b->contiguous() : at::Tensor();
  const auto w = mixed ? lam->to(acc_opts).contiguous() : at::Tensor();
  const auto gce = grad_ce.to(acc_opts).contiguous();
  const bool has_glse = grad_lse.has_value() && grad_lse->defined();
  const auto glse = has_glse ? grad_lse->to(acc_opts).contiguous() : at::Tensor();
  const auto lse_c = lse.to(acc_opts).contiguous();
  auto grad = at::empty_like(z);
  const int64_t total = z.numel();
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 32 * sm_count(logits.get_device()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "competitive_ce_backward_cuda", [&] {
    using acc = typename Acc<scalar_t>::type;
    competitive_ce_backward_kernel<scalar_t, acc><<<blocks, kThreads, 0, stream>>>(
        z.const_data_ptr<scalar_t>(), ta.const_data_ptr<int64_t>(), mixed ? tb.const_data_ptr<int64_t>() : nullptr,
        mixed ? w.const_data_ptr<acc>() : nullptr, gce.const_data_ptr<acc>(),
        has_glse ? glse.const_data_ptr<acc>() : nullptr, lse_c.const_data_ptr<acc>(), grad.mutable_data_ptr<scalar_t>(),
        total, s.batch, s.classes);
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
