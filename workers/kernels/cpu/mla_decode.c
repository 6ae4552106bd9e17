/* Paged MLA decode attention in the absorbed form, float32, for CPUs.
 *
 * The contract of workers/kernels/mla_decode.py (the Triton kernel), on host memory:
 *
 *   out[b, h] = softmax_j(scale * q[b, h] . cache[slot_j]) @ cache[slot_j, :kv_lora_rank]
 *
 * over the seq_lens[b] tokens j of request b, slot_j = block_table[b, j / page_size] *
 * page_size + j % page_size. A row with seq_lens[b] <= 0 gives zeros.
 *
 * Why it exists: the plain-torch path gathers every request's pages into a padded batch (a
 * copy of the whole context), then reads that copy twice (scores, then values). This reads
 * each cached row in place, page by page (no division per row). Scores: a row is loaded once
 * for four heads, and the partial sums of 16 rows are reduced together (hsum16) rather than
 * one horizontal sum per (head, row). Values: register tiles of 4 heads x 64 latent columns
 * accumulate over all rows, so no output row is loaded or stored per cached row.
 *
 * Returns 0, or PDS_BAD_INDEX when a page id points outside the cache (nothing is read there),
 * or PDS_NO_MEMORY.
 */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"
#include "vec.h"

static float max_of(const float *s, int64_t n) {
  v16 m = splat(-INFINITY);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) m = vmax(m, ld(s + j));
  float out = -INFINITY;
  for (int i = 0; i < 16; i++) out = m[i] > out ? m[i] : out;
  for (; j < n; j++) out = s[j] > out ? s[j] : out;
  return out;
}

/* s[j] = exp(s[j] - max), in place; returns the sum. */
static float exp_shifted(float *s, int64_t n, float max) {
  v16 sum = {0}, m = splat(max);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    v16 e = exp16(ld(s + j) - m);
    st(s + j, e);
    sum += e;
  }
  float total = hsum(sum);
  for (; j < n; j++) {
    s[j] = expf(s[j] - max);
    total += s[j];
  }
  return total;
}

/* The cached rows of one request in order, page by page (no division per row). */
struct rows {
  const float *cache;
  const int32_t *pages;
  int64_t page_size, dim, next_page, left;
  const float *row;
};

static inline struct rows rows_of(const float *cache, const int32_t *pages, int64_t page_size,
                                  int64_t dim) {
  return (struct rows){cache, pages, page_size, dim, 0, 0, NULL};
}

static inline const float *next_row(struct rows *it) {
  if (it->left == 0) {
    it->row = it->cache + (int64_t)it->pages[it->next_page++] * it->page_size * it->dim;
    it->left = it->page_size;
  }
  const float *row = it->row;
  it->row += it->dim, it->left--;
  return row;
}

/* One request: out[h] for its H query rows `q: [H, dim]` over its `len` cached rows, whose
 * pages are `pages[0 .. ceil(len / page_size))`. scores: scratch [H * (len + 1)]. */
