// CPU kernels for qru.kernels.lora: the thin LoRA products (rank r), fp32, with the dropout
// mask fused in, so neither the dropped-out copy of x nor a masked copy of a gradient is
// ever written to memory. The two big frozen-base GEMMs stay with torch (MKL).
//
//   rowdot(X, V, alpha, mask)     out[m, j] = alpha * sum_k keep(m,k) X[m,k] V[j,k]     (M x R)
//   expand(U, V, alpha, b, mask)  out[m, n] = keep(m,n) * (b[n] + alpha * sum_j U[m,j] V[j,n])   (M x N)
//   tallreduce(U, X, alpha, mask) out[j, n] = alpha * sum_m U[m,j] keep(m,n) X[m,n]    (R x N)
//   drop_mask(rows, cols, seed, thr)   the bool drop-mask of the hash below
//
// The keep-mask is either a bool ``drop`` tensor (keep = drop == 0) or counter-based dropout:
//   rowh[m] = h(m ^ k1), colh[n] = h(n ^ k0), dropped(m, n) = (h(colh[n] + rowh[m]) >> 16) < thr
// with h = lowbias32 (C. Wellons), k0/k1 the low/high 32 bits of ``seed``, uint32 arithmetic;
// qru.kernels.hash_dropout.hash_drop_reference is the torch oracle. The mask is recomputed wherever
// it is needed (forward and backward), never stored.
// fp32 accumulation in registers (AVX2/FMA micro-tiles, scalar tails; ``scalar=true`` or a
// build without AVX2 takes the portable path). qru::Team, torch's thread count.
#include "qru_common.h"

#include <cstdlib>

namespace {

using namespace qru;

// Floats of the thin operand (R x chunk) kept hot in L2 while rows stream past it: 128 KiB.
constexpr int64_t kPanelFloats = 32768;

void check2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.stride(1) == 1, name, " must have unit column stride");
}

inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Where the dropout keep-mask comes from: nothing (all kept), a bool drop tensor, or the hash.
struct Keep {
  const uint8_t* bytes = nullptr;  // drop[m * ld + n] != 0: dropped
  int64_t ld = 0;
  bool hash = false;
  uint32_t thr = 0;
  std::vector<uint32_t> rowh, colh;

  bool active() const { return bytes != nullptr || hash; }

  bool dropped(int64_t m, int64_t n) const {
    if (bytes) return bytes[m * ld + n] != 0;
    if (hash) return (lowbias32(colh[n] + rowh[m]) >> 16) < thr;
    return false;
  }

#if QRU_AVX2
  // all-ones lanes where kept, for columns n .. n+7 of row m
  __m256 keep8(int64_t m, int64_t n) const {
    if (bytes) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + m * ld + n));
      return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_cvtepu8_epi32(b), _mm256_setzero_si256()));
    }
    __m256i t = _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(colh.data() + n)),
                                 _mm256_set1_epi32(int32_t(rowh[m])));
    t = _mm256_xor_si256(t, _mm256_srli_epi32(t, 16));
    t = _mm256_mullo_epi32(t, _mm256_set1_epi32(int32_t(0x7FEB352Du)));
    t = _mm256_xor_si256(t, _mm256_srli_epi32(t, 15));
    t = _mm256_mullo_epi32(t, _mm256_set1_epi32(int32_t(0x846CA68Bu)));
    // the final x ^= x >> 16 leaves the top 16 bits as they are
    const __m256i top = _mm256_srli_epi32(t, 16);
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(top, _mm256_set1_epi32(int32_t(thr) - 1)));
  }
#endif
};

