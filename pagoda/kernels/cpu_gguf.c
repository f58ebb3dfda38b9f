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
 * Decode (M <= 8): one pass over the weights, tiles of NR rows x M tokens in registers.
 * Batches and prefill chunks (M > 8): each thread widens NR rows into an L1 scratch once and
 * runs token tiles of 8 over it, over chunks of MC tokens (so x stays in L2), reading each
 * weight once per chunk. Work is split over row tiles, across all parts of a merged projection.
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
#define MC 64    /* tokens per chunk of a long batch */
#ifndef PF
#define PF 4096  /* bytes ahead each weight row is prefetched */
#endif

#if VL == 16
#define NR 2  /* weight rows per register tile */
#else
#define NR 1
#endif
#define NV (32 / VL)  /* registers per 32 weights */

static inline float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

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
        const int bb = type == GT_Q4_0 ? 18 : type == GT_Q4_1 ? 20 : type == GT_Q5_0 ? 22 : 24;
        const uint8_t *b = row + c * bb;
        const int qs = type == GT_Q4_0 ? 2 : type == GT_Q4_1 ? 4 : type == GT_Q5_0 ? 6 : 8;
        const float d = f16(b);
        vf vd = vset1(d), vm;
        if (type == GT_Q4_0) vm = vset1(-8.f * d);
        else if (type == GT_Q5_0) vm = vset1(-16.f * d);
        else vm = vset1(f16(b + 2));
        uint32_t qh = 0;
        if (type == GT_Q5_0 || type == GT_Q5_1) memcpy(&qh, b + (type == GT_Q5_0 ? 2 : 4), 4);
        for (int v = 0; v < NV; v++) {
            const int j0 = v * VL;  /* first weight of this register */
            vi q = iu8(b + qs + (j0 & 15));
            q = iand(isrlv(q, iset1(j0 >= 16 ? 4 : 0)), nib);
            if (type == GT_Q5_0 || type == GT_Q5_1) {
                const vi h = iand(isrlv(iset1((int)qh), iadd(iiota(), iset1(j0))), iset1(1));
                q = ior(q, islli(h, 4));
            }
            w[v] = vfma(vcvt(q), vd, vm);
        }
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
        const vf vd = vset1(f16(b) * (float)sc), vm = vset1(-f16(b + 2) * (float)m);
        const uint8_t *ql = b + (type == GT_Q4_K ? 16 : 48) + 32 * (j >> 1);
        const vi sh = iset1(4 * (j & 1));
        for (int v = 0; v < NV; v++) {
            vi q = iand(isrlv(iu8(ql + v * VL), sh), nib);
            if (type == GT_Q5_K) {
                const vi h = iand(isrlv(iu8(b + 16 + v * VL), iset1(j)), iset1(1));
                q = ior(q, islli(h, 4));
            }
            w[v] = vfma(vcvt(q), vd, vm);
        }
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
    const int A = NRT * MT >= 8 ? 1 : NV;
    vf acc[NR][MR][NV];  /* fixed sizes: a variable-length array would live on the stack */
    for (int r = 0; r < NRT; r++)
        for (int t = 0; t < MT; t++)
            for (int a = 0; a < A; a++) acc[r][t][a] = vzero();
    const int64_t step = C ? (rb ? rb : 1) / C : 0;  /* ~bytes per 32 weights, for prefetching */
    for (int64_t c = 0; c < C; c++) {
        vf w[NR][NV];
        if (type != GT_F32)
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

/* One NR x mt tile of `type`, mt a literal in every branch. */
static inline __attribute__((always_inline)) void tile_mt(const int type, int mt, const uint8_t *w0,
                                                          int64_t rb, const float *x, int64_t K,
                                                          float *out) {
    const int64_t C = K / 32;
    switch (mt) {
        case 8: tile(type, NR, 8, w0, rb, x, K, C, out); break;
        case 7: tile(type, NR, 7, w0, rb, x, K, C, out); break;
        case 6: tile(type, NR, 6, w0, rb, x, K, C, out); break;
        case 5: tile(type, NR, 5, w0, rb, x, K, C, out); break;
        case 4: tile(type, NR, 4, w0, rb, x, K, C, out); break;
        case 3: tile(type, NR, 3, w0, rb, x, K, C, out); break;
        case 2: tile(type, NR, 2, w0, rb, x, K, C, out); break;
        default: tile(type, NR, 1, w0, rb, x, K, C, out); break;
    }
}

static void tile_any(int64_t type, int mt, const uint8_t *w0, int64_t rb, const float *x,
                     int64_t K, float *out) {
    switch (type) {
        case GT_F32: tile_mt(GT_F32, mt, w0, rb, x, K, out); break;
        case GT_Q4_0: tile_mt(GT_Q4_0, mt, w0, rb, x, K, out); break;
        case GT_Q4_1: tile_mt(GT_Q4_1, mt, w0, rb, x, K, out); break;
        case GT_Q5_0: tile_mt(GT_Q5_0, mt, w0, rb, x, K, out); break;
        case GT_Q5_1: tile_mt(GT_Q5_1, mt, w0, rb, x, K, out); break;
        case GT_Q8_0: tile_mt(GT_Q8_0, mt, w0, rb, x, K, out); break;
        case GT_Q4_K: tile_mt(GT_Q4_K, mt, w0, rb, x, K, out); break;
        case GT_Q5_K: tile_mt(GT_Q5_K, mt, w0, rb, x, K, out); break;
        case GT_Q6_K: tile_mt(GT_Q6_K, mt, w0, rb, x, K, out); break;
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
    for (int64_t p = 0; p < nparts; p++) start[p + 1] = start[p] + (parts[p].n + NR - 1) / NR;
    const int64_t tiles = start[nparts];
    #pragma omp parallel num_threads(NTHREADS)
    {
        float out[NR * MR];
        float *scr = M > MR ? aligned_alloc(64, ((NR * K * sizeof(float)) + 63) / 64 * 64) : NULL;
        for (int64_t m0 = 0; m0 < M; m0 += MC) {
            const int64_t mc = M - m0 < MC ? M - m0 : MC;
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < tiles; i++) {
                int64_t p = 0;
                while (i >= start[p + 1]) p++;
                const GgufPart *P = parts + p;
                const int64_t n0 = (i - start[p]) * NR;
                const int nr = P->n - n0 < NR ? (int)(P->n - n0) : NR;
                const uint8_t *w0 = P->data + n0 * P->row_bytes;
                float *yc = y + P->col0;
                const float *bc = bias ? bias + P->col0 : NULL;
                /* a short last tile (NR is 1 or 2) reads its one row twice and drops the copy */
                const int64_t rb = nr == NR ? P->row_bytes : 0;
                if (mc <= MR) {
                    tile_any(P->type, (int)mc, w0, rb, x + m0 * K, K, out);
                    put(yc, N, m0, (int)mc, n0, nr, out, bc);
                } else {
                    widen(P->type, w0, P->row_bytes, nr, K, scr);
                    for (int64_t t0 = 0; t0 < mc; t0 += MR) {
                        const int mt = mc - t0 < MR ? (int)(mc - t0) : MR;
                        tile_any(GT_F32, mt, (const uint8_t *)scr, nr == NR ? K * 4 : 0,
                                 x + (m0 + t0) * K, K, out);
                        put(yc, N, m0 + t0, mt, n0, nr, out, bc);
                    }
                }
            }
        }
        free(scr);
    }
}
