// Fused multi-tensor AdamW (+ SPEC §2 stats) CUDA kernels. One launch covers every tensor: a device table of
// tensors and a table of fixed-size chunks; block b processes chunk b. Stats use a two-stage deterministic
// reduction (fixed-shape block tree per chunk, then a fixed-order sum over a tensor's chunks) and no atomics, so
// they are bitwise reproducible run to run.
//
// Math mirrors csrc/cpu/adamw_cpu.cpp operation by operation. Division and sqrt use the correctly rounded
// intrinsics (__fdiv_rn, __fsqrt_rn) so the result does not depend on --use_fast_math.
#include "adamw_cuda.h"

#include <cuda_runtime.h>

#include <sstream>
#include <stdexcept>
#include <vector>

#include "pnekern/half.h"
#include "pnekern/philox.h"

#define PNEKERN_CUDA_CHECK(expr)                                                                   \
  do {                                                                                             \
    const cudaError_t pnekern_err_ = (expr);                                                       \
    if (pnekern_err_ != cudaSuccess) {                                                             \
      std::ostringstream pnekern_os_;                                                              \
      pnekern_os_ << __FILE__ << ":" << __LINE__ << ": " #expr " failed: "                         \
                  << cudaGetErrorString(pnekern_err_);                                             \
      throw std::runtime_error(pnekern_os_.str());                                                 \
    }                                                                                              \
  } while (0)

