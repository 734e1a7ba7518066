// Causal self-attention over whole sequences (prefill, scoring) for CPU inference
// (qru.kernels.causal_attention):
//
//   causal_attn(q, k, v, scale, scalar)   out[b,h,i] = sum_{j<=i} softmax_j(scale q_i . k_j) v_j
//
// q (B, H, T, D), k / v (B, KV, T, D) with any strides and a unit last stride, H a multiple of KV
// (query head h reads kv head h / (H/KV)); float32 or bfloat16, all math in fp32. The result is
// (B, H, T, D) over (B, T, H, D) memory, so the caller's transpose(1, 2).reshape(B, T, H*D) is a view.
//
// Vector path (AVX-512, D % 16 == 0): one task per (batch, kv head). The task widens its keys once
// into a transposed fp32 block Kt (D, T16) and its values into V (T16, D) (T16: T rounded up to 16,
// zero filled), then, for each query head of the group, runs blocks of 8 query rows (pre-scaled)
// against 16-key blocks up to the diagonal with an online softmax (flash attention):
//   s (8 x 16)  = sum_d q[:, d] Kt[d, j:j+16]        8 registers, one broadcast FMA per row and d
//   m' = max(m, rowmax s),  p = exp(s - m'),  a = exp(m - m'),  l = a l + p (kept as 16 lanes)
//   O (8 x D)   = a O + p V[j:j+16]                   16 columns of O at a time, V rows shared by the rows
// and finally out = O / sum(l). Keys past a row's position are masked to -inf on the diagonal block.
// Scalar path (scalar=true, no AVX-512, or D % 16 != 0): per (batch, head, row), a two-pass softmax.
#include "qru_common.h"

#include <limits>

namespace {

using namespace qru;

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

struct Strides {
  int64_t b, h, t;  // element strides over batch, head, position (the last is 1)
  explicit Strides(const at::Tensor& x) : b(x.stride(0)), h(x.stride(1)), t(x.stride(2)) {}
};

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename T>
void scalar_impl(const T* q, Strides qs, const T* k, Strides ks, const T* v, Strides vs, T* out, int64_t B,
                 int64_t H, int64_t KV, int64_t Tn, int64_t D, float scale) {
  const int64_t G = H / KV;
  struct TagS; struct TagA;
  parallel_work(B * H, 1, B * H * Tn * Tn * D / 2, [&](int64_t bh) {
    float* s = scratch<TagS>(Tn);
    float* acc = scratch<TagA>(D);
    {
      const int64_t b = bh / H, h = bh % H, g = h / G;
      const T* kp = k + b * ks.b + g * ks.h;
      const T* vp = v + b * vs.b + g * vs.h;
      for (int64_t i = 0; i < Tn; ++i) {
        const T* qr = q + b * qs.b + h * qs.h + i * qs.t;
        float mx = kNegInf;
        for (int64_t j = 0; j <= i; ++j) {
          float dot = 0.0f;
          for (int64_t d = 0; d < D; ++d) dot += ld(qr, d) * ld(kp + j * ks.t, d);
          s[j] = dot * scale;
          mx = std::max(mx, s[j]);
        }
        float l = 0.0f;
        for (int64_t j = 0; j <= i; ++j) { s[j] = std::exp(s[j] - mx); l += s[j]; }
        std::fill(acc, acc + D, 0.0f);
        for (int64_t j = 0; j <= i; ++j)
          for (int64_t d = 0; d < D; ++d) acc[d] += s[j] * ld(vp + j * vs.t, d);
        T* orow = out + ((b * Tn + i) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) st(orow, d, acc[d] / l);
      }
    }
  });
}

#if QRU_AVX512
constexpr int kRows = 8;   // query rows per block (score registers)
constexpr int kKeys = 16;  // keys per block (one vector)

// One query head against its kv head's widened keys Kt (D, Tp) and values V (Tp, D).
template <typename T>
void head_vec(const T* qh, int64_t qt, const float* Kt, const float* V, int64_t Tp, int64_t Tn, int64_t D,
              float scale, T* oh, int64_t ot, float* qf, float* O, float* P) {
  for (int64_t i0 = 0; i0 < Tn; i0 += kRows) {
    const int64_t nr = std::min<int64_t>(kRows, Tn - i0);
    for (int r = 0; r < kRows; ++r)
      for (int64_t d = 0; d < D; ++d) qf[r * D + d] = r < nr ? ld(qh + (i0 + r) * qt, d) * scale : 0.0f;
    std::fill(O, O + kRows * D, 0.0f);
    float m[kRows], alpha[kRows];
    __m512 l[kRows];
    for (int r = 0; r < kRows; ++r) { m[r] = kNegInf; l[r] = _mm512_setzero_ps(); }
    const int64_t last = (i0 + nr - 1) / kKeys * kKeys;  // the block holding the last real row's position
    for (int64_t jb = 0; jb <= last; jb += kKeys) {
      __m512 s[kRows];
      for (int r = 0; r < kRows; ++r) s[r] = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; ++d) {
        const __m512 kv = _mm512_loadu_ps(Kt + d * Tp + jb);
        for (int r = 0; r < kRows; ++r) s[r] = _mm512_fmadd_ps(_mm512_set1_ps(qf[r * D + d]), kv, s[r]);
      }
      if (jb + kKeys - 1 > i0) {  // the diagonal block: row r sees keys jb .. i0 + r (at least one, as 8 | 16)
        for (int r = 0; r < kRows; ++r) {
          const int64_t cnt = i0 + r - jb + 1;
          if (cnt < kKeys) s[r] = _mm512_mask_mov_ps(_mm512_set1_ps(kNegInf), __mmask16((1u << cnt) - 1), s[r]);
        }
      }
      for (int r = 0; r < kRows; ++r) {
        const float mn = std::max(m[r], _mm512_reduce_max_ps(s[r]));
        alpha[r] = std::exp(m[r] - mn);  // 0 on the first block (m = -inf), 1 when the max holds
        m[r] = mn;
        const __m512 p = exp512(_mm512_sub_ps(s[r], _mm512_set1_ps(mn)));
        l[r] = _mm512_fmadd_ps(l[r], _mm512_set1_ps(alpha[r]), p);
        _mm512_storeu_ps(P + r * kKeys, p);
      }
      const float* vb = V + jb * D;
      for (int64_t c = 0; c < D; c += 16) {
        __m512 o[kRows];
        for (int r = 0; r < kRows; ++r) o[r] = _mm512_mul_ps(_mm512_loadu_ps(O + r * D + c), _mm512_set1_ps(alpha[r]));
        for (int j = 0; j < kKeys; ++j) {
          const __m512 vv = _mm512_loadu_ps(vb + j * D + c);
          for (int r = 0; r < kRows; ++r) o[r] = _mm512_fmadd_ps(_mm512_set1_ps(P[r * kKeys + j]), vv, o[r]);
        }
        for (int r = 0; r < kRows; ++r) _mm512_storeu_ps(O + r * D + c, o[r]);
      }
    }
    for (int r = 0; r < nr; ++r) {
      const float inv = 1.0f / _mm512_reduce_add_ps(l[r]);
      T* orow = oh + (i0 + r) * ot;
      for (int64_t d = 0; d < D; ++d) st(orow, d, O[r * D + d] * inv);
    }
  }
}

