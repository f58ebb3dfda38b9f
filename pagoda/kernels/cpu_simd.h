/* x86 SIMD helpers shared by the CPU kernels (included; cpu_build.py hashes this file too).
 * `vf` is the widest float register the build has: 16 floats with AVX-512 (cpu_build.py's avx512
 * flags), else 8 (AVX2); kernels written with these macros compile for either. */
#ifndef PAGODA_CPU_SIMD_H
#define PAGODA_CPU_SIMD_H
#include <immintrin.h>

static inline float hsum8(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* The sums of 8 registers, one per lane: out[j] = sum of a[j]'s lanes. */
static inline __m256 hsum8x8(const __m256 a[8]) {
    const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define VL 16
typedef __m512 vf;
typedef __m512i vi;
#define NR 2
#define vzero() _mm512_setzero_ps()
#define vset1(a) _mm512_set1_ps(a)
#define vload(p) _mm512_loadu_ps(p)
#define vstore(p, a) _mm512_storeu_ps(p, a)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vmul(a, b) _mm512_mul_ps(a, b)
#define vcvt(a) _mm512_cvtepi32_ps(a)
#define iset1(a) _mm512_set1_epi32(a)
#define iand(a, b) _mm512_and_si512(a, b)
#define ior(a, b) _mm512_or_si512(a, b)
#define isub(a, b) _mm512_sub_epi32(a, b)
#define iadd(a, b) _mm512_add_epi32(a, b)
#define vadd(a, b) _mm512_add_ps(a, b)
#define isrlv(a, b) _mm512_srlv_epi32(a, b)
#define islli(a, n) _mm512_slli_epi32(a, n)
#define iiota() _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
#define iu8(p) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define ii8(p) _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define vbcast0(x) _mm512_broadcastss_ps(x)                  /* lane 0 of a __m128, everywhere */
#define vbcast1(x) _mm512_broadcastss_ps(_mm_movehdup_ps(x))  /* lane 1 */
#define vsub(a, b) _mm512_sub_ps(a, b)
#define vmax(a, b) _mm512_max_ps(a, b)
#define vround(a) _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vcvti(a) _mm512_cvtps_epi32(a)
#define vcast(a) _mm512_castsi512_ps(a)
static inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
/* out[j] = sum of a[j]'s lanes, j < 16 */
static inline vf vsums(const vf a[16]) {
    __m256 lo[8], hi[8];
    for (int j = 0; j < 8; j++) {
        lo[j] = _mm256_add_ps(_mm512_castps512_ps256(a[j]), _mm512_extractf32x8_ps(a[j], 1));
        hi[j] = _mm256_add_ps(_mm512_castps512_ps256(a[j + 8]), _mm512_extractf32x8_ps(a[j + 8], 1));
    }
    return _mm512_insertf32x8(_mm512_castps256_ps512(hsum8x8(lo)), hsum8x8(hi), 1);
}
#else
#define VL 8
typedef __m256 vf;
typedef __m256i vi;
#define NR 1
#define vzero() _mm256_setzero_ps()
#define vset1(a) _mm256_set1_ps(a)
#define vload(p) _mm256_loadu_ps(p)
#define vstore(p, a) _mm256_storeu_ps(p, a)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vmul(a, b) _mm256_mul_ps(a, b)
#define vcvt(a) _mm256_cvtepi32_ps(a)
#define iset1(a) _mm256_set1_epi32(a)
#define iand(a, b) _mm256_and_si256(a, b)
#define ior(a, b) _mm256_or_si256(a, b)
#define isub(a, b) _mm256_sub_epi32(a, b)
#define iadd(a, b) _mm256_add_epi32(a, b)
#define vadd(a, b) _mm256_add_ps(a, b)
#define isrlv(a, b) _mm256_srlv_epi32(a, b)
#define islli(a, n) _mm256_slli_epi32(a, n)
#define iiota() _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)
#define iu8(p) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define ii8(p) _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define vbcast0(x) _mm256_broadcastss_ps(x)
#define vbcast1(x) _mm256_broadcastss_ps(_mm_movehdup_ps(x))
#define vsub(a, b) _mm256_sub_ps(a, b)
#define vmax(a, b) _mm256_max_ps(a, b)
#define vround(a) _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vcvti(a) _mm256_cvtps_epi32(a)
#define vcast(a) _mm256_castsi256_ps(a)
static inline float vsum(vf v) { return hsum8(v); }
static inline vf vsums(const vf a[8]) { return hsum8x8(a); }
#endif

/* exp(x) for x <= 88 to about 2 ulp (Cephes' expf: 2^n times a degree-6 polynomial); inputs
 * below -87.3 give ~1e-38 rather than 0. */
static inline vf vexp(vf x) {
    x = vmax(x, vset1(-87.3f));
    const vf n = vround(vmul(x, vset1(1.44269504088896341f)));
    vf r = vfma(n, vset1(-0.693359375f), x);
    r = vfma(n, vset1(2.12194440e-4f), r);
    vf p = vset1(1.9875691500E-4f);
    p = vfma(p, r, vset1(1.3981999507E-3f));
    p = vfma(p, r, vset1(8.3334519073E-3f));
    p = vfma(p, r, vset1(4.1665795894E-2f));
    p = vfma(p, r, vset1(1.6666665459E-1f));
    p = vfma(p, r, vset1(5.0000001201E-1f));
    p = vfma(p, vmul(r, r), vadd(r, vset1(1.f)));
    const vi e = islli(iadd(vcvti(n), iset1(127)), 23);
    return vmul(p, vcast(e));
}
#endif
