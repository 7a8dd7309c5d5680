// CPU kernel of modality_scores (Python: mmkernels/ops/modality_scores.py): per modality, the sum over the
// counted samples of the softmax probability of the label and the count of first-index argmax hits.
// A sample counts when its label is not -100 and its mask entry (if any) is non-zero; a sample that does not
// count is never read, so NaN logits of a missing modality stay out of the sums.
//
// Per row (one sample of one modality), AVX2 path: one read from memory, in 1 KB chunks that each get a max
// sweep and an exp-sum sweep from L1 against the running maximum (online softmax), with software prefetch
// ahead; the row sums use a cheaper exp than the label's probability (both below 4e-7 relative, see
// exp_sum8). Portable path (MMKERNELS_NO_AVX2=1, CPUs without AVX2/FMA, and fp64): a max pass, then an
// exp-sum pass while the row is in cache. fp32 math for fp32/fp16/bf16 logits (fp16/bf16 rows are widened
// into a per-thread buffer, as are rows with a class stride != 1), fp64 for fp64.
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
#include <cstdlib>
#include <cstring>
#include <limits>
#include <set>
#include <sstream>
#include <vector>

namespace mmk {
namespace {

constexpr int64_t kIgnore = -100;
constexpr int64_t kRowsPerBlock = 64;     // rows summed together in double (fixed: thread-count independent)
constexpr int64_t kParallelWork = 32768;  // logits per thread below which threads cost more than they save

bool scores_avx2() {
  static const bool on = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c") && std::getenv("MMKERNELS_NO_AVX2") == nullptr;
  return on;
}

// ---------------------------------------------------------------------------------------------- exp, x <= 0
// exp(x) for x <= 0, -inf or NaN: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two so that n ln2 is exact
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

// exp(d) for d <= 0 in the row sums (d = logit - running max), cheaper than exp_neg: the sum sweep is what
// bounds the kernel once the row is read once.
// d = (N/8) ln2 + r with |r| <= ln2/16, e^r = 1 + r + r^2/2 + r^3/6 (truncation below 1.5e-7 relative),
// 2^(N/8) = 2^(N>>3) * 2^((N&7)/8) from an 8-entry table picked by vpermd. Adding 1.5*2^23 + 1016 rounds
// d*8/ln2 to N and leaves N + 1016 = 8*((N>>3) + 127) + (N&7) in the low bits, so one shift by 20 puts
// (N>>3) + 127 into the exponent field and N&7 just below it; each table entry is bits(2^(j/8)) less its
// own exponent and less j<<20, so one integer add yields the bits of 2^(N/8). ln2/8 is one fp32 constant:
// its rounding (3.7e-9) adds |d|*4.3e-8 relative error, which matters nowhere e^d does (e^-20 = 2e-9).
// Measured against float64 over [-87.3, 0]: at most 3.8e-7 relative. d is clamped at -87.3 first (max
// keeps a NaN d: it returns its second operand when one is NaN): -inf and anything below give 1.2e-38
// instead of 0, which a sum holding the max's own e^0 = 1 cannot tell apart; a row whose max is -inf
// (nothing but -inf) is handled by the caller.
constexpr float k8Log2e = 11.541560173034668f, kLn2By8 = 0.08664339780807495f, kRound8 = 12583928.0f;

__attribute__((target("avx2,fma"))) inline __m256 exp_sum8(__m256 d) {
  const __m256i table = _mm256_setr_epi32(0, -289342, -509968, -655657, -719629, -694486, -572163, -343865);
  d = _mm256_max_ps(_mm256_set1_ps(kExpLo), d);
  const __m256 t = _mm256_fmadd_ps(d, _mm256_set1_ps(k8Log2e), _mm256_set1_ps(kRound8));
  const __m256 r = _mm256_fnmadd_ps(_mm256_sub_ps(t, _mm256_set1_ps(kRound8)), _mm256_set1_ps(kLn2By8), d);
  __m256 p = _mm256_fmadd_ps(r, _mm256_set1_ps(1.0f / 6.0f), _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i ti = _mm256_castps_si256(t);
  const __m256i e = _mm256_add_epi32(_mm256_permutevar8x32_epi32(table, ti), _mm256_slli_epi32(ti, 20));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

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

// One read of the row from memory: it is walked in chunks of kChunk logits (1 KB, in L1 once loaded), each
// chunk taking a max sweep and then an exp-sum sweep from L1 against the running maximum (online softmax:
// when a chunk raises the maximum, the row's sum so far is rescaled by exp(old - new), a handful of times
// per row). Software prefetch kPrefetch bytes ahead keeps the memory reads of the next chunks in flight
// while a chunk's exp sweep computes; without it the hardware prefetcher alone leaves them mostly serial
// (measured at 2x4096x8192: about 25% slower without it, and larger chunks or other distances did not beat
// 1 KB / 4 KB). Chunk sums are added in double. The argmax is the first index attaining the maximum in the
// first chunk that reached it (later chunks replace it only when strictly larger), found by one scan of
// that chunk at the end.
constexpr int64_t kChunk = 256;
constexpr int64_t kPrefetch = 4096;

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

__attribute__((target("avx2,fma"))) inline float chunk_expsum(const float* x, int64_t n, __m256 tv, bool tail,
                                                             float shift) {
  const __m256 vs = _mm256_set1_ps(shift);
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    s0 = _mm256_add_ps(s0, exp_sum8(_mm256_sub_ps(_mm256_loadu_ps(x + k), vs)));
    s1 = _mm256_add_ps(s1, exp_sum8(_mm256_sub_ps(_mm256_loadu_ps(x + k + 8), vs)));
    s2 = _mm256_add_ps(s2, exp_sum8(_mm256_sub_ps(_mm256_loadu_ps(x + k + 16), vs)));
    s3 = _mm256_add_ps(s3, exp_sum8(_mm256_sub_ps(_mm256_loadu_ps(x + k + 24), vs)));
  }
  for (; k < n; k += 8) s0 = _mm256_add_ps(s0, exp_sum8(_mm256_sub_ps(_mm256_loadu_ps(x + k), vs)));
  if (tail) s1 = _mm256_add_ps(s1, exp_sum8(_mm256_sub_ps(tv, vs)));  // -inf lanes: 1.2e-38
  return hsum8(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
}

// pf_end: where the bytes worth prefetching end (the modality's last row; nullptr: none, for rows widened
// or gathered into a buffer)
__attribute__((target("avx2,fma"))) RowResult row_avx2(const float* x, int64_t K, int64_t y, const char* pf_end) {
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  float mx = ninf;
  double sum = 0;
  int64_t arg_chunk = 0;
  const __m256 ninf8 = _mm256_set1_ps(ninf);
  const bool prefetch = K >= kChunk;  // short rows: the hardware prefetcher keeps up
  __m256 tv = ninf8;  // the row's last partial vector, -inf past its end
  for (int64_t c0 = 0; c0 < K; c0 += kChunk) {
    const int64_t n = std::min<int64_t>(kChunk, K - c0);
    const int64_t full = n & ~int64_t(7);
    const bool tail = full < n;
    const float* xc = x + c0;
    if (prefetch) {
      const char* p = reinterpret_cast<const char*>(xc) + kPrefetch;
      for (int64_t b = 0; b < 4 * n && p + b < pf_end; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
    }
    if (tail) {
      const __m256i tm = tail_mask(n - full);
      tv = _mm256_blendv_ps(ninf8, _mm256_maskload_ps(xc + full, tm), _mm256_castsi256_ps(tm));
    }
    const float cm = hmax8(chunk_max(xc, full, tv, tail));
    if (cm > mx) {  // false for NaN: a NaN row's sum is NaN through the exp sweep
      // from -inf: what was summed (clamped -inf, 1.2e-38 each) counts 0; NaN * 0 stays NaN
      sum *= mx == ninf ? 0.0 : std::exp(static_cast<double>(mx) - cm);
      mx = cm;
      arg_chunk = c0;
    }
    sum += chunk_expsum(xc, full, tv, tail, mx == ninf ? 0.0f : mx);  // all -inf so far: shift by 0, not NaN
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
  return {static_cast<double>(exp_neg(x[y] - mx)) / sum, arg == y};
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
  const bool avx2 = scores_avx2();
  const int64_t grain = std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, kRowsPerBlock * K));
  at::parallel_for(0, M * blocks_per_m, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> buf;
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t m = blk / blocks_per_m, b0 = (blk % blocks_per_m) * kRowsPerBlock;
      const int64_t b1 = std::min(B, b0 + kRowsPerBlock);
      const T* base = static_cast<const T*>(rows[m].data);
      // software prefetch runs on within this modality's rows when they are one contiguous run
      const char* pf_end = rows[m].sk == 1 && rows[m].sb == K ? reinterpret_cast<const char*>(base + B * K) : nullptr;
      double s = 0, c = 0;
      for (int64_t b = b0; b < b1; ++b) {
        if (!keep[m * B + b]) continue;
        const T* x = base + b * rows[m].sb;
        if (buf.empty() && !(std::is_same_v<T, A> && rows[m].sk == 1)) buf.resize(K);
        const A* r = row_ptr<T, A>(x, K, rows[m].sk, buf.data(), avx2);
        RowResult res;
        if constexpr (std::is_same_v<A, float>) {
          res = avx2 ? row_avx2(r, K, y[b], static_cast<const void*>(r) == x ? pf_end : nullptr)
                     : row_scalar<float>(r, K, y[b]);
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
