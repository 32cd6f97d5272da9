// CUDA row kernel of KDLoss (design.md §3), with the divergence math of kd_math.h.
//
// A team of threads walks one row: a whole block (64..512 threads) when the row is long, or a
// single warp, several rows to a block, when it is short. Each thread reads 16 bytes at a time
// (8 bf16/fp16 or 4 fp32 entries; a row whose student, teacher and gradient rows are not
// equally aligned is read entry by entry) and keeps its own online softmax; teams combine
// them with warp shuffles, then through shared memory across the block's warps.
//
// Pass 1  log-sum-exps of a = s/T and b = t/T (and of s when CE is on and T != 1); for
//         forward_kl, soft_ce and reverse_kl also the cross term, so the loss is known here.
// Pass 2  (jsd, skew KLs, tvd) the loss terms and S = sum_k q_k g_k.
// Grad    dL/ds_j = scale * (kd_grad_coef * q_j (g_j - S) + ce_weight (softmax(s)_j -
//         [j == y])) * cap'(s_j). Each thread reads an entry before it writes it, and every
//         earlier read of the row happens before the team synchronises, so the gradient may
//         be written over the student row.
// Row offsets are int64 (N * V passes 2^31); the kernels run on the current stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <type_traits>

#include "kd_math.h"
#include "kd_rows.h"

namespace fastkd {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxTeam = 512;  // threads per row at most; 128 registers a thread at full block
constexpr int kMaxWarps = kMaxTeam / kWarp;
constexpr int kRowsPerWarpBlock = 8;  // rows per block when a warp walks a row

// Entries per 16-byte access: the narrower input type sets the count, so that neither
// input's access is wider than 16 bytes.
template <class ST, class TT>
constexpr int pack_size() {
  return 16 / (sizeof(ST) > sizeof(TT) ? sizeof(ST) : sizeof(TT));
}

template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, class T>
__device__ __forceinline__ void load_f32(const T* ptr, float (&out)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(ptr);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = static_cast<float>(pk.v[k]);
}

template <int N, class T>
__device__ __forceinline__ void store_f32(T* ptr, const float (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int k = 0; k < N; ++k) pk.v[k] = static_cast<T>(in[k]);
  *reinterpret_cast<Pack<T, N>*>(ptr) = pk;
}

struct SumOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Reduces each v[k] over the team; every thread of the team gets the same values.
template <int K, class Op>
__device__ __forceinline__ void team_reduce(float (&v)[K], Op op, float* smem) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      v[k] = op(v[k], __shfl_xor_sync(0xffffffffu, v[k], offset));
    }
    // Lanes may have summed in different orders: take lane 0's bits everywhere.
    v[k] = __shfl_sync(0xffffffffu, v[k], 0);
  }
  if (blockDim.x == kWarp) return;  // a warp per row (the same for the whole block)
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int n_warps = blockDim.x / kWarp;
  __syncthreads();  // the previous reduction's readers are done with smem
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) smem[k * kMaxWarps + warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float r = smem[k * kMaxWarps];
    for (int w = 1; w < n_warps; ++w) r = op(r, smem[k * kMaxWarps + w]);
    v[k] = r;
  }
}

__device__ __forceinline__ void team_sync() {
  if (blockDim.x == kWarp) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

// A thread's running (max, sum of exp(x - max)) over the entries it has seen.
struct OnlineLse {
  float max = kNegInf;
  float sum = 0.0f;

  // Folds in n entries; returns the rescale of what was carried and writes exp(x - max).
  template <int N>
  __device__ __forceinline__ float step(const float (&x)[N], float (&e)[N]) {
    float chunk_max = x[0];
#pragma unroll
    for (int k = 1; k < N; ++k) chunk_max = fmaxf(chunk_max, x[k]);
    const float new_max = fmaxf(max, chunk_max);
    const float shift = safe_shift(new_max);
    const float rescale = Ops<float>::exp(max - shift);  // 0 while max is -inf
    sum *= rescale;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      e[k] = Ops<float>::exp(x[k] - shift);
      sum += e[k];
    }
    max = new_max;
    return rescale;
  }
};

template <class ST, class TT>
struct RowArgs {
  const ST* s;
  const TT* t;
  ST* g;  // nullptr: loss only
  int64_t s_stride, t_stride, g_stride;  // in entries
  const int64_t* labels;                 // nullptr: no labels
  const float* grad_scale;               // 0-d
  float* kd_out;
  float* ce_out;
  KdRowsParams p;
};

