// CPU kernels of prototype_ce (Python: mmkernels/ops/prototype_ce.py): PMR's prototypical cross-entropy and
// prototype entropy of features h (B, D) against prototypes c (C, D), forward and backward.
//
// Distances: the difference form d²_ik = Σ_d (h_id − c_kd)² is the exact one (no cancellation whatever the
// features' common offset; the product form ‖h‖² − 2h·c + ‖c‖² loses it, see the Python module), but it costs
// a subtract per multiply-add, and on the development CPU (AMD EPYC, 1 thread) that made the tile twice as
// slow as a product: the forward was half of a fwd+bwd call at 64 × 309 × 512. The AVX2 forward therefore
// takes the product form of the centred operands a = h − μ, b = c − μ (μ the mean prototype), whose rounding
// is about ε (‖a‖² + ‖b‖²), and keeps it only where d² >= (‖a‖² + ‖b‖²) / 4, i.e. within 4x of the difference
// form's ε d²; the other pairs (a sample near a prototype: its own class, typically one pair per row) are
// summed again exactly. Below 24 prototypes, and in the portable loops, every pair takes the difference form.
// Both tiles keep four feature rows and three prototypes in registers (12 accumulators). The forward returns
// z = −d (or −d²) as a (B, C) fp32 output that the backward reads back (recomputing it cost a third of the
// backward), and leaves its packed centred prototypes in its thread's scratch for the backward of the same
// call (checked by a generation number; otherwise the backward packs them again).
//
// Forward, per row: z = −d (or −d²), lse = max + log Σ e^{z − max}, ce = lse − z_y,
//   ent = lse − Σ_k s_k z_k (= −Σ s log s); eight prototypes at a time, e^{z − max} by mmkernels::exp_ps.
// Backward: G_k = g_ce (s_k − [k = y]) − g_ent s_k (log s_k + ent), W_k = 2 G_k (squared) or G_k / d_k
//   (Euclidean; 0 where d <= 1e-6, i.e. d² <= 1e-12, the reference's rule; s_k by mmkernels::exp_ps), ∂L/∂h_i = Σ_k W_ik (c_k − μ) − (Σ_k W_ik)(h_i − μ)
//   with μ the mean prototype, so the rounding scales with the prototypes' spread, not their offset. The
//   product Σ_k W_ik (c_k − μ) runs over 16-feature column chunks of (c − μ) (C × 64 bytes: L1-resident
//   for C up to a few hundred) with six rows' accumulators in registers.
//
// float32/float16/bfloat16 features (any strides) are read as contiguous fp32; prototypes of any float dtype
// likewise. Math in fp32, the row reductions (Σ e^{z}, Σ s z) in double. Rows not counted (label -100) get
// ce = ent = 0 and a gradient of exactly 0. Labels outside [0, C) and not -100: with check = true a
// ValueError (the Python check's message), else ce = NaN for that sample (the CUDA kernel's signal).
// Eager CPU calls reach both kernels through PrototypeCEFunction (mmkernels_C::prototype_ce), a C++ autograd
// Function that also does the reduction, so neither direction enters Python; it has no double backward.
// The AVX2/FMA loops are picked at run time, with a portable version of the same loops (MMKERNELS_NO_AVX2=1
// forces it). Work is split over threads in fixed tiles (rows, then feature chunks), each output summed by
// one thread in a fixed order: results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <set>
#include <sstream>
#include <vector>

#include "cpu_isa.h"
#include "simd.h"

