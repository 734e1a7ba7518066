// CPU kernels for the element-wise parts of a Llama layer (qru.kernels.rmsnorm / rope / swiglu):
// one pass over memory each way instead of torch's chain of ops and saved temporaries.
//
//   rmsnorm_fwd(x, w, eps)            y = w * round(x * rstd), rstd = 1/sqrt(mean(x^2) + eps)  -> (y, rstd)
//   rmsnorm_bwd(dy, x, w, rstd)       dx = rstd (dn - x rstd^2 mean(dn x)), dn = dy w;  dw = sum_rows dy round(x rstd)
//   rope_fwd(x, cos, sin, out_dtype)  x (B, T, NH, D) any strides -> out (B, NH, T, D) contiguous:
//                                     out[i] = x[i] c[i] - x[i+h] s[i],  out[i+h] = x[i+h] c[i+h] + x[i] s[i+h]
//   rope_bwd(dout, cos, sin, dtype)   dout (B, NH, T, D) any strides -> dx (B, T, NH, D) contiguous (the transpose)
//   swiglu_fwd(g, u)                  out = round(silu(g)) * u
//   swiglu_halves_fwd(gu)             gu (N, 2I) row-strided -> silu(gu[:, :I]) * gu[:, I:] (inference)
//   swiglu_bwd(dout, g, u)            dg = dout u sig(g) (1 + g (1 - sig(g))),  du = dout silu(g)
//   decode_attn(q, k, v, mask, scale) one query position: softmax(scale q kᵀ, masked) v, K/V read in place
//     (vector path: one task per (batch, kv head) for its query heads, 8 keys per score block; with
//     AVX-512 and D % 16 == 0: 16 lanes, 16 keys per block)
//   argmax_rows(x)                    x (N, V) rows (unit last stride) -> (N,) int64: the first index of
//                                     each row's maximum, or of its first NaN (torch.argmax's rule); a greedy
//                                     decode step's next tokens, without torch's slow last-dim reduction
//
// Tensors are float32 or bfloat16 (read / written as torch rounds: nearest even); all math in
// fp32 (no fast-math; ISO C++ so no FMA contraction in the scalar code). AVX2 loops where they
// pay (the norm and SwiGLU), a scalar path otherwise or with scalar=true. qru::Team over rows.
#include "qru_common.h"

#include <limits>

