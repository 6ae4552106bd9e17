/* DeepSeek-V3's router after its GEMM (`noaux_tc`), float32, for CPUs, one token at a time:
 *
 *   score = sigmoid(logit); choice = score + bias
 *   group score = sum of the two best choices in the group; keep the topk_group best groups
 *   ids = the top_k best choices among the kept groups' experts (ties: the lower id)
 *   weights = score[ids] (/ their sum if norm) * scaling
 *
 * In torch that is some fifteen small ops per layer (three top-k's, a scatter, masks), each
 * paying its call overhead on a decode batch; here it is one pass over the logits.
 * Returns 0, or PDS_NO_MEMORY.
 */
#include <math.h>
#include <stdlib.h>

#include "vec.h"

/* Index of the largest v[i] with allowed[i] (the first of equals), or -1 if none is. */
static int64_t argmax_allowed(const float *v, const unsigned char *allowed, int64_t n) {
  int64_t best = -1;
  for (int64_t i = 0; i < n; i++)
    if (allowed[i] && (best < 0 || v[i] > v[best])) best = i;
  return best;
}

int pds_route_noaux_tc_f32(const float *logits,  /* [T, E] */
                           const float *bias,    /* [E] */
                           int64_t num_tokens, int64_t num_experts, int64_t num_groups,
                           int64_t topk_group, int64_t top_k, int norm, float scaling,
                           int64_t *ids,         /* [T, top_k] */
                           float *weights)       /* [T, top_k] */
{
  const int64_t group_size = num_experts / num_groups;
  float *buf = malloc(sizeof(float) * (size_t)(2 * num_experts + num_groups));
  unsigned char *allowed = malloc((size_t)(num_experts + num_groups));
  if (!buf || !allowed) {
    free(buf);
    free(allowed);
    return PDS_NO_MEMORY;
  }
  float *score = buf, *choice = buf + num_experts, *group_score = buf + 2 * num_experts;
  unsigned char *group_ok = allowed + num_experts;
  for (int64_t t = 0; t < num_tokens; t++) {
    const float *lt = logits + t * num_experts;
    for (int64_t e = 0; e < num_experts; e++) {
      score[e] = 1.0f / (1.0f + expf(-lt[e]));
      choice[e] = score[e] + bias[e];
    }
    memset(group_ok, 1, (size_t)num_groups);
    if (num_groups > 1) {
      for (int64_t g = 0; g < num_groups; g++) {
        const float *c = choice + g * group_size;
        float first = -INFINITY, second = -INFINITY;
        for (int64_t i = 0; i < group_size; i++) {
          if (c[i] > first) second = first, first = c[i];
          else if (c[i] > second) second = c[i];
        }
        group_score[g] = group_size > 1 ? first + second : first;
      }
      unsigned char *pick = allowed; /* scratch: which groups are still candidates */
      memset(pick, 1, (size_t)num_groups);
      memset(group_ok, 0, (size_t)num_groups);
      for (int64_t k = 0; k < topk_group && k < num_groups; k++) {
        int64_t g = argmax_allowed(group_score, pick, num_groups);
        pick[g] = 0, group_ok[g] = 1;
      }
    }
    for (int64_t e = 0; e < num_experts; e++) allowed[e] = group_ok[e / group_size];
    int64_t *it = ids + t * top_k;
    float *wt = weights + t * top_k, sum = 0.0f;
    for (int64_t k = 0; k < top_k; k++) {
      int64_t e = argmax_allowed(choice, allowed, num_experts);
      if (e < 0) { /* fewer experts than top_k in the kept groups: any left, as torch would */
        memset(allowed, 1, (size_t)num_experts);
        for (int64_t j = 0; j < k; j++) allowed[it[j]] = 0;
        e = argmax_allowed(choice, allowed, num_experts);
      }
      allowed[e] = 0;
      it[k] = e, wt[k] = score[e], sum += score[e];
    }
    const float factor = norm ? scaling / (sum + 1e-20f) : scaling;
    for (int64_t k = 0; k < top_k; k++) wt[k] *= factor;
  }
  free(buf);
  free(allowed);
  return 0;
}
