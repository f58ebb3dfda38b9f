/* Paged decode attention for the CPU (float32), built by pagoda/kernels/cpu_build.py.
 *
 * One query token per request against its K/V read in place through the block table: no gather
 * of the whole context into a padded batch, which cost the torch path more than its matmuls.
 * Layouts as in pagoda/kernels/attention.py: kv [2, num_blocks, block_size, kv_heads, D].
 * Work is split over (request, kv head); the query heads of one kv head share each K/V row read.
 * q rows are `q_stride` floats apart (a view into the fused qkv projection works); out is dense.
 *
 * Positions go VL at a time (a register's width): the VL dot products of one query head are
 * summed across registers together (vsums), exponentiated together (vexp, ~2 ulp), and the
 * softmax runs online over those blocks (a running max and sum per head, the output rescaled
 * when the max grows), so K and V are each read once and nothing is sized by the context.
 * window > 0: the query (at position n - 1) sees keys n - window .. n - 1 only, and nothing
 * before them is read (those blocks may have been handed to another request). soft_cap > 0:
 * scores become soft_cap * tanh(score / soft_cap).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_simd.h"
#include "cpu_threads.h"

/* og[0 .. NRR*VL) = og * alpha + sum_j<nv pr[j] * vr[j], NRR a literal (the sums in registers) */
static inline __attribute__((always_inline)) void pv_block(const int NRR, float *og,
                                                           const float *const *vr, int64_t off,
                                                           const float *pr, int nv, float alpha) {
    vf o[8];
    for (int r = 0; r < NRR; r++) o[r] = vmul(vload(og + r * VL), vset1(alpha));
    for (int j = 0; j < nv; j++) {
        const vf w = vset1(pr[j]);
        for (int r = 0; r < NRR; r++) o[r] = vfma(w, vload(vr[j] + off + r * VL), o[r]);
    }
    for (int r = 0; r < NRR; r++) vstore(og + r * VL, o[r]);
}

void pagoda_paged_decode(const float *q, int64_t q_stride, const int64_t *tok, const int64_t *req,
                         int64_t nd,
                         const float *kv, int64_t nb, int64_t bs, int64_t kvh, int64_t D,
                         const int32_t *block_tables, int64_t maxb, const int32_t *seq_lens,
                         int64_t H, float scale, int64_t window, float soft_cap, float *out) {
    const int64_t G = H / kvh;
    const int64_t row = kvh * D;                 /* floats per cache slot */
    const float *vbase = kv + nb * bs * row;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(NTHREADS)
    for (int64_t task = 0; task < nd * kvh; task++) {
        const int64_t i = task / kvh, h = task % kvh;
        const int64_t len = seq_lens[req[i]];
        const int64_t lo = (window > 0 && len > window) ? len - window : 0;
        const int64_t n = len - lo;              /* keys read: positions lo .. len - 1 */
        const int32_t *bt = block_tables + req[i] * maxb;
        const float *qh = q + tok[i] * q_stride + h * G * D;   /* G query heads, contiguous */
        float *oh = out + tok[i] * H * D + h * G * D;
        float *mx = malloc(sizeof(float) * 2 * G), *den = mx + G;
        for (int64_t g = 0; g < G; g++) { mx[g] = -INFINITY; den[g] = 0.f; }
        memset(oh, 0, sizeof(float) * G * D);
        for (int64_t p0 = 0; p0 < n; p0 += VL) {
            const int nv = n - p0 < VL ? (int)(n - p0) : VL;
            const float *kr[VL], *vr[VL];
            int64_t b = (lo + p0) / bs, o = (lo + p0) % bs;
            for (int j = 0; j < VL; j++) {  /* a short last block repeats its last row */
                const int64_t slot = (int64_t)bt[b] * bs + o;
                kr[j] = kv + slot * row + h * D;
                vr[j] = vbase + slot * row + h * D;
                if (j + 1 < nv && ++o == bs) { o = 0; b++; }
            }
            for (int64_t g = 0; g < G; g++) {
                const float *qg = qh + g * D;
                float *og = oh + g * D;
                /* the scores of VL positions: VL independent sums, then one cross-register add */
                vf acc[VL];
                for (int j = 0; j < VL; j++) acc[j] = vzero();
                int64_t d = 0;
                for (; d + VL <= D; d += VL) {
                    const vf qv = vload(qg + d);
                    for (int j = 0; j < VL; j++) acc[j] = vfma(qv, vload(kr[j] + d), acc[j]);
                }
                float s[VL], pr[VL];
                vf sv = vsums(acc);
                if (d < D) {  /* D not a multiple of the width */
                    vstore(s, sv);
                    for (int j = 0; j < nv; j++)
                        for (int64_t e = d; e < D; e++) s[j] += qg[e] * kr[j][e];
                    sv = vload(s);
                }
                vstore(s, vmul(sv, vset1(scale)));
                if (soft_cap > 0.f)
                    for (int j = 0; j < nv; j++) s[j] = soft_cap * tanhf(s[j] / soft_cap);
                float m = mx[g];
                for (int j = 0; j < nv; j++) m = s[j] > m ? s[j] : m;
                for (int j = nv; j < VL; j++) s[j] = m;
                const float alpha = expf(mx[g] - m);  /* 0 on the first block (mx = -inf) */
                vstore(pr, vexp(vsub(vload(s), vset1(m))));
                float sum = 0.f;
                for (int j = 0; j < nv; j++) sum += pr[j];
                den[g] = den[g] * alpha + sum;
                mx[g] = m;
                int64_t e = 0;
                for (; e + 8 * VL <= D; e += 8 * VL) pv_block(8, og + e, vr, e, pr, nv, alpha);
                if (e + 4 * VL <= D) { pv_block(4, og + e, vr, e, pr, nv, alpha); e += 4 * VL; }
                if (e + 2 * VL <= D) { pv_block(2, og + e, vr, e, pr, nv, alpha); e += 2 * VL; }
                if (e + VL <= D) { pv_block(1, og + e, vr, e, pr, nv, alpha); e += VL; }
                for (; e < D; e++) {
                    float o = og[e] * alpha;
                    for (int j = 0; j < nv; j++) o += pr[j] * vr[j][e];
                    og[e] = o;
                }
            }
        }
        for (int64_t g = 0; g < G; g++) {
            const float inv = 1.f / den[g];
            for (int64_t d = 0; d < D; d++) oh[g * D + d] *= inv;
        }
        free(mx);
    }
}