namespace mmk {
namespace {

constexpr int64_t kIgnore = -100;
constexpr float kTinyDist = 1e-6f;           // sqrt(1e-12): below it the Euclidean distance has no usable derivative
constexpr int64_t kRowTile = 4;               // feature rows per distance tile
constexpr int64_t kProtoTile = 3;             // prototypes per distance tile
constexpr int64_t kGradRows = 6;              // feature rows per gradient tile
constexpr int64_t kParallelWork = 1 << 18;    // multiply-adds per thread below which threads cost more

// ------------------------------------------------------------------------------------- squared distances
__attribute__((target("avx2"))) inline __m256i tail_mask(int64_t n) {  // lanes [0, n) set, 0 <= n <= 8
  alignas(32) static const int32_t table[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + 8 - n));
}

__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// d2[r * ldd + p] = ‖h_r − c_p‖² for R rows (h, stride D) and P prototypes (c, stride D); lanes past D are
// zero in both operands (masked loads), so they add nothing.
template <int R, int P>
__attribute__((target("avx2,fma"))) void dist_tile_avx2(const float* h, const float* c, int64_t D, float* d2,
                                                        int64_t ldd) {
  __m256 acc[R][P];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) acc[r][p] = _mm256_setzero_ps();
  const int64_t full = D & ~int64_t(7);
  for (int64_t d = 0; d < full; d += 8) {
    __m256 cv[P];
    for (int p = 0; p < P; ++p) cv[p] = _mm256_loadu_ps(c + p * D + d);
    for (int r = 0; r < R; ++r) {
      const __m256 hv = _mm256_loadu_ps(h + r * D + d);
      for (int p = 0; p < P; ++p) {
        const __m256 diff = _mm256_sub_ps(hv, cv[p]);
        acc[r][p] = _mm256_fmadd_ps(diff, diff, acc[r][p]);
      }
    }
  }
  if (full < D) {
    const __m256i m = tail_mask(D - full);
    __m256 cv[P];
    for (int p = 0; p < P; ++p) cv[p] = _mm256_maskload_ps(c + p * D + full, m);
    for (int r = 0; r < R; ++r) {
      const __m256 hv = _mm256_maskload_ps(h + r * D + full, m);
      for (int p = 0; p < P; ++p) {
        const __m256 diff = _mm256_sub_ps(hv, cv[p]);
        acc[r][p] = _mm256_fmadd_ps(diff, diff, acc[r][p]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) d2[r * ldd + p] = hsum8(acc[r][p]);
}

// The same sums, one pair at a time, in the AVX2 loop's lane order (eight partial sums, then the tree).
void dist_pair_portable(const float* h, const float* c, int64_t D, float* out) {
  float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t d = 0; d < D; ++d) {
    const float diff = h[d] - c[d];
    lane[d & 7] += diff * diff;
  }
  const float a = lane[0] + lane[4], b = lane[1] + lane[5], e = lane[2] + lane[6], f = lane[3] + lane[7];
  *out = (a + e) + (b + f);
}

// P prototypes (c) against n rows (h) in the difference form, written to columns [0, P) of d2 (row stride C)
template <int P>
void dist_protos_avx2(const float* h, const float* c, int64_t n, int64_t C, int64_t D, float* d2) {
  int64_t i = 0;
  for (; i + kRowTile <= n; i += kRowTile) dist_tile_avx2<kRowTile, P>(h + i * D, c, D, d2 + i * C, C);
  switch (n - i) {
    case 3: dist_tile_avx2<3, P>(h + i * D, c, D, d2 + i * C, C); break;
    case 2: dist_tile_avx2<2, P>(h + i * D, c, D, d2 + i * C, C); break;
    case 1: dist_tile_avx2<1, P>(h + i * D, c, D, d2 + i * C, C); break;
    default: break;
  }
}

// The packed centred prototypes, shared by the forward's product tiles and the backward's gradient tiles:
//   ccp[q][k][0..16) = c_k − μ over features [16q, 16q + 16), zero past D
// (μ the mean prototype), so a tile's prototypes sit next to each other for every column chunk.
constexpr int64_t kChunk = 16;
constexpr int64_t kPackRows = 8;  // prototypes packed at a time

// μ = Σ_k c_k / C (summed in k order, lane by lane: the portable loop's values)
__attribute__((target("avx2,fma"))) void mean_prototype_avx2(const float* c, int64_t C, int64_t D, float* mu) {
  const int64_t full = D & ~int64_t(7);
  const __m256i tail = tail_mask(D - full);
  for (int64_t d = 0; d < D; ++d) mu[d] = 0.0f;
  for (int64_t k = 0; k < C; ++k) {
    const float* ck = c + k * D;
    for (int64_t d = 0; d < full; d += 8)
      _mm256_storeu_ps(mu + d, _mm256_add_ps(_mm256_loadu_ps(mu + d), _mm256_loadu_ps(ck + d)));
    if (full < D)
      _mm256_maskstore_ps(mu + full, tail,
                          _mm256_add_ps(_mm256_maskload_ps(mu + full, tail), _mm256_maskload_ps(ck + full, tail)));
  }
  const __m256 count = _mm256_set1_ps(static_cast<float>(C));
  for (int64_t d = 0; d < full; d += 8) _mm256_storeu_ps(mu + d, _mm256_div_ps(_mm256_loadu_ps(mu + d), count));
  if (full < D) _mm256_maskstore_ps(mu + full, tail, _mm256_div_ps(_mm256_maskload_ps(mu + full, tail), count));
}

// ccp from c and μ; with `norms`, norms[k] = ‖c_k − μ‖² too. c is read row by row (632 KB at 309 × 512, past
// L2: a column-chunk-major read of it cost four times as much), kPackRows rows at a time, so each row
// block's chunk writes are contiguous. Lanes past D load as 0: their packed values are 0.
__attribute__((target("avx2,fma"))) void pack_centred_avx2(const float* c, int64_t C, int64_t D, const float* mu,
                                                           float* ccp, float* norms) {
  const int64_t chunks = (D + kChunk - 1) / kChunk;
  for (int64_t k0 = 0; k0 < C; k0 += kPackRows) {
    const int64_t k1 = std::min(C, k0 + kPackRows);
    __m256 nrm[kPackRows];
    for (int64_t j = 0; j < kPackRows; ++j) nrm[j] = _mm256_setzero_ps();
    for (int64_t q = 0; q < chunks; ++q) {
      const int64_t d0 = q * kChunk, left = std::min<int64_t>(kChunk, D - d0);
      const __m256i m0 = tail_mask(std::min<int64_t>(8, left)), m1 = tail_mask(std::max<int64_t>(0, left - 8));
      const __m256 mu0 = _mm256_maskload_ps(mu + d0, m0), mu1 = _mm256_maskload_ps(mu + d0 + 8, m1);
      for (int64_t k = k0; k < k1; ++k) {
        float* dst = ccp + (q * C + k) * kChunk;
        const float* src = c + k * D + d0;
        const __m256 v0 = _mm256_sub_ps(_mm256_maskload_ps(src, m0), mu0);
        const __m256 v1 = _mm256_sub_ps(_mm256_maskload_ps(src + 8, m1), mu1);
        _mm256_storeu_ps(dst, v0);
        _mm256_storeu_ps(dst + 8, v1);
        nrm[k - k0] = _mm256_fmadd_ps(v1, v1, _mm256_fmadd_ps(v0, v0, nrm[k - k0]));
      }
    }
    if (norms != nullptr)
      for (int64_t k = k0; k < k1; ++k) norms[k] = hsum8(nrm[k - k0]);
  }
}

// out[r] = x_r − μ for n rows (stride D) and norms[r] = ‖x_r − μ‖²
__attribute__((target("avx2,fma"))) void centre_rows_avx2(const float* x, int64_t n, int64_t D, const float* mu,
                                                          float* out, float* norms) {
  const int64_t full = D & ~int64_t(7);
  const __m256i tail = tail_mask(D - full);
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = x + r * D;
    float* o = out + r * D;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < full; d += 8) {
      const __m256 v = _mm256_sub_ps(_mm256_loadu_ps(xr + d), _mm256_loadu_ps(mu + d));
      _mm256_storeu_ps(o + d, v);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    if (full < D) {
      const __m256 v = _mm256_sub_ps(_mm256_maskload_ps(xr + full, tail), _mm256_maskload_ps(mu + full, tail));
      _mm256_maskstore_ps(o + full, tail, v);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    norms[r] = hsum8(acc);
  }
}

// dot[r * ldd + p] = a_r · b_p for R centred rows a (stride D) and P packed prototypes (ccp + k·kChunk for
// the first): one multiply-add per term, the tile of dist_tile_avx2 otherwise
template <int R, int P>
__attribute__((target("avx2,fma"))) void dot_tile_avx2(const float* a, const float* ccp, int64_t C, int64_t D,
                                                       float* dot, int64_t ldd) {
  __m256 acc[R][P];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) acc[r][p] = _mm256_setzero_ps();
  const int64_t full = D & ~int64_t(7);
  for (int64_t d = 0; d < full; d += 8) {
    const float* b = ccp + (d / kChunk) * C * kChunk + d % kChunk;
    __m256 cv[P];
    for (int p = 0; p < P; ++p) cv[p] = _mm256_loadu_ps(b + p * kChunk);
    for (int r = 0; r < R; ++r) {
      const __m256 hv = _mm256_loadu_ps(a + r * D + d);
      for (int p = 0; p < P; ++p) acc[r][p] = _mm256_fmadd_ps(hv, cv[p], acc[r][p]);
    }
  }
  if (full < D) {
    const __m256i m = tail_mask(D - full);
    const float* b = ccp + (full / kChunk) * C * kChunk + full % kChunk;
    __m256 cv[P];
    for (int p = 0; p < P; ++p) cv[p] = _mm256_loadu_ps(b + p * kChunk);  // zero past D
    for (int r = 0; r < R; ++r) {
      const __m256 hv = _mm256_maskload_ps(a + r * D + full, m);
      for (int p = 0; p < P; ++p) acc[r][p] = _mm256_fmadd_ps(hv, cv[p], acc[r][p]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) dot[r * ldd + p] = hsum8(acc[r][p]);
}

// P prototypes against n rows, written to columns [0, P) of dot (row stride C)
template <int P>
void dot_protos_avx2(const float* a, const float* ccp, int64_t n, int64_t C, int64_t D, float* dot) {
  int64_t i = 0;
  for (; i + kRowTile <= n; i += kRowTile) dot_tile_avx2<kRowTile, P>(a + i * D, ccp, C, D, dot + i * C, C);
  switch (n - i) {
    case 3: dot_tile_avx2<3, P>(a + i * D, ccp, C, D, dot + i * C, C); break;
    case 2: dot_tile_avx2<2, P>(a + i * D, ccp, C, D, dot + i * C, C); break;
    case 1: dot_tile_avx2<1, P>(a + i * D, ccp, C, D, dot + i * C, C); break;
    default: break;
  }
}

// The AVX2 forward's operands: rows and prototypes less μ, and their squared norms.
struct Centred {
  const float* h;    // (B, D): h_i − μ
  const float* ccp;  // the packed c_k − μ
  const float* nh;   // (B,): ‖h_i − μ‖²
  const float* nc;   // (C,): ‖c_k − μ‖²
};

// A pair's centred product form ‖a‖² + ‖b‖² − 2 a·b (a = h − μ, b = c − μ) is kept where d² >= (‖a‖² + ‖b‖²) / 4:
// its rounding, about ε (‖a‖² + ‖b‖²), is then within 4x of the difference form's ε d². Nearer pairs (a sample
// and its own class' prototype, any pair with cancellation) are summed again in the difference form.
constexpr float kProductGuard = 4.0f;

// Below this many prototypes the centring and packing cost more than the product form saves (measured at
// 64 × C × 512: 0.8x the difference form's time at C = 309, 0.9x at 32, 1.1x at 16, 1.3x at 6).
constexpr int64_t kProductMinC = 24;

// d2 (n, C) for n contiguous fp32 feature rows h (n, D) and prototypes c (C, D); with `centred` (the AVX2
// path from kProductMinC prototypes: its rows i0.. for these n rows) by the guarded product form, else every
// pair in the difference form
void sq_dist_rows(const float* h, const float* c, int64_t C, int64_t D, int64_t n, float* d2, bool avx2,
                  const Centred* centred) {
  // prototype tiles outside: a tile of prototypes stays in L1 while the rows stream from L2
  int64_t k = 0;
  if (centred == nullptr && avx2) {
    for (; k + kProtoTile <= C; k += kProtoTile) dist_protos_avx2<kProtoTile>(h, c + k * D, n, C, D, d2 + k);
    if (C - k == 2) dist_protos_avx2<2>(h, c + k * D, n, C, D, d2 + k);
    if (C - k == 1) dist_protos_avx2<1>(h, c + k * D, n, C, D, d2 + k);
    return;
  }
  if (centred == nullptr) {
    for (int64_t i = 0; i < n; ++i)
      for (k = 0; k < C; ++k) dist_pair_portable(h + i * D, c + k * D, D, d2 + i * C + k);
    return;
  }
  for (; k + kProtoTile <= C; k += kProtoTile)
    dot_protos_avx2<kProtoTile>(centred->h, centred->ccp + k * kChunk, n, C, D, d2 + k);
  if (C - k == 2) dot_protos_avx2<2>(centred->h, centred->ccp + k * kChunk, n, C, D, d2 + k);
  if (C - k == 1) dot_protos_avx2<1>(centred->h, centred->ccp + k * kChunk, n, C, D, d2 + k);
  for (int64_t i = 0; i < n; ++i) {
    float* di = d2 + i * C;
    const float nh = centred->nh[i];
    for (k = 0; k < C; ++k) {
      const float scale = nh + centred->nc[k], t = scale - 2.0f * di[k];
      // written so that NaN (a NaN feature) takes the exact branch too
      if (kProductGuard * t >= scale) {
        di[k] = t;
      } else {
        dist_tile_avx2<1, 1>(h + i * D, c + k * D, D, di + k, 1);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------ shared setup
struct Problem {
  at::Tensor h, c;  // contiguous fp32 copies (or the inputs themselves when they already are)
  int64_t B, C, D;
  const float* hp;
  const float* cp;
};

at::Tensor as_f32_contiguous(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t;
  return t.to(at::kFloat).contiguous();
}

Problem problem(const at::Tensor& features, const at::Tensor& prototypes, const at::Tensor& labels) {
  TORCH_CHECK(features.dim() == 2 && prototypes.dim() == 2 && prototypes.size(1) == features.size(1) &&
                  prototypes.size(0) >= 1,
              "prototype_ce: features must be (B, D) and prototypes (C >= 1, D)");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == features.size(0),
              "prototype_ce: labels must be (B,) int64");
  TORCH_CHECK(at::isFloatingType(features.scalar_type()) && at::isFloatingType(prototypes.scalar_type()),
              "prototype_ce: features and prototypes must be floating point");
  Problem p;
  p.h = as_f32_contiguous(features);
  p.c = as_f32_contiguous(prototypes);
  p.B = features.size(0);
  p.C = prototypes.size(0);
  p.D = features.size(1);
  p.hp = p.h.const_data_ptr<float>();
  p.cp = p.c.const_data_ptr<float>();
  return p;
}

int64_t grain(int64_t tile_rows, const Problem& p) {
  return std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, tile_rows * p.C * p.D));
}

// Scratch of the calling thread, kept between calls (slots 0, 1: the backward's; 2, 3: the forward's): a fresh
// allocation of a few hundred KB is a fresh mmap each call, whose page faults cost more than the packing written into it (measured: ~300 µs at C·D = 158K).
float* scratch(int slot, int64_t n) {
  static thread_local std::vector<float> bufs[4];
  std::vector<float>& b = bufs[slot];
  if (static_cast<int64_t>(b.size()) < n) b.resize(n);
  return b.data();
}

// The AVX2 forward packs the centred prototypes and μ into slot 2 of its thread, which the backward needs
// too (packing them again was a tenth of a fwd+bwd call at 64 × 309 × 512). Every forward takes a new
// generation number; a backward on the same thread whose forward's number the slot still holds reuses the
// packing, any other (a later forward in between, another thread, the registered op) packs its own.
std::atomic<int64_t> pack_generation{0};
thread_local int64_t pack_held = -1;

int64_t pack_floats(int64_t C, int64_t D) {  // ccp, then μ (D), then ‖c_k − μ‖² (C)
  return (D + kChunk - 1) / kChunk * C * kChunk + D + C;
}

inline float neg_dist(float d2, bool squared) { return squared ? -d2 : -std::sqrt(d2); }

// ---------------------------------------------------------------------------------------------- forward
// One row of the softmax: z = −d (or −d²) written over d², its maximum, Σ_k e^{z_k − max} and
// Σ_k e^{z_k − max} z_k (in double).
struct RowSums {
  float max;
  double sum, zs;
};

RowSums softmax_row_portable(float* z, int64_t C, bool squared) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t k = 0; k < C; ++k) {
    z[k] = neg_dist(z[k], squared);
    mx = std::max(mx, z[k]);
  }
  // a NaN feature makes every z NaN; max() skipped them: NaN flows through the sums below anyway
  double sum = 0.0, zs = 0.0;
  for (int64_t k = 0; k < C; ++k) {
    const double e = std::exp(z[k] - mx);
    sum += e;
    zs += e * z[k];
  }
  return {mx, sum, zs};
}

// The same, eight prototypes at a time: sqrt and max exact (the z are the portable loop's), e^{z − max} by
// mmkernels::exp_ps (4e-7 relative; the scalar exp was a third of the forward at 64 × 309 × 512's 20K terms),
// each product e·z and both sums in double. Lanes past C: z = −inf for the max, e = 0 in the sums.
__attribute__((target("avx2,fma"))) RowSums softmax_row_avx2(float* z, int64_t C, bool squared) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), zero = _mm256_setzero_ps();
  __m256 mxv = neg_inf;
  for (int64_t k = 0; k < C; k += 8) {
    const __m256i m = tail_mask(std::min<int64_t>(8, C - k));
    const __m256 d2 = _mm256_maskload_ps(z + k, m);
    const __m256 zv = _mm256_sub_ps(zero, squared ? d2 : _mm256_sqrt_ps(d2));
    _mm256_maskstore_ps(z + k, m, zv);
    // max(z, mx) returns mx where z is NaN: NaN rows are skipped here, as std::max does, and reach the sums
    mxv = _mm256_max_ps(_mm256_blendv_ps(neg_inf, zv, _mm256_castsi256_ps(m)), mxv);
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(mxv), _mm256_extractf128_ps(mxv, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
  const float mx = _mm_cvtss_f32(h);
  const __m256 mxb = _mm256_set1_ps(mx);
  __m256d sum0 = _mm256_setzero_pd(), sum1 = sum0, zs0 = sum0, zs1 = sum0;
  for (int64_t k = 0; k < C; k += 8) {
    const __m256i m = tail_mask(std::min<int64_t>(8, C - k));
    const __m256 zv = _mm256_maskload_ps(z + k, m);
    const __m256 e = _mm256_and_ps(mmkernels::exp_ps(zv, mxb), _mm256_castsi256_ps(m));
    const __m256d e0 = _mm256_cvtps_pd(_mm256_castps256_ps128(e)), e1 = _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1));
    sum0 = _mm256_add_pd(sum0, e0);
    sum1 = _mm256_add_pd(sum1, e1);
    zs0 = _mm256_fmadd_pd(e0, _mm256_cvtps_pd(_mm256_castps256_ps128(zv)), zs0);
    zs1 = _mm256_fmadd_pd(e1, _mm256_cvtps_pd(_mm256_extractf128_ps(zv, 1)), zs1);
  }
  alignas(32) double a[4], b[4];
  _mm256_store_pd(a, _mm256_add_pd(sum0, sum1));
  _mm256_store_pd(b, _mm256_add_pd(zs0, zs1));
  return {mx, (a[0] + a[1]) + (a[2] + a[3]), (b[0] + b[1]) + (b[2] + b[3])};
}

