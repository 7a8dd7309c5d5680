// Counter-based Gaussian noise shared by the CPU kernel (csrc/scale_grads.cpp) and the CUDA kernel
// (csrc/cuda/scale_grads.cu). Plain C++ plus CUDA qualifiers only: no torch headers, so the .cu file
// compiles standalone with nvcc.
//
// Why counter-based: the noise of element i of tensor t is a pure function of (seed, t, i), so the
// result does not depend on thread counts, chunking, launch order or device, and every DDP rank that
// holds the same generator state draws the same noise.
//
// Why the float arithmetic is spelled out: on the GPU every multiply/add goes through __fmul_rn /
// __fadd_rn, which nvcc never contracts into FMAs (even with --use_fast_math); on the CPU (x86-64
// without -mfma) plain operators round the same way. log and sin/cos are our own branch-free
// polynomials instead of libm, so the CPU loop vectorises and both devices compute bit-identical noise.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define MMK_HD __host__ __device__ __forceinline__
#else
#define MMK_HD inline
#endif

namespace mmk {

MMK_HD float fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
MMK_HD float fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
MMK_HD float fdiv(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
MMK_HD float fsqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);
#endif
}
MMK_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
#endif
}
MMK_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
#endif
}

// Philox4x32-10 (Salmon et al., SC'11): 10 rounds of the 4x32 bijection, key bumped by the Weyl
// constants between rounds.
struct U4 {
  uint32_t x, y, z, w;
};

MMK_HD U4 philox4x32_10(U4 c, uint32_t k0, uint32_t k1) {
  const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = (uint64_t)M0 * c.x;
    const uint64_t p1 = (uint64_t)M1 * c.z;
    const uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
    const uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
    c = U4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += W0;
    k1 += W1;
  }
  return c;
}

// ln(u) for u in (0, 1]: exponent from the bits, mantissa folded into [sqrt(1/2), sqrt(2)), then the
// atanh series 2(s + s^3/3 + ... + s^9/9) with s = (m-1)/(m+1), |s| <= 0.172 (truncation < 3e-9).
MMK_HD float log_unit(float u) {
  const uint32_t b = float_bits(u);
  int e = (int)((b >> 23) & 0xffu) - 127;
  float m = bits_float((b & 0x7fffffu) | 0x3f800000u);
  const bool big = m > 1.41421356f;
  m = big ? fmul(m, 0.5f) : m;
  e = big ? e + 1 : e;
  const float s = fdiv(fadd(m, -1.0f), fadd(m, 1.0f));
  const float s2 = fmul(s, s);
  float p = fadd(fmul(s2, 0.11111111f), 0.14285715f);
  p = fadd(fmul(s2, p), 0.2f);
  p = fadd(fmul(s2, p), 0.33333334f);
  p = fadd(fmul(s2, p), 1.0f);
  return fadd(fmul((float)e, 0.69314718f), fmul(fmul(2.0f, s), p));
}

// sin and cos of 2*pi*t for t in [0, 1): quadrant q = round(4t) is split off exactly (t has 23
// fraction bits), the rest x in [-pi/4, pi/4] goes through Taylor polynomials (error < 3e-8).
MMK_HD void sincos_turns(float t, float* sn, float* cs) {
  const int q = (int)fadd(fmul(t, 4.0f), 0.5f);  // t >= 0, so truncation rounds half up
  const float x = fmul(fadd(t, fmul((float)q, -0.25f)), 6.28318531f);
  const float x2 = fmul(x, x);
  float ps = fadd(fmul(x2, 2.7557319e-6f), -1.98412698e-4f);
  ps = fadd(fmul(x2, ps), 8.33333333e-3f);
  ps = fadd(fmul(x2, ps), -0.166666667f);
  const float s = fadd(x, fmul(fmul(x, x2), ps));
  float pc = fadd(fmul(x2, 2.48015873e-5f), -1.38888889e-3f);
  pc = fadd(fmul(x2, pc), 4.16666667e-2f);
  pc = fadd(fmul(x2, pc), -0.5f);
  const float c = fadd(1.0f, fmul(x2, pc));
  const int qq = q & 3;
  const float a = (qq & 1) ? c : s;  // sin(x + q*pi/2)
  const float b = (qq & 1) ? s : c;  // |cos(x + q*pi/2)|
  *sn = (qq & 2) ? -a : a;
  *cs = (qq == 1 || qq == 2) ? -b : b;
}

// Box-Muller on two 32-bit words: 23 random bits each, u1 in (0, 1) never 0 (tail cut at 5.77 sigma,
// probability 8e-9), t in [0, 1).
MMK_HD void box_muller(uint32_t a, uint32_t b, float* z0, float* z1) {
  const float u1 = fmul(fadd((float)(a >> 9), 0.5f), 1.1920929e-7f);
  const float t = fmul((float)(b >> 9), 1.1920929e-7f);
  const float r = fsqrt(fmul(-2.0f, log_unit(u1)));
  float sn, cs;
  sincos_turns(t, &sn, &cs);
  *z0 = fmul(r, cs);
  *z1 = fmul(r, sn);
}

// The four standard normals of element group g (elements 4g .. 4g+3) of list entry `tensor`.
MMK_HD void normal4(uint64_t seed, uint32_t tensor, uint64_t g, float* z) {
  const U4 r = philox4x32_10(U4{(uint32_t)g, (uint32_t)(g >> 32), tensor, 0x5ca1e5u}, (uint32_t)seed,
                             (uint32_t)(seed >> 32));
  box_muller(r.x, r.y, &z[0], &z[1]);
  box_muller(r.z, r.w, &z[2], &z[3]);
}

}  // namespace mmk
