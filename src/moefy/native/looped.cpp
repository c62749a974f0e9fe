// The looped MoE kernel (moefy.moe.layer.MoEFFN._looped) in one native call, for CPU inference in
// float32 or bfloat16.
//
// Same algorithm as the Python loop: blocks of tokens, and in each block one expert at a time, its
// tokens' rows gathered, two matmuls, the result added back into the output rows; an expert that at
// least `masked_share` of the block's tokens picked is computed for every token and masked instead.
// What the native call saves is what surrounds the matmuls: a Python-level op costs microseconds of
// dispatch per expert and block, and index_select / index_add_ pass through generic indexing code,
// where here the gather is a memcpy per row and the scatter-add a loop the compiler vectorises, on
// blocks small enough that the gathered rows and the output stay in the core's cache. With gates
// (softmax-gated layers), each pick's output is scaled by its gate, as the Python loop scales it.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

enum Activation : int64_t { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3 };

void activate_(at::Tensor& t, int64_t act) {
  switch (act) {
    case kRelu: t.relu_(); break;
    case kGelu: at::gelu_(t, "none"); break;
    case kGeluTanh: at::gelu_(t, "tanh"); break;
    case kSilu: at::silu_(t); break;
    default: TORCH_CHECK(false, "unknown activation code ", act);
  }
}

// x @ w (+ bias) into out.
void project(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  if (bias.has_value()) {
    at::addmm_out(out, *bias, x, w);
  } else {
    at::mm_out(out, x, w);
  }
}

template <typename scalar_t>
void gather_rows(scalar_t* dst, const scalar_t* src, int64_t src_stride, const std::vector<int64_t>& rows, int64_t width) {
  for (size_t i = 0; i < rows.size(); ++i) {
    std::memcpy(dst + i * width, src + rows[i] * src_stride, width * sizeof(scalar_t));
  }
}

// bfloat16 adds in float and rounds each sum to bfloat16, as index_add_ does.
template <typename scalar_t>
void scatter_add_rows(scalar_t* dst, const scalar_t* src, const std::vector<int64_t>& rows, int64_t width) {
  for (size_t i = 0; i < rows.size(); ++i) {
    scalar_t* __restrict__ to = dst + rows[i] * width;
    const scalar_t* __restrict__ from = src + i * width;
    for (int64_t j = 0; j < width; ++j) to[j] += from[j];
  }
}

}  // namespace