template <typename T>
void vec_impl(const T* q, Strides qs, const T* k, Strides ks, const T* v, Strides vs, T* out, int64_t B, int64_t H,
              int64_t KV, int64_t Tn, int64_t D, float scale) {
  const int64_t G = H / KV, Tp = (Tn + kKeys - 1) / kKeys * kKeys;
  struct TagK; struct TagV; struct TagQ; struct TagO; struct TagP;
  parallel_work(B * KV, 1, B * H * Tn * Tn * D / 2, [&](int64_t bg) {
    float* Kt = scratch<TagK>(D * Tp);
    float* V = scratch<TagV>(Tp * D);
    float* qf = scratch<TagQ>(kRows * D);
    float* O = scratch<TagO>(kRows * D);
    float* P = scratch<TagP>(kRows * kKeys);
    {
      const int64_t b = bg / KV, g = bg % KV;
      const T* kp = k + b * ks.b + g * ks.h;
      const T* vp = v + b * vs.b + g * vs.h;
      for (int64_t j = 0; j < Tp; ++j)
        for (int64_t d = 0; d < D; ++d) {
          Kt[d * Tp + j] = j < Tn ? ld(kp + j * ks.t, d) : 0.0f;
          V[j * D + d] = j < Tn ? ld(vp + j * vs.t, d) : 0.0f;
        }
      for (int64_t h = g * G; h < (g + 1) * G; ++h)
        head_vec(q + b * qs.b + h * qs.h, qs.t, Kt, V, Tp, Tn, D, scale, out + (b * Tn * H + h) * D, H * D, qf, O,
                 P);
    }
  });
}
#endif

bool vector_path(int64_t D) { return QRU_AVX512 && D % 16 == 0; }

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, int64_t B, int64_t H,
         int64_t KV, int64_t Tn, int64_t D, float scale, bool scalar) {
#if QRU_AVX512
  if (!scalar && vector_path(D)) {
    vec_impl(ptr<T>(q), Strides(q), ptr<T>(k), Strides(k), ptr<T>(v), Strides(v), ptr<T>(out), B, H, KV, Tn, D, scale);
    return;
  }
#endif
  scalar_impl(ptr<T>(q), Strides(q), ptr<T>(k), Strides(k), ptr<T>(v), Strides(v), ptr<T>(out), B, H, KV, Tn, D,
              scale);
}

at::Tensor causal_attn(at::Tensor q, at::Tensor k, at::Tensor v, double scale, bool scalar) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "causal_attn: CPU tensors needed");
  const int dt = dtype_code(q.scalar_type(), "causal_attn: q");
  TORCH_CHECK(dt != F16, "causal_attn: q must be float32 or bfloat16, got float16");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "causal_attn: q, k, v dtypes differ");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "causal_attn: q (B,H,T,D), k/v (B,KV,T,D)");
  const int64_t B = q.size(0), H = q.size(1), Tn = q.size(2), D = q.size(3), KV = k.size(1);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(2) == Tn && k.size(3) == D && KV > 0 && H % KV == 0,
              "causal_attn: shapes do not match: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "causal_attn: unit last stride needed");
  at::Tensor out = at::empty({B, Tn, H, D}, q.options());
  if (B * Tn * H * D == 0) return out.transpose(1, 2);
  if (dt == F32)
    run<float>(q, k, v, out, B, H, KV, Tn, D, float(scale), scalar);
  else
    run<uint16_t>(q, k, v, out, B, H, KV, Tn, D, float(scale), scalar);
  return out.transpose(1, 2);
}

bool causal_attn_vectorized(int64_t D) { return vector_path(D); }

}  // namespace

TORCH_LIBRARY(qru_attention, m) {
  m.def("causal_attn(Tensor q, Tensor k, Tensor v, float scale, bool scalar=False) -> Tensor", &causal_attn);
  m.def("causal_attn_vectorized(int head_dim) -> bool", &causal_attn_vectorized);
}
