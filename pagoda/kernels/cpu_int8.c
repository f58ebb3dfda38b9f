/* Weight-only int8 matmul for the CPU (AVX2 + FMA), built by pagoda/kernels/cpu_build.py.
 *
 * y[M,N] = x[M,K] @ w[N,K]^T (+ bias), x float32, w uint8 in groups of 32 along K with a float
 * scale and minimum per group: w = q * scale + min. That grid holds llama.cpp's Q4_1 and Q4_0
 * blocks exactly (a 4-bit level is 17 steps of 8 bits) and Q8_0 to within half its step, so a
 * GGUF's weights lose almost nothing on the way in. Each group of weights is widened to float in
 * registers once and used for up to 8 tokens, so a decode step reads 1 byte per weight instead of
 * 4 and activations are not quantized (an int8-activation variant was slower at 8 tokens, and
 * per-tensor activation scales, as in fbgemm's dynamic int8, changed greedy outputs).
 */
#include <immintrin.h>
#include <stdint.h>

#include "cpu_simd.h"
#include "cpu_threads.h"

#define GROUP 32
#define NB 8  /* weight rows per block: they stay in L1 while token tiles stream past */

/* One weight row against MT tokens. MT is a literal at every call site, so the accumulators stay
 * in registers (a runtime count spills them to the stack). Each token gets A independent
 * accumulator chains so the FMAs of one group do not wait on each other (at one token a single
 * chain made the kernel latency-bound). */
static inline __attribute__((always_inline)) void row_tile(
        const uint8_t *wr, const float *swr, const float *mwr, const float *x, int64_t K, int64_t G,
        const int MT, float b, float *y, int64_t N) {
    const int A = MT == 1 ? 4 : (MT <= 4 ? 2 : 1);
    __m256 acc[8][4];
    for (int t = 0; t < MT; t++)
        for (int a = 0; a < A; a++) acc[t][a] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const __m256 s = _mm256_broadcast_ss(swr + g), mn = _mm256_broadcast_ss(mwr + g);
        const __m256i w32 = _mm256_loadu_si256((const __m256i *)(wr + g * GROUP));
        const __m128i lo = _mm256_castsi256_si128(w32), hi = _mm256_extracti128_si256(w32, 1);
        __m256 wf[4];
        wf[0] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), mn);
        wf[1] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), mn);
        wf[2] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), mn);
        wf[3] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), mn);
        for (int t = 0; t < MT; t++) {
            const float *xt = x + t * K + g * GROUP;
            for (int j = 0; j < 4; j++)
                acc[t][j % A] = _mm256_fmadd_ps(wf[j], _mm256_loadu_ps(xt + 8 * j), acc[t][j % A]);
        }
    }
    for (int t = 0; t < MT; t++) {
        for (int a = 1; a < A; a++) acc[t][0] = _mm256_add_ps(acc[t][0], acc[t][a]);
        y[t * N] = hsum8(acc[t][0]) + b;
    }
}

void pagoda_w8_gemm(const float *x, int64_t M, const uint8_t *qw, const float *sw,
                    const float *mw, int64_t N, int64_t K, const float *bias, float *y) {
    const int64_t G = K / GROUP;
    #pragma omp parallel for schedule(static) num_threads(NTHREADS)
    for (int64_t nb = 0; nb < (N + NB - 1) / NB; nb++) {
        const int64_t n0 = nb * NB, n1 = n0 + NB < N ? n0 + NB : N;
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
            const int64_t mt = M - m0 < 8 ? M - m0 : 8;
            const float *xt = x + m0 * K;
            for (int64_t n = n0; n < n1; n++) {
                const float b = bias ? bias[n] : 0.f;
                float *yt = y + m0 * N + n;
                const uint8_t *wr = qw + n * K;
                const float *swr = sw + n * G, *mwr = mw + n * G;
                switch (mt) {
                    case 8: row_tile(wr, swr, mwr, xt, K, G, 8, b, yt, N); break;
                    case 7: row_tile(wr, swr, mwr, xt, K, G, 7, b, yt, N); break;
                    case 6: row_tile(wr, swr, mwr, xt, K, G, 6, b, yt, N); break;
                    case 5: row_tile(wr, swr, mwr, xt, K, G, 5, b, yt, N); break;
                    case 4: row_tile(wr, swr, mwr, xt, K, G, 4, b, yt, N); break;
                    case 3: row_tile(wr, swr, mwr, xt, K, G, 3, b, yt, N); break;
                    case 2: row_tile(wr, swr, mwr, xt, K, G, 2, b, yt, N); break;
                    default: row_tile(wr, swr, mwr, xt, K, G, 1, b, yt, N); break;
                }
            }
        }
    }
}