namespace pnekern {
namespace {

// Device-side tensor record: pointers plus the host-computed fp32 coefficients and the tensor's chunk range.
struct DevTensor {
  void* param;
  void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  const float* sumsq;
  int64_t numel;
  int64_t first_chunk;
  int64_t nchunks;
  float decay;
  float neg_step_size;
  float bc2_sqrt;
  float inv_prev_bc2_sqrt;
  float prev_on;
  // In-step noise (AdamWHyper / AdamWTensor::noise_*): active when the call's mode != off and noise_on != 0.
  const float* noise_var;  // δ: per element, or one broadcast value (noise_var_broadcast); null: noise_sd
  const float* noise_basis;
  const float* noise_coef;
  int64_t noise_rank;
  float noise_sd;
  uint32_t noise_tensor_idx;
  int noise_var_broadcast;
  int noise_on;
};

// Call-wide noise scalars, rounded to fp32 exactly as adamw_cpu.cpp rounds them into AdamWScalars.
struct DevNoise {
  int mode;
  uint32_t key0, key1, counter;
  int has_mult;
  float mult;
  float in_v;   // 1: ε enters v (into_v)
  float in_m;   // 1: ε enters m and the update (gradient modes)
  float param;  // fp32(η·sqrt(κ)) in param mode, else 0
};

struct DevChunk {
  int64_t tensor;
  int64_t begin;
};

constexpr size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

struct WorkspaceLayout {
  size_t tensors_off, chunks_off, partials_off, total;
};

int64_t count_chunks(const AdamWTensor* tensors, int64_t ntensors) {
  int64_t c = 0;
  for (int64_t i = 0; i < ntensors; ++i) c += (tensors[i].numel + kAdamWCudaChunk - 1) / kAdamWCudaChunk;
  return c;
}

WorkspaceLayout layout_for(int64_t ntensors, int64_t nchunks) {
  WorkspaceLayout l;
  l.tensors_off = 0;
  l.chunks_off = align_up(sizeof(DevTensor) * static_cast<size_t>(ntensors), 256);
  l.partials_off = l.chunks_off + align_up(sizeof(DevChunk) * static_cast<size_t>(nchunks), 256);
  l.total = l.partials_off + sizeof(double) * kAdamWStatsCols * static_cast<size_t>(nchunks);
  return l;
}

// Fixed-shape shared-memory tree over the block: the same pairing every launch, hence deterministic.
template <int THREADS>
__device__ void block_sum4(double (&v)[kAdamWStatsCols], double (*shared)[THREADS]) {
  for (int k = 0; k < kAdamWStatsCols; ++k) shared[k][threadIdx.x] = v[k];
  __syncthreads();
  for (int stride = THREADS / 2; stride > 0; stride >>= 1) {
    if (static_cast<int>(threadIdx.x) < stride)
      for (int k = 0; k < kAdamWStatsCols; ++k) shared[k][threadIdx.x] += shared[k][threadIdx.x + stride];
    __syncthreads();
  }
  for (int k = 0; k < kAdamWStatsCols; ++k) v[k] = shared[k][0];
}

template <typename T, bool AMSGRAD, bool STATS, bool UNSCALE>
__global__ void __launch_bounds__(kAdamWCudaThreads)
    adamw_chunk_kernel(const DevTensor* __restrict__ tensors, const DevChunk* __restrict__ chunks, float w1,
                       float beta2, float one_minus_beta2, float eps, float sign, bool small_w,
                       const float* __restrict__ grad_scale, const float* __restrict__ found_inf,
                       double* __restrict__ partials, DevNoise nz) {
  using S = Storage<T>;
  __shared__ double shared[kAdamWStatsCols][kAdamWCudaThreads];
  const DevChunk ch = chunks[blockIdx.x];
  const DevTensor& t = tensors[ch.tensor];
  // A skipped step (inf/nan grads) leaves every buffer untouched; the stats it produces are zeros.
  const bool skip = found_inf != nullptr && *found_inf != 0.0f;
  double acc[kAdamWStatsCols] = {0.0, 0.0, 0.0, 0.0};
  if (!skip) {
    T* __restrict__ p = static_cast<T*>(t.param);
    T* __restrict__ gp = static_cast<T*>(t.grad);
    T* __restrict__ mp = static_cast<T*>(t.exp_avg);
    T* __restrict__ vp = static_cast<T*>(t.exp_avg_sq);
    T* __restrict__ vmaxp = static_cast<T*>(t.max_exp_avg_sq);
    const float* __restrict__ qp = t.sumsq;
    const float scale = UNSCALE ? *grad_scale : 1.0f;
    const float w1m1 = w1 - 1.0f;
    const int64_t end = min(ch.begin + kAdamWCudaChunk, t.numel);
    const bool noise = nz.mode != kNoiseOff && t.noise_on != 0;  // uniform over the block: no divergence
    for (int64_t i = ch.begin + threadIdx.x; i < end; i += blockDim.x) {
      float g = S::load(gp[i]);
      if (UNSCALE) {
        g = __fdiv_rn(g, scale);
        gp[i] = S::store(g);
      }
      g = g * sign;
      // ε_e = (z_e·sqrt(max(δ_e, 0)) + Σ_j U[e, j]·c_j)·mult, in the CPU kernel's order (noise_block). z is the
      // portable polynomial normal; this file is built with --fmad=false, so it is the CPU kernel's z bit for bit.
      float g_m = g, g_v = g, e_raw = 0.0f;
      if (noise) {
        const float z = philox::philox_normal_poly(nz.key0, nz.key1, static_cast<uint64_t>(i), t.noise_tensor_idx,
                                                   nz.counter);
        float e;
        if (t.noise_var != nullptr) {
          const float d = t.noise_var[t.noise_var_broadcast ? 0 : i];
          e = __fmul_rn(z, __fsqrt_rn(d < 0.0f ? 0.0f : d));  // clamp(min=0): NaN stays NaN
        } else {
          e = __fmul_rn(z, t.noise_sd);
        }
        const int64_t k = t.noise_rank;
        for (int64_t j = 0; j < k; ++j) e = __fadd_rn(e, __fmul_rn(t.noise_basis[i * k + j], t.noise_coef[j]));
        if (nz.has_mult) e = __fmul_rn(e, nz.mult);
        e_raw = e;
        if (nz.mode != kNoiseParam) {  // uniform over the launch: no divergence
          const float ge = __fmul_rn(e_raw, sign);  // ε is added to the gradient before maximize flips it
          g_m = __fadd_rn(g, __fmul_rn(nz.in_m, ge));
          g_v = __fadd_rn(g, __fmul_rn(nz.in_v, ge));
        }
      }
      float param = __fmul_rn(S::load(p[i]), t.decay);
      const float m_old = S::load(mp[i]);
      // torch's lerp formula switch at |weight| = 0.5; explicit _rn ops keep nvcc from contracting into FMAs so the
      // rounding matches the CPU kernel.
      const float m = small_w ? __fadd_rn(m_old, __fmul_rn(w1, __fsub_rn(g_m, m_old)))
                              : __fadd_rn(g_m, __fmul_rn(w1m1, __fsub_rn(g_m, m_old)));
      const float v_old = S::load(vp[i]);
      const float v = __fadd_rn(__fmul_rn(v_old, beta2), __fmul_rn(__fmul_rn(one_minus_beta2, g_v), g_v));
      float v_use = v;
      float v_prev = v_old;
      if (AMSGRAD) {
        const float vmax_old = S::load(vmaxp[i]);
        v_use = !(vmax_old >= v) ? v : vmax_old;  // NaN propagates, as torch.maximum
        vmaxp[i] = S::store(v_use);
        v_prev = vmax_old;
      }
      const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v_use), t.bc2_sqrt), eps);
      param = __fadd_rn(param, __fdiv_rn(__fmul_rn(t.neg_step_size, m), denom));
      // Parameter space: ζ = (η√κ · a_new)·ε, only in that mode (as on the CPU and in the reference).
      if (noise && nz.mode == kNoiseParam)
        param = __fadd_rn(param, __fmul_rn(__fmul_rn(nz.param, __fdiv_rn(1.0f, denom)), e_raw));
      p[i] = S::store(param);
      mp[i] = S::store(m);
      vp[i] = S::store(v);
      if (STATS) {
        const float g2 = __fmul_rn(g, g);
        const float a_new = __fdiv_rn(1.0f, denom);
        const float a_prev_raw = __fdiv_rn(1.0f, __fadd_rn(__fmul_rn(__fsqrt_rn(v_prev), t.inv_prev_bc2_sqrt), eps));
        const float a_prev = t.prev_on != 0.0f ? a_prev_raw : 1.0f;
        acc[0] += static_cast<double>(g2);
        acc[1] += static_cast<double>(__fmul_rn(__fmul_rn(a_prev, a_prev), g2));
        acc[2] += static_cast<double>(__fmul_rn(__fmul_rn(a_new, a_new), g2));
        if (qp != nullptr) acc[3] += static_cast<double>(__fmul_rn(__fmul_rn(a_new, a_new), qp[i]));
      }
    }
  }
  if (STATS) {
    block_sum4<kAdamWCudaThreads>(acc, shared);
    if (threadIdx.x == 0)
      for (int k = 0; k < kAdamWStatsCols; ++k) partials[blockIdx.x * kAdamWStatsCols + k] = acc[k];
  }
}

