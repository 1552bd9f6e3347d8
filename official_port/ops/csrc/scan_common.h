/* What the C TTT scans share (ttt_linear_scan.c, ttt_mlp_scan.c): the product tiles, the per-head
 * LayerNorm, the arguments of one call and the making of a new token's query and key rows (causal
 * depthwise conv, then RoPE). Include after defining HD and MB (and ROWMAX when rows are longer). */
#ifndef TTT_SCAN_COMMON_H
#define TTT_SCAN_COMMON_H
#include <math.h>

#include "simd.h"
#include "threads.h"

#ifndef HD
#error "compile with -DHD=<head dim>"
#endif
#ifndef MB
#error "compile with -DMB=<mini-batch size>"
#endif
#if HD % 16 != 0
#error "HD must be a multiple of 16"
#endif

#define NV (HD / 16) /* vectors per row of HD floats */
/* vectors per column block of a product tile: 4 rows x CBV accumulators stay in registers */
#define CBV (NV % 4 == 0 ? 4 : NV % 3 == 0 ? 3 : NV % 2 == 0 ? 2 : 1)
#ifndef ROWMAX /* the longest row a product reads or writes (TTT-MLP: its hidden width) */
#define ROWMAX (HD > MB ? HD : MB)
#endif
#define A64 __attribute__((aligned(64)))

static const float zero_row[ROWMAX > MB ? ROWMAX : MB] A64;

/* The product kernel: out[r] = init[r] + sign * sum_{c < kdim} x[r][c * xs] * M[c * ldm] over nvec
 * vectors (16 * nvec floats, nvec <= 4) for 4 rows r (xs > 1 reads x transposed). init and out may be
 * the same rows. Inlined where nvec is a constant, so the accumulators stay in vector registers. */
static inline __attribute__((always_inline)) void tile(const float *const x[4], int64_t xs, int kdim,
                                                        const float *M, int64_t ldm, int nvec, float sign,
                                                        const float *const init[4], float *const out[4]) {
  vf a[4][4];
  for (int r = 0; r < 4; r++)
    for (int v = 0; v < nvec; v++) a[r][v] = ld(init[r] + 16 * v);
  for (int c = 0; c < kdim; c++) {
    const float *m = M + c * ldm;
    vf x0 = splat(sign * x[0][c * xs]), x1 = splat(sign * x[1][c * xs]);
    vf x2 = splat(sign * x[2][c * xs]), x3 = splat(sign * x[3][c * xs]);
    for (int v = 0; v < nvec; v++) {
      vf mv = ld(m + 16 * v);
      a[0][v] += x0 * mv, a[1][v] += x1 * mv, a[2][v] += x2 * mv, a[3][v] += x3 * mv;
    }
  }
  for (int r = 0; r < 4; r++)
    for (int v = 0; v < nvec; v++) st(out[r] + 16 * v, a[r][v]);
}

/* Rows [c0, c0 + 4) of M -= x^T Y (x [kdim, ...] read transposed with row stride xs, Y [kdim, width]
 * contiguous rows), M's rows ldm apart: the inner parameters' update. */
static inline void update_rows(float *M, int64_t ldm, int c0, const float *x, int64_t xs, int kdim,
                               const float *Y, int width) {
  const float *xr[4] = {x + c0, x + c0 + 1, x + c0 + 2, x + c0 + 3};
  for (int col = 0; col < width; col += 16 * CBV) {
    float *mr[4] = {M + c0 * ldm + col, M + (c0 + 1) * ldm + col, M + (c0 + 2) * ldm + col,
                    M + (c0 + 3) * ldm + col};
    tile(xr, xs, kdim, Y + col, width, CBV, -1.f, (const float *const *)mr, mr);
  }
}

/* out[i] = init[i] + sign * x[i] M for rows i < n (width floats, a multiple of 16 * CBV or at most 64; M's
 * rows ldm apart), x[i] contiguous (missing rows of the last tile read zeros and write to a scratch row).
 * Inlined: width is a constant at every call, and so is the tiles' vector count. */
