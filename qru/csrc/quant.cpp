// CPU kernels for qru.kernels.quant4 (NF4 / FP4) and qru.kernels.quant_int (int4, int4_sym, int8).
//
// Bit-identical to the torch references: every element goes through the same IEEE fp32
// operations in the same order (no fast-math; no multiply feeds an add, so FMA
// contraction cannot change a result; the one explicit FMA, NF4's bucket index, only picks which
// midpoint to compare with, see Q4Tables). The AVX-512, AVX2 (NF4/FP4) and portable scalar paths
// compute the same thing; ``scalar=true`` forces the scalar one and the NF4/FP4 ops' ``level`` caps
// the path (tests compare all). Parallel over blocks / rows in dynamic chunks on qru::Team (see
// qru_common.h), thread count = torch's.
#include "qru_common.h"

#include <sys/mman.h>

#include <type_traits>

namespace {

using namespace qru;

constexpr uint32_t kTinyBits = 0x006CE3EEu;  // fp32(1e-38), bitsandbytes' divisor clamp
constexpr uint32_t kAbsMask = 0x7FFFFFFFu;
constexpr uint32_t kInfBits = 0x7F800000u;



// Work items per dynamically scheduled chunk (~16K elements): a thread that is descheduled
// (shared machines) leaves its work to the others instead of holding half of it.
inline int64_t chunk_of(int64_t items_per_unit) {
  return std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, items_per_unit));
}

// A flat output tensor. Large ones are 2 MiB aligned and advised as transparent huge
// pages (what c10 does under THP_MEM_ALLOC_ENABLE=1, here only for our outputs): a fresh
// 32 MiB buffer otherwise costs more in 4 KiB page faults than the kernel that fills it.
at::Tensor empty_out(int64_t n, at::ScalarType dtype) {
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t bytes = size_t(n) * c10::elementSize(dtype);
  if (bytes < 2 * kHuge) return at::empty({n}, at::TensorOptions().dtype(dtype));
  const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
  void* p = nullptr;
  if (posix_memalign(&p, kHuge, rounded) != 0) return at::empty({n}, at::TensorOptions().dtype(dtype));
  madvise(p, rounded, MADV_HUGEPAGE);
  return at::from_blob(p, {n}, [](void* q) { std::free(q); }, at::TensorOptions().dtype(dtype));
}

// ================================================================ NF4 / FP4

struct Q4Tables {
  float bounds[16];  // 15 midpoints (+ unused pad)
  int32_t order[16];
  float code[16];
  // Bucketed lookup (the AVX-512 quantizer, where it applies: NF4): s in [-1, 1] falls in bucket
  // j = trunc(s * 16 + 16) (clamped to 31); when every bucket holds at most one midpoint, far
  // from its edges, the code is below[j] + (s > bound[j]): two table lookups instead of a binary
  // search of four. (The index's rounding only moves an s across an edge no midpoint is near.)
  bool bucketed = false;
  float bucket_bound[32];   // the midpoint in bucket j, or +inf
  int32_t bucket_below[32]; // midpoints in the buckets below j
};

// Fills the bucket tables when the midpoints allow them (see Q4Tables) and the order is the identity.
inline void make_buckets(Q4Tables& t) {
  t.bucketed = false;
  for (int k = 0; k < 16; ++k)
    if (t.order[k] != k) return;
  int owner[32];
  std::fill(owner, owner + 32, -1);
  for (int k = 0; k < 15; ++k) {
    const double u = (double(t.bounds[k]) + 1.0) * 16.0;
    if (!(u > 0.0 && u < 32.0)) return;
    const int j = int(u);
    if (owner[j] >= 0 || u - j < 1e-3 || j + 1 - u < 1e-3) return;
    owner[j] = k;
  }
  int below = 0;
  for (int j = 0; j < 32; ++j) {
    t.bucket_bound[j] = owner[j] >= 0 ? t.bounds[owner[j]] : INFINITY;
    t.bucket_below[j] = below;
    below += owner[j] >= 0;
  }
  t.bucketed = true;
}

inline int q4_index(float s, const Q4Tables& t) {
  int idx = 0;
  for (int k = 0; k < 15; ++k) idx += s > t.bounds[k];
  return t.order[idx];
}

inline float clamp1(float s) { return std::min(std::max(s, -1.0f), 1.0f); }

template <int DT>
uint32_t absmax_bits_scalar(const void* x, int64_t start, int64_t len) {
  uint32_t m = 0;
  for (int64_t i = 0; i < len; ++i) m = std::max(m, f2u(load_f32<DT>(x, start + i)) & kAbsMask);
  return m;
}

// One block, scalar. ``partial`` selects bitsandbytes' tail arithmetic (x / clamped absmax,
// clamped absmax stored) over the full-block one (x * (1 / clamped absmax), raw absmax stored).
template <int DT>
void q4_block_scalar(const void* x, int64_t start, int64_t len, bool partial, const Q4Tables& t,
                     uint8_t* packed, float* absmax_out) {
  const uint32_t m = absmax_bits_scalar<DT>(x, start, len);
  const float amc = u2f(std::max(m, kTinyBits));
  *absmax_out = partial ? amc : u2f(m);
  const float recip = 1.0f / amc;
  for (int64_t i = 0; i < len; i += 2) {
    const float x0 = load_f32<DT>(x, start + i);
    const float x1 = (i + 1 < len) ? load_f32<DT>(x, start + i + 1) : 0.0f;
    const float s0 = partial ? x0 / amc : x0 * recip;
    const float s1 = partial ? x1 / amc : x1 * recip;
    packed[(start + i) >> 1] = uint8_t((q4_index(clamp1(s0), t) << 4) | q4_index(clamp1(s1), t));
  }
}

