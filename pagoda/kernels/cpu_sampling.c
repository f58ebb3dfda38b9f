// Token sampling on the CPU, one call a step: the row sampler and the penalties of
// pagoda/kernels/sampling.py (their torch references; the algorithm is described there). A
// handful of passes over each row in one loop beats the dozens of torch ops of the reference,
// each of which pays OpenMP's fork/join on a busy 2-core machine.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "cpu_threads.h"

#pragma GCC optimize("fp-contract=off")  // the same roundings as the torch reference

#define CHUNK 2048
#define COUNT_MASK ((1 << 30) - 1)

// Philox4x32-10, key = seed, counter = (c0, c1, c2, c3): triton.language.random.philox's
static void philox(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t out[4]) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)0xD2511F53u * c0, p2 = (uint64_t)0xCD9E8D57u * c2;
        uint32_t n0 = (uint32_t)(p2 >> 32) ^ c1 ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c1 = (uint32_t)p2;
        c3 = (uint32_t)p0;
        c0 = n0;
        c2 = n2;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    out[0] = c0, out[1] = c1, out[2] = c2, out[3] = c3;
}

// E ~ Exp(1) from 32 random bits, as race_noise in sampling.py: v = (bits + 1/2) / 2**32 and
// E = -log(1 - v) >= v (a series for small v, where 1 - v would round)
static inline float uniform_of(uint32_t bits) { return (float)bits * 0x1p-32f + 0x1p-33f; }
static inline float exp_noise(float v) {
    return v < 1.f / 64 ? v * (1 + v * (0.5f + v * (1.f / 3 + v * 0.25f))) : -logf(1 - v);
}

// mass of the tokens with x > gt: fp32 within a chunk, fp64 across chunks
static double mass_above(const float* x, const float* e, int64_t w, float gt) {
    double acc = 0.0;
    for (int64_t s = 0; s < w; s += CHUNK) {
        int64_t end = s + CHUNK < w ? s + CHUNK : w;
        float c = 0.f;
        for (int64_t j = s; j < end; j++) c += x[j] > gt ? e[j] : 0.f;
        acc += c;
    }
    return acc;
}

void pagoda_sample_rows(const float* vals, int64_t stride, const int64_t* index, const int64_t* width,
                        const float* inv_temp, const float* min_p, const float* top_p,
                        const uint64_t* seed, const int64_t* pos, int64_t n, int64_t max_width,
                        int32_t use_top_p, int32_t max_rounds, int64_t* out) {
    // a row costs ~7 ns a token (one exp and a quarter of a Philox call each): from ~1 ms of
    // work on, the rows are shared out (8 rows of a 49k vocabulary: 2.8 ms on one thread)
    #pragma omp parallel num_threads(NTHREADS) if (n > 1 && n * max_width >= (1 << 17))
    {
        float* x = malloc(2 * (size_t)max_width * sizeof(float));
        float* e = x + max_width;
        #pragma omp for schedule(dynamic)
        for (int64_t i = 0; i < n; i++) {
            const float* row = vals + index[i] * stride;
            const int64_t w = width[i];
            const float it = inv_temp[i];
            const uint32_t p_lo = (uint32_t)pos[i], p_hi = (uint32_t)((uint64_t)pos[i] >> 32);
            float m = -INFINITY;
            for (int64_t j = 0; j < w; j++) {
                x[j] = row[j] * it;
                m = x[j] > m ? x[j] : m;
            }
            if (!(m > -INFINITY)) m = 0.f;  // nothing to draw: column 0
            const float lo = min_p[i] > 0 ? m + logf(fmaxf(min_p[i], 1e-30f)) : -INFINITY;
            const int top = use_top_p && top_p[i] < 1.f;
            for (int64_t j = 0; j < w; j++) e[j] = x[j] >= lo ? expf(x[j] - m) : 0.f;
            const double z0 = top ? mass_above(x, e, w, -INFINITY) : 0.0;
            float piv = -INFINITY;
            int64_t tok = 0;
            for (int32_t r = 0; r < max_rounds; r++) {
                // the race as argmax e / E; since E >= v, a token with e <= best * v cannot win
                // and needs no logarithm: nearly all of them after the first few
                float best = 0.f;  // tokens without mass (e = 0) never win
                int64_t pick = 0;
                for (int64_t g = 0; g < w; g += 4) {
                    uint32_t bits[4];
                    philox(seed[i], (uint32_t)(g >> 2), p_lo, p_hi, (uint32_t)r, bits);
                    for (int64_t j = g; j < g + 4 && j < w; j++) {
                        const float v = uniform_of(bits[j - g]);
                        if (!(e[j] > best * v) || !(x[j] > piv)) continue;
                        const float score = e[j] / exp_noise(v);
                        if (score > best) best = score, pick = j;
                    }
                }
                tok = pick;
                if (!top || r == max_rounds - 1) break;
                const float xj = x[tok];
                const double better = mass_above(x, e, w, xj);
                if (better < (double)top_p[i] * z0 || better == 0.0) break;  // the best always stays
                piv = xj;  // every token no more likely than the draw is outside the top-p set
            }
            out[i] = tok;
        }
        free(x);
    }
}

void pagoda_penalties(float* logits, int64_t l_stride, const int32_t* state, int64_t s_stride,
                      const int64_t* batch_rows, const int64_t* state_rows, const float* rep,
                      const float* freq, const float* pres, int64_t n, int64_t vocab) {
    #pragma omp parallel for num_threads(NTHREADS) if (n * vocab >= (1 << 20))
    for (int64_t i = 0; i < n; i++) {
        float* x = logits + batch_rows[i] * l_stride;
        const int32_t* st = state + state_rows[i] * s_stride;
        for (int64_t v = 0; v < vocab; v++) {
            const int32_t s = st[v];
            if (!s) continue;
            float y = x[v] > 0 ? x[v] / rep[i] : x[v] * rep[i];
            const float c = (float)(s & COUNT_MASK);
            y = y - freq[i] * c;
            x[v] = y - pres[i] * (c > 0 ? 1.f : 0.f);
        }
    }
}
