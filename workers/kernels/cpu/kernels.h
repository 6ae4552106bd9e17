/* Functions of one kernel file that another calls (all in one shared library). */
#ifndef PDS_KERNELS_H
#define PDS_KERNELS_H

#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* Threads of the kernels' parallel loops (`pds_set_num_threads`; 1, the default, runs them
 * serially). A loop's iterations write disjoint outputs and use scratch of their thread's own
 * (`pds_thread`), so the results are the same to the bit whatever the count. */
extern int pds_num_threads;

static inline int pds_thread(void) {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

int pds_mla_attend_f32(const float *q, const float *cache, int64_t num_slots,
                       const int32_t *pages, int64_t len, int64_t num_heads, int64_t dim,
                       int64_t kv_lora_rank, int64_t page_size, float scale, float *scores,
                       float *out);
void pds_rms_norm_f32(const float *x, int64_t ldx, const float *weight, int64_t num_rows,
                      int64_t dim, float eps, float *out);
int pds_route_noaux_tc_f32(const float *logits, const float *bias, int64_t num_tokens,
                           int64_t num_experts, int64_t num_groups, int64_t topk_group,
                           int64_t top_k, int norm, float scaling, int64_t *ids, float *weights);
int pds_moe_experts_f32(const float *x, int64_t num_tokens, int64_t hidden, const int64_t *ids,
                        const float *weights, int64_t top_k, const float *w13t,
                        const float *w2t, int64_t num_experts, int64_t inter, float *out);

#endif
