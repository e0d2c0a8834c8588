/* y = x @ (scale * W_int8)^T: int8 weights, fp32 or bf16 activations, any row count (decode to prefill).
 *
 * A decode step streams every weight from memory once, so int8 weights read a half (vs bf16) or a
 * quarter (vs fp32) of the bytes. The weight is packed as [ceil(N/16)][K][16] int8: for each k one
 * 16-byte load holds 16 output columns, widened to fp32 in registers (vpmovsxbd + vcvtdq2ps) and
 * multiplied into the accumulators of a group of rows with FMA. The per-output-channel scale is
 * applied once, to the finished dot products (symmetric quantization has no zero point), so the
 * inner loop has no multiply besides the FMA. Accumulation is fp32; bf16 activations are widened
 * to fp32 once per call, the output rounded back (round to nearest even).
 *
 * A tile (16 columns x K bytes: 9 KiB at K=576) stays in L1 while the row groups reuse it, and the
 * tiles are split statically between the OpenMP threads, as in gemm.c. With AVX512_BF16, bf16
 * activations and 8+ rows take a second path (HAVE_BF16_TILES below) that widens each tile once.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define TILE 16

static inline uint16_t bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* One tile's finished accumulators -> y, scaled per column; only the `cols` columns that exist. */
static inline void store_tile(const float *acc, const float *scale, void *y, int64_t y_stride, int row,
                              int col0, int cols, int y_bf16) {
    for (int c = 0; c < cols; c++) {
        const float v = acc[c] * scale[c];
        if (y_bf16) ((uint16_t *)y)[row * y_stride + col0 + c] = bf16_round(v);
        else ((float *)y)[row * y_stride + col0 + c] = v;
    }
}

#if defined(__AVX512F__)
#include <immintrin.h>
enum { GROUP = 8 };  /* rows per pass over a tile: 8 accumulators + weights + broadcast in 32 zmm */

/* U independent sums per row over alternate k: with few rows one FMA chain per row would wait on
 * the FMA latency instead of streaming (1 row: 4 chains, 2-3x faster than one). */
#define ROWS_KERNEL(R, U)                                                                            \
static inline void tile_rows_##R(const float *x, int64_t x_stride, const int8_t *wt, int k, float *out) { \
    __m512 acc[U][R];                                                                                \
    for (int u = 0; u < U; u++)                                                                      \
        for (int r = 0; r < R; r++) acc[u][r] = _mm512_setzero_ps();                                 \
    int p = 0;                                                                                       \
    for (; p + U <= k; p += U)                                                                       \
        for (int u = 0; u < U; u++) {                                                                \
            const __m512 w = widen16(wt + TILE * (p + u));                                           \
            for (int r = 0; r < R; r++)                                                              \
                acc[u][r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * x_stride + p + u]), w, acc[u][r]);  \
        }                                                                                            \
    for (; p < k; p++) {                                                                             \
        const __m512 w = widen16(wt + TILE * p);                                                     \
        for (int r = 0; r < R; r++)                                                                  \
            acc[0][r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * x_stride + p]), w, acc[0][r]);          \
    }                                                                                                \
    for (int r = 0; r < R; r++) {                                                                    \
        for (int u = 1; u < U; u++) acc[0][r] = _mm512_add_ps(acc[0][r], acc[u][r]);                 \
        _mm512_storeu_ps(out + TILE * r, acc[0][r]);                                                 \
    }                                                                                                \
}
static inline __m512 widen16(const int8_t *w) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)w)));
}
ROWS_KERNEL(1, 4) ROWS_KERNEL(2, 4) ROWS_KERNEL(3, 2) ROWS_KERNEL(4, 2)
ROWS_KERNEL(5, 1) ROWS_KERNEL(6, 1) ROWS_KERNEL(7, 1) ROWS_KERNEL(8, 1)

#if defined(__AVX512BF16__)
#define HAVE_BF16_TILES 1
/* bf16 activations and more than a few rows: the arithmetic, not the weight stream, is the limit,
 * and widening int8 to fp32 for every group of 8 rows repeats work. Instead each tile is widened once
 * to bf16 (exact: |q| <= 127 fits bf16's significand) in vdpbf16ps's [K/2][16][2] layout, into a
 * per-thread buffer that stays in L1/L2, and every row group runs gemm.c's dot-product loop on it,
 * two k per instruction, the bf16 x pairs broadcast as they are. */
