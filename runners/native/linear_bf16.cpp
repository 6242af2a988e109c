// A bf16 linear layer (y = x W^T + b) for the few rows of a decode step, over a weight repacked once
// for AVX512-BF16's pair dot product (vdpbf16ps): the weight is read as one contiguous stream, each
// 64-byte load feeds 16 outputs of every row in the block, and no horizontal sum is needed.
//
// Packed layout (made by runners/native_kernels.py's pack_linear), for N outputs (padded to a
// multiple of 64 with zeros) and K inputs (even):
//   packed[group][pair][lane][2], group = output / 64, pair = input / 2, lane = output % 64,
// so a group's weights are K * 64 contiguous bf16, and a pair step reads 4 vectors of 16 outputs.
// Each row accumulates in float32 in the same order whatever the number of rows, so a row's result
// does not depend on what it is batched with.
#include <cstdint>
#include <cstring>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGroup = 64;  // outputs per group: 4 registers of 16

}  // namespace

extern "C" {

// 1 when this build has the AVX512-BF16 path (the only one: elsewhere the engine keeps oneDNN).
int linear_bf16_supported() {
#if defined(__AVX512BF16__)
  return 1;
#else
  return 0;
#endif
}

}  // extern "C"

#if defined(__AVX512BF16__)
namespace {

// R rows (x, row stride x_row) times one group's packed weights, plus bias, into out (row stride
// o_row), the group's first `width` outputs (64, or fewer in the last group).
template <int R>
inline void block(const uint16_t* x, int64_t x_row, const uint16_t* w, int64_t pairs, const float* bias,
                  uint16_t* out, int64_t o_row, int64_t width) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* wp = w + p * 2 * kGroup;
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wp + 32);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(wp + 64);
    const __m512bh w3 = (__m512bh)_mm512_loadu_si512(wp + 96);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * x_row + 2 * p, sizeof pair);
      const __m512bh b = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, b);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], w1, b);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], w2, b);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], w3, b);
    }
  }
  for (int j = 0; j < 4; ++j) {
    const int64_t first = 16 * j;
    if (first >= width) break;
    const __mmask16 mask = width - first >= 16 ? 0xffff : static_cast<__mmask16>((1u << (width - first)) - 1);
    const __m512 add = bias ? _mm512_maskz_loadu_ps(mask, bias + first) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      const __m256bh y = _mm512_cvtneps_pbh(_mm512_add_ps(acc[r][j], add));
      _mm256_mask_storeu_epi16(out + r * o_row + first, mask, (__m256i)y);
    }
  }
}

}  // namespace
#endif

extern "C" {

// out[m, n] = x[m, k] packed^T + bias (bf16 in and out, float32 bias or null; rows of x and out
// with strides x_row and o_row). Groups [g_begin, g_end) of 64 outputs: callers may split them.
void linear_bf16(const uint16_t* x, int64_t x_row, int64_t m, int64_t k, const uint16_t* packed, int64_t n,
                 const float* bias, uint16_t* out, int64_t o_row, int64_t g_begin, int64_t g_end) {
#if defined(__AVX512BF16__)
  const int64_t pairs = k / 2;
  for (int64_t g = g_begin; g < g_end; ++g) {
    const uint16_t* w = packed + g * pairs * 2 * kGroup;
    const int64_t first = g * kGroup, width = n - first < kGroup ? n - first : kGroup;
    const float* b = bias ? bias + first : nullptr;
    int64_t r = 0;
    for (; r + 6 <= m; r += 6) block<6>(x + r * x_row, x_row, w, pairs, b, out + r * o_row + first, o_row, width);
    const uint16_t* xr = x + r * x_row;
    uint16_t* orow = out + r * o_row + first;
    switch (m - r) {
      case 5: block<5>(xr, x_row, w, pairs, b, orow, o_row, width); break;
      case 4: block<4>(xr, x_row, w, pairs, b, orow, o_row, width); break;
      case 3: block<3>(xr, x_row, w, pairs, b, orow, o_row, width); break;
      case 2: block<2>(xr, x_row, w, pairs, b, orow, o_row, width); break;
      case 1: block<1>(xr, x_row, w, pairs, b, orow, o_row, width); break;
      default: break;
    }
  }
#else
  (void)x; (void)x_row; (void)m; (void)k; (void)packed; (void)n; (void)bias; (void)out; (void)o_row;
  (void)g_begin; (void)g_end;
#endif
}

}  // extern "C"