// `generation`: where to put the number of the packing this call leaves for its backward (-1: none)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pce_forward(const at::Tensor& features,
                                                                       const at::Tensor& prototypes,
                                                                       const at::Tensor& labels, bool squared,
                                                                       bool check, int64_t* generation) {
  if (generation != nullptr) *generation = -1;
  const Problem p = problem(features, prototypes, labels);
  const int64_t B = p.B, C = p.C, D = p.D;
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  const int64_t sy = labels.stride(0);
  if (check) {
    std::set<int64_t> bad;
    for (int64_t i = 0; i < B; ++i) {
      const int64_t y = lab[i * sy];
      if (y != kIgnore && (y < 0 || y >= C)) bad.insert(y);
    }
    if (!bad.empty()) {
      std::ostringstream msg;
      msg << "prototype_ce: labels must lie in [0, " << C << ") or equal " << kIgnore << " (ignored); got [";
      int shown = 0;
      for (int64_t v : bad) {
        if (shown == 10) break;
        msg << (shown++ ? ", " : "") << v;
      }
      msg << "]";
      TORCH_CHECK_VALUE(false, msg.str());
    }
  }
  auto opts = features.options().dtype(at::kFloat);
  at::Tensor ce = at::empty({B}, opts), ent = at::empty({B}, opts), lse = at::empty({B}, opts);
  at::Tensor z = at::empty({B, C}, opts);
  if (B == 0) return {ce, ent, lse, z};
  float* ce_p = ce.data_ptr<float>();
  float* z_p = z.data_ptr<float>();
  float* ent_p = ent.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  const bool avx2 = isa::avx2_fma();
  Centred centred{};
  const bool product = avx2 && C >= kProductMinC;
  if (product) {  // the guarded product form's operands, once for all threads
    float* ccp = scratch(2, pack_floats(C, D));
    float* mu = ccp + (D + kChunk - 1) / kChunk * C * kChunk;
    float* hbuf = scratch(3, B * D + B);
    mean_prototype_avx2(p.cp, C, D, mu);
    pack_centred_avx2(p.cp, C, D, mu, ccp, mu + D);
    centre_rows_avx2(p.hp, B, D, mu, hbuf, hbuf + B * D);
    centred = {hbuf, ccp, hbuf + B * D, mu + D};
    pack_held = ++pack_generation;
    if (generation != nullptr) *generation = pack_held;
  }
  const int64_t tiles = (B + kRowTile - 1) / kRowTile;
  at::parallel_for(0, tiles, grain(kRowTile, p), [&](int64_t t0, int64_t t1) {
    const int64_t i0 = t0 * kRowTile, i1 = std::min(B, t1 * kRowTile);
    Centred rows{};
    if (product) rows = {centred.h + i0 * D, centred.ccp, centred.nh + i0, centred.nc};
    sq_dist_rows(p.hp + i0 * D, p.cp, C, D, i1 - i0, z_p + i0 * C, avx2, product ? &rows : nullptr);
    for (int64_t i = i0; i < i1; ++i) {
      float* zi = z_p + i * C;
      const RowSums rs = avx2 ? softmax_row_avx2(zi, C, squared) : softmax_row_portable(zi, C, squared);
      const double mx = rs.max, sum = rs.sum, zs = rs.zs;
      const double l = mx + std::log(sum);
      const int64_t y = lab[i * sy];
      lse_p[i] = static_cast<float>(l);
      if (y == kIgnore) {
        ce_p[i] = 0.0f;
        ent_p[i] = 0.0f;
        continue;
      }
      ce_p[i] = (y >= 0 && y < C) ? static_cast<float>(l - zi[y]) : std::numeric_limits<float>::quiet_NaN();
      ent_p[i] = static_cast<float>(l - zs / sum);
    }
  });
  return {ce, ent, lse, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prototype_ce_fwd_cpu(const at::Tensor& features,
                                                                                const at::Tensor& prototypes,
                                                                                const at::Tensor& labels,
                                                                                bool squared, bool check) {
  return pce_forward(features, prototypes, labels, squared, check, nullptr);
}

// --------------------------------------------------------------------------------------------- backward
// Layouts that keep the product's inner loop on contiguous memory (a stride of D floats between prototypes
// would map a column chunk of every prototype onto the same few L1 sets):
//   ccp[q][k][0..16)  centred prototypes c_k − μ, features [16q, 16q + 16), zero past D;
//   wtp[t][k][0..R)   W of the R rows of row tile t (zero for rows past B).
// dh rows of a six-row tile, features [16q, 16q + 16): Σ_k W_ik (c_k − μ) − (Σ_k W_ik)(h_i − μ). The twelve
// accumulators are named variables: held in an array, GCC 12 writes them back to the stack every iteration.
#define MMK_PCE_ROW(r)                                      \
  {                                                         \
    const __m256 wv = _mm256_broadcast_ss(w + r);           \
    a##r##0 = _mm256_fmadd_ps(wv, c0, a##r##0);             \
    a##r##1 = _mm256_fmadd_ps(wv, c1, a##r##1);             \
  }

__attribute__((target("avx2,fma"))) void grad_tile_avx2(const float* wtp, const float* ccp, int64_t C, int64_t D,
                                                        int64_t q, const float* h, const float* mu, const float* wsum,
                                                        int64_t rows, float* dh) {
  static_assert(kGradRows == 6, "grad_tile_avx2 is written out for six rows");
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00,
         a40 = a00, a41 = a00, a50 = a00, a51 = a00;
  for (int64_t k = 0; k < C; ++k) {
    const __m256 c0 = _mm256_loadu_ps(ccp + k * kChunk), c1 = _mm256_loadu_ps(ccp + k * kChunk + 8);
    const float* w = wtp + k * kGradRows;
    MMK_PCE_ROW(0) MMK_PCE_ROW(1) MMK_PCE_ROW(2) MMK_PCE_ROW(3) MMK_PCE_ROW(4) MMK_PCE_ROW(5)
  }
  alignas(32) float acc[kGradRows][kChunk];
  _mm256_store_ps(acc[0], a00), _mm256_store_ps(acc[0] + 8, a01), _mm256_store_ps(acc[1], a10);
  _mm256_store_ps(acc[1] + 8, a11), _mm256_store_ps(acc[2], a20), _mm256_store_ps(acc[2] + 8, a21);
  _mm256_store_ps(acc[3], a30), _mm256_store_ps(acc[3] + 8, a31), _mm256_store_ps(acc[4], a40);
  _mm256_store_ps(acc[4] + 8, a41), _mm256_store_ps(acc[5], a50), _mm256_store_ps(acc[5] + 8, a51);
  const int64_t d = q * kChunk, left = std::min<int64_t>(kChunk, D - d);
  const __m256i m0 = tail_mask(std::min<int64_t>(8, left)), m1 = tail_mask(std::max<int64_t>(0, left - 8));
  const __m256 mu0 = _mm256_maskload_ps(mu + d, m0), mu1 = _mm256_maskload_ps(mu + d + 8, m1);
  for (int64_t r = 0; r < std::min<int64_t>(kGradRows, rows); ++r) {
    const __m256 ws = _mm256_set1_ps(wsum[r]);
    const float* hr = h + r * D + d;
    float* out = dh + r * D + d;
    const __m256 o0 = _mm256_fnmadd_ps(ws, _mm256_sub_ps(_mm256_maskload_ps(hr, m0), mu0), _mm256_load_ps(acc[r]));
    const __m256 o1 = _mm256_fnmadd_ps(ws, _mm256_sub_ps(_mm256_maskload_ps(hr + 8, m1), mu1),
                                       _mm256_load_ps(acc[r] + 8));
    if (left == kChunk) {
      _mm256_storeu_ps(out, o0);
      _mm256_storeu_ps(out + 8, o1);
    } else {
      _mm256_maskstore_ps(out, m0, o0);
      _mm256_maskstore_ps(out + 8, m1, o1);
    }
  }
}
#undef MMK_PCE_ROW

template <int R>
void grad_tile_portable(const float* wtp, const float* ccp, int64_t C, int64_t D, int64_t q, const float* h,
                        const float* mu, const float* wsum, int64_t rows, float* dh) {
  const int64_t d0 = q * kChunk, left = std::min<int64_t>(kChunk, D - d0);
  for (int64_t r = 0; r < std::min<int64_t>(R, rows); ++r) {
    float acc[kChunk] = {};
    for (int64_t k = 0; k < C; ++k) {
      const float w = wtp[k * R + r];
      for (int64_t j = 0; j < kChunk; ++j) acc[j] += w * ccp[k * kChunk + j];
    }
    for (int64_t j = 0; j < left; ++j) dh[r * D + d0 + j] = acc[j] - wsum[r] * (h[r * D + d0 + j] - mu[d0 + j]);
  }
}

// μ (Σ_k c_k in k order, then / C) and the packed centred prototypes, as the AVX2 loops compute them
void pack_prototypes_portable(const float* c, int64_t C, int64_t D, float* mu, float* ccp) {
  for (int64_t k = 0; k < C; ++k)
    for (int64_t d = 0; d < D; ++d) mu[d] += c[k * D + d];
  for (int64_t d = 0; d < D; ++d) mu[d] /= static_cast<float>(C);
  const int64_t chunks = (D + kChunk - 1) / kChunk;
  for (int64_t k0 = 0; k0 < C; k0 += kPackRows) {
    for (int64_t q = 0; q < chunks; ++q) {
      const int64_t d0 = q * kChunk, left = std::min<int64_t>(kChunk, D - d0);
      for (int64_t k = k0; k < std::min(C, k0 + kPackRows); ++k) {
        float* dst = ccp + (q * C + k) * kChunk;
        for (int64_t j = 0; j < left; ++j) dst[j] = c[k * D + d0 + j] - mu[d0 + j];
        for (int64_t j = left; j < kChunk; ++j) dst[j] = 0.0f;
      }
    }
  }
}

// One row's softmax terms in the backward: g_ce, g_ent, lse, ent and the label.
struct RowTerms {
  float g_ce, g_ent, lse, ent;
  int64_t y;
};

// W_k of prototypes [k0, C) of one row, written to w[k * kGradRows] (the row-tile layout); returns their sum.
double weight_row_portable(const float* z, int64_t k0, int64_t C, const RowTerms& rt, bool squared, float* w) {
  double ws = 0.0;
  for (int64_t k = k0; k < C; ++k) {
    const float log_s = z[k] - rt.lse;
    const float s = std::exp(log_s);
    const float g = rt.g_ce * (s - (k == rt.y ? 1.0f : 0.0f)) - rt.g_ent * s * (log_s + rt.ent);
    // -z = d; d <= 1e-6 is d² <= 1e-12: the Euclidean distance has no usable derivative there
    const float wk = squared ? 2.0f * g : (-z[k] > kTinyDist ? g / -z[k] : 0.0f);
    w[k * kGradRows] = wk;
    ws += wk;
  }
  return ws;
}

// weight_row_portable's terms, eight prototypes at a time (the tail in the portable loop); the row sum in
// double, like the portable loop.
__attribute__((target("avx2,fma"))) double weight_row_avx2(const float* z, int64_t C, const RowTerms& rt,
                                                           bool squared, float* w) {
  const __m256 lse = _mm256_set1_ps(rt.lse), ent = _mm256_set1_ps(rt.ent), gce = _mm256_set1_ps(rt.g_ce),
               gent = _mm256_set1_ps(rt.g_ent), tiny = _mm256_set1_ps(kTinyDist), zero = _mm256_setzero_ps(),
               one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  // a label outside [0, C) (the forward's NaN ce) matches no prototype
  const __m256i yv = _mm256_set1_epi32(rt.y >= 0 && rt.y < C ? static_cast<int32_t>(rt.y) : -1);
  __m256d ws0 = _mm256_setzero_pd(), ws1 = _mm256_setzero_pd();
  alignas(32) float wk[8];
  int64_t k = 0;
  for (; k + 8 <= C; k += 8) {
    const __m256 zv = _mm256_loadu_ps(z + k);
    const __m256 log_s = _mm256_sub_ps(zv, lse);
    const __m256 s = mmkernels::exp_ps(log_s, zero);  // below e^-87.3: 1.2e-38 instead of 0
    const __m256 hot = _mm256_and_ps(
        _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_add_epi32(lane, _mm256_set1_epi32(static_cast<int32_t>(k))), yv)),
        one);
    // g = g_ce (s − [k = y]) − g_ent s (log s + ent)
    const __m256 g = _mm256_fnmadd_ps(_mm256_mul_ps(gent, s), _mm256_add_ps(log_s, ent),
                                      _mm256_mul_ps(gce, _mm256_sub_ps(s, hot)));
    __m256 wv;
    if (squared) {
      wv = _mm256_mul_ps(two, g);
    } else {
      const __m256 d = _mm256_sub_ps(zero, zv);
      wv = _mm256_and_ps(_mm256_cmp_ps(d, tiny, _CMP_GT_OQ), _mm256_div_ps(g, d));
    }
    _mm256_store_ps(wk, wv);
    for (int j = 0; j < 8; ++j) w[(k + j) * kGradRows] = wk[j];
    ws0 = _mm256_add_pd(ws0, _mm256_cvtps_pd(_mm256_castps256_ps128(wv)));
    ws1 = _mm256_add_pd(ws1, _mm256_cvtps_pd(_mm256_extractf128_ps(wv, 1)));
  }
  alignas(32) double part[4];
  _mm256_store_pd(part, _mm256_add_pd(ws0, ws1));
  return (part[0] + part[1]) + (part[2] + part[3]) + weight_row_portable(z, k, C, rt, squared, w);
}

