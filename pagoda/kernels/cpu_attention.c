/* Paged decode attention for the CPU (float32), built by pagoda/kernels/cpu_build.py.
 *
 * One query token per request against its K/V read in place through the block table: no gather
 * of the whole context into a padded batch, which cost the torch path more than its matmuls.
 * Layouts as in pagoda/kernels/attention.py: kv [2, num_blocks, block_size, kv_heads, D].
 * Work is split over (request, kv head); the query heads of one kv head share each K/V row read.
 * q rows are `q_stride` floats apart (a view into the fused qkv projection works); out is dense.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "cpu_threads.h"

void pagoda_paged_decode(const float *q, int64_t q_stride, const int64_t *tok, const int64_t *req,
                         int64_t nd,
                         const float *kv, int64_t nb, int64_t bs, int64_t kvh, int64_t D,
                         const int32_t *block_tables, int64_t maxb, const int32_t *seq_lens,
                         int64_t H, float scale, float *out) {
    const int64_t G = H / kvh;
    const int64_t row = kvh * D;                 /* floats per cache slot */
    const float *vbase = kv + nb * bs * row;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(NTHREADS)
    for (int64_t task = 0; task < nd * kvh; task++) {
        const int64_t i = task / kvh, h = task % kvh;
        const int64_t n = seq_lens[req[i]];
        const int32_t *bt = block_tables + req[i] * maxb;
        const float *qh = q + tok[i] * q_stride + h * G * D;   /* G query heads, contiguous */
        float *oh = out + tok[i] * H * D + h * G * D;
        float *s = malloc(sizeof(float) * G * (n > 0 ? n : 1));
        float mx[64], den[64];                   /* G <= 64 */
        for (int64_t g = 0; g < G; g++) mx[g] = -INFINITY;
        for (int64_t p = 0; p < n; p++) {
            const float *k = kv + ((int64_t)bt[p / bs] * bs + p % bs) * row + h * D;
            for (int64_t g = 0; g < G; g++) {
                const float *qg = qh + g * D;
                float acc = 0.f;
                #pragma omp simd reduction(+:acc)
                for (int64_t d = 0; d < D; d++) acc += qg[d] * k[d];
                acc *= scale;
                s[g * n + p] = acc;
                if (acc > mx[g]) mx[g] = acc;
            }
        }
        for (int64_t g = 0; g < G; g++) {
            float sum = 0.f;
            for (int64_t p = 0; p < n; p++) { const float e = expf(s[g * n + p] - mx[g]); s[g * n + p] = e; sum += e; }
            den[g] = 1.f / sum;
            for (int64_t d = 0; d < D; d++) oh[g * D + d] = 0.f;
        }
        for (int64_t p = 0; p < n; p++) {
            const float *v = vbase + ((int64_t)bt[p / bs] * bs + p % bs) * row + h * D;
            for (int64_t g = 0; g < G; g++) {
                const float w = s[g * n + p];
                float *og = oh + g * D;
                #pragma omp simd
                for (int64_t d = 0; d < D; d++) og[d] += w * v[d];
            }
        }
        for (int64_t g = 0; g < G; g++)
            for (int64_t d = 0; d < D; d++) oh[g * D + d] *= den[g];
        free(s);
    }
}
