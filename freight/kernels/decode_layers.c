/* The decoder layers of a small step (Llama-shaped: pre-norm, fused QKV, rotary, paged
 * attention, gated SiLU MLP) in one native call.
 *
 * A decode step of a small batch moves little data per layer, so Python's per-op cost (module
 * calls, ctypes argument conversion, tensor allocation: about 140 us a layer on a 2-core box)
 * was a third of a single-stream step. This driver runs the very kernels the Python path calls,
 * in the same order on the same buffers, so its outputs are bit-identical to it; the kernels
 * come in as function pointers from the libraries already loaded for this ISA level (each keeps
 * its own per-ISA build), and the weights as pointers packed once per model: float weights packed
 * for gemm.c, or int8 weights and their scales for int8_gemm.c (--quantization int8).
 *
 * Per layer (l), as models/llama.py's DecoderLayer:
 *   residual += x; t = norm(residual)          (layer 0: t = norm(residual), the embeddings)
 *   qkv = t @ Wqkv; rotate q and k in place; write k, v at each token's cache slot
 *   a = paged_decode(q, caches) for decodes, paged_prefill for chunks; x = a @ Wo
 *   residual += x; t = norm(residual); x = silu_and_mul(t @ Wgate_up) @ Wdown
 * The final norm (and the logits) stay with the caller.
 */
#include <stdint.h>
#include <string.h>

typedef void (*rms_norm_fn)(const void *, void *, const void *, void *, int64_t, int64_t, float);
typedef void (*rotary_fn)(void *, int64_t, int64_t, int, int, const int64_t *, const float *, const float *);
typedef void (*silu_fn)(const void *, void *, int64_t, int64_t);
typedef int (*gemm_fn)(const void *, int64_t, const void *, void *, int64_t, int, int, int);
typedef int (*int8_gemm_fn)(const void *, int64_t, int, const void *, const float *, void *, int64_t, int, int,
                            int);
typedef int (*decode_fn)(const void *, int64_t, const void *, const void *, const int64_t *, int64_t,
                         const int64_t *, void *, int, int, int, int, int64_t, int, float, int64_t);
typedef int (*prefill_fn)(const void *, int64_t, const void *, const void *, const int64_t *, int64_t,
                          const int64_t *, int, void *, int64_t, int, int, int, int64_t, int, float, int64_t);

enum { F_NORM, F_ROTARY, F_SILU, F_GEMM, F_DECODE, F_INT8_GEMM, F_PREFILL, NUM_FNS };
enum { L_NORM1, L_QKV, L_O, L_NORM2, L_GATE_UP, L_DOWN, L_K_CACHE, L_V_CACHE,
       L_QKV_SCALES, L_O_SCALES, L_GATE_UP_SCALES, L_DOWN_SCALES, L_QKV_BIAS, PTRS_PER_LAYER };
enum { D_HIDDEN, D_HEADS, D_KV_HEADS, D_HEAD_DIM, D_INTER, D_BLOCK_SIZE, D_ELEM_SIZE, D_INT8, NUM_DIMS };

/* One projection: gemm.c on packed float weights, or int8_gemm.c on int8 weights and their scales. */
typedef struct {
    gemm_fn gemm;
    int8_gemm_fn int8_gemm;
    int x_bf16;
} linears;

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* y [rows, n] += bias, as PyTorch's add_ rounds it: in float32, then (bf16) to nearest even. */
static void add_bias(void *y, const void *bias, int rows, int n, int64_t es) {
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < n; i++) {
            if (es == 4) {
                ((float *)y)[(int64_t)r * n + i] += ((const float *)bias)[i];
                continue;
            }
            uint16_t *out = (uint16_t *)y + (int64_t)r * n + i;
            float v = bf16_to_f32(*out) + bf16_to_f32(((const uint16_t *)bias)[i]);
            uint32_t u;
            memcpy(&u, &v, sizeof u);
            u += 0x7fffu + ((u >> 16) & 1u);
            *out = (uint16_t)(u >> 16);
        }
}

static int project(const linears *lin, const void *x, int64_t x_stride, const void *w, const void *scales, void *y,
                   int rows, int n, int k) {
    if (lin->int8_gemm)
        return lin->int8_gemm(x, x_stride, lin->x_bf16, w, (const float *)scales, y, n, rows, n, k);
    return lin->gemm(x, x_stride, w, y, n, rows, n, k);
}

/* The step's rows: num_decodes one-token decodes first (tables/seq_lens: theirs), then num_chunks
 * prefill chunks (chunk_tables; chunks: (first row, rows, tokens cached before), as the prefill kernel
 * takes them), e.g. speculative verification.
 * residual [rows, hidden] in: the embeddings; out: the residual stream after the last layer.
 * x [rows, hidden] out: the last layer's output.
 * work: scratch of rows * (hidden + qkv + heads*dim + 2*inter + inter) elements. Returns 0, or the
 * failing kernel's code (the caller then runs its Python path; cache writes are idempotent). */