// out [T, d_out] (holding the output bias or zeros) += the picked experts' outputs, in place.
// x [T, d]; picked [T, E] bool; w_in, w_gate [d, E*s]; b_in, b_gate [E, s]; w_out [E*s, d_out];
// h [T, E*s]: every neuron's activation when the router computed them (then x and the input
// projections are not read, and h is overwritten); gates [T, E] float32: each pick's weight (0 where
// not picked), or none (every pick weighs 1). Every floating tensor in one dtype, float32 or bfloat16.
template <typename scalar_t>
void looped_typed(const at::Tensor& x, const at::Tensor& picked, const at::Tensor& w_in, const c10::optional<at::Tensor>& b_in,
            const c10::optional<at::Tensor>& w_gate, const c10::optional<at::Tensor>& b_gate, const at::Tensor& w_out,
            at::Tensor& out, const c10::optional<at::Tensor>& h, int64_t num_experts, int64_t act, int64_t block,
            double masked_share, const c10::optional<at::Tensor>& gates) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x: contiguous [T, d] on CPU");
  TORCH_CHECK(w_in.scalar_type() == x.scalar_type() && w_out.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type(),
              "x, weights and out: one dtype");
  TORCH_CHECK(picked.scalar_type() == at::kBool && picked.is_contiguous(), "picked: contiguous bool [T, E]");
  TORCH_CHECK(out.is_contiguous() && w_out.is_contiguous() && w_in.is_contiguous(), "out and weights: contiguous");
  TORCH_CHECK(!h.has_value() || h->is_contiguous(), "h: contiguous [T, E*s]");
  TORCH_CHECK(block > 0, "block: at least one token");
  TORCH_CHECK(!gates.has_value() || (gates->scalar_type() == x.scalar_type() && gates->is_contiguous()), "gates: contiguous [T, E], x's dtype");
  const int64_t T = x.size(0), d = x.size(1), E = num_experts, d_ff = w_in.size(1), s = d_ff / E, d_out = w_out.size(1);
  TORCH_CHECK(picked.size(0) == T && picked.size(1) == E && out.size(0) == T && out.size(1) == d_out, "shapes disagree");
  TORCH_CHECK(!gates.has_value() || (gates->size(0) == T && gates->size(1) == E), "gates: [T, E] like picked");
  const bool* picks = picked.data_ptr<bool>();
  const scalar_t* weights = gates.has_value() ? gates->data_ptr<scalar_t>() : nullptr;

  // The caller's grad and inference modes, for the ops the other threads run: without them, an
  // output made under torch.inference_mode could not be written there.
  const at::ThreadLocalState caller;
  auto run_blocks = [&](int64_t first, int64_t last) {
    at::ThreadLocalStateGuard same_modes(caller);
    const auto options = x.options();
    auto rows = at::empty({block, h.has_value() ? s : d}, options);  // gathered x (or h) rows
    auto up = at::empty({block, s}, options);
    auto gate = at::empty({w_gate.has_value() ? block : 0, s}, options);
    auto y = at::empty({block, d_out}, options);
    auto mask = at::empty({block, 1}, options);  // a popular expert's weight per token of the block
    auto scale = at::empty({block, 1}, options);  // a gathered expert's gate per token
    std::vector<std::vector<int64_t>> tokens_of(E);
    for (int64_t b = first; b < last; ++b) {
      const int64_t start = b * block, n = std::min(block, T - start);
      for (auto& tokens : tokens_of) tokens.clear();
      for (int64_t t = 0; t < n; ++t) {
        const bool* row = picks + (start + t) * E;
        for (int64_t e = 0; e < E; ++e) {
          if (row[e]) tokens_of[e].push_back(t);
        }
      }
      const auto x_block = x.narrow(0, start, n);
      auto out_block = out.narrow(0, start, n);
      for (int64_t e = 0; e < E; ++e) {
        const auto& tokens = tokens_of[e];
        const int64_t count = tokens.size();
        if (count == 0) continue;
        const bool everyone = count >= masked_share * n;
        const int64_t m = everyone ? n : count;
        at::Tensor hidden;
        if (h.has_value()) {
          auto h_e = h->narrow(0, start, n).narrow(1, e * s, s);  // [n, s], strided
          if (everyone) {
            hidden = h_e;
          } else {
            hidden = rows.narrow(0, 0, m);
            gather_rows(hidden.data_ptr<scalar_t>(), h_e.data_ptr<scalar_t>(), d_ff, tokens, s);
          }
        } else {
          at::Tensor xs = x_block;
          if (!everyone) {
            xs = rows.narrow(0, 0, m);
            gather_rows(xs.data_ptr<scalar_t>(), x_block.data_ptr<scalar_t>(), d, tokens, d);
          }
          hidden = up.narrow(0, 0, m);
          project(hidden, xs, w_in.narrow(1, e * s, s), b_in.has_value() ? c10::optional<at::Tensor>((*b_in)[e]) : c10::nullopt);
          if (w_gate.has_value()) {
            auto g = gate.narrow(0, 0, m);
            project(g, xs, w_gate->narrow(1, e * s, s), b_gate.has_value() ? c10::optional<at::Tensor>((*b_gate)[e]) : c10::nullopt);
            activate_(g, act);
            hidden.mul_(g);
          } else {
            activate_(hidden, act);
          }
        }
        const auto w_out_e = w_out.narrow(0, e * s, s);
        if (everyone) {
          scalar_t* keep = mask.data_ptr<scalar_t>();
          for (int64_t t = 0; t < n; ++t) {
            const int64_t at = (start + t) * E + e;
            keep[t] = weights ? weights[at] : scalar_t(picks[at] ? 1.f : 0.f);
          }
          hidden.mul_(mask.narrow(0, 0, n));
          out_block.addmm_(hidden, w_out_e);
        } else {
          auto ys = y.narrow(0, 0, m);
          at::mm_out(ys, hidden, w_out_e);
          if (weights) {
            scalar_t* by = scale.data_ptr<scalar_t>();
            for (int64_t i = 0; i < m; ++i) by[i] = weights[(start + tokens[i]) * E + e];
            ys.mul_(scale.narrow(0, 0, m));
          }
          scatter_add_rows(out_block.data_ptr<scalar_t>(), ys.data_ptr<scalar_t>(), tokens, d_out);
        }
      }
    }
  };
  // The threads share out the blocks, each running its matmuls on one thread (inside parallel_for
  // an op runs on one): an expert's matmuls are too small to split, and on two threads splitting
  // them made the loop twice as slow as on one.
  at::parallel_for(0, (T + block - 1) / block, 1, run_blocks);
}

void looped(const at::Tensor& x, const at::Tensor& picked, const at::Tensor& w_in, const c10::optional<at::Tensor>& b_in,
            const c10::optional<at::Tensor>& w_gate, const c10::optional<at::Tensor>& b_gate, const at::Tensor& w_out,
            at::Tensor& out, const c10::optional<at::Tensor>& h, int64_t num_experts, int64_t act, int64_t block,
            double masked_share, const c10::optional<at::Tensor>& gates) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return looped_typed<float>(x, picked, w_in, b_in, w_gate, b_gate, w_out, out, h, num_experts, act, block, masked_share, gates);
    case at::kBFloat16:
      return looped_typed<at::BFloat16>(x, picked, w_in, b_in, w_gate, b_gate, w_out, out, h, num_experts, act, block, masked_share,
                                        gates);
    default: TORCH_CHECK(false, "the native looped kernel runs float32 and bfloat16, not ", x.scalar_type());
  }
}

// Whether at::parallel_for can use torch's threads here: only in code compiled with OpenMP.
bool parallel() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("looped", &looped, "moefy's looped MoE kernel (CPU, float32 or bfloat16, inference)");
  m.def("parallel", &parallel, "whether the blocks can run on torch's threads (built with OpenMP)");
}
