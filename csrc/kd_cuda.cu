// CUDA row kernel of KDLoss: design.md §3 (how the kernels work) on a GPU, with §2's
// precision. The formulas of §1 and of the passes are kd_math.h's; this file walks the rows,
// packs the loads and reduces across threads.
//
// A team of threads walks one row: a whole block (64..512 threads) when the row is long, or a
// single warp, several rows to a block, when it is short. Each thread reads packs of 8
// entries (one 16-byte load of bf16/fp16, two of fp32; 4 entries in pass 2, for registers)
// and keeps its own online softmax; teams combine them with warp shuffles, then through
// shared memory across the block's warps.
// The entries before the first aligned pack and after the last one are read one at a time;
// so is a whole row whose student, teacher and gradient rows cannot be aligned together.
//
// Pass 1  log-sum-exps of a = s/T and b = t/T (and of s when CE is on and T != 1); for
//         forward_kl, soft_ce and reverse_kl also the cross term (kd_math.h:cross_term), so
//         the loss is known here (loss_from_pass1).
// Pass 2  (jsd, skew KLs, tvd) the loss terms and S = sum_k q_k h_k (kd_math.h:pointwise).
// Grad    dL/ds_j (kd_math.h:grad_entry), its terms recomputed from the inputs (nothing of
//         the row is kept between passes). Each thread reads an entry before it writes it,
//         and every earlier read of the row happens before the team synchronises, so the
//         gradient may be written over the student row.
//
// One kernel per divergence; the input dtypes are kernel arguments, read by a branch that is
// the same for every thread (nine dtype pairs as template arguments made the build 9x
// longer for no measurable gain in a kernel bound by memory and exp). Row offsets are int64
// (N * V passes 2^31).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "kd_cuda.h"
#include "kd_cuda_rows.cuh"
#include "kd_math.h"

namespace fastkd {
namespace {

constexpr int kRowsPerWarpBlock = 8;  // rows per block when a warp walks a row

template <int DIV>
// __grid_constant__: the parameters are read in place, never copied to local memory.
__global__ void __launch_bounds__(kMaxTeam, kMinBlocksPerSm)
    kd_rows_kernel(const __grid_constant__ KdRowsLaunch args) {
  __shared__ float smem[4 * kMaxWarps];  // team_reduce of up to 4 values
  const KdRowsParams& p = args.p;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= p.n_rows) return;  // only in warp-per-row blocks, which never sync the block
  const int tid = threadIdx.x;
  const int team = blockDim.x;
  const int V = static_cast<int>(p.V);  // entries of a row index in 32 bits (launch_kd_rows)
  const DType s_dt = args.s_dtype;
  const DType t_dt = args.t_dtype;
  const void* s_row = static_cast<const char*>(args.s) + row * args.s_stride * elem_size(s_dt);
  const void* t_row = static_cast<const char*>(args.t) + row * args.t_stride * elem_size(t_dt);
  void* g_row =
      args.g ? static_cast<char*>(args.g) + row * args.g_stride * elem_size(s_dt) : nullptr;

  const int64_t label = args.labels ? args.labels[row] : -1;
  if (args.labels && label == p.ignore_index) {
    if (tid == 0) args.kd_per_row[row] = 0.0f;  // ce_per_row is zero-initialised
    if (g_row) {
      const float zero[1] = {0.0f};
      for (int64_t i = tid; i < V; i += team) store_f32<1>(g_row, s_dt, i, zero);
    }
    return;
  }

  // Entries [0, head) and [tail, V) one at a time, [head, tail) in packs: head is the first
  // entry where the student, teacher and gradient rows all allow 16-byte accesses.
  int head = V;
  for (int h = 0; h < kPack && h < V; ++h) {
    if (aligned16(s_row, s_dt, h) && aligned16(t_row, t_dt, h) &&
        (!g_row || aligned16(g_row, s_dt, h))) {
      head = h;
      break;
    }
  }
  const int n_packs = (V - head) / kPack;
  const int tail = head + n_packs * kPack;

