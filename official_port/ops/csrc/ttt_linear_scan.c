/* TTT-Linear forward scan (no autograd) in C: the CPU twin of the Triton forward kernel, computing
 * what `official_port.ops.dual.dual_ttt_linear` computes, from the layer's projections (its causal
 * convs and RoPE are applied here, row by row, so their outputs never exist as full tensors).
 *
 * Per mini-batch (rows i, s < MB; e[i, s] = token_eta[i] * gate[s] for s <= i):
 *   Z  = K W + b;   R = LN(Z) - (V - K);   G = J_LN(Z)^T R
 *   Zb = Q W + b - (e * tril(Q K^T + 1)) G;   out = Q + LN(Zb)
 *   complete mini-batch:  W -= K^T (e[MB-1] * G),  b -= sum_s e[MB-1, s] G[s]
 * Each mini-batch of a batch row walks its heads (`ttt_linear_scan`), so the heads' W (H x HD x HD
 * floats) stay in L2 across the scan; torch's version of the same loop spends most of its time in the
 * fixed cost of ~10 small ops per mini-batch and in passes over large temporaries.
 *
 * HD (head dim, a multiple of 16) and MB (mini-batch size) are compile-time constants (-DHD= -DMB=).
 * Every product is a tile of 4 rows whose accumulators stay in vector registers (GCC/clang vector
 * extensions: 16 floats, one AVX-512 register or two AVX2 ones). Sums run in a fixed order without
 * -ffast-math (which would also break isfinite).
 * Returns 0, or 1 as soon as a gate or an inner-gradient value is non-finite: the caller then reruns
 * the torch twin, which isolates such rows as the official code's values require.
 */
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

#define NV (HD / 16)              /* vectors per row of HD floats */
#define A64 __attribute__((aligned(64)))

static const float zero_row[HD > MB ? HD : MB] A64;

/* The product kernel: out[r] = init[r] + sign * sum_{c < kdim} x[r][c * xs] * M[c] for 4 rows r of
 * HD floats (M rows are HD apart; xs > 1 reads x transposed). init and out may be the same rows. */
static inline void tile(const float *const x[4], int64_t xs, int kdim, const float *M, float sign,
                        const float *const init[4], float *const out[4]) {
  vf a[4][NV];
  for (int r = 0; r < 4; r++)
    for (int v = 0; v < NV; v++) a[r][v] = ld(init[r] + 16 * v);
  for (int c = 0; c < kdim; c++) {
    const float *m = M + c * HD;
    vf x0 = splat(sign * x[0][c * xs]), x1 = splat(sign * x[1][c * xs]);
    vf x2 = splat(sign * x[2][c * xs]), x3 = splat(sign * x[3][c * xs]);
    for (int v = 0; v < NV; v++) {
      vf mv = ld(m + 16 * v);
      a[0][v] += x0 * mv, a[1][v] += x1 * mv, a[2][v] += x2 * mv, a[3][v] += x3 * mv;
    }
  }
  for (int r = 0; r < 4; r++)
    for (int v = 0; v < NV; v++) st(out[r] + 16 * v, a[r][v]);
}

/* out[i] = init[i] + sign * x[i] M for rows i < n, x[i] contiguous (missing rows of the last tile
 * read zeros and write to a scratch row). */
static void rows_times(const float *const *x, int n, int kdim, const float *M, float sign,
                       const float *const *init, float *const *out) {
  float scratch[HD] A64;
  for (int r0 = 0; r0 < n; r0 += 4) {
    const float *xs[4], *is[4];
    float *os[4];
    for (int r = 0; r < 4; r++) {
      int ok = r0 + r < n;
      xs[r] = ok ? x[r0 + r] : zero_row, is[r] = ok ? init[r0 + r] : zero_row, os[r] = ok ? out[r0 + r] : scratch;
    }
    tile(xs, 1, kdim, M, sign, is, os);
  }
}

/* xhat = (z - mean) * rstd in place (biased variance, as LayerNorm); returns rstd. */
static inline float normalise(float *z, float eps) {
  float mean, rstd = mean_rstd(z, HD, eps, &mean);
  const vf mv = splat(mean), rs = splat(rstd);
  for (int v = 0; v < NV; v++) st(z + 16 * v, (ld(z + 16 * v) - mv) * rs);
  return rstd;
}

