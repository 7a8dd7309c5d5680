// CPU kernel of modality_scores (Python: mmkernels/ops/modality_scores.py): per modality, the sum over the
// counted samples of the softmax probability of the label and the count of first-index argmax hits.
// A sample counts when its label is not -100 and its mask entry (if any) is non-zero; a sample that does not
// count is never read, so NaN logits of a missing modality stay out of the sums.
//
// Per row (one sample of one modality), AVX2 path: one read from memory, in 4 KB chunks each summed in one
// sweep against a shift that lags the running maximum (online softmax, see row_avx2), with software prefetch
// ahead on long contiguous runs; rows of at most 8 logits take one masked vector. The exps, the label's
// included, are mmkernels::exp_ps (simd.h; within 2e-7 relative of float64 near the maximum). Portable path
// (MMKERNELS_NO_AVX2=1, CPUs without AVX2/FMA, and fp64): a max pass, then an exp-sum pass while the row is
// in cache. fp32 math for fp32/fp16/bf16 logits (fp16/bf16 rows are widened into a per-thread buffer, as are
// rows with a class stride != 1), fp64 for fp64.
//
// Rows are grouped in fixed blocks of one modality; each block sums its rows in double and the blocks are
// added in order, so the result does not depend on the thread count.
//
// Labels outside [0, K) other than -100: with check=true a ValueError naming them (the message of the
// Python check); with check=false both sums of every modality are NaN (the CUDA kernel's signal).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>
#include <sstream>
#include <vector>

#include "cpu_isa.h"
#include "simd.h"

namespace mmk {
namespace {

constexpr int64_t kIgnore = -100;
constexpr int64_t kRowsPerBlock = 64;     // rows summed together in double (fixed: thread-count independent)
constexpr int64_t kParallelWork = 32768;  // logits per thread below which threads cost more than they save

// ----------------------------------------------------------------------------------- exp, x <= 0 (portable)
// exp(x) for x <= 0, -inf or NaN, in the portable loops: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two so that n ln2 is exact
// enough), e^r = 1 + r + r^2 P(r) with P of degree 4 (fitted for relative error; within 1 ulp of e^r in
// fp32), 2^n written into the exponent bits. Adding 1.5*2^23 + 127 rounds x/ln2 to the integer n and leaves
// n + 127 in the low bits, which a shift by 23 moves into the exponent field. Below -87.3 (where expf turns
// subnormal) the result is 0, which no sum of probabilities can tell apart; -inf gives 0, NaN stays NaN.
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpLo = -87.33654f;
constexpr float kRound = 12582912.0f + 127.0f;
constexpr float kP0 = 0.4999999403953552f, kP1 = 0.1666652113199234f, kP2 = 0.04166838899254799f,
                kP3 = 0.008368710055947304f, kP4 = 0.001381461275741458f;

inline float exp_neg(float x) {
  if (!(x >= kExpLo)) return x < kExpLo ? 0.0f : x;  // underflow and -inf: 0; NaN: NaN
  const float t = x * kLog2e + kRound;
  const float n = t - kRound;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = kP4;
  p = p * r + kP3;
  p = p * r + kP2;
  p = p * r + kP1;
  p = p * r + kP0;
  p = 1.0f + (r + p * r * r);
  int32_t bits;
  std::memcpy(&bits, &t, 4);
  bits <<= 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

inline double exp_neg(double x) { return std::exp(x); }

// ---------------------------------------------------------------------------------------------- one row
struct RowResult {
  double p;  // softmax probability of the label
  bool hit;  // first-index argmax == label
};

// Portable version (also the fp64 path). NaN anywhere in the row makes the sum, hence p, NaN.
template <typename A>
RowResult row_scalar(const A* x, int64_t K, int64_t y) {
  A mx = x[0];
  int64_t arg = 0;
  for (int64_t k = 1; k < K; ++k) {
    if (x[k] > mx) {
      mx = x[k];
      arg = k;
    }
  }
  // a row of -inf only: shift by 0 (not -inf - -inf = NaN); the sum is 0 and p = 0/0, as log_softmax gives
  const A shift = mx == -std::numeric_limits<A>::infinity() ? A(0) : mx;
  A sum = 0;
  for (int64_t k = 0; k < K; ++k) sum += exp_neg(static_cast<A>(x[k] - shift));
  return {static_cast<double>(exp_neg(static_cast<A>(x[y] - shift)) / sum), arg == y};
}

__attribute__((target("avx2"))) inline __m256i tail_mask(int64_t n) {  // lanes [0, n) set, 0 <= n <= 8
  alignas(32) static const int32_t table[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + 8 - n));
}

__attribute__((target("avx2,fma"))) inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// One read of the row from memory, in chunks of kChunk logits (4 KB), each summed in ONE sweep: e^(x − s)
// against the maximum s of the chunks before it (online softmax), with the chunk's own maximum taken alongside
// (the first chunk gets a max sweep first, which leaves it in L1). When a chunk raises the maximum, the row's
// sum (this chunk's included) is rescaled to the new s for the chunks after it; only a chunk whose maximum
// exceeds s by more than kLazy (its fp32 lane sums could have overflowed: 64 terms per lane, each up to e^64 =
// 6e27 are safe) is summed again from L1 against its own maximum. Against a max sweep and then an exp sweep
// per chunk (the previous form, 1 KB chunks) the exps of a chunk no longer wait for the chunk's maximum, i.e.
// for all its loads. Software prefetch kPrefetch bytes ahead, one line per 64 bytes summed, keeps the reads
// of the next pages in flight (the hardware prefetcher alone stops at every 4 KB page: about 30% slower at
// 2x4096x8192, 1 thread); it runs where the modality's contiguous rows exceed kPrefetchBytes (from L2/L3 the
// prefetches cost more than they save). Chunk sums are added in double. The argmax is the first index
// attaining the maximum in the first chunk that reached it (later chunks replace it only when strictly
// larger), found by one scan of that chunk at the end.
constexpr int64_t kChunk = 1024;
constexpr int64_t kPrefetch = 4096;
constexpr int64_t kPrefetchBytes = 1 << 20;
constexpr float kLazy = 64.0f;

// Over x[0, n), n a multiple of 8, plus the tail vector tv (lanes past the row's end are -inf) when `tail`.
__attribute__((target("avx2,fma"))) inline __m256 chunk_max(const float* x, int64_t n, __m256 tv, bool tail) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + k));
    m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + k + 8));
    m2 = _mm256_max_ps(m2, _mm256_loadu_ps(x + k + 16));
    m3 = _mm256_max_ps(m3, _mm256_loadu_ps(x + k + 24));
  }
  for (; k < n; k += 8) m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + k));
  if (tail) m1 = _mm256_max_ps(m1, tv);
  return _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3));
}