int pds_mla_attend_f32(const float *q, const float *cache, int64_t num_slots,
                       const int32_t *pages, int64_t len, int64_t num_heads, int64_t dim,
                       int64_t kv_lora_rank, int64_t page_size, float scale, float *scores,
                       float *out) {
  memset(out, 0, sizeof(float) * (size_t)(num_heads * kv_lora_rank));
  if (len <= 0) return 0;
  const int64_t num_pages = num_slots / page_size;
  const int64_t used_pages = (len + page_size - 1) / page_size;
  for (int64_t p = 0; p < used_pages; p++)
    if (pages[p] < 0 || pages[p] >= num_pages) return PDS_BAD_INDEX;
  float *inv_sums = scores + num_heads * len;

  /* Scores of every head against each row: [H, len], 16 rows at a time: each (head, row)
   * partial-sum vector is kept, and the 16 rows' vectors of a head are reduced together. */
  v16 part[4][16];
  struct rows it = rows_of(cache, pages, page_size, dim);
  for (int64_t j0 = 0; j0 < len; j0 += 16) {
    const int64_t n = len - j0 < 16 ? len - j0 : 16;
    const float *rows[16];
    for (int64_t r = 0; r < n; r++) rows[r] = next_row(&it);
    for (int64_t h = 0; h < num_heads; h += 4) {
      const int64_t nh = num_heads - h < 4 ? num_heads - h : 4;
      const float *q0 = q + h * dim;
      for (int64_t r = 0; r < n; r++) {
        if (nh == 4) {
          dot4_parts(q0, dim, rows[r], dim, &part[0][r], &part[1][r], &part[2][r], &part[3][r]);
        } else {
          for (int64_t k = 0; k < nh; k++) part[k][r] = dot_part(q0 + k * dim, rows[r], dim);
        }
      }
      for (int64_t k = 0; k < nh; k++) {
        for (int64_t r = n; r < 16; r++) part[k][r] = (v16){0};
        v16 sums = hsum16(part[k]) * splat(scale);
        float *dst = scores + (h + k) * len + j0;
        if (n == 16) st(dst, sums);
        else for (int64_t r = 0; r < n; r++) dst[r] = sums[r];
      }
    }
  }
  /* Softmax per head: unnormalized weights in place, 1 / sum kept for the end. */
  for (int64_t h = 0; h < num_heads; h++) {
    float *s = scores + h * len;
    inv_sums[h] = 1.0f / exp_shifted(s, len, max_of(s, len));
  }
  /* Values: out[h] += w[h, j] * row[:kv_lora_rank], in register tiles of 4 heads x 64
   * columns over all rows (one pass over the rows per tile); a tail of columns or heads goes
   * through axpy. */
  const int64_t r64 = kv_lora_rank / 64 * 64, h4 = num_heads / 4 * 4;
  for (int64_t h = 0; h < h4; h += 4) {
    const float *w0 = scores + h * len, *w1 = w0 + len, *w2 = w1 + len, *w3 = w2 + len;
    for (int64_t c = 0; c < r64; c += 64) {
      v16 a00 = {0}, a01 = {0}, a02 = {0}, a03 = {0}, a10 = {0}, a11 = {0}, a12 = {0}, a13 = {0};
      v16 a20 = {0}, a21 = {0}, a22 = {0}, a23 = {0}, a30 = {0}, a31 = {0}, a32 = {0}, a33 = {0};
      struct rows rit = rows_of(cache, pages, page_size, dim);
      for (int64_t j = 0; j < len; j++) {
        const float *row = next_row(&rit) + c;
        v16 x0 = ld(row), x1 = ld(row + 16), x2 = ld(row + 32), x3 = ld(row + 48);
        v16 s = splat(w0[j]);
        a00 += s * x0, a01 += s * x1, a02 += s * x2, a03 += s * x3;
        s = splat(w1[j]);
        a10 += s * x0, a11 += s * x1, a12 += s * x2, a13 += s * x3;
        s = splat(w2[j]);
        a20 += s * x0, a21 += s * x1, a22 += s * x2, a23 += s * x3;
        s = splat(w3[j]);
        a30 += s * x0, a31 += s * x1, a32 += s * x2, a33 += s * x3;
      }
      float *o = out + h * kv_lora_rank + c;
      st(o, a00), st(o + 16, a01), st(o + 32, a02), st(o + 48, a03);
      o += kv_lora_rank;
      st(o, a10), st(o + 16, a11), st(o + 32, a12), st(o + 48, a13);
      o += kv_lora_rank;
      st(o, a20), st(o + 16, a21), st(o + 32, a22), st(o + 48, a23);
      o += kv_lora_rank;
      st(o, a30), st(o + 16, a31), st(o + 32, a32), st(o + 48, a33);
    }
  }
  if (r64 < kv_lora_rank || h4 < num_heads) {
    struct rows rit = rows_of(cache, pages, page_size, dim);
    for (int64_t j = 0; j < len; j++) {
      const float *row = next_row(&rit);
      for (int64_t h = 0; h < num_heads; h++) {
        int64_t c0 = h < h4 ? r64 : 0;
        axpy(out + h * kv_lora_rank + c0, scores[h * len + j], row + c0, kv_lora_rank - c0);
      }
    }
  }
  for (int64_t h = 0; h < num_heads; h++) {
    float *o = out + h * kv_lora_rank;
    const float inv = inv_sums[h];
    for (int64_t r = 0; r < kv_lora_rank; r++) o[r] *= inv;
  }
  return 0;
}

int pds_mla_decode_f32(const float *q,              /* [B, H, D] */
                       const float *cache,          /* [num_slots, D] */
                       int64_t num_slots,
                       const int32_t *block_table,  /* [B, max_pages] */
                       const int32_t *seq_lens,     /* [B] */
                       int64_t num_reqs, int64_t num_heads, int64_t dim,
                       int64_t kv_lora_rank, int64_t max_pages, int64_t page_size,
                       float scale,
                       float *out)                  /* [B, H, kv_lora_rank] */
{
  const int64_t max_len = max_pages * page_size, per_thread = num_heads * (max_len + 1);
  const int threads = pds_num_threads;
  float *scores = malloc(sizeof(float) * (size_t)(threads * per_thread));
  if (!scores) return PDS_NO_MEMORY;
  int status = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && num_reqs > 1)
  for (int64_t b = 0; b < num_reqs; b++) {
    int64_t len = seq_lens[b] < max_len ? seq_lens[b] : max_len;
    int s = pds_mla_attend_f32(q + b * num_heads * dim, cache, num_slots,
                               block_table + b * max_pages, len, num_heads, dim, kv_lora_rank,
                               page_size, scale, scores + pds_thread() * per_thread,
                               out + b * num_heads * kv_lora_rank);
    if (s) {
#pragma omp atomic write
      status = s;
    }
  }
  free(scores);
  return status;
}
