// llm_module's CPU matmuls for AVX-512 VNNI (see llm_module/runtime/int4_kernel.py for why):
// int4 weights (the transformer's linear layers) and int8 weights (the output head), both times
// input rows quantized to int8 per group of 32, multiplied exactly in int32 by `vpdpbusd`, with
// the scales applied in fp32 and a float32 output.
//
// Built by setup.py into llm_module/runtime/_cpu_kernels*.so with -mavx512f/bw/vl/vnni: Python
// checks the CPU's flags before importing it (int4_kernel.py), since any code here may use them.
//
// The input rows are quantized per group of 32 to int8 (q = round(x * 127 / amax), d = amax / 127),
// as llama.cpp does. With two parts, a second int8 code per input holds the first's rounding error
// at 1/256 of its step; the two dot products combine exactly in int32 (first * 256 + second, step
// d / 256).
//
// int4 weight layout, per block of 16 output columns (nb) and group of 32 inputs (g): 256 bytes,
// four chunks of 64. Byte 4*j + i of chunk c holds column j's codes for inputs 4c+i (low nibble) and
// 16+4c+i (high nibble) of the group: one chunk's nibbles are two VNNI operands of 16 columns x 4
// inputs. scales, mins [NB, G, 16] float16 (a GGUF block's own precision): w = code * scale + min.
//   out[m, n] = sum_g scale[n, g] * d[m, g] * sum_k code[n, k] * q[m, k] + min[n, g] * d[m, g] * sum_k q[m, k]
//
// int8 weight layout, per block of 16 output columns and group of 32 inputs: 512 bytes, eight
// chunks of 64. Byte 4*j + i of chunk c holds column j's weight code for input 4c+i of the group,
// plus 128: VNNI multiplies unsigned bytes by signed ones, so the weights are the unsigned operand
// and the input codes the signed one, and 128 * sum_k q[m, k] (per row and group, known once the
// row is quantized) is taken off the int32 dot product: the result is exact, and the weight needs
// no correction term of its own. scales [NB, G, 16] float16 (a GGUF Q8_0 block's own precision):
// w = (byte - 128) * scale. The last block's columns past N are zero and never stored.
//   out[m, n] = sum_g scale[n, g] * d[m, g] * (sum_k byte[n, k] * q[m, k] - 128 * sum_k q[m, k])
#include <torch/extension.h>
#include <immintrin.h>

#include "decode_attention.h"
#include "worker_pool.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int kCols = 16;    // output columns per block: one zmm of int32 / fp32
constexpr int kGroup = 32;   // inputs per scale/min group
constexpr int kMaxRows = 8;  // rows computed per pass over a block's weights
constexpr int kPrefetch = 4; // groups ahead
constexpr int kInt4GroupBytes = 256;
constexpr int kInt8GroupBytes = 512;

inline __m512i broadcast4(const int8_t* q) {
  int32_t four;
  std::memcpy(&four, q, sizeof(four));
  return _mm512_set1_epi32(four);
}

// Few rows leave the dot products waiting on each other: split each row's sum in chains.
template <int ROWS>
constexpr int chains() { return ROWS == 1 ? 4 : (ROWS <= 3 ? 2 : 1); }