// A Keep from the Python arguments: ``drop`` (bool, rows x cols) or ``thr`` > 0 with ``seed``.
void make_keep(Keep& k, const c10::optional<at::Tensor>& drop, int64_t seed, int64_t thr, int64_t rows,
               int64_t cols) {
  if (drop.has_value() && drop->defined()) {
    TORCH_CHECK(thr == 0, "pass a drop tensor or a hash threshold, not both");
    TORCH_CHECK(drop->scalar_type() == at::kBool, "drop must be bool");
    TORCH_CHECK(drop->dim() == 2 && drop->size(0) == rows && drop->size(1) == cols && drop->stride(1) == 1,
                "drop must be (", rows, ", ", cols, ") with unit column stride");
    k.bytes = reinterpret_cast<const uint8_t*>(drop->data_ptr<bool>());
    k.ld = drop->stride(0);
    return;
  }
  if (thr <= 0) return;
  TORCH_CHECK(thr < 65536, "dropout threshold must be < 65536, got ", thr);
  TORCH_CHECK(rows <= (int64_t(1) << 32) && cols <= (int64_t(1) << 32), "hash dropout: more than 2^32 rows/cols");
  k.hash = true;
  k.thr = uint32_t(thr);
  const uint32_t k0 = uint32_t(uint64_t(seed)), k1 = uint32_t(uint64_t(seed) >> 32);
  k.rowh.resize(rows);
  k.colh.resize(cols + 8);  // padded: a vector load may start at any column < cols
  for (int64_t m = 0; m < rows; ++m) k.rowh[m] = lowbias32(uint32_t(m) ^ k1);
  for (int64_t n = 0; n < cols + 8; ++n) k.colh[n] = lowbias32(uint32_t(n) ^ k0);
}

// Row m of x, columns [n0, n0 + n), with dropped elements zeroed, into dst.
inline void mask_row(const float* x, const Keep& keep, int64_t m, int64_t n0, float* dst, int64_t n, bool vec) {
  int64_t k = 0;
#if QRU_AVX2
  if (vec) {
    if (keep.active())
      for (; k + 8 <= n; k += 8) _mm256_storeu_ps(dst + k, _mm256_and_ps(_mm256_loadu_ps(x + k), keep.keep8(m, n0 + k)));
    else
      for (; k + 8 <= n; k += 8) _mm256_storeu_ps(dst + k, _mm256_loadu_ps(x + k));
  }
#endif
  for (; k < n; ++k) dst[k] = keep.dropped(m, n0 + k) ? 0.0f : x[k];
}

at::Tensor drop_mask(int64_t rows, int64_t cols, int64_t seed, int64_t thr, bool scalar) {
  TORCH_CHECK(rows >= 0 && cols >= 0 && thr > 0, "drop_mask: bad arguments");
  Keep keep;
  make_keep(keep, c10::nullopt, seed, thr, rows, cols);
  at::Tensor out = at::empty({rows, cols}, at::kBool);
  uint8_t* o = reinterpret_cast<uint8_t*>(out.data_ptr<bool>());
  const bool vec = QRU_AVX2 && !scalar;
  parallel_work(rows, 16, rows * cols, [&](int64_t m) {
    int64_t n = 0;
#if QRU_AVX2
    if (vec)
      for (; n + 8 <= cols; n += 8) {
        const int kept = _mm256_movemask_ps(keep.keep8(m, n));
        for (int q = 0; q < 8; ++q) o[m * cols + n + q] = !((kept >> q) & 1);
      }
#endif
    for (; n < cols; ++n) o[m * cols + n] = keep.dropped(m, n);
  });
  return out;
}

// ------------------------------------------------------------------------------- rowdot
// out[i, j0 + j] = alpha * <xr[i], V[j0 + j]> for i < MR, j < NR.
template <int MR, int NR>
inline void rowdot_tile(const float* const* xr, const float* V, int64_t ldv, int64_t K, float alpha, float* out,
                        int64_t ldo, int64_t j0, bool vec) {
  int64_t k = 0;
  float res[MR][NR] = {};
#if QRU_AVX2
  if (vec) {
  __m256 acc[MR][NR];
  _Pragma("GCC unroll 16")
  for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 16")
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    __m256 xv[MR];
    _Pragma("GCC unroll 16")
    for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(xr[i] + k);
    _Pragma("GCC unroll 16")
    for (int j = 0; j < NR; ++j) {
      const __m256 v = _mm256_loadu_ps(V + (j0 + j) * ldv + k);
      _Pragma("GCC unroll 16")
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], v, acc[i][j]);
    }
  }
  _Pragma("GCC unroll 16")
  for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 16")
    for (int j = 0; j < NR; ++j) res[i][j] = hsum(acc[i][j]);
  }
