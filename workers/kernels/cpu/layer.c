/* Whole blocks of a decoder layer for a decode batch, float32, for CPUs: the attention block
 * (MLA, absorbed form) and the feed-forward blocks (dense SwiGLU; V3 MoE with its router,
 * routed and shared experts), each in one call.
 *
 * Why: on a CPU a decode step of a small model is bound by per-op overhead. The torch path
 * runs some fifty ops per layer (views, splits, cats, rope, small GEMMs), each paying Python
 * and dispatcher costs of a few microseconds; here a layer is four calls. The GEMMs are the
 * register-tiled ones of gemm.h over weights stored transposed (`[in, out]`).
 */
#include <stdlib.h>

#include "gemm.h"
#include "kernels.h"

/* The attention weights and shapes of one layer, fixed once the model is placed. */
struct pds_mla_weights {
  int64_t hidden, q_lora, heads, nope, rope, v, kv_lora; /* q_lora 0: no q compression */
  int64_t max_positions;
  const float *w_a_t;   /* [hidden, qa + kv_lora + rope]: q_a (or q) and kv_a, fused */
  const float *q_norm;  /* [q_lora], or NULL */
  const float *w_qb_t;  /* [q_lora, heads * (nope + rope)], or NULL */
  const float *kv_norm; /* [kv_lora] */
  const float *w_kvb;   /* [heads, nope + v, kv_lora]: W_UK rows, then W_UV rows */
  const float *w_o_t;   /* [heads * v, hidden] */
  const float *cos;     /* [max_positions, rope / 2], attention factor applied */
  const float *sin;
  float q_norm_eps, kv_norm_eps, scale;
  int32_t interleave; /* rope pairs (2i, 2i+1) rather than (i, i + rope/2) */
};

/* Rotate x[:rope] at one position into out in "half" layout (the torch path's). */
static void rotate(const struct pds_mla_weights *w, const float *x, int64_t pos, float *out) {
  const int64_t half = w->rope / 2;
  const float *c = w->cos + pos * half, *s = w->sin + pos * half;
  for (int64_t i = 0; i < half; i++) {
    const float x1 = w->interleave ? x[2 * i] : x[i];
    const float x2 = w->interleave ? x[2 * i + 1] : x[half + i];
    out[i] = x1 * c[i] - x2 * s[i];
    out[half + i] = x2 * c[i] + x1 * s[i];
  }
}

/* Threads of the parallel loops below and in the other kernel files (see kernels.h). */
int pds_num_threads = 1;

/* Set the kernels' thread count; returns the count in effect (1 without OpenMP). */
int pds_set_num_threads(int n) {
#ifdef _OPENMP
  pds_num_threads = n > 1 ? n : 1;
#else
  (void)n;
  pds_num_threads = 1;
#endif
  return pds_num_threads;
}

/* Rows [b0, b0 + rows) of the attention block's first half: project, write each token's
 * cache row and its absorbed query q_full[b] = [q_nope[h] @ W_UK[h], rope(q_pe[h])] per head.
 * a: scratch [TILE_ROWS, na], q: [TILE_ROWS, heads * qk]. */
static int project_rows(const struct pds_mla_weights *w, const float *x, int64_t b0, int rows,
                        const int64_t *positions, const int64_t *out_slots, float *cache,
                        int64_t num_slots, float *a, float *q, float *q_full) {
  const int64_t H = w->heads, qk = w->nope + w->rope, dim = w->kv_lora + w->rope;
  const int64_t qa = w->q_lora ? w->q_lora : H * qk, na = qa + w->kv_lora + w->rope;
  const float *xr[TILE_ROWS], *qr[TILE_ROWS];
  for (int r = 0; r < rows; r++) xr[r] = x + (b0 + r) * w->hidden;
  gemm_rows(rows, xr, w->hidden, w->w_a_t, na, a, na);
  if (w->q_lora) {
    for (int r = 0; r < rows; r++) {
      pds_rms_norm_f32(a + r * na, na, w->q_norm, 1, w->q_lora, w->q_norm_eps, a + r * na);
      xr[r] = a + r * na;
    }
    gemm_rows(rows, xr, w->q_lora, w->w_qb_t, H * qk, q, H * qk);
    for (int r = 0; r < rows; r++) qr[r] = q + r * H * qk;
  } else {
    for (int r = 0; r < rows; r++) qr[r] = a + r * na;
  }
  for (int r = 0; r < rows; r++) {
    const int64_t b = b0 + r, pos = positions[b], slot = out_slots[b];
    if (pos < 0 || pos >= w->max_positions || slot < 0 || slot >= num_slots) return PDS_BAD_INDEX;
    const float *ar = a + r * na;
    float *row = cache + slot * dim;
    pds_rms_norm_f32(ar + qa, na, w->kv_norm, 1, w->kv_lora, w->kv_norm_eps, row);
    rotate(w, ar + qa + w->kv_lora, pos, row + w->kv_lora);
    for (int64_t h = 0; h < H; h++) {
      const float *qn = qr[r] + h * qk;
      const float *w_uk = w->w_kvb + h * (w->nope + w->v) * w->kv_lora;
      float *qf = q_full + (b * H + h) * dim;
      memset(qf, 0, sizeof(float) * (size_t)w->kv_lora);
      for (int64_t i = 0; i < w->nope; i++) axpy(qf, qn[i], w_uk + i * w->kv_lora, w->kv_lora);
      rotate(w, qn + w->nope, pos, qf + w->kv_lora);
    }
  }
  return 0;
}

