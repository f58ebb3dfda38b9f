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
 *
 * An int8 cache (pagoda/kernels/kv_quant.py: uint8 codes, a float16 scale and a uint8 zero point
 * per token and KV head) is read by the same loop: each block of VL positions is dequantized,
 * (code - zp) * scale, into a small per-task buffer right after it is read, so only the codes
 * cross memory. pagoda_kv_write_int8 is the matching quantize-on-write.
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

/* dst[0 .. D) = (src - zp) * s: one int8 cache row, exactly as kv_quant.dequantize (both the
 * difference and its product with a float16 scale are exact in float32) */
static inline void dequant_row(float *dst, const uint8_t *src, float s, float zp, int64_t D) {
    const vf vs = vset1(s), vz = vset1(zp);
    int64_t d = 0;
    for (; d + VL <= D; d += VL) vstore(dst + d, vmul(vsub(vcvt(iu8(src + d)), vz), vs));
    for (; d < D; d++) dst[d] = ((float)src[d] - zp) * s;
}

/* kv: float [2, nb, bs, kvh, D], or with `scales` (int8) uint8 codes of that shape, scales float16
 * and zeros uint8 [2, nb, bs, kvh]. Inlined into each entry point, so each gets its own loop. */
static inline __attribute__((always_inline)) void paged_decode(
        const float *q, int64_t q_stride, const int64_t *tok, const int64_t *req, int64_t nd,
        const void *kv, const uint16_t *scales, const uint8_t *zeros, int64_t nb, int64_t bs,
        int64_t kvh, int64_t D, const int32_t *block_tables, int64_t maxb, const int32_t *seq_lens,
        int64_t H, float scale, int64_t window, float soft_cap, float *out) {
    const int64_t G = H / kvh;
    const int64_t row = kvh * D;                 /* values per cache slot */
    const float *kf = (const float *)kv, *vf_base = kf + nb * bs * row;
    const uint8_t *k8 = (const uint8_t *)kv, *v8 = k8 + nb * bs * row;
    const int64_t vparams = nb * bs * kvh;       /* V's scales after K's */
    #pragma omp parallel for schedule(dynamic, 1) num_threads(NTHREADS)
    for (int64_t task = 0; task < nd * kvh; task++) {
        const int64_t i = task / kvh, h = task % kvh;
        const int64_t len = seq_lens[req[i]];
        const int64_t lo = (window > 0 && len > window) ? len - window : 0;
        const int64_t n = len - lo;              /* keys read: positions lo .. len - 1 */
        const int32_t *bt = block_tables + req[i] * maxb;
        const float *qh = q + tok[i] * q_stride + h * G * D;   /* G query heads, contiguous */
        float *oh = out + tok[i] * H * D + h * G * D;
        /* int8: the dequantized K and V rows of one block of positions */
        float *mx = malloc(sizeof(float) * (2 * G + (scales ? 2 * VL * D : 0))), *den = mx + G;
        float *kbuf = den + G, *vbuf = kbuf + VL * D;
        for (int64_t g = 0; g < G; g++) { mx[g] = -INFINITY; den[g] = 0.f; }
        memset(oh, 0, sizeof(float) * G * D);
        for (int64_t p0 = 0; p0 < n; p0 += VL) {
            const int nv = n - p0 < VL ? (int)(n - p0) : VL;
            const float *kr[VL], *vr[VL];
            int64_t b = (lo + p0) / bs, o = (lo + p0) % bs;
            for (int j = 0; j < VL; j++) {  /* a short last block repeats its last row */
                const int64_t slot = (int64_t)bt[b] * bs + o;
                if (!scales) {
                    kr[j] = kf + slot * row + h * D;
                    vr[j] = vf_base + slot * row + h * D;
                } else if (j < nv) {
                    const int64_t p = slot * kvh + h;
                    dequant_row(kbuf + j * D, k8 + slot * row + h * D, _cvtsh_ss(scales[p]),
                                (float)zeros[p], D);
                    dequant_row(vbuf + j * D, v8 + slot * row + h * D,
                                _cvtsh_ss(scales[vparams + p]), (float)zeros[vparams + p], D);
                    kr[j] = kbuf + j * D;
                    vr[j] = vbuf + j * D;
                } else {
                    kr[j] = kr[nv - 1];
                    vr[j] = vr[nv - 1];
                }
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

void pagoda_paged_decode(const float *q, int64_t q_stride, const int64_t *tok, const int64_t *req,
                         int64_t nd,
                         const float *kv, int64_t nb, int64_t bs, int64_t kvh, int64_t D,
                         const int32_t *block_tables, int64_t maxb, const int32_t *seq_lens,
                         int64_t H, float scale, int64_t window, float soft_cap, float *out) {
    paged_decode(q, q_stride, tok, req, nd, kv, NULL, NULL, nb, bs, kvh, D, block_tables, maxb,
                 seq_lens, H, scale, window, soft_cap, out);
}

void pagoda_paged_decode_int8(const float *q, int64_t q_stride, const int64_t *tok,
                              const int64_t *req, int64_t nd, const uint8_t *kv,
                              const uint16_t *scales, const uint8_t *zeros, int64_t nb, int64_t bs,
                              int64_t kvh, int64_t D, const int32_t *block_tables, int64_t maxb,
                              const int32_t *seq_lens, int64_t H, float scale, int64_t window,
                              float soft_cap, float *out) {
    paged_decode(q, q_stride, tok, req, nd, kv, scales, zeros, nb, bs, kvh, D, block_tables, maxb,
                 seq_lens, H, scale, window, soft_cap, out);
}

/* Quantize T tokens' K and V (rows `stride` floats apart, kvh heads of D each) into an int8
 * cache at `slots` (< 0: skipped), bit for bit as kv_quant.quantize: the range widened to hold
 * 0, its float16-rounded scale, zp = floor(-lo / scale + 0.5), codes floor(x / scale + zp + 0.5)
 * clamped to 0..255, each division a multiplication by the float32 reciprocal. The rounding
 * points must stay those of torch's separate multiply and add, hence no fused multiply-add. */
#if defined(__GNUC__) && !defined(__clang__)
#define PAGODA_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define PAGODA_NO_CONTRACT
#endif
static PAGODA_NO_CONTRACT void quantize_row(const float *x, int64_t D, uint8_t *codes,
                                            uint16_t *scale, uint8_t *zero) {
#ifdef __clang__
#pragma clang fp contract(off)
#endif
    float lo = 0.f, hi = 0.f;
    for (int64_t d = 0; d < D; d++) {
        lo = x[d] < lo ? x[d] : lo;
        hi = x[d] > hi ? x[d] : hi;
    }
    const uint16_t s16 = _cvtss_sh((hi - lo) / 255.f, _MM_FROUND_TO_NEAREST_INT);
    const float sf = _cvtsh_ss(s16);
    const float inv = sf > 0.f ? 1.f / sf : 0.f;
    float zp = floorf(-lo * inv + 0.5f);
    zp = zp < 0.f ? 0.f : zp > 255.f ? 255.f : zp;
    for (int64_t d = 0; d < D; d++) {
        float c = floorf(x[d] * inv + zp + 0.5f);
        c = c < 0.f ? 0.f : c > 255.f ? 255.f : c;
        codes[d] = (uint8_t)c;
    }
    *scale = s16;
    *zero = (uint8_t)zp;
}

void pagoda_kv_write_int8(const float *k, const float *v, int64_t stride, int64_t T,
                          const int64_t *slots, uint8_t *kv, uint16_t *scales, uint8_t *zeros,
                          int64_t nb, int64_t bs, int64_t kvh, int64_t D) {
    const int64_t row = kvh * D, vdata = nb * bs * row, vparams = nb * bs * kvh;
    for (int64_t t = 0; t < T; t++) {
        if (slots[t] < 0) continue;
        for (int64_t h = 0; h < kvh; h++) {
            const int64_t p = slots[t] * kvh + h;
            quantize_row(k + t * stride + h * D, D, kv + slots[t] * row + h * D, scales + p, zeros + p);
            quantize_row(v + t * stride + h * D, D, kv + vdata + slots[t] * row + h * D,
                         scales + vparams + p, zeros + vparams + p);
        }
    }
}
