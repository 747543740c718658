// The only translation unit that knows about torch: validates tensors, maps them onto the raw-pointer kernels in
// csrc/cpu (and csrc/cuda when built with PNEKERN_WITH_CUDA), and registers the `pnekern::` operators.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "cpu/adamw_cpu.h"
#include "cpu/cpu_isa.h"
#include "cpu/microbatch_cpu.h"
#include "pnekern/adamw_types.h"
#include "pnekern/half.h"

#ifdef PNEKERN_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/adamw_cuda.h"
#endif

#ifndef PNEKERN_BUILD_FLAGS
#define PNEKERN_BUILD_FLAGS "unknown"
#endif

namespace pnekern {
namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, "pnekern: unsupported dtype ", t, " (expected float32, bfloat16 or float16)");
  }
}

// Shared per-tensor checks; `what` names the argument and index in every message so a failing call says which
// tensor is wrong ("adamw_step_: grads[3] must be contiguous").
void check_buffer(const at::Tensor& t, const char* op, const char* arg, size_t i, const at::Tensor& like,
                  at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), op, ": ", arg, "[", i, "] is undefined");
  TORCH_CHECK(t.device() == like.device(), op, ": ", arg, "[", i, "] is on ", t.device(), " but params[", i,
              "] is on ", like.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", arg, "[", i, "] has dtype ", t.scalar_type(), " but expected ",
              dtype, " (params, grads and optimizer state must share one dtype)");
  TORCH_CHECK(t.is_contiguous(), op, ": ", arg, "[", i, "] must be contiguous");
  TORCH_CHECK(t.numel() == like.numel(), op, ": ", arg, "[", i, "] has ", t.numel(), " elements but params[", i,
              "] has ", like.numel());
}

float read_scalar(const std::optional<at::Tensor>& t, const char* op, const char* arg) {
  TORCH_CHECK(t->numel() == 1, op, ": ", arg, " must have exactly one element, got ", t->numel());
  // One host read per call (not per tensor); on CUDA this synchronises, which the CUDA path documents.
  return t->item<float>();
}

// Everything both device implementations need, validated once.
struct AdamWCall {
  DType dtype;
  std::vector<AdamWTensor> tensors;
  bool skip = false;  // found_inf != 0
  std::optional<float> grad_scale;
  int stats_cols = kAdamWStatsCols;  // stats_out's width: all four sums, or the two of trace mode
};

