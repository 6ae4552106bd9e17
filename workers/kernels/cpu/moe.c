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
 * Experts run in parallel (each pick's result goes to its own row), then tokens: each sums its
 * picks in ascending expert order, the order a serial pass over the experts adds them in, so
 * the result does not depend on the thread count.
 *
 * Returns 0, PDS_BAD_INDEX when an id is outside [0, E) (out is then unspecified), or
 * PDS_NO_MEMORY.
 */
#include <stdlib.h>

#include "gemm.h"
#include "kernels.h"

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
  const int threads = pds_num_threads;
  int64_t *starts = calloc((size_t)(num_experts + 1), sizeof(int64_t));
  /* order[i]: the pick at sorted position i; at[p]: the sorted position of pick p. */
  int64_t *order = malloc(sizeof(int64_t) * (size_t)(2 * num_picks + 1)), *at = order + num_picks;
  float *gate_up = malloc(sizeof(float) * (size_t)(threads * TILE_ROWS * 2 * inter));
  float *down = malloc(sizeof(float) * (size_t)(num_picks * hidden + 1)); /* by position */
  int status = (starts && order && gate_up && down) ? 0 : PDS_NO_MEMORY;
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
    for (int64_t i = 0; i < num_picks; i++) at[order[i]] = i;
  }
  const int64_t num_experts_run = status ? 0 : num_experts;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && num_experts_run > 1)
  for (int64_t e = 0; e < num_experts_run; e++) {
    const float *w13 = w13t + e * hidden * 2 * inter;
    const float *w2 = w2t + e * inter * hidden;
    float *scratch = gate_up + pds_thread() * TILE_ROWS * 2 * inter;
    for (int64_t i = starts[e]; i < starts[e + 1]; i += TILE_ROWS) {
      int rows = starts[e + 1] - i < TILE_ROWS ? (int)(starts[e + 1] - i) : TILE_ROWS;
      const float *xr[TILE_ROWS];
      float scale[TILE_ROWS];
      for (int r = 0; r < rows; r++) {
        xr[r] = x + (order[i + r] / top_k) * hidden;
        scale[r] = weights[order[i + r]];
      }
      swiglu_rows(rows, xr, hidden, w13, w2, inter, scale, scratch, down + i * hidden);
    }
  }
  const int64_t num_tokens_run = status ? 0 : num_tokens;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && num_tokens_run > 1)
  for (int64_t t = 0; t < num_tokens_run; t++) {
    float *o = out + t * hidden;
    memset(o, 0, sizeof(float) * (size_t)hidden);
    /* Sorted positions grow with the expert id: add the picks smallest position first. */
    int64_t last = -1;
    for (int64_t n = 0; n < top_k; n++) {
      int64_t next = -1;
      for (int64_t k = 0; k < top_k; k++) {
        const int64_t i = at[t * top_k + k];
        if (i > last && (next < 0 || i < next)) next = i;
      }
      add_to(o, down + next * hidden, hidden);
      last = next;
    }
  }
  free(starts);
  free(order);
  free(gate_up);
  free(down);
  return status;
}
