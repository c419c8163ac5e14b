// CUDA kernels of cdfast::competitive_ce.
//
// Forward: one kernel launch. Its completion counters are a persistent buffer per (device, stream)
// that the kernel leaves at zero (no memset per call); under CUDA graph capture, a per-call buffer
// and a captured memset instead (see completion_counters).
// Blocks tile (group x network, rows of the batch); a warp computes a row's log-sum-exp in one online
// pass over K; each block writes a partial CE sum; the last block of a group to finish (an acq_rel
// atomic counter) sums the partials in a fixed order (deterministic), writes ce and elects the teacher
// (the lowest finite CE; ties to the lowest index). Nothing is read on the host. A label outside
// [0, K) stops the kernel with a device-side assert, as nll_loss does (an ignored label is not read).
// label_smoothing eps: a row's CE is (1 - eps) * (lse - z_t) + eps * (lse - mean_k z_k); with
// ignore_index, each label set's CE is the mean over its kept rows (none kept: 0 / 0 = NaN).
// Class probabilities (targets [*G, N, B, K], e.g. torchvision's MixUp) take a second pass over each
// row for sum_k q_k (lse - z_k); smoothing and mixing as above; ignore_index does not apply.
// Backward: one elementwise launch, softmax minus the (mixed, smoothed) one-hot or probability target.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda/atomic>
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <utility>

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

// Element strides of a [groups, n, batch, k] class-probability view (shared probabilities are
// expanded over the networks: stride 0, read in place when already in the accumulation dtype).
struct Strides4 {
  int64_t g, n, b, k;
  __host__ __device__ int64_t at(int64_t group, int64_t net, int64_t row, int64_t c) const {
    return group * g + net * n + row * b + c * k;
  }
};

Strides4 prob_view(const at::Tensor& probs, const CeShape& s, at::ScalarType acc, at::Tensor& view) {
  view = probs.to(acc).reshape({s.groups, s.n, s.batch, s.classes});
  return {view.stride(0), view.stride(1), view.stride(2), view.stride(3)};
}

int sm_count(int device) {
  static int cache[64] = {0};
  if (device < 64 && cache[device] > 0) return cache[device];
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (device < 64) cache[device] = sms;
  return sms;
}

// The forward kernel's completion counters (one int per group), all zero when the kernel starts.
// Eager calls share a persistent buffer per (device, stream) that every launch leaves at zero
// (its last block resets each counter): kernels on one stream run in order, so two launches never
// use it at once, and no memset is issued per call. The buffer holds the most groups a call can
// have, is allocated once outside PyTorch's caching allocator (so no graph pool of torch.compile's
// CUDA graphs can take it, and nothing ever frees or moves it) and is never freed. Under graph
// capture, a per-call buffer zeroed by a captured memset instead: a graph must not depend on memory
// that eager calls also write. Streams are told apart by handle: a stream destroyed and another
// created with the same handle share a buffer, which is safe, as the old stream's work is done.
// A launch that aborts (a device assert) leaves its counters wrong, but such an error ends the
// CUDA context anyway.
constexpr int64_t kMaxGroups = 65535 / 2;  // groups x networks <= 65535 (the grid's y limit), N >= 2

int* completion_counters(const at::Tensor& like, int64_t groups, cudaStream_t stream, at::Tensor& per_call) {
  TORCH_INTERNAL_ASSERT(groups <= kMaxGroups);
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    per_call = at::empty({groups}, like.options().dtype(at::kInt));
    C10_CUDA_CHECK(cudaMemsetAsync(per_call.data_ptr(), 0, groups * sizeof(int), stream));
    return per_call.data_ptr<int>();
  }
  static std::mutex mutex;
  static auto* buffers = new std::map<std::pair<int, cudaStream_t>, int*>();  // never destroyed, like the buffers
  const std::lock_guard<std::mutex> lock(mutex);
  int*& buffer = (*buffers)[{like.get_device(), stream}];
  if (buffer == nullptr) {
    void* ptr = nullptr;
    if (cudaMallocAsync(&ptr, kMaxGroups * sizeof(int), stream) != cudaSuccess) {
      (void)cudaGetLastError();  // no stream-ordered allocator on this device or driver: a plain one
      C10_CUDA_CHECK(cudaMalloc(&ptr, kMaxGroups * sizeof(int)));
    }
    C10_CUDA_CHECK(cudaMemsetAsync(ptr, 0, kMaxGroups * sizeof(int), stream));  // before this call's launch
    buffer = static_cast<int*>(ptr);
  }
  return buffer;
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