namespace {

using namespace qru;

constexpr int64_t kRmsBlocks = 16;  // rmsnorm backward: row blocks, each with its partial weight gradient

int code(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  if (t.scalar_type() == at::kFloat) return F32;
  if (t.scalar_type() == at::kBFloat16) return BF16;
  TORCH_CHECK(false, name, " must be float32 or bfloat16, got ", t.scalar_type());
  return F32;
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// ---------------------------------------------------------------------------------- RMSNorm
template <typename T>
void rms_fwd(const T* x, const T* w, T* y, float* rstd, int64_t N, int64_t H, float eps, bool scalar) {
  parallel_work(N, std::max<int64_t>(1, kChunkValues / std::max<int64_t>(1, H)), N * H, [&](int64_t n) {
    const T* xr = x + n * H;
    T* yr = y + n * H;
    int64_t i = 0;
    float ss = 0.0f;
#if QRU_AVX2
    if (!scalar) {
      __m256 acc = _mm256_setzero_ps();
      for (; i + 8 <= H; i += 8) { __m256 v = load8(xr + i); acc = _mm256_fmadd_ps(v, v, acc); }
      ss = hsum(acc);
    }
#endif
    for (; i < H; ++i) { float v = ld(xr, i); ss += v * v; }
    const float r = 1.0f / std::sqrt(ss / float(H) + eps);
    rstd[n] = r;
    i = 0;
#if QRU_AVX2
    if (!scalar) {
      __m256 rr = _mm256_set1_ps(r);
      for (; i + 8 <= H; i += 8)
        store8(yr + i, _mm256_mul_ps(load8(w + i), rnd8(yr, _mm256_mul_ps(load8(xr + i), rr))));
    }
#endif
    for (; i < H; ++i) st(yr, i, ld(w, i) * rnd(yr, ld(xr, i) * r));
  });
}

template <typename T>
void rms_bwd(const T* dy, const T* x, const T* w, const float* rstd, T* dx, float* dw, int64_t N, int64_t H,
             bool scalar) {
  // dw: one partial sum per fixed block of rows, added in block order: the same bits at any thread count
  const int64_t NB = std::min<int64_t>(N, kRmsBlocks);
  std::vector<float> part(size_t(NB) * H, 0.0f);
  parallel_work(NB, 1, N * H, [&](int64_t blk) {
    float* acc_w = part.data() + size_t(blk) * H;
    for (int64_t n = blk * N / NB; n < (blk + 1) * N / NB; ++n) {
      const T* dyr = dy + n * H;
      const T* xr = x + n * H;
      T* dxr = dx + n * H;
      const float r = rstd[n];
      float dot = 0.0f;
      int64_t i = 0;
#if QRU_AVX2
      __m256 rr = _mm256_set1_ps(r);
      if (!scalar) {
        __m256 acc = _mm256_setzero_ps();
        for (; i + 8 <= H; i += 8) {
          __m256 g = load8(dyr + i), xv = load8(xr + i);
          acc = _mm256_fmadd_ps(_mm256_mul_ps(g, load8(w + i)), xv, acc);
          __m256 nr = rnd8(xr, _mm256_mul_ps(xv, rr));
          _mm256_storeu_ps(acc_w + i, _mm256_fmadd_ps(g, nr, _mm256_loadu_ps(acc_w + i)));
        }
        dot = hsum(acc);
      }
#endif
      for (; i < H; ++i) {
        const float g = ld(dyr, i), xv = ld(xr, i);
        dot += g * ld(w, i) * xv;
        acc_w[i] += g * rnd(xr, xv * r);
      }
      const float c = r * r * dot / float(H);
      i = 0;
#if QRU_AVX2
      if (!scalar) {
        __m256 cc = _mm256_set1_ps(c);
        for (; i + 8 <= H; i += 8) {
          __m256 dn = _mm256_mul_ps(load8(dyr + i), load8(w + i));
          store8(dxr + i, _mm256_mul_ps(rr, _mm256_sub_ps(dn, _mm256_mul_ps(load8(xr + i), cc))));
        }
      }
#endif
      for (; i < H; ++i) st(dxr, i, r * (ld(dyr, i) * ld(w, i) - ld(xr, i) * c));
    }
  });
  for (int64_t t = 0; t < NB; ++t)
    for (int64_t i = 0; i < H; ++i) dw[i] += part[size_t(t) * H + i];
}

void check_rows(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "rmsnorm: x must be contiguous 2-D (rows, hidden)");
  TORCH_CHECK(w.dim() == 1 && w.is_contiguous() && w.size(0) == x.size(1), "rmsnorm: weight must be (hidden,)");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "rmsnorm: weight dtype must equal x dtype");
}

std::tuple<at::Tensor, at::Tensor> rmsnorm_fwd(at::Tensor x, at::Tensor w, double eps, bool scalar) {
  const int dt = code(x, "x");
  check_rows(x, w);
  const int64_t N = x.size(0), H = x.size(1);
  at::Tensor y = at::empty_like(x), rstd = at::empty({N}, at::kFloat);
  if (dt == F32)
    rms_fwd<float>(ptr<float>(x), ptr<float>(w), ptr<float>(y), ptr<float>(rstd), N, H, float(eps), scalar);
  else
    rms_fwd<uint16_t>(ptr<uint16_t>(x), ptr<uint16_t>(w), ptr<uint16_t>(y), ptr<float>(rstd), N, H, float(eps),
                      scalar);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rmsnorm_bwd(at::Tensor dy, at::Tensor x, at::Tensor w, at::Tensor rstd,
                                               bool scalar) {
  const int dt = code(x, "x");
  check_rows(x, w);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && dy.is_contiguous(),
              "rmsnorm: dy must be contiguous like x");
  const int64_t N = x.size(0), H = x.size(1);
  at::Tensor dx = at::empty_like(x), dw = at::zeros({H}, at::kFloat);
  if (dt == F32)
    rms_bwd<float>(ptr<float>(dy), ptr<float>(x), ptr<float>(w), ptr<float>(rstd), ptr<float>(dx), ptr<float>(dw),
                   N, H, scalar);
  else
    rms_bwd<uint16_t>(ptr<uint16_t>(dy), ptr<uint16_t>(x), ptr<uint16_t>(w), ptr<float>(rstd), ptr<uint16_t>(dx),
                      ptr<float>(dw), N, H, scalar);
  return {dx, dw};
}