AdamWCall prepare_adamw(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                        bool amsgrad, const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf, at::TensorList sumsq_bufs,
                        const std::optional<at::Tensor>& stats_out) {
  constexpr const char* op = "adamw_step_";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, op, ": got ", n, " params but ", grads.size(), " grads");
  TORCH_CHECK(exp_avgs.size() == n, op, ": got ", n, " params but ", exp_avgs.size(), " exp_avgs");
  TORCH_CHECK(exp_avg_sqs.size() == n, op, ": got ", n, " params but ", exp_avg_sqs.size(), " exp_avg_sqs");
  TORCH_CHECK(state_steps.size() == n, op, ": got ", n, " params but ", state_steps.size(), " state_steps");
  if (amsgrad) {
    TORCH_CHECK(max_exp_avg_sqs.size() == n, op, ": amsgrad=True needs one max_exp_avg_sqs per param: got ", n,
                " params but ", max_exp_avg_sqs.size(), " max_exp_avg_sqs");
  } else {
    TORCH_CHECK(max_exp_avg_sqs.empty(), op, ": max_exp_avg_sqs must be empty when amsgrad=False, got ",
                max_exp_avg_sqs.size());
  }
  TORCH_CHECK(sumsq_bufs.empty() || sumsq_bufs.size() == n, op, ": sumsq_bufs must be empty or one per param: got ",
              n, " params but ", sumsq_bufs.size(), " sumsq_bufs");

  AdamWCall call;
  call.dtype = DType::kFloat32;
  if (n > 0) {
    TORCH_CHECK(params[0].defined(), op, ": params[0] is undefined");
    TORCH_CHECK(is_supported_dtype(params[0].scalar_type()), op, ": params[0] has dtype ", params[0].scalar_type(),
                "; supported: float32, bfloat16, float16");
    call.dtype = to_dtype(params[0].scalar_type());
  }
  const at::ScalarType dtype = n > 0 ? params[0].scalar_type() : at::kFloat;
  const at::Device device = n > 0 ? params[0].device() : at::Device(at::kCPU);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined(), op, ": params[", i, "] is undefined");
    TORCH_CHECK(p.device() == device, op, ": params[", i, "] is on ", p.device(), " but params[0] is on ", device);
    TORCH_CHECK(p.scalar_type() == dtype, op, ": params[", i, "] has dtype ", p.scalar_type(), " but params[0] has ",
                dtype);
    TORCH_CHECK(p.is_contiguous(), op, ": params[", i, "] must be contiguous");
    check_buffer(grads[i], op, "grads", i, p, dtype);
    check_buffer(exp_avgs[i], op, "exp_avgs", i, p, dtype);
    check_buffer(exp_avg_sqs[i], op, "exp_avg_sqs", i, p, dtype);
    if (amsgrad) check_buffer(max_exp_avg_sqs[i], op, "max_exp_avg_sqs", i, p, dtype);
    if (!sumsq_bufs.empty()) check_buffer(sumsq_bufs[i], op, "sumsq_bufs", i, p, at::kFloat);
    const at::Tensor& s = state_steps[i];
    TORCH_CHECK(s.defined() && s.numel() == 1, op, ": state_steps[", i, "] must be a one-element tensor");
    TORCH_CHECK(s.device().is_cpu(), op, ": state_steps[", i, "] must be a CPU tensor (the bias corrections are "
                "computed on the host in double), got ", s.device());
    TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble, op, ": state_steps[", i,
                "] must be float32 or float64, got ", s.scalar_type());
  }
  if (stats_out.has_value()) {
    const at::Tensor& st = *stats_out;
    TORCH_CHECK(st.scalar_type() == at::kDouble, op, ": stats_out must be float64, got ", st.scalar_type());
    TORCH_CHECK(st.dim() == 2 && st.size(0) == static_cast<int64_t>(n) &&
                    valid_stats_cols(static_cast<int>(st.size(1))),
                op, ": stats_out must have shape [", n, ", ", kAdamWStatsCols, "] (all sums), [", n, ", ",
                kAdamWNewStatsCols, "] (Σ g², Σ a_new² g², Σ a_new² q) or [", n, ", ", kAdamWTraceStatsCols,
                "] (Σ g² and Σ a_prev² g² only), got ", st.sizes());
    call.stats_cols = static_cast<int>(st.size(1));
    TORCH_CHECK(st.is_contiguous(), op, ": stats_out must be contiguous");
    TORCH_CHECK(st.device() == device, op, ": stats_out is on ", st.device(), " but params are on ", device);
  }
  if (found_inf.has_value()) call.skip = read_scalar(found_inf, op, "found_inf") != 0.0f;
  if (grad_scale.has_value()) call.grad_scale = read_scalar(grad_scale, op, "grad_scale");
  if (call.skip) return call;  // nothing is counted or touched (torch's GradScaler contract)

  call.tensors.resize(n);
  for (size_t i = 0; i < n; ++i) {
    // Count the step first: the kernel uses the incremented value, as torch.optim.AdamW does. Written through the
    // data pointer because these are 0-dim CPU scalars and 100s of tiny add_ dispatches would dominate small steps.
    const at::Tensor& s = state_steps[i];
    double step;
    if (s.scalar_type() == at::kFloat) {
      float* sp = s.data_ptr<float>();
      *sp += 1.0f;
      step = *sp;
    } else {
      double* sp = s.data_ptr<double>();
      *sp += 1.0;
      step = *sp;
    }
    AdamWTensor& t = call.tensors[i];
    t.param = params[i].data_ptr();
    t.grad = grads[i].data_ptr();
    t.exp_avg = exp_avgs[i].data_ptr();
    t.exp_avg_sq = exp_avg_sqs[i].data_ptr();
    t.max_exp_avg_sq = amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr;
    t.sumsq = sumsq_bufs.empty() ? nullptr : sumsq_bufs[i].data_ptr<float>();
    t.numel = params[i].numel();
    t.step = step;
  }
  return call;
}