/* Rows [b0, b0 + rows) of the second half: attention over each token's context, W_UV, then
 * o_proj into out. Scratch: scores [heads, max_len + 1], latent [heads, kv_lora],
 * o [TILE_ROWS, heads * v]. */
static int attend_rows(const struct pds_mla_weights *w, const float *q_full, int64_t b0,
                       int rows, const float *cache, int64_t num_slots,
                       const int32_t *block_table, int64_t max_pages, const int32_t *seq_lens,
                       int64_t page_size, float *scores, float *latent, float *o, float *out) {
  const int64_t H = w->heads, dim = w->kv_lora + w->rope, max_len = max_pages * page_size;
  const float *orows[TILE_ROWS];
  for (int r = 0; r < rows; r++) {
    const int64_t b = b0 + r, len = seq_lens[b] < max_len ? seq_lens[b] : max_len;
    int status = pds_mla_attend_f32(q_full + b * H * dim, cache, num_slots,
                                    block_table + b * max_pages, len, H, dim, w->kv_lora,
                                    page_size, w->scale, scores, latent);
    if (status) return status;
    float *orow = o + r * H * w->v;
    for (int64_t h = 0; h < H; h++) {
      const float *w_uv = w->w_kvb + (h * (w->nope + w->v) + w->nope) * w->kv_lora;
      const float *lat = latent + h * w->kv_lora;
      int64_t j = 0;
      for (; j + 4 <= w->v; j += 4) dot4(w_uv + j * w->kv_lora, w->kv_lora, lat, w->kv_lora, orow + h * w->v + j);
      for (; j < w->v; j++) orow[h * w->v + j] = dot(w_uv + j * w->kv_lora, lat, w->kv_lora);
    }
    orows[r] = orow;
  }
  gemm_rows(rows, orows, H * w->v, w->w_o_t, w->hidden, out + b0 * w->hidden, w->hidden);
  return 0;
}

/* out[b] = o_proj(attention of token b) for a batch of decode tokens, one per request:
 *
 *   a = x @ w_a; q = q_b(norm(a[:q_lora])) (or a[:qa]); c_kv = norm(a[qa:qa + kv_lora])
 *   cache[slot] = [c_kv, rope(k_pe)]; q_full[h] = [q_nope[h] @ W_UK[h], rope(q_pe[h])]
 *   latent[h] = softmax(scale * q_full[h] . cache[ctx]) @ cache[ctx, :kv_lora]
 *   out = concat_h(W_UV[h] @ latent[h]) @ w_o
 *
 * Every token's cache row is written before any attention reads (a token sees itself). Both
 * halves run tiles of TILE_ROWS tokens in parallel. Returns 0, PDS_BAD_INDEX (a slot, page or
 * position outside its table; the cache may then be partly written) or PDS_NO_MEMORY. */