static void widen_tile_bf16(const int8_t *wt, int k, __m512bh *out) {
    for (int p = 0; p < k / 2; p++) {
        const __m128i a = _mm_loadu_si128((const __m128i *)(wt + TILE * 2 * p));      /* k = 2p   */
        const __m128i b = _mm_loadu_si128((const __m128i *)(wt + TILE * (2 * p + 1))); /* k = 2p+1 */
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_unpacklo_epi8(a, b)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_unpackhi_epi8(a, b)));
        out[p] = _mm512_cvtne2ps_pbh(hi, lo);  /* columns 0-7 then 8-15, each as its (2p, 2p+1) pair */
    }
}

/* `next` (the next tile's int8 weights, or NULL) is prefetched into L2 32 bytes per k pair, so that
 * widening it does not start with a wait on memory (gemm.c does the same, and measured why). */
static void tile_rows_bf16(const uint16_t *x, int64_t x_stride, const __m512bh *wt, int pairs, int rows,
                           float *out, const int8_t *next) {
    __m512 acc[GROUP];
    for (int r = 0; r < GROUP; r++) acc[r] = _mm512_setzero_ps();
    for (int p = 0; p < pairs; p++) {
        if (next && !(p & 1)) _mm_prefetch((const char *)next + 32 * p, _MM_HINT_T1);
        const __m512bh w = wt[p];
        for (int r = 0; r < GROUP; r++)
            if (r < rows) {
                const int32_t xv = *(const int32_t *)(x + r * x_stride + 2 * p);
                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(xv), w);
            }
    }
    for (int r = 0; r < rows; r++) _mm512_storeu_ps(out + TILE * r, acc[r]);
}
#endif

#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
enum { GROUP = 4 };  /* 4 rows x 2 ymm accumulators + 2 weight vectors + broadcast in 16 ymm */

#define ROWS_KERNEL(R)                                                                               \
static inline void tile_rows_##R(const float *x, int64_t x_stride, const int8_t *wt, int k, float *out) { \
    __m256 lo[R], hi[R];                                                                             \
    for (int r = 0; r < R; r++) lo[r] = hi[r] = _mm256_setzero_ps();                                 \
    for (int p = 0; p < k; p++) {                                                                    \
        const __m128i b = _mm_loadu_si128((const __m128i *)(wt + TILE * p));                         \
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));                               \
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));            \
        for (int r = 0; r < R; r++) {                                                                \
            const __m256 xv = _mm256_broadcast_ss(x + r * x_stride + p);                             \
            lo[r] = _mm256_fmadd_ps(xv, w0, lo[r]);                                                  \
            hi[r] = _mm256_fmadd_ps(xv, w1, hi[r]);                                                  \
        }                                                                                            \
    }                                                                                                \
    for (int r = 0; r < R; r++) {                                                                    \
        _mm256_storeu_ps(out + TILE * r, lo[r]);                                                     \
        _mm256_storeu_ps(out + TILE * r + 8, hi[r]);                                                 \
    }                                                                                                \
}
ROWS_KERNEL(1) ROWS_KERNEL(2) ROWS_KERNEL(3) ROWS_KERNEL(4)
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
typedef void (*tile_fn)(const float *, int64_t, const int8_t *, int, float *);
#if defined(__AVX512F__)
static const tile_fn TILE_ROWS[GROUP + 1] = {0, tile_rows_1, tile_rows_2, tile_rows_3, tile_rows_4,
                                             tile_rows_5, tile_rows_6, tile_rows_7, tile_rows_8};
#else
static const tile_fn TILE_ROWS[GROUP + 1] = {0, tile_rows_1, tile_rows_2, tile_rows_3, tile_rows_4};
#endif

#ifdef HAVE_BF16_TILES
enum { BF16_TILES_MIN_ROWS = 8 };  /* one full row group: below, the widening is shared by too few rows */