// Σ e^(x − s) over the chunk and, with MAX, the chunk's maximum (*cmax). Two sum chains and one max chain:
// more would not fit the sixteen registers next to exp_ps's constants, and a spilled accumulator puts a
// store-to-load forwarding on the loop's dependency chain.
template <bool PF, bool MAX = true>
__attribute__((target("avx2,fma"))) inline float chunk_sum(const float* x, int64_t n, __m256 tv, bool tail,
                                                          float shift, float* cmax) {
  const __m256 vb = _mm256_set1_ps(shift);
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, m0 = ninf;
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    if (PF) _mm_prefetch(reinterpret_cast<const char*>(x + k) + kPrefetch, _MM_HINT_T0);
    const __m256 v0 = _mm256_loadu_ps(x + k), v1 = _mm256_loadu_ps(x + k + 8);
    if (MAX) m0 = _mm256_max_ps(m0, _mm256_max_ps(v0, v1));
    s0 = _mm256_add_ps(s0, mmkernels::exp_ps(v0, vb));
    s1 = _mm256_add_ps(s1, mmkernels::exp_ps(v1, vb));
  }
  if (k < n) {  // n is a multiple of 8
    const __m256 v0 = _mm256_loadu_ps(x + k);
    if (MAX) m0 = _mm256_max_ps(m0, v0);
    s0 = _mm256_add_ps(s0, mmkernels::exp_ps(v0, vb));
  }
  if (tail) {  // -inf lanes: 1.2e-38 each, which no sum holding its maximum's e^0 = 1 can tell from 0
    if (MAX) m0 = _mm256_max_ps(m0, tv);
    s1 = _mm256_add_ps(s1, mmkernels::exp_ps(tv, vb));
  }
  if (MAX) *cmax = hmax8(m0);
  return hsum8(_mm256_add_ps(s0, s1));
}

// The label's probability e^(x_y − s) / sum, by the exp of the sum's terms. Exactly 0 where x_y − s is below
// exp_ps's range (-inf included), as log_softmax gives; NaN when the sum is (a NaN elsewhere in the row).
__attribute__((target("avx2,fma"))) inline double label_p(float xy, float shift, double sum) {
  if (xy - shift < kExpLo) return 0.0 / sum;
  return static_cast<double>(_mm_cvtss_f32(_mm256_castps256_ps128(
             mmkernels::exp_ps(_mm256_set1_ps(xy), _mm256_set1_ps(shift))))) / sum;
}

