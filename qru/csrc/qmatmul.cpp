// Fused dequantize + matmul for a few rows of activations (decode: M <= 8), CPU.
//
// y[m, n] = sum_k x[m, k] * w[n, k] + bias[n], where w is the packed quantized weight of
// qru.kernels.quant4 (nf4 / fp4: blocks over the flattened weight) or qru.kernels.quant_int
// (int4 / int4_sym: groups along k within a row; int8: one scale per row). The weight is never
// materialized: each block / group becomes a 16-entry table ``lut[q] = round_w(value(q))``
// (``round_w``: rounding to the compute dtype, exactly what dequantize-to-that-dtype gives), and
// the codes index it in registers. So every weight value equals the reference dequantize
// bit for bit; only the summation order differs from ``F.linear`` (fp32 accumulation).
//
// AVX512-BF16 path for the 4-bit kinds with bf16 activations and 2..8 rows (the table as 16 bf16
// words, 32 codes looked up by one vpermw, vdpbf16ps into each row of x), an AVX-512 path for
// the 4-bit kinds (16 lanes, the table in one register, one permute), an AVX2 + FMA + F16C path (8 lanes, 16-entry table lookup = two permutes and a blend) and a
// portable scalar path (``scalar=true`` forces it; also used for block heads / tails that are
// not 32-element aligned). qru::Team over output rows, thread count = torch's.
#include "qru_common.h"

#ifndef QRU_QPF_BYTES
#define QRU_QPF_BYTES 2048
#endif
#ifndef QRU_DP_MIN_ROWS
#define QRU_DP_MIN_ROWS 2
#endif

namespace {

using namespace qru;

enum Kind { Q4_CODE = 0, INT4 = 1, INT4_SYM = 2, INT8 = 3 };
constexpr int kMaxRows = 8;

// torch's fp32 -> bf16 / fp16 (round to nearest even), back to fp32.
inline float round_bf16(float f) {
  if (std::isnan(f)) return f;
  const uint32_t u = f2u(f);
  return u2f((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u);
}
template <int WD>
inline float round_w(float f) {
  if constexpr (WD == BF16) return round_bf16(f);
  if constexpr (WD == F16) return static_cast<float>(c10::Half(f));
  return f;
}

template <int DT>
inline void store_out(void* p, int64_t i, float v) {
  if constexpr (DT == F32) static_cast<float*>(p)[i] = v;
  if constexpr (DT == BF16) static_cast<at::BFloat16*>(p)[i] = at::BFloat16(v);
  if constexpr (DT == F16) static_cast<at::Half*>(p)[i] = at::Half(v);
}

struct Problem {
  const float* x;      // [M, K] fp32
  const uint16_t* xb;  // [M, K] bf16 bits when x is bfloat16 (the dpbf16 path), else nullptr
  int64_t M, N, K;
  const uint8_t* w;    // packed codes (4-bit) or int8 bytes
  const float* scales; // Q4_CODE: absmax per flat block; INT4*: [N, groups]; INT8: [N]
  const uint8_t* zeros;  // INT4 only: [N, groups]
  float code[16];        // Q4_CODE codebook
  int64_t bs;            // Q4_CODE: block size (flat); INT4*: group along k
  int64_t groups;        // INT4*: groups per row
  int kind;
  const float* bias;     // [N] fp32 or nullptr
};

// Start / end (in k) and the 16-entry table of the block or group holding element (n, k).
template <int WD>
inline int64_t segment(const Problem& p, int64_t n, int64_t k, float* lut) {
  if (p.kind == Q4_CODE) {
    const int64_t e = n * p.K + k, b = e / p.bs;
    const float a = p.scales[b];
    for (int j = 0; j < 16; ++j) lut[j] = round_w<WD>(p.code[j] * a);
    return std::min(p.K, (b + 1) * p.bs - n * p.K);
  }
  const int64_t g = k / p.bs, gi = n * p.groups + g;
  const float s = p.scales[gi];
  const float z = p.kind == INT4 ? float(p.zeros[gi]) : 8.0f;
  for (int j = 0; j < 16; ++j) lut[j] = round_w<WD>((float(j) - z) * s);
  return std::min(p.K, (g + 1) * p.bs);
}

inline int nibble(const uint8_t* w, int64_t e) { return (e & 1) ? (w[e >> 1] & 0xF) : (w[e >> 1] >> 4); }

// acc[m] += sum_{k in [k0, k1)} x[m, k] lut[code of (n, k)]: elements one at a time through the table
// (the scalar path, and the vector paths' unaligned block heads and tails).
template <int M>
inline void lut_dot(const Problem& p, const float* lut, int64_t e0, int64_t k0, int64_t k1, float* acc) {
  for (int64_t k = k0; k < k1; ++k) {
    const float wv = lut[nibble(p.w, e0 + k)];
    for (int m = 0; m < M; ++m) acc[m] += p.x[m * p.K + k] * wv;
  }
}

// ---------------------------------------------------------------- scalar

template <int M, int WD>
void row_scalar(const Problem& p, int64_t n, float* acc) {
  for (int m = 0; m < M; ++m) acc[m] = 0.0f;
  const int64_t e0 = n * p.K;
  if (p.kind == INT8) {
    const float s = p.scales[n];
    for (int64_t k = 0; k < p.K; ++k) {
      const float wv = round_w<WD>(float(int8_t(p.w[e0 + k])) * s);
      for (int m = 0; m < M; ++m) acc[m] += p.x[m * p.K + k] * wv;
    }
    return;
  }
  float lut[16];
  for (int64_t k = 0; k < p.K;) {
    const int64_t end = segment<WD>(p, n, k, lut);
    lut_dot<M>(p, lut, e0, k, end, acc);
    k = end;
  }
}

// ---------------------------------------------------------------- AVX2

#if QRU_AVX2_F16C
template <int WD>
inline __m256 round_w8(__m256 v) {
  if constexpr (WD == BF16) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)),
                                       _mm256_set1_epi32(int(0xFFFF0000u)));
    return _mm256_castsi256_ps(r);
  } else if constexpr (WD == F16) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    return v;
  }
}