static int int8_gemm_bf16_tiles(const uint16_t *x, int64_t x_stride, const int8_t *w_packed, const float *scales,
                                uint16_t *y, int64_t y_stride, int rows, int n, int k) {
    const int tiles = (n + TILE - 1) / TILE, groups = (rows + GROUP - 1) / GROUP, pairs = k / 2;
    int failed = 0;
    _Pragma("omp parallel")
    {
        const int nt = omp_get_num_threads(), id = omp_get_thread_num();
        const int first = (int)((int64_t)tiles * id / nt), end = (int)((int64_t)tiles * (id + 1) / nt);
        __m512bh *buf = (__m512bh *)aligned_alloc(64, (size_t)pairs * 64 + 64);
        float out[GROUP * TILE];
        if (!buf) {
            _Pragma("omp atomic write")
            failed = 1;
        }
        for (int t = first; t < end && buf; t++) {
            widen_tile_bf16(w_packed + (int64_t)t * k * TILE, k, buf);
            const int col0 = t * TILE, cols = n - col0 < TILE ? n - col0 : TILE;
            for (int g = 0; g < groups; g++) {
                const int m0 = GROUP * g, r = rows - m0 < GROUP ? rows - m0 : GROUP;
                const int8_t *next = g == 0 && t + 1 < end ? w_packed + (int64_t)(t + 1) * k * TILE : NULL;
                tile_rows_bf16(x + (int64_t)m0 * x_stride, x_stride, buf, pairs, r, out, next);
                for (int i = 0; i < r; i++)
                    store_tile(out + TILE * i, scales + col0, y, y_stride, m0 + i, col0, cols, 1);
            }
        }
        free(buf);
    }
    return failed ? -3 : 0;
}
#endif

int int8_gemm(const void *x, int64_t x_stride, int x_bf16, const int8_t *w_packed, const float *scales,
              void *y, int64_t y_stride, int rows, int n, int k) {
#ifdef HAVE_BF16_TILES
    if (x_bf16 && rows >= BF16_TILES_MIN_ROWS && k % 2 == 0)
        return int8_gemm_bf16_tiles((const uint16_t *)x, x_stride, w_packed, scales, (uint16_t *)y, y_stride,
                                    rows, n, k);
#endif
    const int tiles = (n + TILE - 1) / TILE, groups = (rows + GROUP - 1) / GROUP;
    const float *xf = (const float *)x;
    float *widened = NULL;
    if (x_bf16) {  /* once per call, so the inner loop broadcasts fp32 straight from memory */
        widened = (float *)malloc((size_t)rows * k * sizeof(float));
        if (!widened) return -3;
        for (int r = 0; r < rows; r++)
            for (int p = 0; p < k; p++) {
                const uint32_t u = (uint32_t)((const uint16_t *)x)[r * x_stride + p] << 16;
                memcpy(widened + (int64_t)r * k + p, &u, 4);
            }
        xf = widened;
        x_stride = k;
    }
    _Pragma("omp parallel")
    {
        const int nt = omp_get_num_threads(), id = omp_get_thread_num();
        const int first = (int)((int64_t)tiles * id / nt), end = (int)((int64_t)tiles * (id + 1) / nt);
        float out[GROUP * TILE];
        for (int t = first; t < end; t++) {
            const int8_t *wt = w_packed + (int64_t)t * k * TILE;
            const int col0 = t * TILE, cols = n - col0 < TILE ? n - col0 : TILE;
            for (int g = 0; g < groups; g++) {
                const int m0 = GROUP * g, r = rows - m0 < GROUP ? rows - m0 : GROUP;
                TILE_ROWS[r](xf + (int64_t)m0 * x_stride, x_stride, wt, k, out);
                for (int i = 0; i < r; i++)
                    store_tile(out + TILE * i, scales + col0, y, y_stride, m0 + i, col0, cols, x_bf16);
            }
        }
    }
    free(widened);
    return 0;
}
#else
int int8_gemm(const void *x, int64_t x_stride, int x_bf16, const int8_t *w_packed, const float *scales,
              void *y, int64_t y_stride, int rows, int n, int k) {
    (void)x; (void)x_stride; (void)x_bf16; (void)w_packed; (void)scales; (void)y; (void)y_stride;
    (void)rows; (void)n; (void)k;
    return -2;  /* neither AVX-512 nor AVX2+FMA: the caller keeps its PyTorch path */
}
#endif
