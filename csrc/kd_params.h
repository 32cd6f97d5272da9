// The launch interface of the row kernels: plain data, no torch headers, so that the CPU
// (kd_cpu.cpp, kd_topk_cpu.cpp, kd_shard_cpu.cpp) and CUDA (kd_cuda.cu, kd_topk_cuda.cu) kernels compile
// without them; ops.cpp is their torch side (argument checks, outputs, streams, registration).
#pragma once

#include <cstdint>

#include "kd_math.h"

namespace fastkd {

// Everything a kernel needs besides the tensors' data pointers.
struct KdRowsParams {
  int64_t n_rows = 0;
  int64_t V = 0;
  int divergence = FORWARD_KL;
  float inv_t = 1.0f;      // 1 / temperature
  float cap = 0.0f;        // soft-cap c (when has_softcap)
  float inv_cap = 0.0f;    // 1 / c
  MixWeight mix{};         // mix_weight (beta or alpha) with its logs
  float kd_grad_coef = 0;  // kd_weight * (T^2 or 1) / T: dL/ds = kd_grad_coef * dD/da + ...
  float ce_weight = 0;
  int64_t ignore_index = -100;
  bool has_labels = false;
  bool has_ce = false;  // labels given and ce_weight != 0
  bool has_softcap = false;
  bool compute_grad = false;
};

// Input dtypes, taken at run time by the kernels (template arguments for each of the nine
// student/teacher pairs made the CUDA build 9x longer).
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// One call of the row kernel: fastkd::kd_rows's arguments after ops.cpp checked them.
struct KdRowsLaunch {
  const void* s;  // student rows (N, V), unit stride along V
  const void* t;  // teacher rows
  void* g;        // gradient rows in the student's dtype, or nullptr; may equal s
  int64_t s_stride, t_stride, g_stride;  // row strides in entries
  DType s_dtype, t_dtype;
  const int64_t* labels;          // (N,) or nullptr
  const float* reduction_factor;  // 0-d, on the kernel's device: the reduction's factor
  float* kd_per_row;              // (N,)
  float* ce_per_row;              // (N,), zero-initialised
  KdRowsParams p;
};

// --- Vocab-parallel shards (design.md §5) ---------------------------------------------------
// One phase of a rank's shard of (n_rows, V) columns [offset, offset + V) of the vocabulary
// (kd_shard_cpu.cpp; the contract is fastkd/_vocab_parallel.py's docstring).
enum ShardPhase : int { kShardStats = 0, kShardTerms = 1, kShardGrad = 2 };
// What kShardStats writes a row: the maxima of a = s/T and b = t/T and the sums of exp
// relative to them, the one-pass divergences' cross term relative to both maxima, the same
// maximum and sum of s at T = 1 (with CE), and the label's logit (0 off the shard).
enum ShardStat : int {
  kShardMaxA, kShardZA, kShardMaxB, kShardZB, kShardCross, kShardMaxS, kShardZS, kShardLabel,
  kNumShardStats
};
// What kShardTerms writes a row: the shard's sums of the loss terms, of q h, and TVD's sums
// of q where q > p and where q < p.
enum ShardTerm : int { kShardKd, kShardQh, kShardQAbove, kShardQBelow, kNumShardTerms };
// What kShardTerms and kShardGrad read a row: the whole row's constants (maxima made finite,
// log-sums), the sums of the terms, and the gradient's coefficients with the reduction's
// factor in them (kd_coef NaN for a row without distributions).
enum ShardConst : int {
  kConstMaxA, kConstLogZA, kConstMaxB, kConstLogZB, kConstMaxS, kConstLogZS, kConstQhSum,
  kConstQAbove, kConstQBelow, kConstKdCoef, kConstCeCoef, kNumShardConsts
};

struct KdShardLaunch {
  const void* s;  // student shard rows (n_rows, V), unit stride along V
  const void* t;  // teacher shard rows
  void* g;        // kShardGrad: gradient rows in the student's dtype; may equal s
  int64_t s_stride, t_stride, g_stride;  // row strides in entries
  DType s_dtype, t_dtype;
  const int64_t* labels;  // (n_rows,) global labels, or nullptr
  int64_t offset;         // the shard's first column in the vocabulary
  const float* consts;    // (n_rows, kNumShardConsts): kShardTerms, kShardGrad
  float* out;             // (n_rows, kNumShardStats or kNumShardTerms): kShardStats, kShardTerms
  int phase;
  KdRowsParams p;  // V is the shard's width; compute_grad unused
};

// --- Top-k teachers (design.md §4) ----------------------------------------------------------
// The two O(V) row functions of a top-k teacher (the contract: fastkd/_topk_rows.py); their
// formulas, and the columns of their stats and coefficients, are kd_math.h's.

// What both functions take besides the tensors.
struct TopKParams {
  int64_t n_rows = 0;
  int64_t V = 0;
  int64_t K = 0;        // pairs per row
  float inv_t = 1.0f;   // float32(1 / temperature)
  float cap = 0.0f;     // soft-cap c (when has_softcap)
  float inv_cap = 0.0f;
  int64_t ignore_index = -100;
  bool has_softcap = false;
};

// One fastkd::topk_row_stats call after ops.cpp checked it. The (n_rows, K) and smaller
// tensors are contiguous; the rows of V have unit stride along V.
struct TopKStatsLaunch {
  const void* s;  // student rows (n_rows, V)
  int64_t s_stride;
  DType s_dtype;
  const int64_t* ids;     // (n_rows, K); < 0: no pair
  const int64_t* labels;  // (n_rows,) or nullptr
  float* stats;           // (n_rows, kNumTopKStats)
  bool tail;              // log_z_out wanted
  bool ce;                // m_s, log_z_s wanted
  TopKParams p;
};

// One fastkd::topk_grad_rows call after ops.cpp checked it.
struct TopKGradLaunch {
  const void* s;  // student rows (n_rows, V)
  void* g;        // gradient rows in the student's dtype; may equal s
  int64_t s_stride, g_stride;
  DType s_dtype;
  const int64_t* ids;     // (n_rows, K)
  const void* s_at_ids;   // (n_rows, K), the student's logits at ids
  DType s_at_ids_dtype;
  const int64_t* labels;  // (n_rows,) or nullptr
  const float* stats;     // (n_rows, kNumTopKStats)
  const float* row_coefs;   // (n_rows, kNumTopKCoefs)
  const float* pair_grads;  // (n_rows, K)
  TopKParams p;
};

// The CPU kernels of one instruction set: fastkd._C_cpu_<isa> hands this table to fastkd._C
// in a PyCapsule named kCpuKernelsCapsule (fastkd/_extension.py connects them).
struct CpuKernels {
  int abi;  // kCpuKernelsAbi of the kd_params.h it was built with
  const char* isa;
  void (*kd_rows)(const KdRowsLaunch& args);
  void (*scale_rows)(void* grad, DType dtype, int64_t stride, const float* grad_output,
                     int64_t grad_output_stride, int64_t n_rows, int64_t V);
  void (*topk_row_stats)(const TopKStatsLaunch& args);
  void (*topk_grad_rows)(const TopKGradLaunch& args);
  void (*kd_shard_rows)(const KdShardLaunch& args);
};
// Bump when KdRowsLaunch, KdRowsParams, KdShardLaunch, the TopK* launch structs or this
// change.
constexpr int kCpuKernelsAbi = 5;
constexpr const char* kCpuKernelsCapsule = "fastkd.CpuKernels";

}  // namespace fastkd
