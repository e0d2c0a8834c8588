/* y = x @ W^T for the few rows of a decode step: bfloat16 (AVX512_BF16, or AVX2+FMA) and
 * float32 (AVX2+FMA).
 *
 * At decode sizes (a handful to a few dozen rows) a matmul is a stream over the weights;
 * a general GEMM library spends much of it on blocking meant for large row counts. Here W
 * is pre-packed as [N/16][K/2][16][2]: one 64-byte vector holds 16 output columns x 2 k
 * values, exactly the operand of vdpbf16ps, so each weight byte is loaded once per group
 * of 8 rows and the loop is nothing but broadcasts and dot-product instructions. With
 * AVX512_BF16 a pass covers 3 tiles, so each broadcast of x feeds 3 dot products.
 * Accumulation is float32; the output is rounded to bf16 (round to nearest even).
 *
 * With more than 8 rows a tile's weights are read from DRAM by the first group of rows and
 * from cache by the others, so without help the core alternates between waiting on memory
 * and computing. Each thread therefore prefetches (into L2) the tile it will need two tiles
 * ahead, a share of its lines in every row group: streaming and arithmetic overlap (at 16
 * rows 1.5x, at 32 rows 1.2x on a 2-core Zen 4, weights not cached). With one group the
 * hardware prefetcher keeps up alone and the extra instructions only cost.
 *
 * AVX2 (x86-64-v3) has no bf16 dot product, but bf16 -> float32 is a 16-bit shift: the same
 * packed bf16 layout serves, each 32-bit lane holding (k even, k odd) of one column, split by
 * a shift and a mask into two float32 operands of FMA. In float32, W is packed as [N/16][K][16]
 * and each k is a broadcast and two FMAs per row. 16 ymm registers hold 4 (bf16) or 6 (f32)
 * rows' accumulators; the functions not built for this ISA level return -2.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

/* Tiles of 16 output columns split statically over the threads (spelled out: the prefetch
 * must target a tile this thread will run); in each tile, groups of up to GROUP rows. */
#define FOR_TILES(GROUP, TILE_ELEMS, W_T, CALL)                                                    \
    enum { LOOKAHEAD = 2 };  /* tiles; one is too close at 8-16 rows, more gains nothing */      \
    const int tiles = n / 16, groups = (rows + (GROUP) - 1) / (GROUP);                             \
    _Pragma("omp parallel")                                                                        \
    {                                                                                              \
        const int nt = omp_get_num_threads(), id = omp_get_thread_num();                           \
        const int first = (int)((int64_t)tiles * id / nt), end = (int)((int64_t)tiles * (id + 1) / nt);\
        for (int t = first; t < end; t++) {                                                        \
            const W_T *wt = w_packed + (int64_t)t * (TILE_ELEMS);                                  \
            const char *ahead = groups > 1 && t + LOOKAHEAD < end ? (const char *)(wt + LOOKAHEAD * (TILE_ELEMS)) : NULL;\
            for (int g = 0; g < groups; g++) {                                                     \
                const int m0 = (GROUP) * g, r = rows - m0 < (GROUP) ? rows - m0 : (GROUP);        \
                CALL;                                                                              \
            }                                                                                      \
        }                                                                                          \
    }

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even (finite inputs) */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

/* One pass over NT adjacent tiles (16 NT columns) for R rows: each broadcast of x feeds NT
 * dot products and each weight vector R, so at 8 rows and 3 tiles the 24 accumulators leave
 * the loads well under the arithmetic (1.2-1.3x the one-tile pass at 16-32 rows). */
#define ROWS_KERNEL(R, NT)                                                                        \
static inline void tiles##NT##_rows_##R(const uint16_t *x, int64_t x_stride, const __m512bh *wt, \
                                        int64_t tile_vecs, uint16_t *y, int64_t y_stride,         \
                                        int pairs, const char *prefetch, int pf_phase,            \
                                        int pf_step) {                                            \
    __m512 acc[NT][R];                                                                            \
    for (int c = 0; c < NT; c++)                                                                  \
        for (int r = 0; r < R; r++) acc[c][r] = _mm512_setzero_ps();                              \
    for (int p = 0; p < pairs; p++) {                                                             \
        if (prefetch && p % pf_step == pf_phase)                                                  \
            for (int c = 0; c < NT; c++) _mm_prefetch(prefetch + 64 * (p + c * tile_vecs), _MM_HINT_T1);\
        __m512bh w[NT];                                                                           \
        for (int c = 0; c < NT; c++) w[c] = (__m512bh)_mm512_loadu_si512((const void *)(wt + c * tile_vecs + p));\
        for (int r = 0; r < R; r++) {                                                             \
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(*(const int32_t *)(x + r * x_stride + 2 * p));\
            for (int c = 0; c < NT; c++) acc[c][r] = _mm512_dpbf16_ps(acc[c][r], xv, w[c]);      \
        }                                                                                         \
    }                                                                                             \
    for (int r = 0; r < R; r++)                                                                   \
        for (int c = 0; c < NT; c++)                                                              \
            _mm256_storeu_si256((void *)(y + r * y_stride + 16 * c), (__m256i)_mm512_cvtneps_pbh(acc[c][r]));\
}
#define ROWS_KERNELS(NT) ROWS_KERNEL(1, NT) ROWS_KERNEL(2, NT) ROWS_KERNEL(3, NT) ROWS_KERNEL(4, NT) \
                         ROWS_KERNEL(5, NT) ROWS_KERNEL(6, NT) ROWS_KERNEL(7, NT) ROWS_KERNEL(8, NT)