#endif
  for (; k < K; ++k)
    _Pragma("GCC unroll 16")
    for (int i = 0; i < MR; ++i)
      _Pragma("GCC unroll 16")
      for (int j = 0; j < NR; ++j) res[i][j] += xr[i][k] * V[(j0 + j) * ldv + k];
  _Pragma("GCC unroll 16")
  for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 16")
    for (int j = 0; j < NR; ++j) out[i * ldo + j0 + j] = alpha * res[i][j];
}

template <int MR>
inline void rowdot_rows(const float* const* xr, const float* V, int64_t ldv, int64_t K, int64_t R, float alpha,
                        float* out, int64_t ldo, bool vec) {
  int64_t j = 0;
  for (; j + 4 <= R; j += 4) rowdot_tile<MR, 4>(xr, V, ldv, K, alpha, out, ldo, j, vec);
  switch (R - j) {
    case 3: rowdot_tile<MR, 3>(xr, V, ldv, K, alpha, out, ldo, j, vec); break;
    case 2: rowdot_tile<MR, 2>(xr, V, ldv, K, alpha, out, ldo, j, vec); break;
    case 1: rowdot_tile<MR, 1>(xr, V, ldv, K, alpha, out, ldo, j, vec); break;
    default: break;
  }
}

at::Tensor rowdot(const at::Tensor& X, const at::Tensor& V, double alpha_d, const c10::optional<at::Tensor>& drop,
                  int64_t seed, int64_t thr, bool scalar) {
  const bool vec = QRU_AVX2 && !scalar;
  check2d(X, "X");
  check2d(V, "V");
  const int64_t M = X.size(0), K = X.size(1), R = V.size(0);
  TORCH_CHECK(V.size(1) == K, "rowdot: V has ", V.size(1), " columns, X has ", K);
  Keep keep;
  make_keep(keep, drop, seed, thr, M, K);
  const bool masked = keep.active();
  at::Tensor out = at::empty({M, R}, at::kFloat);
  const float* x = X.data_ptr<float>();
  const float* v = V.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t ldx = X.stride(0), ldv = V.stride(0);
  const float alpha = float(alpha_d);
  // One block of MR rows at a time over the whole K (measured: K chunks that keep V in L2 did
  // not pay here); masked rows go through a per-thread buffer.
  constexpr int MR = 3;
  const int64_t blocks = (M + MR - 1) / MR;
  struct TagBuf;
  parallel_work(blocks, 8, M * K * R, [&](int64_t b) {
    float* buf = masked ? scratch<TagBuf>(MR * K) : nullptr;
    {
      const int64_t m0 = b * MR;
      const int rows = int(std::min<int64_t>(MR, M - m0));
      const float* xr[MR];
      for (int i = 0; i < rows; ++i) {
        if (masked) {
          mask_row(x + (m0 + i) * ldx, keep, m0 + i, 0, buf + i * K, K, vec);
          xr[i] = buf + i * K;
        } else {
          xr[i] = x + (m0 + i) * ldx;
        }
      }
      float* orow = o + m0 * R;
      if (rows == 3) rowdot_rows<3>(xr, v, ldv, K, R, alpha, orow, R, vec);
      else if (rows == 2) rowdot_rows<2>(xr, v, ldv, K, R, alpha, orow, R, vec);
      else rowdot_rows<1>(xr, v, ldv, K, R, alpha, orow, R, vec);
    }
  });
  return out;
}

