// CUDA built-ins for running CuPy-generated kernel source on the host with g++.
//
// Included before CuPy's own headers (carray.cuh, float16.cuh, ...), which are
// used unchanged: the CArray indexing, broadcasting and float16 rounding that
// run here are CuPy's.  A block's threads are real std::threads so that
// __syncthreads() and __shared__ memory behave as on the device; blocks run
// one after another.  Fast intrinsics are exact here (approximate on a GPU):
// compare with tolerances.
#pragma once

#include <math.h>
#include <string.h>
#include <stddef.h>
#include <assert.h>
#include <stdint.h>
#include <barrier>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
// Blocks run one at a time, so a function-static array is the block's shared memory.
#define __shared__ static

struct bpgpu_dim3 { unsigned int x = 0, y = 0, z = 0; };
inline thread_local bpgpu_dim3 threadIdx, blockIdx;
inline bpgpu_dim3 blockDim, gridDim;
inline thread_local std::barrier<>* bpgpu_block_barrier = nullptr;
inline void __syncthreads() { if (bpgpu_block_barrier) bpgpu_block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { __syncthreads(); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// Untyped min/max are CUDA overloads (fminf/fmaxf semantics for floating point).
#define BPGPU_MINMAX(T, MIN, MAX) \
  inline T min(T a, T b) { return MIN; } \
  inline T max(T a, T b) { return MAX; }
BPGPU_MINMAX(int, a < b ? a : b, a > b ? a : b)
BPGPU_MINMAX(unsigned int, a < b ? a : b, a > b ? a : b)
BPGPU_MINMAX(long, a < b ? a : b, a > b ? a : b)
BPGPU_MINMAX(unsigned long, a < b ? a : b, a > b ? a : b)
BPGPU_MINMAX(long long, a < b ? a : b, a > b ? a : b)
BPGPU_MINMAX(unsigned long long, a < b ? a : b, a > b ? a : b)
BPGPU_MINMAX(float, fminf(a, b), fmaxf(a, b))
BPGPU_MINMAX(double, fmin(a, b), fmax(a, b))
#undef BPGPU_MINMAX
inline double min(float a, double b) { return fmin(a, b); }
inline double min(double a, float b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double max(double a, float b) { return fmax(a, b); }

// Fast-math and rounding intrinsics: exact host equivalents.
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
// glibc declares these (so they compile) but does not export them (so they would not link).
#define __expf bpgpu_expf
#define __logf bpgpu_logf
#define __sinf bpgpu_sinf
#define __cosf bpgpu_cosf
#define __tanf bpgpu_tanf
#define __powf bpgpu_powf
#define __log2f bpgpu_log2f
#define __log10f bpgpu_log10f
#define __exp10f bpgpu_exp10f
inline float bpgpu_expf(float x) { return expf(x); }
inline float bpgpu_logf(float x) { return logf(x); }
inline float bpgpu_sinf(float x) { return sinf(x); }
inline float bpgpu_cosf(float x) { return cosf(x); }
inline float bpgpu_tanf(float x) { return tanf(x); }
inline float bpgpu_powf(float x, float y) { return powf(x, y); }
inline float bpgpu_log2f(float x) { return log2f(x); }
inline float bpgpu_log10f(float x) { return log10f(x); }
inline float bpgpu_exp10f(float x) { return powf(10.0f, x); }

template <typename To, typename From> inline To bpgpu_bits(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit cast between different sizes");
  To r; memcpy(&r, &v, sizeof r); return r;
}
inline float __int_as_float(int v) { return bpgpu_bits<float>(v); }
inline int __float_as_int(float v) { return bpgpu_bits<int>(v); }
inline float __uint_as_float(unsigned int v) { return bpgpu_bits<float>(v); }
inline unsigned int __float_as_uint(float v) { return bpgpu_bits<unsigned int>(v); }
inline double __longlong_as_double(long long v) { return bpgpu_bits<double>(v); }
inline long long __double_as_longlong(double v) { return bpgpu_bits<long long>(v); }
inline int __popc(unsigned int v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v ? __builtin_clz((unsigned)v) : 32; }
inline int __ffs(int v) { return __builtin_ffs(v); }

// Atomics: the threads of a block are real threads.
#define BPGPU_ATOMIC(T) \
  inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); } \
  inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); } \
  inline T atomicCAS(T* p, T cmp, T v) { \
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); return cmp; }
BPGPU_ATOMIC(int)
BPGPU_ATOMIC(unsigned int)
BPGPU_ATOMIC(unsigned long long)
#undef BPGPU_ATOMIC
template <typename F, typename I> inline F bpgpu_atomic_float_add(F* p, F v) {
  I* ip = reinterpret_cast<I*>(p);
  I old = __atomic_load_n(ip, __ATOMIC_SEQ_CST), assumed;
  do { assumed = old; old = atomicCAS(ip, assumed, bpgpu_bits<I>(bpgpu_bits<F>(assumed) + v)); }
  while (old != assumed);
  return bpgpu_bits<F>(old);
}
inline float atomicAdd(float* p, float v) { return bpgpu_atomic_float_add<float, unsigned int>(p, v); }
inline double atomicAdd(double* p, double v) { return bpgpu_atomic_float_add<double, unsigned long long>(p, v); }

// A launch: blocks one after another; a block's threads run concurrently (real
// threads, so __syncthreads() and __shared__ work); a one-thread block runs inline.
// Not a template: compiled once however many kernels a translation unit holds.
inline void bpgpu_run(unsigned int n_blocks, unsigned int block_size, void (*body)(void*), void* args) {
  gridDim.x = n_blocks;
  blockDim.x = block_size;
  for (unsigned int b = 0; b < n_blocks; ++b) {
    if (block_size == 1) {
      blockIdx.x = b;
      threadIdx.x = 0;
      body(args);
      continue;
    }
    std::barrier<> barrier(block_size);
    std::vector<std::thread> threads;
    threads.reserve(block_size);
    for (unsigned int t = 0; t < block_size; ++t) {
      threads.emplace_back([&barrier, body, args, b, t] {
        blockIdx.x = b;
        threadIdx.x = t;
        bpgpu_block_barrier = &barrier;
        body(args);
      });
    }
    for (auto& thread : threads) thread.join();
  }
}
