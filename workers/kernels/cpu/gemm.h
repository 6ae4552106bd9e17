/* Small GEMMs over transposed weights, float32, shared by the CPU kernels.
 *
 * A weight is read as `[K, N]` row-major (the transpose of a torch Linear's `[out, in]`), so
 * each output row is a sum of weight rows scaled by one input value: tiles of up to 4 input
 * rows x 64 outputs accumulate in registers with no horizontal sums, and each weight row read
 * serves all the tile's rows. Input rows are given by pointers, so gathered rows (a MoE
 * expert's tokens) cost no copy.
 */
#ifndef PDS_GEMM_H
#define PDS_GEMM_H

#include <math.h>

#include "vec.h"

#define TILE_ROWS 4

/* c[r, :16 * NV] = sum_k a[r][k] * b[k, :16 * NV] for r < rows <= TILE_ROWS (b's rows ldb
 * apart), in registers: NV is a constant at each call, so the loops unroll. Missing rows read
 * row 0 and are not stored. */
static inline __attribute__((always_inline)) void tile(int rows, const float *const *a,
                                                       int64_t K, const float *b, int64_t ldb,
                                                       const int NV, float *c, int64_t ldc) {
  const float *ar[TILE_ROWS] = {a[0], a[rows > 1], a[rows > 2 ? 2 : 0], a[rows > 3 ? 3 : 0]};
  v16 acc[TILE_ROWS][4] = {{{0}}};
  for (int64_t k = 0; k < K; k++) {
    const float *bk = b + k * ldb;
    v16 bv[4];
    for (int i = 0; i < NV; i++) bv[i] = ld(bk + 16 * i);
    for (int r = 0; r < TILE_ROWS; r++) {
      const v16 x = splat(ar[r][k]);
      for (int i = 0; i < NV; i++) acc[r][i] += x * bv[i];
    }
  }
  for (int r = 0; r < rows; r++)
    for (int i = 0; i < NV; i++) st(c + r * ldc + 16 * i, acc[r][i]);
}

/* c[r, :N] = a[r] @ b for r < rows <= TILE_ROWS, b: [K, N] row-major: column blocks of 64,
 * then of 16, then the last N % 16 columns one by one. */
static inline void gemm_rows(int rows, const float *const *a, int64_t K, const float *b,
                             int64_t N, float *c, int64_t ldc) {
  int64_t n = 0;
  for (; n + 64 <= N; n += 64) tile(rows, a, K, b + n, N, 4, c + n, ldc);
  for (; n + 16 <= N; n += 16) tile(rows, a, K, b + n, N, 1, c + n, ldc);
  for (int r = 0; r < rows && n < N; r++) {
    float *cr = c + r * ldc;
    for (int64_t j = n; j < N; j++) {
      float sum = 0.0f;
      for (int64_t k = 0; k < K; k++) sum += a[r][k] * b[k * N + j];
      cr[j] = sum;
    }
  }
}

/* SwiGLU of up to TILE_ROWS rows: down[r] = (silu(x_r @ gate) * (x_r @ up) * scale_r) @ w2t,
 * with w13t: [hidden, 2 * inter] (gate columns, then up), w2t: [inter, hidden], scale NULL
 * for 1. gate_up: scratch [TILE_ROWS, 2 * inter]; down: [rows, hidden]. */
static inline void swiglu_rows(int rows, const float *const *x, int64_t hidden,
                               const float *w13t, const float *w2t, int64_t inter,
                               const float *scale, float *gate_up, float *down) {
  const float *act[TILE_ROWS];
  gemm_rows(rows, x, hidden, w13t, 2 * inter, gate_up, 2 * inter);
  for (int r = 0; r < rows; r++) {
    float *g = gate_up + r * 2 * inter, *u = g + inter;
    const float w = scale ? scale[r] : 1.0f;
    int64_t j = 0;
    for (; j + 16 <= inter; j += 16) {
      v16 gv = ld(g + j);
      st(g + j, gv / (splat(1.0f) + exp16(-gv)) * ld(u + j) * splat(w));
    }
    for (; j < inter; j++) g[j] = g[j] / (1.0f + expf(-g[j])) * u[j] * w;
    act[r] = g;
  }
  gemm_rows(rows, act, inter, w2t, hidden, down, hidden);
}

static inline void add_to(float *y, const float *x, int64_t n) { axpy(y, 1.0f, x, n); }

#endif
