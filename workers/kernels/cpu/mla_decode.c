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
 * each cached row in place: once for the scores of all heads, once more (still in cache) for
 * the values, with the output rows of all heads held in L1.
 *
 * Returns 0, or PDS_BAD_INDEX when a page id points outside the cache (nothing is read there),
 * or PDS_NO_MEMORY.
 */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"
#include "vec.h"

static void axpy(float *y, float alpha, const float *x, int64_t n) {
  int64_t i = 0;
  v16 a = splat(alpha);
  for (; i + 16 <= n; i += 16) st(y + i, ld(y + i) + a * ld(x + i));
  for (; i < n; i++) y[i] += alpha * x[i];
}

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

  /* Scores of every head against each row: [H, len]. */
  for (int64_t j = 0; j < len; j++) {
    const float *row = cache + ((int64_t)pages[j / page_size] * page_size + j % page_size) * dim;
    int64_t h = 0;
    for (; h + 4 <= num_heads; h += 4) {
      float s4[4];
      dot4(q + h * dim, dim, row, dim, s4);
      for (int i = 0; i < 4; i++) scores[(h + i) * len + j] = scale * s4[i];
    }
    for (; h < num_heads; h++) scores[h * len + j] = scale * dot(q + h * dim, row, dim);
  }
  /* Softmax per head: unnormalized weights in place, 1 / sum kept for the end. */
  for (int64_t h = 0; h < num_heads; h++) {
    float *s = scores + h * len;
    inv_sums[h] = 1.0f / exp_shifted(s, len, max_of(s, len));
  }
  /* Values: out[h] += w[h, j] * row[:kv_lora_rank], row-major so each row is read once. */
  for (int64_t j = 0; j < len; j++) {
    const float *row = cache + ((int64_t)pages[j / page_size] * page_size + j % page_size) * dim;
    for (int64_t h = 0; h < num_heads; h++)
      axpy(out + h * kv_lora_rank, scores[h * len + j], row, kv_lora_rank);
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
  const int64_t max_len = max_pages * page_size;
  float *scores = malloc(sizeof(float) * (size_t)(num_heads * (max_len + 1)));
  if (!scores) return PDS_NO_MEMORY;
  int status = 0;
  for (int64_t b = 0; b < num_reqs && !status; b++) {
    int64_t len = seq_lens[b] < max_len ? seq_lens[b] : max_len;
    status = pds_mla_attend_f32(q + b * num_heads * dim, cache, num_slots,
                                block_table + b * max_pages, len, num_heads, dim, kv_lora_rank,
                                page_size, scale, scores, out + b * num_heads * kv_lora_rank);
  }
  free(scores);
  return status;
}