template <int DIV, class ST, class TT>
__global__ void __launch_bounds__(kMaxTeam)
    kd_rows_kernel(const RowArgs<ST, TT> args) {
  constexpr int VEC = pack_size<ST, TT>();
  __shared__ float smem[4 * kMaxWarps];
  const KdRowsParams& p = args.p;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= p.n_rows) return;  // only in warp-per-row blocks, which never sync the block
  const int tid = threadIdx.x;
  const int team = blockDim.x;
  const int64_t V = p.V;
  const ST* s_row = args.s + row * args.s_stride;
  const TT* t_row = args.t + row * args.t_stride;
  ST* g_row = args.g ? args.g + row * args.g_stride : nullptr;

  const int64_t label = args.labels ? args.labels[row] : -1;
  if (args.labels && label == p.ignore_index) {
    if (tid == 0) args.kd_out[row] = 0.0f;  // ce_out is zero-initialised
    if (g_row) {
      for (int64_t i = tid; i < V; i += team) g_row[i] = static_cast<ST>(0.0f);
    }
    return;
  }

  // Entries [0, head) and [tail, V) one at a time, [head, tail) in packs of VEC. The packs
  // need the three rows equally aligned; a row where they are not is read entry by entry.
  const auto misalign = [](const void* ptr, int elem) {
    return static_cast<int64_t>(reinterpret_cast<uintptr_t>(ptr) / elem % VEC);
  };
  const int64_t head_s = (VEC - misalign(s_row, sizeof(ST))) % VEC;
  bool packed = (misalign(t_row, sizeof(TT)) + head_s) % VEC == 0;
  if (g_row) packed = packed && (misalign(g_row, sizeof(ST)) + head_s) % VEC == 0;
  const int64_t head = packed ? (head_s < V ? head_s : V) : V;
  const int64_t n_packs = (V - head) / VEC;
  const int64_t tail = head + n_packs * VEC;

  // Calls visit(i, s[N], t[N]) on every entry this thread owns, s soft-capped, in float32.
  const auto for_row = [&](const auto& visit) {
    const auto one = [&](int64_t i, auto n_const) {
      constexpr int N = decltype(n_const)::value;
      float sv[N], tv[N];
      load_f32<N>(s_row + i, sv);
      load_f32<N>(t_row + i, tv);
      if (p.has_softcap) {
#pragma unroll
        for (int k = 0; k < N; ++k) {
          sv[k] = softcap(sv[k], p.cap, p.inv_cap);
          tv[k] = softcap(tv[k], p.cap, p.inv_cap);
        }
      }
      visit(i, sv, tv);
    };
    using One = std::integral_constant<int, 1>;
    using Packed = std::integral_constant<int, VEC>;
    for (int64_t i = tid; i < head; i += team) one(i, One{});
    for (int64_t k = tid; k < n_packs; k += team) one(head + k * VEC, Packed{});
    for (int64_t i = tail + tid; i < V; i += team) one(i, One{});
  };

  const bool ce_own = p.has_ce && p.inv_t != 1.0f;  // else softmax(s) is q
  float s_label = 0.0f;
  if (p.has_ce) {
    const int64_t y = label < 0 ? 0 : (label >= V ? V - 1 : label);
    s_label = static_cast<float>(s_row[y]);
    if (p.has_softcap) s_label = softcap(s_label, p.cap, p.inv_cap);
  }

  // Pass 1.
  OnlineLse lse_a, lse_b, lse_s;
  float cross = 0.0f;
  for_row([&](int64_t, const auto& sv, const auto& tv) {
    constexpr int N = sizeof(sv) / sizeof(float);
    float a[N], b[N], e_a[N], e_b[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      a[k] = sv[k] * p.inv_t;
      b[k] = tv[k] * p.inv_t;
    }
    const float rescale_a = lse_a.step(a, e_a);
    const float rescale_b = lse_b.step(b, e_b);
    if (ce_own) {
      float e_s[N];
      lse_s.step(sv, e_s);
    }
    float c = 0.0f;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if constexpr (DIV == FORWARD_KL) {
        c += e_b[k] > 0.0f ? e_b[k] * (b[k] - a[k]) : 0.0f;
      } else if constexpr (DIV == SOFT_CE) {
        c -= e_b[k] > 0.0f ? e_b[k] * a[k] : 0.0f;
      } else if constexpr (DIV == REVERSE_KL) {
        c += e_a[k] > 0.0f ? e_a[k] * (a[k] - b[k]) : 0.0f;
      }
    }
    if constexpr (one_pass_loss(DIV)) cross = cross * (DIV == REVERSE_KL ? rescale_a : rescale_b) + c;
  });
  float maxima[3] = {lse_a.max, lse_b.max, lse_s.max};
  team_reduce(maxima, MaxOp{}, smem);
  const float shift_a = safe_shift(maxima[0]);
  const float shift_b = safe_shift(maxima[1]);
  const float shift_s = safe_shift(maxima[2]);
  float sums[4] = {lse_a.sum * Ops<float>::exp(lse_a.max - shift_a),
                   lse_b.sum * Ops<float>::exp(lse_b.max - shift_b),
                   lse_s.sum * Ops<float>::exp(lse_s.max - shift_s),
                   cross * Ops<float>::exp(DIV == REVERSE_KL ? lse_a.max - shift_a
                                                             : lse_b.max - shift_b)};
  team_reduce(sums, SumOp{}, smem);
  const float la = shift_a + logf(sums[0]);
  const float lb = shift_b + logf(sums[1]);
  const float ls = ce_own ? shift_s + logf(sums[2]) : la;

  // The loss, and S = sum_k q_k g_k for the gradient.
  float kd, qg_sum;
  if constexpr (DIV == FORWARD_KL) {
    kd = sums[3] / sums[1] + la - lb;
    qg_sum = -1.0f;
  } else if constexpr (DIV == SOFT_CE) {
    kd = sums[3] / sums[1] + la;
    qg_sum = -1.0f;
  } else if constexpr (DIV == REVERSE_KL) {
    kd = sums[3] / sums[0] + lb - la;
    qg_sum = kd + 1.0f;
  } else {
    float acc[2] = {0.0f, 0.0f};
    for_row([&](int64_t, const auto& sv, const auto& tv) {
      constexpr int N = sizeof(sv) / sizeof(float);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float log_q = sv[k] * p.inv_t - la;
        const float log_p = tv[k] * p.inv_t - lb;
        const Terms<float> terms = pointwise<DIV>(log_p, log_q, Ops<float>::exp(log_p),
                                                  Ops<float>::exp(log_q), p.mix);
        acc[0] += terms.loss;
        acc[1] += terms.qg;
      }
    });
    team_reduce(acc, SumOp{}, smem);
    kd = acc[0];
    qg_sum = acc[1];
  }
  if (tid == 0) {
    args.kd_out[row] = kd;
    if (p.has_ce) args.ce_out[row] = ls - s_label;
  }
  if (!g_row) return;

  team_sync();  // every read of the student row above is done before it may be overwritten
  const float scale = *args.grad_scale;
  const float kd_coef = p.kd_grad_coef * scale;
  const float ce_coef = p.ce_weight * scale;
  for_row([&](int64_t i, const auto& sv, const auto& tv) {
    constexpr int N = sizeof(sv) / sizeof(float);
    float g[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float log_q = sv[k] * p.inv_t - la;
      const float log_p = tv[k] * p.inv_t - lb;
      const float q = Ops<float>::exp(log_q);
      const float qg = pointwise<DIV>(log_p, log_q, Ops<float>::exp(log_p), q, p.mix).qg;
      g[k] = kd_coef * (qg - q * qg_sum);
      if (p.has_ce) {
        const float sm = ce_own ? Ops<float>::exp(sv[k] - ls) : q;
        g[k] += ce_coef * (sm - (i + k == label ? 1.0f : 0.0f));
      }
      if (p.has_softcap) g[k] *= softcap_grad(sv[k], p.inv_cap);
    }
    store_f32<N>(g_row + i, g);
  });
}