// ---------------------------------------------------------------------------------- RoPE
// src element (b, t, h, d) at sb*b + st*t + sh*h + d (unit last stride); dst contiguous with the
// other layout. FWD: src (B,T,NH,D) -> dst (B,NH,T,D) rotating by +angle; BWD: src (B,NH,T,D)
// -> dst (B,T,NH,D) rotating by -angle (the transpose of the rotation).
template <typename TI, typename TO, bool FWD>
void rope_impl(const TI* src, int64_t sb, int64_t st_, int64_t sh, TO* dst, const float* cs, const float* sn,
               int64_t B, int64_t T, int64_t NH, int64_t D) {
  const int64_t half = D / 2;
  parallel_work(B * T, std::max<int64_t>(1, kChunkValues / std::max<int64_t>(1, NH * D)), B * T * NH * D,
                [&](int64_t bt) {
      const int64_t b = bt / T, t = bt % T;
      const float* c = cs + (b * T + t) * D;
      const float* s = sn + (b * T + t) * D;
      for (int64_t h = 0; h < NH; ++h) {
        const TI* x = src + b * sb + t * st_ + h * sh;
        TO* o = FWD ? dst + ((b * NH + h) * T + t) * D : dst + ((b * T + t) * NH + h) * D;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = ld(x, i), x2 = ld(x, i + half);
          if (FWD) {
            const float a = x1 * c[i], bb = x2 * s[i];
            const float p = x2 * c[i + half], q = x1 * s[i + half];
            st(o, i, a - bb);
            st(o, i + half, p + q);
          } else {
            const float a = x1 * c[i], bb = x2 * s[i + half];
            const float p = x2 * c[i + half], q = x1 * s[i];
            st(o, i, a + bb);
            st(o, i + half, p - q);
          }
        }
      }
    });
}

template <bool FWD>
at::Tensor rope_any(at::Tensor x, at::Tensor cs, at::Tensor sn, int64_t sb, int64_t st_, int64_t sh, int64_t B,
                    int64_t T, int64_t NH, int64_t D, at::ScalarType out_dtype) {
  const int di = code(x, "x");
  TORCH_CHECK(D % 2 == 0, "rope: head_dim must be even");
  TORCH_CHECK(cs.scalar_type() == at::kFloat && sn.scalar_type() == at::kFloat && cs.is_contiguous() &&
                  sn.is_contiguous() && cs.numel() == B * T * D && sn.numel() == B * T * D,
              "rope: cos/sin must be contiguous float32 (B, T, D)");
  at::Tensor out = FWD ? at::empty({B, NH, T, D}, x.options().dtype(out_dtype))
                       : at::empty({B, T, NH, D}, x.options().dtype(out_dtype));
  const int dout = code(out, "out");
  const float* c = ptr<float>(cs);
  const float* s = ptr<float>(sn);
  if (di == F32 && dout == F32)
    rope_impl<float, float, FWD>(ptr<float>(x), sb, st_, sh, ptr<float>(out), c, s, B, T, NH, D);
  else if (di == BF16 && dout == BF16)
    rope_impl<uint16_t, uint16_t, FWD>(ptr<uint16_t>(x), sb, st_, sh, ptr<uint16_t>(out), c, s, B, T, NH, D);
  else if (di == BF16 && dout == F32)
    rope_impl<uint16_t, float, FWD>(ptr<uint16_t>(x), sb, st_, sh, ptr<float>(out), c, s, B, T, NH, D);
  else
    rope_impl<float, uint16_t, FWD>(ptr<float>(x), sb, st_, sh, ptr<uint16_t>(out), c, s, B, T, NH, D);
  return out;
}

at::Tensor rope_fwd(at::Tensor x, at::Tensor cs, at::Tensor sn, at::ScalarType out_dtype) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "rope: x must be (B, T, NH, D) with unit last stride");
  return rope_any<true>(x, cs, sn, x.stride(0), x.stride(1), x.stride(2), x.size(0), x.size(1), x.size(2),
                        x.size(3), out_dtype);
}