#if QRU_AVX512
template <int DT>
inline __m512 load16(const void* p, int64_t i) {
  if constexpr (DT == F32) return _mm512_loadu_ps(static_cast<const float*>(p) + i);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
  if constexpr (DT == BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

// Max of |x| bits over a full block (block_size >= 32, a multiple of 32).
template <int DT>
inline uint32_t absmax_bits_avx512(const void* x, int64_t start, int64_t len) {
  if constexpr (DT == F32) {
    const __m512i mask = _mm512_set1_epi32(int(kAbsMask));
    __m512i m = _mm512_setzero_si512();
    const float* p = static_cast<const float*>(x) + start;
    for (int64_t i = 0; i < len; i += 16)
      m = _mm512_max_epu32(m, _mm512_and_si512(_mm512_loadu_si512(p + i), mask));
    return _mm512_reduce_max_epu32(m);
  } else {
    // 16-bit formats: |x| bit patterns order like the values, so reduce on 16 bits.
    const __m512i mask = _mm512_set1_epi16(0x7FFF);
    __m512i m = _mm512_setzero_si512();
    const uint16_t* p = static_cast<const uint16_t*>(x) + start;
    for (int64_t i = 0; i < len; i += 32)
      m = _mm512_max_epu16(m, _mm512_and_si512(_mm512_loadu_si512(p + i), mask));
    // halve to 8 lanes, then phminposuw on the complement: max = ~min(~v)
    const __m256i m2 = _mm256_max_epu16(_mm512_castsi512_si256(m), _mm512_extracti64x4_epi64(m, 1));
    const __m128i m1 = _mm_max_epu16(_mm256_castsi256_si128(m2), _mm256_extracti128_si256(m2, 1));
    const __m128i ones = _mm_set1_epi32(-1);
    const uint32_t h = uint32_t(~_mm_cvtsi128_si32(_mm_minpos_epu16(_mm_xor_si128(m1, ones)))) & 0xFFFFu;
    if constexpr (DT == BF16) return h << 16;
    return f2u(half_to_f32(uint16_t(h)));
  }
}

// 16 normalized values -> 16 codes (int32 lanes): branchless lower bound over the 15
// midpoints (= count of midpoints < s, torch.bucketize semantics), then the order map.
inline __m512i q4_index16(__m512 s, __m512 bounds, __m512i order) {
  const __m512i one = _mm512_set1_epi32(1);
  __m512i pos = _mm512_setzero_si512();
  __mmask16 m = _mm512_cmp_ps_mask(s, _mm512_permutexvar_ps(_mm512_set1_epi32(7), bounds), _CMP_GT_OQ);
  pos = _mm512_mask_add_epi32(pos, m, pos, _mm512_set1_epi32(8));
  m = _mm512_cmp_ps_mask(s, _mm512_permutexvar_ps(_mm512_add_epi32(pos, _mm512_set1_epi32(3)), bounds), _CMP_GT_OQ);
  pos = _mm512_mask_add_epi32(pos, m, pos, _mm512_set1_epi32(4));
  m = _mm512_cmp_ps_mask(s, _mm512_permutexvar_ps(_mm512_add_epi32(pos, one), bounds), _CMP_GT_OQ);
  pos = _mm512_mask_add_epi32(pos, m, pos, _mm512_set1_epi32(2));
  m = _mm512_cmp_ps_mask(s, _mm512_permutexvar_ps(pos, bounds), _CMP_GT_OQ);
  pos = _mm512_mask_add_epi32(pos, m, pos, one);
  return _mm512_permutexvar_epi32(pos, order);
}

// q4_index16 through the bucket tables (Q4Tables::bucketed): the bucket's midpoint and count.
struct Q4Buckets {
  __m512 b0, b1;
  __m512i c0, c1;
};
inline __m512i q4_index16_buckets(__m512 s, const Q4Buckets& k) {
  const __m512i j = _mm512_min_epi32(
      _mm512_cvttps_epi32(_mm512_fmadd_ps(s, _mm512_set1_ps(16.0f), _mm512_set1_ps(16.0f))),
      _mm512_set1_epi32(31));
  const __m512i below = _mm512_permutex2var_epi32(k.c0, j, k.c1);
  const __mmask16 up = _mm512_cmp_ps_mask(s, _mm512_permutex2var_ps(k.b0, j, k.b1), _CMP_GT_OQ);
  return _mm512_mask_add_epi32(below, up, below, _mm512_set1_epi32(1));
}

// 32 consecutive values as fp32, split: elements 0, 2, .., 30 (ev) and 1, 3, .., 31 (od), so that
// lane k of both gives byte k of the packed output. bf16 needs no shuffle: dword k holds both.
template <int DT>
inline void load32_split(const void* p, int64_t i, __m512& ev, __m512& od) {
  if constexpr (DT == F32) {
    const float* f = static_cast<const float*>(p) + i;
    const __m512 a = _mm512_loadu_ps(f), b = _mm512_loadu_ps(f + 16);
    const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    ev = _mm512_permutex2var_ps(a, ie, b);
    od = _mm512_permutex2var_ps(a, _mm512_add_epi32(ie, _mm512_set1_epi32(1)), b);
  } else {
    const __m512i d = _mm512_loadu_si512(static_cast<const uint16_t*>(p) + i);
    if constexpr (DT == BF16) {
      ev = _mm512_castsi512_ps(_mm512_slli_epi32(d, 16));
      od = _mm512_castsi512_ps(_mm512_and_si512(d, _mm512_set1_epi32(int(0xFFFF0000u))));
    } else {
      ev = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(d));
      od = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(d, 16)));
    }
  }
}

// 16 codes (bytes c0..c15) -> 8 bytes (c0 << 4 | c1, ...) in the low half of the result.
inline __m128i pack_pairs(__m128i c) {
  const __m128i lo8 = _mm_set1_epi16(0x00FF);
  return _mm_or_si128(_mm_slli_epi16(_mm_and_si128(c, lo8), 4), _mm_srli_epi16(c, 8));
}