template <int ROWS, int PARTS>
void int4_block(const int8_t* q, int64_t K, const float* d, const float* sums, const uint8_t* packed,
                const uint16_t* scales, const uint16_t* mins, int64_t G, float* out, int64_t N, int64_t nb) {
  constexpr int CHAINS = chains<ROWS>();
  const __m512i low_nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[ROWS];
  for (int m = 0; m < ROWS; ++m) acc[m] = _mm512_setzero_ps();
  const uint8_t* block = packed + nb * G * kInt4GroupBytes;
  const uint16_t* block_scales = scales + nb * G * kCols;
  const uint16_t* block_mins = mins + nb * G * kCols;
  for (int64_t g = 0; g < G; ++g) {
    for (int line = 0; line < 4; ++line)
      _mm_prefetch((const char*)(block + (g + kPrefetch) * kInt4GroupBytes + line * 64), _MM_HINT_T0);
    _mm_prefetch((const char*)(block_scales + (g + kPrefetch) * kCols), _MM_HINT_T0);
    _mm_prefetch((const char*)(block_mins + (g + kPrefetch) * kCols), _MM_HINT_T0);
    __m512i dots[ROWS * CHAINS], fine[PARTS == 2 ? ROWS : 1];
    for (int i = 0; i < ROWS * CHAINS; ++i) dots[i] = _mm512_setzero_si512();
    for (int m = 0; m < (PARTS == 2 ? ROWS : 1); ++m) fine[m] = _mm512_setzero_si512();
    const int8_t* qg = q + g * kGroup;
    for (int c = 0; c < 4; ++c) {
      const __m512i bytes = _mm512_loadu_si512((const void*)(block + g * kInt4GroupBytes + c * 64));
      const __m512i low = _mm512_and_si512(bytes, low_nibble);
      const __m512i high = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low_nibble);
      for (int m = 0; m < ROWS; ++m) {
        const int8_t* qm = qg + m * PARTS * K;
        __m512i& first = dots[m * CHAINS + (2 * c) % CHAINS];
        __m512i& second = dots[m * CHAINS + (2 * c + 1) % CHAINS];
        first = _mm512_dpbusd_epi32(first, low, broadcast4(qm + 4 * c));
        second = _mm512_dpbusd_epi32(second, high, broadcast4(qm + 16 + 4 * c));
        if constexpr (PARTS == 2) {
          fine[m] = _mm512_dpbusd_epi32(fine[m], low, broadcast4(qm + K + 4 * c));
          fine[m] = _mm512_dpbusd_epi32(fine[m], high, broadcast4(qm + K + 16 + 4 * c));
        }
      }
    }
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(block_scales + g * kCols)));
    const __m512 min = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(block_mins + g * kCols)));
    for (int m = 0; m < ROWS; ++m) {
      __m512i dot = dots[m * CHAINS];
      for (int c = 1; c < CHAINS; ++c) dot = _mm512_add_epi32(dot, dots[m * CHAINS + c]);
      if constexpr (PARTS == 2) dot = _mm512_add_epi32(_mm512_slli_epi32(dot, 8), fine[m]);
      const __m512 row_scale = _mm512_mul_ps(scale, _mm512_set1_ps(d[m * G + g]));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), row_scale, acc[m]);
      acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(sums[m * G + g]), min, acc[m]);
    }
  }
  for (int m = 0; m < ROWS; ++m) _mm512_storeu_ps(out + m * N + nb * kCols, acc[m]);
}

using Int4Block = void (*)(const int8_t*, int64_t, const float*, const float*, const uint8_t*, const uint16_t*,
                           const uint16_t*, int64_t, float*, int64_t, int64_t);
constexpr Int4Block kInt4Blocks[2][kMaxRows] = {
    {int4_block<1, 1>, int4_block<2, 1>, int4_block<3, 1>, int4_block<4, 1>, int4_block<5, 1>, int4_block<6, 1>,
     int4_block<7, 1>, int4_block<8, 1>},
    {int4_block<1, 2>, int4_block<2, 2>, int4_block<3, 2>, int4_block<4, 2>, int4_block<5, 2>, int4_block<6, 2>,
     int4_block<7, 2>, int4_block<8, 2>}};

// Each thread takes a run of column blocks and computes every row for a block before the next, so
// the block's weights (int4: G * 256 bytes, 4.5 KiB for 576 inputs; int8: G * 512) come from memory
// once per call and stay in L1 for the rows past the first 8 (a pass over all blocks per 8 rows
// read the whole matrix again for each 8 rows of a prompt: bench/findings.md).
// block(nb, m0, rows) computes rows [m0, m0 + rows) of column block nb.
template <typename Block>
void each_column_block_all_rows(int64_t M, int64_t NB, const Block& block) {
  worker_pool::parallel_for(0, NB, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb)
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) block(nb, m0, std::min<int64_t>(kMaxRows, M - m0));
  });
}

void int4_rows(const int8_t* q, int64_t M, int64_t K, int parts, const float* d, const float* sums,
               const uint8_t* packed, const uint16_t* scales, const uint16_t* mins, int64_t G, float* out,
               int64_t N) {
  each_column_block_all_rows(M, N / kCols, [&](int64_t nb, int64_t m0, int64_t rows) {
    kInt4Blocks[parts - 1][rows - 1](q + m0 * parts * K, K, d + m0 * G, sums + m0 * G, packed, scales, mins, G,
                                     out + m0 * N, N, nb);
  });
}

