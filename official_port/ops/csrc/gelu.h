/* The tanh GELU and its derivative on 16-float vectors, shared by the output epilogue and TTT-MLP's
 * kernels. gelu_tanh(x) = x/2 (1 + tanh(y)) = x sigmoid(2y), y = sqrt(2/pi) (x + 0.044715 x^3): the
 * sigmoid form has no cancellation near tanh = -1 and needs only exp(-|2y|) in (0, 1], which cannot
 * overflow. exp is a Cody-Waite range reduction and a degree-7 Taylor polynomial (relative error
 * ~1e-7 on |r| <= ln2/2). */
#ifndef TTT_GELU_H
#define TTT_GELU_H
#include "simd.h"

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

/* gelu_tanh(x), and gelu_tanh_grad(x) into *grad, from one exp (the same values as the two calls). */
static inline vf gelu_tanh_with_grad(vf x, vf *grad) {
  vi neg;
  vf t = gelu_exp(x, &neg);
  vf inv = splat(1.f) / (splat(1.f) + t);
  vf sig = select(neg, t, splat(1.f)) * inv, sig_c = select(neg, splat(1.f), t) * inv;
  vf dy = splat(2.f * 0.7978845608028654f) * (splat(1.f) + splat(3.f * 0.044715f) * x * x);
  *grad = sig + x * sig * sig_c * dy;
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
#endif