// SOFT: targets are class probabilities qa/qb (ta/tb unused); else class indices ta/tb (qa/qb unused).
template <typename scalar_t, typename acc, bool SOFT>
__global__ void competitive_ce_forward_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ ta,
                                              Strides3 sa, const int64_t* __restrict__ tb, Strides3 sb,
                                              const acc* __restrict__ qa, Strides4 sqa,
                                              const acc* __restrict__ qb, Strides4 sqb,
                                              const acc* __restrict__ lam,
                                              acc* __restrict__ ce, int64_t* __restrict__ teacher,
                                              acc* __restrict__ lse, acc* __restrict__ partial,
                                              int* __restrict__ counter, int n, int64_t batch, int64_t k,
                                              int64_t rows_per_block, acc eps, bool ignoring, int64_t ignore) {
  const int chunk = blockIdx.x, chunks = gridDim.x;
  const int64_t gi = blockIdx.y;  // group * n + network
  const int64_t group = gi / n, net = gi - group * n;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row_begin = chunk * rows_per_block;
  const int64_t row_end = min(batch, row_begin + rows_per_block);
  const bool smooth = eps != acc(0);

  // Per label set (a, b): the sum of the kept rows' CEs and their count. Only lane 0's are used.
  acc sum_a = 0, sum_b = 0, kept_a = 0, kept_b = 0;
  for (int64_t b = row_begin + warp; b < row_end; b += kWarps) {
    const int64_t r = gi * batch + b;
    const scalar_t* row = logits + r * k;
    acc m = -INFINITY, s = 0, zsum = 0;
    for (int64_t c = lane; c < k; c += 32) {  // online softmax: running max and rescaled sum
      const acc zc = static_cast<acc>(row[c]);
      lse_merge(m, s, zc, acc(1));
      if (smooth) zsum += zc;
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      const acc m_o = __shfl_down_sync(0xffffffff, m, offset);
      const acc s_o = __shfl_down_sync(0xffffffff, s, offset);
      lse_merge(m, s, m_o, s_o);
      if (smooth) zsum += __shfl_down_sync(0xffffffff, zsum, offset);
    }
    // Class probabilities: a second pass over the row (now in cache) for sum_k q'_k (lse - z_k) with the
    // smoothed target q' = (1 - eps) q + eps/K, as the reference (a masked class with q = 0 gives
    // +inf when eps > 0 and NaN when eps = 0, as torch); no cancellation, unlike lse * sum q' - q'.z.
    // Lane 0 holds the row's lse: every lane gets it.
    acc soft_a = 0, soft_b = 0;
    if constexpr (SOFT) {
      const acc l_row = __shfl_sync(0xffffffff, m + log(s), 0);
      const acc keep = acc(1) - eps, spread = eps / static_cast<acc>(k);
      for (int64_t c = lane; c < k; c += 32) {
        const acc gap = l_row - static_cast<acc>(row[c]);  // -log p_c
        soft_a += (keep * qa[sqa.at(group, net, b, c)] + spread) * gap;
        if (qb != nullptr) soft_b += (keep * qb[sqb.at(group, net, b, c)] + spread) * gap;
      }
      for (int offset = 16; offset > 0; offset >>= 1) {
        soft_a += __shfl_down_sync(0xffffffff, soft_a, offset);
        soft_b += __shfl_down_sync(0xffffffff, soft_b, offset);
      }
    }
    if (lane == 0) {
      const acc l = m + log(s);  // all -inf: -inf, and the CE below is NaN, as torch gives
      lse[r] = l;
      // eps = 0: exactly l - z_t (no eps * inf = NaN from masked classes)
      const acc uniform = smooth ? eps * (l - zsum / static_cast<acc>(k)) : acc(0);
      const acc one_hot = acc(1) - eps;
      if constexpr (SOFT) {  // smoothing is inside the soft sums
        sum_a += soft_a;
        kept_a += acc(1);
        if (qb != nullptr) {
          sum_b += soft_b;
          kept_b += acc(1);
        }
      } else {
        const int64_t a = ta[sa.at(group, net, b)];
        if (!ignoring || a != ignore) {
          CUDA_KERNEL_ASSERT_MSG(a >= 0 && a < k, "cdfast::competitive_ce: a label in targets lies outside [0, K)");
          sum_a += one_hot * (l - static_cast<acc>(row[a])) + uniform;
          kept_a += acc(1);
        }
        if (tb != nullptr) {
          const int64_t bb = tb[sb.at(group, net, b)];
          if (!ignoring || bb != ignore) {
            CUDA_KERNEL_ASSERT_MSG(bb >= 0 && bb < k, "cdfast::competitive_ce: a label in targets_b lies outside [0, K)");
            sum_b += one_hot * (l - static_cast<acc>(row[bb])) + uniform;
            kept_b += acc(1);
          }
        }
      }
    }
  }

  __shared__ acc warp_sums[kWarps][4];
  if (lane == 0) {
    warp_sums[warp][0] = sum_a;
    warp_sums[warp][1] = sum_b;
    warp_sums[warp][2] = kept_a;
    warp_sums[warp][3] = kept_b;
  }
  __syncthreads();
  if (threadIdx.x < 4) {  // one thread per quantity, warps summed in a fixed order: deterministic
    acc total = 0;
    for (int i = 0; i < kWarps; ++i) total += warp_sums[i][threadIdx.x];
    partial[(gi * chunks + chunk) * 4 + threadIdx.x] = total;
    // each writer publishes its own partial at device scope (the threadfence-reduction pattern)
    cuda::atomic_thread_fence(cuda::memory_order_release, cuda::thread_scope_device);
  }

  // The last block of this group to finish reduces the partials and elects the teacher. Threads
  // 0-3 wrote and fenced this block's partials; the barrier orders that before thread 0's acq_rel
  // increment, which in the last block acquires every other block's. The barrier and an acquire
  // fence carry that to the block's other threads.
  __syncthreads();
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
    const acc* p = partial + j * chunks * 4;
    acc t[4] = {0, 0, 0, 0};
    for (int c = 0; c < chunks; ++c) {
      for (int q = 0; q < 4; ++q) t[q] += p[c * 4 + q];
    }
    const acc ce_a = t[0] / t[2];  // every label ignored: 0 / 0 = NaN, as F.cross_entropy
    if (lam != nullptr) {
      const acc w = lam[j];
      ce[j] = w * ce_a + (acc(1) - w) * (t[1] / t[3]);
    } else {
      ce[j] = ce_a;
    }
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

template <typename scalar_t, typename acc, bool SOFT>
__global__ void competitive_ce_backward_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ ta,
                                               Strides3 sa, const int64_t* __restrict__ tb, Strides3 sb,
                                               const acc* __restrict__ qa, Strides4 sqa,
                                               const acc* __restrict__ qb, Strides4 sqb,
                                               const acc* __restrict__ qsum_a, const acc* __restrict__ qsum_b,
                                               const acc* __restrict__ lam, const acc* __restrict__ grad_ce,
                                               int64_t grad_ce_sg, int64_t grad_ce_sn,
                                               const acc* __restrict__ grad_lse, const acc* __restrict__ lse,
                                               scalar_t* __restrict__ grad, int64_t total, int n, int64_t batch,
                                               int64_t k, acc eps, bool ignoring, int64_t ignore,
                                               const acc* __restrict__ kept_a, const acc* __restrict__ kept_b) {
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = idx / k, c = idx - r * k, gi = r / batch, row = r - gi * batch;
    const int64_t group = gi / n, net = gi - group * n;
    const acc g = grad_ce[group * grad_ce_sg + net * grad_ce_sn];
    const acc w = lam != nullptr ? lam[gi] : acc(1);
    if constexpr (SOFT) {
      // d/dz of sX * CE(q_X) summed over the sets: sX * (S_X * softmax - (1 - eps) q_X - eps/K), where
      // S_X = (1 - eps) sum_k q_X + eps (1 for normalized q); every row is kept
      const acc p = exp(static_cast<acc>(logits[idx]) - lse[r]);
      const acc one_hot = acc(1) - eps, uniform = eps / static_cast<acc>(k);
      const acc scale_a = g * w / static_cast<acc>(batch);
      acc v = (grad_lse != nullptr ? grad_lse[r] : acc(0)) * p +
              scale_a * ((one_hot * qsum_a[r] + eps) * p - one_hot * qa[sqa.at(group, net, row, c)] - uniform);
      if (qb != nullptr) {
        const acc scale_b = g * (acc(1) - w) / static_cast<acc>(batch);
        v += scale_b * ((one_hot * qsum_b[r] + eps) * p - one_hot * qb[sqb.at(group, net, row, c)] - uniform);
      }
      grad[idx] = static_cast<scalar_t>(v);
    } else {
      // d ce / d row-CE of each label set: its weight over its kept rows; 0 on an ignored row (the
      // count is then never divided by, so no 0 / 0 either)
      const int64_t a = ta[sa.at(group, net, row)];
      const bool use_a = !ignoring || a != ignore;
      const acc scale_a = use_a ? g * w / (kept_a != nullptr ? kept_a[gi] : static_cast<acc>(batch)) : acc(0);
      int64_t bb = -1;
      bool use_b = false;
      acc scale_b = 0;
      if (tb != nullptr) {
        bb = tb[sb.at(group, net, row)];
        use_b = !ignoring || bb != ignore;
        if (use_b) scale_b = g * (acc(1) - w) / (kept_b != nullptr ? kept_b[gi] : static_cast<acc>(batch));
      }
      const acc soft = scale_a + scale_b + (grad_lse != nullptr ? grad_lse[r] : acc(0));
      acc v = soft * exp(static_cast<acc>(logits[idx]) - lse[r]);
      if (eps != acc(0)) v -= eps / static_cast<acc>(k) * (scale_a + scale_b);
      if (use_a && c == a) v -= (acc(1) - eps) * scale_a;
      if (use_b && c == bb) v -= (acc(1) - eps) * scale_b;
      grad[idx] = static_cast<scalar_t>(v);
    }
  }
}

