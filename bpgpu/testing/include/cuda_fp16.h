// Host stand-in for CUDA's cuda_fp16.h, just what CuPy's float16.cuh uses:
// a binary16 storage type whose conversions round to nearest even, as on the device.
#pragma once

struct __half_raw { unsigned short x; };

struct __half {
  _Float16 v;
  __half() = default;
  __half(float f) : v(static_cast<_Float16>(f)) {}
  __half(double d) : v(static_cast<_Float16>(d)) {}
  __half(int i) : v(static_cast<_Float16>(i)) {}
  __half(unsigned int i) : v(static_cast<_Float16>(i)) {}
  __half(long long i) : v(static_cast<_Float16>(i)) {}
  __half(unsigned long long i) : v(static_cast<_Float16>(i)) {}
  __half(bool b) : v(static_cast<_Float16>(b ? 1.0f : 0.0f)) {}
  __half(const __half_raw& r) { memcpy(&v, &r.x, 2); }
  operator float() const { return static_cast<float>(v); }
  operator __half_raw() const { __half_raw r; memcpy(&r.x, &v, 2); return r; }
};
typedef __half half;

inline unsigned short __half_as_ushort(__half h) { return static_cast<__half_raw>(h).x; }
inline __half __ushort_as_half(unsigned short u) { return __half(__half_raw{u}); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return float(h); }