// ------------------------------------------------------------------------------- expand
// out[i, n0 .. n0 + 8 NV) for i < MR.
template <int MR, int NV>
inline void expand_tile(const float* U, int64_t ldu, int64_t R, const float* V, int64_t ldv, int64_t n0, float alpha,
                        const float* bias, const Keep& keep, int64_t m0, float* out, int64_t ldo) {
#if QRU_AVX2
  __m256 acc[MR][NV];
  _Pragma("GCC unroll 16")
  for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 16")
    for (int q = 0; q < NV; ++q) acc[i][q] = _mm256_setzero_ps();
  for (int64_t j = 0; j < R; ++j) {
    __m256 vv[NV];
    _Pragma("GCC unroll 16")
    for (int q = 0; q < NV; ++q) vv[q] = _mm256_loadu_ps(V + j * ldv + n0 + 8 * q);
    _Pragma("GCC unroll 16")
    for (int i = 0; i < MR; ++i) {
      const __m256 u = _mm256_broadcast_ss(U + i * ldu + j);
      _Pragma("GCC unroll 16")
      for (int q = 0; q < NV; ++q) acc[i][q] = _mm256_fmadd_ps(u, vv[q], acc[i][q]);
    }
  }
  const __m256 a = _mm256_set1_ps(alpha);
  const bool masked = keep.active();
  _Pragma("GCC unroll 16")
  for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 16")
    for (int q = 0; q < NV; ++q) {
      __m256 r = _mm256_mul_ps(acc[i][q], a);
      if (bias) r = _mm256_add_ps(r, _mm256_loadu_ps(bias + n0 + 8 * q));
      if (masked) r = _mm256_and_ps(r, keep.keep8(m0 + i, n0 + 8 * q));
      _mm256_storeu_ps(out + i * ldo + n0 + 8 * q, r);
    }
#endif
}

// columns [n0, n1) of rows [0, rows), one column at a time (tails and the scalar path)
inline void expand_scalar(const float* U, int64_t ldu, int64_t R, const float* V, int64_t ldv, int64_t n0, int64_t n1,
                          int rows, float alpha, const float* bias, const Keep& keep, int64_t m0, float* out,
                          int64_t ldo) {
  for (int i = 0; i < rows; ++i)
    for (int64_t n = n0; n < n1; ++n) {
      float s = 0.0f;
      for (int64_t j = 0; j < R; ++j) s += U[i * ldu + j] * V[j * ldv + n];
      float r = alpha * s;
      if (bias) r += bias[n];
      if (keep.dropped(m0 + i, n)) r = 0.0f;
      out[i * ldo + n] = r;
    }
}

template <int MR>
inline void expand_rows(const float* U, int64_t ldu, int64_t R, const float* V, int64_t ldv, int64_t nb, int64_t N,
                        float alpha, const float* bias, const Keep& keep, int64_t m0, float* out, int64_t ldo, bool vec) {
  int64_t n = nb;
#if QRU_AVX2
  if (vec) {
  for (; n + 24 <= N; n += 24) expand_tile<MR, 3>(U, ldu, R, V, ldv, n, alpha, bias, keep, m0, out, ldo);
  for (; n + 8 <= N; n += 8) expand_tile<MR, 1>(U, ldu, R, V, ldv, n, alpha, bias, keep, m0, out, ldo);
  }
#endif
  expand_scalar(U, ldu, R, V, ldv, n, N, MR, alpha, bias, keep, m0, out, ldo);
}

