/* Vector helpers shared by the C kernels: 16-float vectors (one AVX-512 register, two AVX2 ones) via
 * GCC/clang vector extensions. */
#ifndef TTT_SIMD_H
#define TTT_SIMD_H
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float vf __attribute__((vector_size(64)));
typedef float vfu __attribute__((vector_size(64), aligned(4)));  /* for rows of the caller's tensors */
typedef int32_t vi __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));

static inline vf ld(const float *p) { return *(const vfu *)p; }
static inline void st(float *p, vf x) { *(vfu *)p = x; }
static inline vf splat(float x) { return (vf){0} + x; }
/* Sum of the 16 lanes as a tree (16 -> 8 -> 4 -> 1): a few shuffles instead of a 16-add chain. */
static inline float hsum(vf x) {
  vf8 lo, hi;
  memcpy(&lo, &x, 32), memcpy(&hi, (const char *)&x + 32, 32);
  lo += hi;
  vf4 a, c;
  memcpy(&a, &lo, 16), memcpy(&c, (const char *)&lo + 16, 16);
  a += c;
  return (a[0] + a[1]) + (a[2] + a[3]);
}

/* LayerNorm's statistics of n floats (n a multiple of 16): the mean into *mean, and returns
 * 1 / sqrt(biased variance + eps), the variance from the centred values (two passes). */
static inline float mean_rstd(const float *z, int64_t n, float eps, float *mean) {
  vf s = {0};
  for (int64_t v = 0; v < n / 16; v++) s += ld(z + 16 * v);
  const vf m = splat(hsum(s) / n);
  vf q = {0};
  for (int64_t v = 0; v < n / 16; v++) {
    vf c = ld(z + 16 * v) - m;
    q += c * c;
  }
  *mean = m[0];
  return 1.f / sqrtf(hsum(q) / n + eps);
}
#endif