  // Calls visit(i, s[N], t[N]) on every entry this thread owns, soft-capped, in float32;
  // [head, tail) in packs of `pack` entries: kPack, or half of it for pass 2 (an 8-byte
  // load of 16-bit entries), whose per-entry work with 8 entries in flight does not fit 64
  // registers (__launch_bounds__ above) for every divergence.
  const auto for_row = [&](const auto& visit, auto pack_const) {
    constexpr int P = decltype(pack_const)::value;
    static_assert(kPack % P == 0, "a pack divides the aligned packs of kPack");
    const auto one = [&](int i, auto n_const) {
      constexpr int N = decltype(n_const)::value;
      float sv[N], tv[N];
      load_f32<N>(s_row, s_dt, i, sv);
      load_f32<N>(t_row, t_dt, i, tv);
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
    using Packed = std::integral_constant<int, P>;
    const int n = n_packs * (kPack / P);
    for (int i = tid; i < head; i += team) one(i, One{});
    for (int k = tid; k < n; k += team) one(head + k * P, Packed{});
    for (int i = tail + tid; i < V; i += team) one(i, One{});
  };

  const bool ce_own = p.has_ce && p.inv_t != 1.0f;  // else softmax(s) is q
  float s_label = 0.0f;
  if (p.has_ce) {
    float y_val[1];
    load_f32<1>(s_row, s_dt, label < 0 ? 0 : (label >= V ? V - 1 : label), y_val);
    s_label = p.has_softcap ? softcap(y_val[0], p.cap, p.inv_cap) : y_val[0];
  }

  const int label_in_row = label >= 0 && label < V ? static_cast<int>(label) : -1;
  // Pass 1.
  OnlineLse lse_a, lse_b, lse_s;
  float cross = 0.0f;  // kd_math.h: cross_term
  // One online-softmax step over N entries.
  const auto pass1_step = [&](const auto& sv, const auto& tv) {
    constexpr int N = sizeof(sv) / sizeof(float);
    float a[N], b[N], e_a[N], e_b[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      // Rounded products (never fused into a later subtraction of the maximum, which was
      // taken of these rounded values): a V = 1 row's divergence stays exactly 0.
      a[k] = __fmul_rn(sv[k], p.inv_t);
      b[k] = __fmul_rn(tv[k], p.inv_t);
    }
    const float z_side_old = cross_side<DIV>(lse_a.sum, lse_b.sum);
    const LseStep step_a = lse_a.step(a, e_a);
    const LseStep step_b = lse_b.step(b, e_b);
    if (ce_own) {
      float e_s[N];
      lse_s.step(sv, e_s);
    }
    if constexpr (one_pass_loss(DIV)) {
      float c = 0.0f;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        c += cross_term<DIV>(a[k] - step_a.shift, b[k] - step_b.shift, e_a[k], e_b[k]);
      }
      cross = rebase_cross<DIV>(cross, z_side_old, step_a, step_b) + c;
    }
  };
  for_row([&](int, const auto& sv, const auto& tv) {
    constexpr int N = sizeof(sv) / sizeof(float);
    // Online-softmax steps over half a pack: a, b, e_a, e_b (and the cross term's operands)
    // of 8 entries at once do not fit 64 registers (__launch_bounds__ above) with the CE
    // softmax of s beside them. The 16-byte loads stay; a half step costs one more rescale
    // (two or three exps) per 8 entries.
    constexpr int H = N == kPack ? kPack / 2 : N;
#pragma unroll
    for (int h = 0; h < N; h += H) {
      float s_half[H], t_half[H];
#pragma unroll
      for (int k = 0; k < H; ++k) {
        s_half[k] = sv[h + k];
        t_half[k] = tv[h + k];
      }
      pass1_step(s_half, t_half);
    }
  }, std::integral_constant<int, kPack>{});
  float maxima[3] = {lse_a.max, lse_b.max, lse_s.max};
  team_reduce(maxima, MaxOp{}, smem);
  // Each thread's sums, moved to the team's maxima before they are added.
  const LseStep to_team_a = lse_move(lse_a.max, maxima[0]);
  const LseStep to_team_b = lse_move(lse_b.max, maxima[1]);
  float sums[4] = {lse_a.sum * to_team_a.rescale, lse_b.sum * to_team_b.rescale,
                   lse_s.sum * lse_move(lse_s.max, maxima[2]).rescale,
                   rebase_cross<DIV>(cross, cross_side<DIV>(lse_a.sum, lse_b.sum), to_team_a,
                                     to_team_b)};
  team_reduce(sums, SumOp{}, smem);
  const RowLse row_a = row_lse(maxima[0], sums[0]);
  const RowLse row_b = row_lse(maxima[1], sums[1]);
  const RowLse row_ce = ce_own ? row_lse(maxima[2], sums[2]) : row_a;  // softmax(s) at T = 1

  // The §1 table at one entry, from the (soft-capped) logits: pass 2 and the gradient
  // recompute it rather than keep anything of the row.
  struct Entry {
    Terms<float> terms;
    float q;
  };
  const auto entry = [&](float s, float t) {
    const float a = __fmul_rn(s, p.inv_t);  // as in pass 1
    const float b = __fmul_rn(t, p.inv_t);
    const float log_q = log_softmax(a, row_a);
    const float log_p = log_softmax(b, row_b);
    const float q = Ops<float>::exp(log_q);
    return Entry{pointwise<DIV>(log_p, log_q, Ops<float>::exp(log_p), q,
                                log_ratio(a, b, row_a, row_b), p.mix),
                 q};
  };