// lut[idx] for 8 lanes of a 16-entry table held as two vectors.
inline __m256 lut16(__m256i idx, __m256 lo, __m256 hi) {
  const __m256 a = _mm256_permutevar8x32_ps(lo, idx), b = _mm256_permutevar8x32_ps(hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// Accumulators per activation row: enough independent FMA chains for small M.
template <int M>
constexpr int kChains = M <= 2 ? 4 : (M <= 4 ? 2 : 1);

template <int M, int WD>
void row_avx2(const Problem& p, int64_t n, float* out_acc) {
  constexpr int A = kChains<M>;
  __m256 acc[M][A];
  for (int m = 0; m < M; ++m)
    for (int a = 0; a < A; ++a) acc[m][a] = _mm256_setzero_ps();
  float tail[M];
  for (int m = 0; m < M; ++m) tail[m] = 0.0f;
  const int64_t K = p.K, e0 = n * K;
  const float* x = p.x;

  if (p.kind == INT8) {
    const float s = p.scales[n];
    const __m256 vs = _mm256_set1_ps(s);
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.w + e0 + k));
      const __m128i b0 = _mm256_castsi256_si128(b), b1 = _mm256_extracti128_si256(b, 1);
      const __m256 w[4] = {
          round_w8<WD>(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b0)), vs)),
          round_w8<WD>(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b0, 8))), vs)),
          round_w8<WD>(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b1)), vs)),
          round_w8<WD>(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b1, 8))), vs))};
      for (int m = 0; m < M; ++m)
        for (int j = 0; j < 4; ++j)
          acc[m][j % A] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k + 8 * j), w[j], acc[m][j % A]);
    }
    for (; k < K; ++k) {
      const float wv = round_w<WD>(float(int8_t(p.w[e0 + k])) * s);
      for (int m = 0; m < M; ++m) tail[m] += x[m * K + k] * wv;
    }
  } else {
    alignas(32) float lut[16];
    const __m128i nib = _mm_set1_epi8(0x0F);
    const __m256 iota_lo = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), iota_hi = _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15);
    const __m256 code_lo = _mm256_loadu_ps(p.code), code_hi = _mm256_loadu_ps(p.code + 8);
    // block (nf4/fp4: of the flattened weight) or group index, advanced without divisions
    int64_t blk = p.kind == Q4_CODE ? e0 / p.bs : n * p.groups;
    int64_t blk_end = p.kind == Q4_CODE ? (blk + 1) * p.bs - e0 : p.bs;
    for (int64_t k = 0; k < K; ++blk, blk_end += p.bs) {
      // the block / group holding (n, k) and its table, vectorized
      const int64_t end = std::min(K, blk_end);
      __m256 lo, hi;
      if (p.kind == Q4_CODE) {
        const __m256 a = _mm256_set1_ps(p.scales[blk]);
        lo = round_w8<WD>(_mm256_mul_ps(code_lo, a));
        hi = round_w8<WD>(_mm256_mul_ps(code_hi, a));
      } else {
        const __m256 s = _mm256_set1_ps(p.scales[blk]);
        const __m256 z = _mm256_set1_ps(p.kind == INT4 ? float(p.zeros[blk]) : 8.0f);
        lo = round_w8<WD>(_mm256_mul_ps(_mm256_sub_ps(iota_lo, z), s));
        hi = round_w8<WD>(_mm256_mul_ps(_mm256_sub_ps(iota_hi, z), s));
      }
      const bool odd = (e0 + k) & 1;
      if (odd) {  // a block starting on a low nibble: one element through the table
        _mm256_store_ps(lut, lo);
        _mm256_store_ps(lut + 8, hi);
        lut_dot<M>(p, lut, e0, k, k + 1, tail);
        ++k;
      }
      for (; k + 32 <= end; k += 32) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.w + ((e0 + k) >> 1)));
        const __m128i h = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib), l = _mm_and_si128(bytes, nib);
        const __m128i q0 = _mm_unpacklo_epi8(h, l), q1 = _mm_unpackhi_epi8(h, l);  // elements 0-15, 16-31
        const __m256 w[4] = {lut16(_mm256_cvtepu8_epi32(q0), lo, hi),
                             lut16(_mm256_cvtepu8_epi32(_mm_srli_si128(q0, 8)), lo, hi),
                             lut16(_mm256_cvtepu8_epi32(q1), lo, hi),
                             lut16(_mm256_cvtepu8_epi32(_mm_srli_si128(q1, 8)), lo, hi)};
        for (int m = 0; m < M; ++m)
          for (int j = 0; j < 4; ++j)
            acc[m][j % A] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k + 8 * j), w[j], acc[m][j % A]);
      }
      if (k < end) {
        _mm256_store_ps(lut, lo);
        _mm256_store_ps(lut + 8, hi);
        lut_dot<M>(p, lut, e0, k, end, tail);
        k = end;
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    __m256 s = acc[m][0];
    for (int a = 1; a < A; ++a) s = _mm256_add_ps(s, acc[m][a]);
    out_acc[m] = hsum(s) + tail[m];
  }
}
#endif