// Rows of at most 8 logits (CREMA-D's 6 classes): one masked vector, its maximum, one exp, no chunk loop.
__attribute__((target("avx2,fma"))) inline RowResult row_short_avx2(const float* x, int64_t K, int64_t y) {
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  const __m256i tm = tail_mask(K);
  const __m256 v = _mm256_blendv_ps(_mm256_set1_ps(ninf), _mm256_maskload_ps(x, tm), _mm256_castsi256_ps(tm));
  const float mx = hmax8(v);
  const int bits = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(mx), _CMP_EQ_OQ));
  const bool hit = bits != 0 && __builtin_ctz(bits) == y;  // NaN rows: possibly no index (p is NaN then)
  // a row of -inf only: 0/0 = NaN, as log_softmax gives
  if (mx == ninf) return {std::numeric_limits<double>::quiet_NaN(), hit};
  const double sum = hsum8(mmkernels::exp_ps(v, _mm256_set1_ps(mx)));
  return {label_p(x[y], mx, sum), hit};
}

// pf: prefetch ahead (the modality's rows are one contiguous run of more than kPrefetchBytes)
template <bool PF>
__attribute__((target("avx2,fma"))) RowResult row_avx2(const float* x, int64_t K, int64_t y) {
  if (K <= 8) return row_short_avx2(x, K, y);
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  float mx = ninf, shift = 0.0f;
  double sum = 0;
  int64_t arg_chunk = 0;
  const __m256 ninf8 = _mm256_set1_ps(ninf);
  __m256 tv = ninf8;  // the row's last partial vector, -inf past its end
  for (int64_t c0 = 0; c0 < K; c0 += kChunk) {
    const int64_t n = std::min<int64_t>(kChunk, K - c0);
    const int64_t full = n & ~int64_t(7);
    const bool tail = full < n;
    const float* xc = x + c0;
    if (tail) {
      const __m256i tm = tail_mask(n - full);
      tv = _mm256_blendv_ps(ninf8, _mm256_maskload_ps(xc + full, tm), _mm256_castsi256_ps(tm));
    }
    float cm;
    if (mx == ninf) {  // the first chunk, or every logit so far -inf: the shift is this chunk's maximum
      cm = hmax8(chunk_max(xc, full, tv, tail));
      if (cm > mx) {  // false for NaN: a NaN row's sum is NaN through the exps
        sum *= 0.0;   // what was summed (-inf only, 1.2e-38 each) counts 0; NaN * 0 stays NaN
        mx = shift = cm;
        arg_chunk = c0;
      }
      sum += chunk_sum<PF, false>(xc, full, tv, tail, shift, &cm);  // from L1, prefetching the next page
      continue;
    }
    double cs = chunk_sum<PF>(xc, full, tv, tail, shift, &cm);
    if (cm > mx) {  // the shift moves up to the new maximum for the chunks after this one
      mx = cm;
      arg_chunk = c0;
      const double rescale = std::exp(static_cast<double>(shift) - cm);
      if (cm > shift + kLazy) {  // rare: this chunk's terms may have overflowed: sum it again from L1
        sum *= rescale;
        cs = chunk_sum<false, false>(xc, full, tv, tail, cm, &cm);
      } else {
        sum = (sum + cs) * rescale;
        cs = 0.0;
      }
      shift = cm;
    }
    sum += cs;
  }
  // first index of the maximum, in the chunk that first reached it (NaN rows: possibly none; p is NaN then)
  int64_t arg = -1;
  const __m256 vm = _mm256_set1_ps(mx);
  const int64_t ce = std::min<int64_t>(K, arg_chunk + kChunk), cfull = arg_chunk + ((ce - arg_chunk) & ~int64_t(7));
  for (int64_t k = arg_chunk; k < cfull; k += 8) {
    const int bits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + k), vm, _CMP_EQ_OQ));
    if (bits) {
      arg = k + __builtin_ctz(bits);
      break;
    }
  }
  if (arg < 0 && cfull < ce) {  // only the row's last chunk has a tail, and tv holds it
    const int bits = _mm256_movemask_ps(_mm256_cmp_ps(tv, vm, _CMP_EQ_OQ));
    if (bits) arg = cfull + __builtin_ctz(bits);
  }
  // a row of -inf only: 0/0 = NaN, as log_softmax gives (its clamped exps sum to K * 1.2e-38, not 0)
  if (mx == ninf) return {std::numeric_limits<double>::quiet_NaN(), arg == y};
  return {label_p(x[y], shift, sum), arg == y};
}

