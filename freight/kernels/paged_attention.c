/* Decode attention straight from the paged KV cache, for CPUs.
 *
 * One query token per sequence attends to the keys in its blocks. The cache layout is
 * [kv_heads][num_blocks][block_size][head_dim]; each (sequence, kv head) work item
 * reads its blocks in place (no gathered copy) for the group of query heads that
 * share the kv head, all arithmetic in float32.
 * Built at run time by freight/kernels/build.py and called through ctypes.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#define MAX_GROUP 16
#define MAX_DIM 256

/* The structure every variant shares. Work items are (sequence, kv head) pairs; each does
 * three passes: a score per visible key (reading K once), a softmax over the scores
 * (vectorisable), and the weighted sum of the values (reading V once). The variants differ
 * only in how they load q, score one key, accumulate one value and store the output. */
#define ITEMS_BEGIN(T, HD)                                                                         \
    const int group = num_heads / num_kv_heads;                                                    \
    const int64_t head_stride = (int64_t)num_blocks * block_size * (HD);                           \
    int64_t max_len = 0;                                                                           \
    for (int s = 0; s < num_seqs; s++) max_len = seq_lens[s] > max_len ? seq_lens[s] : max_len;    \
    int failed = 0;                                                                                \
    _Pragma("omp parallel reduction(|:failed)")                                                    \
    {                                                                                              \
        float *scores = malloc(sizeof(float) * (size_t)group * (size_t)(max_len > 0 ? max_len : 1));\
        if (!scores) failed = 1;                                                                   \
        _Pragma("omp for schedule(dynamic, 1)")                                                    \
        for (int64_t item = 0; item < (int64_t)num_seqs * num_kv_heads; item++) {                  \
            if (!scores) continue;                                                                 \
            const int s = (int)(item / num_kv_heads), h = (int)(item % num_kv_heads);              \
            const int64_t len = seq_lens[s];                                                       \
            const int64_t first = window > 0 && len > window ? len - window : 0;                   \
            const int64_t n = len - first;                                                         \
            const int64_t *table = block_tables + (int64_t)s * table_stride;                       \
            const T *kh = k_cache + h * head_stride, *vh = v_cache + h * head_stride;

#define ITEMS_END                                                                                  \
        }                                                                                          \
        free(scores);                                                                              \
    }                                                                                              \
    return failed ? -2 : 0;

/* for each visible key i: PTR points at its row in BASE (block/offset counters: no division) */
#define FOR_EACH_KEY(T, PTR, BASE, HD)                                                             \
    for (int64_t i = 0, blk = first / block_size, off = first % block_size; i < n; i++)            \
        for (const T *PTR = BASE + (table[blk] * block_size + off) * (HD); PTR;                    \
             PTR = NULL, off = off + 1 == block_size ? 0 : off + 1, blk += off == 0)

/* scores[g][:] <- exp(scores - max); inv[g] <- 1 / sum */
#define SOFTMAX(inv)                                                                               \
    float inv[MAX_GROUP];                                                                          \
    for (int g = 0; g < group; g++) {                                                              \
        float *sg = scores + g * n, mx = -FLT_MAX, sum = 0.f;                                      \
        for (int64_t i = 0; i < n; i++) mx = sg[i] > mx ? sg[i] : mx;                              \
        for (int64_t i = 0; i < n; i++) { sg[i] = expf(sg[i] - mx); sum += sg[i]; }                \
        inv[g] = sum > 0.f ? 1.f / sum : 0.f;                                                      \
    }

#define ARGS(T)                                                                                    \
    const T *q, int64_t q_row_stride, const T *k_cache, const T *v_cache,                          \
    const int64_t *block_tables, int64_t table_stride, const int64_t *seq_lens, T *out,            \
    int num_seqs, int num_heads, int num_kv_heads, int head_dim, int64_t num_blocks,               \
    int block_size, float scale, int64_t window

#define PARAMS q, q_row_stride, k_cache, v_cache, block_tables, table_stride, seq_lens, out, num_seqs,\
               num_heads, num_kv_heads, head_dim, num_blocks, block_size, scale, window

/* Portable: LOAD converts an element to float, STORE writes one output. One function per
 * (dtype, head_dim): a compile-time head_dim lets the compiler unroll and vectorise the
 * per-key loops (about 2x a run-time bound). */
#define DECODE_PORTABLE(NAME, T, LOAD, STORE, HD)                                                  \
static int NAME(ARGS(T)) {                                                                         \
    ITEMS_BEGIN(T, HD)                                                                             \
            float qf[MAX_GROUP][MAX_DIM], acc[MAX_GROUP][MAX_DIM];                                 \
            for (int g = 0; g < group; g++) {                                                      \
                const T *qp = q + (int64_t)s * q_row_stride + (int64_t)(h * group + g) * (HD);     \
                for (int d = 0; d < (HD); d++) qf[g][d] = LOAD(qp[d]) * scale;                     \
                for (int d = 0; d < (HD); d++) acc[g][d] = 0.f;                                    \
            }                                                                                      \
            FOR_EACH_KEY(T, kp, kh, HD) {                                                          \
                float kf[MAX_DIM];                                                                 \
                for (int d = 0; d < (HD); d++) kf[d] = LOAD(kp[d]);                                \
                for (int g = 0; g < group; g++) {                                                  \
                    float dot = 0.f;                                                               \
                    for (int d = 0; d < (HD); d++) dot += qf[g][d] * kf[d];                        \
                    scores[g * n + i] = dot;                                                       \
                }                                                                                  \
            }                                                                                      \
            SOFTMAX(inv)                                                                           \
            FOR_EACH_KEY(T, vp, vh, HD) {                                                          \
                float vf[MAX_DIM];                                                                 \
                for (int d = 0; d < (HD); d++) vf[d] = LOAD(vp[d]);                                \
                for (int g = 0; g < group; g++) {                                                  \
                    const float p = scores[g * n + i];                                             \
                    for (int d = 0; d < (HD); d++) acc[g][d] += p * vf[d];                         \
                }                                                                                  \
            }                                                                                      \
            for (int g = 0; g < group; g++) {                                                      \
                T *op = out + ((int64_t)s * num_heads + h * group + g) * (HD);                     \
                for (int d = 0; d < (HD); d++) op[d] = STORE(acc[g][d] * inv[g]);                  \
            }                                                                                      \
    ITEMS_END                                                                                      \
}