// ---------------------------------------------------------------- AVX-512 (4-bit kinds)
// The same table lookup with 16 lanes: the whole 16-entry table fits one register and one
// vpermps indexes it. INT8 stays on the AVX2 path.

#if QRU_AVX512
template <int WD>
inline __m512 round_w16(__m512 v) {
  if constexpr (WD == BF16) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)),
                                       _mm512_set1_epi32(int(0xFFFF0000u)));
    return _mm512_castsi512_ps(r);
  } else if constexpr (WD == F16) {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    return v;
  }
}

// The walk over row n's blocks / groups shared by the 16-lane paths: per block its table t
// (16 lanes, rounded to the compute dtype), a low-nibble head element and the unaligned tail
// through lut_dot into tail[], and body(t, k, end) for the rest, which consumes whole 32-weight
// steps from k and returns where it stopped.
template <int M, int WD, class Body>
inline void walk_blocks16(const Problem& p, int64_t n, float* tail, Body&& body) {
  const int64_t K = p.K, e0 = n * K;
  alignas(64) float lut[16];
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 code = _mm512_loadu_ps(p.code);
  int64_t blk = p.kind == Q4_CODE ? e0 / p.bs : n * p.groups;
  int64_t blk_end = p.kind == Q4_CODE ? (blk + 1) * p.bs - e0 : p.bs;
  for (int64_t k = 0; k < K; ++blk, blk_end += p.bs) {
    const int64_t end = std::min(K, blk_end);
    __m512 t;
    if (p.kind == Q4_CODE) {
      t = round_w16<WD>(_mm512_mul_ps(code, _mm512_set1_ps(p.scales[blk])));
    } else {
      const __m512 z = _mm512_set1_ps(p.kind == INT4 ? float(p.zeros[blk]) : 8.0f);
      t = round_w16<WD>(_mm512_mul_ps(_mm512_sub_ps(iota, z), _mm512_set1_ps(p.scales[blk])));
    }
    if ((e0 + k) & 1) {  // a block starting on a low nibble: one element through the table
      _mm512_store_ps(lut, t);
      lut_dot<M>(p, lut, e0, k, k + 1, tail);
      ++k;
    }
    k = body(t, k, end);
    if (k < end) {
      _mm512_store_ps(lut, t);
      lut_dot<M>(p, lut, e0, k, end, tail);
      k = end;
    }
  }
}

