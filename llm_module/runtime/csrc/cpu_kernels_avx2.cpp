// The AVX2 twin of cpu_kernels.cpp, for x86 CPUs without AVX-512 VNNI (most laptops, AMD before
// Zen 4, many cloud instances): the same functions, packed layouts, input quantization and
// results (the int32 dot products are exact in both; only the fp32 rounding order may differ).
//
// Built by setup.py into llm_module/runtime/_cpu_kernels_avx2*.so with -mavx2 -mfma -mf16c:
// int4_kernel.py checks those flags before importing it and prefers the AVX-512 build.
//
// No VNNI here: `vpmaddubsw` multiplies unsigned by signed bytes and adds pairs into int16 (with
// saturation), and `vpmaddwd` by ones adds those pairs into int32, which together are VNNI's
// four-product dot. int4 codes (0..15) times input codes (|q| <= 127) never saturate, so a
// group's pair sums add up in int16 before one `vpmaddwd` per group and row. int8 weights would (255 * 127 * 2 > 32767), so their bytes are read back as signed weights and
// multiplied as llama.cpp does: |w| times the input with w's sign (|w| <= 128: 2 * 128 * 127 <
// 32768), which needs no offset either. A 64-byte chunk of 16 columns is two registers of 8
// columns; each pass takes one half of a block for up to 4 rows, and the other half and the
// next rows read the block's weights again from L1.
#include <torch/extension.h>
#include <immintrin.h>

#include "worker_pool.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int kCols = 16;
constexpr int kHalf = 8;     // columns per register
constexpr int kGroup = 32;
constexpr int kMaxRows = 4;  // rows per pass: 4 rows x (int32 + float32 sums) fill the 16 registers
constexpr int kInt4GroupBytes = 256;
constexpr int kInt8GroupBytes = 512;

inline __m256i broadcast4(const int8_t* q) {
  int32_t four;
  std::memcpy(&four, q, sizeof(four));
  return _mm256_set1_epi32(four);
}

// Per int32 lane: the sum of 4 products of unsigned bytes u and signed bytes s (no pair may exceed int16).
inline __m256i dot4(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

// Per int16 lane: pairs of int4 codes times input codes, |sum| <= 2 * 15 * 127 = 3810, so a
// group's 8 of them add up in int16 (<= 30480) before one vpmaddwd widens them, as llama.cpp does.
inline __m256i pairs(__m256i u, __m256i s) { return _mm256_maddubs_epi16(u, s); }
inline __m256i widen(__m256i pair_sums) { return _mm256_madd_epi16(pair_sums, _mm256_set1_epi16(1)); }

template <int ROWS, int PARTS>
void int4_half(const int8_t* q, int64_t K, const float* d, const float* sums, const uint8_t* block,
               const uint16_t* block_scales, const uint16_t* block_mins, int64_t G, float* out, int64_t N,
               int half) {
  const __m256i low_nibble = _mm256_set1_epi8(0x0F);
  __m256 acc[ROWS];
  for (int m = 0; m < ROWS; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i dots[ROWS], fine[PARTS == 2 ? ROWS : 1];  // int16 pair sums until the group's end
    for (int m = 0; m < ROWS; ++m) dots[m] = _mm256_setzero_si256();
    for (int m = 0; m < (PARTS == 2 ? ROWS : 1); ++m) fine[m] = _mm256_setzero_si256();
    const int8_t* qg = q + g * kGroup;
    for (int c = 0; c < 4; ++c) {
      const __m256i bytes = _mm256_loadu_si256((const __m256i*)(block + g * kInt4GroupBytes + c * 64 + half * 32));
      const __m256i low = _mm256_and_si256(bytes, low_nibble);
      const __m256i high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_nibble);
      for (int m = 0; m < ROWS; ++m) {
        const int8_t* qm = qg + m * PARTS * K;
        dots[m] = _mm256_add_epi16(dots[m], pairs(low, broadcast4(qm + 4 * c)));
        dots[m] = _mm256_add_epi16(dots[m], pairs(high, broadcast4(qm + 16 + 4 * c)));
        if constexpr (PARTS == 2) {
          fine[m] = _mm256_add_epi16(fine[m], pairs(low, broadcast4(qm + K + 4 * c)));
          fine[m] = _mm256_add_epi16(fine[m], pairs(high, broadcast4(qm + K + 16 + 4 * c)));
        }
      }
    }
    for (int m = 0; m < ROWS; ++m) dots[m] = widen(dots[m]);
    if constexpr (PARTS == 2)
      for (int m = 0; m < ROWS; ++m) fine[m] = widen(fine[m]);
    const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(block_scales + g * kCols + half * kHalf)));
    const __m256 min = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(block_mins + g * kCols + half * kHalf)));
    for (int m = 0; m < ROWS; ++m) {
      __m256i dot = dots[m];
      if constexpr (PARTS == 2) dot = _mm256_add_epi32(_mm256_slli_epi32(dot, 8), fine[m]);
      const __m256 row_scale = _mm256_mul_ps(scale, _mm256_set1_ps(d[m * G + g]));
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), row_scale, acc[m]);
      acc[m] = _mm256_fmadd_ps(_mm256_set1_ps(sums[m * G + g]), min, acc[m]);
    }
  }
  for (int m = 0; m < ROWS; ++m) _mm256_storeu_ps(out + m * N + half * kHalf, acc[m]);
}

