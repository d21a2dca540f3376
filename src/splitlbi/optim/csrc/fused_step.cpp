// The fused SplitLBI step on CPU: one pass over memory for all parameters of a group.
//
// Registered as torch.ops.splitlbi.fused_step_ (see splitlbi/optim/_cpu_kernel.py, which
// compiles this file on first use). Per element, with alpha = lr:
//
//   d   = grad + wd * W                                  (weight decay, as torch.optim.SGD)
//   buf = m * buf + (1 - dampening) * d    (buf = d on a buffer's first step)
//   g   = d + m * buf (Nesterov) or buf    (g = d without momentum)
//   Gamma = kappa * factor[row] * V  (group/neuron) or kappa * softshrink(V, lam)  (l1)
//   c   = W - Gamma                   (the coupling, from the old W and V)
//   V  += (lr / nu) * c
//   W  -= kappa * lr * (g + c / nu)   (W -= kappa * lr * g for penalty "none")
//
// For group penalties, factor[row] = max(0, 1 - lam / ||V_old[row]||). The norms of the
// new V are computed while its row is still in L1 and written back into the same norms
// buffer, so the next step reads V only once. A buffer flagged stale (first step, or V
// changed outside the step) gets its norms from V first, with the same summation order:
// a step from recomputed norms equals a step from kept norms bit for bit.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kKindNone = 0, kKindGroup = 1, kKindL1 = 2;
constexpr int64_t kFlagFresh = 4, kFlagStaleNorms = 8;
constexpr int64_t kChunk = 16384;  // elements of one work item of an ungrouped tensor

// Euclidean norm of n floats in a fixed order (8 partial sums, then a fixed tree), so
// the result does not depend on the address of the data or on how the loop vectorises.
inline float row_norm(const float* v, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) acc[k] += v[i + k] * v[i + k];
  }
  for (int k = 0; i < n; ++i, ++k) acc[k] += v[i] * v[i];
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  return std::sqrt(s);
}

struct Hyper {
  float lr, kappa, nu, lam, momentum, dampening, weight_decay;
  bool nesterov;
};

// Momentum modes: 0 none, 1 momentum, 2 Nesterov, 3/4 the same on a buffer's first step.
template <int64_t KIND, int MODE, bool WD>
void update_range(float* __restrict w, const float* __restrict grad, float* __restrict buf,
                  float* __restrict v, int64_t n, float neg_kappa_factor, const Hyper& h) {
  const float m = h.momentum, keep = 1.0f - h.dampening, wd = h.weight_decay;
  const float step = h.kappa * h.lr, v_step = h.lr / h.nu, inv_nu = 1.0f / h.nu;
  const float kappa = h.kappa, lam = h.lam;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float wi = w[i];
    const float d = WD ? grad[i] + wd * wi : grad[i];
    float g = d;
    if (MODE != 0) {
      const float b = (MODE >= 3) ? d : buf[i] * m + keep * d;
      buf[i] = b;
      g = (MODE == 2 || MODE == 4) ? d + m * b : b;
    }
    if (KIND == kKindNone) {
      w[i] = wi - step * g;
    } else {
      const float vi = v[i];
      float c;
      if (KIND == kKindGroup) {
        c = wi + vi * neg_kappa_factor;
      } else {
        const float shrunk = vi > lam ? vi - lam : (vi < -lam ? vi + lam : 0.0f);
        c = wi - kappa * shrunk;
      }
      v[i] = vi + v_step * c;
      w[i] = wi - step * (g + c * inv_nu);
    }
  }
}

struct Item {
  int64_t tensor, begin, end;  // element range; whole rows for grouped tensors
};

struct TensorArgs {
  float* w;
  const float* grad;
  float* buf;
  float* v;
  float* norms;
  int64_t kind, row, flags;
};

template <int64_t KIND, int MODE>
void dispatch_wd(const TensorArgs& t, int64_t begin, int64_t n, float f, const Hyper& h) {
  if (h.weight_decay != 0.0f)
    update_range<KIND, MODE, true>(t.w + begin, t.grad + begin, t.buf ? t.buf + begin : nullptr,
                                   t.v ? t.v + begin : nullptr, n, f, h);
  else
    update_range<KIND, MODE, false>(t.w + begin, t.grad + begin, t.buf ? t.buf + begin : nullptr,
                                    t.v ? t.v + begin : nullptr, n, f, h);
}

template <int64_t KIND>
void dispatch_mode(const TensorArgs& t, int64_t begin, int64_t n, float f, const Hyper& h) {
  int mode = 0;
  if (t.buf != nullptr) mode = (h.nesterov ? 2 : 1) + ((t.flags & kFlagFresh) ? 2 : 0);
  switch (mode) {
    case 0: dispatch_wd<KIND, 0>(t, begin, n, f, h); break;
    case 1: dispatch_wd<KIND, 1>(t, begin, n, f, h); break;
    case 2: dispatch_wd<KIND, 2>(t, begin, n, f, h); break;
    case 3: dispatch_wd<KIND, 3>(t, begin, n, f, h); break;
    default: dispatch_wd<KIND, 4>(t, begin, n, f, h); break;
  }
}