at::Tensor rope_bwd(at::Tensor g, at::Tensor cs, at::Tensor sn, at::ScalarType out_dtype) {
  TORCH_CHECK(g.dim() == 4 && g.stride(3) == 1, "rope: grad must be (B, NH, T, D) with unit last stride");
  // src index (b, t, h): strides of g's (b, h, t) dims
  return rope_any<false>(g, cs, sn, g.stride(0), g.stride(2), g.stride(1), g.size(0), g.size(2), g.size(1),
                         g.size(3), out_dtype);
}

// ---------------------------------------------------------------------------------- SwiGLU
// Values [s, e) of one span, on the calling thread.
template <typename T>
void swiglu_fwd_span(const T* g, const T* u, T* o, int64_t s, int64_t e, bool scalar) {
  int64_t i = s;
#if QRU_AVX2
  if (!scalar) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (; i + 8 <= e; i += 8) {
      __m256 gv = load8(g + i);
      __m256 sl = _mm256_div_ps(gv, _mm256_add_ps(one, exp256(_mm256_sub_ps(zero, gv))));
      store8(o + i, _mm256_mul_ps(rnd8(o, sl), load8(u + i)));
    }
  }
#endif
  for (; i < e; ++i) {
    const float gv = ld(g, i);
    st(o, i, rnd(o, gv / (1.0f + std::exp(-gv))) * ld(u, i));
  }
}

template <typename T>
void swiglu_fwd_impl(const T* g, const T* u, T* o, int64_t n, bool scalar) {
  const int64_t blk = 1 << 14;
  parallel_work((n + blk - 1) / blk, 1, n, [&](int64_t sb) {
    swiglu_fwd_span(g, u, o, sb * blk, std::min(n, sb * blk + blk), scalar);
  });
}

template <typename T>
void swiglu_bwd_impl(const T* d, const T* g, const T* u, T* dg, T* du, int64_t n, bool scalar) {
  const int64_t blk = 1 << 14;
  parallel_work((n + blk - 1) / blk, 1, n, [&](int64_t sb) {
    const int64_t s = sb * blk;
    const int64_t e = std::min(n, s + blk);
    int64_t i = s;
#if QRU_AVX2
    if (!scalar) {
      const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
      for (; i + 8 <= e; i += 8) {
        __m256 gv = load8(g + i), dv = load8(d + i);
        __m256 sg = _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(zero, gv))));
        __m256 sl = _mm256_mul_ps(gv, sg);
        __m256 ds = _mm256_mul_ps(sg, _mm256_add_ps(one, _mm256_mul_ps(gv, _mm256_sub_ps(one, sg))));
        store8(dg + i, _mm256_mul_ps(_mm256_mul_ps(dv, load8(u + i)), ds));
        store8(du + i, _mm256_mul_ps(dv, rnd8(du, sl)));
      }
    }
#endif
    for (; i < e; ++i) {
      const float gv = ld(g, i), dv = ld(d, i);
      const float sg = 1.0f / (1.0f + std::exp(-gv));
      st(dg, i, dv * ld(u, i) * (sg * (1.0f + gv * (1.0f - sg))));
      st(du, i, dv * rnd(du, gv * sg));
    }
  });
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && a.is_contiguous() && b.is_contiguous(),
              "swiglu: ", what, " must be contiguous with the same shape and dtype");
}

at::Tensor swiglu_fwd(at::Tensor g, at::Tensor u, bool scalar) {
  const int dt = code(g, "gate");
  check_same(g, u, "gate and up");
  at::Tensor o = at::empty_like(g);
  if (dt == F32)
    swiglu_fwd_impl<float>(ptr<float>(g), ptr<float>(u), ptr<float>(o), g.numel(), scalar);
  else
    swiglu_fwd_impl<uint16_t>(ptr<uint16_t>(g), ptr<uint16_t>(u), ptr<uint16_t>(o), g.numel(), scalar);
  return o;
}