// A per-sample gradient g[i * stride] (stride 0: one value for every sample, a reduced loss's gradient).
struct RowGrad {
  const float* p;
  int64_t stride;
};

// dh (B, D) in dtype `out` for the per-sample gradients of ce and ent
// `generation`: the forward's packing number (-1: none)
at::Tensor pce_backward(const Problem& p, RowGrad g_ce, RowGrad g_ent, const at::Tensor& labels, const at::Tensor& lse,
                        const at::Tensor& ent, const at::Tensor& z, bool squared, at::ScalarType out,
                        int64_t generation) {
  const int64_t B = p.B, C = p.C, D = p.D;
  TORCH_CHECK(z.scalar_type() == at::kFloat && z.dim() == 2 && z.size(0) == B && z.size(1) == C &&
                  z.is_contiguous(),
              "prototype_ce: z must be the forward's contiguous float32 (B, C) output");
  const float* z_p = z.const_data_ptr<float>();
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == B && ent.dim() == 1 && ent.size(0) == B,
              "prototype_ce: lse and ent must be (B,)");
  at::Tensor dh = at::empty({B, D}, p.h.options().dtype(at::kFloat));
  if (B == 0 || D == 0) return out == at::kFloat ? dh : dh.to(out);
  const at::Tensor lse_f = lse.to(at::kFloat), ent_f = ent.to(at::kFloat);
  const float* gce_p = g_ce.p;
  const float* gent_p = g_ent.p;
  const float* lse_p = lse_f.const_data_ptr<float>();
  const float* ent_p = ent_f.const_data_ptr<float>();
  const int64_t s_gce = g_ce.stride, s_gent = g_ent.stride, s_lse = lse_f.stride(0), s_ent = ent_f.stride(0);
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  const int64_t sy = labels.stride(0);
  const int64_t chunks = (D + kChunk - 1) / kChunk, tiles = (B + kGradRows - 1) / kGradRows;

  // μ (the mean prototype; any point near the prototypes does, the gradient does not depend on it) and the
  // packed centred prototypes
  const float* ccp;
  const float* mu;
  std::vector<float> mu_own;
  if (generation >= 0 && generation == pack_held) {  // the forward's, still in this thread's slot 2
    ccp = scratch(2, pack_floats(C, D));
    mu = ccp + chunks * C * kChunk;
  } else {
    mu_own.assign(D, 0.0f);
    float* own = scratch(0, chunks * C * kChunk);  // written below, padding included
    if (isa::avx2_fma()) {
      mean_prototype_avx2(p.cp, C, D, mu_own.data());
      pack_centred_avx2(p.cp, C, D, mu_own.data(), own, nullptr);
    } else {
      pack_prototypes_portable(p.cp, C, D, mu_own.data(), own);
    }
    ccp = own;
    mu = mu_own.data();
  }

  // W and Σ_k W per row, tile by tile, from the forward's z (nothing recomputed)
  float* wtp = scratch(1, tiles * C * kGradRows);
  std::fill(wtp, wtp + tiles * C * kGradRows, 0.0f);  // ignored rows and rows past B: W = 0
  std::vector<float> wsum(tiles * kGradRows, 0.0f);
  const bool avx2 = isa::avx2_fma();
  at::parallel_for(0, tiles, std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, kGradRows * C * 32)),
                   [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = t * kGradRows, n = std::min(B, i0 + kGradRows) - i0;
      float* w = wtp + t * C * kGradRows;
      for (int64_t r = 0; r < n; ++r) {
        const int64_t i = i0 + r, y = lab[i * sy];
        if (y == kIgnore) continue;  // W = 0
        const RowTerms rt{gce_p[i * s_gce], gent_p[i * s_gent], lse_p[i * s_lse], ent_p[i * s_ent], y};
        const double ws = avx2 ? weight_row_avx2(z_p + i * C, C, rt, squared, w + r)
                               : weight_row_portable(z_p + i * C, 0, C, rt, squared, w + r);
        wsum[i] = static_cast<float>(ws);
      }
    }
  });

  // the product, column chunk by column chunk: a chunk of the packed prototypes stays in L1 for every tile
  float* dh_p = dh.data_ptr<float>();
  at::parallel_for(0, chunks, std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, B * C * kChunk)),
                   [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const float* cq = ccp + q * C * kChunk;
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t i0 = t * kGradRows, rows = std::min(B, i0 + kGradRows) - i0;
        const float* w = wtp + t * C * kGradRows;
        if (avx2) {
          grad_tile_avx2(w, cq, C, D, q, p.hp + i0 * D, mu, wsum.data() + i0, rows, dh_p + i0 * D);
        } else {
          grad_tile_portable<kGradRows>(w, cq, C, D, q, p.hp + i0 * D, mu, wsum.data() + i0, rows,
                                        dh_p + i0 * D);
        }
      }
    }
  });
  // an ignored sample's gradient is exactly 0, even where its (missing modality's) features are not finite
  for (int64_t i = 0; i < B; ++i)
    if (lab[i * sy] == kIgnore) std::fill(dh_p + i * D, dh_p + (i + 1) * D, 0.0f);
  return out == at::kFloat ? dh : dh.to(out);
}

