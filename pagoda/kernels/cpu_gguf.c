/* Matmul with GGUF block weights kept packed (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K),
 * built by pagoda/kernels/cpu_build.py once per instruction set: with AVX-512 (16 floats to a
 * register) where the CPU has it, else AVX2 + FMA (8).
 *
 * y[m, col0 + n] = sum_k x[m, k] * w[n, k] (+ bias) with x float32 and w as the file stores it:
 * each row a run of blocks along K. Every 32 weights of a row are widened to float in registers
 * (the same arithmetic as gguf.quants.dequantize, so outputs equal the float path to float32
 * rounding) and used against up to 8 tokens before the next 32 are read. Activations stay float:
 * llama.cpp's 8-bit activation blocks changed greedy outputs of the bundled model at the 5th token
 * (measured; see pagoda/layers/quantization/gguf.py), and pagoda promises float32 fidelity.
 *
 * Decode (M <= 8): one pass over the weights, tiles of NR rows x M tokens in registers; the
 * 4-bit types look their 16 levels up in a register (AVX-512 vpermps) instead of converting.
 * Batches and prefill chunks (M > 8): each thread widens NRS rows into an L1 scratch once and
 * runs tiles of NRS rows x MRS tokens over it (x read once per NRS rows, from L2), over chunks
 * of MC tokens, so each weight is read and widened once per chunk; measured on one Zen 5 core
 * this runs at ~170 GFLOP/s against ~80 for tiles shaped like the decode ones. Work is split
 * over row tiles, across all parts of a merged projection.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_simd.h"
#include "cpu_threads.h"

/* ggml type ids (gguf.GGMLQuantizationType) */
enum { GT_F32 = 0, GT_Q4_0 = 2, GT_Q4_1 = 3, GT_Q5_0 = 6, GT_Q5_1 = 7, GT_Q8_0 = 8,
       GT_Q4_K = 12, GT_Q5_K = 13, GT_Q6_K = 14 };

#define MR 8     /* most tokens per register tile */
#ifndef MC
#define MC 64    /* tokens per chunk of a long batch */
#endif
#ifndef PF
#define PF 8192  /* bytes ahead each weight row is prefetched: at one token, less left the
                  * kernel waiting on memory (measured 4096: ~10% slower, 1024: ~40%) */
#endif

#if VL == 16
#define NR 2  /* weight rows per register tile */
#ifndef NRS
#define NRS 4 /* ... and per tile of widened rows, which takes MRS tokens */
#define MRS 6
#endif
#else
#define NR 1
#ifndef NRS
#define NRS 3
#define MRS 4
#endif
#endif
#define TR (NRS > NR ? NRS : NR)
#define NV (32 / VL)  /* registers per 32 weights */