template <int DT, bool BUCKETS>
void q4_block_avx512(const void* x, int64_t start, int64_t len, const Q4Buckets& bk, __m512 bounds,
                     __m512i order, uint8_t* packed, float* absmax_out) {
  const uint32_t m = absmax_bits_avx512<DT>(x, start, len);
  *absmax_out = u2f(m);
  const __m512 recip = _mm512_set1_ps(1.0f / u2f(std::max(m, kTinyBits)));
  const __m512 lo = _mm512_set1_ps(-1.0f), hi = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < len; i += 32) {
    __m512 ev, od;  // elements 2k and 2k + 1 in lane k: byte k of the output
    load32_split<DT>(x, start + i, ev, od);
    const __m512 se = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(ev, recip), lo), hi);
    const __m512 so = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(od, recip), lo), hi);
    const __m512i ce = BUCKETS ? q4_index16_buckets(se, bk) : q4_index16(se, bounds, order);
    const __m512i co = BUCKETS ? q4_index16_buckets(so, bk) : q4_index16(so, bounds, order);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(packed + ((start + i) >> 1)),
                     _mm512_cvtepi32_epi8(_mm512_or_si512(_mm512_slli_epi32(ce, 4), co)));
  }
}
#endif

// The most capable NF4/FP4 path compiled here (2 AVX-512, 1 AVX2 + F16C, 0 scalar).
constexpr int kQ4Level = QRU_AVX512 ? 2 : ((QRU_AVX2 && QRU_AVX2_F16C) ? 1 : 0);

#if QRU_AVX2 && QRU_AVX2_F16C
// 16 consecutive values as fp32, split as load32_split does: lane k of (ev, od) = elements 2k, 2k + 1.
template <int DT>
inline void load16_split_avx2(const void* p, int64_t i, __m256& ev, __m256& od) {
  if constexpr (DT == BF16) {
    const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
    ev = _mm256_castsi256_ps(_mm256_slli_epi32(d, 16));
    od = _mm256_castsi256_ps(_mm256_and_si256(d, _mm256_set1_epi32(int(0xFFFF0000u))));
  } else {
    __m256 a, b;
    if constexpr (DT == F32) {
      a = _mm256_loadu_ps(static_cast<const float*>(p) + i);
      b = _mm256_loadu_ps(static_cast<const float*>(p) + i + 8);
    } else {
      const uint16_t* h = static_cast<const uint16_t*>(p) + i;
      a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
      b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + 8)));
    }
    // in-lane even / odd picks give pairs (0 2 8 10 | 4 6 12 14); the 64-bit permute restores the order
    ev = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
    od = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
  }
}

// Max of |x| bits over a full block, AVX2.
template <int DT>
inline uint32_t absmax_bits_avx2(const void* x, int64_t start, int64_t len) {
  if constexpr (DT == F32) {
    const __m256i mask = _mm256_set1_epi32(int(kAbsMask));
    __m256i m = _mm256_setzero_si256();
    const float* p = static_cast<const float*>(x) + start;
    for (int64_t i = 0; i < len; i += 8)
      m = _mm256_max_epu32(m, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)), mask));
    __m128i r = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
    r = _mm_max_epu32(r, _mm_shuffle_epi32(r, 0x4E));
    r = _mm_max_epu32(r, _mm_shuffle_epi32(r, 0xB1));
    return uint32_t(_mm_cvtsi128_si32(r));
  } else {
    const __m256i mask = _mm256_set1_epi16(0x7FFF);
    __m256i m = _mm256_setzero_si256();
    const uint16_t* p = static_cast<const uint16_t*>(x) + start;
    for (int64_t i = 0; i < len; i += 16)
      m = _mm256_max_epu16(m, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)), mask));
    const __m128i m1 = _mm_max_epu16(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
    const uint32_t h = uint32_t(~_mm_cvtsi128_si32(_mm_minpos_epu16(_mm_xor_si128(m1, _mm_set1_epi32(-1))))) & 0xFFFFu;
    if constexpr (DT == BF16) return h << 16;
    return f2u(half_to_f32(uint16_t(h)));
  }
}

// 8 normalized values -> 8 codes: the count of midpoints below s (15 compares), then the order map.
// ``bb``: the 15 midpoints, each broadcast.
inline __m256i q4_index8_avx2(__m256 s, const __m256* bb, const Q4Tables& t, bool identity) {
  __m256i pos = _mm256_setzero_si256();
  for (int k = 0; k < 15; ++k)  // a true compare is -1
    pos = _mm256_sub_epi32(pos, _mm256_castps_si256(_mm256_cmp_ps(s, bb[k], _CMP_GT_OQ)));
  if (identity) return pos;
  const __m256 lo = _mm256_loadu_ps(reinterpret_cast<const float*>(t.order));
  const __m256 hi = _mm256_loadu_ps(reinterpret_cast<const float*>(t.order + 8));
  return _mm256_castps_si256(_mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, pos), _mm256_permutevar8x32_ps(hi, pos),
                                              _mm256_castsi256_ps(_mm256_slli_epi32(pos, 28))));
}

template <int DT>
void q4_block_avx2(const void* x, int64_t start, int64_t len, const __m256* bb, const Q4Tables& t, bool identity,
                   uint8_t* packed, float* absmax_out) {
  const uint32_t m = absmax_bits_avx2<DT>(x, start, len);
  *absmax_out = u2f(m);
  const __m256 recip = _mm256_set1_ps(1.0f / u2f(std::max(m, kTinyBits)));
  const __m256 lo = _mm256_set1_ps(-1.0f), hi = _mm256_set1_ps(1.0f);
  const __m256i first = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                         0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  for (int64_t i = 0; i < len; i += 16) {
    __m256 ev, od;
    load16_split_avx2<DT>(x, start + i, ev, od);
    const __m256 se = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(ev, recip), lo), hi);
    const __m256 so = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(od, recip), lo), hi);
    const __m256i bytes = _mm256_shuffle_epi8(
        _mm256_or_si256(_mm256_slli_epi32(q4_index8_avx2(se, bb, t, identity), 4), q4_index8_avx2(so, bb, t, identity)),
        first);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(packed + ((start + i) >> 1)),
                     _mm_unpacklo_epi32(_mm256_castsi256_si128(bytes), _mm256_extracti128_si256(bytes, 1)));
  }
}
#endif