template <int M, int WD>
void row_avx512(const Problem& p, int64_t n, float* out_acc) {
  __m512 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  float tail[M];
  for (int m = 0; m < M; ++m) tail[m] = 0.0f;
  const int64_t K = p.K, e0 = n * K;
  const float* x = p.x;
  const __m128i nib = _mm_set1_epi8(0x0F);
  walk_blocks16<M, WD>(p, n, tail, [&](__m512 t, int64_t k, int64_t end) __attribute__((always_inline)) {
    for (; k + 32 <= end; k += 32) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.w + ((e0 + k) >> 1)));
      const __m128i h = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib), l = _mm_and_si128(bytes, nib);
      const __m512 w0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(h, l)), t);  // elements 0-15
      const __m512 w1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(h, l)), t);  // 16-31
      for (int m = 0; m < M; ++m) {
        acc[m][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k), w0, acc[m][0]);
        acc[m][1] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k + 16), w1, acc[m][1]);
      }
    }
    return k;
  });
  for (int m = 0; m < M; ++m) out_acc[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) + tail[m];
}
#endif

// ---------------------------------------------------------------- AVX512-BF16 (4-bit kinds, bf16 x)
// The same 16-lane lookup; the looked-up values are already bf16 (round_w16<BF16>), so packing
// two vectors to 32 bf16 is exact, and vdpbf16ps multiplies them into bf16 x with one
// instruction per row of x per 32 weights (the fp32 path needs two FMAs). Exact products,
// fp32 sums: only the summation order differs from the fp32 path. The M row sums are reduced
// together at the end (reduce8), not one horizontal sum per row.
#if QRU_AVX512_BF16
// Software prefetch distance in packed bytes, one line per 128 weights, from 3 rows of x on
// (measured: 4096 x 4096 at M = 4 / 8 from 1.56 / 2.15 ms to 1.23 / 1.71 ms with a cold weight;
// at M = 2 it slowed 0.85 to 1.0 ms).
constexpr int64_t kPfBytes = QRU_QPF_BYTES;