static inline float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* Two adjacent half floats (a block's d and m) as lanes 0 and 1. */
static inline __m128 f16x2(const uint8_t *p) {
    uint32_t u;
    memcpy(&u, p, 4);
    return _mm_cvtph_ps(_mm_cvtsi32_si128((int)u));
}

#if VL == 16
#define FIOTA _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
#endif

/* Q4_K / Q5_K: the 6-bit scale and min of sub-block j (of 8) from the 12 packed bytes. */
static inline void scale_min_k4(int j, const uint8_t *q, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

int64_t pagoda_gguf_block_bytes(int64_t type) {
    switch (type) {
        case GT_Q4_0: return 18;
        case GT_Q4_1: return 20;
        case GT_Q5_0: return 22;
        case GT_Q5_1: return 24;
        case GT_Q8_0: return 34;
        case GT_Q4_K: return 144;
        case GT_Q5_K: return 176;
        case GT_Q6_K: return 210;
        default: return 0;
    }
}

int64_t pagoda_gguf_block_weights(int64_t type) {
    return type == GT_Q4_K || type == GT_Q5_K || type == GT_Q6_K ? 256 : 32;
}

/* Weights c*32 .. c*32+31 of one row, as NV float registers. `type` is a literal at every call
 * site (the switch folds away); GT_F32 reads an already widened row. */
static inline __attribute__((always_inline)) void decode(const int type, const uint8_t *row,
                                                         int64_t c, vf w[NV]) {
    const vi nib = iset1(0xF);
    if (type == GT_F32) {
        const float *r = (const float *)row + c * 32;
        for (int v = 0; v < NV; v++) w[v] = vload(r + v * VL);
    } else if (type == GT_Q4_0 || type == GT_Q4_1 || type == GT_Q5_0 || type == GT_Q5_1) {
        /* 32 weights: low nibbles of the 16 bytes, then their high nibbles */
        const int q5 = type == GT_Q5_0 || type == GT_Q5_1;
        const int bb = type == GT_Q4_0 ? 18 : type == GT_Q4_1 ? 20 : type == GT_Q5_0 ? 22 : 24;
        const uint8_t *b = row + c * bb;
        const int qs = type == GT_Q4_0 ? 2 : type == GT_Q4_1 ? 4 : type == GT_Q5_0 ? 6 : 8;
        vf vd, vm;
        if (type == GT_Q4_1 || type == GT_Q5_1) {  /* d and m: one load, one conversion */
            const __m128 dm = f16x2(b);
            vd = vbcast0(dm);
            vm = vbcast1(dm);
        } else {
            const float d = f16(b);
            vd = vset1(d);
            vm = vset1((type == GT_Q4_0 ? -8.f : -16.f) * d);
        }
        uint32_t qh = 0;
        if (q5) memcpy(&qh, b + (type == GT_Q5_0 ? 2 : 4), 4);
        const vi raw = iu8(b + qs);
#if VL == 16
        /* the block's levels d * q + m as registers, looked up by each weight's bits */
        const vf lv = vfma(FIOTA, vd, vm);
        const vf hv = q5 ? vfma(vadd(FIOTA, vset1(16.f)), vd, vm) : lv;
        for (int v = 0; v < NV; v++) {
            vi q = v ? _mm512_srli_epi32(raw, 4) : raw;  /* the lookup reads the low 4 bits */
            if (q5) {
                const vi h = iand(isrlv(iset1((int)qh), iadd(iiota(), iset1(16 * v))), iset1(1));
                w[v] = _mm512_permutex2var_ps(lv, ior(iand(q, nib), islli(h, 4)), hv);
            } else {
                w[v] = _mm512_permutexvar_ps(q, lv);
            }
        }
#else
        for (int v = 0; v < NV; v++) {
            const int j0 = v * VL;  /* first weight of this register */
            vi q = (j0 & 15) ? iu8(b + qs + 8) : raw;
            if (j0 >= 16) q = _mm256_srli_epi32(q, 4);
            q = iand(q, nib);
            if (q5) {
                const vi h = iand(isrlv(iset1((int)qh), iadd(iiota(), iset1(j0))), iset1(1));
                q = ior(q, islli(h, 4));
            }
            w[v] = vfma(vcvt(q), vd, vm);
        }
#endif
    } else if (type == GT_Q8_0) {
        const uint8_t *b = row + c * 34;
        const vf vd = vset1(f16(b));
        for (int v = 0; v < NV; v++) w[v] = vmul(vcvt(ii8(b + 2 + v * VL)), vd);
    } else if (type == GT_Q4_K || type == GT_Q5_K) {
        const int bb = type == GT_Q4_K ? 144 : 176;
        const uint8_t *b = row + (c >> 3) * bb;
        const int j = (int)(c & 7);
        int sc, m;
        scale_min_k4(j, b + 4, &sc, &m);
        const __m128 dm = f16x2(b);
        const vf vd = vbcast0(_mm_mul_ss(dm, _mm_set_ss((float)sc)));
        const vf vm = vbcast0(_mm_mul_ss(_mm_movehdup_ps(dm), _mm_set_ss(-(float)m)));
        const uint8_t *ql = b + (type == GT_Q4_K ? 16 : 48) + 32 * (j >> 1);
        const vi sh = iset1(4 * (j & 1));
#if VL == 16
        const vf lv = vfma(FIOTA, vd, vm);
        const vf hv = type == GT_Q5_K ? vfma(vadd(FIOTA, vset1(16.f)), vd, vm) : lv;
        for (int v = 0; v < NV; v++) {
            const vi q = isrlv(iu8(ql + v * VL), sh);  /* the lookup reads the low 4 bits */
            if (type == GT_Q5_K) {
                const vi h = iand(isrlv(iu8(b + 16 + v * VL), iset1(j)), iset1(1));
                w[v] = _mm512_permutex2var_ps(lv, ior(iand(q, nib), islli(h, 4)), hv);
            } else {
                w[v] = _mm512_permutexvar_ps(q, lv);
            }
        }
#else
        for (int v = 0; v < NV; v++) {
            vi q = iand(isrlv(iu8(ql + v * VL), sh), nib);
            if (type == GT_Q5_K) {
                const vi h = iand(isrlv(iu8(b + 16 + v * VL), iset1(j)), iset1(1));
                q = ior(q, islli(h, 4));
            }
            w[v] = vfma(vcvt(q), vd, vm);
        }
#endif
    } else if (type == GT_Q6_K) {
        const uint8_t *b = row + (c >> 3) * 210;
        const int j = (int)(c & 7), n = j >> 2, part = j & 3;
        const uint8_t *ql = b + 64 * n + 32 * (part & 1), *qh = b + 128 + 32 * n;
        const int8_t *scales = (const int8_t *)(b + 192) + 8 * n + 2 * part;
        const float d = f16(b + 208);
        const vi shl = iset1(4 * (part >> 1)), shh = iset1(2 * part);
        for (int v = 0; v < NV; v++) {
            const vi lo = iand(isrlv(iu8(ql + v * VL), shl), nib);
            const vi hi = iand(isrlv(iu8(qh + v * VL), shh), iset1(3));
            const vi q = isub(ior(lo, islli(hi, 4)), iset1(32));
            w[v] = vmul(vcvt(q), vset1(d * (float)scales[(v * VL) >> 4]));
        }
    }
}

/* NRT rows x MT tokens over C chunks of 32; out[r * MT + t]. A accumulators per pair keep at
 * least 8 FMA chains in flight when the tile is small (one token). */
static inline __attribute__((always_inline)) void tile(
        const int type, const int NRT, const int MT, const uint8_t *w0, int64_t rb,
        const float *x, int64_t ldx, int64_t C, float *out) {
    const int A = NRT * MT >= 8 || type == GT_F32 ? 1 : NV;
    vf acc[TR][MR > MRS ? MR : MRS][NV];  /* fixed sizes: a variable-length array would live on the stack */
    for (int r = 0; r < NRT; r++)
        for (int t = 0; t < MT; t++)
            for (int a = 0; a < A; a++) acc[r][t][a] = vzero();
    if (type == GT_F32) {  /* widened rows: one register of each row at a time */
        for (int64_t k = 0; k < C * 32; k += VL) {
            vf w[TR];
            for (int r = 0; r < NRT; r++) w[r] = vload((const float *)(w0 + r * rb) + k);
            for (int t = 0; t < MT; t++) {
                const vf xv = vload(x + t * ldx + k);
                for (int r = 0; r < NRT; r++) acc[r][t][0] = vfma(w[r], xv, acc[r][t][0]);
            }
        }
        for (int r = 0; r < NRT; r++)
            for (int t = 0; t < MT; t++) out[r * MT + t] = vsum(acc[r][t][0]);
        return;
    }
    const int64_t step = C ? (rb ? rb : 1) / C : 0;  /* ~bytes per 32 weights, for prefetching */
    for (int64_t c = 0; c < C; c++) {
        vf w[TR][NV];
        for (int r = 0; r < NRT; r++) _mm_prefetch((const char *)w0 + r * rb + c * step + PF, _MM_HINT_T0);
        for (int r = 0; r < NRT; r++) decode(type, w0 + r * rb, c, w[r]);
        for (int t = 0; t < MT; t++) {
            const float *xt = x + t * ldx + c * 32;
            for (int v = 0; v < NV; v++) {
                const vf xv = vload(xt + v * VL);
                for (int r = 0; r < NRT; r++)
                    acc[r][t][v % A] = vfma(w[r][v], xv, acc[r][t][v % A]);
            }
        }
    }
    for (int r = 0; r < NRT; r++)
        for (int t = 0; t < MT; t++) {
            vf s = acc[r][t][0];
            for (int a = 1; a < A; a++) s = vadd(s, acc[r][t][a]);
            out[r * MT + t] = vsum(s);
        }
}

/* Rows of a part `type` widened to float: out[n, K]. */
static inline __attribute__((always_inline)) void widen_rows(const int type, const uint8_t *w,
                                                             int64_t rb, int64_t n, int64_t K, float *out) {
    for (int64_t r = 0; r < n; r++)
        for (int64_t c = 0; c < K / 32; c++) {
            vf v[NV];
            decode(type, w + r * rb, c, v);
            for (int i = 0; i < NV; i++) vstore(out + r * K + c * 32 + i * VL, v[i]);
        }
}

static void widen(int64_t type, const uint8_t *w, int64_t rb, int64_t n, int64_t K, float *out) {
    switch (type) {
        case GT_Q4_0: widen_rows(GT_Q4_0, w, rb, n, K, out); break;
        case GT_Q4_1: widen_rows(GT_Q4_1, w, rb, n, K, out); break;
        case GT_Q5_0: widen_rows(GT_Q5_0, w, rb, n, K, out); break;
        case GT_Q5_1: widen_rows(GT_Q5_1, w, rb, n, K, out); break;
        case GT_Q8_0: widen_rows(GT_Q8_0, w, rb, n, K, out); break;
        case GT_Q4_K: widen_rows(GT_Q4_K, w, rb, n, K, out); break;
        case GT_Q5_K: widen_rows(GT_Q5_K, w, rb, n, K, out); break;
        case GT_Q6_K: widen_rows(GT_Q6_K, w, rb, n, K, out); break;
        default: break;
    }
}

/* The dequantized rows (the kernel's own widening), for tests and float fallbacks. */
void pagoda_gguf_dequant(const uint8_t *w, int64_t type, int64_t n, int64_t K, float *out) {
    const int64_t rb = K / pagoda_gguf_block_weights(type) * pagoda_gguf_block_bytes(type);
    #pragma omp parallel for schedule(static) num_threads(NTHREADS)
    for (int64_t r = 0; r < n; r++) widen(type, w + r * rb, rb, 1, K, out + r * K);
}

/* One NRT x mt tile of `type` (mt <= MAXT), mt a literal in every branch; branches above MAXT
 * fold away before they cost compile time. */
static inline __attribute__((always_inline)) void tile_mt(const int type, const int NRT,
                                                          const int MAXT, int mt,
                                                          const uint8_t *w0, int64_t rb,
                                                          const float *x, int64_t K, float *out) {
    const int64_t C = K / 32;
    if (MAXT >= 8 && mt == 8) tile(type, NRT, 8, w0, rb, x, K, C, out);
    else if (MAXT >= 7 && mt == 7) tile(type, NRT, 7, w0, rb, x, K, C, out);
    else if (MAXT >= 6 && mt == 6) tile(type, NRT, 6, w0, rb, x, K, C, out);
    else if (MAXT >= 5 && mt == 5) tile(type, NRT, 5, w0, rb, x, K, C, out);
    else if (mt == 4) tile(type, NRT, 4, w0, rb, x, K, C, out);
    else if (mt == 3) tile(type, NRT, 3, w0, rb, x, K, C, out);
    else if (mt == 2) tile(type, NRT, 2, w0, rb, x, K, C, out);
    else tile(type, NRT, 1, w0, rb, x, K, C, out);
}

/* NRS widened rows x mt tokens (mt <= MRS) */
static void tile_widened(int mt, const float *w0, int64_t K, const float *x, float *out) {
    tile_mt(GT_F32, NRS, MRS, mt, (const uint8_t *)w0, K * 4, x, K, out);
}

static void tile_any(int64_t type, int mt, const uint8_t *w0, int64_t rb, const float *x,
                     int64_t K, float *out) {
    switch (type) {
        case GT_Q4_0: tile_mt(GT_Q4_0, NR, MR, mt, w0, rb, x, K, out); break;
        case GT_Q4_1: tile_mt(GT_Q4_1, NR, MR, mt, w0, rb, x, K, out); break;
        case GT_Q5_0: tile_mt(GT_Q5_0, NR, MR, mt, w0, rb, x, K, out); break;
        case GT_Q5_1: tile_mt(GT_Q5_1, NR, MR, mt, w0, rb, x, K, out); break;
        case GT_Q8_0: tile_mt(GT_Q8_0, NR, MR, mt, w0, rb, x, K, out); break;
        case GT_Q4_K: tile_mt(GT_Q4_K, NR, MR, mt, w0, rb, x, K, out); break;
        case GT_Q5_K: tile_mt(GT_Q5_K, NR, MR, mt, w0, rb, x, K, out); break;
        case GT_Q6_K: tile_mt(GT_Q6_K, NR, MR, mt, w0, rb, x, K, out); break;
        default: break;
    }
}

/* Rows of one merged projection's output held in one ggml type. */
typedef struct {
    const uint8_t *data;          /* n rows of row_bytes */
    int64_t type, n, row_bytes;
    int64_t col0;                 /* its first column in y */
} GgufPart;

static inline void put(float *y, int64_t ldy, int64_t m0, int mt, int64_t n0, int nr,
                       const float *out, const float *bias) {
    for (int r = 0; r < nr; r++) {
        const float b = bias ? bias[n0 + r] : 0.f;
        for (int t = 0; t < mt; t++) y[(m0 + t) * ldy + n0 + r] = out[r * mt + t] + b;
    }
}

/* y[M, N] = x[M, K] @ W^T (+ bias[N]) with W the parts' rows (K a multiple of each part's block). */
void pagoda_gguf_gemm(const float *x, int64_t M, int64_t K, const GgufPart *parts, int64_t nparts,
                      const float *bias, float *y, int64_t N) {
    int64_t start[9] = {0};
    if (nparts > 8) return;
    const int R = M > MR ? NRS : NR;  /* rows per tile */
    for (int64_t p = 0; p < nparts; p++) start[p + 1] = start[p] + (parts[p].n + R - 1) / R;
    const int64_t tiles = start[nparts];
    #pragma omp parallel num_threads(NTHREADS)
    {
        float out[TR * MR];
        float *scr = M > MR ? aligned_alloc(64, ((NRS * K * sizeof(float)) + 63) / 64 * 64) : NULL;
        for (int64_t m0 = 0; m0 < M; m0 += MC) {
            const int64_t mc = M - m0 < MC ? M - m0 : MC;
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < tiles; i++) {
                int64_t p = 0;
                while (i >= start[p + 1]) p++;
                const GgufPart *P = parts + p;
                const int64_t n0 = (i - start[p]) * R;
                const int nr = P->n - n0 < R ? (int)(P->n - n0) : R;
                const uint8_t *w0 = P->data + n0 * P->row_bytes;
                float *yc = y + P->col0;
                const float *bc = bias ? bias + P->col0 : NULL;
                if (mc <= MR) {  /* one token tile: widen in registers, NR rows at a time */
                    for (int r0 = 0; r0 < nr; r0 += NR) {
                        const int nrr = nr - r0 < NR ? nr - r0 : NR;
                        /* a short last tile (NR is 1 or 2) reads its row twice, drops the copy */
                        tile_any(P->type, (int)mc, w0 + r0 * P->row_bytes,
                                 nrr == NR ? P->row_bytes : 0, x + m0 * K, K, out);
                        put(yc, N, m0, (int)mc, n0 + r0, nrr, out, bc);
                    }
                } else {  /* several: widen once into L1, then run them over it */
                    widen(P->type, w0, P->row_bytes, nr, K, scr);
                    if (nr < NRS) memset(scr + nr * K, 0, sizeof(float) * (NRS - nr) * K);
                    for (int64_t t0 = 0; t0 < mc; t0 += MRS) {
                        const int mt = mc - t0 < MRS ? (int)(mc - t0) : MRS;
                        tile_widened(mt, scr, K, x + (m0 + t0) * K, out);
                        put(yc, N, m0 + t0, mt, n0, nr, out, bc);
                    }
                }
            }
        }
        free(scr);
    }
}
