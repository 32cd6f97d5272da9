// CUDA top-k row kernels (design.md §4): topk_row_stats and topk_grad_rows of the contract in
// fastkd/_topk_rows.py. The formulas are kd_math.h's (topk_write_stats, TopKRowGrad); the
// packed loads, team reductions and online softmax are kd_cuda_rows.cuh's, as in kd_cuda.cu.
//
// One block per row (a team of kd_cuda_rows.cuh:team_size(V) threads); each thread reads packs
// of 8 entries, the entries before the first 16-byte aligned pack and after the last one one
// at a time.
//
// Stats  the online softmax of a = x / T, one exp per entry summed twice against the same
//        maxima: into z_a and, for the entries outside S, into z_out (the tail is summed,
//        never z_a minus the mass of S, which cancels when S holds nearly all of it); a second
//        exp only for CE at T != 1. S is a bitmap of V bits in dynamic shared memory, set from
//        the row's ids with atomicOr before the pass (ops.cpp checks that it fits).
// Grad   the dense form of g on every entry (one exp per entry, a second for CE at T != 1;
//        the label's one-hot by index), then, after the block synchronises, the pairs' entries
//        over them, their logits from student_at_ids: each thread reads an entry before it
//        writes it, so the row may be written over the student.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kd_cuda.h"
#include "kd_cuda_rows.cuh"
#include "kd_math.h"

namespace fastkd {
namespace {

static_assert(kMaxCudaVocab == 0x7fffffff - kMaxTeam,
              "kd_cuda.h's kMaxCudaVocab leaves room for a team's last stride");

// The entries of a row in 16-byte packs: [0, head) and [tail, V) one at a time, [head, tail)
// in packs of kPack, head being the first entry where the row (and the gradient row, when
// given) allows 16-byte accesses.
struct RowSpan {
  int head;
  int n_packs;
  int tail;
};

__device__ __forceinline__ RowSpan row_span(const void* row, const void* g_row, DType dt,
                                            int V) {
  int head = V;
  for (int h = 0; h < kPack && h < V; ++h) {
    if (aligned16(row, dt, h) && (!g_row || aligned16(g_row, dt, h))) {
      head = h;
      break;
    }
  }
  const int n_packs = (V - head) / kPack;
  return {head, n_packs, head + n_packs * kPack};
}

// Calls visit(i, x[N]) on every entry of the row this thread owns, x soft-capped, in
// float32, N = 1 or kPack.
template <class Visit>
__device__ __forceinline__ void for_row(const TopKParams& p, const void* row, DType dt,
                                        const RowSpan& span, int V, const Visit& visit) {
  const int tid = threadIdx.x;
  const int team = blockDim.x;
  const auto one = [&](int i, auto n_const) {
    constexpr int N = decltype(n_const)::value;
    float x[N];
    load_f32<N>(row, dt, i, x);
    if (p.has_softcap) {
#pragma unroll
      for (int k = 0; k < N; ++k) x[k] = softcap(x[k], p.cap, p.inv_cap);
    }
    visit(i, x);
  };
  using One = std::integral_constant<int, 1>;
  using Packed = std::integral_constant<int, kPack>;
  for (int i = tid; i < span.head; i += team) one(i, One{});
  for (int k = tid; k < span.n_packs; k += team) one(span.head + k * kPack, Packed{});
  for (int i = span.tail + tid; i < V; i += team) one(i, One{});
}

// __grid_constant__: the parameters are read in place, never copied to local memory.
__global__ void __launch_bounds__(kMaxTeam, kMinBlocksPerSm)
    topk_row_stats_kernel(const __grid_constant__ TopKStatsLaunch args) {
  extern __shared__ uint32_t in_s[];  // the tail's membership bitmap: bit j is id j in S
  __shared__ float smem[3 * kMaxWarps];  // team_reduce of up to 3 values
  const TopKParams& p = args.p;
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const int team = blockDim.x;
  const int V = static_cast<int>(p.V);  // launch_topk_row_stats: V <= kMaxCudaVocab
  float* out = args.stats + row * kNumTopKStats;
  if (args.labels && args.labels[row] == p.ignore_index) {
    if (tid < kNumTopKStats) out[tid] = 0.0f;
    return;
  }
  const DType dt = args.s_dtype;
  const void* s_row = static_cast<const char*>(args.s) + row * args.s_stride * elem_size(dt);
  if (args.tail) {
    const int64_t* ids = args.ids + row * p.K;
    for (int w = tid; w < (V + 31) / 32; w += team) in_s[w] = 0u;
    __syncthreads();
    for (int64_t k = tid; k < p.K; k += team) {
      const int64_t id = ids[k];
      // Ids outside [0, V) are the caller's to exclude; skipped, never out of bounds.
      if (id >= 0 && id < V) atomicOr(&in_s[id >> 5], 1u << (id & 31));
    }
    __syncthreads();
  }

  const bool ce_own = args.ce && p.inv_t != 1.0f;  // else x's softmax is a's
  OnlineLse lse_a, lse_s;
  float z_out = 0.0f;  // against lse_a's maxima
  for_row(p, s_row, dt, row_span(s_row, nullptr, dt, V), V, [&](int i, const auto& x) {
    constexpr int N = sizeof(x) / sizeof(float);
    float a[N], e[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      // Rounded products (never fused into the subtraction of the maximum, which was
      // taken of these rounded values), as kd_cuda.cu.
      a[k] = __fmul_rn(x[k], p.inv_t);
    }
    const LseStep step_a = lse_a.step(a, e);
    if (args.tail) {
      float outside = 0.0f;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const int j = i + k;
        outside += (in_s[j >> 5] >> (j & 31)) & 1u ? 0.0f : e[k];
      }
      z_out = z_out * step_a.rescale + outside;
    }
    if (ce_own) {
      float e_s[N];
      lse_s.step(x, e_s);
    }
  });
  float maxima[2] = {lse_a.max, lse_s.max};
  team_reduce(maxima, MaxOp{}, smem);
  // Each thread's sums, moved to the team's maxima before they are added.
  const float to_team_a = lse_move(lse_a.max, maxima[0]).rescale;
  float sums[3] = {lse_a.sum * to_team_a, z_out * to_team_a,
                   lse_s.sum * lse_move(lse_s.max, maxima[1]).rescale};
  team_reduce(sums, SumOp{}, smem);
  if (tid == 0) {
    topk_write_stats(out, maxima[0], sums[0], sums[1], maxima[1], sums[2], args.tail, args.ce,
                     ce_own);
  }
}

__global__ void __launch_bounds__(kMaxTeam, kMinBlocksPerSm)
    topk_grad_rows_kernel(const __grid_constant__ TopKGradLaunch args) {
  const TopKParams& p = args.p;
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const int team = blockDim.x;
  const int V = static_cast<int>(p.V);  // launch_topk_grad_rows: V <= kMaxCudaVocab
  const DType dt = args.s_dtype;
  const void* s_row = static_cast<const char*>(args.s) + row * args.s_stride * elem_size(dt);
  void* g_row = static_cast<char*>(args.g) + row * args.g_stride * elem_size(dt);
  const int64_t label = args.labels ? args.labels[row] : -1;
  if (args.labels && label == p.ignore_index) {
    const float zero[1] = {0.0f};
    for (int i = tid; i < V; i += team) store_f32<1>(g_row, dt, i, zero);
    return;
  }
  const TopKRowGrad rg =
      topk_row_grad(args.stats + row * kNumTopKStats, args.row_coefs + row * kNumTopKCoefs,
                    p.inv_t, args.labels != nullptr);
  const int label_in_row = rg.has_ce && label >= 0 && label < V ? static_cast<int>(label) : -1;

  for_row(p, s_row, dt, row_span(s_row, g_row, dt, V), V, [&](int i, const auto& x) {
    constexpr int N = sizeof(x) / sizeof(float);
    float g[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      g[k] = topk_dense_grad(p, rg, __fmul_rn(x[k], p.inv_t), x[k],
                             i + k == label_in_row ? 1.0f : 0.0f);
    }
    store_f32<N>(g_row, dt, i, g);
  });
  // The pairs' entries replace the dense form's (and the label's, when in S): after every
  // thread's dense writes.
  __syncthreads();
  const int64_t* ids = args.ids + row * p.K;
  for (int64_t k = tid; k < p.K; k += team) {
    const int64_t id = ids[k];
    if (id < 0 || id >= V) continue;  // padding (ids >= V: the caller's to exclude)
    float x[1];
    load_f32<1>(args.s_at_ids, args.s_at_ids_dtype, row * p.K + k, x);
    if (p.has_softcap) x[0] = softcap(x[0], p.cap, p.inv_cap);
    const float g[1] = {topk_pair_grad(p, rg, __fmul_rn(x[0], p.inv_t), x[0],
                                       args.pair_grads[row * p.K + k],
                                       rg.has_ce && id == label ? 1.0f : 0.0f)};
    store_f32<1>(g_row, dt, id, g);
  }
}

}  // namespace

