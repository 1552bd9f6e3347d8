/* TTT-MLP forward scan (no autograd) in C: what `official_port.ops.dual.dual_ttt_mlp` computes (with
 * `c_gelu`), from the layer's projections, as ttt_linear_scan.c does for TTT-Linear (scan_common.h holds
 * what the two share: products, LayerNorm gradient, query/key rows, the walk over heads).
 *
 * Inner model f(k) = gelu(k W1 + b1) W2 + b2, hidden width HID = 4 HD. Per mini-batch (rows i, s < MB;
 * e[i, s] = token_eta[i] * gate[s] for s <= i):
 *   Z1 = K W1 + b1;  X2 = gelu(Z1);  Z2 = X2 W2 + b2;  G2 = J_LN(Z2)^T (LN(Z2) - (V - K))
 *   G1 = (G2 W2^T) * gelu'(Z1)
 *   Zq1 = Q W1 + b1 - (e * tril(Q K^T + 1)) G1;  Xq2 = gelu(Zq1)
 *   Zq2 = Xq2 W2 + b2 - (e * tril(Xq2 X2^T + 1)) G2;  out = Q + LN(Zq2)
 *   complete mini-batch: W1 -= K^T (e[MB-1] G1), b1 -= sum_s e[MB-1, s] G1[s]; the same for W2, b2 with X2, G2.
 * G2 W2^T is made as its transpose W2 G2^T (W2's rows are contiguous; G2^T is MBP columns wide, zero
 * padded), then gathered back with the GELU derivative. The GELU is gelu.h's (the epilogue's).
 * Returns 0, or 1 as soon as a gate or an inner-gradient value is non-finite (the caller then reruns the
 * torch twin).
 */
#ifndef HD
#error "compile with -DHD=<head dim>"
#endif
#define HID (4 * HD)
#define ROWMAX HID
#define MBP ((MB + 15) / 16 * 16) /* mini-batch rows padded to whole vectors */
#include "gelu.h"
#include "scan_common.h"

#if HID % (16 * CBV) != 0 || MBP > 64
#error "unsupported HD or MB"
#endif

/* Mini-batch [j0, j0 + n) of the L rows of (batch b, head h). */
static int mini_batch(const scan_args *a, int64_t b, int64_t h, int64_t j0, int n) {
  const int64_t bh = b * a->H + h;
  const float *gam = a->ln_w + h * HD, *bet = a->ln_b + h * HD, *token_eta = a->token_eta;
  float *W1 = a->W + bh * HD * HID, *b1 = a->bias + bh * HID, *W2 = a->W2 + bh * HID * HD, *b2 = a->bias2 + bh * HD;
  const float *vr[MB], *qr[MB], *kr[MB], *b1r[MB], *b2r[MB], *w2r[HID], *zeros[HID];
  float g[MB], K[MB][HD] A64, Q[MB][HD] A64, Z2[MB][HD] A64, G2[MB][HD] A64, Zq2[MB][HD] A64;
  float Z1[MB][HID] A64, X2[MB][HID] A64, G1[MB][HID] A64, Zq1[MB][HID] A64;
  float G2T[HD][MBP] A64, G1T[HID][MBP] A64;
  float A[MB][MB];
  float *z1r[MB], *x2r[MB], *z2r[MB], *zq1r[MB], *zq2r[MB], *g1tr[HID];
  const int nq = load_rows(a, b, h, j0, n, vr, g, K, Q, qr);
  if (nq < 0) return 1;
  for (int i = 0; i < n; i++) {
    kr[i] = K[i], b1r[i] = b1, b2r[i] = b2;
    z1r[i] = Z1[i], x2r[i] = X2[i], z2r[i] = Z2[i], zq1r[i] = Zq1[i], zq2r[i] = Zq2[i];
  }
  const int q0 = n - nq; /* rows q0..n-1 have queries */
  /* the reconstruction loss's gradients at the mini-batch's starting params */
  rows_times(kr, n, HD, W1, HID, HID, 1.f, b1r, z1r);
  for (int i = 0; i < n; i++) /* X2 = gelu(Z1), and gelu'(Z1) into Z1 (needed only for G1 from here) */
    for (int u = 0; u < HID / 16; u++) {
      vf dz;
      st(X2[i] + 16 * u, gelu_tanh_with_grad(ld(Z1[i] + 16 * u), &dz));
      st(Z1[i] + 16 * u, dz);
    }
  rows_times((const float *const *)x2r, n, HID, W2, HD, HD, 1.f, b2r, z2r);
  for (int i = 0; i < n; i++)
    if (!ln_loss_grad(Z2[i], K[i], vr[i], gam, bet, a->eps, G2[i])) return 1;
  for (int c = 0; c < HD; c++) {
    for (int i = 0; i < MBP; i++) G2T[c][i] = i < n ? G2[i][c] : 0.f;
  }
  for (int j = 0; j < HID; j++) w2r[j] = W2 + j * HD, g1tr[j] = G1T[j], zeros[j] = zero_row;
  /* (G2 W2^T)^T = W2 G2^T: HID rows of W2 times [HD, MBP] */
  rows_times(w2r, HID, HD, &G2T[0][0], MBP, MBP, 1.f, zeros, g1tr);
  for (int i = 0; i < n; i++) {
    for (int u = 0; u < HID / 16; u++) {
      vf col;
      for (int l = 0; l < 16; l++) col[l] = G1T[16 * u + l][i];
      st(G1[i] + 16 * u, col * ld(Z1[i] + 16 * u));
    }
    if (!row_finite(G1[i], HID / 16)) return 1;
  }
  /* dual-form outputs of the rows with queries */
  if (nq) {
    const float *ar[MB];
    for (int i = 0; i < nq; i++) ar[i] = A[q0 + i];
    causal_weights(A, q0, n, qr, &K[0][0], HD, NV, token_eta, g);
    dual_rows(qr, nq, HD, W1, HID, b1r, ar, n, &G1[0][0], zq1r + q0);
    for (int i = q0; i < n; i++)
      for (int u = 0; u < HID / 16; u++) st(Zq1[i] + 16 * u, gelu_tanh(ld(Zq1[i] + 16 * u)));
    causal_weights(A, q0, n, (const float *const *)(zq1r + q0), &X2[0][0], HID, HID / 16, token_eta, g);
    dual_rows((const float *const *)(zq1r + q0), nq, HID, W2, HD, b2r, ar, n, &G2[0][0], zq2r + q0);
    for (int i = q0; i < n; i++) emit_row(a, b, h, j0 + i - a->r, qr[i - q0], Zq2[i], gam, bet);
  }
  if (n < MB) { /* incomplete: no update; its keys go back to the state */
    for (int i = 0; i < n; i++) memcpy(a->k_tail + (bh * a->n_tail + i) * HD, K[i], sizeof K[i]);
    return 0;
  }
  /* a complete mini-batch moves the params */
  layer_step(W1, b1, HD, HID, &K[0][0], HD, &G1[0][0], token_eta, g);
  layer_step(W2, b2, HID, HD, &X2[0][0], HID, &G2[0][0], token_eta, g);
  return 0;
}

int ttt_mlp_scan(const void *args, int64_t bh0, int64_t bh1) { return scan_pairs(args, bh0, bh1, mini_batch); }

/* All B*H pairs, in nt ranges on OpenMP threads (see threads.h). */
int ttt_mlp_scan_threads(const scan_args *a, int64_t BH, int64_t nt) { return run_ranges(ttt_mlp_scan, a, BH, nt); }
