/* The TTT layer's output epilogue in one pass (no autograd), the CPU twin of
 *   gelu_tanh(g) * LayerNorm(z)        (official: `post_norm`, then the `wg` gate)
 * for rows [t0, t1) of z, g [N, D] (contiguous rows, D a multiple of 16), written into g.
 * torch spends three passes and one fresh [N, D] buffer on it (layer_norm, gelu_, mul_).
 *
 * gelu_tanh(x) = x/2 (1 + tanh(y)) = x sigmoid(2y), y = sqrt(2/pi) (x + 0.044715 x^3): the sigmoid
 * form has no cancellation near tanh = -1 and needs only exp(-|2y|) in (0, 1], which cannot
 * overflow. exp is a Cody-Waite range reduction and a degree-7 Taylor polynomial (relative error
 * ~1e-7 on |r| <= ln2/2), built from GCC/clang vector extensions like the scan.
 * The same GELU and its derivative serve TTT-MLP's inner loop (`gelu_tanh_rows`, below).
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

/* t = exp(-|s|) at s = 2y, and whether s < 0: sigmoid(s) is 1 / (1 + t) for s >= 0 and t / (1 + t)
 * below, 1 - sigmoid(s) the other one (neither form cancels). */
static inline vf gelu_exp(vf x, vi *neg) {
  vf s = splat(2.f * 0.7978845608028654f) * (x + splat(0.044715f) * x * x * x);
  *neg = s < splat(0.f);
  return exp_nonpos(select(*neg, s, -s));
}

static inline vf gelu_tanh(vf x) {
  vi neg;
  vf t = gelu_exp(x, &neg);
  return x * select(neg, t, splat(1.f)) / (splat(1.f) + t);
}

/* d/dx x sigmoid(2y) = sigmoid(2y) + 2 x sigmoid(2y) (1 - sigmoid(2y)) y', y' = sqrt(2/pi) (1 + 3 * 0.044715 x^2) */
static inline vf gelu_tanh_grad(vf x) {
  vi neg;
  vf t = gelu_exp(x, &neg);
  vf inv = splat(1.f) / (splat(1.f) + t);
  vf sig = select(neg, t, splat(1.f)) * inv, sig_c = select(neg, splat(1.f), t) * inv;
  vf dy = splat(2.f * 0.7978845608028654f) * (splat(1.f) + splat(3.f * 0.044715f) * x * x);
  return sig + x * sig * sig_c * dy;
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

/* TTT-MLP's inner GELU (no autograd): contiguous rows of n floats (n a multiple of 16) of x.
 * With g NULL: out = gelu_tanh(x), and when `ones`, a 1 after each row (out rows of n + 1: the dual
 * form's [gelu(Z1), 1] in one pass). Else out = g * gelu_tanh'(x) (g and out rows of n). */
typedef struct {
  const float *x, *g;
  float *out;
  int64_t n, ones;
} gelu_args;

int gelu_tanh_rows(const void *args, int64_t r0, int64_t r1) {
  const gelu_args *a = args;
  const int64_t nv = a->n / 16;
  for (int64_t r = r0; r < r1; r++) {
    const float *x = a->x + r * a->n;
    if (a->g) {
      const float *g = a->g + r * a->n;
      float *o = a->out + r * a->n;
      for (int64_t v = 0; v < nv; v++) st(o + 16 * v, ld(g + 16 * v) * gelu_tanh_grad(ld(x + 16 * v)));
    } else {
      float *o = a->out + r * (a->n + a->ones);
      for (int64_t v = 0; v < nv; v++) st(o + 16 * v, gelu_tanh(ld(x + 16 * v)));
      if (a->ones) o[a->n] = 1.f;
    }
  }
  return 0;
}

int gelu_tanh_rows_threads(const gelu_args *a, int64_t rows, int64_t nt) { return run_ranges(gelu_tanh_rows, a, rows, nt); }