AdamWHyper make_hyper(double lr, double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
                      bool maximize) {
  AdamWHyper h;
  h.lr = lr;
  h.beta1 = beta1;
  h.beta2 = beta2;
  h.weight_decay = weight_decay;
  h.eps = eps;
  h.amsgrad = amsgrad;
  h.maximize = maximize;
  return h;
}

// The in-step noise arguments (SPEC §5; AdamWHyper documents the math). Per tensor i: noise_var[i] is fp32 with
// 0 elements (no noise for this tensor), 1 (isotropic δ) or numel (per-element δ); noise_basis[i] is fp32 [numel, k]
// (0 elements: no low-rank part) with noise_coef[i] fp32 [k]; noise_tensor_idx[i] is the Philox tensor word.
// noise_scale (optional, one element) is the controller scale c: ε is multiplied by fp32 sqrt(c).
struct NoiseArgs {
  int64_t mode;
  int64_t seed;
  int64_t counter;
  double param_coef;
  const std::optional<at::Tensor>& scale;
  at::IntArrayRef tensor_idx;
  at::TensorList var;
  at::TensorList basis;
  at::TensorList coef;
};

void apply_noise(const NoiseArgs& a, at::TensorList params, AdamWCall& call, AdamWHyper& h) {
  constexpr const char* op = "adamw_step_";
  TORCH_CHECK(a.mode >= kNoiseOff && a.mode <= kNoiseParam, op, ": noise_mode must be 0 (off), 1 (into_v), ",
              "2 (outside_v) or 3 (param), got ", a.mode);
  if (a.mode == kNoiseOff) return;
  const size_t n = params.size();
  TORCH_CHECK(a.tensor_idx.size() == n, op, ": noise needs one noise_tensor_idx per param: got ", n, " params but ",
              a.tensor_idx.size());
  TORCH_CHECK(a.var.size() == n, op, ": noise needs one noise_var per param (0 elements: none): got ", n,
              " params but ", a.var.size());
  TORCH_CHECK(a.basis.empty() || a.basis.size() == n, op, ": noise_basis must be empty or one per param: got ", n,
              " params but ", a.basis.size());
  TORCH_CHECK(a.coef.size() == a.basis.size(), op, ": noise_coef must match noise_basis: got ", a.basis.size(),
              " bases but ", a.coef.size(), " coefficient vectors");
  h.noise_mode = static_cast<int>(a.mode);
  h.noise_seed = static_cast<uint64_t>(a.seed);
  h.noise_counter = static_cast<uint32_t>(a.counter);
  h.noise_param_coef = a.param_coef;
  if (a.scale.has_value()) {
    TORCH_CHECK(a.scale->numel() == 1, op, ": noise_scale must have exactly one element, got ", a.scale->numel());
    const float c = a.scale->item<float>();
    h.noise_has_mult = true;
    h.noise_mult = std::sqrt(c);  // fp32 sqrt of the fp32 scale, as torch's scale.float().sqrt()
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& v = a.var[i];
    const int64_t d = params[i].numel();
    TORCH_CHECK(v.defined() && v.scalar_type() == at::kFloat && v.is_contiguous() && v.device() == params[i].device(),
                op, ": noise_var[", i, "] must be a contiguous float32 tensor on the params' device");
    TORCH_CHECK(v.numel() == 0 || v.numel() == 1 || v.numel() == d, op, ": noise_var[", i, "] has ", v.numel(),
                " elements; expected 0 (no noise), 1 (isotropic) or ", d);
    if (i < call.tensors.size() && v.numel() > 0) {
      AdamWTensor& t = call.tensors[i];
      t.noise_on = true;
      t.noise_tensor_idx = static_cast<uint32_t>(a.tensor_idx[i]);
      if (v.numel() == d && d != 1) {
        t.noise_var = v.data_ptr<float>();
      } else if (!v.device().is_cpu()) {
        // An isotropic δ on the GPU is read by the kernel (no host sync): one value broadcast to every element.
        t.noise_var = v.data_ptr<float>();
        t.noise_var_broadcast = true;
      } else {
        const float delta = v.data_ptr<float>()[0];
        t.noise_sd = std::sqrt(delta < 0.0f ? 0.0f : delta);
      }
    }
    if (a.basis.empty()) continue;
    const at::Tensor& u = a.basis[i];
    const at::Tensor& c = a.coef[i];
    if (u.numel() == 0) continue;
    TORCH_CHECK(u.scalar_type() == at::kFloat && u.is_contiguous() && u.dim() == 2 && u.size(0) == d &&
                    u.device() == params[i].device(),
                op, ": noise_basis[", i, "] must be a contiguous float32 [", d, ", k] tensor, got ", u.scalar_type(),
                " ", u.sizes());
    TORCH_CHECK(c.scalar_type() == at::kFloat && c.is_contiguous() && c.numel() == u.size(1) &&
                    c.device() == params[i].device(),
                op, ": noise_coef[", i, "] must be a contiguous float32 tensor with ", u.size(1), " elements");
    TORCH_CHECK(v.numel() > 0, op, ": noise_basis[", i, "] is given but noise_var[", i, "] is empty (pass a ",
                "zero variance for a purely low-rank noise)");
    if (i < call.tensors.size()) {
      AdamWTensor& t = call.tensors[i];
      t.noise_basis = u.data_ptr<float>();
      t.noise_coef = c.data_ptr<float>();
      t.noise_rank = u.size(1);
    }
  }
}