  RowSums row_sums;
  if constexpr (one_pass_loss(DIV)) {
    row_sums = loss_from_pass1<DIV>(sums[3], row_a, row_b);
  } else {
    Pass2Sums<DIV, float> mine;
    for_row([&](int, const auto& sv, const auto& tv) {
      constexpr int N = sizeof(sv) / sizeof(float);
#pragma unroll
      for (int k = 0; k < N; ++k) mine.add(entry(sv[k], tv[k]).terms);
    }, std::integral_constant<int, kPack / 2>{});
    float acc[4] = {mine.kd, mine.qh, mine.q_above, mine.q_below};
    team_reduce(acc, SumOp{}, smem);
    row_sums = {acc[0], acc[1], acc[2], acc[3]};
  }
  const float no_distribution = nan_unless_distributions(row_a.z, row_b.z);
  if (tid == 0) {
    args.kd_per_row[row] = row_sums.kd + no_distribution;
    if (p.has_ce) args.ce_per_row[row] = ce_loss(row_ce, s_label);
  }
  if (!g_row) return;

  team_sync();  // every read of the student row above is done before it may be overwritten
  const RowGrad grad =
      row_grad(row_sums, no_distribution, *args.reduction_factor, p.kd_grad_coef, p.ce_weight);
  for_row([&](int i, const auto& sv, const auto& tv) {
    constexpr int N = sizeof(sv) / sizeof(float);
    float g[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const Entry e = entry(sv[k], tv[k]);
      const auto ce = [&] {
        return CeEntry<float>{ce_own ? Ops<float>::exp(log_softmax(sv[k], row_ce)) : e.q,
                              i + k == label_in_row ? 1.0f : 0.0f};
      };
      g[k] = grad_entry<DIV>(p, grad, e.terms.qh, e.q, ce, [&] { return sv[k]; });
    }
    store_f32<N>(g_row, s_dt, i, g);
  }, std::integral_constant<int, kPack>{});
}

__global__ void scale_rows_kernel(void* grad, DType dt, int64_t stride, const float* grad_output,
                                  int64_t grad_output_stride, int64_t V) {
  const int64_t row = blockIdx.x;
  const float go = grad_output[row * grad_output_stride];
  if (go == 1.0f) return;  // the common backward (grad_output == 1) touches nothing
  void* g = static_cast<char*>(grad) + row * stride * elem_size(dt);
  // As the row kernel: entries before the first 16-byte aligned pack and after the last one
  // one at a time, the packs with its 16-byte loads and stores.
  int64_t head = V;
  for (int h = 0; h < kPack && h < V; ++h) {
    if (aligned16(g, dt, h)) {
      head = h;
      break;
    }
  }
  const int64_t n_packs = (V - head) / kPack;
  const int64_t tail = head + n_packs * kPack;
  const auto scale = [&](int64_t i, auto n_const) {
    constexpr int N = decltype(n_const)::value;
    float x[N];
    load_f32<N>(g, dt, i, x);
#pragma unroll
    for (int k = 0; k < N; ++k) x[k] *= go;
    store_f32<N>(g, dt, i, x);
  };
  using One = std::integral_constant<int, 1>;
  using Packed = std::integral_constant<int, kPack>;
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) scale(i, One{});
  for (int64_t k = threadIdx.x; k < n_packs; k += blockDim.x) scale(head + k * kPack, Packed{});
  for (int64_t i = tail + threadIdx.x; i < V; i += blockDim.x) scale(i, One{});
}

using KernelFn = void (*)(const KdRowsLaunch);

// kd_rows_kernel<DIV> for every divergence code, indexed by it.
template <int... DIVS>
constexpr std::array<KernelFn, sizeof...(DIVS)> kernel_table(std::integer_sequence<int, DIVS...>) {
  return {&kd_rows_kernel<DIVS>...};
}

}  // namespace

cudaError_t launch_kd_rows(const KdRowsLaunch& args, cudaStream_t stream) {
  const KdRowsParams& p = args.p;
  if (p.n_rows == 0) return cudaSuccess;
  // In-row indices are 32-bit (a register fewer each), with room for the last step of a
  // team's stride; row offsets stay 64-bit. The Triton kernel takes V as int32 too.
  if (p.V > 0x7fffffff - kMaxTeam) return cudaErrorInvalidValue;
  const int team = team_size(p.V);
  const int rows_per_block = team == kWarp ? kRowsPerWarpBlock : 1;
  const int64_t n_blocks = (p.n_rows + rows_per_block - 1) / rows_per_block;
  if (n_blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(n_blocks));
  const dim3 block(team, rows_per_block);
  if (p.divergence < 0 || p.divergence >= kNumDivergences) return cudaErrorInvalidValue;
  static constexpr auto table = kernel_table(std::make_integer_sequence<int, kNumDivergences>{});
  table[p.divergence]<<<grid, block, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launch_scale_rows(void* grad, DType dtype, int64_t stride, const float* grad_output,
                              int64_t grad_output_stride, int64_t n_rows, int64_t V,
                              cudaStream_t stream) {
  if (n_rows == 0) return cudaSuccess;
  if (n_rows > 0x7fffffff) return cudaErrorInvalidConfiguration;
  scale_rows_kernel<<<static_cast<unsigned>(n_rows), 256, 0, stream>>>(
      grad, dtype, stride, grad_output, grad_output_stride, V);
  return cudaGetLastError();
}

}  // namespace fastkd