at::Tensor prototype_ce_bwd_cpu(const at::Tensor& grad_ce, const at::Tensor& grad_ent, const at::Tensor& features,
                                const at::Tensor& prototypes, const at::Tensor& labels, const at::Tensor& lse,
                                const at::Tensor& ent, const at::Tensor& z, bool squared) {
  const Problem p = problem(features, prototypes, labels);
  TORCH_CHECK(grad_ce.dim() == 1 && grad_ce.size(0) == p.B && grad_ent.dim() == 1 && grad_ent.size(0) == p.B,
              "prototype_ce: the gradients must be (B,)");
  const at::Tensor gce = grad_ce.to(at::kFloat), gent = grad_ent.to(at::kFloat);
  return pce_backward(p, {gce.const_data_ptr<float>(), gce.stride(0)}, {gent.const_data_ptr<float>(), gent.stride(0)},
                      labels, lse, ent, z, squared, features.scalar_type(), -1);
}

// ------------------------------------------------------------------------------------ eager autograd
// The eager CPU call as a C++ autograd Function (as grad_scale's and modality_drop's): neither direction
// enters Python, and the reduction is part of it. At 64 × 6 × 512 both kernels take ~90 µs, and the Python
// autograd.Function, its backward glue and the reduction's recorded ops cost about as much again.
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ce and ent summed over the samples (ignored ones are 0) in double, divided by `div`, as 0-d float32
at::Tensor reduced(const at::Tensor& t, double div) {
  const float* v = t.const_data_ptr<float>();
  double sum = 0.0;
  for (int64_t i = 0; i < t.size(0); ++i) sum += v[i];
  return at::scalar_tensor(sum / div, t.options());
}