// The hyper-parameters and noise operands of one call, shared by the CPU and CUDA ops. Raises (before anything is
// touched) on bad noise arguments; a found_inf call is validated the same way.
AdamWHyper call_hyper(AdamWCall& call, at::TensorList params, double lr, double beta1, double beta2,
                      double weight_decay, double eps, bool amsgrad, bool maximize, const NoiseArgs& noise) {
  AdamWHyper hyper = make_hyper(lr, beta1, beta2, weight_decay, eps, amsgrad, maximize);
  hyper.stats_cols = call.stats_cols;
  apply_noise(noise, params, call, hyper);
  return hyper;
}

void adamw_step_cpu_impl(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                         double lr, double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
                         bool maximize, const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf, at::TensorList sumsq_bufs,
                         const std::optional<at::Tensor>& stats_out, int64_t noise_mode, int64_t noise_seed,
                         int64_t noise_counter, double noise_param_coef, const std::optional<at::Tensor>& noise_scale,
                         at::IntArrayRef noise_tensor_idx, std::optional<at::TensorList> noise_var,
                         std::optional<at::TensorList> noise_basis, std::optional<at::TensorList> noise_coef) {
  for (size_t i = 0; i < params.size(); ++i)
    TORCH_CHECK(!params[i].defined() || params[i].device().is_cpu(), "adamw_step_: params[", i,
                "] must be a CPU tensor for the CPU kernel, got ", params[i].device());
  AdamWCall call = prepare_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad,
                                 grad_scale, found_inf, sumsq_bufs, stats_out);
  double* stats = stats_out.has_value() ? stats_out->data_ptr<double>() : nullptr;
  // Validated (and raising) before anything but the skipped-step bookkeeping happens; a found_inf step ignores it.
  AdamWHyper hyper = call_hyper(
      call, params, lr, beta1, beta2, weight_decay, eps, amsgrad, maximize,
      NoiseArgs{noise_mode, noise_seed, noise_counter, noise_param_coef, noise_scale, noise_tensor_idx,
                noise_var.value_or(at::TensorList()), noise_basis.value_or(at::TensorList()),
                noise_coef.value_or(at::TensorList())});
  if (call.skip) {
    if (stats_out.has_value()) stats_out->zero_();
    return;
  }
  const float scale = call.grad_scale.value_or(1.0f);
  adamw_step_cpu(call.dtype, call.tensors.data(), static_cast<int64_t>(call.tensors.size()), hyper,
                 call.grad_scale.has_value() ? &scale : nullptr, /*found_inf=*/nullptr, stats,
                 at::get_num_threads());
}