Q4Tables make_tables(const at::Tensor& bounds, const at::Tensor& order, const at::Tensor& code) {
  Q4Tables t{};
  if (bounds.defined()) {
    TORCH_CHECK(bounds.dtype() == at::kFloat && bounds.numel() == 16, "bounds must be float32[16]");
    TORCH_CHECK(order.dtype() == at::kInt && order.numel() == 16, "order must be int32[16]");
    std::memcpy(t.bounds, bounds.contiguous().data_ptr<float>(), sizeof(t.bounds));
    std::memcpy(t.order, order.contiguous().data_ptr<int32_t>(), sizeof(t.order));
    make_buckets(t);
  }
  if (code.defined()) {
    TORCH_CHECK(code.dtype() == at::kFloat && code.numel() == 16, "code must be float32[16]");
    std::memcpy(t.code, code.contiguous().data_ptr<float>(), sizeof(t.code));
  }
  return t;
}

template <int DT>
void q4_quantize_impl(const void* x, int64_t n, int64_t bs, const Q4Tables& t, uint8_t* packed, float* absmax,
                      int level) {
  const int64_t n_blocks = (n + bs - 1) / bs, n_full = n / bs;
  level = std::min(level, kQ4Level);
  bool identity = true;
  for (int k = 0; k < 16; ++k) identity = identity && t.order[k] == k;
  (void)identity;
#if QRU_AVX2 && QRU_AVX2_F16C
  __m256 bb[15];
  for (int k = 0; k < 15; ++k) bb[k] = _mm256_set1_ps(t.bounds[k]);
#endif
#if QRU_AVX512
  const __m512 bounds = _mm512_loadu_ps(t.bounds);
  const __m512i order = _mm512_loadu_si512(t.order);
  const Q4Buckets bk{_mm512_loadu_ps(t.bucket_bound), _mm512_loadu_ps(t.bucket_bound + 16),
                     _mm512_loadu_si512(t.bucket_below), _mm512_loadu_si512(t.bucket_below + 16)};
  const bool buckets = t.bucketed;
#endif
  const int64_t chunk = chunk_of(bs);
  parallel_items(n_blocks, chunk, [&](int64_t b) {
    const int64_t start = b * bs, len = std::min(bs, n - start);
#if QRU_AVX512
    if (level == 2 && b < n_full) {
      if (buckets) q4_block_avx512<DT, true>(x, start, len, bk, bounds, order, packed, absmax + b);
      else q4_block_avx512<DT, false>(x, start, len, bk, bounds, order, packed, absmax + b);
      return;
    }
#endif
#if QRU_AVX2 && QRU_AVX2_F16C
    if (level == 1 && b < n_full) {
      q4_block_avx2<DT>(x, start, len, bb, t, identity, packed, absmax + b);
      return;
    }
#endif
    q4_block_scalar<DT>(x, start, len, b >= n_full, t, packed, absmax + b);
  });
}

std::tuple<at::Tensor, at::Tensor> q4_quantize(const at::Tensor& x, const at::Tensor& bounds,
                                               const at::Tensor& order, int64_t block_size, bool scalar,
                                               int64_t level) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "x must be a contiguous CPU tensor");
  TORCH_CHECK(block_size >= 32 && block_size <= 4096 && (block_size & (block_size - 1)) == 0,
              "block_size must be a power of two between 32 and 4096, got ", block_size);
  const int dt = dtype_code(x.scalar_type(), "x");
  const int64_t n = x.numel();
  auto packed = empty_out((n + 1) / 2, at::kByte);
  auto absmax = at::empty({(n + block_size - 1) / block_size}, x.options().dtype(at::kFloat));
  const Q4Tables t = make_tables(bounds, order, at::Tensor());
  const void* src = x.data_ptr();
  uint8_t* pk = packed.data_ptr<uint8_t>();
  float* am = absmax.data_ptr<float>();
  const int lv = scalar ? 0 : int(std::clamp<int64_t>(level, 0, 2));
  if (dt == F32) q4_quantize_impl<F32>(src, n, block_size, t, pk, am, lv);
  else if (dt == BF16) q4_quantize_impl<BF16>(src, n, block_size, t, pk, am, lv);
  else q4_quantize_impl<F16>(src, n, block_size, t, pk, am, lv);
  return {packed, absmax};
}

// Dequantize: per block, the 16 possible outputs round(code[k] * absmax) are computed once (the
// same fp32 product and rounding as element by element, so the same bits), then every element is
// a 16-entry table lookup by its nibble: AVX-512 vpermw (16-bit outputs) / vpermps (fp32), AVX2
// pshufb on the low and high bytes / two vpermps, or a scalar loop. ``level`` caps the path: 2 =
// AVX-512, 1 = AVX2, 0 = scalar (a path not compiled on this CPU falls to the next lower one).
template <int DT>
using Out = std::conditional_t<DT == F32, float, uint16_t>;

// Elements [i, len) of a block from its table, scalar (start + i is even: blocks and vector steps are).
template <int DT>
inline void q4_lookup_scalar(const uint8_t* packed, int64_t start, int64_t i, int64_t len, const Out<DT>* tab,
                             Out<DT>* out) {
  for (; i + 1 < len; i += 2) {
    const uint8_t byte = packed[(start + i) >> 1];
    out[start + i] = tab[byte >> 4];
    out[start + i + 1] = tab[byte & 0xF];
  }
  if (i < len) out[start + i] = tab[packed[(start + i) >> 1] >> 4];
}

#if QRU_AVX512
// 16 fp32 -> 16 bits of DT (bf16: nearest even, NaN -> 0x7FC0; fp16: vcvtps2ph, nearest even).
template <int DT>
inline __m256i to16_avx512(__m512 v) {
  if constexpr (DT == BF16) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
  } else {
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
}

template <int DT>
inline void store16(void* out, int64_t i, __m512 v) {
  if constexpr (DT == F32) _mm512_storeu_ps(static_cast<float*>(out) + i, v);
  else _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i), to16_avx512<DT>(v));
}