template <int ROWS, int PARTS>
void int8_half(const int8_t* q, int64_t K, const float* d, const uint8_t* block, const uint16_t* block_scales,
               int64_t G, float* out, int64_t N, int half, int64_t columns) {
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 acc[ROWS];
  for (int m = 0; m < ROWS; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i dots[ROWS], fine[PARTS == 2 ? ROWS : 1];
    for (int m = 0; m < ROWS; ++m) dots[m] = _mm256_setzero_si256();
    for (int m = 0; m < (PARTS == 2 ? ROWS : 1); ++m) fine[m] = _mm256_setzero_si256();
    const int8_t* qg = q + g * kGroup;
    for (int c = 0; c < 8; ++c) {
      const __m256i stored = _mm256_loadu_si256((const __m256i*)(block + g * kInt8GroupBytes + c * 64 + half * 32));
      const __m256i weights = _mm256_xor_si256(stored, flip);           // byte - 128: the signed weight
      const __m256i magnitude = _mm256_sign_epi8(weights, weights);     // |w|, read as unsigned (128 stays 128)
      for (int m = 0; m < ROWS; ++m) {
        const int8_t* qm = qg + m * PARTS * K;
        dots[m] = _mm256_add_epi32(dots[m], dot4(magnitude, _mm256_sign_epi8(broadcast4(qm + 4 * c), weights)));
        if constexpr (PARTS == 2)
          fine[m] = _mm256_add_epi32(fine[m], dot4(magnitude, _mm256_sign_epi8(broadcast4(qm + K + 4 * c), weights)));
      }
    }
    const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(block_scales + g * kCols + half * kHalf)));
    for (int m = 0; m < ROWS; ++m) {
      __m256i dot = dots[m];
      if constexpr (PARTS == 2) dot = _mm256_add_epi32(_mm256_slli_epi32(dot, 8), fine[m]);
      const __m256 row_scale = _mm256_mul_ps(scale, _mm256_set1_ps(d[m * G + g]));
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), row_scale, acc[m]);
    }
  }
  const int64_t keep = std::min<int64_t>(kHalf, std::max<int64_t>(0, columns - half * kHalf));
  for (int m = 0; m < ROWS; ++m) {
    if (keep == kHalf) {
      _mm256_storeu_ps(out + m * N + half * kHalf, acc[m]);
    } else if (keep > 0) {
      alignas(32) float lanes[kHalf];
      _mm256_store_ps(lanes, acc[m]);
      std::memcpy(out + m * N + half * kHalf, lanes, keep * sizeof(float));
    }
  }
}

