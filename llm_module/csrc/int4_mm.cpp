// Batched int4 x bf16 matmul for CPUs with AVX-512 BF16 (see llm_module/int4_kernel.py for why).
//
// Weight layout, per block of 16 output columns (nb) and group of 32 inputs (g):
//   packed [NB, G, 16, 16] uint8: for each of the group's 16 input pairs, 16 bytes holding the 32
//     codes (column-major pairs: col0 k, col0 k+1, col1 k, ...) as low nibbles (codes 0-15 of the
//     32) and high nibbles (codes 16-31);
//   scales, mins [NB, G, 16] float16 (a GGUF block's own precision): w = code * scale + min.
// out[m, n] = sum_g scale[n, g] * sum_k code[n, k] * x[m, k] + min[n, g] * sum_k x[m, k]
// The codes are exact in bf16 and each product is exact in fp32; the sums run in fp32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int kCols = 16;   // output columns per block: one zmm of fp32
constexpr int kGroup = 32;  // inputs per scale/min group
constexpr int kMaxRows = 8; // rows computed per pass over the weights
#ifndef PREFETCH
#define PREFETCH 4
#endif

template <int ROWS>
void column_block(const uint16_t* x, int64_t K, const uint8_t* packed, const uint16_t* scales,
                  const uint16_t* mins, const float* x_sums, int64_t G, float* out, int64_t N, int64_t nb) {
  // Few rows leave the dot products' adds waiting on each other: split each row's sum in chains.
  constexpr int CHAINS = ROWS >= 4 ? 1 : (ROWS == 1 ? 4 : 2);
  // bf16 bit patterns of 0.0 .. 15.0, indexed by a code (twice: one table per 256-bit half).
  const __m512i codes_to_bf16 = _mm512_set_epi16(
      0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100,
      0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000,
      0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100,
      0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000);
  const __m256i low_nibble = _mm256_set1_epi16(0xF);
  __m512 acc[ROWS];
  for (int m = 0; m < ROWS; ++m) acc[m] = _mm512_setzero_ps();
  const uint8_t* block = packed + nb * G * 256;
  for (int64_t g = 0; g < G; ++g) {
    __m512 group_acc[ROWS * CHAINS];
    for (int i = 0; i < ROWS * CHAINS; ++i) group_acc[i] = _mm512_setzero_ps();
    for (int line = 0; line < 4; ++line) _mm_prefetch((const char*)(block + (g + PREFETCH) * 256 + line * 64), _MM_HINT_T0);
    _mm_prefetch((const char*)(scales + (nb * G + g + PREFETCH) * kCols), _MM_HINT_T0);
    _mm_prefetch((const char*)(mins + (nb * G + g + PREFETCH) * kCols), _MM_HINT_T0);
    for (int pair = 0; pair < kGroup / 2; ++pair) {
      const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(block + (g * 16 + pair) * 16)));
      const __m512i codes = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_and_si256(bytes, low_nibble)), _mm256_srli_epi16(bytes, 4), 1);
      const __m512bh weights = (__m512bh)_mm512_permutexvar_epi16(codes, codes_to_bf16);
      const int64_t k = g * kGroup + pair * 2;
      for (int m = 0; m < ROWS; ++m) {
        uint32_t x_pair;
        std::memcpy(&x_pair, x + m * K + k, sizeof(x_pair));
        __m512& chain = group_acc[m * CHAINS + pair % CHAINS];
        chain = _mm512_dpbf16_ps(chain, weights, (__m512bh)_mm512_set1_epi32((int)x_pair));
      }
    }
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(scales + (nb * G + g) * kCols)));
    const __m512 min = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(mins + (nb * G + g) * kCols)));
    for (int m = 0; m < ROWS; ++m) {
      __m512 sum = group_acc[m * CHAINS];
      for (int c = 1; c < CHAINS; ++c) sum = _mm512_add_ps(sum, group_acc[m * CHAINS + c]);
      acc[m] = _mm512_fmadd_ps(sum, scale, acc[m]);
      acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(x_sums[m * G + g]), min, acc[m]);
    }
  }
  for (int m = 0; m < ROWS; ++m) _mm512_storeu_ps(out + m * N + nb * kCols, acc[m]);
}

template <int ROWS>
void rows_pass(const uint16_t* x, int64_t K, const uint8_t* packed, const uint16_t* scales, const uint16_t* mins,
               const float* x_sums, int64_t G, float* out, int64_t N) {
  at::parallel_for(0, N / kCols, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) column_block<ROWS>(x, K, packed, scales, mins, x_sums, G, out, N, nb);
  });
}

using Pass = void (*)(const uint16_t*, int64_t, const uint8_t*, const uint16_t*, const uint16_t*, const float*,
                      int64_t, float*, int64_t);
constexpr Pass kPasses[kMaxRows] = {rows_pass<1>, rows_pass<2>, rows_pass<3>, rows_pass<4>,
                                    rows_pass<5>, rows_pass<6>, rows_pass<7>, rows_pass<8>};

}  // namespace

torch::Tensor int4_mm(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                      const torch::Tensor& mins) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous() && x.device().is_cpu(),
              "int4_mm: x must be a contiguous 2-D bfloat16 CPU tensor");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % kGroup == 0, "int4_mm: the input size must be a multiple of 32");
  const int64_t G = K / kGroup;
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == torch::kUInt8 && packed.is_contiguous() &&
                  packed.size(1) == G && packed.size(2) == 16 && packed.size(3) == 16,
              "int4_mm: packed weight of the wrong layout for this input size");
  const int64_t NB = packed.size(0), N = NB * kCols;
  for (const auto& t : {scales, mins}) {
    TORCH_CHECK(t.scalar_type() == torch::kHalf && t.is_contiguous() && t.dim() == 3 && t.size(0) == NB &&
                    t.size(1) == G && t.size(2) == kCols,
                "int4_mm: scales and mins must be contiguous float16 [N/16, K/32, 16]");
  }
  auto out = torch::empty({M, N}, x.options().dtype(torch::kFloat));
  if (M == 0 || N == 0) return out;
  // Each row's sum per group, for the minimums' term.
  auto x_sums = torch::empty({M, G}, x.options().dtype(torch::kFloat));
  const uint16_t* x_bits = reinterpret_cast<const uint16_t*>(x.data_ptr());
  float* sums = x_sums.data_ptr<float>();
  for (int64_t i = 0; i < M * G; ++i) {
    float total = 0.f;
    for (int j = 0; j < kGroup; ++j) {
      const uint32_t bits = static_cast<uint32_t>(x_bits[i * kGroup + j]) << 16;
      float value;
      std::memcpy(&value, &bits, sizeof(value));
      total += value;
    }
    sums[i] = total;
  }
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const int64_t rows = std::min<int64_t>(kMaxRows, M - m0);
    kPasses[rows - 1](x_bits + m0 * K, K, packed.data_ptr<uint8_t>(),
                      reinterpret_cast<const uint16_t*>(scales.data_ptr()),
                      reinterpret_cast<const uint16_t*>(mins.data_ptr()), sums + m0 * G, G,
                      out.data_ptr<float>() + m0 * N, N);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("int4_mm", &int4_mm, "batched int4 x bf16 matmul"); }