void check_microbatch(const at::Tensor& acc, const at::Tensor& x, const std::optional<at::Tensor>& v,
                      const std::optional<at::Tensor>& sumsq) {
  constexpr const char* op = "microbatch_accumulate_";
  TORCH_CHECK(acc.scalar_type() == at::kDouble && acc.numel() == 2 && acc.is_contiguous(), op,
              ": acc must be a contiguous float64 tensor with 2 elements, got ", acc.scalar_type(), " ", acc.sizes());
  TORCH_CHECK(is_supported_dtype(x.scalar_type()), op, ": x has dtype ", x.scalar_type(),
              "; supported: float32, bfloat16, float16");
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  TORCH_CHECK(acc.device() == x.device(), op, ": acc is on ", acc.device(), " but x is on ", x.device());
  if (v.has_value()) {
    TORCH_CHECK(v->scalar_type() == x.scalar_type(), op, ": v has dtype ", v->scalar_type(), " but x has ",
                x.scalar_type());
    TORCH_CHECK(v->is_contiguous(), op, ": v must be contiguous");
    TORCH_CHECK(v->numel() == x.numel(), op, ": v has ", v->numel(), " elements but x has ", x.numel());
    TORCH_CHECK(v->device() == x.device(), op, ": v is on ", v->device(), " but x is on ", x.device());
  }
  if (sumsq.has_value()) {
    TORCH_CHECK(sumsq->scalar_type() == at::kFloat, op, ": sumsq must be float32, got ", sumsq->scalar_type());
    TORCH_CHECK(sumsq->is_contiguous(), op, ": sumsq must be contiguous");
    TORCH_CHECK(sumsq->numel() == x.numel(), op, ": sumsq has ", sumsq->numel(), " elements but x has ", x.numel());
    TORCH_CHECK(sumsq->device() == x.device(), op, ": sumsq is on ", sumsq->device(), " but x is on ", x.device());
  }
}

void microbatch_accumulate_cpu_impl(const at::Tensor& acc, const at::Tensor& x, const std::optional<at::Tensor>& v,
                                    double inv_sqrt_bc2, double eps, double scale,
                                    const std::optional<at::Tensor>& sumsq, bool assign_sumsq) {
  TORCH_CHECK(x.device().is_cpu(), "microbatch_accumulate_: x must be a CPU tensor, got ", x.device());
  check_microbatch(acc, x, v, sumsq);
  microbatch_accumulate_cpu(to_dtype(x.scalar_type()), x.data_ptr(), v.has_value() ? v->data_ptr() : nullptr,
                            x.numel(), static_cast<float>(inv_sqrt_bc2), static_cast<float>(eps),
                            static_cast<float>(scale), acc.data_ptr<double>(),
                            sumsq.has_value() ? sumsq->data_ptr<float>() : nullptr, at::get_num_threads(),
                            assign_sumsq);
}

