/* One whole decoder layer (Llama / Qwen2 / Qwen3) for a decode step on the CPU, float32
 * activations and packed GGUF or 8-bit group weights, built by pagoda/kernels/cpu_build.py.
 *
 * At batch 1-8 a layer's arithmetic takes well under a millisecond, and running it as ~25 torch
 * calls from Python cost about as much again; here Python makes one call per layer. The pieces
 * are the kernels beside this file (each tested against its torch reference), chained with
 * caller-provided scratch. Prefill and mixed steps keep the per-op path (SDPA is better there).
 * The KV cache is float32, or int8 (--kv-cache-dtype int8: quantized as it is written, dequantized
 * inside the attention loop; cpu_attention.c).
 */
#include "cpu_int8.c"
#include "cpu_gguf.c"
#include "cpu_attention.c"
#include "cpu_fused.c"

typedef struct {
    const uint8_t *q;
    const float *scale, *min, *bias;  /* bias may be NULL */
    int64_t n, k;
    const GgufPart *parts;            /* packed GGUF rows (cpu_gguf.c); NULL: the 8-bit groups */
    int64_t nparts;
} QWeight;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter, rot;
    float eps, attn_scale;
    const float *ln1, *ln2, *q_norm, *k_norm;  /* q_norm / k_norm NULL unless Qwen3 */
    QWeight qkv, o, gate_up, down;
    void *kv;                                  /* [2, num_blocks, block_size, kv_heads, D] */
    uint16_t *kv_scales;                       /* int8 cache: float16 scales [2, nb, bs, kv_heads] */
    uint8_t *kv_zeros;                         /* and zero points; both NULL for a float32 cache */
    int64_t num_blocks, block_size;
    int64_t window;                            /* sliding window (Mistral), 0 = global */
} Layer;

typedef struct {
    int64_t T;                     /* tokens = requests, one each */
    const int64_t *positions, *slots, *rows;  /* rows[i] = i, for the attention kernel */
    const float *cos_sin;
    const int32_t *block_tables, *seq_lens;
    int64_t max_blocks;
    float *xn, *qkv, *attn, *gu, *act;  /* scratch: [T,hidden] [T,qkv] [T,heads*D] [T,2I] [T,I] */
} Step;

static void matmul(const QWeight *w, const float *x, int64_t M, float *y) {
    if (w->parts)
        pagoda_gguf_gemm(x, M, w->k, w->parts, w->nparts, w->bias, y, w->n);
    else
        pagoda_w8_gemm(x, M, w->q, w->scale, w->min, w->n, w->k, w->bias, y);
}

/* h [T, hidden]: in = previous layer's MLP output (or the embeddings when `first`), out = this
 * layer's MLP output. res [T, hidden]: the residual stream, updated in place. */
void pagoda_decoder_layer(const Layer *L, const Step *S, float *h, float *res, int first) {
    const int64_t T = S->T, H = L->hidden, D = L->head_dim;
    const int64_t qkv_w = (L->heads + 2 * L->kv_heads) * D;
    if (first) {
        for (int64_t i = 0; i < T * H; i++) res[i] = h[i];
        pagoda_rms_norm(res, NULL, L->ln1, S->xn, NULL, T, H, L->eps);
    } else {
        pagoda_rms_norm(h, res, L->ln1, S->xn, res, T, H, L->eps);
    }
    matmul(&L->qkv, S->xn, T, S->qkv);
    float *q = S->qkv, *k = S->qkv + L->heads * D, *v = k + L->kv_heads * D;
    if (L->q_norm) {  /* per-head RMSNorm of q and k (Qwen3), in place */
        for (int64_t t = 0; t < T; t++) {
            pagoda_rms_norm(q + t * qkv_w, NULL, L->q_norm, q + t * qkv_w, NULL, L->heads, D, L->eps);
            pagoda_rms_norm(k + t * qkv_w, NULL, L->k_norm, k + t * qkv_w, NULL, L->kv_heads, D, L->eps);
        }
    }
    pagoda_rotary(q, T, qkv_w, L->heads, D, L->rot, S->positions, S->cos_sin);
    pagoda_rotary(k, T, qkv_w, L->kv_heads, D, L->rot, S->positions, S->cos_sin);
    if (L->kv_scales) {
        pagoda_kv_write_int8(k, v, qkv_w, T, S->slots, L->kv, L->kv_scales, L->kv_zeros,
                             L->num_blocks, L->block_size, L->kv_heads, D);
        pagoda_paged_decode_int8(q, qkv_w, S->rows, S->rows, T, L->kv, L->kv_scales, L->kv_zeros,
                                 L->num_blocks, L->block_size, L->kv_heads, D, S->block_tables,
                                 S->max_blocks, S->seq_lens, L->heads, L->attn_scale, L->window,
                                 0.f, S->attn);
    } else {
        const int64_t slot_w = L->kv_heads * D;
        float *kcache = L->kv, *vcache = kcache + L->num_blocks * L->block_size * slot_w;
        for (int64_t t = 0; t < T; t++) {
            if (S->slots[t] < 0) continue;
            for (int64_t i = 0; i < slot_w; i++) {
                kcache[S->slots[t] * slot_w + i] = k[t * qkv_w + i];
                vcache[S->slots[t] * slot_w + i] = v[t * qkv_w + i];
            }
        }
        pagoda_paged_decode(q, qkv_w, S->rows, S->rows, T, kcache, L->num_blocks, L->block_size,
                            L->kv_heads, D, S->block_tables, S->max_blocks, S->seq_lens, L->heads,
                            L->attn_scale, L->window, 0.f, S->attn);
    }
    matmul(&L->o, S->attn, T, h);
    pagoda_rms_norm(h, res, L->ln2, S->xn, res, T, H, L->eps);
    matmul(&L->gate_up, S->xn, T, S->gu);
    pagoda_silu_and_mul(S->gu, S->act, T, L->inter);
    matmul(&L->down, S->act, T, h);
}