template <class T>
__global__ void scale_rows_kernel(T* grad, int64_t stride, const float* factor,
                                  int64_t factor_stride, int64_t V) {
  const int64_t row = blockIdx.x;
  const float f = factor[row * factor_stride];
  if (f == 1.0f) return;  // the common backward (grad_output == 1) touches nothing
  T* g = grad + row * stride;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    g[i] = static_cast<T>(static_cast<float>(g[i]) * f);
  }
}

// Threads per row: enough for about four packs each, from one warp up to kMaxTeam.
int team_size(int64_t V, int vec) {
  const int64_t packs = (V + vec - 1) / vec;
  int team = kWarp;
  while (team < kMaxTeam && static_cast<int64_t>(team) * 4 < packs) team *= 2;
  return team;
}

template <class ST, class TT>
void launch_typed(const KdRowsCall& call) {
  const KdRowsParams& p = call.p;
  RowArgs<ST, TT> args{};
  args.s = call.student.data_ptr<ST>();
  args.t = call.teacher.data_ptr<TT>();
  args.g = p.compute_grad ? call.grad.data_ptr<ST>() : nullptr;
  args.s_stride = call.student.stride(0);
  args.t_stride = call.teacher.stride(0);
  args.g_stride = p.compute_grad ? call.grad.stride(0) : 0;
  args.labels = p.has_labels ? call.labels.data_ptr<int64_t>() : nullptr;
  args.grad_scale = call.grad_scale.data_ptr<float>();
  args.kd_out = call.kd_rows.data_ptr<float>();
  args.ce_out = call.ce_rows.data_ptr<float>();
  args.p = p;

  const int team = team_size(p.V, pack_size<ST, TT>());
  const int rows_per_block = team == kWarp ? kRowsPerWarpBlock : 1;
  const dim3 block(team, rows_per_block);
  const int64_t n_blocks = (p.n_rows + rows_per_block - 1) / rows_per_block;
  TORCH_CHECK(n_blocks <= 0x7fffffff, "fastkd::kd_rows: too many rows for one launch");
  const dim3 grid(static_cast<unsigned>(n_blocks));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (p.divergence) {
#define FASTKD_LAUNCH(DIV)                                                  \
  case DIV:                                                                 \
    kd_rows_kernel<DIV, ST, TT><<<grid, block, 0, stream>>>(args);          \
    break;
    FASTKD_LAUNCH(FORWARD_KL)
    FASTKD_LAUNCH(SOFT_CE)
    FASTKD_LAUNCH(REVERSE_KL)
    FASTKD_LAUNCH(JSD)
    FASTKD_LAUNCH(SKEW_FORWARD_KL)
    FASTKD_LAUNCH(SKEW_REVERSE_KL)
    FASTKD_LAUNCH(TVD)
#undef FASTKD_LAUNCH
    default:
      TORCH_CHECK(false, "fastkd::kd_rows: unknown divergence code ", p.divergence);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class ST>
void launch_student(const KdRowsCall& call) {
  switch (call.teacher.scalar_type()) {
    case at::kFloat:
      return launch_typed<ST, float>(call);
    case at::kBFloat16:
      return launch_typed<ST, at::BFloat16>(call);
    default:
      return launch_typed<ST, at::Half>(call);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kd_rows_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& grad, const at::Tensor& grad_scale, int64_t divergence,
    double temperature, double param, std::optional<double> softcap, double kd_grad_coef,
    double ce_weight, int64_t ignore_index) {
  TORCH_CHECK(student.is_cuda(), "fastkd::kd_rows (CUDA): student must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(student.device());
  KdRowsCall call = prepare_kd_rows(student, teacher, labels, grad, grad_scale, divergence,
                                    temperature, param, softcap, kd_grad_coef, ce_weight,
                                    ignore_index);
  if (call.p.n_rows == 0) return {call.kd_rows, call.ce_rows};
  switch (student.scalar_type()) {
    case at::kFloat:
      launch_student<float>(call);
      break;
    case at::kBFloat16:
      launch_student<at::BFloat16>(call);
      break;
    default:
      launch_student<at::Half>(call);
  }
  return {call.kd_rows, call.ce_rows};
}

void scale_rows_cuda(at::Tensor& grad, const at::Tensor& factor) {
  TORCH_CHECK(grad.is_cuda(), "fastkd::scale_rows_ (CUDA): grad must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor f = prepare_scale_factor(grad, factor);
  const int64_t n_rows = grad.size(0);
  if (n_rows == 0) return;
  TORCH_CHECK(n_rows <= 0x7fffffff, "fastkd::scale_rows_: too many rows for one launch");
  const dim3 grid(static_cast<unsigned>(n_rows));
  const int64_t f_stride = f.dim() == 0 ? 0 : f.stride(0);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const float* fp = f.data_ptr<float>();
  switch (grad.scalar_type()) {
    case at::kFloat:
      scale_rows_kernel<float><<<grid, 256, 0, stream>>>(
          grad.data_ptr<float>(), grad.stride(0), fp, f_stride, grad.size(1));
      break;
    case at::kBFloat16:
      scale_rows_kernel<at::BFloat16><<<grid, 256, 0, stream>>>(
          grad.data_ptr<at::BFloat16>(), grad.stride(0), fp, f_stride, grad.size(1));
      break;
    default:
      scale_rows_kernel<at::Half><<<grid, 256, 0, stream>>>(
          grad.data_ptr<at::Half>(), grad.stride(0), fp, f_stride, grad.size(1));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fastkd