#ifdef PNEKERN_WITH_CUDA
void adamw_step_cuda_impl(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                          double lr, double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
                          bool maximize, const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf, at::TensorList sumsq_bufs,
                          const std::optional<at::Tensor>& stats_out, int64_t noise_mode, int64_t noise_seed,
                          int64_t noise_counter, double noise_param_coef,
                          const std::optional<at::Tensor>& noise_scale, at::IntArrayRef noise_tensor_idx,
                          std::optional<at::TensorList> noise_var, std::optional<at::TensorList> noise_basis,
                          std::optional<at::TensorList> noise_coef) {
  for (size_t i = 0; i < params.size(); ++i)
    TORCH_CHECK(!params[i].defined() || params[i].is_cuda(), "adamw_step_: params[", i,
                "] must be a CUDA tensor for the CUDA kernel, got ", params[i].device());
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  // grad_scale / found_inf are read on the host here (one sync each): state_steps live on the CPU, so whether the
  // step counts has to be known on the host anyway. The raw launcher also accepts device pointers for capture.
  AdamWCall call = prepare_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad,
                                 grad_scale, found_inf, sumsq_bufs, stats_out);
  // As on the CPU; noise_scale is read on the host (one sync).
  AdamWHyper hyper = call_hyper(
      call, params, lr, beta1, beta2, weight_decay, eps, amsgrad, maximize,
      NoiseArgs{noise_mode, noise_seed, noise_counter, noise_param_coef, noise_scale, noise_tensor_idx,
                noise_var.value_or(at::TensorList()), noise_basis.value_or(at::TensorList()),
                noise_coef.value_or(at::TensorList())});
  if (call.skip) {
    if (stats_out.has_value()) stats_out->zero_();
    return;
  }
  std::optional<at::Tensor> scale_dev;
  if (call.grad_scale.has_value())
    scale_dev = grad_scale->to(params[0].device(), at::kFloat).reshape({1}).contiguous();
  const size_t ws_bytes = adamw_cuda_workspace_bytes(call.tensors.data(), static_cast<int64_t>(call.tensors.size()));
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(ws_bytes)}, params[0].options().dtype(at::kByte));
  adamw_step_cuda(call.dtype, call.tensors.data(), static_cast<int64_t>(call.tensors.size()), hyper,
                  scale_dev.has_value() ? scale_dev->data_ptr<float>() : nullptr, /*found_inf=*/nullptr,
                  stats_out.has_value() ? stats_out->data_ptr<double>() : nullptr, workspace.data_ptr(), ws_bytes,
                  c10::cuda::getCurrentCUDAStream().stream());
}
#endif

// Meta (fake) implementations: the ops only mutate their inputs in place, so tracing needs no shape logic; these
// let torch.compile / FakeTensor trace through calls without running a kernel.
void adamw_step_meta(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                     double, double, double, double, double, bool, bool, const std::optional<at::Tensor>&,
                     const std::optional<at::Tensor>&, at::TensorList, const std::optional<at::Tensor>&, int64_t,
                     int64_t, int64_t, double, const std::optional<at::Tensor>&, at::IntArrayRef,
                     std::optional<at::TensorList>, std::optional<at::TensorList>, std::optional<at::TensorList>) {}

void microbatch_accumulate_meta(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double, double,
                                double, const std::optional<at::Tensor>&, bool) {}

}  // namespace
}  // namespace pnekern

TORCH_LIBRARY(pnekern, m) {
  m.def(
      "adamw_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, float lr, float beta1, float beta2, "
      "float weight_decay, float eps, bool amsgrad, bool maximize, Tensor? grad_scale, Tensor? found_inf, "
      "Tensor[] sumsq_bufs, Tensor(g!)? stats_out, int noise_mode=0, int noise_seed=0, int noise_counter=0, "
      "float noise_param_coef=0., Tensor? noise_scale=None, int[] noise_tensor_idx=[], Tensor[]? noise_var=None, "
      "Tensor[]? noise_basis=None, Tensor[]? noise_coef=None) -> ()");
  m.def(
      "microbatch_accumulate_(Tensor(a!) acc, Tensor x, Tensor? v, float inv_sqrt_bc2, float eps, float scale, "
      "Tensor(b!)? sumsq, bool assign_sumsq=False) -> ()");
}

TORCH_LIBRARY_IMPL(pnekern, CPU, m) {
  m.impl("adamw_step_", &pnekern::adamw_step_cpu_impl);
  m.impl("microbatch_accumulate_", &pnekern::microbatch_accumulate_cpu_impl);
}

