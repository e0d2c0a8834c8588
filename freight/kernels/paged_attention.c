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
 * three passes: the scores (reading K once), a softmax over them (vectorisable), and the
 * weighted sum of the values (reading V once). The portable variants differ only in how
 * they load q, score one key, accumulate one value and store the output; the AVX-512 one
 * works on runs of 16 keys. */
#define ITEMS_BEGIN(T, HD)                                                                         \
    const int group = num_heads / num_kv_heads;                                                    \
    const int64_t head_stride = (int64_t)num_blocks * block_size * (HD);                           \
    int64_t max_len = 0;                                                                           \
    for (int s = 0; s < num_seqs; s++) max_len = seq_lens[s] > max_len ? seq_lens[s] : max_len;    \
    int failed = 0;                                                                                \
    _Pragma("omp parallel reduction(|:failed)")                                                    \
    {                                                                                              \
        float *scores = malloc(sizeof(float) * 2 * (size_t)group * (size_t)(max_len + 2 * block_size));\
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
/* bfloat16 on CPUs with AVX512_BF16, keys taken 16 at a time (block_size a multiple of 16):
 * - scores: one vdpbf16ps chain per key, then a permute-and-add tree turns the 16 partial
 *   vectors into one vector of 16 scores (no per-key horizontal sum);
 * - softmax in float32 over whole 16-key runs, masked keys at -inf; the probabilities are
 *   normalised and rounded to bf16 before the value sum, as transformers' bf16 attention does;
 * - values: two rows interleaved into (v[j][d], v[j+1][d]) pairs, so each vdpbf16ps adds two
 *   keys' contributions for 16 dims.
 * The run two ahead is prefetched into L2: the block table scatters a sequence's blocks, and
 * without it the core stalls on every block boundary (2.3x slower on a shuffled cache). */
#define PREFETCH_AHEAD 2

static inline __m512 sum16(__m512 v[16]) {  /* lane j of the result = the sum of v[j]'s lanes */
    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for (int w = 16; w > 1; w /= 2)
        for (int i = 0; i < w / 2; i++)
            v[i] = _mm512_add_ps(_mm512_permutex2var_ps(v[2 * i], ev, v[2 * i + 1]),
                                 _mm512_permutex2var_ps(v[2 * i], od, v[2 * i + 1]));
    return v[0];
}

static inline void prefetch_l2(const void *p, int bytes) {
    for (int o = 0; o < bytes; o += 64) _mm_prefetch((const char *)p + o, _MM_HINT_T1);
}

/* the 16 keys of run r start at ROW (block-table lookup) */
#define RUN_ROW(BASE, r, HD) ((BASE) + (table[(r) * 16 / block_size] * block_size + (r) * 16 % block_size) * (HD))

#define DECODE_BF16_AVX512(NAME, HD)                                                               \
static int NAME(ARGS(uint16_t)) {                                                                  \
    enum { NQ = (HD) / 32, NV = (HD) / 16 };                                                       \
    uint16_t idx[64];  /* permutation that interleaves two rows' dims 0-15, then dims 16-31 */      \
    for (int i = 0; i < 32; i++) {                                                                 \
        idx[i] = (uint16_t)(i / 2 + (i % 2) * 32);                                                 \
        idx[32 + i] = (uint16_t)(16 + i / 2 + (i % 2) * 32);                                       \
    }                                                                                              \
    const __m512i lo = _mm512_loadu_si512(idx), hi = _mm512_loadu_si512(idx + 32);                \
    const __m512 minus_inf = _mm512_set1_ps(-INFINITY), vscale = _mm512_set1_ps(scale);            \
    ITEMS_BEGIN(uint16_t, HD)                                                                      \
            (void)n;  /* runs of 16 cover the visible keys: the key count is not needed */       \
            const int64_t r0 = first / 16, r1 = (len + 15) / 16, nk = (r1 - r0) * 16;             \
            float *sc = scores;                                      /* [group][nk] float32 */     \
            uint16_t *pb = (uint16_t *)(scores + (int64_t)group * nk);  /* [group][nk] bf16 */     \
            __m512bh qv[MAX_GROUP][NQ];                                                            \
            for (int g = 0; g < group; g++) {                                                      \
                const uint16_t *qp = q + (int64_t)s * q_row_stride + (int64_t)(h * group + g) * (HD);\
                for (int c = 0; c < NQ; c++) qv[g][c] = (__m512bh)_mm512_loadu_si512(qp + 32 * c); \
            }                                                                                      \
            for (int64_t r = r0; r < r1; r++) {                                                    \
                const uint16_t *kb = RUN_ROW(kh, r, HD);                                           \
                if (r + PREFETCH_AHEAD < r1) prefetch_l2(RUN_ROW(kh, r + PREFETCH_AHEAD, HD), 32 * (HD));\
                const int j0 = r * 16 < first ? (int)(first - r * 16) : 0;                         \
                const int j1 = r * 16 + 16 > len ? (int)(len - r * 16) : 16;                       \
                const __mmask16 valid = (__mmask16)(((1u << j1) - 1) & ~((1u << j0) - 1));         \
                for (int g = 0; g < group; g++) {                                                  \
                    __m512 d[16];                                                                  \
                    for (int j = 0; j < 16; j++) {                                                 \
                        d[j] = _mm512_setzero_ps();                                                \
                        for (int c = 0; c < NQ; c++)                                               \
                            d[j] = _mm512_dpbf16_ps(d[j], qv[g][c],                                \
                                                    (__m512bh)_mm512_loadu_si512(kb + j * (HD) + 32 * c));\
                    }                                                                              \
                    /* masked keys (outside the window, past the end) become -inf by blend: */     \
                    /* whatever their slots hold never enters the sums */                          \
                    _mm512_storeu_ps(sc + g * nk + (r - r0) * 16, _mm512_mask_mul_ps(minus_inf, valid, sum16(d), vscale));\
                }                                                                                  \
            }                                                                                      \
            for (int g = 0; g < group; g++) {                                                      \
                float *sg = sc + g * nk, sum = 0.f;                                                \
                __m512 mx = minus_inf;                                                             \
                for (int64_t i = 0; i < nk; i += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sg + i));\
                const float m = _mm512_reduce_max_ps(mx);                                          \
                for (int64_t i = 0; i < nk; i++) { sg[i] = expf(sg[i] - m); sum += sg[i]; }        \
                const __m512 inv = _mm512_set1_ps(1.f / sum);                                      \
                for (int64_t i = 0; i < nk; i += 16)                                               \
                    _mm256_storeu_si256((void *)(pb + g * nk + i),                                 \
                                        (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(sg + i), inv)));\
            }                                                                                      \
            __m512 acc[MAX_GROUP][NV];                                                             \
            for (int g = 0; g < group; g++)                                                        \
                for (int c = 0; c < NV; c++) acc[g][c] = _mm512_setzero_ps();                      \
            for (int64_t r = r0; r < r1; r++) {                                                    \
                const uint16_t *vb = RUN_ROW(vh, r, HD);                                           \
                if (r + PREFETCH_AHEAD < r1) prefetch_l2(RUN_ROW(vh, r + PREFETCH_AHEAD, HD), 32 * (HD));\
                const int j0 = r * 16 < first ? (int)(first - r * 16) : 0;                         \
                const int j1 = r * 16 + 16 > len ? (int)(len - r * 16) : 16;                       \
                /* only visible rows are read: a row without a visible partner pairs with itself (p is 0) */\
                for (int j = j0 & ~1; j < j1; j += 2) {                                            \
                    const uint16_t *ra = vb + (j < j0 ? j + 1 : j) * (HD);                         \
                    const uint16_t *rb = j >= j0 && j + 1 < j1 ? ra + (HD) : ra;                   \
                    __m512bh vp[NV];                                                               \
                    for (int c = 0; c < NQ; c++) {                                                 \
                        const __m512i a = _mm512_loadu_si512(ra + 32 * c), b = _mm512_loadu_si512(rb + 32 * c);\
                        vp[2 * c] = (__m512bh)_mm512_permutex2var_epi16(a, lo, b);                 \
                        vp[2 * c + 1] = (__m512bh)_mm512_permutex2var_epi16(a, hi, b);             \
                    }                                                                              \
                    const int64_t col = (r - r0) * 16 + j;                                         \
                    for (int g = 0; g < group; g++) {                                              \
                        const __m512bh pp = (__m512bh)_mm512_set1_epi32(*(const int32_t *)(pb + g * nk + col));\
                        for (int c = 0; c < NV; c++) acc[g][c] = _mm512_dpbf16_ps(acc[g][c], pp, vp[c]);\
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
            for (int g = 0; g < group; g++) {                                                      \
                uint16_t *op = out + ((int64_t)s * num_heads + h * group + g) * (HD);              \
                for (int c = 0; c < NV; c++)                                                       \
                    _mm256_storeu_si256((void *)(op + 16 * c), (__m256i)_mm512_cvtneps_pbh(acc[g][c]));\
            }                                                                                      \
    ITEMS_END                                                                                      \
}

DECODE_BF16_AVX512(decode_bf16_64_avx512, 64)
DECODE_BF16_AVX512(decode_bf16_128_avx512, 128)
#define HAVE_BF16_AVX512 1
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* AVX2+FMA, float32 arithmetic (float32 or bf16 storage; bf16 -> float32 is a 16-bit shift),
 * keys taken 8 at a time (block_size a multiple of 8), the AVX-512 kernel's skeleton at 8 lanes:
 * - scores: one FMA chain per key, then a hadd tree turns the 8 partial vectors into one
 *   vector of 8 scores (no per-key horizontal sum); masked keys become -inf by blend;
 * - softmax in float32 over whole runs;
 * - values: each visible key's row scaled by its probability into float32 accumulators
 *   (invisible rows are never read: a freed slot may hold NaN).
 * The run two ahead is prefetched into L2, as above. */
#define LOAD8_F32(p) _mm256_loadu_ps(p)
#define LOAD8_BF16(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define STORE8_F32(p, v) _mm256_storeu_ps(p, v)
#define STORE8_BF16(p, v) do { float t_[8]; _mm256_storeu_ps(t_, v); for (int e_ = 0; e_ < 8; e_++) (p)[e_] = f32_to_bf16(t_[e_]); } while (0)

static inline __m256 sum8(const __m256 d[8]) {  /* lane j of the result = the sum of d[j]'s lanes */
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(d[0], d[1]), _mm256_hadd_ps(d[2], d[3]));
    const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(d[4], d[5]), _mm256_hadd_ps(d[6], d[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

#ifndef HAVE_BF16_AVX512
static inline void prefetch_l2(const void *p, int bytes) {
    for (int o = 0; o < bytes; o += 64) _mm_prefetch((const char *)p + o, _MM_HINT_T1);
}
#endif

#define RUN8_ROW(BASE, r, HD) ((BASE) + (table[(r) * 8 / block_size] * block_size + (r) * 8 % block_size) * (HD))

#define DECODE_AVX2(NAME, T, LOAD8, STORE8, HD)                                                    \
static int NAME(ARGS(T)) {                                                                         \
    enum { NC = (HD) / 8 };                                                                        \
    const __m256 minus_inf = _mm256_set1_ps(-INFINITY);                                            \
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);                                \
    ITEMS_BEGIN(T, HD)                                                                             \
            (void)n;  /* runs of 8 cover the visible keys: the key count is not needed */         \
            const int64_t r0 = first / 8, r1 = (len + 7) / 8, nk = (r1 - r0) * 8;                 \
            float *sc = scores;                                      /* [group][nk] */             \
            __m256 qv[MAX_GROUP][NC];                                                              \
            const __m256 vscale = _mm256_set1_ps(scale);                                           \
            for (int g = 0; g < group; g++) {                                                      \
                const T *qp = q + (int64_t)s * q_row_stride + (int64_t)(h * group + g) * (HD);     \
                for (int c = 0; c < NC; c++) qv[g][c] = _mm256_mul_ps(LOAD8(qp + 8 * c), vscale); \
            }                                                                                      \
            for (int64_t r = r0; r < r1; r++) {                                                    \
                const T *kb = RUN8_ROW(kh, r, HD);                                                 \
                if (r + PREFETCH_AHEAD < r1) prefetch_l2(RUN8_ROW(kh, r + PREFETCH_AHEAD, HD), 8 * (HD) * (int)sizeof(T));\
                const int j0 = r * 8 < first ? (int)(first - r * 8) : 0;                           \
                const int j1 = r * 8 + 8 > len ? (int)(len - r * 8) : 8;                           \
                const __m256 valid = _mm256_castsi256_ps(_mm256_and_si256(                         \
                    _mm256_cmpgt_epi32(_mm256_set1_epi32(j1), lane),                               \
                    _mm256_cmpgt_epi32(lane, _mm256_set1_epi32(j0 - 1))));                         \
                __m256 kv[8][NC];                                                                  \
                for (int j = 0; j < 8; j++)                                                        \
                    for (int c = 0; c < NC; c++) kv[j][c] = LOAD8(kb + j * (HD) + 8 * c);          \
                for (int g = 0; g < group; g++) {                                                  \
                    __m256 d[8];                                                                   \
                    for (int j = 0; j < 8; j++) {                                                  \
                        d[j] = _mm256_mul_ps(qv[g][0], kv[j][0]);                                  \
                        for (int c = 1; c < NC; c++) d[j] = _mm256_fmadd_ps(qv[g][c], kv[j][c], d[j]);\
                    }                                                                              \
                    /* blend, not arithmetic: whatever masked slots hold never enters the sums */ \
                    _mm256_storeu_ps(sc + g * nk + (r - r0) * 8, _mm256_blendv_ps(minus_inf, sum8(d), valid));\
                }                                                                                  \
            }                                                                                      \
            float inv[MAX_GROUP];                                                                  \
            for (int g = 0; g < group; g++) {                                                      \
                float *sg = sc + g * nk, m = -INFINITY, sum = 0.f;                                 \
                for (int64_t i = 0; i < nk; i++) m = sg[i] > m ? sg[i] : m;                        \
                for (int64_t i = 0; i < nk; i++) { sg[i] = expf(sg[i] - m); sum += sg[i]; }        \
                inv[g] = 1.f / sum;                                                                \
            }                                                                                      \
            __m256 acc[MAX_GROUP][NC];                                                             \
            for (int g = 0; g < group; g++)                                                        \
                for (int c = 0; c < NC; c++) acc[g][c] = _mm256_setzero_ps();                      \
            for (int64_t r = r0; r < r1; r++) {                                                    \
                const T *vb = RUN8_ROW(vh, r, HD);                                                 \
                if (r + PREFETCH_AHEAD < r1) prefetch_l2(RUN8_ROW(vh, r + PREFETCH_AHEAD, HD), 8 * (HD) * (int)sizeof(T));\
                const int j0 = r * 8 < first ? (int)(first - r * 8) : 0;                           \
                const int j1 = r * 8 + 8 > len ? (int)(len - r * 8) : 8;                           \
                for (int j = j0; j < j1; j++) {                                                    \
                    __m256 vv[NC];                                                                 \
                    for (int c = 0; c < NC; c++) vv[c] = LOAD8(vb + j * (HD) + 8 * c);             \
                    const int64_t col = (r - r0) * 8 + j;                                          \
                    for (int g = 0; g < group; g++) {                                              \
                        const __m256 p = _mm256_broadcast_ss(sc + g * nk + col);                   \
                        for (int c = 0; c < NC; c++) acc[g][c] = _mm256_fmadd_ps(p, vv[c], acc[g][c]);\
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
            for (int g = 0; g < group; g++) {                                                      \
                T *op = out + ((int64_t)s * num_heads + h * group + g) * (HD);                     \
                const __m256 vi = _mm256_set1_ps(inv[g]);                                          \
                for (int c = 0; c < NC; c++) STORE8(op + 8 * c, _mm256_mul_ps(acc[g][c], vi));     \
            }                                                                                      \
    ITEMS_END                                                                                      \
}

#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 2
#endif
DECODE_AVX2(decode_f32_64_avx2, float, LOAD8_F32, STORE8_F32, 64)
DECODE_AVX2(decode_f32_128_avx2, float, LOAD8_F32, STORE8_F32, 128)
#ifndef HAVE_BF16_AVX512  /* with AVX512_BF16 the kernel above takes bf16 */
DECODE_AVX2(decode_bf16_64_avx2, uint16_t, LOAD8_BF16, STORE8_BF16, 64)
DECODE_AVX2(decode_bf16_128_avx2, uint16_t, LOAD8_BF16, STORE8_BF16, 128)
#endif
#define HAVE_AVX2 1
#endif

int paged_decode_bf16(ARGS(uint16_t)) {
    if (num_heads / num_kv_heads > MAX_GROUP || head_dim > MAX_DIM) return -1;
#ifdef HAVE_BF16_AVX512
    if (block_size % 16 == 0 && head_dim == 64) return decode_bf16_64_avx512(PARAMS);
    if (block_size % 16 == 0 && head_dim == 128) return decode_bf16_128_avx512(PARAMS);
#elif defined(HAVE_AVX2)
    if (block_size % 8 == 0 && head_dim == 64) return decode_bf16_64_avx2(PARAMS);
    if (block_size % 8 == 0 && head_dim == 128) return decode_bf16_128_avx2(PARAMS);
#endif
    if (head_dim == 64) return decode_bf16_64(PARAMS);
    if (head_dim == 128) return decode_bf16_128(PARAMS);
    return decode_bf16_any(PARAMS);
}

int paged_decode_f32(ARGS(float)) {
    if (num_heads / num_kv_heads > MAX_GROUP || head_dim > MAX_DIM) return -1;
#ifdef HAVE_AVX2
    if (block_size % 8 == 0 && head_dim == 64) return decode_f32_64_avx2(PARAMS);
    if (block_size % 8 == 0 && head_dim == 128) return decode_f32_128_avx2(PARAMS);
#endif
    if (head_dim == 64) return decode_f32_64(PARAMS);
    if (head_dim == 128) return decode_f32_128(PARAMS);
    return decode_f32_any(PARAMS);
}
