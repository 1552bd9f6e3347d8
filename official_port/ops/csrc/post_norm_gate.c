/* The TTT layer's output epilogue in one pass (no autograd), the CPU twin of
 *   gelu_tanh(g) * LayerNorm(z)        (official: `post_norm`, then the `wg` gate)
 * for rows [t0, t1) of z, g [N, D] (contiguous rows, D a multiple of 16), written into g.
 * torch spends three passes and one fresh [N, D] buffer on it (layer_norm, gelu_, mul_).
 * The GELU is gelu.h's; with its derivative it also serves TTT-MLP's inner loop (`gelu_tanh_rows`, below).
 */
#include "gelu.h"
#include "simd.h"
#include "threads.h"

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
