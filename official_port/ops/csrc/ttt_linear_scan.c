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
#include "scan_common.h"

/* Mini-batch [j0, j0 + n) of the L rows of (batch b, head h). */
static int mini_batch(const scan_args *a, int64_t b, int64_t h, int64_t j0, int n) {
  const int64_t bh = b * a->H + h;
  const float *gam = a->ln_w + h * HD, *bet = a->ln_b + h * HD, *token_eta = a->token_eta;
  float *Wh = a->W + bh * HD * HD, *bh_bias = a->bias + bh * HD;
  const float *vr[MB], *qr[MB], *kr[MB], *br[MB];
  float g[MB], K[MB][HD] A64, Q[MB][HD] A64, Z[MB][HD] A64, G[MB][HD] A64, Zq[MB][HD] A64;
  float A[MB][MB];
  float *zr[MB], *zqr[MB];
  const int nq = load_rows(a, b, h, j0, n, vr, g, K, Q, qr);
  if (nq < 0) return 1;
  for (int i = 0; i < n; i++) kr[i] = K[i], br[i] = bh_bias, zr[i] = Z[i], zqr[i] = Zq[i];
  const int q0 = n - nq; /* rows q0..n-1 have queries */
  /* gradient of the reconstruction loss at the mini-batch's starting W */
  rows_times(kr, n, HD, Wh, HD, HD, 1.f, br, zr);
  for (int i = 0; i < n; i++)
    if (!ln_loss_grad(Z[i], K[i], vr[i], gam, bet, a->eps, G[i])) return 1;
  /* dual-form outputs of the rows with queries: Q W + b - (e * tril(Q K^T + 1)) G, then Q + LN(.) */
  if (nq) {
    causal_weights(A, q0, n, qr, &K[0][0], HD, NV, token_eta, g);
    const float *ar[MB];
    for (int i = 0; i < nq; i++) ar[i] = A[q0 + i];
    dual_rows(qr, nq, HD, Wh, HD, br, ar, n, &G[0][0], zqr + q0);
    for (int i = q0; i < n; i++) emit_row(a, b, h, j0 + i - a->r, qr[i - q0], Zq[i], gam, bet);
  }
  if (n < MB) { /* incomplete: no update; its keys go back to the state */
    for (int i = 0; i < n; i++) memcpy(a->k_tail + (bh * a->n_tail + i) * HD, K[i], sizeof K[i]);
    return 0;
  }
  /* a complete mini-batch moves the params: W -= K^T (e G), b -= sum_s e[s] G[s] */
  layer_step(Wh, bh_bias, HD, HD, &K[0][0], HD, &G[0][0], token_eta, g);
  return 0;
}

int ttt_linear_scan(const void *args, int64_t bh0, int64_t bh1) { return scan_pairs(args, bh0, bh1, mini_batch); }

/* All B*H pairs, in nt ranges on OpenMP threads (see threads.h). */
int ttt_linear_scan_threads(const scan_args *a, int64_t BH, int64_t nt) { return run_ranges(ttt_linear_scan, a, BH, nt); }