using Int4Half = void (*)(const int8_t*, int64_t, const float*, const float*, const uint8_t*, const uint16_t*,
                          const uint16_t*, int64_t, float*, int64_t, int);
constexpr Int4Half kInt4Halves[2][kMaxRows] = {
    {int4_half<1, 1>, int4_half<2, 1>, int4_half<3, 1>, int4_half<4, 1>},
    {int4_half<1, 2>, int4_half<2, 2>, int4_half<3, 2>, int4_half<4, 2>}};
using Int8Half = void (*)(const int8_t*, int64_t, const float*, const uint8_t*, const uint16_t*, int64_t, float*,
                          int64_t, int, int64_t);
constexpr Int8Half kInt8Halves[2][kMaxRows] = {
    {int8_half<1, 1>, int8_half<2, 1>, int8_half<3, 1>, int8_half<4, 1>},
    {int8_half<1, 2>, int8_half<2, 2>, int8_half<3, 2>, int8_half<4, 2>}};

// As cpu_kernels.cpp's quantize_rows, one value at a time (the same float32 operations and
// round-half-to-even, so the same codes): a small share of the time next to the matmul.
void quantize_rows(const float* x, int64_t M, int64_t K, int parts, int8_t* q, float* d, float* sums) {
  const int64_t G = K / kGroup;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + m * K + g * kGroup;
      int8_t* qg = q + m * parts * K + g * kGroup;
      float amax = 0.f;
      for (int i = 0; i < kGroup; ++i) amax = std::max(amax, std::fabs(xg[i]));
      const float by = amax > 0.f ? 127.f / amax : 0.f;
      int32_t total = 0, fine_total = 0;
      for (int i = 0; i < kGroup; ++i) {
        const float scaled = xg[i] * by;
        const float code = std::nearbyint(scaled);
        qg[i] = static_cast<int8_t>(code);
        total += static_cast<int32_t>(code);
        if (parts == 2) {
          const float rest = (scaled - code) * 256.f;
          const int32_t fine = std::clamp(static_cast<int32_t>(std::nearbyint(rest)), -127, 127);
          qg[K + i] = static_cast<int8_t>(fine);
          fine_total += fine;
        }
      }
      float step = amax / 127.f;
      if (parts == 2) {
        total = total * 256 + fine_total;
        step /= 256.f;
      }
      d[m * G + g] = step;
      sums[m * G + g] = step * static_cast<float>(total);
    }
  }
}

void check_input(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous() && x.device().is_cpu(),
              name, ": x must be a contiguous 2-D float32 CPU tensor");
  TORCH_CHECK(x.size(1) % kGroup == 0, name, ": the input size must be a multiple of 32");
}

}  // namespace

torch::Tensor int4_mm(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                      const torch::Tensor& mins, int64_t parts) {
  TORCH_CHECK(parts == 1 || parts == 2, "int4_mm: parts must be 1 or 2");
  check_input(x, "int4_mm");
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t G = K / kGroup;
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == torch::kUInt8 && packed.is_contiguous() &&
                  packed.size(1) == G && packed.size(2) == 4 && packed.size(3) == 64,
              "int4_mm: packed weight of the wrong layout for this input size");
  const int64_t NB = packed.size(0), N = NB * kCols;
  for (const auto& t : {scales, mins}) {
    TORCH_CHECK(t.scalar_type() == torch::kHalf && t.is_contiguous() && t.dim() == 3 && t.size(0) == NB &&
                    t.size(1) == G && t.size(2) == kCols,
                "int4_mm: scales and mins must be contiguous float16 [N/16, K/32, 16]");
  }
  auto out = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  auto q = torch::empty({M, parts, K}, x.options().dtype(torch::kChar));
  auto steps = torch::empty({2, M, G}, x.options());
  float* d = steps.data_ptr<float>();
  float* sums = d + M * G;
  quantize_rows(x.data_ptr<float>(), M, K, static_cast<int>(parts), q.data_ptr<int8_t>(), d, sums);
  const int8_t* qp = q.data_ptr<int8_t>();
  const uint8_t* weights = packed.data_ptr<uint8_t>();
  const auto* s = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  const auto* mn = reinterpret_cast<const uint16_t*>(mins.data_ptr());
  float* o = out.data_ptr<float>();
  worker_pool::parallel_for(0, NB, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      for (int half = 0; half < 2; ++half) {
        for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
          const int64_t rows = std::min<int64_t>(kMaxRows, M - m0);
          kInt4Halves[parts - 1][rows - 1](qp + m0 * parts * K, K, d + m0 * G, sums + m0 * G,
                                           weights + nb * G * kInt4GroupBytes, s + nb * G * kCols,
                                           mn + nb * G * kCols, G, o + m0 * N + nb * kCols, N, half);
        }
      }
    }
  });
  return out;
}