at::ScalarType acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> competitive_ce_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                                                   const std::optional<at::Tensor>& targets_b,
                                                                   const std::optional<at::Tensor>& lam,
                                                                   double label_smoothing,
                                                                   std::optional<int64_t> ignore_index) {
  const CeShape s = check_competitive_ce_args(logits, targets, targets_b, lam);
  check_options(s, label_smoothing, ignore_index);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto z = logits.contiguous();
  const bool mixed = targets_b.has_value();
  const auto acc_opts = logits.options().dtype(acc_dtype(logits));
  auto ce = at::empty(lead_shape(logits, 2), acc_opts);
  auto teacher = at::empty(lead_shape(logits, 3), logits.options().dtype(at::kLong));
  auto lse = at::empty(lead_shape(logits, 1), acc_opts);
  if (s.groups == 0) return {ce, teacher, lse};  // empty leading group dims: nothing to launch
  // class indices (ta, tb) or class probabilities in the accumulation dtype (qa, qb)
  at::Tensor ta, tb, qa, qb;
  Strides3 sa{}, sb{};
  Strides4 sqa{}, sqb{};
  if (s.soft) {
    sqa = prob_view(targets, s, acc_dtype(logits), qa);
    if (mixed) sqb = prob_view(*targets_b, s, acc_dtype(logits), qb);
  } else {
    sa = label_view(targets, s.groups, s.n, s.batch, ta);
    sb = mixed ? label_view(*targets_b, s.groups, s.n, s.batch, tb) : sa;
  }
  const auto w = mixed ? lam->to(acc_opts).contiguous() : at::Tensor();

  // Enough blocks to fill the GPU; at least one row per warp in a block.
  const int64_t pairs = s.groups * s.n;
  const int64_t target_blocks = 4 * sm_count(logits.get_device());
  const int64_t max_chunks = (s.batch + kWarps - 1) / kWarps;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(max_chunks, (target_blocks + pairs - 1) / pairs));
  const int64_t rows_per_block = (s.batch + chunks - 1) / chunks;
  TORCH_CHECK(pairs <= 65535, "cdfast::competitive_ce: at most 65535 groups x networks per call, got ", pairs);
  TORCH_CHECK(s.n <= kThreads, "cdfast::competitive_ce: at most ", kThreads, " networks per group on CUDA, got ", s.n);
  auto partial = at::empty({pairs * chunks * 4}, acc_opts);  // kept rows' CE sums and counts, sets a and b
  at::Tensor per_call_counter;
  int* counter = completion_counters(logits, s.groups, stream, per_call_counter);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "competitive_ce_cuda", [&] {
    using acc = typename Acc<scalar_t>::type;
    auto kernel = s.soft ? competitive_ce_forward_kernel<scalar_t, acc, true>
                         : competitive_ce_forward_kernel<scalar_t, acc, false>;
    kernel<<<dim3(chunks, pairs), kThreads, 0, stream>>>(
        z.const_data_ptr<scalar_t>(), s.soft ? nullptr : ta.const_data_ptr<int64_t>(), sa,
        !s.soft && mixed ? tb.const_data_ptr<int64_t>() : nullptr, sb,
        s.soft ? qa.const_data_ptr<acc>() : nullptr, sqa, s.soft && mixed ? qb.const_data_ptr<acc>() : nullptr, sqb,
        mixed ? w.const_data_ptr<acc>() : nullptr, ce.mutable_data_ptr<acc>(), teacher.mutable_data_ptr<int64_t>(),
        lse.mutable_data_ptr<acc>(), partial.mutable_data_ptr<acc>(), counter,
        static_cast<int>(s.n), s.batch, s.classes, rows_per_block, static_cast<acc>(label_smoothing),
        ignore_index.has_value(), ignore_index.value_or(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {ce, teacher, lse};
}

at::Tensor competitive_ce_backward_cuda(const at::Tensor& grad_ce, const std::optional<at::Tensor>& grad_lse,
                                        const at::Tensor& logits, const at::Tensor& targets,
                                        const std::optional<at::Tensor>& targets_b,
                                        const std::optional<at::Tensor>& lam, const at::Tensor& lse,
                                        double label_smoothing, std::optional<int64_t> ignore_index) {
  const CeShape s = check_competitive_ce_args(logits, targets, targets_b, lam);
  check_options(s, label_smoothing, ignore_index);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto acc_opts = logits.options().dtype(acc_dtype(logits));
  const auto z = logits.contiguous();
  auto grad = at::empty_like(z);
  const int64_t total = z.numel();
  if (total == 0) return grad;  // empty leading group dims: nothing to launch
  const bool mixed = targets_b.has_value();
  at::Tensor ta, tb, qa, qb, qsum_a, qsum_b;
  Strides3 sa{}, sb{};
  Strides4 sqa{}, sqb{};
  if (s.soft) {  // and each row's probability mass (1 for normalized targets), [groups, n, batch]
    sqa = prob_view(targets, s, acc_dtype(logits), qa);
    qsum_a = qa.sum(-1).contiguous();
    if (mixed) {
      sqb = prob_view(*targets_b, s, acc_dtype(logits), qb);
      qsum_b = qb.sum(-1).contiguous();
    }
  } else {
    sa = label_view(targets, s.groups, s.n, s.batch, ta);
    sb = mixed ? label_view(*targets_b, s.groups, s.n, s.batch, tb) : sa;
  }
  const auto w = mixed ? lam->to(acc_opts).contiguous() : at::Tensor();
  // grad_ce is often ones expanded from a scalar (loss.sum()): read through its strides, no copy
  const auto gce = grad_ce.to(acc_opts).reshape({s.groups, s.n});
  const bool has_glse = grad_lse.has_value() && grad_lse->defined();
  const auto glse = has_glse ? grad_lse->to(acc_opts).contiguous() : at::Tensor();
  const auto lse_c = lse.to(acc_opts).contiguous();
  // kept rows per (group, network) and label set: only with ignore_index (else the batch size)
  const bool ignoring = ignore_index.has_value();
  const auto kept_a = ignoring ? ta.ne(*ignore_index).sum(-1).to(acc_opts).contiguous() : at::Tensor();  // (indices)
  const auto kept_b = ignoring && mixed ? tb.ne(*ignore_index).sum(-1).to(acc_opts).contiguous() : at::Tensor();
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 32 * sm_count(logits.get_device()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "competitive_ce_backward_cuda", [&] {
    using acc = typename Acc<scalar_t>::type;
    auto kernel = s.soft ? competitive_ce_backward_kernel<scalar_t, acc, true>
                         : competitive_ce_backward_kernel<scalar_t, acc, false>;
    kernel<<<blocks, kThreads, 0, stream>>>(
        z.const_data_ptr<scalar_t>(), s.soft ? nullptr : ta.const_data_ptr<int64_t>(), sa,
        !s.soft && mixed ? tb.const_data_ptr<int64_t>() : nullptr, sb,
        s.soft ? qa.const_data_ptr<acc>() : nullptr, sqa, s.soft && mixed ? qb.const_data_ptr<acc>() : nullptr, sqb,
        s.soft ? qsum_a.const_data_ptr<acc>() : nullptr, s.soft && mixed ? qsum_b.const_data_ptr<acc>() : nullptr,
        mixed ? w.const_data_ptr<acc>() : nullptr,
        gce.const_data_ptr<acc>(), gce.stride(0), gce.stride(1),
        has_glse ? glse.const_data_ptr<acc>() : nullptr, lse_c.const_data_ptr<acc>(), grad.mutable_data_ptr<scalar_t>(),
        total, static_cast<int>(s.n), s.batch, s.classes, static_cast<acc>(label_smoothing), ignoring,
        ignore_index.value_or(0), ignoring ? kept_a.const_data_ptr<acc>() : nullptr,
        ignoring && mixed ? kept_b.const_data_ptr<acc>() : nullptr);
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