__attribute__((target("avx,f16c"))) void widen_half_f16c(const c10::Half* x, int64_t K, float* out) {
  int64_t k = 0;
  for (; k + 8 <= K; k += 8)
    _mm256_storeu_ps(out + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + k))));
  for (; k < K; ++k) out[k] = static_cast<float>(x[k]);
}

// Row m, b as a contiguous acc-type array: the logits themselves when they already are one, else widened
// (fp16/bf16) or gathered (class stride != 1) into buf.
template <typename T, typename A>
const A* row_ptr(const T* x, int64_t K, int64_t sk, A* buf, bool avx2) {
  if constexpr (std::is_same_v<T, A>) {
    if (sk == 1) return x;
  }
  if constexpr (std::is_same_v<T, c10::Half> && std::is_same_v<A, float>) {
    if (sk == 1 && avx2) {
      widen_half_f16c(x, K, buf);
      return buf;
    }
  }
  for (int64_t k = 0; k < K; ++k) buf[k] = static_cast<A>(x[k * sk]);
  return buf;
}

// One (modality) tensor of rows: x[b * sb + k * sk], b in [0, B).
struct Rows {
  const void* data;
  int64_t sb, sk;
};

template <typename T>
void score_blocks(const std::vector<Rows>& rows, int64_t B, int64_t K, const int64_t* y,
                  const uint8_t* keep, double* part) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int64_t M = static_cast<int64_t>(rows.size());
  const int64_t blocks_per_m = (B + kRowsPerBlock - 1) / kRowsPerBlock;
  const bool avx2 = isa::avx2_fma();
  const int64_t grain = std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, kRowsPerBlock * K));
  at::parallel_for(0, M * blocks_per_m, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> buf;
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t m = blk / blocks_per_m, b0 = (blk % blocks_per_m) * kRowsPerBlock;
      const int64_t b1 = std::min(B, b0 + kRowsPerBlock);
      const T* base = static_cast<const T*>(rows[m].data);
      // software prefetch runs on within this modality's rows when they are one long contiguous run
      const bool prefetch = rows[m].sk == 1 && rows[m].sb == K && B * K * int64_t(sizeof(T)) > kPrefetchBytes;
      double s = 0, c = 0;
      for (int64_t b = b0; b < b1; ++b) {
        if (!keep[m * B + b]) continue;
        const T* x = base + b * rows[m].sb;
        if (buf.empty() && !(std::is_same_v<T, A> && rows[m].sk == 1)) buf.resize(K);
        const A* r = row_ptr<T, A>(x, K, rows[m].sk, buf.data(), avx2);
        RowResult res;
        if constexpr (std::is_same_v<A, float>) {
          if (!avx2) res = row_scalar<float>(r, K, y[b]);
          else if (prefetch && static_cast<const void*>(r) == x) res = row_avx2<true>(r, K, y[b]);
          else res = row_avx2<false>(r, K, y[b]);
        } else {
          res = row_scalar<double>(r, K, y[b]);
        }
        s += res.p;
        c += res.hit ? 1.0 : 0.0;
      }
      part[2 * blk] = s;
      part[2 * blk + 1] = c;
    }
  });
}

template <typename T>
bool mask_on(const void* p, int64_t off) {
  return static_cast<const T*>(p)[off] != T(0);
}