// ROWS rows of one block of 16 int8-weight columns. offsets[m, g] = 128 * sum of the group's codes
// (both parts combined as in the dot product).
template <int ROWS, int PARTS>
void int8_block(const int8_t* q, int64_t K, const float* d, const int32_t* offsets, const uint8_t* block,
                const uint16_t* block_scales, int64_t G, float* out, int64_t N, int64_t columns) {
  constexpr int CHAINS = chains<ROWS>();
  __m512 acc[ROWS];
  for (int m = 0; m < ROWS; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    for (int line = 0; line < 8; ++line)
      _mm_prefetch((const char*)(block + (g + kPrefetch) * kInt8GroupBytes + line * 64), _MM_HINT_T0);
    _mm_prefetch((const char*)(block_scales + (g + kPrefetch) * kCols), _MM_HINT_T0);
    __m512i dots[ROWS * CHAINS], fine[PARTS == 2 ? ROWS : 1];
    for (int i = 0; i < ROWS * CHAINS; ++i) dots[i] = _mm512_setzero_si512();
    for (int m = 0; m < (PARTS == 2 ? ROWS : 1); ++m) fine[m] = _mm512_setzero_si512();
    const int8_t* qg = q + g * kGroup;
    for (int c = 0; c < 8; ++c) {
      const __m512i weights = _mm512_loadu_si512((const void*)(block + g * kInt8GroupBytes + c * 64));
      for (int m = 0; m < ROWS; ++m) {
        const int8_t* qm = qg + m * PARTS * K;
        __m512i& dot = dots[m * CHAINS + c % CHAINS];
        dot = _mm512_dpbusd_epi32(dot, weights, broadcast4(qm + 4 * c));
        if constexpr (PARTS == 2) fine[m] = _mm512_dpbusd_epi32(fine[m], weights, broadcast4(qm + K + 4 * c));
      }
    }
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(block_scales + g * kCols)));
    for (int m = 0; m < ROWS; ++m) {
      __m512i dot = dots[m * CHAINS];
      for (int c = 1; c < CHAINS; ++c) dot = _mm512_add_epi32(dot, dots[m * CHAINS + c]);
      if constexpr (PARTS == 2) dot = _mm512_add_epi32(_mm512_slli_epi32(dot, 8), fine[m]);
      dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(offsets[m * G + g]));
      const __m512 row_scale = _mm512_mul_ps(scale, _mm512_set1_ps(d[m * G + g]));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), row_scale, acc[m]);
    }
  }
  if (columns == kCols) {
    for (int m = 0; m < ROWS; ++m) _mm512_storeu_ps(out + m * N, acc[m]);
  } else {
    const __mmask16 keep = static_cast<__mmask16>((1u << columns) - 1);
    for (int m = 0; m < ROWS; ++m) _mm512_mask_storeu_ps(out + m * N, keep, acc[m]);
  }
}

using Int8Block = void (*)(const int8_t*, int64_t, const float*, const int32_t*, const uint8_t*, const uint16_t*,
                           int64_t, float*, int64_t, int64_t);
constexpr Int8Block kInt8Blocks[2][kMaxRows] = {
    {int8_block<1, 1>, int8_block<2, 1>, int8_block<3, 1>, int8_block<4, 1>, int8_block<5, 1>, int8_block<6, 1>,
     int8_block<7, 1>, int8_block<8, 1>},
    {int8_block<1, 2>, int8_block<2, 2>, int8_block<3, 2>, int8_block<4, 2>, int8_block<5, 2>, int8_block<6, 2>,
     int8_block<7, 2>, int8_block<8, 2>}};

void int8_rows(const int8_t* q, int64_t M, int64_t K, int parts, const float* d, const int32_t* offsets,
               const uint8_t* packed, const uint16_t* scales, int64_t G, float* out, int64_t N) {
  each_column_block_all_rows(M, (N + kCols - 1) / kCols, [&](int64_t nb, int64_t m0, int64_t rows) {
    kInt8Blocks[parts - 1][rows - 1](q + m0 * parts * K, K, d + m0 * G, offsets + m0 * G,
                                     packed + nb * G * kInt8GroupBytes, scales + nb * G * kCols, G,
                                     out + m0 * N + nb * kCols, N, std::min<int64_t>(kCols, N - nb * kCols));
  });
}