static inline __attribute__((always_inline)) void rows_times(const float *const *x, int n, int kdim,
                                                              const float *M, int64_t ldm, int width, float sign,
                                                              const float *const *init, float *const *out) {
  const int nb = (width / 16) % CBV == 0 ? CBV : width / 16;
  float scratch[ROWMAX] A64;
  for (int r0 = 0; r0 < n; r0 += 4) {
    const float *xs[4], *is[4];
    float *os[4];
    for (int r = 0; r < 4; r++) {
      int ok = r0 + r < n;
      xs[r] = ok ? x[r0 + r] : zero_row, is[r] = ok ? init[r0 + r] : zero_row, os[r] = ok ? out[r0 + r] : scratch;
    }
    for (int col = 0; col < width; col += 16 * nb) {
      const float *ic[4] = {is[0] + col, is[1] + col, is[2] + col, is[3] + col};
      float *oc[4] = {os[0] + col, os[1] + col, os[2] + col, os[3] + col};
      tile(xs, 1, kdim, M + col, ldm, nb, sign, ic, oc);
    }
  }
}

/* One inner layer's dual-form rows: out[i] = x[i] W + b - sum_{s < n} A[i][s] G[s] for i < nq (W [kdim,
 * width], G [n, width], both with rows width apart; binit: the bias row per output row). */
static inline __attribute__((always_inline)) void dual_rows(const float *const *x, int nq, int kdim, const float *W,
                                                             int width, const float *const *binit,
                                                             const float *const *ar, int n, const float *G,
                                                             float *const *out) {
  rows_times(x, nq, kdim, W, width, width, 1.f, binit, out);
  rows_times(ar, nq, n, G, width, width, -1.f, (const float *const *)out, out);
}

/* xhat = (z - mean) * rstd in place (biased variance, as LayerNorm); returns rstd. */
static inline float normalise(float *z, float eps) {
  float mean, rstd = mean_rstd(z, HD, eps, &mean);
  const vf mv = splat(mean), rs = splat(rstd);
  for (int v = 0; v < NV; v++) st(z + 16 * v, (ld(z + 16 * v) - mv) * rs);
  return rstd;
}

/* 0 * x is 0 for finite x and NaN for inf or NaN (not folded away without -ffast-math); nv vectors. */
static inline int row_finite(const float *x, int nv) {
  vf z = {0};
  for (int v = 0; v < nv; v++) z += ld(x + 16 * v) * 0.f;
  return hsum(z) == 0.f;
}

/* The reconstruction loss's gradient at one row z (HD floats) of the last inner layer's output:
 * gr = J_LN(z)^T (LN(z) - (v - k)) with the head's LayerNorm (gam, bet); z is left holding xhat.
 * Returns whether gr is finite. */
static inline int ln_loss_grad(float *z, const float *k, const float *v, const float *gam, const float *bet,
                               float eps, float *gr) {
  float rstd = normalise(z, eps);
  vf s1 = {0}, s2 = {0};
  for (int u = 0; u < NV; u++) {
    vf xh = ld(z + 16 * u), gm = ld(gam + 16 * u);
    vf resid = (ld(bet + 16 * u) + xh * gm) + (ld(k + 16 * u) - ld(v + 16 * u));
    vf d = resid * gm;
    st(gr + 16 * u, d);
    s1 += d, s2 += d * xh;
  }
  vf m1 = splat(hsum(s1) / HD), m2 = splat(hsum(s2) / HD), rs = splat(rstd);
  for (int u = 0; u < NV; u++) st(gr + 16 * u, (ld(gr + 16 * u) - m1 - ld(z + 16 * u) * m2) * rs);
  return row_finite(gr, NV);
}

/* The dual form's causal weights for rows i in [q0, n): A[i][s] = eta[i] g[s] (x[i - q0] . y[s] + 1) for
 * s <= i, else 0 (x, y rows of nv vectors). */
static inline void causal_weights(float A[MB][MB], int q0, int n, const float *const *x, const float *y,
                                  int64_t ys, int nv, const float *token_eta, const float *g) {
  for (int i = q0; i < n; i++) {
    const float *xi = x[i - q0];
    for (int s = 0; s < MB; s++) {
      float e = 0.f;
      if (s <= i) {
        vf d = {0};
        for (int u = 0; u < nv; u++) d += ld(xi + 16 * u) * ld(y + s * ys + 16 * u);
        e = token_eta[i] * g[s] * (hsum(d) + 1.f);
      }
      A[i][s] = e;
    }
  }
}