std::tuple<at::Tensor, at::Tensor> modality_scores_cpu(at::TensorList logits, const at::Tensor& labels,
                                                       const std::optional<at::Tensor>& mask, bool check) {
  TORCH_CHECK(!logits.empty(), "modality_scores: logits is an empty list");
  const bool stacked = logits.size() == 1 && logits[0].dim() == 3;
  const at::Tensor& first = logits[0];
  const int64_t M = stacked ? first.size(0) : static_cast<int64_t>(logits.size());
  const int64_t B = stacked ? first.size(1) : first.size(0);
  const int64_t K = stacked ? first.size(2) : first.size(1);
  const auto dtype = first.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "modality_scores: logits must be float16/bfloat16/float32/float64, got ", dtype);
  TORCH_CHECK(K > 0 && M > 0, "modality_scores: logits need at least one modality and one class");
  std::vector<Rows> rows;
  rows.reserve(M);
  for (int64_t m = 0; m < M; ++m) {
    if (stacked) {
      rows.push_back({static_cast<const char*>(first.const_data_ptr()) + m * first.stride(0) * first.element_size(),
                      first.stride(1), first.stride(2)});
    } else {
      const at::Tensor& x = logits[m];
      TORCH_CHECK(x.dim() == 2 && x.size(0) == B && x.size(1) == K && x.scalar_type() == dtype &&
                      x.device().is_cpu(),
                  "modality_scores: every logits[m] must be a (B, K) CPU tensor of one dtype");
      rows.push_back({x.const_data_ptr(), x.stride(0), x.stride(1)});
    }
  }
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == B,
              "modality_scores: labels must be (B,) int64");
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  const int64_t sy = labels.stride(0);

  // labels: contiguous copy (B values), the bad ones collected for the message
  std::vector<int64_t> y(B);
  std::set<int64_t> bad;
  for (int64_t b = 0; b < B; ++b) {
    y[b] = lab[b * sy];
    if (y[b] != kIgnore && (y[b] < 0 || y[b] >= K)) bad.insert(y[b]);
  }
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor scores = at::empty({M}, opts), correct = at::empty({M}, opts);
  float* so = scores.data_ptr<float>();
  float* co = correct.data_ptr<float>();
  if (!bad.empty()) {
    if (check) {
      std::ostringstream msg;
      msg << "modality_scores: labels must lie in [0, " << K << ") or equal " << kIgnore << " (ignored); got [";
      int shown = 0;
      for (int64_t v : bad) {
        if (shown == 10) break;
        msg << (shown++ ? ", " : "") << v;
      }
      msg << "]";
      TORCH_CHECK_VALUE(false, msg.str());
    }
    std::fill(so, so + M, std::numeric_limits<float>::quiet_NaN());
    std::fill(co, co + M, std::numeric_limits<float>::quiet_NaN());
    return {scores, correct};
  }

  // which (modality, sample) rows count: label not ignored, mask entry non-zero
  std::vector<uint8_t> keep(M * B);
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t valid = y[b] != kIgnore;
    for (int64_t m = 0; m < M; ++m) keep[m * B + b] = valid;
  }
  if (mask.has_value()) {
    const at::Tensor& mk = *mask;
    TORCH_CHECK(mk.dim() == 2 && mk.size(0) == B && mk.size(1) == M, "modality_scores: mask must be (B, M)");
    const int64_t s0 = mk.stride(0), s1 = mk.stride(1);
    const void* p = mk.const_data_ptr();
    bool (*on)(const void*, int64_t) = nullptr;
    switch (mk.scalar_type()) {
      case at::kBool: on = &mask_on<bool>; break;
      case at::kFloat: on = &mask_on<float>; break;
      case at::kDouble: on = &mask_on<double>; break;
      case at::kHalf: on = &mask_on<c10::Half>; break;
      case at::kBFloat16: on = &mask_on<c10::BFloat16>; break;
      default: TORCH_CHECK_TYPE(false, "modality_scores: mask must be bool or floating point, got ", mk.scalar_type());
    }
    for (int64_t b = 0; b < B; ++b)
      for (int64_t m = 0; m < M; ++m)
        if (!on(p, b * s0 + m * s1)) keep[m * B + b] = 0;
  }

  const int64_t blocks_per_m = (B + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<double> part(2 * M * blocks_per_m);
  switch (dtype) {
    case at::kFloat: score_blocks<float>(rows, B, K, y.data(), keep.data(), part.data()); break;
    case at::kDouble: score_blocks<double>(rows, B, K, y.data(), keep.data(), part.data()); break;
    case at::kHalf: score_blocks<c10::Half>(rows, B, K, y.data(), keep.data(), part.data()); break;
    default: score_blocks<c10::BFloat16>(rows, B, K, y.data(), keep.data(), part.data()); break;
  }
  for (int64_t m = 0; m < M; ++m) {
    double s = 0, c = 0;
    for (int64_t j = 0; j < blocks_per_m; ++j) {
      s += part[2 * (m * blocks_per_m + j)];
      c += part[2 * (m * blocks_per_m + j) + 1];
    }
    so[m] = static_cast<float>(s);
    co[m] = static_cast<float>(c);
  }
  return {scores, correct};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmkernels_C, m) {
  // (scores, correct), float32 (M,): logits is [(M, B, K)] or M tensors (B, K); labels (B,) int64 (-100:
  // ignored); mask (B, M) bool/float, 0 = missing. check: bad labels raise ValueError instead of giving NaN.
  m.def("modality_scores(Tensor[] logits, Tensor labels, Tensor? mask, bool check) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmkernels_C, CPU, m) { m.impl("modality_scores", &modality_scores_cpu); }

// A statistic, never differentiated: autograd is skipped (no fallback kernel on every call, no grad_fn on
// the outputs when the logits require grad).
TORCH_LIBRARY_IMPL(mmkernels_C, Autograd, m) { m.impl("modality_scores", torch::CppFunction::makeFallthrough()); }

}  // namespace mmk