at::Tensor expand(const at::Tensor& U, const at::Tensor& V, double alpha_d, const c10::optional<at::Tensor>& bias,
                  const c10::optional<at::Tensor>& drop, int64_t seed, int64_t thr, bool scalar) {
  const bool vec = QRU_AVX2 && !scalar;
  check2d(U, "U");
  check2d(V, "V");
  const int64_t M = U.size(0), R = U.size(1), N = V.size(1);
  TORCH_CHECK(V.size(0) == R, "expand: V has ", V.size(0), " rows, U has ", R, " columns");
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "expand: bias must be contiguous float32 of ", N);
    b = bias->data_ptr<float>();
  }
  Keep keep;
  make_keep(keep, drop, seed, thr, M, N);
  at::Tensor out = at::empty({M, N}, at::kFloat);
  const float* u = U.data_ptr<float>();
  const float* v = V.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t ldu = U.stride(0), ldv = V.stride(0);
  const float alpha = float(alpha_d);
  // Column panels whose slice of V (R x NP) stays in L2 while a group of rows is written.
  constexpr int MR = 4;
  constexpr int64_t kGroup = 32;
  const int64_t NP = std::max<int64_t>(24, kPanelFloats / std::max<int64_t>(R, 1) / 24 * 24);
  const int64_t groups = (M + kGroup - 1) / kGroup, panels = (N + NP - 1) / NP;
  parallel_work(groups * panels, 1, M * N * R, [&](int64_t item) {
    const int64_t g0 = (item / panels) * kGroup, g1 = std::min(M, g0 + kGroup);
    const int64_t n0 = (item % panels) * NP, n1 = std::min(N, n0 + NP);
    for (int64_t m0 = g0; m0 < g1; m0 += MR) {
      const int rows = int(std::min<int64_t>(MR, g1 - m0));
      const float* ub = u + m0 * ldu;
      float* ob = o + m0 * N;
      switch (rows) {
        case 4: expand_rows<4>(ub, ldu, R, v, ldv, n0, n1, alpha, b, keep, m0, ob, N, vec); break;
        case 3: expand_rows<3>(ub, ldu, R, v, ldv, n0, n1, alpha, b, keep, m0, ob, N, vec); break;
        case 2: expand_rows<2>(ub, ldu, R, v, ldv, n0, n1, alpha, b, keep, m0, ob, N, vec); break;
        default: expand_rows<1>(ub, ldu, R, v, ldv, n0, n1, alpha, b, keep, m0, ob, N, vec); break;
      }
    }
  });
  return out;
}

// --------------------------------------------------------------------------- tallreduce
// A strip of kStrip columns, kTileRows rows at a time, is copied (masked, zero-padded) into a
// contiguous tile (64 KiB: wide rows so each page of X is visited for 256 bytes, not 64);
// for each 16-column sub-strip, RB rows of the output accumulate over the tile in registers.
constexpr int64_t kStrip = 64;
constexpr int64_t kSub = 16;
constexpr int64_t kTileRows = 256;