// x (N, 2I) with unit last stride (the gate and up projections side by side, e.g. one fused GEMM's
// output) -> (N, I) contiguous: silu(x[:, :I]) * x[:, I:], the same values as swiglu_fwd on the halves.
at::Tensor swiglu_halves_fwd(at::Tensor x, bool scalar) {
  const int dt = code(x, "gate_up");
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0 && x.stride(1) == 1,
              "swiglu_halves: gate_up must be (N, 2I) with unit last stride");
  const int64_t N = x.size(0), I = x.size(1) / 2, rs = x.stride(0);
  at::Tensor o = at::empty({N, I}, x.options());
  parallel_work(N, std::max<int64_t>(1, kChunkValues / std::max<int64_t>(1, I)), N * I, [&](int64_t r) {
    if (dt == F32) {
      const float* g = ptr<float>(x) + r * rs;
      swiglu_fwd_span(g, g + I, ptr<float>(o) + r * I, 0, I, scalar);
    } else {
      const uint16_t* g = ptr<uint16_t>(x) + r * rs;
      swiglu_fwd_span(g, g + I, ptr<uint16_t>(o) + r * I, 0, I, scalar);
    }
  });
  return o;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(at::Tensor d, at::Tensor g, at::Tensor u, bool scalar) {
  const int dt = code(g, "gate");
  check_same(g, u, "gate and up");
  check_same(g, d, "grad and gate");
  at::Tensor dg = at::empty_like(g), du = at::empty_like(u);
  if (dt == F32)
    swiglu_bwd_impl<float>(ptr<float>(d), ptr<float>(g), ptr<float>(u), ptr<float>(dg), ptr<float>(du), g.numel(),
                           scalar);
  else
    swiglu_bwd_impl<uint16_t>(ptr<uint16_t>(d), ptr<uint16_t>(g), ptr<uint16_t>(u), ptr<uint16_t>(dg),
                              ptr<uint16_t>(du), g.numel(), scalar);
  return {dg, du};
}

// ------------------------------------------------------------------------- decode attention
// One query position per (batch, head) against S cached keys/values, read in their own dtype:
//   s_j = scale * q . k_j (fp32), masked -> -inf;  p = softmax(s);  out = sum_j p_j v_j (fp32, rounded once).
// q (B, H, D), k / v (B, KV, S, D) with unit last stride (cache views), head h reads kv head h / (H/KV).
//
// Vector path (AVX2, D % 8 == 0): one task per (batch, kv head) serves its G query heads, so the
// keys and values are streamed from memory once (then from L1/L2 for the other heads); scores
// for 8 keys at a time with 8 accumulators reduced together (hsum8x8); exp over the score row
// in 8 lanes (exp256, within 2 ulp of expf); the weighted sum of values with the output row in
// registers, 32 dims at a time. The scalar path: one (batch, head) at a time, plain loops.
// Scores of masked keys (mrow[j] == 0) set to -inf; returns the largest score (-inf when all are masked).
inline float mask_and_max(float* s, int64_t S, const uint8_t* mrow) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < S; ++j) {
    if (mrow && !mrow[j]) s[j] = -std::numeric_limits<float>::infinity();
    mx = std::max(mx, s[j]);
  }
  return mx;
}

#if QRU_AVX2
// {sum(v[0]), ..., sum(v[7])}
inline __m256 hsum8x8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(v[0], v[1]), b = _mm256_hadd_ps(v[2], v[3]);
  const __m256 c = _mm256_hadd_ps(v[4], v[5]), d = _mm256_hadd_ps(v[6], v[7]);
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);  // lanes: 0..3 | 0..3 halves
  return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