/* 0 * x is 0 for finite x and NaN for inf or NaN (not folded away without -ffast-math). */
static inline int row_finite(const float *x) {
  vf z = {0};
  for (int v = 0; v < NV; v++) z += ld(x + 16 * v) * 0.f;
  return hsum(z) == 0.f;
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
  float *W, *bias;                          /* [B*H, HD, HD], [B*H, HD], updated in place */
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

/* Mini-batch [j0, j0 + n) of the L rows of (batch b, head h). */
static int mini_batch(const scan_args *a, int64_t b, int64_t h, int64_t j0, int n) {
  const int64_t bh = b * a->H + h;
  const float *gam = a->ln_w + h * HD, *bet = a->ln_b + h * HD, *token_eta = a->token_eta;
  float *Wh = a->W + bh * HD * HD, *bh_bias = a->bias + bh * HD;
  const float *vr[MB], *qr[MB], *kr[MB], *br[MB];
  float g[MB], K[MB][HD] A64, Q[MB][HD] A64, Z[MB][HD] A64, G[MB][HD] A64, Zq[MB][HD] A64;
  float A[MB][MB];
  float *zr[MB], *zqr[MB];
  int nq = 0;
  for (int i = 0; i < n; i++) {
    int64_t t = j0 + i;
    vr[i] = a->v + b * a->vsb + h * a->vsh + t * a->vst;
    g[i] = a->gate[b * a->gsb + h * a->gsh + t * a->gst];
    if (!isfinite(g[i])) return 1;
    if (t < a->r) {
      memcpy(K[i], a->kbuf + b * a->kbsb + h * a->kbsh + t * a->kbst, sizeof K[i]);
    } else {
      make_rows(a, b, h, t - a->r, Q[nq], K[i]);
      qr[nq] = Q[nq], nq++;
    }
    kr[i] = K[i], br[i] = bh_bias, zr[i] = Z[i], zqr[i] = Zq[i];
  }
  const int q0 = n - nq; /* rows q0..n-1 have queries */
  /* gradient of the reconstruction loss at the mini-batch's starting W */
  rows_times(kr, n, HD, Wh, 1.f, br, zr);
  for (int i = 0; i < n; i++) {
    float *z = Z[i], *gr = G[i];
    float rstd = normalise(z, a->eps); /* z now holds xhat */
    vf s1 = {0}, s2 = {0};
    for (int u = 0; u < NV; u++) {
      vf xh = ld(z + 16 * u), gm = ld(gam + 16 * u);
      vf resid = (ld(bet + 16 * u) + xh * gm) + (ld(K[i] + 16 * u) - ld(vr[i] + 16 * u));
      vf d = resid * gm;
      st(gr + 16 * u, d);
      s1 += d, s2 += d * xh;
    }
    vf m1 = splat(hsum(s1) / HD), m2 = splat(hsum(s2) / HD), rs = splat(rstd);
    for (int u = 0; u < NV; u++) st(gr + 16 * u, (ld(gr + 16 * u) - m1 - ld(z + 16 * u) * m2) * rs);
    if (!row_finite(gr)) return 1;
  }
  /* dual-form outputs of the rows with queries: Q W + b - (e * tril(Q K^T + 1)) G, then Q + LN(.) */
  if (nq) {
    for (int i = q0; i < n; i++) {
      const float *qi = qr[i - q0];
      for (int s = 0; s < MB; s++) {
        float e = 0.f;
        if (s <= i) {
          vf d = {0};
          for (int u = 0; u < NV; u++) d += ld(qi + 16 * u) * ld(K[s] + 16 * u);
          e = token_eta[i] * g[s] * (hsum(d) + 1.f);
        }
        A[i][s] = e;
      }
    }
    const float *ar[MB];
    for (int i = 0; i < nq; i++) ar[i] = A[q0 + i];
    rows_times(qr, nq, HD, Wh, 1.f, br, zqr + q0);
    rows_times(ar, nq, n, &G[0][0], -1.f, (const float *const *)(zqr + q0), zqr + q0);
    for (int i = q0; i < n; i++) {
      float *zq = Zq[i];
      normalise(zq, a->eps);
      float *o = a->out + ((b * a->T + (j0 + i - a->r)) * a->H + h) * HD;
      for (int u = 0; u < NV; u++)
        st(o + 16 * u, ld(qr[i - q0] + 16 * u) + (ld(bet + 16 * u) + ld(zq + 16 * u) * ld(gam + 16 * u)));
    }
  }
  if (n < MB) { /* incomplete: no update; its keys go back to the state */
    for (int i = 0; i < n; i++) memcpy(a->k_tail + (bh * a->n_tail + i) * HD, K[i], sizeof K[i]);
    return 0;
  }
  /* a complete mini-batch moves the params */
  vf db[NV] = {{0}};
  for (int s = 0; s < MB; s++) {
    vf e = splat(token_eta[MB - 1] * g[s]);
    for (int u = 0; u < NV; u++) {
      vf eg = ld(G[s] + 16 * u) * e;
      st(G[s] + 16 * u, eg);
      db[u] += eg;
    }
  }
  for (int u = 0; u < NV; u++) st(bh_bias + 16 * u, ld(bh_bias + 16 * u) - db[u]);
  /* W -= K^T (e G): tiles of 4 rows of W; K^T's rows are K's columns, read with the row stride */
  for (int c0 = 0; c0 < HD; c0 += 4) {
    const float *xs[4] = {&K[0][c0], &K[0][c0 + 1], &K[0][c0 + 2], &K[0][c0 + 3]};
    float *wr[4] = {Wh + c0 * HD, Wh + (c0 + 1) * HD, Wh + (c0 + 2) * HD, Wh + (c0 + 3) * HD};
    tile(xs, HD, MB, &G[0][0], -1.f, (const float *const *)wr, wr);
  }
  return 0;
}

/* (Batch, head) pairs [bh0, bh1) of B*H, a mini-batch of every head of a batch row before the next
 * mini-batch: the rows read are then whole contiguous [H * HD] rows of the caller's [B, T, H * HD]
 * tensors (streamed, prefetched), and the heads' W (H * HD * HD floats) stay in L2.
 * Returns 0, or 1 at the first non-finite gate or inner gradient (nothing is then usable). */
int ttt_linear_scan(const void *args, int64_t bh0, int64_t bh1) {
  const scan_args *a = args;
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

/* All B*H pairs, in nt ranges on OpenMP threads (see threads.h). */
int ttt_linear_scan_threads(const scan_args *a, int64_t BH, int64_t nt) { return run_ranges(ttt_linear_scan, a, BH, nt); }