// acc[(j0 + j) * kStrip + c] += sum_m U[m, j0 + j] tile[m * kStrip + c], c < kSub (tile, acc at the sub-strip)
template <int RB>
inline void tall_tile(const float* U, int64_t ldu, int64_t j0, const float* tile, int64_t rows, float* acc_out,
                      bool vec) {
#if QRU_AVX2
  if (vec) {
  __m256 acc[RB][2];
  _Pragma("GCC unroll 16")
  for (int j = 0; j < RB; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
  for (int64_t m = 0; m < rows; ++m) {
    const __m256 x0 = _mm256_loadu_ps(tile + m * kStrip);
    const __m256 x1 = _mm256_loadu_ps(tile + m * kStrip + 8);
    const float* um = U + m * ldu + j0;
    _Pragma("GCC unroll 16")
    for (int j = 0; j < RB; ++j) {
      const __m256 u = _mm256_broadcast_ss(um + j);
      acc[j][0] = _mm256_fmadd_ps(u, x0, acc[j][0]);
      acc[j][1] = _mm256_fmadd_ps(u, x1, acc[j][1]);
    }
  }
  _Pragma("GCC unroll 16")
  for (int j = 0; j < RB; ++j) {
    float* a = acc_out + (j0 + j) * kStrip;
    _mm256_storeu_ps(a, _mm256_add_ps(_mm256_loadu_ps(a), acc[j][0]));
    _mm256_storeu_ps(a + 8, _mm256_add_ps(_mm256_loadu_ps(a + 8), acc[j][1]));
  }
  return;
  }
#endif
  for (int64_t m = 0; m < rows; ++m)
    _Pragma("GCC unroll 16")
    for (int j = 0; j < RB; ++j)
      for (int64_t c = 0; c < kSub; ++c) acc_out[(j0 + j) * kStrip + c] += U[m * ldu + j0 + j] * tile[m * kStrip + c];
}

at::Tensor tallreduce(const at::Tensor& U, const at::Tensor& X, double alpha_d, const c10::optional<at::Tensor>& drop,
                      int64_t seed, int64_t thr, bool scalar) {
  const bool vec = QRU_AVX2 && !scalar;
  check2d(U, "U");
  check2d(X, "X");
  const int64_t M = U.size(0), R = U.size(1), N = X.size(1);
  TORCH_CHECK(X.size(0) == M, "tallreduce: X has ", X.size(0), " rows, U has ", M);
  Keep keep;
  make_keep(keep, drop, seed, thr, M, N);
  at::Tensor out = at::empty({R, N}, at::kFloat);
  const float* u = U.data_ptr<float>();
  const float* x = X.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t ldu = U.stride(0), ldx = X.stride(0);
  const float alpha = float(alpha_d);
  const int64_t strips = (N + kStrip - 1) / kStrip;
  struct TagTile; struct TagAcc;
  parallel_work(strips, 1, M * N * R, [&](int64_t s) {
    float* tile = scratch<TagTile>(kTileRows * kStrip);
    float* acc = scratch<TagAcc>(R * kStrip);
    {
      const int64_t n0 = s * kStrip;
      const int64_t w = std::min(kStrip, N - n0);
      const int64_t subs = (w + kSub - 1) / kSub;
      std::fill(acc, acc + R * kStrip, 0.0f);
      for (int64_t m0 = 0; m0 < M; m0 += kTileRows) {
        const int64_t rows = std::min(kTileRows, M - m0);
        for (int64_t m = 0; m < rows; ++m) {
          const float* xr = x + (m0 + m) * ldx + n0;
          float* t = tile + m * kStrip;
          if (w == kStrip) {
            mask_row(xr, keep, m0 + m, n0, t, kStrip, vec);
          } else {
            for (int64_t c = 0; c < subs * kSub; ++c)
              t[c] = (c < w && !keep.dropped(m0 + m, n0 + c)) ? xr[c] : 0.0f;
          }
        }
        const float* ub = u + m0 * ldu;
        for (int64_t q = 0; q < subs; ++q) {
          const float* tq = tile + q * kSub;
          float* aq = acc + q * kSub;
          int64_t j = 0;
          for (; j + 6 <= R; j += 6) tall_tile<6>(ub, ldu, j, tq, rows, aq, vec);
          switch (R - j) {
            case 5: tall_tile<5>(ub, ldu, j, tq, rows, aq, vec); break;
            case 4: tall_tile<4>(ub, ldu, j, tq, rows, aq, vec); break;
            case 3: tall_tile<3>(ub, ldu, j, tq, rows, aq, vec); break;
            case 2: tall_tile<2>(ub, ldu, j, tq, rows, aq, vec); break;
            case 1: tall_tile<1>(ub, ldu, j, tq, rows, aq, vec); break;
            default: break;
          }
        }
      }
      for (int64_t j = 0; j < R; ++j)
        for (int64_t c = 0; c < w; ++c) o[j * N + n0 + c] = alpha * acc[j * kStrip + c];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(qru_lora, m) {
  // out[m,j] = alpha * sum_k keep(m,k) X[m,k] V[j,k]
  m.def("rowdot(Tensor X, Tensor V, float alpha, Tensor? drop=None, int seed=0, int thr=0, bool scalar=False) -> Tensor",
        &rowdot);
  // out[m,n] = keep(m,n) (b[n] + alpha * sum_j U[m,j] V[j,n])
  m.def("expand(Tensor U, Tensor V, float alpha, Tensor? bias=None, Tensor? drop=None, int seed=0, int thr=0, "
        "bool scalar=False) -> Tensor", &expand);
  // out[j,n] = alpha * sum_m U[m,j] keep(m,n) X[m,n]
  m.def("tallreduce(Tensor U, Tensor X, float alpha, Tensor? drop=None, int seed=0, int thr=0, bool scalar=False) "
        "-> Tensor", &tallreduce);
  // bool (rows, cols): the counter-based dropout mask
  m.def("drop_mask(int rows, int cols, int seed, int thr, bool scalar=False) -> Tensor", &drop_mask);
}