torch::Tensor int8_mm(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                      int64_t out_features, int64_t parts) {
  TORCH_CHECK(parts == 1 || parts == 2, "int8_mm: parts must be 1 or 2");
  check_input(x, "int8_mm");
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t G = K / kGroup;
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == torch::kUInt8 && packed.is_contiguous() &&
                  packed.size(1) == G && packed.size(2) == 8 && packed.size(3) == 64,
              "int8_mm: packed weight of the wrong layout for this input size");
  const int64_t NB = packed.size(0), N = out_features;
  TORCH_CHECK(N > (NB - 1) * kCols && N <= NB * kCols, "int8_mm: out_features does not match the packed weight");
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && scales.is_contiguous() && scales.dim() == 3 &&
                  scales.size(0) == NB && scales.size(1) == G && scales.size(2) == kCols,
              "int8_mm: scales must be contiguous float16 [N/16, K/32, 16]");
  auto out = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  auto q = torch::empty({M, parts, K}, x.options().dtype(torch::kChar));
  auto steps = torch::empty({2, M, G}, x.options());
  float* d = steps.data_ptr<float>();
  quantize_rows(x.data_ptr<float>(), M, K, static_cast<int>(parts), q.data_ptr<int8_t>(), d, d + M * G);
  const int8_t* qp = q.data_ptr<int8_t>();
  const uint8_t* weights = packed.data_ptr<uint8_t>();
  const auto* s = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  float* o = out.data_ptr<float>();
  worker_pool::parallel_for(0, NB, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      const int64_t columns = std::min<int64_t>(kCols, N - nb * kCols);
      for (int half = 0; half < 2; ++half) {
        for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
          const int64_t rows = std::min<int64_t>(kMaxRows, M - m0);
          kInt8Halves[parts - 1][rows - 1](qp + m0 * parts * K, K, d + m0 * G, weights + nb * G * kInt8GroupBytes,
                                           s + nb * G * kCols, G, o + m0 * N + nb * kCols, N, half, columns);
        }
      }
    }
  });
  return out;
}

constexpr int kVersion = 6;  // as cpu_kernels.cpp: int4_kernel.KERNEL_VERSION must equal it

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("VERSION") = kVersion;
  m.attr("ISA") = "AVX2";
  m.def("int4_mm", &int4_mm, "batched int4 x int8 matmul, float32 output");
  m.def("int8_mm", &int8_mm, "batched int8 x int8 matmul, float32 output");
  m.def("set_threads", [](int threads) { worker_pool::Pool::get().set_threads(threads); },
        "threads the matmuls are split over (the calling thread included)");
  m.def("threads", [] { return worker_pool::Pool::get().threads(); });
  m.def("set_own_workers", [](bool on) { worker_pool::use_own_workers = on; },
        "the calling thread's matmuls run on the kernels' workers (true) or on torch's OpenMP threads");
}