/* A complete mini-batch's step of one inner layer: G[s] *= e[s] = eta[MB-1] g[s] (in place), bias -= sum_s
 * G[s], W -= X^T G (W [rows, width]; X [MB, rows] read transposed with row stride xs). */
static inline void layer_step(float *W, float *bias, int rows, int width, const float *X, int64_t xs, float *G,
                              const float *token_eta, const float *g) {
  vf db[ROWMAX / 16] = {{0}};
  for (int s = 0; s < MB; s++) {
    vf e = splat(token_eta[MB - 1] * g[s]);
    for (int u = 0; u < width / 16; u++) {
      vf eg = ld(G + s * width + 16 * u) * e;
      st(G + s * width + 16 * u, eg);
      db[u] += eg;
    }
  }
  for (int u = 0; u < width / 16; u++) st(bias + 16 * u, ld(bias + 16 * u) - db[u]);
  /* tiles of 4 rows of W; X^T's rows are X's columns, read with the row stride */
  for (int c0 = 0; c0 < rows; c0 += 4) update_rows(W, width, c0, X, xs, MB, G, width);
}

/* Everything one call reads and writes (mirrored by `_ScanArgs` in c_scan.py). Strides are in floats
 * (positions: in int64), the channel axis is contiguous everywhere. A call covers L = r + T rows: r
 * buffered tokens of the state (rotated keys in kbuf, values and gates in v and gate) and T new ones.
 * New queries/keys are made here: a depthwise causal conv of width w (kern [w, 2, D], q then k; bias
 * [2, D]) over the source rows, the w - 1 rows of `cache` continuing them on the left, then RoPE with
 * the [MB, HD] tables cosx (cos, pairs repeated) and sinx (-sin, +sin) at row pos % MB (no rotation
 * when cosx is NULL; w = 1 with unit kernels and zero biases passes the rows through). */
typedef struct {
  int64_t H, D, T, r, w;
  const float *qsrc; int64_t qsb, qsh, qst; /* source row of (b, h, new token u): b*qsb + h*qsh + u*qst */
  const float *ksrc; int64_t ksb, ksh, kst;
  const float *cache; int64_t csb, cst;     /* [B, w-1, D] */
  const float *kern, *cbias;
  const int64_t *pos; int64_t psb, pst;     /* [B, T] positions modulo MB */
  const float *cosx, *sinx;
  const float *kbuf; int64_t kbsb, kbsh, kbst; /* [B, H, r, HD] buffered keys (rotated) */
  const float *v; int64_t vsb, vsh, vst;    /* L rows */
  const float *gate; int64_t gsb, gsh, gst; /* L rows */
  const float *token_eta, *ln_w, *ln_b;
  float eps;
  float *W, *bias;                          /* linear: [B*H, HD, HD], [B*H, HD]; MLP: W1 [B*H, HD, 4 HD], b1 */
  float *W2, *bias2;                        /* MLP: [B*H, 4 HD, HD], [B*H, HD] (NULL for linear); updated in place */
  float *out;                               /* [B, T, H, HD] */
  float *k_tail; int64_t n_tail;            /* [B, H, n_tail, HD]: keys of the incomplete last mini-batch */
} scan_args;

/* Row u of the conv input for (b, h): the cache's w - 1 rows, then the sources. */
static inline const float *conv_in(const scan_args *a, const float *src, int64_t sb, int64_t sh, int64_t rs,
                                   int64_t b, int64_t h, int64_t i) {
  return i < a->w - 1 ? a->cache + b * a->csb + i * a->cst + h * HD : src + b * sb + h * sh + (i - (a->w - 1)) * rs;
}

/* New token u's query and key rows of head h: convs, then RoPE (one pass over the conv taps: for
 * TTTLinear both read the same source rows). */