cudaError_t launch_topk_row_stats(const TopKStatsLaunch& args, cudaStream_t stream) {
  const TopKParams& p = args.p;
  if (p.n_rows == 0) return cudaSuccess;
  if (p.V > kMaxCudaVocab) return cudaErrorInvalidValue;
  if (p.n_rows > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const int64_t bitmap = args.tail ? topk_bitmap_bytes(p.V) : 0;
  // Above the 48 KB every block may take, the kernel must ask for its dynamic shared memory.
  constexpr int64_t kDefaultSharedBytes = 48 * 1024;
  if (bitmap > kDefaultSharedBytes) {
    const cudaError_t error = cudaFuncSetAttribute(
        topk_row_stats_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
        static_cast<int>(bitmap));
    if (error != cudaSuccess) return error;
  }
  topk_row_stats_kernel<<<static_cast<unsigned>(p.n_rows), team_size(p.V),
                          static_cast<size_t>(bitmap), stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launch_topk_grad_rows(const TopKGradLaunch& args, cudaStream_t stream) {
  const TopKParams& p = args.p;
  if (p.n_rows == 0) return cudaSuccess;
  if (p.V > kMaxCudaVocab) return cudaErrorInvalidValue;
  if (p.n_rows > 0x7fffffff) return cudaErrorInvalidConfiguration;
  topk_grad_rows_kernel<<<static_cast<unsigned>(p.n_rows), team_size(p.V), 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace fastkd
