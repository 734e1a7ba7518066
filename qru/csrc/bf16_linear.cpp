// CPU kernel for qru.kernels.bf16_linear: y = x W^T (+ b) for bf16 x and W with few rows of x
// (decoding: one token per sequence). Each weight row is read once per call and multiplied into
// every row of x with fp32 accumulation; the result is rounded once to bf16 (nearest even), bias
// added in fp32 before the rounding. Three implementations, best first ("auto"):
//  * dpbf16 (AVX512-BF16): vdpbf16ps on 4 x 4 tiles (4 rows of x, 4 of W) over 32-wide K chunks,
//    products of bf16 pairs exact in fp32; 16 dot products reduced to one vector at the end.
//    Torch's oneDNN bf16 GEMM reads a cold weight at ~8-12 GB/s for M <= 16; this streams it at
//    the core's bandwidth.
//  * fma (AVX2): each weight row widened exactly to fp32 in registers, FMA into up to 8 rows.
//  * scalar: the same sums in plain C++.
// qru::Team over output columns.
#include "qru_common.h"

#include <c10/util/StringUtil.h>
#include <string>

namespace {

using namespace qru;

#if QRU_AVX2
// out[m] = sum_k x[m, k] w[k] for MB (<= 8) rows of fp32 x (row stride K)
template <int MB>
inline void dot_rows(const float* x, int64_t K, const uint16_t* w, float* out) {
  __m256 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 wv = load8(w + k);
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k), wv, acc[m]);
  }
  for (int m = 0; m < MB; ++m) {
    float s = hsum(acc[m]);
    for (int64_t kk = k; kk < K; ++kk) s += x[m * K + kk] * bf16_to_f32(w[kk]);
    out[m] = s;
  }
}
#endif

#ifndef QRU_PF_BYTES
#define QRU_PF_BYTES 2048
#endif

#if QRU_AVX512_BF16
// out[m * 4 + n] = sum_k x[m, k] w[n, k] for MB (<= 4) rows of x and NB (<= 4) rows of w (row stride K)
// pf: elements ahead of each line of w read to prefetch into L1 (0: none), see prefetch_distance.
template <int MB, int NB>
inline void dp_tile(const uint16_t* x, int64_t K, const uint16_t* w, float* out, int64_t pf) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[NB];
    for (int n = 0; n < NB; ++n) wv[n] = as_bh(_mm512_loadu_si512(w + n * K + k));
    if (pf)
      for (int n = 0; n < NB; ++n) _mm_prefetch(reinterpret_cast<const char*>(w + pf + n * K + k), _MM_HINT_T0);
    for (int m = 0; m < MB; ++m) {
      const __m512bh xv = as_bh(_mm512_loadu_si512(x + m * K + k));
      for (int n = 0; n < NB; ++n) acc[m * 4 + n] = _mm512_dpbf16_ps(acc[m * 4 + n], xv, wv[n]);
    }
  }
  if (k < K) {  // masked tail: zeros add nothing
    const __mmask32 t = __mmask32((uint64_t(1) << (K - k)) - 1);
    __m512bh wv[NB];
    for (int n = 0; n < NB; ++n) wv[n] = as_bh(_mm512_maskz_loadu_epi16(t, w + n * K + k));
    for (int m = 0; m < MB; ++m) {
      const __m512bh xv = as_bh(_mm512_maskz_loadu_epi16(t, x + m * K + k));
      for (int n = 0; n < NB; ++n) acc[m * 4 + n] = _mm512_dpbf16_ps(acc[m * 4 + n], xv, wv[n]);
    }
  }
  _mm512_storeu_ps(out, reduce16(acc));
}

using TileFn = void (*)(const uint16_t*, int64_t, const uint16_t*, float*, int64_t);
template <int MB>
constexpr TileFn tile_row[4] = {dp_tile<MB, 1>, dp_tile<MB, 2>, dp_tile<MB, 3>, dp_tile<MB, 4>};
constexpr const TileFn* tiles[4] = {tile_row<1>, tile_row<2>, tile_row<3>, tile_row<4>};

// Prefetch distance (elements): short rows (K <= 1024, a 4-row tile <= 8 KB) fetch the tile two
// ahead, which the hardware prefetcher misses (a new page per tile); long rows fetch ~QRU_PF_BYTES
// ahead within their own stream. Measured on Zen 4: the lm_head GEMV (8 x 512 x 32000) at 1.3-1.5 ms
// against 2.1-2.4 ms without it, i.e. at the dot-product peak rather than at ~15 GB/s.
inline int64_t prefetch_distance(int64_t K) { return K <= 1024 ? 8 * K : QRU_PF_BYTES / 2; }