static void make_rows(const scan_args *a, int64_t b, int64_t h, int64_t u, float *qrow, float *krow) {
  vf q[NV], k[NV];
  const float *qb = a->cbias + h * HD, *kb = a->cbias + a->D + h * HD;
  for (int v = 0; v < NV; v++) q[v] = ld(qb + 16 * v), k[v] = ld(kb + 16 * v);
  for (int64_t j = 0; j < a->w; j++) {
    const float *xq = conv_in(a, a->qsrc, a->qsb, a->qsh, a->qst, b, h, u + j);
    const float *xk = conv_in(a, a->ksrc, a->ksb, a->ksh, a->kst, b, h, u + j);
    const float *kq = a->kern + (j * 2) * a->D + h * HD, *kk = kq + a->D;
    for (int v = 0; v < NV; v++) q[v] += ld(kq + 16 * v) * ld(xq + 16 * v), k[v] += ld(kk + 16 * v) * ld(xk + 16 * v);
  }
  if (a->cosx) {
    int64_t p = a->pos[b * a->psb + u * a->pst];
    const float *cs = a->cosx + p * HD, *sn = a->sinx + p * HD;
    for (int v = 0; v < NV; v++) {
      vf c = ld(cs + 16 * v), s = ld(sn + 16 * v);
      vf sq = __builtin_shufflevector(q[v], q[v], 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
      vf sk = __builtin_shufflevector(k[v], k[v], 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
      q[v] = q[v] * c + sq * s, k[v] = k[v] * c + sk * s;
    }
  }
  for (int v = 0; v < NV; v++) st(qrow + 16 * v, q[v]), st(krow + 16 * v, k[v]);
}
/* Rows [j0, j0 + n) of (b, h) for one mini-batch: value rows vr, gates g, keys K (buffered ones copied
 * from kbuf, new ones made with their queries, Q[0..nq) for rows n - nq..n-1, qr pointing at them).
 * Returns nq, or -1 at a non-finite gate. */
static inline int load_rows(const scan_args *a, int64_t b, int64_t h, int64_t j0, int n, const float **vr,
                            float *g, float (*K)[HD], float (*Q)[HD], const float **qr) {
  int nq = 0;
  for (int i = 0; i < n; i++) {
    int64_t t = j0 + i;
    vr[i] = a->v + b * a->vsb + h * a->vsh + t * a->vst;
    g[i] = a->gate[b * a->gsb + h * a->gsh + t * a->gst];
    if (!isfinite(g[i])) return -1;
    if (t < a->r) {
      memcpy(K[i], a->kbuf + b * a->kbsb + h * a->kbsh + t * a->kbst, sizeof K[i]);
    } else {
      make_rows(a, b, h, t - a->r, Q[nq], K[i]);
      qr[nq] = Q[nq], nq++;
    }
  }
  return nq;
}

/* Output row of (b, h) at new token t: q + LN(zq) (zq is normalised in place). */
static inline void emit_row(const scan_args *a, int64_t b, int64_t h, int64_t t, const float *q, float *zq,
                            const float *gam, const float *bet) {
  normalise(zq, a->eps);
  float *o = a->out + ((b * a->T + t) * a->H + h) * HD;
  for (int u = 0; u < NV; u++) st(o + 16 * u, ld(q + 16 * u) + (ld(bet + 16 * u) + ld(zq + 16 * u) * ld(gam + 16 * u)));
}

/* (Batch, head) pairs [bh0, bh1) of B*H through `mini_batch` (the including file's), a mini-batch of every
 * head of a batch row before the next mini-batch: the rows read are then whole contiguous [H * HD] rows of
 * the caller's [B, T, H * HD] tensors (streamed, prefetched), and the heads' inner params stay in L2.
 * Returns 0, or 1 at the first non-finite gate or inner gradient (nothing is then usable). */
static inline int scan_pairs(const scan_args *a, int64_t bh0, int64_t bh1,
                             int (*mini_batch)(const scan_args *, int64_t, int64_t, int64_t, int)) {
  const int64_t H = a->H, L = a->r + a->T;
  for (int64_t b = bh0 / H; b * H < bh1; b++) {
    const int64_t h0 = bh0 > b * H ? bh0 - b * H : 0, h1 = bh1 < (b + 1) * H ? bh1 - b * H : H;
    for (int64_t j0 = 0; j0 < L; j0 += MB) {
      const int n = (int)(L - j0 < MB ? L - j0 : MB);
      for (int64_t h = h0; h < h1; h++)
        if (mini_batch(a, b, h, j0, n)) return 1;
    }
  }
  return 0;
}
#endif