#define ID(x) (x)
DECODE_PORTABLE(decode_bf16_64, uint16_t, bf16_to_f32, f32_to_bf16, 64)
DECODE_PORTABLE(decode_bf16_128, uint16_t, bf16_to_f32, f32_to_bf16, 128)
DECODE_PORTABLE(decode_bf16_any, uint16_t, bf16_to_f32, f32_to_bf16, head_dim)
DECODE_PORTABLE(decode_f32_64, float, ID, ID, 64)
DECODE_PORTABLE(decode_f32_128, float, ID, ID, 128)
DECODE_PORTABLE(decode_f32_any, float, ID, ID, head_dim)

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
/* bfloat16 on CPUs with AVX512_BF16: q.k with vdpbf16ps (bf16 pairs, float32 sums) and
 * the value sum with float32 FMAs on converted rows; about 2x the portable loop. */
#define DECODE_BF16_AVX512(NAME, HD)                                                               \
static int NAME(ARGS(uint16_t)) {                                                                  \
    enum { NQ = (HD) / 32, NV = (HD) / 16 };                                                       \
    ITEMS_BEGIN(uint16_t, HD)                                                                      \
            __m512bh qv[MAX_GROUP][NQ];                                                            \
            __m512 acc[MAX_GROUP][NV];                                                             \
            for (int g = 0; g < group; g++) {                                                      \
                const uint16_t *qp = q + (int64_t)s * q_row_stride + (int64_t)(h * group + g) * (HD);\
                for (int c = 0; c < NQ; c++) qv[g][c] = (__m512bh)_mm512_loadu_si512(qp + 32 * c); \
                for (int c = 0; c < NV; c++) acc[g][c] = _mm512_setzero_ps();                      \
            }                                                                                      \
            FOR_EACH_KEY(uint16_t, kp, kh, HD) {                                                   \
                __m512bh kv[NQ];                                                                   \
                for (int c = 0; c < NQ; c++) kv[c] = (__m512bh)_mm512_loadu_si512(kp + 32 * c);    \
                for (int g = 0; g < group; g++) {                                                  \
                    __m512 dot = _mm512_setzero_ps();                                              \
                    for (int c = 0; c < NQ; c++) dot = _mm512_dpbf16_ps(dot, qv[g][c], kv[c]);     \
                    scores[g * n + i] = _mm512_reduce_add_ps(dot) * scale;                         \
                }                                                                                  \
            }                                                                                      \
            SOFTMAX(inv)                                                                           \
            FOR_EACH_KEY(uint16_t, vp, vh, HD) {                                                   \
                __m512 vf[NV];                                                                     \
                for (int c = 0; c < NV; c++)                                                       \
                    vf[c] = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const void *)(vp + 16 * c)));\
                for (int g = 0; g < group; g++) {                                                  \
                    const __m512 p = _mm512_set1_ps(scores[g * n + i]);                            \
                    for (int c = 0; c < NV; c++) acc[g][c] = _mm512_fmadd_ps(p, vf[c], acc[g][c]); \
                }                                                                                  \
            }                                                                                      \
            for (int g = 0; g < group; g++) {                                                      \
                uint16_t *op = out + ((int64_t)s * num_heads + h * group + g) * (HD);              \
                const __m512 scale_g = _mm512_set1_ps(inv[g]);                                     \
                for (int c = 0; c < NV; c++)                                                       \
                    _mm256_storeu_si256((void *)(op + 16 * c),                                     \
                                        (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[g][c], scale_g)));\
            }                                                                                      \
    ITEMS_END                                                                                      \
}

DECODE_BF16_AVX512(decode_bf16_64_avx512, 64)
DECODE_BF16_AVX512(decode_bf16_128_avx512, 128)
#define HAVE_BF16_AVX512 1
#endif

int paged_decode_bf16(ARGS(uint16_t)) {
    if (num_heads / num_kv_heads > MAX_GROUP || head_dim > MAX_DIM) return -1;
#ifdef HAVE_BF16_AVX512
    if (head_dim == 64) return decode_bf16_64_avx512(PARAMS);
    if (head_dim == 128) return decode_bf16_128_avx512(PARAMS);
#endif
    if (head_dim == 64) return decode_bf16_64(PARAMS);
    if (head_dim == 128) return decode_bf16_128(PARAMS);
    return decode_bf16_any(PARAMS);
}

int paged_decode_f32(ARGS(float)) {
    if (num_heads / num_kv_heads > MAX_GROUP || head_dim > MAX_DIM) return -1;
    if (head_dim == 64) return decode_f32_64(PARAMS);
    if (head_dim == 128) return decode_f32_128(PARAMS);
    return decode_f32_any(PARAMS);
}
