// The float32 vector primitives of the CPU kernels (kd_cpu.cpp, kd_topk_cpu.cpp,
// kd_shard_cpu.cpp): kd_math.h's Ops for at::vec::Vectorized<float>, vector loops over a row
// with a short last vector, the conversions of the input dtypes, and the declarations of the
// other files' kernels. The files are compiled into each fastkd._C_cpu_<isa> module, once per
// instruction set (setup.py), so that Vec is that set's vector.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kd_math.h"
#include "kd_params.h"

// A function one CPU file of a module calls in another: hidden from other shared objects, so
// that each instruction set's module keeps its own (their names are the same).
#if defined(__GNUC__)
#define FASTKD_MODULE_LOCAL __attribute__((visibility("hidden")))
#else
#define FASTKD_MODULE_LOCAL
#endif

namespace fastkd {

using Vec = at::vec::Vectorized<float>;

template <>
struct Ops<Vec> {
  // Sleef exp (1 ulp). at::vec's inline exp_u20 is ~15% faster here, but it maps NaN to a
  // finite value: a NaN logit must give a NaN loss and gradient (GradScaler looks for it).
  static Vec exp(const Vec& x) { return x.exp(); }
  static Vec tanh(const Vec& x) { return x.tanh(); }
  static Vec abs(const Vec& x) { return x.abs(); }
  static Vec max(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }
  static Vec gt(const Vec& a, const Vec& b) { return a > b; }
  static Vec lt(const Vec& a, const Vec& b) { return a < b; }
  static Vec select(const Vec& m, const Vec& a, const Vec& b) { return Vec::blendv(b, a, m); }
};

// Internal linkage: the helpers of one instruction set's module stay in it.
namespace {

constexpr int64_t kVec = Vec::size();
// Entries per online-softmax step: 8 KB of each float32 row, so a chunk's inputs and kept
// exponentials stay in L1 between its max and its exp loops.
constexpr int64_t kChunk = 2048;
static_assert(kChunk % 64 == 0, "chunks hold whole vectors of every width");

// Calls body(j, count) over [0, n) in vectors: count == kVec except for a shorter last one.
template <class Body>
inline void for_each_vec(int64_t n, const Body& body) {
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) body(j, kVec);
  if (j < n) body(j, n - j);
}

// count entries from ptr; the lanes past count read as `pad`.
inline Vec load(const float* ptr, int64_t count, float pad) {
  if (count == kVec) return Vec::loadu(ptr);
  return Vec::set(Vec(pad), Vec::loadu(ptr, count), count);
}

// Horizontal max and sum of a vector (once per chunk, so plain loops over its lanes).
inline float hmax(const Vec& v) {
  alignas(64) float lanes[kVec];
  v.store(lanes);
  float r = lanes[0];
  for (int64_t k = 1; k < kVec; ++k) r = std::max(r, lanes[k]);
  return r;
}
inline float hsum(const Vec& v) {
  alignas(64) float lanes[kVec];
  v.store(lanes);
  float r = 0.0f;
  for (int64_t k = 0; k < kVec; ++k) r += lanes[k];
  return r;
}

inline float max_of(const float* x, int64_t n) {
  Vec acc(kNegInf);
  for_each_vec(n, [&](int64_t j, int64_t c) {
    acc = at::vec::maximum(acc, load(x + j, c, kNegInf));
  });
  return hmax(acc);
}

// dst[0:n] = float(src[0:n]).
template <class T>
void to_float(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    using VecT = at::vec::Vectorized<T>;
    int64_t j = 0;
    for (; j + VecT::size() <= n; j += VecT::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(VecT::loadu(src + j));
      lo.store(dst + j);
      hi.store(dst + j + kVec);
    }
    for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
  }
}

inline void row_to_float(const void* src, DType dtype, float* dst, int64_t n) {
  switch (dtype) {
    case kF32:
      return to_float(static_cast<const float*>(src), dst, n);
    case kBF16:
      return to_float(static_cast<const c10::BFloat16*>(src), dst, n);
    default:
      return to_float(static_cast<const c10::Half*>(src), dst, n);
  }
}

inline void row_from_float(const float* src, DType dtype, void* dst, int64_t n) {
  switch (dtype) {
    case kF32:
      return at::vec::convert(src, static_cast<float*>(dst), n);
    case kBF16:
      return at::vec::convert(src, static_cast<c10::BFloat16*>(dst), n);
    default:
      return at::vec::convert(src, static_cast<c10::Half*>(dst), n);
  }
}

inline int64_t elem_size(DType dtype) { return dtype == kF32 ? 4 : 2; }

// The float32, soft-capped view of one input row of p.V entries: the input itself when it
// already is that, else buf.
inline const float* float_row(const char* src, DType dtype, const KdRowsParams& p,
                              std::vector<float>& buf) {
  if (dtype == kF32 && !p.has_softcap) return reinterpret_cast<const float*>(src);
  buf.resize(p.V);
  row_to_float(src, dtype, buf.data(), p.V);
  if (p.has_softcap) {
    float* x = buf.data();
    for_each_vec(p.V, [&](int64_t j, int64_t c) {
      softcap(Vec::loadu(x + j, c), p.cap, p.inv_cap).store(x + j, c);
    });
  }
  return buf.data();
}

}  // namespace

// kd_topk_cpu.cpp: the top-k row kernels (design.md §4) of the module's CpuKernels table.
FASTKD_MODULE_LOCAL void topk_row_stats_cpu(const TopKStatsLaunch& args);
FASTKD_MODULE_LOCAL void topk_grad_rows_cpu(const TopKGradLaunch& args);
// kd_shard_cpu.cpp: a vocab-parallel shard's phases (design.md §5).
FASTKD_MODULE_LOCAL void kd_shard_rows_cpu(const KdShardLaunch& args);

}  // namespace fastkd