int pds_mla_block_f32(const struct pds_mla_weights *w,
                      const float *x, int64_t num_tokens, /* [B, hidden], normed */
                      const int64_t *positions, const int64_t *out_slots, /* [B] */
                      float *cache, int64_t num_slots,    /* [num_slots, kv_lora + rope] */
                      const int32_t *block_table, int64_t max_pages, /* [B, max_pages] */
                      const int32_t *seq_lens, int64_t page_size,    /* [B] */
                      float *out)                                     /* [B, hidden] */
{
  const int64_t H = w->heads, qk = w->nope + w->rope, dim = w->kv_lora + w->rope;
  const int64_t qa = w->q_lora ? w->q_lora : H * qk, na = qa + w->kv_lora + w->rope;
  const int64_t max_len = max_pages * page_size;
  const int threads = pds_num_threads;
  /* Per thread: a, q (first half); scores, latent, o (second half). */
  const int64_t n_a = TILE_ROWS * na, n_q = TILE_ROWS * H * qk, n_s = H * (max_len + 1);
  const int64_t per_thread = n_a + n_q + n_s + H * w->kv_lora + TILE_ROWS * H * w->v;
  float *q_full = malloc(sizeof(float) * (size_t)(num_tokens * H * dim + threads * per_thread));
  if (!q_full) return PDS_NO_MEMORY;
  float *scratch = q_full + num_tokens * H * dim;
  const int64_t num_tiles = (num_tokens + TILE_ROWS - 1) / TILE_ROWS;
  int status = 0;

#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && num_tiles > 1)
  for (int64_t t = 0; t < num_tiles; t++) {
    const int64_t b0 = t * TILE_ROWS;
    const int rows = num_tokens - b0 < TILE_ROWS ? (int)(num_tokens - b0) : TILE_ROWS;
    float *a = scratch + pds_thread() * per_thread;
    int s = project_rows(w, x, b0, rows, positions, out_slots, cache, num_slots, a, a + n_a,
                         q_full);
    if (s) {
#pragma omp atomic write
      status = s;
    }
  }
  if (status) {
    free(q_full);
    return status;
  }
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && num_tiles > 1)
  for (int64_t t = 0; t < num_tiles; t++) {
    const int64_t b0 = t * TILE_ROWS;
    const int rows = num_tokens - b0 < TILE_ROWS ? (int)(num_tokens - b0) : TILE_ROWS;
    float *scores = scratch + pds_thread() * per_thread + n_a + n_q;
    float *latent = scores + n_s, *o = latent + H * w->kv_lora;
    int s = attend_rows(w, q_full, b0, rows, cache, num_slots, block_table, max_pages,
                        seq_lens, page_size, scores, latent, o, out);
    if (s) {
#pragma omp atomic write
      status = s;
    }
  }
  free(q_full);
  return status;
}

/* Dense SwiGLU over rows of x (ldx apart): out[t] (+)= down(silu(gate(x_t)) * up(x_t)),
 * w13t: [hidden, 2 * inter], w2t: [inter, hidden]; `accumulate` adds into out. */
int pds_mlp_f32(const float *x, int64_t ldx, int64_t num_tokens, int64_t hidden,
                const float *w13t, const float *w2t, int64_t inter, int accumulate, float *out) {
  const int threads = pds_num_threads;
  const int64_t per_thread = TILE_ROWS * (2 * inter + hidden);
  float *buf = malloc(sizeof(float) * (size_t)(threads * per_thread));
  if (!buf) return PDS_NO_MEMORY;
  const int64_t num_tiles = (num_tokens + TILE_ROWS - 1) / TILE_ROWS;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && num_tiles > 1)
  for (int64_t t = 0; t < num_tiles; t++) {
    const int64_t t0 = t * TILE_ROWS;
    const int rows = num_tokens - t0 < TILE_ROWS ? (int)(num_tokens - t0) : TILE_ROWS;
    float *gate_up = buf + pds_thread() * per_thread, *down = gate_up + TILE_ROWS * 2 * inter;
    const float *xr[TILE_ROWS];
    for (int r = 0; r < rows; r++) xr[r] = x + (t0 + r) * ldx;
    swiglu_rows(rows, xr, hidden, w13t, w2t, inter, NULL, gate_up,
                accumulate ? down : out + t0 * hidden);
    if (accumulate)
      for (int r = 0; r < rows; r++) add_to(out + (t0 + r) * hidden, down + r * hidden, hidden);
  }
  free(buf);
  return 0;
}

/* A V3 MoE layer (noaux_tc routing) for rows of x: the router GEMM (gate_t: [hidden, E]),
 * routing, the routed experts and the shared experts (shared_inter 0: none), summed into
 * out [T, hidden]. load ([E] int64, or NULL) counts each routed pick. */