// One block (elements start .. start + len), AVX-512; the last len % 32 scalar.
template <int DT>
inline void q4_deq_block_avx512(const uint8_t* packed, int64_t start, int64_t len, __m512 code, float a,
                                Out<DT>* out) {
  const __m512 prod = _mm512_mul_ps(code, _mm512_set1_ps(a));
  int64_t i = 0;
  if constexpr (DT == F32) {
    const __m128i nib = _mm_set1_epi8(0x0F);
    for (; i + 32 <= len; i += 32) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + ((start + i) >> 1)));
      const __m128i h = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib), l = _mm_and_si128(bytes, nib);
      _mm512_storeu_ps(out + start + i, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(h, l)), prod));
      _mm512_storeu_ps(out + start + i + 16,
                       _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(h, l)), prod));
    }
  } else {
    const __m512i tab = _mm512_castsi256_si512(to16_avx512<DT>(prod));
    const __m512i lo4 = _mm512_set1_epi32(0x000F0000);
    for (; i + 32 <= len; i += 32) {
      // byte k widened to dword k, rearranged as the words (k >> 4, k & 15): elements 2k, 2k + 1
      const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + ((start + i) >> 1))));
      const __m512i idx = _mm512_or_si512(_mm512_srli_epi32(d, 4), _mm512_and_si512(_mm512_slli_epi32(d, 16), lo4));
      _mm512_storeu_si512(out + start + i, _mm512_permutexvar_epi16(idx, tab));
    }
  }
  if (i < len) {
    alignas(64) Out<DT> t[16];
    if constexpr (DT == F32) _mm512_store_ps(t, prod);
    else _mm256_store_si256(reinterpret_cast<__m256i*>(t), to16_avx512<DT>(prod));
    q4_lookup_scalar<DT>(packed, start, i, len, t, out);
  }
}
#endif

#if QRU_AVX2 && QRU_AVX2_F16C
// One block, AVX2 (+F16C for fp16 outputs); the last len % 32 scalar.
template <int DT>
inline void q4_deq_block_avx2(const uint8_t* packed, int64_t start, int64_t len, __m256 code_lo, __m256 code_hi,
                              float a, Out<DT>* out) {
  const __m256 va = _mm256_set1_ps(a);
  const __m256 plo = _mm256_mul_ps(code_lo, va), phi = _mm256_mul_ps(code_hi, va);
  const __m128i nib = _mm_set1_epi8(0x0F);
  int64_t i = 0;
  if constexpr (DT == F32) {
    for (; i + 32 <= len; i += 32) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + ((start + i) >> 1)));
      const __m128i h = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib), l = _mm_and_si128(bytes, nib);
      const __m128i e[2] = {_mm_unpacklo_epi8(h, l), _mm_unpackhi_epi8(h, l)};  // codes of elements 0..15, 16..31
      for (int k = 0; k < 4; ++k) {
        const __m256i q = _mm256_cvtepu8_epi32(k & 1 ? _mm_srli_si128(e[k >> 1], 8) : e[k >> 1]);
        // bit 3 of the code (shifted to the sign) picks the upper half of the table
        const __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(plo, q), _mm256_permutevar8x32_ps(phi, q),
                                          _mm256_castsi256_ps(_mm256_slli_epi32(q, 28)));
        _mm256_storeu_ps(out + start + i + 8 * k, v);
      }
    }
  } else {
    __m128i t0, t1;  // the 16 table entries, 8 + 8
    if constexpr (DT == BF16) {
      t0 = _mm_packus_epi32(_mm256_castsi256_si128(bf16_bits(plo)), _mm256_extracti128_si256(bf16_bits(plo), 1));
      t1 = _mm_packus_epi32(_mm256_castsi256_si128(bf16_bits(phi)), _mm256_extracti128_si256(bf16_bits(phi), 1));
    } else {
      t0 = _mm256_cvtps_ph(plo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      t1 = _mm256_cvtps_ph(phi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    // low bytes and high bytes of the 16 entries, each a 16-byte pshufb table (in both lanes)
    const __m128i evens = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const __m128i s0 = _mm_shuffle_epi8(t0, evens), s1 = _mm_shuffle_epi8(t1, evens);
    const __m256i tlo = _mm256_broadcastsi128_si256(_mm_unpacklo_epi64(s0, s1));
    const __m256i thi = _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(s0, s1));
    for (; i + 32 <= len; i += 32) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + ((start + i) >> 1)));
      const __m128i h = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib), l = _mm_and_si128(bytes, nib);
      const __m256i q = _mm256_set_m128i(_mm_unpackhi_epi8(h, l), _mm_unpacklo_epi8(h, l));  // codes 0..31
      const __m256i lo = _mm256_shuffle_epi8(tlo, q), hi = _mm256_shuffle_epi8(thi, q);
      const __m256i w0 = _mm256_unpacklo_epi8(lo, hi), w1 = _mm256_unpackhi_epi8(lo, hi);  // 0..7|16..23, 8..15|24..31
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + start + i), _mm256_permute2x128_si256(w0, w1, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + start + i + 16), _mm256_permute2x128_si256(w0, w1, 0x31));
    }
  }
  if (i < len) {
    alignas(32) Out<DT> t[16];
    for (int k = 0; k < 8; ++k) {
      store_f32<DT>(t, k, _mm256_cvtss_f32(_mm256_permutevar8x32_ps(plo, _mm256_set1_epi32(k))));
      store_f32<DT>(t, k + 8, _mm256_cvtss_f32(_mm256_permutevar8x32_ps(phi, _mm256_set1_epi32(k))));
    }
    q4_lookup_scalar<DT>(packed, start, i, len, t, out);
  }
}
#endif