template <int M>
void row_dpbf16(const Problem& p, int64_t n, float* out_acc) {
  static_assert(M <= 8, "at most 8 rows");
  __m512 acc[8];
  for (int m = 0; m < 8; ++m) acc[m] = _mm512_setzero_ps();
  float tail[M];
  for (int m = 0; m < M; ++m) tail[m] = 0.0f;
  const int64_t K = p.K, e0 = n * K;
  const __m512i lo4 = _mm512_set1_epi32(0x0F);
  walk_blocks16<M, BF16>(p, n, tail, [&](__m512 t, int64_t k, int64_t end) __attribute__((always_inline)) {
    // the table as 16 bf16 words (exact: t is bf16-rounded); 32 codes index it in one vpermw
    const __m512i tb = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(t));
    // 32 weights from kk into acc[a + m]: byte i holds elements 2i (high nibble) and 2i+1 (low),
    // so one dword per byte, its low word the first element's code and its high word the
    // second's, gives 32 word indices in element order
    auto step = [&](int64_t kk, int a) __attribute__((always_inline)) {
      const uint8_t* src = p.w + ((e0 + kk) >> 1);
      if (M >= 3 && kk % 128 == 0) _mm_prefetch(reinterpret_cast<const char*>(src + kPfBytes), _MM_HINT_T0);
      const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
      const __m512i idx = _mm512_or_si512(_mm512_srli_epi32(d, 4), _mm512_slli_epi32(_mm512_and_si512(d, lo4), 16));
      const __m512bh wb = as_bh(_mm512_permutexvar_epi16(idx, tb));  // elements kk .. kk+31 in order
      for (int m = 0; m < M; ++m)
        acc[a + m] = _mm512_dpbf16_ps(acc[a + m], as_bh(_mm512_loadu_si512(p.xb + m * K + kk)), wb);
    };
    if constexpr (M <= 2) {  // two chains per row (acc[m], acc[4 + m]): one waits on dot-product latency
      for (; k + 64 <= end; k += 64) {
        step(k, 0);
        step(k + 32, 4);
      }
    }
    for (; k + 32 <= end; k += 32) step(k, 0);
    return k;
  });
  alignas(32) float r[8];
  _mm256_store_ps(r, reduce8(acc));
  for (int m = 0; m < M; ++m) out_acc[m] = (M <= 2 ? r[m] + r[4 + m] : r[m]) + tail[m];
}
#endif

// Rows of x from which vdpbf16ps beats the two-FMA path: below, a row's single dependency
// chain of dot products waits on its latency.
constexpr int kDpMinRows = QRU_DP_MIN_ROWS;

template <int M, int WD, int DT>
void run(const Problem& p, void* out, bool scalar) {
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, p.K));
  // small weights run on one thread: waking a team costs more than the work (and much more
  // on a loaded machine)
  const int64_t per_thread = int64_t(1) << 17;  // weights
  const int threads = int(std::min<int64_t>(std::max(1, at::get_num_threads()),
                                            std::max<int64_t>(1, p.N * p.K / per_thread)));
  Team::get().run(p.N, chunk, threads, [&](int64_t n) {
    float acc[M];
#if QRU_AVX512_BF16 && QRU_AVX2_F16C
    if (!scalar && p.kind != INT8 && WD == BF16 && p.xb && M >= kDpMinRows) row_dpbf16<M>(p, n, acc);
    else if (!scalar && p.kind != INT8) row_avx512<M, WD>(p, n, acc);
    else if (!scalar) row_avx2<M, WD>(p, n, acc);
    else row_scalar<M, WD>(p, n, acc);
#elif QRU_AVX512 && QRU_AVX2_F16C
    if (!scalar && p.kind != INT8) row_avx512<M, WD>(p, n, acc);
    else if (!scalar) row_avx2<M, WD>(p, n, acc);
    else row_scalar<M, WD>(p, n, acc);
#elif QRU_AVX2_F16C
    if (!scalar) row_avx2<M, WD>(p, n, acc);
    else row_scalar<M, WD>(p, n, acc);
#else
    (void)scalar;
    row_scalar<M, WD>(p, n, acc);
#endif
    const float b = p.bias ? p.bias[n] : 0.0f;
    for (int m = 0; m < M; ++m) store_out<DT>(out, m * p.N + n, acc[m] + b);
  });
}

template <int M>
void run_m(const Problem& p, int wd, int dt, void* out, bool scalar) {
  // the compute dtype is both the weight rounding and the output dtype
  TORCH_CHECK(wd == dt, "internal: weight dtype must equal output dtype");
  if (dt == F32) run<M, F32, F32>(p, out, scalar);
  else if (dt == BF16) run<M, BF16, BF16>(p, out, scalar);
  else run<M, F16, F16>(p, out, scalar);
}