// Second stage: block t sums tensor t's chunk partials. Thread j takes chunks j, j+THREADS, ... in order, then the
// fixed tree combines threads, so the result depends only on the chunk count.
__global__ void __launch_bounds__(kAdamWCudaThreads)
    adamw_stats_finalize_kernel(const DevTensor* __restrict__ tensors, const double* __restrict__ partials,
                                double* __restrict__ stats, int cols) {
  __shared__ double shared[kAdamWStatsCols][kAdamWCudaThreads];
  const DevTensor& t = tensors[blockIdx.x];
  double acc[kAdamWStatsCols] = {0.0, 0.0, 0.0, 0.0};
  for (int64_t c = threadIdx.x; c < t.nchunks; c += blockDim.x)
    for (int k = 0; k < kAdamWStatsCols; ++k) acc[k] += partials[(t.first_chunk + c) * kAdamWStatsCols + k];
  block_sum4<kAdamWCudaThreads>(acc, shared);
  if (threadIdx.x == 0)
    for (int k = 0; k < cols; ++k) stats[blockIdx.x * cols + k] = acc[stats_row_source(cols, k)];
}

template <typename T, bool AMSGRAD, bool STATS, bool UNSCALE>
void launch_typed(int64_t nchunks, const DevTensor* tensors, const DevChunk* chunks, float w1, float beta2,
                  float one_minus_beta2, float eps, float sign, bool small_w, const float* grad_scale,
                  const float* found_inf, double* partials, const DevNoise& nz, cudaStream_t stream) {
  adamw_chunk_kernel<T, AMSGRAD, STATS, UNSCALE>
      <<<static_cast<unsigned>(nchunks), kAdamWCudaThreads, 0, stream>>>(
          tensors, chunks, w1, beta2, one_minus_beta2, eps, sign, small_w, grad_scale, found_inf, partials, nz);
}