template <int DT>
void q4_dequantize_impl(const uint8_t* packed, const float* absmax, int64_t n, int64_t bs, const Q4Tables& t,
                        void* out_, int level) {
  const int64_t n_blocks = (n + bs - 1) / bs;
  Out<DT>* out = static_cast<Out<DT>*>(out_);
  level = std::min(level, kQ4Level);
  const int64_t chunk = chunk_of(bs);
  parallel_items(n_blocks, chunk, [&](int64_t b) {
    const int64_t start = b * bs, len = std::min(bs, n - start);
    const float a = absmax[b];
#if QRU_AVX512
    if (level == 2) {
      q4_deq_block_avx512<DT>(packed, start, len, _mm512_loadu_ps(t.code), a, out);
      return;
    }
#endif
#if QRU_AVX2 && QRU_AVX2_F16C
    if (level == 1) {
      q4_deq_block_avx2<DT>(packed, start, len, _mm256_loadu_ps(t.code), _mm256_loadu_ps(t.code + 8), a, out);
      return;
    }
#endif
    Out<DT> tab[16];
    for (int k = 0; k < 16; ++k) store_f32<DT>(tab, k, t.code[k] * a);
    q4_lookup_scalar<DT>(packed, start, 0, len, tab, out);
  });
}

at::Tensor q4_dequantize(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                         int64_t block_size, int64_t n, at::ScalarType dtype, bool scalar, int64_t level) {
  TORCH_CHECK(packed.device().is_cpu() && packed.is_contiguous() && packed.scalar_type() == at::kByte,
              "packed must be a contiguous CPU uint8 tensor");
  TORCH_CHECK(absmax.is_contiguous() && absmax.scalar_type() == at::kFloat, "absmax must be contiguous float32");
  TORCH_CHECK(block_size >= 32 && block_size <= 4096 && (block_size & (block_size - 1)) == 0,
              "block_size must be a power of two between 32 and 4096, got ", block_size);
  TORCH_CHECK(packed.numel() == (n + 1) / 2, "packed has ", packed.numel(), " bytes, expected ", (n + 1) / 2);
  TORCH_CHECK(absmax.numel() == (n + block_size - 1) / block_size, "absmax has ", absmax.numel(),
              " entries, expected ", (n + block_size - 1) / block_size);
  const int dt = dtype_code(dtype, "dtype");
  auto out = empty_out(n, dtype);
  const Q4Tables t = make_tables(at::Tensor(), at::Tensor(), code);
  const uint8_t* pk = packed.data_ptr<uint8_t>();
  const float* am = absmax.data_ptr<float>();
  const int lv = scalar ? 0 : int(std::clamp<int64_t>(level, 0, 2));
  if (dt == F32) q4_dequantize_impl<F32>(pk, am, n, block_size, t, out.data_ptr(), lv);
  else if (dt == BF16) q4_dequantize_impl<BF16>(pk, am, n, block_size, t, out.data_ptr(), lv);
  else q4_dequantize_impl<F16>(pk, am, n, block_size, t, out.data_ptr(), lv);
  return out;
}

// ================================================================ int4 / int4_sym / int8

enum IntKind { INT4 = 0, INT4_SYM = 1, INT8 = 2 };

struct GroupParams {
  float scale;   // NaN when the group holds NaN/Inf
  float zero;    // int4: integer zero point; int4_sym: 8 (nibble offset); int8: 0
  bool quantize; // false: every code is the one of q = 0 (scale is 0 or NaN)
};

// Scale / zero from the group statistics (shared by both paths, so they agree exactly).
inline GroupParams int_params(int kind, uint32_t am_bits, float mx, float mn, float eps) {
  GroupParams p{};
  if (kind == INT4) {
    p.scale = std::max(mx - mn, eps) / 15.0f;
    p.zero = std::min(std::max(std::rint(-mn / p.scale), 0.0f), 15.0f);
    p.quantize = true;
  } else {
    p.scale = u2f(am_bits) / (kind == INT4_SYM ? 7.0f : 127.0f);
    p.zero = kind == INT4_SYM ? 8.0f : 0.0f;
    p.quantize = p.scale > 0.0f;
  }
  if (am_bits >= kInfBits) p.scale = NAN;
  return p;
}

// Code of one value: int4 0..15; int4_sym q + 8; int8 q (as a byte, two's complement).
inline int int_code(float v, int kind, const GroupParams& p) {
  if (kind == INT4) return int(std::min(std::max(std::rint(v / p.scale) + p.zero, 0.0f), 15.0f));
  const float qmax = kind == INT4_SYM ? 7.0f : 127.0f;
  const float q = p.quantize ? std::min(std::max(std::rint(v / p.scale), -qmax), qmax) : 0.0f;
  return int(q) + int(p.zero);
}

template <int DT>
void int_group_stats_scalar(const void* x, int64_t base, int64_t from, int64_t len, uint32_t& am_bits, float& mx,
                            float& mn) {
  for (int64_t i = from; i < len; ++i) {
    const float v = load_f32<DT>(x, base + i);
    am_bits = std::max(am_bits, f2u(v) & kAbsMask);
    mx = std::max(mx, v);
    mn = std::min(mn, v);
  }
}

// Codes for elements [from, len) of a group, written packed (int4 formats, even counts) or
// as bytes (int8).
template <int DT>
void int_group_codes_scalar(const void* x, int64_t base, int64_t from, int64_t len, int kind, const GroupParams& p,
                            uint8_t* data) {
  if (kind == INT8) {
    for (int64_t i = from; i < len; ++i) data[base + i] = uint8_t(int_code(load_f32<DT>(x, base + i), kind, p));
    return;
  }
  for (int64_t i = from; i < len; i += 2) {
    const int c0 = int_code(load_f32<DT>(x, base + i), kind, p);
    const int c1 = int_code(load_f32<DT>(x, base + i + 1), kind, p);
    data[(base + i) >> 1] = uint8_t((c0 << 4) | c1);
  }
}

