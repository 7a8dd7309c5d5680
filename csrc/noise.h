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
// Constants are hex float literals (exact float32 values) so the PyTorch mirror in
// mmkernels/ops/scale_grads.py can use bit-identical ones (float.fromhex).
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
  const uint32_t mant = b & 0x7fffffu;
  const uint32_t big = mant > 0x3504f3u ? 1u : 0u;  // mantissa above sqrt(2): halve it
  const int e = (int)((b >> 23) & 0xffu) - 127 + (int)big;
  const float m = bits_float(mant | (0x3f800000u - (big << 23)));
  const float s = fdiv(fadd(m, -1.0f), fadd(m, 1.0f));
  const float s2 = fmul(s, s);
  float p = fadd(fmul(s2, 0x1.c71c72p-4f), 0x1.24924ap-3f);
  p = fadd(fmul(s2, p), 0x1.99999ap-3f);
  p = fadd(fmul(s2, p), 0x1.555556p-2f);
  p = fadd(fmul(s2, p), 1.0f);
  return fadd(fmul((float)e, 0x1.62e43p-1f), fmul(fmul(2.0f, s), p));
}

// sin and cos of 2*pi*t for t in [0, 1): quadrant q = round(4t) is split off exactly (t has 23
// fraction bits), the rest x in [-pi/4, pi/4] goes through Taylor polynomials (error < 3e-8).
MMK_HD void sincos_turns(float t, float* sn, float* cs) {
  const int q = (int)fadd(fmul(t, 4.0f), 0.5f);  // t >= 0, so truncation rounds half up
  const float x = fmul(fadd(t, fmul((float)q, -0.25f)), 0x1.921fb6p+2f);
  const float x2 = fmul(x, x);
  float ps = fadd(fmul(x2, 0x1.71de3ap-19f), -0x1.a01a02p-13f);
  ps = fadd(fmul(x2, ps), 0x1.111112p-7f);
  ps = fadd(fmul(x2, ps), -0x1.555556p-3f);
  const float s = fadd(x, fmul(fmul(x, x2), ps));
  float pc = fadd(fmul(x2, 0x1.a01a02p-16f), -0x1.6c16c2p-10f);
  pc = fadd(fmul(x2, pc), 0x1.555556p-5f);
  pc = fadd(fmul(x2, pc), -0.5f);
  const float c = fadd(1.0f, fmul(x2, pc));
  // rotate by q quarter turns with bit selects (branch-free, so the CPU loop vectorises)
  const uint32_t qq = (uint32_t)q & 3u;
  const uint32_t odd = 0u - (qq & 1u);
  const uint32_t sb = float_bits(s), cb = float_bits(c);
  const uint32_t a = (cb & odd) | (sb & ~odd);  // sin(x + q*pi/2) up to sign
  const uint32_t b = (sb & odd) | (cb & ~odd);  // cos(x + q*pi/2) up to sign
  *sn = bits_float(a ^ ((qq >> 1) << 31));
  *cs = bits_float(b ^ (((qq ^ (qq >> 1)) & 1u) << 31));
}

// Box-Muller on two 32-bit words: 23 random bits each, u1 in (0, 1) never 0 (tail cut at 5.77 sigma,
// probability 8e-9), t in [0, 1).
MMK_HD void box_muller(uint32_t a, uint32_t b, float* z0, float* z1) {
  const float u1 = fmul(fadd((float)(a >> 9), 0.5f), 0x1p-23f);
  const float t = fmul((float)(b >> 9), 0x1p-23f);
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