template <typename T>
void launch_dispatch(bool amsgrad, bool stats, bool unscale, int64_t nchunks, const DevTensor* tensors,
                     const DevChunk* chunks, float w1, float beta2, float one_minus_beta2, float eps, float sign,
                     bool small_w, const float* grad_scale, const float* found_inf, double* partials,
                     const DevNoise& nz, cudaStream_t stream) {
#define PNEKERN_LAUNCH(A, S, U)                                                                                 \
  launch_typed<T, A, S, U>(nchunks, tensors, chunks, w1, beta2, one_minus_beta2, eps, sign, small_w, grad_scale, \
                           found_inf, partials, nz, stream)
  if (amsgrad) {
    if (stats) {
      if (unscale) PNEKERN_LAUNCH(true, true, true); else PNEKERN_LAUNCH(true, true, false);
    } else {
      if (unscale) PNEKERN_LAUNCH(true, false, true); else PNEKERN_LAUNCH(true, false, false);
    }
  } else {
    if (stats) {
      if (unscale) PNEKERN_LAUNCH(false, true, true); else PNEKERN_LAUNCH(false, true, false);
    } else {
      if (unscale) PNEKERN_LAUNCH(false, false, true); else PNEKERN_LAUNCH(false, false, false);
    }
  }
#undef PNEKERN_LAUNCH
}

}  // namespace

size_t adamw_cuda_workspace_bytes(const AdamWTensor* tensors, int64_t ntensors) {
  return layout_for(ntensors, count_chunks(tensors, ntensors)).total;
}