struct PrototypeCEFunction : public torch::autograd::Function<PrototypeCEFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& features, const at::Tensor& prototypes,
                               const at::Tensor& labels, bool squared, int64_t reduction, bool check) {
    int64_t generation = -1;
    auto [ce, ent, lse, z] = pce_forward(features, prototypes, labels, squared, check, &generation);
    ctx->saved_data["generation"] = generation;
    ctx->save_for_backward({features, prototypes, labels, lse, ent, z});
    ctx->saved_data["squared"] = squared;
    ctx->saved_data["reduction"] = reduction;
    // an output the loss does not use has no gradient: it is read as 0, no zero tensor is made
    ctx->set_materialize_grads(false);
    if (reduction == kNone) return {ce, ent};
    double div = 1.0;
    if (reduction == kMean) {  // the samples that count (0/0 -> 0: then every ce is 0)
      const int64_t* lab = labels.const_data_ptr<int64_t>();
      int64_t n = 0;
      for (int64_t i = 0; i < labels.size(0); ++i) n += lab[i * labels.stride(0)] != kIgnore;
      div = static_cast<double>(std::max<int64_t>(n, 1));
    }
    ctx->saved_data["div"] = div;
    return {reduced(ce, div), reduced(ent, div)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // the kernels' backward is not itself differentiable: an error, not a second derivative of 0
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "prototype_ce: no double backward (create_graph=True) through the eager CPU kernels, their backward is "
                "not differentiable; take this loss's gradient with create_graph=False");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &features = saved[0], &labels = saved[2];
    const Problem p = problem(features, saved[1], labels);
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    // the per-sample gradients: a reduced loss's one value (stride 0), 0 for an output the loss does not use
    float value[2] = {0.0f, 0.0f};
    at::Tensor per_row[2];
    RowGrad g[2];
    for (int j = 0; j < 2; ++j) {
      g[j] = {value + j, 0};
      if (!grads[j].defined()) continue;
      if (reduction == kNone) {
        TORCH_CHECK(grads[j].dim() == 1 && grads[j].size(0) == p.B, "prototype_ce: the gradients must be (B,)");
        per_row[j] = grads[j].to(at::kFloat);
        g[j] = {per_row[j].const_data_ptr<float>(), per_row[j].stride(0)};
      } else {
        value[j] = static_cast<float>(grads[j].item<double>() / ctx->saved_data["div"].toDouble());
      }
    }
    at::Tensor dh = pce_backward(p, g[0], g[1], labels, saved[3], saved[4], saved[5],
                                 ctx->saved_data["squared"].toBool(), features.scalar_type(),
                                 ctx->saved_data["generation"].toInt());
    return {dh, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// the eager entry (arguments checked by the caller; the labels' range here when `check`)
std::tuple<at::Tensor, at::Tensor> prototype_ce_cpu(const at::Tensor& features, const at::Tensor& prototypes,
                                                    const at::Tensor& labels, bool squared, c10::string_view reduction,
                                                    bool check) {
  int64_t r;
  if (reduction == "mean") {
    r = kMean;
  } else if (reduction == "sum") {
    r = kSum;
  } else {
    TORCH_CHECK_VALUE(reduction == "none", "prototype_ce: reduction must be 'none', 'mean' or 'sum', got '",
                      reduction, "'");
    r = kNone;
  }
  // prototypes get no gradient (PMR computes them without one)
  variable_list out = PrototypeCEFunction::apply(features, prototypes.detach(), labels, squared, r, check);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmkernels_C, m) {
  // (ce, ent, lse, z): ce, ent, lse float32 (B,) and z = −d (or −d²) float32 (B, C), kept for the backward
  // (a (B, C) tensor, 79 KB at 64 × 309, read back instead of recomputing B·C·D differences); features (B, D) and prototypes (C, D) floating point, labels (B,) int64
  // (-100: ignored). check: labels outside [0, C) raise ValueError instead of giving a NaN ce.
  m.def("prototype_ce_fwd(Tensor features, Tensor prototypes, Tensor labels, bool squared, bool check) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  // dfeatures (B, D), contiguous, in the features' dtype; z: the forward's fourth output
  m.def("prototype_ce_bwd(Tensor grad_ce, Tensor grad_ent, Tensor features, Tensor prototypes, Tensor labels, "
        "Tensor lse, Tensor ent, Tensor z, bool squared) -> Tensor");
  // eager CPU calls: (ce, ent) with the reduction ("none": (B,) each; "mean", "sum": 0-d) and the backward of
  // prototype_ce_bwd attached (features only; no double backward)
  m.def("prototype_ce(Tensor features, Tensor prototypes, Tensor labels, bool squared, str reduction, bool check) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmkernels_C, CPU, m) {
  m.impl("prototype_ce_fwd", &prototype_ce_fwd_cpu);
  m.impl("prototype_ce_bwd", &prototype_ce_bwd_cpu);
}

// The Python autograd.Function / registered autograd of mmkernels::prototype_ce differentiates these two;
// autograd itself skips them (no fallback kernel on every call).
TORCH_LIBRARY_IMPL(mmkernels_C, Autograd, m) {
  m.impl("prototype_ce_fwd", torch::CppFunction::makeFallthrough());
  m.impl("prototype_ce_bwd", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(mmkernels_C, CompositeImplicitAutograd, m) { m.impl("prototype_ce", &prototype_ce_cpu); }

}  // namespace mmk
