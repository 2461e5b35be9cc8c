// Attention for a decoding step (one query per row) with grouped key/value heads, AVX-512.
//
// Why our own: torch's CPU kernel for this case is its flash-attention kernel, built for long
// queries, which here is a chain of MKL sgemv calls of a few microseconds each: ~200 us a layer
// for 8 rows of ~150 positions on one thread (bench/findings.md). Here each (row, key/value head)
// is one task on the kernels' workers (worker_pool.h): one pass over the row's keys scores all
// the query heads that share them, a softmax in float32, one pass over the values.
//
// q [rows, heads, 1, dim] contiguous float32; k, v [rows, kv_heads, L, dim] float32 with the last
// dimension contiguous (views of the slot cache: any other strides); mask: none, or bool
// [rows, 1, 1, L] (true: attend; any strides). Returns [rows, 1, heads, dim] float32, the layout
// transformers' attention functions return. dim must be a multiple of 16.
#pragma once

#include <torch/extension.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "worker_pool.h"

namespace decode_attention {

// e^x for 16 floats with x <= 0 (scores minus their maximum), to ~1 ulp: x = n ln2 + r,
// e^x = 2^n e^r with Cephes' polynomial for e^r on [-ln2/2, ln2/2].
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-103.9f));  // e^x is 0 in float32 below this
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

struct Shape {
  int64_t heads, groups, length, dim;
  int64_t q_row, k_row, k_head, k_pos, v_row, v_head, v_pos, m_row, m_pos;
  float scale;
};

// One row's attention for one key/value head and its `groups` query heads; C = dim / 16 when it
// is one of the common sizes (the head's vectors then stay in registers), else 0 (any multiple).
template <int C>
void attend(const float* q, const float* k, const float* v, const bool* mask, float* out, const Shape& s,
            int64_t row, int64_t kv_head, std::vector<float>& scores) {
  const int64_t G = s.groups, L = s.length, D = s.dim;
  const int64_t chunks = C > 0 ? C : D / 16;
  const int64_t padded = (L + 15) / 16 * 16;
  scores.assign(G * padded, -std::numeric_limits<float>::infinity());
  const float* qh = q + row * s.q_row + kv_head * G * D;
  const float* kh = k + row * s.k_row + kv_head * s.k_head;
  const float* vh = v + row * s.v_row + kv_head * s.v_head;
  for (int64_t l = 0; l < L; ++l) {
    if (mask != nullptr && !mask[row * s.m_row + l * s.m_pos]) continue;
    const float* kl = kh + l * s.k_pos;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = qh + g * D;
      __m512 dot = _mm512_mul_ps(_mm512_loadu_ps(qg), _mm512_loadu_ps(kl));
      for (int64_t c = 1; c < chunks; ++c)
        dot = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * c), _mm512_loadu_ps(kl + 16 * c), dot);
      scores[g * padded + l] = _mm512_reduce_add_ps(dot) * s.scale;
    }
  }
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  float* out_row = out + row * s.heads * D + kv_head * G * D;  // out [rows, 1, heads, dim]
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores.data() + g * padded;
    __m512 top = minus_inf;
    for (int64_t l = 0; l < padded; l += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(sg + l));
    const float most = _mm512_reduce_max_ps(top);
    float* og = out_row + g * D;
    if (most == -std::numeric_limits<float>::infinity()) {  // nothing to attend to: zeros
      std::fill(og, og + D, 0.f);
      continue;
    }
    const __m512 shift = _mm512_set1_ps(most);
    __m512 total = _mm512_setzero_ps();
    for (int64_t l = 0; l < padded; l += 16) {
      const __m512 x = _mm512_loadu_ps(sg + l);
      const __mmask16 kept = _mm512_cmp_ps_mask(x, minus_inf, _CMP_NEQ_OQ);  // masked and padding: exactly 0
      const __m512 e = _mm512_maskz_mov_ps(kept, exp16(_mm512_sub_ps(x, shift)));
      _mm512_storeu_ps(sg + l, e);
      total = _mm512_add_ps(total, e);
    }
    const __m512 inverse = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total));
    // The weighted sum of the values, in registers for the common head sizes.
    __m512 acc[C > 0 ? C : 16];
    for (int64_t done = 0; done < chunks; done += 16) {
      const int64_t part = std::min<int64_t>(16, chunks - done);
      for (int64_t c = 0; c < part; ++c) acc[c] = _mm512_setzero_ps();
      for (int64_t l = 0; l < L; ++l) {
        const float p = sg[l];
        if (p == 0.f) continue;
        const __m512 weight = _mm512_set1_ps(p);
        const float* vl = vh + l * s.v_pos + 16 * done;
        for (int64_t c = 0; c < part; ++c) acc[c] = _mm512_fmadd_ps(weight, _mm512_loadu_ps(vl + 16 * c), acc[c]);
      }
      for (int64_t c = 0; c < part; ++c) _mm512_storeu_ps(og + 16 * (done + c), _mm512_mul_ps(acc[c], inverse));
    }
  }
}

using Attend = void (*)(const float*, const float*, const float*, const bool*, float*, const Shape&, int64_t,
                        int64_t, std::vector<float>&);

inline Attend attend_for(int64_t dim) {
  switch (dim / 16) {
    case 4: return attend<4>;    // head size 64 (the default model, Llama 3.2 1B's 64, ...)
    case 8: return attend<8>;    // 128 (Llama, Mistral, Qwen)
    case 16: return attend<16>;  // 256 (Gemma)
    default: return attend<0>;
  }
}

inline torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                      const c10::optional<torch::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && q.scalar_type() == torch::kFloat && q.is_contiguous(),
              "decode_attention: q must be contiguous float32 [rows, heads, 1, dim]");
  for (const auto* t : {&k, &v}) {
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == torch::kFloat && t->stride(3) == 1 && t->size(0) == q.size(0) &&
                    t->size(3) == q.size(3) && t->sizes() == k.sizes(),
                "decode_attention: k and v must be float32 [rows, kv_heads, L, dim], last dimension contiguous");
  }
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(3), kv_heads = k.size(1), length = k.size(2);
  TORCH_CHECK(dim % 16 == 0 && kv_heads > 0 && heads % kv_heads == 0,
              "decode_attention: dim must be a multiple of 16 and heads a multiple of kv_heads");
  const bool* mask_data = nullptr;
  Shape s{heads, heads / kv_heads, length, dim, q.stride(0), k.stride(0), k.stride(1), k.stride(2),
          v.stride(0), v.stride(1), v.stride(2), 0, 0, static_cast<float>(scale)};
  if (mask.has_value()) {
    const auto& m = *mask;
    TORCH_CHECK(m.dim() == 4 && m.scalar_type() == torch::kBool && m.size(0) == rows && m.size(3) == length &&
                    m.size(1) == 1 && m.size(2) == 1,
                "decode_attention: mask must be bool [rows, 1, 1, L]");
    mask_data = m.data_ptr<bool>();
    s.m_row = m.stride(0);
    s.m_pos = m.stride(3);
  }
  auto out = torch::empty({rows, 1, heads, dim}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const Attend run = attend_for(dim);
  worker_pool::parallel_for(0, rows * kv_heads, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) run(qp, kp, vp, mask_data, op, s, task / kv_heads, task % kv_heads, scores);
  });
  return out;
}

}  // namespace decode_attention