ROWS_KERNELS(1) ROWS_KERNELS(2) ROWS_KERNELS(3)

typedef void (*tile_fn)(const uint16_t *, int64_t, const __m512bh *, int64_t, uint16_t *, int64_t, int,
                        const char *, int, int);
#define KERNEL_ROW(NT) {0, tiles##NT##_rows_1, tiles##NT##_rows_2, tiles##NT##_rows_3, tiles##NT##_rows_4, \
                        tiles##NT##_rows_5, tiles##NT##_rows_6, tiles##NT##_rows_7, tiles##NT##_rows_8}
static const tile_fn TILES[4][9] = {{0}, KERNEL_ROW(1), KERNEL_ROW(2), KERNEL_ROW(3)};

/* Passes of up to 3 tiles (fewer at the end of a thread's share), each over groups of up to 8
 * rows; the prefetch runs one pass ahead (see FOR_TILES), here from 2 rows on: a 3-tile pass
 * outruns the hardware prefetcher even with one row group (1.2-1.4x at 5-8 rows, weights not
 * cached), while a single row is purely a stream and gains nothing. */
int gemm_bf16_packed(const uint16_t *x, int64_t x_stride, const uint16_t *w_packed, uint16_t *y,
                     int64_t y_stride, int rows, int n, int k) {
    if (n % 16 || k % 2) return -1;
    enum { PASS = 3 };
    const int pairs = k / 2, tiles = n / 16, groups = (rows + 7) / 8;
    const int64_t tile_vecs = pairs;  /* 64-byte vectors per tile */
    _Pragma("omp parallel")
    {
        const int nt = omp_get_num_threads(), id = omp_get_thread_num();
        const int first = (int)((int64_t)tiles * id / nt), end = (int)((int64_t)tiles * (id + 1) / nt);
        for (int t = first; t < end; t += PASS) {
            const int np = end - t < PASS ? end - t : PASS;
            const __m512bh *wt = (const __m512bh *)(w_packed + (int64_t)t * tile_vecs * 32);
            const char *ahead = rows > 1 && t + PASS + np <= end ? (const char *)(wt + PASS * tile_vecs) : NULL;
            for (int g = 0; g < groups; g++) {
                const int m0 = 8 * g, r = rows - m0 < 8 ? rows - m0 : 8;
                TILES[np][r](x + (int64_t)m0 * x_stride, x_stride, wt, tile_vecs, y + (int64_t)m0 * y_stride + t * 16,
                             y_stride, pairs, ahead, g, groups);
            }
        }
    }
    return 0;
}
#define HAVE_GEMM_BF16 1
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* bf16 weights, float32 arithmetic. x is converted to float32 once per call (xf, rows x k),
 * so each broadcast is one load; the weight pair vector splits into (k even) and (k odd). */
#define ROWS_KERNEL_BF16_AVX2(R)                                                                   \
static inline void tile_bf16_avx2_##R(const float *xf, int64_t k, const uint16_t *wt, uint16_t *y,\
                                      int64_t y_stride, int pairs, const char *prefetch,          \
                                      int pf_phase, int pf_step) {                                 \
    const __m256i hi_mask = _mm256_set1_epi32((int)0xffff0000u);                                   \
    __m256 acc[R][2];                                                                              \
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();                      \
    for (int p = 0; p < pairs; p++) {                                                              \
        if (prefetch && p % pf_step == pf_phase) _mm_prefetch(prefetch + 64 * p, _MM_HINT_T1);     \
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(wt + 32 * p));                     \
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(wt + 32 * p + 16));                \
        const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));                          \
        const __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(w0, hi_mask));                      \
        const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));                          \
        const __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(w1, hi_mask));                      \
        for (int r = 0; r < R; r++) {                                                              \
            const __m256 xe = _mm256_broadcast_ss(xf + r * k + 2 * p);                             \
            const __m256 xo = _mm256_broadcast_ss(xf + r * k + 2 * p + 1);                         \
            acc[r][0] = _mm256_fmadd_ps(xo, o0, _mm256_fmadd_ps(xe, e0, acc[r][0]));                \
            acc[r][1] = _mm256_fmadd_ps(xo, o1, _mm256_fmadd_ps(xe, e1, acc[r][1]));                \
        }                                                                                          \
    }                                                                                              \
    for (int r = 0; r < R; r++) {                                                                  \
        float o[16];                                                                               \
        _mm256_storeu_ps(o, acc[r][0]);                                                            \
        _mm256_storeu_ps(o + 8, acc[r][1]);                                                        \
        for (int c = 0; c < 16; c++) y[r * y_stride + c] = f32_to_bf16(o[c]);                      \
    }                                                                                              \
}
ROWS_KERNEL_BF16_AVX2(1) ROWS_KERNEL_BF16_AVX2(2) ROWS_KERNEL_BF16_AVX2(3) ROWS_KERNEL_BF16_AVX2(4)