TORCH_LIBRARY_IMPL(pnekern, Meta, m) {
  m.impl("adamw_step_", &pnekern::adamw_step_meta);
  m.impl("microbatch_accumulate_", &pnekern::microbatch_accumulate_meta);
}

#ifdef PNEKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(pnekern, CUDA, m) {
  m.impl("adamw_step_", &pnekern::adamw_step_cuda_impl);
  // microbatch_accumulate_ has no CUDA kernel yet: the Python dispatch layer (pnekern.ops) routes CUDA tensors to
  // the Triton/reference implementation.
}
#endif

namespace {

// The CPU hot loops' ISA levels (csrc/cpu/cpu_isa.h): compiled in, usable on this CPU, and the one in use now.
pybind11::dict cpu_isa_info() {
  using pnekern::CpuIsa;
  pybind11::dict d;
  std::vector<std::string> compiled, supported;
  for (int i = 0; i < pnekern::kNumCpuIsa; ++i) {
    const CpuIsa isa = static_cast<CpuIsa>(i);
    if (pnekern::cpu_isa_compiled(isa)) compiled.emplace_back(pnekern::cpu_isa_name(isa));
    if (pnekern::cpu_isa_supported(isa)) supported.emplace_back(pnekern::cpu_isa_name(isa));
  }
  d["compiled"] = compiled;
  d["supported"] = supported;
  d["best"] = std::string(pnekern::cpu_isa_name(pnekern::cpu_isa_best()));
  const std::string env = pnekern::cpu_isa_env_request();
  d["env"] = env.empty() ? pybind11::object(pybind11::none()) : pybind11::object(pybind11::str(env));
  try {
    d["selected"] = std::string(pnekern::cpu_isa_name(pnekern::cpu_isa_selected()));
  } catch (const std::exception& e) {  // a bad PNEKERN_CPU_ISA: report it here, the kernels raise it when called
    d["selected"] = pybind11::none();
    d["error"] = std::string(e.what());
  }
  return d;
}

std::string get_cpu_isa() { return pnekern::cpu_isa_name(pnekern::cpu_isa_selected()); }

// Returns the level now in use; raises ValueError for an unknown or unsupported level.
std::string set_cpu_isa(const std::string& name) {
  pnekern::cpu_isa_set(name.c_str());
  return get_cpu_isa();
}

pybind11::dict build_info() {
  pybind11::dict d;
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = std::string("unknown");
#endif
  d["cxx_flags"] = std::string(PNEKERN_BUILD_FLAGS);
#ifdef _OPENMP
  d["openmp"] = static_cast<int>(_OPENMP);  // yyyymm of the OpenMP spec the compiler implements
#else
  d["openmp"] = pybind11::none();
#endif
#ifdef PNEKERN_WITH_CUDA
  d["with_cuda"] = true;
  d["backends"] = std::vector<std::string>{"cpu", "cuda"};
#else
  d["with_cuda"] = false;
  d["backends"] = std::vector<std::string>{"cpu"};
#endif
  d["cpu_isa"] = cpu_isa_info();
  d["adamw_chunk"] = static_cast<int64_t>(pnekern::kAdamWChunk);
  d["microbatch_chunk"] = static_cast<int64_t>(pnekern::kMicrobatchChunk);
  d["philox"] = std::string("philox4x32-10; key={seed_lo,seed_hi}; counter={elem_lo,elem_hi,tensor_idx,step}");
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pnekern compiled kernels; the operators are registered under torch.ops.pnekern";
  m.def("build_info", &build_info, "How this extension was built: compiler, flags, OpenMP, CUDA, backends.");
  m.def("cpu_isa", &get_cpu_isa, "The ISA level the CPU kernels use now: 'baseline', 'avx2' or 'avx512'.");
  m.def("set_cpu_isa", &set_cpu_isa, pybind11::arg("name"),
        "Select the CPU kernels' ISA level ('auto' re-reads PNEKERN_CPU_ISA, or 'baseline'/'avx2'/'avx512', which "
        "must be supported by this CPU). Returns the level in use; every level gives bitwise identical results.");
}
