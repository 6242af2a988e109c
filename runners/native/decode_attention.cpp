// One decode step's attention for bf16 key/value caches: each query head reads the bf16 keys and
// values of its key/value head and accumulates in float32 (scores, softmax, weighted sum).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float bf16_to_float(uint16_t x) {
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch's .to(torch.bfloat16)
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Cephes' expf (within 1 ulp in float32), branch-free so that its loop vectorizes.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.33654f), 88.72283f);
  float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

#if defined(__AVX512F__)
inline __m512 load_bf16x16(const uint16_t* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#endif

// exp(score - max) over the visible columns (0 elsewhere), in place; returns their sum.
inline float softmax_in_place(float* scores, const uint8_t* seen, int64_t n) {
  float top = -INFINITY;
  for (int64_t c = 0; c < n; ++c)
    if (!seen || seen[c]) top = std::max(top, scores[c]);
  for (int64_t c = 0; c < n; ++c) scores[c] = exp_approx(scores[c] - top);
  if (seen)
    for (int64_t c = 0; c < n; ++c) scores[c] = seen[c] ? scores[c] : 0.f;
  float total = 0.f;
  for (int64_t c = 0; c < n; ++c) total += scores[c];
  return total;
}

#if defined(__AVX512F__)
// The AVX-512 path for a head size of 16 * B: each query block and each accumulator lives in a
// register; four columns' dot products at a time, so that their reductions overlap.
template <int B>
void head_avx512(const uint16_t* qh, const uint16_t* k, int64_t k_col, const uint16_t* v, int64_t v_col,
                 const uint8_t* seen, int64_t n, float scale, float* scores, uint16_t* out) {
  __m512 q[B];
  for (int b = 0; b < B; ++b) q[b] = _mm512_mul_ps(load_bf16x16(qh + 16 * b), _mm512_set1_ps(scale));
  int64_t c = 0;
  for (; c + 4 <= n; c += 4) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const uint16_t* k0 = k + c * k_col;
    for (int b = 0; b < B; ++b) {
      a0 = _mm512_fmadd_ps(q[b], load_bf16x16(k0 + 16 * b), a0);
      a1 = _mm512_fmadd_ps(q[b], load_bf16x16(k0 + k_col + 16 * b), a1);
      a2 = _mm512_fmadd_ps(q[b], load_bf16x16(k0 + 2 * k_col + 16 * b), a2);
      a3 = _mm512_fmadd_ps(q[b], load_bf16x16(k0 + 3 * k_col + 16 * b), a3);
    }
    scores[c] = _mm512_reduce_add_ps(a0);
    scores[c + 1] = _mm512_reduce_add_ps(a1);
    scores[c + 2] = _mm512_reduce_add_ps(a2);
    scores[c + 3] = _mm512_reduce_add_ps(a3);
  }
  for (; c < n; ++c) {
    __m512 a = _mm512_setzero_ps();
    for (int b = 0; b < B; ++b) a = _mm512_fmadd_ps(q[b], load_bf16x16(k + c * k_col + 16 * b), a);
    scores[c] = _mm512_reduce_add_ps(a);
  }
  const float total = softmax_in_place(scores, seen, n);
  // Masked columns (probability 0) are skipped, not multiplied: whatever a row's unused tail holds
  // stays out of its result.
  __m512 even[B], odd[B];
  for (int b = 0; b < B; ++b) even[b] = odd[b] = _mm512_setzero_ps();
  bool flip = false;
  for (c = 0; c < n; ++c) {
    if (scores[c] == 0.f) continue;
    const __m512 p = _mm512_set1_ps(scores[c]);
    const uint16_t* vc = v + c * v_col;
    if (flip) {
      for (int b = 0; b < B; ++b) odd[b] = _mm512_fmadd_ps(p, load_bf16x16(vc + 16 * b), odd[b]);
    } else {
      for (int b = 0; b < B; ++b) even[b] = _mm512_fmadd_ps(p, load_bf16x16(vc + 16 * b), even[b]);
    }
    flip = !flip;
  }
  alignas(64) float result[16 * B];
  const __m512 inverse = _mm512_set1_ps(1.f / total);
  for (int b = 0; b < B; ++b) _mm512_store_ps(result + 16 * b, _mm512_mul_ps(_mm512_add_ps(even[b], odd[b]), inverse));
  for (int i = 0; i < 16 * B; ++i) out[i] = float_to_bf16(result[i]);
}
#endif

// Any head size, plain C++ (vectorized as far as the compiler manages).
void head_generic(const uint16_t* qh, const uint16_t* k, int64_t k_col, const uint16_t* v, int64_t v_col,
                  const uint8_t* seen, int64_t n, int64_t d, float scale, float* scores, float* q, float* acc,
                  uint16_t* out) {
  for (int64_t i = 0; i < d; ++i) q[i] = bf16_to_float(qh[i]) * scale;
  for (int64_t c = 0; c < n; ++c) {
    float s = 0.f;
    for (int64_t i = 0; i < d; ++i) s += q[i] * bf16_to_float(k[c * k_col + i]);
    scores[c] = s;
  }
  const float total = softmax_in_place(scores, seen, n);
  std::fill(acc, acc + d, 0.f);
  for (int64_t c = 0; c < n; ++c)
    if (scores[c] != 0.f)
      for (int64_t i = 0; i < d; ++i) acc[i] += scores[c] * bf16_to_float(v[c * v_col + i]);
  for (int64_t i = 0; i < d; ++i) out[i] = float_to_bf16(acc[i] / total);
}

}  // namespace

extern "C" {

// query [rows, heads, d] bf16 (strides q_row, q_head; d contiguous); key/value [rows, kv_heads, n, d]
// bf16 (strides *_row, *_head, *_col; d contiguous); visible [rows, n] bytes (1: attend) or null for
// every column; out [rows, heads, d] bf16, contiguous. Jobs [begin, end) are (row, kv head) pairs.
int decode_attention_bf16(const uint16_t* query, int64_t q_row, int64_t q_head, const uint16_t* key, int64_t k_row,
                          int64_t k_head, int64_t k_col, const uint16_t* value, int64_t v_row, int64_t v_head,
                          int64_t v_col, const uint8_t* visible, uint16_t* out, int64_t heads, int64_t kv_heads,
                          int64_t n, int64_t d, float scale, int64_t begin, int64_t end) {
  const int64_t group = heads / kv_heads;
  std::vector<float> scores(n), q(d), acc(d);
  for (int64_t job = begin; job < end; ++job) {
    const int64_t row = job / kv_heads, kv = job % kv_heads;
    const uint8_t* seen = visible ? visible + row * n : nullptr;
    if (seen && std::find(seen, seen + n, 1) == seen + n) return 1;  // a row that sees nothing: a wrong mask
    const uint16_t* k = key + row * k_row + kv * k_head;
    const uint16_t* v = value + row * v_row + kv * v_head;
    for (int64_t head = kv * group; head < (kv + 1) * group; ++head) {
      const uint16_t* qh = query + row * q_row + head * q_head;
      uint16_t* oh = out + (row * heads + head) * d;
#if defined(__AVX512F__)
      if (d == 64) { head_avx512<4>(qh, k, k_col, v, v_col, seen, n, scale, scores.data(), oh); continue; }
      if (d == 128) { head_avx512<8>(qh, k, k_col, v, v_col, seen, n, scale, scores.data(), oh); continue; }
#endif
      head_generic(qh, k, k_col, v, v_col, seen, n, d, scale, scores.data(), q.data(), acc.data(), oh);
    }
  }
  return 0;
}
}