int decode_layers(const void *const *fns, const void *const *layers, int num_layers, void *x, void *residual,
                  int rows, const int64_t *dims, int64_t num_blocks, float eps, float scale,
                  const int64_t *positions, const float *cos_t, const float *sin_t, const int64_t *slots,
                  int num_decodes, const int64_t *tables, int64_t table_stride, const int64_t *seq_lens,
                  int num_chunks, const int64_t *chunk_tables, int64_t chunk_table_stride, const int64_t *chunks,
                  void *work) {
    const rms_norm_fn norm = (rms_norm_fn)fns[F_NORM];
    const rotary_fn rotary = (rotary_fn)fns[F_ROTARY];
    const silu_fn silu = (silu_fn)fns[F_SILU];
    const linears lin = {(gemm_fn)fns[F_GEMM], dims[D_INT8] ? (int8_gemm_fn)fns[F_INT8_GEMM] : NULL,
                         dims[D_ELEM_SIZE] == 2};
    const decode_fn decode = (decode_fn)fns[F_DECODE];
    const prefill_fn prefill = (prefill_fn)fns[F_PREFILL];
    const int hidden = (int)dims[D_HIDDEN], heads = (int)dims[D_HEADS], kv_heads = (int)dims[D_KV_HEADS];
    const int dim = (int)dims[D_HEAD_DIM], inter = (int)dims[D_INTER], block_size = (int)dims[D_BLOCK_SIZE];
    const int64_t es = dims[D_ELEM_SIZE];
    const int q_size = heads * dim, kv_size = kv_heads * dim, qkv_size = q_size + 2 * kv_size;
    char *t = (char *)work;                                  /* [rows, hidden]   normed input */
    char *qkv = t + (int64_t)rows * hidden * es;             /* [rows, qkv_size] */
    char *attn = qkv + (int64_t)rows * qkv_size * es;        /* [rows, q_size]   */
    char *gate_up = attn + (int64_t)rows * q_size * es;      /* [rows, 2 inter]  */
    char *h = gate_up + (int64_t)rows * 2 * inter * es;      /* [rows, inter]    */
    const int64_t cache_rows = num_blocks * block_size;      /* a cache viewed as [kv_heads, slots, dim] */
    int rc;

    for (int l = 0; l < num_layers; l++) {
        const void *const *w = layers + (int64_t)l * PTRS_PER_LAYER;
        if (l == 0) {
            norm(residual, NULL, w[L_NORM1], t, rows, hidden, eps);
        } else {
            norm(x, residual, w[L_NORM1], t, rows, hidden, eps);
        }
        if ((rc = project(&lin, t, hidden, w[L_QKV], w[L_QKV_SCALES], qkv, rows, qkv_size, hidden)) != 0) return rc;
        if (w[L_QKV_BIAS]) add_bias(qkv, w[L_QKV_BIAS], rows, qkv_size, es);  /* Qwen2's q/k/v biases */
        rotary(qkv, rows, qkv_size, heads + kv_heads, dim, positions, cos_t, sin_t);
        for (int r = 0; r < rows; r++) {
            const char *k = qkv + ((int64_t)r * qkv_size + q_size) * es, *v = k + (int64_t)kv_size * es;
            for (int g = 0; g < kv_heads; g++) {
                const int64_t at = ((int64_t)g * cache_rows + slots[r]) * dim * es;
                memcpy((char *)w[L_K_CACHE] + at, k + (int64_t)g * dim * es, (size_t)dim * es);
                memcpy((char *)w[L_V_CACHE] + at, v + (int64_t)g * dim * es, (size_t)dim * es);
            }
        }
        if (num_decodes && (rc = decode(qkv, qkv_size, w[L_K_CACHE], w[L_V_CACHE], tables, table_stride, seq_lens,
                                        attn, num_decodes, heads, kv_heads, dim, num_blocks, block_size, scale,
                                        0)) != 0)
            return rc;
        if (num_chunks && (rc = prefill(qkv, qkv_size, w[L_K_CACHE], w[L_V_CACHE], chunk_tables, chunk_table_stride,
                                        chunks, num_chunks, attn, q_size, heads, kv_heads, dim, num_blocks,
                                        block_size, scale, 0)) != 0)
            return rc;
        if ((rc = project(&lin, attn, q_size, w[L_O], w[L_O_SCALES], x, rows, hidden, q_size)) != 0) return rc;
        norm(x, residual, w[L_NORM2], t, rows, hidden, eps);
        if ((rc = project(&lin, t, hidden, w[L_GATE_UP], w[L_GATE_UP_SCALES], gate_up, rows, 2 * inter, hidden)) != 0)
            return rc;
        silu(gate_up, h, rows, inter);
        if ((rc = project(&lin, h, inter, w[L_DOWN], w[L_DOWN_SCALES], x, rows, hidden, inter)) != 0) return rc;
    }
    return 0;
}