void run_item(const TensorArgs& t, const Item& item, const Hyper& h) {
  if (t.kind == kKindGroup) {
    const float tiny = std::numeric_limits<float>::min();
    for (int64_t start = item.begin; start < item.end; start += t.row) {
      const int64_t r = start / t.row;
      float* v_row = t.v + start;
      const float norm = (t.flags & kFlagStaleNorms) ? row_norm(v_row, t.row) : t.norms[r];
      const float factor = std::max(0.0f, 1.0f - h.lam / std::max(norm, tiny));
      dispatch_mode<kKindGroup>(t, start, t.row, -h.kappa * factor, h);
      t.norms[r] = row_norm(v_row, t.row);  // the new V's row, still in L1
    }
  } else if (t.kind == kKindL1) {
    dispatch_mode<kKindL1>(t, item.begin, item.end - item.begin, 0.0f, h);
  } else {
    dispatch_mode<kKindNone>(t, item.begin, item.end - item.begin, 0.0f, h);
  }
}

// The kernel walks each tensor's memory as one flat array, so W, grad, buf and V must be
// dense and laid out alike (any memory format: channels-last weights qualify).
void check_layout(const at::Tensor& t, const char* what, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat,
              "splitlbi::fused_step_: ", what, " must be float32 CPU tensors");
  TORCH_CHECK(t.sizes() == like.sizes() && t.strides() == like.strides() && t.is_non_overlapping_and_dense(),
              "splitlbi::fused_step_: ", what, " must be dense and laid out like the parameter");
}

void fused_step(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::TensorList vs,
                at::TensorList norms, at::IntArrayRef flags, double lr, double kappa, double nu, double lam,
                double momentum, double dampening, bool nesterov, double weight_decay) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(flags.size()) == n,
              "splitlbi::fused_step_: params, grads and flags must have one entry per parameter");
  TORCH_CHECK(bufs.empty() || static_cast<int64_t>(bufs.size()) == n,
              "splitlbi::fused_step_: bufs must be empty (no momentum) or one per parameter");
  const Hyper h{static_cast<float>(lr), static_cast<float>(kappa), static_cast<float>(nu),
                static_cast<float>(lam), static_cast<float>(momentum), static_cast<float>(dampening),
                static_cast<float>(weight_decay), nesterov};

  std::vector<TensorArgs> args(n);
  std::vector<Item> items;
  std::vector<int64_t> ends;  // cumulative element count after each item
  int64_t total = 0, next_v = 0, next_norms = 0;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_layout(p, "params", p);
    check_layout(grads[i], "grads", p);
    TensorArgs& t = args[i];
    t.w = p.data_ptr<float>();
    t.grad = grads[i].data_ptr<float>();
    t.buf = nullptr;
    if (!bufs.empty()) {
      check_layout(bufs[i], "bufs", p);
      t.buf = bufs[i].data_ptr<float>();
    }
    t.kind = flags[i] & 3;
    t.flags = flags[i];
    t.v = nullptr;
    t.norms = nullptr;
    t.row = 1;
    const int64_t numel = p.numel();
    if (t.kind != kKindNone) {
      TORCH_CHECK(next_v < static_cast<int64_t>(vs.size()), "splitlbi::fused_step_: too few vs");
      check_layout(vs[next_v], "vs", p);
      t.v = vs[next_v++].data_ptr<float>();
    }
    if (t.kind == kKindGroup) {
      TORCH_CHECK(next_norms < static_cast<int64_t>(norms.size()), "splitlbi::fused_step_: too few norms");
      const at::Tensor& nt = norms[next_norms++];
      TORCH_CHECK(nt.scalar_type() == at::kFloat && nt.is_contiguous() && nt.numel() == p.size(0),
                  "splitlbi::fused_step_: norms must be contiguous float32 with one entry per row");
      t.norms = nt.data_ptr<float>();
      t.row = numel / std::max<int64_t>(p.size(0), 1);
      // each output filter must be one block of memory (true of contiguous and channels-last)
      TORCH_CHECK(p.size(0) <= 1 || p.stride(0) == t.row,
                  "splitlbi::fused_step_: a grouped parameter's filters must be contiguous blocks");
    }
    if (numel == 0) continue;
    // work items: whole rows for grouped tensors, chunks of kChunk elements otherwise
    const int64_t step = t.kind == kKindGroup ? std::max<int64_t>(1, kChunk / t.row) * t.row : kChunk;
    for (int64_t b = 0; b < numel; b += step) {
      items.push_back({i, b, std::min(numel, b + step)});
      total += items.back().end - items.back().begin;
      ends.push_back(total);
    }
  }
  TORCH_CHECK(next_v == static_cast<int64_t>(vs.size()) && next_norms == static_cast<int64_t>(norms.size()),
              "splitlbi::fused_step_: vs/norms do not match the penalties in flags");
  if (items.empty()) return;

  // Split the items between threads by element count (static: the work is uniform).
  const int64_t threads = total < 2 * kChunk ? 1 : std::min<int64_t>(at::get_num_threads(), items.size());
  auto first_item = [&](int64_t t) -> int64_t {
    if (t >= threads) return static_cast<int64_t>(items.size());
    const int64_t target = total * t / threads;  // items whose start lies at or after target
    return std::upper_bound(ends.begin(), ends.end(), target) - ends.begin();
  };
  auto work = [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t k = first_item(t), stop = first_item(t + 1); k < stop; ++k)
        run_item(args[items[k].tensor], items[k], h);
  };
  if (threads == 1)
    work(0, 1);
  else
    at::parallel_for(0, threads, 1, work);
}

}  // namespace

TORCH_LIBRARY(splitlbi, m) {
  m.def(
      "fused_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] bufs, Tensor(c!)[] vs, "
      "Tensor(d!)[] norms, int[] flags, float lr, float kappa, float nu, float lam, float momentum, "
      "float dampening, bool nesterov, float weight_decay) -> ()");
}

TORCH_LIBRARY_IMPL(splitlbi, CPU, m) { m.impl("fused_step_", &fused_step); }