#if QRU_AVX512
inline __m512i int_code16(__m512 v, int kind, const GroupParams& p) {
  const __m512 q = _mm512_roundscale_ps(_mm512_div_ps(v, _mm512_set1_ps(p.scale)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  if (kind == INT4)
    return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_add_ps(q, _mm512_set1_ps(p.zero)),
                                                          _mm512_setzero_ps()), _mm512_set1_ps(15.0f)));
  const float qmax = kind == INT4_SYM ? 7.0f : 127.0f;
  if (!p.quantize) return _mm512_set1_epi32(int(p.zero));
  const __m512 c = _mm512_min_ps(_mm512_max_ps(q, _mm512_set1_ps(-qmax)), _mm512_set1_ps(qmax));
  return _mm512_add_epi32(_mm512_cvtps_epi32(c), _mm512_set1_epi32(int(p.zero)));
}

// Quantize one group: vector body over the first len & ~31 elements, scalar tail.
template <int DT>
void int_group_avx512(const void* x, int64_t base, int64_t len, int kind, float eps, uint8_t* data, float* scale_out,
                      uint8_t* zero_out) {
  const int64_t body = len & ~int64_t(31);
  const __m512i absmask = _mm512_set1_epi32(int(kAbsMask));
  __m512i am = _mm512_setzero_si512();
  __m512 mx = _mm512_set1_ps(-INFINITY), mn = _mm512_set1_ps(INFINITY);
  for (int64_t i = 0; i < body; i += 16) {
    const __m512 v = load16<DT>(x, base + i);
    am = _mm512_max_epu32(am, _mm512_and_si512(_mm512_castps_si512(v), absmask));
    mx = _mm512_max_ps(mx, v);
    mn = _mm512_min_ps(mn, v);
  }
  uint32_t am_bits = _mm512_reduce_max_epu32(am);
  float mxs = _mm512_reduce_max_ps(mx), mns = _mm512_reduce_min_ps(mn);
  int_group_stats_scalar<DT>(x, base, body, len, am_bits, mxs, mns);
  const GroupParams p = int_params(kind, am_bits, mxs, mns, eps);
  for (int64_t i = 0; i < body; i += 32) {
    const __m128i c0 = _mm512_cvtepi32_epi8(int_code16(load16<DT>(x, base + i), kind, p));
    const __m128i c1 = _mm512_cvtepi32_epi8(int_code16(load16<DT>(x, base + i + 16), kind, p));
    if (kind == INT8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(data + base + i), c0);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(data + base + i + 16), c1);
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(data + ((base + i) >> 1)),
                       _mm_packus_epi16(pack_pairs(c0), pack_pairs(c1)));
    }
  }
  int_group_codes_scalar<DT>(x, base, body, len, kind, p, data);
  *scale_out = p.scale;
  if (kind == INT4) *zero_out = uint8_t(p.zero);
}
#endif

template <int DT>
void int_group_scalar(const void* x, int64_t base, int64_t len, int kind, float eps, uint8_t* data, float* scale_out,
                      uint8_t* zero_out) {
  uint32_t am_bits = 0;
  float mx = -INFINITY, mn = INFINITY;
  int_group_stats_scalar<DT>(x, base, 0, len, am_bits, mx, mn);
  const GroupParams p = int_params(kind, am_bits, mx, mn, eps);
  int_group_codes_scalar<DT>(x, base, 0, len, kind, p, data);
  *scale_out = p.scale;
  if (kind == INT4) *zero_out = uint8_t(p.zero);
}

template <int DT>
void int_quantize_impl(const void* x, int64_t rows, int64_t cols, int64_t g, int kind, float eps, uint8_t* data,
                       float* scales, uint8_t* zeros, bool scalar) {
  const int64_t groups = (cols + g - 1) / g;
  const int64_t chunk = chunk_of(cols);
  parallel_items(rows, chunk, [&](int64_t r) {
    for (int64_t k = 0; k < groups; ++k) {
      const int64_t c0 = k * g, len = std::min(g, cols - c0), base = r * cols + c0, gi = r * groups + k;
      uint8_t* z = zeros ? zeros + gi : nullptr;
#if QRU_AVX512
      if (!scalar) {
        int_group_avx512<DT>(x, base, len, kind, eps, data, scales + gi, z);
        continue;
      }
#endif
      int_group_scalar<DT>(x, base, len, kind, eps, data, scales + gi, z);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int_quantize(const at::Tensor& x, int64_t cols, int64_t group,
                                                           int64_t kind, double eps, bool scalar) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "x must be a contiguous CPU tensor");
  TORCH_CHECK(kind >= INT4 && kind <= INT8, "unknown integer format ", kind);
  TORCH_CHECK(cols > 0 && x.numel() % cols == 0, "cols must divide numel");
  TORCH_CHECK(group > 0, "group must be positive (got ", group, ")");
  TORCH_CHECK(kind == INT8 || (cols % 2 == 0 && group % 2 == 0), "int4 needs even cols and group");
  const int dt = dtype_code(x.scalar_type(), "x");
  const int64_t rows = x.numel() / cols, groups = (cols + group - 1) / group;
  auto data = empty_out(kind == INT8 ? x.numel() : x.numel() / 2, at::kByte);
  auto scales = at::empty({rows, groups}, x.options().dtype(at::kFloat));
  auto zeros = at::empty({kind == INT4 ? rows : 0, groups}, x.options().dtype(at::kByte));
  uint8_t* z = kind == INT4 ? zeros.data_ptr<uint8_t>() : nullptr;
  uint8_t* d = data.data_ptr<uint8_t>();
  float* s = scales.data_ptr<float>();
  const float e = static_cast<float>(eps);
  const int k = int(kind);
  if (dt == F32) int_quantize_impl<F32>(x.data_ptr(), rows, cols, group, k, e, d, s, z, scalar);
  else if (dt == BF16) int_quantize_impl<BF16>(x.data_ptr(), rows, cols, group, k, e, d, s, z, scalar);
  else int_quantize_impl<F16>(x.data_ptr(), rows, cols, group, k, e, d, s, z, scalar);
  return {data, scales, zeros};
}

template <int DT>
void int_dequantize_impl(const uint8_t* data, const float* scales, const uint8_t* zeros, int64_t rows, int64_t cols,
                         int64_t g, int kind, void* out, bool scalar) {
  const int64_t groups = (cols + g - 1) / g;
  const int64_t chunk = chunk_of(cols);
  parallel_items(rows, chunk, [&](int64_t r) {
    for (int64_t k = 0; k < groups; ++k) {
      const int64_t c0 = k * g, len = std::min(g, cols - c0), base = r * cols + c0;
      const float s = scales[r * groups + k];
      const int z = kind == INT4 ? zeros[r * groups + k] : (kind == INT4_SYM ? 8 : 0);
      int64_t i = 0;
#if QRU_AVX512
      if (!scalar) {
        const __m512 vs = _mm512_set1_ps(s);
        const __m512i vz = _mm512_set1_epi32(z);
        const __m128i nib = _mm_set1_epi8(0x0F);
        for (; i + 32 <= len; i += 32) {
          __m512i q0, q1;
          if (kind == INT8) {
            q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(data + base + i)));
            q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(data + base + i + 16)));
          } else {
            const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(data + ((base + i) >> 1)));
            const __m128i h = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib), l = _mm_and_si128(bytes, nib);
            q0 = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(h, l)), vz);
            q1 = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(h, l)), vz);
          }
          store16<DT>(out, base + i, _mm512_mul_ps(_mm512_cvtepi32_ps(q0), vs));
          store16<DT>(out, base + i + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(q1), vs));
        }
      }