void adamw_step_cuda(DType dtype, const AdamWTensor* tensors, int64_t ntensors, const AdamWHyper& hyper,
                     const float* grad_scale, const float* found_inf, double* stats, void* workspace,
                     size_t workspace_bytes, cudaStream_t stream) {
  if (ntensors <= 0) return;
  if (!valid_stats_cols(hyper.stats_cols)) {
    std::ostringstream os;
    os << "adamw_step_cuda: stats_cols must be " << kAdamWStatsCols << ", " << kAdamWNewStatsCols << " or "
       << kAdamWTraceStatsCols << ", got " << hyper.stats_cols;
    throw std::invalid_argument(os.str());
  }
  const int64_t nchunks = count_chunks(tensors, ntensors);
  const WorkspaceLayout l = layout_for(ntensors, nchunks);
  if (workspace == nullptr || workspace_bytes < l.total) {
    std::ostringstream os;
    os << "adamw_step_cuda: workspace of " << workspace_bytes << " bytes is smaller than the " << l.total
       << " bytes needed";
    throw std::invalid_argument(os.str());
  }

  // Host staging of both tables in one buffer, copied with a single async memcpy.
  std::vector<unsigned char> host(l.partials_off);
  DevTensor* ht = reinterpret_cast<DevTensor*>(host.data() + l.tensors_off);
  DevChunk* hc = reinterpret_cast<DevChunk*>(host.data() + l.chunks_off);
  int64_t c = 0;
  for (int64_t i = 0; i < ntensors; ++i) {
    const AdamWTensor& t = tensors[i];
    if (hyper.amsgrad && t.numel > 0 && t.max_exp_avg_sq == nullptr)
      throw std::invalid_argument("adamw_step_cuda: amsgrad needs max_exp_avg_sq for every tensor");
    const TensorCoeffs k = make_coeffs(hyper, t.step);
    DevTensor d;
    d.param = t.param;
    d.grad = t.grad;
    d.exp_avg = t.exp_avg;
    d.exp_avg_sq = t.exp_avg_sq;
    d.max_exp_avg_sq = t.max_exp_avg_sq;
    d.sumsq = t.sumsq;
    d.numel = t.numel;
    d.first_chunk = c;
    d.nchunks = (t.numel + kAdamWCudaChunk - 1) / kAdamWCudaChunk;
    d.decay = k.decay;
    d.neg_step_size = k.neg_step_size;
    d.bc2_sqrt = k.bc2_sqrt;
    d.inv_prev_bc2_sqrt = k.inv_prev_bc2_sqrt;
    d.prev_on = k.has_prev ? 1.0f : 0.0f;
    if (t.noise_on && t.numel > 0 && t.noise_rank > 0 && (t.noise_basis == nullptr || t.noise_coef == nullptr))
      throw std::invalid_argument("adamw_step_cuda: noise_rank > 0 needs noise_basis and noise_coef");
    if (t.noise_rank < 0) throw std::invalid_argument("adamw_step_cuda: noise_rank < 0");
    d.noise_var = t.noise_var;
    d.noise_basis = t.noise_basis;
    d.noise_coef = t.noise_coef;
    d.noise_rank = t.noise_rank;
    d.noise_sd = t.noise_sd;
    d.noise_tensor_idx = t.noise_tensor_idx;
    d.noise_var_broadcast = t.noise_var_broadcast ? 1 : 0;
    d.noise_on = t.noise_on ? 1 : 0;
    ht[i] = d;
    for (int64_t j = 0; j < d.nchunks; ++j) hc[c++] = DevChunk{i, j * kAdamWCudaChunk};
  }
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  PNEKERN_CUDA_CHECK(cudaMemcpyAsync(ws, host.data(), host.size(), cudaMemcpyHostToDevice, stream));
  const DevTensor* dt = reinterpret_cast<const DevTensor*>(ws + l.tensors_off);
  const DevChunk* dc = reinterpret_cast<const DevChunk*>(ws + l.chunks_off);
  double* partials = reinterpret_cast<double*>(ws + l.partials_off);

  const float w1 = static_cast<float>(1.0 - hyper.beta1);
  const float beta2 = static_cast<float>(hyper.beta2);
  const float one_minus_beta2 = static_cast<float>(1.0 - hyper.beta2);
  const float eps = static_cast<float>(hyper.eps);
  const float sign = hyper.maximize ? -1.0f : 1.0f;
  const bool small_w = std::fabs(w1) < 0.5f;
  const bool want_stats = stats != nullptr;
  const bool unscale = grad_scale != nullptr;
  if (hyper.noise_mode < kNoiseOff || hyper.noise_mode > kNoiseParam)
    throw std::invalid_argument("adamw_step_cuda: noise_mode must be 0..3");
  DevNoise nz;
  nz.mode = hyper.noise_mode;
  nz.key0 = static_cast<uint32_t>(hyper.noise_seed);
  nz.key1 = static_cast<uint32_t>(hyper.noise_seed >> 32);
  nz.counter = hyper.noise_counter;
  nz.has_mult = hyper.noise_has_mult ? 1 : 0;
  nz.mult = hyper.noise_mult;
  nz.in_v = hyper.noise_mode == kNoiseIntoV ? 1.0f : 0.0f;
  nz.in_m = (hyper.noise_mode == kNoiseIntoV || hyper.noise_mode == kNoiseOutsideV) ? 1.0f : 0.0f;
  nz.param = hyper.noise_mode == kNoiseParam ? static_cast<float>(hyper.noise_param_coef) : 0.0f;
  if (nchunks > 0) {
    switch (dtype) {
      case DType::kFloat32:
        launch_dispatch<float>(hyper.amsgrad, want_stats, unscale, nchunks, dt, dc, w1, beta2, one_minus_beta2, eps,
                               sign, small_w, grad_scale, found_inf, partials, nz, stream);
        break;
      case DType::kBFloat16:
        launch_dispatch<bf16_t>(hyper.amsgrad, want_stats, unscale, nchunks, dt, dc, w1, beta2, one_minus_beta2,
                                eps, sign, small_w, grad_scale, found_inf, partials, nz, stream);
        break;
      case DType::kFloat16:
        launch_dispatch<fp16_t>(hyper.amsgrad, want_stats, unscale, nchunks, dt, dc, w1, beta2, one_minus_beta2,
                                eps, sign, small_w, grad_scale, found_inf, partials, nz, stream);
        break;
      default:
        throw std::invalid_argument("adamw_step_cuda: unsupported dtype");
    }
    PNEKERN_CUDA_CHECK(cudaGetLastError());
  }
  if (want_stats) {
    // Tensors with zero chunks (numel 0) still get a zero row from the finalize kernel. A trace-only row
    // (stats_cols 2) keeps the first two sums and an A_t row (3) columns 0, 2, 3: the GPU step is bandwidth-bound,
    // so computing all four costs nothing.
    adamw_stats_finalize_kernel<<<static_cast<unsigned>(ntensors), kAdamWCudaThreads, 0, stream>>>(
        dt, partials, stats, hyper.stats_cols);
    PNEKERN_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace pnekern