template <typename T>
void decode_attn_head_vec(const float* qf, const T* kp, int64_t ks, const T* vp, int64_t vs, const uint8_t* mrow,
                          int64_t S, int64_t D, float scale, float* s, T* op) {
  int64_t j = 0;
  for (; j + 8 <= S; j += 8) {
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(qf + d);
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(qv, load8(kp + (j + i) * ks + d), acc[i]);
    }
    _mm256_storeu_ps(s + j, _mm256_mul_ps(hsum8x8(acc), _mm256_set1_ps(scale)));
  }
  for (; j < S; ++j) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qf + d), load8(kp + j * ks + d), a);
    s[j] = hsum(a) * scale;
  }
  const float mx = mask_and_max(s, S, mrow);
  // exp(s - mx); masked (-inf) -> 0. All masked: mx = -inf, every p 0, output 0/0 as the scalar path.
  const __m256 m8 = _mm256_set1_ps(mx);
  __m256 l8 = _mm256_setzero_ps();
  for (j = 0; j + 8 <= S; j += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), m8));
    _mm256_storeu_ps(s + j, e);
    l8 = _mm256_add_ps(l8, e);
  }
  float l = hsum(l8);
  for (; j < S; ++j) { s[j] = std::exp(s[j] - mx); l += s[j]; }
  const float inv = 1.0f / l;
  for (int64_t d0 = 0; d0 < D; d0 += 32) {
    const int nd = int(std::min<int64_t>(32, D - d0)) / 8;  // 1..4 vectors of 8
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (j = 0; j < S; ++j) {
      const float pj = s[j];
      if (pj == 0.0f) continue;  // masked or underflowed: adds nothing (and never reads padding's values)
      const __m256 pv = _mm256_set1_ps(pj);
      const T* vr = vp + j * vs + d0;
      for (int i = 0; i < 4; ++i)
        if (i < nd) a[i] = _mm256_fmadd_ps(pv, load8(vr + 8 * i), a[i]);
    }
    for (int i = 0; i < nd; ++i) store8(op + d0 + 8 * i, _mm256_mul_ps(a[i], _mm256_set1_ps(inv)));
  }
}
#endif

#if QRU_AVX512
// The AVX-512 path (D % 16 == 0): as decode_attn_head_vec with 16 lanes, 16 keys per score block.
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(uint16_t* p, __m512 v) {
  store8(p, _mm512_castps512_ps256(v));
  store8(p + 8, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

template <typename T>
void decode_attn_head_512(const float* qf, const T* kp, int64_t ks, const T* vp, int64_t vs, const uint8_t* mrow,
                          int64_t S, int64_t D, float scale, float* s, T* op) {
  const __m512 sc = _mm512_set1_ps(scale);
  int64_t j = 0;
  const int64_t vrow = D * int64_t(sizeof(T));  // bytes of a value row
  for (; j + 16 <= S; j += 16) {
    for (int i = 0; i < 16; ++i)  // the value rows of this block: in cache by the weighted sum
      for (int64_t o = 0; o < vrow; o += 64)
        _mm_prefetch(reinterpret_cast<const char*>(vp + (j + i) * vs) + o, _MM_HINT_T0);
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 qv = _mm512_loadu_ps(qf + d);
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(qv, wide16(kp + (j + i) * ks + d), acc[i]);
    }
    _mm512_storeu_ps(s + j, _mm512_mul_ps(reduce16(acc), sc));
  }
  for (; j < S; ++j) {
    __m512 a = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(qf + d), wide16(kp + j * ks + d), a);
    s[j] = _mm512_reduce_add_ps(a) * scale;
  }
  const float mx = mask_and_max(s, S, mrow);
  const __m512 m16 = _mm512_set1_ps(mx);
  __m512 l16 = _mm512_setzero_ps();
  for (j = 0; j + 16 <= S; j += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), m16));
    _mm512_storeu_ps(s + j, e);
    l16 = _mm512_add_ps(l16, e);
  }
  float l = _mm512_reduce_add_ps(l16);
  for (; j < S; ++j) { s[j] = std::exp(s[j] - mx); l += s[j]; }
  const __m512 inv = _mm512_set1_ps(1.0f / l);
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    const int nd = int(std::min<int64_t>(64, D - d0)) / 16;  // 1..4 vectors of 16
    __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (j = 0; j < S; ++j) {
      const float pj = s[j];
      if (pj == 0.0f) continue;  // masked or underflowed: adds nothing (and never reads padding's values)
      const __m512 pv = _mm512_set1_ps(pj);
      const T* vr = vp + j * vs + d0;
      for (int i = 0; i < 4; ++i)
        if (i < nd) a[i] = _mm512_fmadd_ps(pv, wide16(vr + 16 * i), a[i]);
    }
    for (int i = 0; i < nd; ++i) store16(op + d0 + 16 * i, _mm512_mul_ps(a[i], inv));
  }
}
#endif