#endif
      for (; i < len; ++i) {
        int q;
        if (kind == INT8) q = int(int8_t(data[base + i]));
        else q = int(((base + i) & 1) ? (data[(base + i) >> 1] & 0xF) : (data[(base + i) >> 1] >> 4)) - z;
        store_f32<DT>(out, base + i, float(q) * s);
      }
    }
  });
}

at::Tensor int_dequantize(const at::Tensor& data, const at::Tensor& scales, const at::Tensor& zeros, int64_t cols,
                          int64_t group, int64_t kind, at::ScalarType dtype, bool scalar) {
  TORCH_CHECK(data.device().is_cpu() && data.is_contiguous() && data.scalar_type() == at::kByte,
              "data must be a contiguous CPU uint8 tensor");
  TORCH_CHECK(scales.is_contiguous() && scales.scalar_type() == at::kFloat, "scales must be contiguous float32");
  TORCH_CHECK(kind >= INT4 && kind <= INT8, "unknown integer format ", kind);
  const int64_t n = kind == INT8 ? data.numel() : data.numel() * 2;
  TORCH_CHECK(cols > 0 && n % cols == 0, "cols must divide the element count");
  const int64_t rows = n / cols, groups = (cols + group - 1) / group;
  TORCH_CHECK(scales.numel() == rows * groups, "scales has ", scales.numel(), " entries, expected ", rows * groups);
  TORCH_CHECK(kind != INT4 || (zeros.is_contiguous() && zeros.scalar_type() == at::kByte && zeros.numel() == rows * groups),
              "zeros must be contiguous uint8 with one entry per group");
  const int dt = dtype_code(dtype, "dtype");
  auto out = empty_out(n, dtype);
  const uint8_t* z = kind == INT4 ? zeros.data_ptr<uint8_t>() : nullptr;
  const uint8_t* d = data.data_ptr<uint8_t>();
  const float* s = scales.data_ptr<float>();
  const int k = int(kind);
  if (dt == F32) int_dequantize_impl<F32>(d, s, z, rows, cols, group, k, out.data_ptr(), scalar);
  else if (dt == BF16) int_dequantize_impl<BF16>(d, s, z, rows, cols, group, k, out.data_ptr(), scalar);
  else int_dequantize_impl<F16>(d, s, z, rows, cols, group, k, out.data_ptr(), scalar);
  return out;
}

// Where a parallel loop on `threads` threads would run now, and the load reading behind it.
std::tuple<std::string, int64_t, int64_t> cpu_pool(int64_t threads) {
  const int t = int(std::max<int64_t>(1, threads));
  const std::string pool = t <= 1 ? "serial" : pick_pool(t) == Pool::OpenMP ? "omp" : "team";
  return {pool, other_processes_running(), usable_cores()};
}

}  // namespace

TORCH_LIBRARY(qru_quant, m) {
  // (pool: "omp", "team" or "serial"; other processes' runnable tasks (-1: unknown); usable cores)
  m.def("cpu_pool(int threads) -> (str, int, int)", &cpu_pool);
  // other processes' runnable tasks, from the background reading (-1: unknown)
  m.def("others_running() -> int", [] { return int64_t(other_processes_running()); });
  // NF4/FP4 blockwise quantize -> (packed uint8, absmax fp32)
  // (level caps the instruction set: 2 AVX-512, 1 AVX2, 0 scalar, as ``scalar`` does)
  m.def("q4_quantize(Tensor x, Tensor bounds, Tensor order, int block_size, bool scalar, int level=2) "
        "-> (Tensor, Tensor)",
        &q4_quantize);
  // NF4/FP4 blockwise dequantize -> flat tensor
  m.def("q4_dequantize(Tensor packed, Tensor absmax, Tensor code, int block_size, int n, ScalarType dtype, "
        "bool scalar, int level=2) -> Tensor", &q4_dequantize);
  // the most capable NF4/FP4 path compiled on this CPU: 2 AVX-512, 1 AVX2, 0 scalar
  m.def("q4_level() -> int", [] { return int64_t(kQ4Level); });
  // int4/int4_sym/int8 quantize -> (data, scales, zeros)
  m.def("int_quantize(Tensor x, int cols, int group, int kind, float eps, bool scalar) -> (Tensor, Tensor, Tensor)",
        &int_quantize);
  // int4/int4_sym/int8 dequantize -> flat tensor
  m.def("int_dequantize(Tensor data, Tensor scales, Tensor zeros, int cols, int group, int kind, ScalarType dtype, "
        "bool scalar) -> Tensor", &int_dequantize);
}
