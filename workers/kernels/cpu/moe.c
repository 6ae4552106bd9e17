/* Routed experts of a MoE layer, float32, for CPUs: sorting by expert, both GEMMs,
 * SiLU-and-mul and the weighted sum into each token's row in one call.
 *
 *   out[t] = sum_k w[t, k] * down_e(silu(gate_e(x[t])) * up_e(x[t])),  e = ids[t, k]
 *
 * Weights are read transposed, `w13t: [E, hidden, 2 * inter]` (gate columns, then up) and
 * `w2t: [E, inter, hidden]`, so each output row is a sum of weight rows scaled by one input
 * value: tiles of 4 tokens x 64 outputs accumulate in registers with no horizontal sums, and
 * every weight row read serves the four tokens (the torch path instead runs one small GEMM
 * per expert, each paying a call's overhead, plus a sort, gathers and a scatter around them).
 *
 * Returns 0, PDS_BAD_INDEX when an id is outside [0, E) (out is then unspecified), or
 * PDS_NO_MEMORY.
 */
#include <math.h>
#include <stdlib.h>

#include "vec.h"

#define TILE_ROWS 4

/* c[r, :n] = sum_k a[r][k] * b[k, :n] for r < rows <= TILE_ROWS, n <= 64 (b's rows ldb apart).
 * Missing rows read row 0 and are not stored. */
static void tile(int rows, const float *const *a, int64_t K, const float *b, int64_t ldb,
                 int64_t n, float *c, int64_t ldc) {
  const float *a0 = a[0], *a1 = a[rows > 1], *a2 = a[rows > 2 ? 2 : 0], *a3 = a[rows > 3 ? 3 : 0];
  if (n == 64) {
    v16 c00 = {0}, c01 = {0}, c02 = {0}, c03 = {0}, c10 = {0}, c11 = {0}, c12 = {0}, c13 = {0};
    v16 c20 = {0}, c21 = {0}, c22 = {0}, c23 = {0}, c30 = {0}, c31 = {0}, c32 = {0}, c33 = {0};
    for (int64_t k = 0; k < K; k++) {
      const float *bk = b + k * ldb;
      v16 b0 = ld(bk), b1 = ld(bk + 16), b2 = ld(bk + 32), b3 = ld(bk + 48);
      v16 x = splat(a0[k]);
      c00 += x * b0, c01 += x * b1, c02 += x * b2, c03 += x * b3;
      x = splat(a1[k]);
      c10 += x * b0, c11 += x * b1, c12 += x * b2, c13 += x * b3;
      x = splat(a2[k]);
      c20 += x * b0, c21 += x * b1, c22 += x * b2, c23 += x * b3;
      x = splat(a3[k]);
      c30 += x * b0, c31 += x * b1, c32 += x * b2, c33 += x * b3;
    }
    v16 acc[TILE_ROWS][4] = {
        {c00, c01, c02, c03}, {c10, c11, c12, c13}, {c20, c21, c22, c23}, {c30, c31, c32, c33}};
    for (int r = 0; r < rows; r++)
      for (int i = 0; i < 4; i++) st(c + r * ldc + 16 * i, acc[r][i]);
    return;
  }
  for (int r = 0; r < rows; r++) {
    const float *ar = a[r];
    float *cr = c + r * ldc;
    memset(cr, 0, sizeof(float) * (size_t)n);
    for (int64_t k = 0; k < K; k++) {
      const float *bk = b + k * ldb;
      for (int64_t j = 0; j < n; j++) cr[j] += ar[k] * bk[j];
    }
  }
}

/* c[r, :N] = a[r] @ b, b: [K, N] row-major, in column blocks of 64. */
static void gemm_rows(int rows, const float *const *a, int64_t K, const float *b, int64_t N,
                      float *c, int64_t ldc) {
  for (int64_t n = 0; n < N; n += 64)
    tile(rows, a, K, b + n, N, N - n < 64 ? N - n : 64, c + n, ldc);
}

int pds_moe_experts_f32(const float *x,        /* [T, hidden] */
                        int64_t num_tokens, int64_t hidden,
                        const int64_t *ids,    /* [T, top_k] expert of each pick */
                        const float *weights,  /* [T, top_k] */
                        int64_t top_k,
                        const float *w13t,     /* [E, hidden, 2 * inter] */
                        const float *w2t,      /* [E, inter, hidden] */
                        int64_t num_experts, int64_t inter,
                        float *out)            /* [T, hidden], overwritten */
{
  const int64_t num_picks = num_tokens * top_k;
  memset(out, 0, sizeof(float) * (size_t)(num_tokens * hidden));
  int64_t *starts = calloc((size_t)(num_experts + 1), sizeof(int64_t));
  int64_t *order = malloc(sizeof(int64_t) * (size_t)(num_picks ? num_picks : 1));
  float *gate_up = malloc(sizeof(float) * (size_t)(TILE_ROWS * (2 * inter + hidden)));
  int status = (starts && order && gate_up) ? 0 : PDS_NO_MEMORY;
  for (int64_t p = 0; p < num_picks && !status; p++) {
    if (ids[p] < 0 || ids[p] >= num_experts) status = PDS_BAD_INDEX;
    else starts[ids[p] + 1]++;
  }
  if (!status) {
    for (int64_t e = 0; e < num_experts; e++) starts[e + 1] += starts[e];
    /* Counting sort of the picks by expert (stable: token order within an expert). */
    for (int64_t p = 0; p < num_picks; p++) order[starts[ids[p]]++] = p;
    for (int64_t e = num_experts; e > 0; e--) starts[e] = starts[e - 1];
    starts[0] = 0;
  }
  float *down = gate_up + TILE_ROWS * 2 * inter;
  for (int64_t e = 0; e < num_experts && !status; e++) {
    const float *w13 = w13t + e * hidden * 2 * inter;
    const float *w2 = w2t + e * inter * hidden;
    for (int64_t i = starts[e]; i < starts[e + 1]; i += TILE_ROWS) {
      int rows = starts[e + 1] - i < TILE_ROWS ? (int)(starts[e + 1] - i) : TILE_ROWS;
      const float *xr[TILE_ROWS], *act[TILE_ROWS];
      for (int r = 0; r < rows; r++) xr[r] = x + (order[i + r] / top_k) * hidden;
      gemm_rows(rows, xr, hidden, w13, 2 * inter, gate_up, 2 * inter);
      /* act = silu(gate) * up * weight, written over the gate half. */
      for (int r = 0; r < rows; r++) {
        float *g = gate_up + r * 2 * inter, *u = g + inter;
        const float w = weights[order[i + r]];
        int64_t j = 0;
        for (; j + 16 <= inter; j += 16) {
          v16 gv = ld(g + j);
          st(g + j, gv / (splat(1.0f) + exp16(-gv)) * ld(u + j) * splat(w));
        }
        for (; j < inter; j++) g[j] = g[j] / (1.0f + expf(-g[j])) * u[j] * w;
        act[r] = g;
      }
      gemm_rows(rows, act, inter, w2, hidden, down, hidden);
      for (int r = 0; r < rows; r++) {
        float *o = out + (order[i + r] / top_k) * hidden;
        const float *d = down + r * hidden;
        int64_t j = 0;
        for (; j + 16 <= hidden; j += 16) st(o + j, ld(o + j) + ld(d + j));
        for (; j < hidden; j++) o[j] += d[j];
      }
    }
  }
  free(starts);
  free(order);
  free(gate_up);
  return status;
}