template <typename T>
void decode_attn_impl(const T* q, int64_t qb, int64_t qh, const T* k, int64_t kb, int64_t kh, int64_t ks,
                      const T* v, int64_t vb, int64_t vh, int64_t vs, const uint8_t* mask, T* out, int64_t B,
                      int64_t H, int64_t KV, int64_t S, int64_t D, float scale) {
  const int64_t G = H / KV;
  // The vector paths: one task per (batch, kv head) runs `head` for its G query heads.
  [[maybe_unused]] auto per_kv_head = [&](auto head) {
    struct TagSV; struct TagQV;
    parallel_work(B * KV, 1, B * H * S * D, [&](int64_t bg) {
      float* s = scratch<TagSV>(S);
      float* qf = scratch<TagQV>(D);
      const int64_t b = bg / KV, g = bg % KV;
      for (int64_t h = g * G; h < (g + 1) * G; ++h) {
        const T* qp = q + b * qb + h * qh;
        for (int64_t d = 0; d < D; ++d) qf[d] = ld(qp, d);
        head(qf, k + b * kb + g * kh, ks, v + b * vb + g * vh, vs, mask ? mask + b * S : nullptr, S, D, scale, s,
             out + (b * H + h) * D);
      }
    });
  };
#if QRU_AVX512
  if (D % 16 == 0) {
    per_kv_head([](auto... a) { decode_attn_head_512(a...); });
    return;
  }
#endif
#if QRU_AVX2
  if (D % 8 == 0) {
    per_kv_head([](auto... a) { decode_attn_head_vec(a...); });
    return;
  }
#endif
  struct TagS; struct TagA; struct TagQ;
  parallel_work(B * H, 1, B * H * S * D, [&](int64_t bh) {
    float* s = scratch<TagS>(S);
    float* acc = scratch<TagA>(D);
    float* qf = scratch<TagQ>(D);
    {
      const int64_t b = bh / H, h = bh % H, g = h / G;
      const T* qp = q + b * qb + h * qh;
      const T* kp = k + b * kb + g * kh;
      const T* vp = v + b * vb + g * vh;
      const uint8_t* mrow = mask ? mask + b * S : nullptr;
      for (int64_t d = 0; d < D; ++d) qf[d] = ld(qp, d);
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < S; ++j) {
        if (mrow && !mrow[j]) { s[j] = -std::numeric_limits<float>::infinity(); continue; }
        const T* kr = kp + j * ks;
        float dot = 0.0f;
        for (int64_t d = 0; d < D; ++d) dot += qf[d] * ld(kr, d);
        s[j] = dot * scale;
        mx = std::max(mx, s[j]);
      }
      float l = 0.0f;
      for (int64_t j = 0; j < S; ++j) { s[j] = std::exp(s[j] - mx); l += s[j]; }
      std::fill(acc, acc + D, 0.0f);
      for (int64_t j = 0; j < S; ++j) {
        const float pj = s[j];
        if (pj == 0.0f) continue;
        const T* vr = vp + j * vs;
        for (int64_t d = 0; d < D; ++d) acc[d] += pj * ld(vr, d);
      }
      T* op = out + bh * D;
      const float inv = 1.0f / l;
      for (int64_t d = 0; d < D; ++d) st(op, d, acc[d] * inv);
    }
  });
}

at::Tensor decode_attn(at::Tensor q, at::Tensor k, at::Tensor v, c10::optional<at::Tensor> mask, double scale) {
  const int dt = code(q, "q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "decode_attn: q, k, v dtypes differ");
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k.dim() == 4 && v.dim() == 4, "decode_attn: q (B,H,1,D), k/v (B,KV,S,D)");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KV = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(3) == D && v.size(3) == D && v.size(1) == KV &&
                  v.size(2) == S && KV > 0 && H % KV == 0, "decode_attn: shapes do not match");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "decode_attn: unit last stride needed");
  const uint8_t* mp = nullptr;
  at::Tensor m;
  if (mask.has_value()) {
    m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == B && m.size(1) == S && m.is_contiguous(),
                "decode_attn: mask must be a contiguous bool (B, S)");
    mp = reinterpret_cast<const uint8_t*>(m.data_ptr());
  }
  at::Tensor out = at::empty({B, H, 1, D}, q.options());
  if (dt == F32)
    decode_attn_impl(ptr<float>(q), q.stride(0), q.stride(1), ptr<float>(k), k.stride(0), k.stride(1), k.stride(2),
                     ptr<float>(v), v.stride(0), v.stride(1), v.stride(2), mp, ptr<float>(out), B, H, KV, S, D,
                     float(scale));
  else
    decode_attn_impl(ptr<uint16_t>(q), q.stride(0), q.stride(1), ptr<uint16_t>(k), k.stride(0), k.stride(1),
                     k.stride(2), ptr<uint16_t>(v), v.stride(0), v.stride(1), v.stride(2), mp, ptr<uint16_t>(out), B, H,
                     KV, S, D, float(scale));
  return out;
}