void linear_dpbf16(const uint16_t* xp, const uint16_t* wp, const uint16_t* bp, uint16_t* yp,
                   int64_t M, int64_t N, int64_t K, bool par) {
  const int64_t pf_dist = prefetch_distance(K);
  // tiles of 4 weight rows; chunks of ~64K weights, taken in order (the prefetch runs ahead of each)
  parallel_work((N + 3) / 4, std::max<int64_t>(1, (int64_t(1) << 16) / (4 * std::max<int64_t>(1, K))), M * N * K,
                [&](int64_t tile) {
    const int64_t n0 = tile * 4;
    const int nb = int(std::min<int64_t>(4, N - n0));
    alignas(64) float out[16];
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int mb = int(std::min<int64_t>(4, M - m0));
      // software prefetch on the first pass over a tile, `pf` elements ahead of each line it reads
      const int64_t pf = (m0 == 0 && (n0 + 4) * K + pf_dist <= N * K) ? pf_dist : 0;
      tiles[mb - 1][nb - 1](xp + m0 * K, K, wp + n0 * K, out, pf);
      for (int m = 0; m < mb; ++m)
        for (int n = 0; n < nb; ++n)
          yp[(m0 + m) * N + n0 + n] = f32_to_bf16(out[m * 4 + n] + (bp ? bf16_to_f32(bp[n0 + n]) : 0.0f));
    }
  }, par);
}
#endif

void dot_rows_scalar(const float* x, int64_t mb, int64_t K, const uint16_t* w, float* out) {
  for (int64_t m = 0; m < mb; ++m) {
    float s = 0.0f;
    for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * bf16_to_f32(w[k]);
    out[m] = s;
  }
}

std::vector<std::string> impls() {
  std::vector<std::string> r;
#if QRU_AVX512_BF16
  r.push_back("dpbf16");
#endif
#if QRU_AVX2
  r.push_back("fma");
#endif
  r.push_back("scalar");
  return r;
}

void linear_widened(const uint16_t* xp, const uint16_t* wp, const uint16_t* bp, uint16_t* yp,
                    int64_t M, int64_t N, int64_t K, bool par, bool scalar) {
  // x widened to fp32 once (M x K, small)
  std::vector<float> xf(size_t(M * K));
  for (int64_t i = 0; i < M * K; ++i) xf[i] = bf16_to_f32(xp[i]);
  parallel_work(N, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, K)), M * N * K, [&](int64_t n) {
    const uint16_t* wr = wp + n * K;
    const float b = bp ? bf16_to_f32(bp[n]) : 0.0f;
    float out[8];
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const int64_t mb = std::min<int64_t>(8, M - m0);
      const float* xr = xf.data() + m0 * K;
#if QRU_AVX2
      if (!scalar) {
        switch (mb) {
          case 8: dot_rows<8>(xr, K, wr, out); break;
          case 7: dot_rows<7>(xr, K, wr, out); break;
          case 6: dot_rows<6>(xr, K, wr, out); break;
          case 5: dot_rows<5>(xr, K, wr, out); break;
          case 4: dot_rows<4>(xr, K, wr, out); break;
          case 3: dot_rows<3>(xr, K, wr, out); break;
          case 2: dot_rows<2>(xr, K, wr, out); break;
          default: dot_rows<1>(xr, K, wr, out); break;
        }
      } else {
        dot_rows_scalar(xr, mb, K, wr, out);
      }
#else
      (void)scalar;
      dot_rows_scalar(xr, mb, K, wr, out);
#endif
      for (int64_t m = 0; m < mb; ++m) yp[(m0 + m) * N + n] = f32_to_bf16(out[m] + b);
    }
  }, par);
}

at::Tensor skinny_linear(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias, c10::string_view impl) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "bf16_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16_linear: x and weight must be bfloat16");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.dim() == 2 && w.is_contiguous() && x.size(1) == w.size(1),
              "bf16_linear: x (M, K) and weight (N, K) must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const uint16_t* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() && bias->numel() == N,
                "bf16_linear: bias must be contiguous bfloat16 (N,)");
    bp = reinterpret_cast<const uint16_t*>(bias->data_ptr<at::BFloat16>());
  }
  const auto avail = impls();
  std::string which(impl.data(), impl.size());
  if (which == "auto") which = avail.front();
  TORCH_CHECK(std::find(avail.begin(), avail.end(), which) != avail.end(), "bf16_linear: impl '", which,
              "' is not built on this CPU (available: auto, ", c10::Join(", ", avail), ")");
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  at::Tensor y = at::empty({M, N}, x.options());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const bool par = M * N * K >= (int64_t(1) << 20);
#if QRU_AVX512_BF16
  if (which == "dpbf16") {
    linear_dpbf16(xp, wp, bp, yp, M, N, K, par);
    return y;
  }
#endif
  linear_widened(xp, wp, bp, yp, M, N, K, par, which == "scalar");
  return y;
}

}  // namespace

TORCH_LIBRARY(qru_bf16_linear, m) {
  // y = x W^T + b, bf16, fp32 accumulation, few rows of x
  m.def("skinny_linear(Tensor x, Tensor w, Tensor? bias=None, str impl=\"auto\") -> Tensor", &skinny_linear);
  // the implementations built for this CPU, best first
  m.def("impls() -> str[]", &impls);
}
