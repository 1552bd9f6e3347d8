/* The TTT layer's output epilogue in one pass (no autograd), the CPU twin of
 *   gelu_tanh(g) * LayerNorm(z)        (official: `post_norm`, then the `wg` gate)
 * for rows [t0, t1) of z, g [N, D] (contiguous rows, D a multiple of 16), written into g.
 * torch spends three passes and one fresh [N, D] buffer on it (layer_norm, gelu_, mul_).
 *
 * gelu_tanh(x) = x/2 (1 + tanh(y)) = x sigmoid(2y), y = sqrt(2/pi) (x + 0.044715 x^3): the sigmoid
 * form has no cancellation near tanh = -1 and needs only exp(-|2y|) in (0, 1], which cannot
 * overflow. exp is a Cody-Waite range reduction and a degree-7 Taylor polynomial (relative error
 * ~1e-7 on |r| <= ln2/2), built from GCC/clang vector extensions like the scan.
 */
#include "simd.h"
#include "threads.h"

static inline vf select(vi mask, vf yes, vf no) { return (vf)(((vi)yes & mask) | ((vi)no & ~mask)); }

/* exp(x) for x <= 0; 0 below -87 (near float's smallest normal; the caller's 1 + t ignores it) and
 * NaN for NaN. */
static inline vf exp_nonpos(vf x) {
  const vi under = x < splat(-87.f);
  x = select(under, splat(-87.f), x);
  const vf shifter = splat(12582912.f); /* 1.5 * 2^23: adding it rounds to an integer */
  vf k = (x * splat(1.44269504088896341f) + shifter) - shifter;
  vf r = (x - k * splat(0.693359375f)) - k * splat(-2.12194440e-4f); /* ln2 in two parts */
  vf p = splat(1.f / 5040);
  p = p * r + splat(1.f / 720);
  p = p * r + splat(1.f / 120);
  p = p * r + splat(1.f / 24);
  p = p * r + splat(1.f / 6);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.f);
  p = p * r + splat(1.f);
  vi e = (__builtin_convertvector(k, vi) + 127) << 23; /* 2^k, k >= -126 */
  return select(under, splat(0.f), p * (vf)e);
}

static inline vf gelu_tanh(vf x) {
  vf s = splat(2.f * 0.7978845608028654f) * (x + splat(0.044715f) * x * x * x);
  vi neg = s < splat(0.f);
  vf t = exp_nonpos(select(neg, s, -s)); /* exp(-|s|) */
  /* sigmoid(s) = 1 / (1 + t) for s >= 0, t / (1 + t) below */
  return x * select(neg, t, splat(1.f)) / (splat(1.f) + t);
}

/* Everything one call reads and writes (mirrored by `_EpilogueArgs` in c_scan.py): z, g [N, D]. */
typedef struct {
  const float *z;
  float *g;
  const float *w, *b;
  float eps;
  int64_t D;
} epilogue_args;

/* Rows [t0, t1). */
int post_norm_gelu_gate(const void *args, int64_t t0, int64_t t1) {
  const epilogue_args *a = args;
  const int64_t D = a->D, nv = D / 16;
  const float *w = a->w, *b = a->b;
  for (int64_t t = t0; t < t1; t++) {
    const float *zr = a->z + t * D;
    float *gr = a->g + t * D;
    float mean, r = mean_rstd(zr, D, a->eps, &mean);
    const vf rstd = splat(r), mv = splat(mean);
    for (int64_t v = 0; v < nv; v++) {
      vf y = (ld(zr + 16 * v) - mv) * rstd * ld(w + 16 * v) + ld(b + 16 * v);
      st(gr + 16 * v, gelu_tanh(ld(gr + 16 * v)) * y);
    }
  }
  return 0;
}

/* All N rows, in nt ranges on OpenMP threads (see threads.h). */
int post_norm_gelu_gate_threads(const epilogue_args *a, int64_t N, int64_t nt) {
  return run_ranges(post_norm_gelu_gate, a, N, nt);
}