// x: [M, K] (fp32 / bf16 / fp16, M <= 8). Returns [M, N] in x's dtype.
at::Tensor quant_linear_small(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                              const at::Tensor& zeros, const at::Tensor& code, const at::Tensor& bias,
                              int64_t kind, int64_t n_out, int64_t block_size, bool scalar) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "x must be a 2-D CPU tensor");
  const int64_t M = x.size(0), K = x.size(1), N = n_out;
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "quant_linear_small handles 1..", kMaxRows, " rows, got ", M);
  TORCH_CHECK(K >= 1 && N >= 1, "empty weight");
  TORCH_CHECK(kind >= Q4_CODE && kind <= INT8, "unknown kind ", kind);
  TORCH_CHECK(w.is_contiguous() && w.scalar_type() == at::kByte, "w must be contiguous uint8");
  TORCH_CHECK(scales.is_contiguous() && scales.scalar_type() == at::kFloat, "scales must be contiguous float32");
  const int dt = dtype_code(x.scalar_type(), "x");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  Problem p{};
  p.x = xf.data_ptr<float>();
  const at::Tensor xbc = x.scalar_type() == at::kBFloat16 ? x.contiguous() : at::Tensor();
  p.xb = xbc.defined() ? reinterpret_cast<const uint16_t*>(xbc.data_ptr<at::BFloat16>()) : nullptr;
  p.M = M; p.N = N; p.K = K;
  p.w = w.data_ptr<uint8_t>();
  p.scales = scales.data_ptr<float>();
  p.kind = int(kind);
  p.bs = block_size;
  if (kind == Q4_CODE) {
    TORCH_CHECK(block_size >= 2 && block_size % 2 == 0, "block_size must be even, got ", block_size);
    TORCH_CHECK(w.numel() == (N * K + 1) / 2, "w has ", w.numel(), " bytes, expected ", (N * K + 1) / 2);
    TORCH_CHECK(scales.numel() == (N * K + block_size - 1) / block_size, "absmax has ", scales.numel(),
                " entries, expected ", (N * K + block_size - 1) / block_size);
    TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16, "code must be float32[16]");
    std::memcpy(p.code, code.contiguous().data_ptr<float>(), sizeof(p.code));
  } else if (kind == INT8) {
    TORCH_CHECK(w.numel() == N * K, "w has ", w.numel(), " bytes, expected ", N * K);
    TORCH_CHECK(scales.numel() == N, "scales has ", scales.numel(), " entries, expected ", N);
  } else {
    TORCH_CHECK(K % 2 == 0 && block_size >= 2 && block_size % 2 == 0, "int4 needs even in_features and group");
    p.groups = (K + block_size - 1) / block_size;
    TORCH_CHECK(w.numel() == N * K / 2, "w has ", w.numel(), " bytes, expected ", N * K / 2);
    TORCH_CHECK(scales.numel() == N * p.groups, "scales has ", scales.numel(), " entries, expected ", N * p.groups);
    if (kind == INT4) {
      TORCH_CHECK(zeros.is_contiguous() && zeros.scalar_type() == at::kByte && zeros.numel() == N * p.groups,
                  "zeros must be contiguous uint8 with one entry per group");
      p.zeros = zeros.data_ptr<uint8_t>();
    }
  }
  at::Tensor bf;
  if (bias.defined() && bias.numel() > 0) {
    TORCH_CHECK(bias.numel() == N, "bias has ", bias.numel(), " entries, expected ", N);
    bf = bias.to(at::kFloat).contiguous();
    p.bias = bf.data_ptr<float>();
  }
  auto out = at::empty({M, N}, x.options().dtype(x.scalar_type()));
  switch (M) {
    case 1: run_m<1>(p, dt, dt, out.data_ptr(), scalar); break;
    case 2: run_m<2>(p, dt, dt, out.data_ptr(), scalar); break;
    case 3: run_m<3>(p, dt, dt, out.data_ptr(), scalar); break;
    case 4: run_m<4>(p, dt, dt, out.data_ptr(), scalar); break;
    case 5: run_m<5>(p, dt, dt, out.data_ptr(), scalar); break;
    case 6: run_m<6>(p, dt, dt, out.data_ptr(), scalar); break;
    case 7: run_m<7>(p, dt, dt, out.data_ptr(), scalar); break;
    default: run_m<8>(p, dt, dt, out.data_ptr(), scalar); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(qru_qmatmul, m) {
  // y = x W^T + b with W dequantized on the fly (M <= 8 rows of x)
  m.def("quant_linear_small(Tensor x, Tensor w, Tensor scales, Tensor zeros, Tensor code, Tensor bias, int kind, "
        "int n_out, int block_size, bool scalar) -> Tensor", &quant_linear_small);
}