// ------------------------------------------------------------------------------------ argmax
// Per row: the max over 8 lanes (NaNs noted on the side), then the first index holding it. A row with a
// NaN takes the scalar loop, which returns the first NaN as torch.argmax does.
template <typename T>
int64_t argmax_row_scalar(const T* x, int64_t V) {
  int64_t best = 0;
  float bv = ld(x, 0);
  if (std::isnan(bv)) return 0;
  for (int64_t j = 1; j < V; ++j) {
    const float v = ld(x, j);
    if (std::isnan(v)) return j;
    if (v > bv) { bv = v; best = j; }
  }
  return best;
}

template <typename T>
int64_t argmax_row(const T* x, int64_t V, bool scalar) {
#if QRU_AVX2
  if (!scalar && V >= 8) {
    __m256 mx = load8(x), nan = _mm256_cmp_ps(mx, mx, _CMP_UNORD_Q);
    int64_t j = 8;
    for (; j + 8 <= V; j += 8) {
      const __m256 v = load8(x + j);
      mx = _mm256_max_ps(mx, v);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float m = hmax(mx);
    for (int64_t t = j; t < V; ++t) {
      const float v = ld(x, t);
      if (std::isnan(v)) return argmax_row_scalar(x, V);
      m = std::max(m, v);
    }
    if (_mm256_movemask_ps(nan)) return argmax_row_scalar(x, V);
    const __m256 m8 = _mm256_set1_ps(m);
    for (j = 0; j + 8 <= V; j += 8) {
      const int hit = _mm256_movemask_ps(_mm256_cmp_ps(load8(x + j), m8, _CMP_EQ_OQ));
      if (hit) return j + __builtin_ctz(unsigned(hit));
    }
    for (; j < V; ++j)
      if (ld(x, j) == m) return j;
    return 0;  // not reached
  }
#endif
  return argmax_row_scalar(x, V);
}

at::Tensor argmax_rows(at::Tensor x, bool scalar) {
  const int dt = code(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0 && x.stride(1) == 1,
              "argmax_rows: x must be (N, V), V > 0, unit last stride");
  const int64_t N = x.size(0), V = x.size(1), rs = x.stride(0);
  at::Tensor out = at::empty({N}, x.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  parallel_work(N, 1, N * V, [&](int64_t r) {
    o[r] = dt == F32 ? argmax_row(ptr<float>(x) + r * rs, V, scalar) : argmax_row(ptr<uint16_t>(x) + r * rs, V, scalar);
  });
  return out;
}

}  // namespace


TORCH_LIBRARY(qru_llama_ops, m) {
  m.def("rmsnorm_fwd(Tensor x, Tensor w, float eps, bool scalar=False) -> (Tensor, Tensor)", &rmsnorm_fwd);
  m.def("rmsnorm_bwd(Tensor dy, Tensor x, Tensor w, Tensor rstd, bool scalar=False) -> (Tensor, Tensor)", &rmsnorm_bwd);
  m.def("rope_fwd(Tensor x, Tensor cos, Tensor sin, ScalarType out_dtype) -> Tensor", &rope_fwd);
  m.def("rope_bwd(Tensor grad, Tensor cos, Tensor sin, ScalarType out_dtype) -> Tensor", &rope_bwd);
  m.def("swiglu_fwd(Tensor gate, Tensor up, bool scalar=False) -> Tensor", &swiglu_fwd);
  m.def("swiglu_halves_fwd(Tensor gate_up, bool scalar=False) -> Tensor", &swiglu_halves_fwd);
  m.def("swiglu_bwd(Tensor grad, Tensor gate, Tensor up, bool scalar=False) -> (Tensor, Tensor)", &swiglu_bwd);
  m.def("decode_attn(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor", &decode_attn);
  m.def("argmax_rows(Tensor x, bool scalar=False) -> Tensor", &argmax_rows);
}