// Each group of 32 inputs of a row -> int8 codes q (and with two parts, the codes of what the
// first left, at 1/256 of its step), the group's step d, the sum of what the codes stand for
// (sums, for the int4 minimums) and 128 times the sum of the codes (offsets, for the int8
// weights' +128); either of the last two may be null.
// q is [rows, parts, K]; d, sums and offsets are [rows, G] with d the step of the finest part.
void quantize_rows(const float* x, int64_t M, int64_t K, int parts, int8_t* q, float* d, float* sums,
                   int32_t* offsets) {
  const int64_t G = K / kGroup;
  const __m512 fine_step = _mm512_set1_ps(256.f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + m * K + g * kGroup;
      int8_t* qg = q + m * parts * K + g * kGroup;
      const __m512 a = _mm512_loadu_ps(xg), b = _mm512_loadu_ps(xg + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
      const __m512 by = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      const __m512 sa = _mm512_mul_ps(a, by), sb = _mm512_mul_ps(b, by);
      const __m512i qa = _mm512_cvtps_epi32(sa), qb = _mm512_cvtps_epi32(sb);
      _mm_storeu_si128((__m128i*)qg, _mm512_cvtsepi32_epi8(qa));
      _mm_storeu_si128((__m128i*)(qg + 16), _mm512_cvtsepi32_epi8(qb));
      int32_t total = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
      float step = amax / 127.f;
      if (parts == 2) {
        const __m512i fa = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(sa, _mm512_cvtepi32_ps(qa)), fine_step));
        const __m512i fb = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(sb, _mm512_cvtepi32_ps(qb)), fine_step));
        const __m512i ca = _mm512_max_epi32(_mm512_min_epi32(fa, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
        const __m512i cb = _mm512_max_epi32(_mm512_min_epi32(fb, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
        _mm_storeu_si128((__m128i*)(qg + K), _mm512_cvtsepi32_epi8(ca));
        _mm_storeu_si128((__m128i*)(qg + K + 16), _mm512_cvtsepi32_epi8(cb));
        total = total * 256 + _mm512_reduce_add_epi32(_mm512_add_epi32(ca, cb));
        step /= 256.f;
      }
      d[m * G + g] = step;
      if (sums != nullptr) sums[m * G + g] = step * static_cast<float>(total);
      if (offsets != nullptr) offsets[m * G + g] = 128 * total;
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
  quantize_rows(x.data_ptr<float>(), M, K, static_cast<int>(parts), q.data_ptr<int8_t>(), d, sums, nullptr);
  int4_rows(q.data_ptr<int8_t>(), M, K, static_cast<int>(parts), d, sums, packed.data_ptr<uint8_t>(),
            reinterpret_cast<const uint16_t*>(scales.data_ptr()), reinterpret_cast<const uint16_t*>(mins.data_ptr()),
            G, out.data_ptr<float>(), N);
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
  auto d = torch::empty({M, G}, x.options());
  auto offsets = torch::empty({M, G}, x.options().dtype(torch::kInt));
  quantize_rows(x.data_ptr<float>(), M, K, static_cast<int>(parts), q.data_ptr<int8_t>(), d.data_ptr<float>(),
                nullptr, offsets.data_ptr<int32_t>());
  int8_rows(q.data_ptr<int8_t>(), M, K, static_cast<int>(parts), d.data_ptr<float>(), offsets.data_ptr<int32_t>(),
            packed.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr()), G,
            out.data_ptr<float>(), N);
  return out;
}

// int4_kernel.KERNEL_VERSION must equal it: a build of other sources (an older in-place build
// left in a checkout) is not loaded. Bump it with any change of a layout or a signature.
constexpr int kVersion = 6;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("VERSION") = kVersion;
  m.attr("ISA") = "AVX-512 VNNI";
  m.def("int4_mm", &int4_mm, "batched int4 x int8 matmul, float32 output");
  m.def("int8_mm", &int8_mm, "batched int8 x int8 matmul, float32 output");
  m.def("set_threads", [](int threads) { worker_pool::Pool::get().set_threads(threads); },
        "threads the matmuls are split over (the calling thread included)");
  m.def("threads", [] { return worker_pool::Pool::get().threads(); });
  m.def("decode_attention", &decode_attention::decode_attention,
        "one decoding step's attention, grouped key/value heads, float32 (see decode_attention.h)");
  m.def("set_own_workers", [](bool on) { worker_pool::use_own_workers = on; },
        "the calling thread's matmuls run on the kernels' workers (true) or on torch's OpenMP threads");
}
