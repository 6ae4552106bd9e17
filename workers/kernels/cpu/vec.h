/* 16-float vectors for the CPU kernels, as GCC/Clang vector extensions.
 *
 * One source for every x86-64 and ARM host: the compiler lowers a v16 to one AVX-512 register,
 * two AVX2 ones or four NEON ones, whatever `-march=native` offers. Loads and stores go through
 * a 4-byte-aligned, may-alias type, so any float pointer can be read or written as a vector.
 */
#ifndef PDS_VEC_H
#define PDS_VEC_H

#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4), __may_alias__));

#define PDS_BAD_INDEX 1
#define PDS_NO_MEMORY 2

static inline v16 ld(const float *p) { return *(const v16u *)p; }
static inline void st(float *p, v16 v) { *(v16u *)p = v; }
static inline v16 splat(float x) { return (v16){0} + x; }

/* Lane-wise a where keep is set (all ones), else b. */
static inline v16 vselect(v16i keep, v16 a, v16 b) {
  return (v16)(((v16i)a & keep) | ((v16i)b & ~keep));
}
static inline v16 vmax(v16 a, v16 b) { return vselect(a > b, a, b); }
static inline v16 vmin(v16 a, v16 b) { return vselect(a < b, a, b); }

static inline float hsum(v16 v) {
#if defined(__clang__)
  v16 a = v + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  a += __builtin_shufflevector(a, a, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
  a += __builtin_shufflevector(a, a, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1);
  a += __builtin_shufflevector(a, a, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0);
#else
  v16 a = v + __builtin_shuffle(v, (v16i){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  a += __builtin_shuffle(a, (v16i){4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3});
  a += __builtin_shuffle(a, (v16i){2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1});
  a += __builtin_shuffle(a, (v16i){1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0});
#endif
  return a[0];
}

/* y[:n] += alpha * x[:n]. */
static inline void axpy(float *y, float alpha, const float *x, int64_t n) {
  int64_t i = 0;
  v16 a = splat(alpha);
  for (; i + 16 <= n; i += 16) st(y + i, ld(y + i) + a * ld(x + i));
  for (; i < n; i++) y[i] += alpha * x[i];
}

/* The partial-sum vector of a . b (hsum of it is the dot product; the tail rides in lane 0). */
static inline v16 dot_part(const float *a, const float *b, int64_t n) {
  v16 acc = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc += ld(a + i) * ld(b + i);
  for (; i < n; i++) acc[0] += a[i] * b[i];
  return acc;
}

/* dot_part of four rows a[h] = a + h * lda against b, b loaded once. */
static inline void dot4_parts(const float *a, int64_t lda, const float *b, int64_t n, v16 *p0,
                              v16 *p1, v16 *p2, v16 *p3) {
  v16 acc0 = {0}, acc1 = {0}, acc2 = {0}, acc3 = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    v16 x = ld(b + i);
    acc0 += ld(a + i) * x;
    acc1 += ld(a + lda + i) * x;
    acc2 += ld(a + 2 * lda + i) * x;
    acc3 += ld(a + 3 * lda + i) * x;
  }
  for (; i < n; i++) {
    acc0[0] += a[i] * b[i], acc1[0] += a[lda + i] * b[i];
    acc2[0] += a[2 * lda + i] * b[i], acc3[0] += a[3 * lda + i] * b[i];
  }
  *p0 = acc0, *p1 = acc1, *p2 = acc2, *p3 = acc3;
}

static inline float dot(const float *a, const float *b, int64_t n) {
  return hsum(dot_part(a, b, n));
}

/* out[h] = a[h] . b for four rows a[h] = a + h * lda: b is loaded once for all four. */
static inline void dot4(const float *a, int64_t lda, const float *b, int64_t n, float *out) {
  v16 p0, p1, p2, p3;
  dot4_parts(a, lda, b, n, &p0, &p1, &p2, &p3);
  out[0] = hsum(p0), out[1] = hsum(p1), out[2] = hsum(p2), out[3] = hsum(p3);
}

#if defined(__clang__)
#define PDS_SHUF2(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define PDS_SHUF2(a, b, ...) __builtin_shuffle(a, b, (v16i){__VA_ARGS__})
#endif

/* Lane r of the result = hsum(v[r]), for 16 vectors at once: each stage halves the lanes
 * that hold one vector's partial sums and doubles the vectors one register holds (15 adds and
 * 30 two-register shuffles, against 16 x (4 shuffles + 4 adds) for 16 hsums). */
static inline v16 hsum16(const v16 *v) {
  v16 s8[8], s4[4], s2[2];
  for (int i = 0; i < 8; i++)
    s8[i] = PDS_SHUF2(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21,
                      22, 23) +
            PDS_SHUF2(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28,
                      29, 30, 31);
  for (int i = 0; i < 4; i++)
    s4[i] = PDS_SHUF2(s8[2 * i], s8[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24,
                      25, 26, 27) +
            PDS_SHUF2(s8[2 * i], s8[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28,
                      29, 30, 31);
  for (int i = 0; i < 2; i++)
    s2[i] = PDS_SHUF2(s4[2 * i], s4[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24,
                      25, 28, 29) +
            PDS_SHUF2(s4[2 * i], s4[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26,
                      27, 30, 31);
  return PDS_SHUF2(s2[0], s2[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         PDS_SHUF2(s2[0], s2[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

/* exp on 16 lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial
 * (relative error under 2e-7 over the range), 2^n put into the exponent bits. Inputs are
 * clamped to [-87, 88] (so -inf gives ~1.6e-38, not 0: callers keep finite inputs or mask). */
static inline v16 exp16(v16 x) {
  x = vmin(vmax(x, splat(-87.0f)), splat(88.0f));
  v16 t = x * splat(1.44269504f) + splat(0.5f);
  v16i n = __builtin_convertvector(t, v16i);
  n -= (v16i)(__builtin_convertvector(n, v16) > t) & 1; /* floor, for negative t too */
  v16 fn = __builtin_convertvector(n, v16);
  v16 r = x - fn * splat(0.693145752f) - fn * splat(1.42860677e-06f);
  v16 p = splat(1.0f / 720);
  p = p * r + splat(1.0f / 120);
  p = p * r + splat(1.0f / 24);
  p = p * r + splat(1.0f / 6);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  v16i bits = (n + 127) << 23;
  v16 scale;
  memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

#endif
