// The device helpers of the CUDA row kernels (kd_cuda.cu, kd_topk_cuda.cu): packed loads and
// stores of the three dtypes, reductions across a row's team of threads, a thread's online
// softmax, and the team size for a row length.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kd_math.h"
#include "kd_params.h"

namespace fastkd {
// Internal linkage: each kernel file gets its own copy.
namespace {

constexpr int kWarp = 32;
constexpr int kMaxTeam = 512;  // threads per row at most
// Blocks of kMaxTeam threads resident per SM: __launch_bounds__ caps the row kernels at
// 64 registers a thread (65536 / (512 * 2)); tests/test_cuda_resources.py checks that they
// fit without spilling.
constexpr int kMinBlocksPerSm = 2;
constexpr int kMaxWarps = kMaxTeam / kWarp;
constexpr int kPack = 8;  // entries per pack

__device__ __forceinline__ int elem_size(DType dt) { return dt == kF32 ? 4 : 2; }

// Whether entry h of the row at ptr starts a 16-byte aligned access.
__device__ __forceinline__ bool aligned16(const void* ptr, DType dt, int64_t h) {
  const int elem = elem_size(dt);
  return (reinterpret_cast<uintptr_t>(ptr) / elem + h) % (16 / elem) == 0;
}

// The conversions of the 16-bit dtypes (bfloat16, float16), overloaded on the type, so that
// one template loads and stores both; a pack of two converts in one instruction.
struct Conv16 {
  __device__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static float to_float(__half x) { return __half2float(x); }
  __device__ static float2 to_float2(__nv_bfloat162 x) { return __bfloat1622float2(x); }
  __device__ static float2 to_float2(__half2 x) { return __half22float2(x); }
  __device__ static void round(float x, __nv_bfloat16& out) { out = __float2bfloat16_rn(x); }
  __device__ static void round(float x, __half& out) { out = __float2half_rn(x); }
  __device__ static void round2(float x, float y, __nv_bfloat162& out) {
    out = __floats2bfloat162_rn(x, y);
  }
  __device__ static void round2(float x, float y, __half2& out) { out = __floats2half2_rn(x, y); }
};
template <class H>
using Pair16 = std::conditional_t<std::is_same_v<H, __half>, __half2, __nv_bfloat162>;
// The one aligned access of N 16-bit entries: 16 bytes for 8, 8 bytes for 4.
template <int N>
using Raw16 = std::conditional_t<N == 8, uint4, uint2>;

template <class H, int N>
__device__ __forceinline__ void load_16bit(const void* row, int64_t i, float (&out)[N]) {
  const H* p = static_cast<const H*>(row) + i;
  if constexpr (N == 1) {
    out[0] = Conv16::to_float(*p);
  } else {
    static_assert(N == 8 || N == 4, "a pack of 16-bit entries is one 16- or 8-byte load");
    const Raw16<N> raw = *reinterpret_cast<const Raw16<N>*>(p);
    const auto* pairs = reinterpret_cast<const Pair16<H>*>(&raw);
#pragma unroll
    for (int k = 0; k < N / 2; ++k) {
      const float2 f = Conv16::to_float2(pairs[k]);
      out[2 * k] = f.x;
      out[2 * k + 1] = f.y;
    }
  }
}

template <class H, int N>
__device__ __forceinline__ void store_16bit(void* row, int64_t i, const float (&in)[N]) {
  H* p = static_cast<H*>(row) + i;
  if constexpr (N == 1) {
    Conv16::round(in[0], *p);
  } else {
    static_assert(N == 8 || N == 4, "a pack of 16-bit entries is one 16- or 8-byte store");
    Raw16<N> raw;
    auto* pairs = reinterpret_cast<Pair16<H>*>(&raw);
#pragma unroll
    for (int k = 0; k < N / 2; ++k) Conv16::round2(in[2 * k], in[2 * k + 1], pairs[k]);
    *reinterpret_cast<Raw16<N>*>(p) = raw;
  }
}

// N (1 or kPack) entries from i, as float32.
template <int N>
__device__ __forceinline__ void load_f32(const void* row, DType dt, int64_t i, float (&out)[N]) {
  if (dt == kF32) {
    const float* p = static_cast<const float*>(row) + i;
    if constexpr (N == 1) {
      out[0] = *p;
    } else {
#pragma unroll
      for (int h = 0; h < N / 4; ++h) {
        const float4 v = *reinterpret_cast<const float4*>(p + 4 * h);
        out[4 * h] = v.x;
        out[4 * h + 1] = v.y;
        out[4 * h + 2] = v.z;
        out[4 * h + 3] = v.w;
      }
    }
  } else if (dt == kBF16) {
    load_16bit<__nv_bfloat16>(row, i, out);
  } else {
    load_16bit<__half>(row, i, out);
  }
}

// N entries from i, rounded to the row's dtype (round to nearest even).
template <int N>
__device__ __forceinline__ void store_f32(void* row, DType dt, int64_t i, const float (&in)[N]) {
  if (dt == kF32) {
    float* p = static_cast<float*>(row) + i;
    if constexpr (N == 1) {
      *p = in[0];
    } else {
#pragma unroll
      for (int h = 0; h < N / 4; ++h) {
        *reinterpret_cast<float4*>(p + 4 * h) =
            make_float4(in[4 * h], in[4 * h + 1], in[4 * h + 2], in[4 * h + 3]);
      }
    }
  } else if (dt == kBF16) {
    store_16bit<__nv_bfloat16>(row, i, in);
  } else {
    store_16bit<__half>(row, i, in);
  }
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

  // Folds in N entries; returns the move of the maximum and writes exp(x - max).
  template <int N>
  __device__ __forceinline__ LseStep step(const float (&x)[N], float (&e)[N]) {
    float block_max = x[0];
#pragma unroll
    for (int k = 1; k < N; ++k) block_max = fmaxf(block_max, x[k]);
    const LseStep st = lse_step(max, block_max);
    sum *= st.rescale;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      e[k] = Ops<float>::exp(x[k] - st.shift);
      sum += e[k];
    }
    return st;
  }
};

// Threads per row: enough for about four packs each, from one warp up to kMaxTeam.
inline int team_size(int64_t V) {
  const int64_t packs = (V + kPack - 1) / kPack;
  int team = kWarp;
  while (team < kMaxTeam && static_cast<int64_t>(team) * 4 < packs) team *= 2;
  return team;
}

}  // namespace
}  // namespace fastkd