/* float32: W packed as [N/16][K][16] */
#define ROWS_KERNEL_F32_AVX2(R)                                                                    \
static inline void tile_f32_avx2_##R(const float *x, int64_t x_stride, const float *wt, float *y, \
                                     int64_t y_stride, int k, const char *prefetch, int pf_phase,  \
                                     int pf_step) {                                                \
    __m256 acc[R][2];                                                                              \
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();                      \
    for (int i = 0; i < k; i++) {                                                                  \
        if (prefetch && i % pf_step == pf_phase) _mm_prefetch(prefetch + 64 * i, _MM_HINT_T1);     \
        const __m256 w0 = _mm256_loadu_ps(wt + 16 * i), w1 = _mm256_loadu_ps(wt + 16 * i + 8);     \
        for (int r = 0; r < R; r++) {                                                              \
            const __m256 xb = _mm256_broadcast_ss(x + r * x_stride + i);                           \
            acc[r][0] = _mm256_fmadd_ps(xb, w0, acc[r][0]);                                        \
            acc[r][1] = _mm256_fmadd_ps(xb, w1, acc[r][1]);                                        \
        }                                                                                          \
    }                                                                                              \
    for (int r = 0; r < R; r++) {                                                                  \
        _mm256_storeu_ps(y + r * y_stride, acc[r][0]);                                             \
        _mm256_storeu_ps(y + r * y_stride + 8, acc[r][1]);                                         \
    }                                                                                              \
}
ROWS_KERNEL_F32_AVX2(1) ROWS_KERNEL_F32_AVX2(2) ROWS_KERNEL_F32_AVX2(3)
ROWS_KERNEL_F32_AVX2(4) ROWS_KERNEL_F32_AVX2(5) ROWS_KERNEL_F32_AVX2(6)

typedef void (*tile_f32_fn)(const float *, int64_t, const float *, float *, int64_t, int, const char *, int, int);
static const tile_f32_fn TILE_F32[7] = {0, tile_f32_avx2_1, tile_f32_avx2_2, tile_f32_avx2_3,
                                        tile_f32_avx2_4, tile_f32_avx2_5, tile_f32_avx2_6};

int gemm_f32_packed(const float *x, int64_t x_stride, const float *w_packed, float *y, int64_t y_stride,
                    int rows, int n, int k) {
    if (n % 16) return -1;
    FOR_TILES(6, (int64_t)k * 16, float,
              TILE_F32[r](x + (int64_t)m0 * x_stride, x_stride, wt, y + (int64_t)m0 * y_stride + t * 16, y_stride,
                          k, ahead, g, groups))
    return 0;
}
#define HAVE_GEMM_F32 1

#ifndef HAVE_GEMM_BF16
typedef void (*tile_bf16_fn)(const float *, int64_t, const uint16_t *, uint16_t *, int64_t, int, const char *,
                             int, int);
static const tile_bf16_fn TILE_BF16[5] = {0, tile_bf16_avx2_1, tile_bf16_avx2_2, tile_bf16_avx2_3,
                                          tile_bf16_avx2_4};

int gemm_bf16_packed(const uint16_t *x, int64_t x_stride, const uint16_t *w_packed, uint16_t *y,
                     int64_t y_stride, int rows, int n, int k) {
    if (n % 16 || k % 2) return -1;
    float *xf = malloc(sizeof(float) * (size_t)rows * (size_t)k);
    if (!xf) return -3;
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < k; i++) {
            const uint32_t u = (uint32_t)x[(int64_t)r * x_stride + i] << 16;
            memcpy(xf + (int64_t)r * k + i, &u, sizeof u);
        }
    const int pairs = k / 2;
    FOR_TILES(4, (int64_t)pairs * 32, uint16_t,
              TILE_BF16[r](xf + (int64_t)m0 * k, k, wt, y + (int64_t)m0 * y_stride + t * 16, y_stride, pairs,
                           ahead, g, groups))
    free(xf);
    return 0;
}
#define HAVE_GEMM_BF16 1
#endif
#endif

/* the functions this ISA level has no code for: the caller keeps its other path */
#ifndef HAVE_GEMM_BF16
int gemm_bf16_packed(const uint16_t *x, int64_t x_stride, const uint16_t *w_packed, uint16_t *y,
                     int64_t y_stride, int rows, int n, int k) {
    (void)x; (void)x_stride; (void)w_packed; (void)y; (void)y_stride; (void)rows; (void)n; (void)k;
    return -2;
}
#endif
#ifndef HAVE_GEMM_F32
int gemm_f32_packed(const float *x, int64_t x_stride, const float *w_packed, float *y, int64_t y_stride,
                    int rows, int n, int k) {
    (void)x; (void)x_stride; (void)w_packed; (void)y; (void)y_stride; (void)rows; (void)n; (void)k;
    return -2;
}
#endif
