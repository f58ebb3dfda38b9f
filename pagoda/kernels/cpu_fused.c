/* Small fused float32 ops for the CPU decode path, built by pagoda/kernels/cpu_build.py.
 *
 * At batch 1-8 each of these does a few microseconds of arithmetic, and the torch expressions
 * they replace (rms_norm with a residual add, rotate-half rotary, silu * up) cost 30-50 us per
 * call in dispatch and temporaries, 180 calls per step. References: norm.py, rotary.py,
 * activation.py beside this file. Loops are parallel only when the batch is large (prefill).
 */
#include <math.h>
#include <stdint.h>

#include "cpu_threads.h"

#define PAR_MIN 65536  /* elements below which one thread is faster than waking the pool */

/* out = rms_norm(x (+ res_in)) * w; res_out = x + res_in when res_in is given. */
void pagoda_rms_norm(const float *x, const float *res_in, const float *w, float *out,
                     float *res_out, int64_t M, int64_t H, float eps) {
    #pragma omp parallel for schedule(static) num_threads(NTHREADS) if (M * H >= PAR_MIN)
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * H;
        float *orow = out + m * H;
        float ss = 0.f;
        if (res_in) {
            const float *rr = res_in + m * H;
            float *ro = res_out + m * H;
            #pragma omp simd reduction(+:ss)
            for (int64_t i = 0; i < H; i++) { const float v = xr[i] + rr[i]; ro[i] = v; ss += v * v; }
            xr = ro;
        } else {
            #pragma omp simd reduction(+:ss)
            for (int64_t i = 0; i < H; i++) ss += xr[i] * xr[i];
        }
        const float r = 1.f / sqrtf(ss / (float)H + eps);
        #pragma omp simd
        for (int64_t i = 0; i < H; i++) orow[i] = xr[i] * r * w[i];
    }
}

/* Rotate-half rotary in place on x [T, heads, D] (token stride `ts`, heads contiguous), first
 * `rot` features, cos|sin rows of `cache` [max_pos, rot] picked by positions. */
void pagoda_rotary(float *x, int64_t T, int64_t ts, int64_t heads, int64_t D, int64_t rot,
                   const int64_t *positions, const float *cache) {
    const int64_t half = rot / 2;
    #pragma omp parallel for schedule(static) num_threads(NTHREADS) if (T * heads * D >= PAR_MIN)
    for (int64_t t = 0; t < T; t++) {
        const float *c = cache + positions[t] * rot, *s = c + half;
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + t * ts + h * D;
            #pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                const float a = v[i], b = v[i + half];
                v[i] = a * c[i] - b * s[i];
                v[i + half] = b * c[i] + a * s[i];
            }
        }
    }
}

/* out[M, d] = silu(x[:, :d]) * x[:, d:] for x [M, 2d]. */
void pagoda_silu_and_mul(const float *x, float *out, int64_t M, int64_t d) {
    #pragma omp parallel for schedule(static) num_threads(NTHREADS) if (M * d >= PAR_MIN)
    for (int64_t m = 0; m < M; m++) {
        const float *g = x + m * 2 * d, *u = g + d;
        float *o = out + m * d;
        for (int64_t i = 0; i < d; i++) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    }
}
