// The 32-value GGUF block math shared by quant_gguf.cpp (codes packed into llama.cpp's block
// structs) and fake_quant.cpp (codes turned straight back into values): each block's scale(s) and
// integer codes, with ggml-quants.c's reference arithmetic (= gguf.quants), every fp32 operation
// in source order. Include it after switching FMA contraction off, as both files do.
#pragma once
#include "qru_common.h"

namespace qru::gguf {

enum Kind { Q8_0 = 0, Q4_0 = 1, Q4_1 = 2, Q5_0 = 3, Q5_1 = 4, Q4_K = 5, MXFP4 = 6 };
constexpr int8_t kMxfp4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// C roundf, as numpy's np_roundf computes it.
inline float roundf_away(float v) {
  const float a = std::fabs(v);
  const float f = std::floor(a);
  const float b = f + std::floor(2.0f * (a - f));
  return std::copysign(b, v);  // branchless; a zero's sign is lost in the int8 anyway
}

// Half of the E8M0 scale 2^(e - 127): the unit of mxfp4's doubled value table.
inline float e8m0_half(int e) { return u2f(e < 2 ? (0x00200000u << e) : (uint32_t(e - 1) << 23)); }

// q8_0: d = amax / 127 (returned, before its fp16 rounding), codes round(x / d) in [-127, 127].
inline float q8_0_codes(const float* x, int* q) {
  float amax = 0.0f;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  for (int j = 0; j < 32; ++j) q[j] = int(int8_t(int(roundf_away(x[j] * id))));
  return d;
}

// q4_0 / q5_0: the first element of largest |x| sets d = max / -half (returned); codes in [0, top],
// the value being d * (code - half).
inline float q_0_codes(const float* x, bool five, int* q) {
  int imax = 0;
  float amax = std::fabs(x[0]);
  for (int j = 1; j < 32; ++j)
    if (std::fabs(x[j]) > amax) { amax = std::fabs(x[j]); imax = j; }
  const float half = five ? 16.0f : 8.0f;
  const int top = five ? 31 : 15;
  const float d = x[imax] / -half;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  for (int j = 0; j < 32; ++j) {
    const float v = x[j] * id;
    const float t = std::trunc(v + (half + 0.5f));
    q[j] = int(std::min(std::max(t, 0.0f), float(top)));
  }
  return d;
}

// q4_1 / q5_1: d = (max - min) / top (returned), *min = min; codes in [0, top], the value d * code + min.
inline float q_1_codes(const float* x, bool five, float* min, int* q) {
  float mn = x[0], mx = x[0];
  for (int j = 1; j < 32; ++j) { mn = std::min(mn, x[j]); mx = std::max(mx, x[j]); }
  const int top = five ? 31 : 15;
  const float d = (mx - mn) / float(top);
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  for (int j = 0; j < 32; ++j) {
    const float v = (x[j] - mn) * id;
    const float t = std::trunc(v + 0.5f);
    q[j] = int(std::min(std::max(t, 0.0f), float(top)));
  }
  *min = mn;
  return d;
}

// mxfp4: the E8M0 exponent e (returned; thr[ex]: the fp32 bits from which amax's exponent ex rounds
// up), codes 0..15 indexing kMxfp4, nearest to x / e8m0_half(e) (the first on a tie).
inline int mxfp4_codes(const float* x, const int32_t* thr, int* q) {
  float amax = 0.0f;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
  int e = 0;
  if (amax > 0.0f) {
    const int32_t bits = int32_t(f2u(amax));
    const int ex = bits >> 23;
    const int fl = ex - 127 + (bits >= thr[ex] ? 1 : 0);
    e = std::min(std::max(fl + 125, 0), 255);
  }
  const float d = e8m0_half(e);
  for (int j = 0; j < 32; ++j) {
    int best = 0;
    float best_err = std::fabs(float(kMxfp4[0]) * d - x[j]);
    for (int k = 1; k < 16; ++k) {
      const float err = std::fabs(float(kMxfp4[k]) * d - x[j]);
      if (err < best_err) { best = k; best_err = err; }
    }
    q[j] = best;
  }
  return e;
}

}  // namespace qru::gguf