int pds_moe_block_f32(const float *x, int64_t num_tokens, int64_t hidden,
                      const float *gate_t, const float *bias, int64_t num_experts,
                      int64_t num_groups, int64_t topk_group, int64_t top_k, int norm,
                      float scaling, const float *w13t, const float *w2t, int64_t inter,
                      const float *shared13t, const float *shared2t, int64_t shared_inter,
                      int64_t *load, float *out) {
  float *logits = malloc(sizeof(float) * (size_t)(num_tokens * (num_experts + top_k) + 1));
  int64_t *ids = malloc(sizeof(int64_t) * (size_t)(num_tokens * top_k + 1));
  int status = (logits && ids) ? 0 : PDS_NO_MEMORY;
  float *weights = logits + num_tokens * num_experts;
  const int threads = pds_num_threads;
  (void)threads; /* read by the pragma only (none without OpenMP) */
  const int64_t num_tiles = status ? 0 : (num_tokens + TILE_ROWS - 1) / TILE_ROWS;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && num_tiles > 1)
  for (int64_t t = 0; t < num_tiles; t++) {
    const int64_t t0 = t * TILE_ROWS;
    const int rows = num_tokens - t0 < TILE_ROWS ? (int)(num_tokens - t0) : TILE_ROWS;
    const float *xr[TILE_ROWS];
    for (int r = 0; r < rows; r++) xr[r] = x + (t0 + r) * hidden;
    gemm_rows(rows, xr, hidden, gate_t, num_experts, logits + t0 * num_experts, num_experts);
  }
  if (!status)
    status = pds_route_noaux_tc_f32(logits, bias, num_tokens, num_experts, num_groups,
                                    topk_group, top_k, norm, scaling, ids, weights);
  if (!status && load)
    for (int64_t p = 0; p < num_tokens * top_k; p++) load[ids[p]]++;
  if (!status)
    status = pds_moe_experts_f32(x, num_tokens, hidden, ids, weights, top_k, w13t, w2t,
                                 num_experts, inter, out);
  if (!status && shared_inter)
    status = pds_mlp_f32(x, hidden, num_tokens, hidden, shared13t, shared2t, shared_inter, 1, out);
  free(logits);
  free(ids);
  return status;
}

/* One decoder layer for pds_decode_layers_f32: its two norms, its attention, and its
 * feed-forward block — a V3 MoE when gate_t is set, else a dense SwiGLU (w13t, w2t, inter). */
struct pds_layer {
  const struct pds_mla_weights *attn;
  const float *attn_norm, *ffn_norm; /* input_layernorm, post_attention_layernorm: [hidden] */
  float attn_eps, ffn_eps;
  const float *gate_t, *bias; /* router [hidden, E] and e_score_correction_bias [E], or NULL */
  int64_t num_experts, num_groups, topk_group, top_k;
  int32_t norm_topk;
  float scaling;
  const float *w13t, *w2t; /* MoE: [E, hidden, 2 * inter], [E, inter, hidden]; dense: one */
  int64_t inter;
  const float *shared13t, *shared2t; /* the MoE's shared experts, or NULL */
  int64_t shared_inter;
};

/* A decode batch through every decoder layer: for each layer l,
 *
 *   x += attention_l(rms_norm(x)); x += feed_forward_l(rms_norm(x))
 *
 * with the calls the blocks above make one by one, so the result is the same to the bit.
 * x: [B, hidden], the residual stream, updated in place; cache: [num_layers, num_slots,
 * kv_lora + rope]; load: [num_layers, E] int64 (a MoE layer counts its routed picks into its
 * row), or NULL. Returns what the blocks return. */
int pds_decode_layers_f32(const struct pds_layer *layers, int64_t num_layers,
                          float *x, int64_t num_tokens,
                          const int64_t *positions, const int64_t *out_slots,
                          float *cache, int64_t num_slots,
                          const int32_t *block_table, int64_t max_pages,
                          const int32_t *seq_lens, int64_t page_size, int64_t *load) {
  if (num_layers <= 0 || num_tokens <= 0) return 0;
  const int64_t hidden = layers[0].attn->hidden, n = num_tokens * hidden;
  float *h = malloc(sizeof(float) * (size_t)(2 * n));
  if (!h) return PDS_NO_MEMORY;
  float *f = h + n;
  int status = 0;
  for (int64_t l = 0; l < num_layers && !status; l++) {
    const struct pds_layer *L = layers + l;
    const int64_t dim = L->attn->kv_lora + L->attn->rope;
    pds_rms_norm_f32(x, hidden, L->attn_norm, num_tokens, hidden, L->attn_eps, h);
    status = pds_mla_block_f32(L->attn, h, num_tokens, positions, out_slots,
                               cache + l * num_slots * dim, num_slots, block_table, max_pages,
                               seq_lens, page_size, f);
    if (status) break;
    add_to(x, f, n);
    pds_rms_norm_f32(x, hidden, L->ffn_norm, num_tokens, hidden, L->ffn_eps, h);
    if (L->gate_t) {
      status = pds_moe_block_f32(h, num_tokens, hidden, L->gate_t, L->bias, L->num_experts,
                                 L->num_groups, L->topk_group, L->top_k, L->norm_topk,
                                 L->scaling, L->w13t, L->w2t, L->inter, L->shared13t,
                                 L->shared2t, L->shared_inter,
                                 load ? load + l * L->num_experts : NULL, f);
      if (!status) add_to(x, f, n);
    } else {
      status = pds_mlp_f32(h, hidden, num_tokens, hidden, L->w13t, L->w2t, L->inter, 1, x);
    }
  }
  free(h);
  return status;
}
