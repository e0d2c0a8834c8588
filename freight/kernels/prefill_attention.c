/* Prefill attention straight from the paged KV cache: bfloat16 with AVX512_BF16; float32 with
 * AVX2+FMA (the second half of this file).
 *
 * The step's prefill chunks (their new K/V already written to the cache) attend causally to
 * their whole context, earlier chunks and prefix-cache hits included, with no gathered copy.
 * A work item is 16 consecutive query positions of one head, one per float32 lane, so the
 * online softmax runs down the lanes with no horizontal reductions:
 * - scores for a run of 16 keys: vdpbf16ps of the item's transposed queries (d pairs x 16
 *   rows, built once per item) against each key's d pair broadcast from the cache;
 * - probabilities rounded to bf16 and paired by key, values repacked as (v[j][d], v[j+1][d])
 *   pairs, so the value sum is vdpbf16ps too (as flash attention does on GPUs);
 * - runs past the diagonal are never visited; runs on it are masked per lane.
 * Items go longest first (last tiles of a chunk see the most keys) to a dynamic schedule.
 * Built at run time by freight/kernels/build.py and called through ctypes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

enum { ROWS = 16, RUN = 16, MAX_DIM = 256 };
static const uint16_t ZEROS[MAX_DIM];

/* e^x, float32, relative error about 1e-7; exactly 0 below -87 (and for -inf) */
static inline __m512 exp512(__m512 x) {
    const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GE_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_maskz_scalef_ps(keep, p, n);
}

static inline uint32_t load_u32(const uint16_t *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

typedef struct {
    const uint16_t *q, *k_cache, *v_cache;
    int64_t q_row_stride, out_row_stride, head_stride;
    uint16_t *out;
    int num_heads, group, dim, block_size;
    float scale;
    int64_t window;
} Args;

/* one item: rows [row0, row0 + nrows) of a chunk whose first row sits at position pos0 */
static void attend_tile(const Args *a, const int64_t *table, int64_t q_row0, int64_t pos0, int nrows, int head) {
    const int D = a->dim, NP = D / 2;
    uint32_t qt[MAX_DIM / 2 * ROWS];    /* [d pair][row] */
    float o[MAX_DIM * ROWS];            /* [d][row], unnormalised output */
    uint32_t vt[RUN / 2 * MAX_DIM];     /* [key pair][d]: (v[2i][d], v[2i+1][d]) */
    for (int p = 0; p < NP; p++)
        for (int r = 0; r < ROWS; r++)
            qt[p * ROWS + r] = r < nrows ? load_u32(a->q + (q_row0 + r) * a->q_row_stride + (int64_t)head * D + 2 * p) : 0;
    memset(o, 0, sizeof(float) * D * ROWS);

    const int64_t last = pos0 + nrows - 1;  /* the last key any row sees */
    const int64_t first = a->window > 0 && pos0 - a->window + 1 > 0 ? pos0 - a->window + 1 : 0;
    const uint16_t *kh = a->k_cache + (int64_t)(head / a->group) * a->head_stride;
    const uint16_t *vh = a->v_cache + (int64_t)(head / a->group) * a->head_stride;
    const __m512i pos = _mm512_add_epi32(_mm512_set1_epi32((int)pos0),
                                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512 minus_inf = _mm512_set1_ps(-INFINITY), scale = _mm512_set1_ps(a->scale);
    __m512 m = minus_inf, l = _mm512_setzero_ps();
    uint16_t idx[96];  /* word permutations that pair up lanes of two vectors (see their uses) */
    for (int i = 0; i < 16; i++) {
        idx[2 * i] = (uint16_t)i, idx[2 * i + 1] = (uint16_t)(16 + i);                  /* within one */
        idx[32 + 2 * i] = (uint16_t)i, idx[32 + 2 * i + 1] = (uint16_t)(32 + i);        /* two, low dims */
        idx[64 + 2 * i] = (uint16_t)(16 + i), idx[64 + 2 * i + 1] = (uint16_t)(48 + i); /* two, high dims */
    }
    const __m512i interleave = _mm512_loadu_si512(idx), pair_lo = _mm512_loadu_si512(idx + 32),
                  pair_hi = _mm512_loadu_si512(idx + 64);

    for (int64_t run = first / RUN; run <= last / RUN; run++) {
        const int64_t k0 = run * RUN;
        const int64_t row = table[k0 / a->block_size] * a->block_size + k0 % a->block_size;
        const uint16_t *kb = kh + row * D, *vb = vh + row * D;

        __m512 s[RUN];
        for (int j = 0; j < RUN; j++) s[j] = _mm512_setzero_ps();
        for (int p = 0; p < NP; p++) {
            const __m512bh qv = (__m512bh)_mm512_loadu_si512(qt + p * ROWS);
            for (int j = 0; j < RUN; j++)
                s[j] = _mm512_dpbf16_ps(s[j], qv, (__m512bh)_mm512_set1_epi32((int)load_u32(kb + j * D + 2 * p)));
        }
        /* every row sees every key of the run: no masks */
        const int open = k0 + RUN - 1 <= pos0 && (a->window <= 0 || k0 > last - a->window);
        __m512 mx = minus_inf;
        for (int j = 0; j < RUN; j++) {
            s[j] = _mm512_mul_ps(s[j], scale);
            if (!open) {
                const __m512i kpos = _mm512_set1_epi32((int)(k0 + j));
                __mmask16 vis = _mm512_cmp_epi32_mask(kpos, pos, _MM_CMPINT_LE);
                if (a->window > 0)
                    vis &= _mm512_cmp_epi32_mask(kpos, _mm512_sub_epi32(pos, _mm512_set1_epi32((int)a->window)),
                                                 _MM_CMPINT_NLE);
                s[j] = _mm512_mask_blend_ps(vis, minus_inf, s[j]);
            }
            mx = _mm512_max_ps(mx, s[j]);
        }
        const __m512 m_new = _mm512_max_ps(m, mx);
        /* a row that has seen no key yet keeps m = -inf; subtract 0 there instead (p is 0 anyway) */
        const __m512 m_use = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m_new, minus_inf, _CMP_EQ_OQ), m_new,
                                                  _mm512_setzero_ps());
        const __m512 corr = exp512(_mm512_sub_ps(m, m_use));
        m = m_new;
        __m512 sum = _mm512_setzero_ps();
        __m512bh pp[RUN / 2];
        for (int j = 0; j < RUN; j += 2) {
            const __m512 p0 = exp512(_mm512_sub_ps(s[j], m_use)), p1 = exp512(_mm512_sub_ps(s[j + 1], m_use));
            sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
            /* cvtne2ps puts p0's 16 values in the low half, p1's in the high: interleave to pairs */
            pp[j / 2] = (__m512bh)_mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
        }
        l = _mm512_fmadd_ps(l, corr, sum);

        /* values: keys past `last` are not written yet and may hold anything: use zeros */
        for (int i = 0; i < RUN / 2; i++) {
            const uint16_t *ra = k0 + 2 * i <= last ? vb + 2 * i * D : ZEROS;
            const uint16_t *rb = k0 + 2 * i + 1 <= last ? vb + (2 * i + 1) * D : ZEROS;
            for (int c = 0; c < D; c += 32) {
                const __m512i x = _mm512_loadu_si512(ra + c), y = _mm512_loadu_si512(rb + c);
                _mm512_storeu_si512(vt + i * D + c, _mm512_permutex2var_epi16(x, pair_lo, y));
                _mm512_storeu_si512(vt + i * D + c + 16, _mm512_permutex2var_epi16(x, pair_hi, y));
            }
        }
        for (int d0 = 0; d0 < D; d0 += 16) {
            __m512 acc[16];
            for (int dd = 0; dd < 16; dd++) acc[dd] = _mm512_mul_ps(_mm512_loadu_ps(o + (d0 + dd) * ROWS), corr);
            for (int i = 0; i < RUN / 2; i++)
                for (int dd = 0; dd < 16; dd++)
                    acc[dd] = _mm512_dpbf16_ps(acc[dd], pp[i], (__m512bh)_mm512_set1_epi32((int)vt[i * D + d0 + dd]));
            for (int dd = 0; dd < 16; dd++) _mm512_storeu_ps(o + (d0 + dd) * ROWS, acc[dd]);
        }
    }

    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), l);
    uint16_t res[MAX_DIM * ROWS];  /* [d][row] bf16 */
    for (int d = 0; d < D; d++)
        _mm256_storeu_si256((void *)(res + d * ROWS),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o + d * ROWS), inv)));
    for (int r = 0; r < nrows; r++) {
        uint16_t *dst = a->out + (q_row0 + r) * a->out_row_stride + (int64_t)head * D;
        for (int d = 0; d < D; d++) dst[d] = res[d * ROWS + r];
    }
}

/* chunks[c] = (first row in q/out, number of rows, tokens already in the cache before it) */
int paged_prefill_bf16(const uint16_t *q, int64_t q_row_stride, const uint16_t *k_cache, const uint16_t *v_cache,
                       const int64_t *block_tables, int64_t table_stride, const int64_t *chunks, int num_chunks,
                       uint16_t *out, int64_t out_row_stride, int num_heads, int num_kv_heads, int head_dim,
                       int64_t num_blocks, int block_size, float scale, int64_t window) {
    if (head_dim % 32 || head_dim > MAX_DIM || block_size % RUN || num_heads % num_kv_heads) return -1;
    const Args a = {q, k_cache, v_cache, q_row_stride, out_row_stride, (int64_t)num_blocks * block_size * head_dim,
                    out, num_heads, num_heads / num_kv_heads, head_dim, block_size, scale, window};
    int64_t *offsets = malloc(sizeof(int64_t) * (size_t)(num_chunks + 1));  /* first item of each chunk */
    if (!offsets) return -2;
    offsets[0] = 0;
    for (int c = 0; c < num_chunks; c++)
        offsets[c + 1] = offsets[c] + (chunks[3 * c + 1] + ROWS - 1) / ROWS * num_heads;
    _Pragma("omp parallel for schedule(dynamic, 1)")
    for (int64_t item = 0; item < offsets[num_chunks]; item++) {
        int c = 0;
        while (offsets[c + 1] <= item) c++;
        const int64_t rel = item - offsets[c], tiles = (chunks[3 * c + 1] + ROWS - 1) / ROWS;
        const int64_t tile = tiles - 1 - rel / num_heads;  /* longest first */
        const int head = (int)(rel % num_heads);
        const int64_t row0 = tile * ROWS, left = chunks[3 * c + 1] - row0;
        attend_tile(&a, block_tables + (int64_t)c * table_stride, chunks[3 * c] + row0, chunks[3 * c + 2] + row0,
                    left < ROWS ? (int)left : ROWS, head);
    }
    free(offsets);
    return 0;
}
#define HAVE_PREFILL_BF16 1
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* AVX2+FMA, float32: the same design at 8 lanes. A work item is 16 query positions of one head,
 * one per lane of two vectors; for each run of 8 keys the scores are FMAs of the item's
 * transposed queries against each key's dims broadcast from the cache, the online softmax runs
 * down the lanes, and the value sum is FMAs of the probabilities against each value dim
 * broadcast. Two row vectors make each broadcast feed two FMAs (with one, loads were the limit). */
enum { ROWS2 = 16, RUN8 = 8, MAX_DIM8 = 256 };
static const float ZEROS8[MAX_DIM8];

/* e^x, float32, relative error about 1e-7; exactly 0 below -87 (and for -inf) */
static inline __m256 exp256(__m256 x) {
    const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_GE_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    /* times 2^n: n + 127 into the exponent field (n is in [-126, 128) after the clamp) */
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

typedef struct {
    const float *q, *k_cache, *v_cache;
    int64_t q_row_stride, out_row_stride, head_stride;
    float *out;
    int num_heads, group, dim, block_size;
    float scale;
    int64_t window;
} Args8;

/* one item: rows [row0, row0 + nrows) of a chunk whose first row sits at position pos0; rows
 * 0-7 in the low vector (index 0), 8-15 in the high one (index 1) */
static void attend_tile_avx2(const Args8 *a, const int64_t *table, int64_t q_row0, int64_t pos0, int nrows,
                             int head) {
    const int D = a->dim;
    float qt[MAX_DIM8 * ROWS2];  /* [d][row], scaled */
    float o[MAX_DIM8 * ROWS2];   /* [d][row], unnormalised output */
    for (int d = 0; d < D; d++)
        for (int r = 0; r < ROWS2; r++)
            qt[d * ROWS2 + r] = r < nrows ? a->q[(q_row0 + r) * a->q_row_stride + (int64_t)head * D + d] * a->scale : 0.f;
    memset(o, 0, sizeof(float) * D * ROWS2);
    const int64_t last = pos0 + nrows - 1;  /* the last key any row sees */
    const int64_t first = a->window > 0 && pos0 - a->window + 1 > 0 ? pos0 - a->window + 1 : 0;
    const float *kh = a->k_cache + (int64_t)(head / a->group) * a->head_stride;
    const float *vh = a->v_cache + (int64_t)(head / a->group) * a->head_stride;
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i pos[2] = {_mm256_add_epi32(_mm256_set1_epi32((int)pos0), lanes),
                            _mm256_add_epi32(_mm256_set1_epi32((int)pos0 + 8), lanes)};
    const __m256 minus_inf = _mm256_set1_ps(-INFINITY);
    __m256 m[2] = {minus_inf, minus_inf}, l[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};

    for (int64_t run = first / RUN8; run <= last / RUN8; run++) {
        const int64_t k0 = run * RUN8;
        const int64_t row = table[k0 / a->block_size] * a->block_size + k0 % a->block_size;
        /* keys past `last` are not written yet and may hold anything: zeros stand in for them */
        const float *kr[RUN8], *vr[RUN8];
        for (int j = 0; j < RUN8; j++) {
            const int live = k0 + j <= last;
            kr[j] = live ? kh + (row + j) * D : ZEROS8;
            vr[j] = live ? vh + (row + j) * D : ZEROS8;
        }
        /* scores, 16 rows x 4 keys at a time: each broadcast key value feeds two FMAs */
        __m256 s[2][RUN8];
        for (int j0 = 0; j0 < RUN8; j0 += 4) {
            __m256 lo[4], hi[4];
            for (int j = 0; j < 4; j++) lo[j] = hi[j] = _mm256_setzero_ps();
            for (int d = 0; d < D; d++) {
                const __m256 q0 = _mm256_loadu_ps(qt + d * ROWS2), q1 = _mm256_loadu_ps(qt + d * ROWS2 + 8);
                for (int j = 0; j < 4; j++) {
                    const __m256 kk = _mm256_broadcast_ss(kr[j0 + j] + d);
                    lo[j] = _mm256_fmadd_ps(q0, kk, lo[j]);
                    hi[j] = _mm256_fmadd_ps(q1, kk, hi[j]);
                }
            }
            for (int j = 0; j < 4; j++) s[0][j0 + j] = lo[j], s[1][j0 + j] = hi[j];
        }
        __m256 corr[2];
        for (int v = 0; v < 2; v++) {
            __m256 mx = minus_inf;
            for (int j = 0; j < RUN8; j++) {
                const __m256i kpos = _mm256_set1_epi32((int)(k0 + j));
                __m256i vis = _mm256_andnot_si256(_mm256_cmpgt_epi32(kpos, pos[v]), _mm256_set1_epi32(-1));
                if (a->window > 0)
                    vis = _mm256_and_si256(vis, _mm256_cmpgt_epi32(kpos, _mm256_sub_epi32(pos[v], _mm256_set1_epi32((int)a->window))));
                s[v][j] = _mm256_blendv_ps(minus_inf, s[v][j], _mm256_castsi256_ps(vis));
                mx = _mm256_max_ps(mx, s[v][j]);
            }
            const __m256 m_new = _mm256_max_ps(m[v], mx);
            /* a row that has seen no key yet keeps m = -inf; subtract 0 there instead (p is 0 anyway) */
            const __m256 m_use = _mm256_blendv_ps(m_new, _mm256_setzero_ps(), _mm256_cmp_ps(m_new, minus_inf, _CMP_EQ_OQ));
            corr[v] = exp256(_mm256_sub_ps(m[v], m_use));
            m[v] = m_new;
            __m256 sum = _mm256_setzero_ps();
            for (int j = 0; j < RUN8; j++) {
                s[v][j] = exp256(_mm256_sub_ps(s[v][j], m_use));
                sum = _mm256_add_ps(sum, s[v][j]);
            }
            l[v] = _mm256_fmadd_ps(l[v], corr[v], sum);
        }
        /* values, 16 rows x 4 dims at a time: each broadcast value feeds two FMAs */
        for (int d0 = 0; d0 < D; d0 += 4) {
            __m256 lo[4], hi[4];
            for (int dd = 0; dd < 4; dd++) {
                lo[dd] = _mm256_mul_ps(_mm256_loadu_ps(o + (d0 + dd) * ROWS2), corr[0]);
                hi[dd] = _mm256_mul_ps(_mm256_loadu_ps(o + (d0 + dd) * ROWS2 + 8), corr[1]);
            }
            for (int j = 0; j < RUN8; j++)
                for (int dd = 0; dd < 4; dd++) {
                    const __m256 vv = _mm256_broadcast_ss(vr[j] + d0 + dd);
                    lo[dd] = _mm256_fmadd_ps(s[0][j], vv, lo[dd]);
                    hi[dd] = _mm256_fmadd_ps(s[1][j], vv, hi[dd]);
                }
            for (int dd = 0; dd < 4; dd++) {
                _mm256_storeu_ps(o + (d0 + dd) * ROWS2, lo[dd]);
                _mm256_storeu_ps(o + (d0 + dd) * ROWS2 + 8, hi[dd]);
            }
        }
    }
    float inv[ROWS2];
    _mm256_storeu_ps(inv, _mm256_div_ps(_mm256_set1_ps(1.f), l[0]));
    _mm256_storeu_ps(inv + 8, _mm256_div_ps(_mm256_set1_ps(1.f), l[1]));
    for (int r = 0; r < nrows; r++) {
        float *dst = a->out + (q_row0 + r) * a->out_row_stride + (int64_t)head * D;
        for (int d = 0; d < D; d++) dst[d] = o[d * ROWS2 + r] * inv[r];
    }
}

int paged_prefill_f32(const float *q, int64_t q_row_stride, const float *k_cache, const float *v_cache,
                      const int64_t *block_tables, int64_t table_stride, const int64_t *chunks, int num_chunks,
                      float *out, int64_t out_row_stride, int num_heads, int num_kv_heads, int head_dim,
                      int64_t num_blocks, int block_size, float scale, int64_t window) {
    if (head_dim % 8 || head_dim > MAX_DIM8 || block_size % RUN8 || num_heads % num_kv_heads) return -1;
    const Args8 a = {q, k_cache, v_cache, q_row_stride, out_row_stride, (int64_t)num_blocks * block_size * head_dim,
                     out, num_heads, num_heads / num_kv_heads, head_dim, block_size, scale, window};
    int64_t *offsets = malloc(sizeof(int64_t) * (size_t)(num_chunks + 1));  /* first item of each chunk */
    if (!offsets) return -2;
    offsets[0] = 0;
    for (int c = 0; c < num_chunks; c++)
        offsets[c + 1] = offsets[c] + (chunks[3 * c + 1] + ROWS2 - 1) / ROWS2 * num_heads;
    _Pragma("omp parallel for schedule(dynamic, 1)")
    for (int64_t item = 0; item < offsets[num_chunks]; item++) {
        int c = 0;
        while (offsets[c + 1] <= item) c++;
        const int64_t rel = item - offsets[c], tiles = (chunks[3 * c + 1] + ROWS2 - 1) / ROWS2;
        const int64_t tile = tiles - 1 - rel / num_heads;  /* longest first */
        const int head = (int)(rel % num_heads);
        const int64_t row0 = tile * ROWS2, left = chunks[3 * c + 1] - row0;
        attend_tile_avx2(&a, block_tables + (int64_t)c * table_stride, chunks[3 * c] + row0, chunks[3 * c + 2] + row0,
                         left < ROWS2 ? (int)left : ROWS2, head);
    }
    free(offsets);
    return 0;
}
#define HAVE_PREFILL_F32 1
#endif

/* the functions this ISA level has no code for: the caller keeps SDPA */
#ifndef HAVE_PREFILL_BF16
int paged_prefill_bf16(const uint16_t *q, int64_t q_row_stride, const uint16_t *k_cache, const uint16_t *v_cache,
                       const int64_t *block_tables, int64_t table_stride, const int64_t *chunks, int num_chunks,
                       uint16_t *out, int64_t out_row_stride, int num_heads, int num_kv_heads, int head_dim,
                       int64_t num_blocks, int block_size, float scale, int64_t window) {
    (void)q; (void)q_row_stride; (void)k_cache; (void)v_cache; (void)block_tables; (void)table_stride;
    (void)chunks; (void)num_chunks; (void)out; (void)out_row_stride; (void)num_heads; (void)num_kv_heads;
    (void)head_dim; (void)num_blocks; (void)block_size; (void)scale; (void)window;
    return -3;
}
#endif
#ifndef HAVE_PREFILL_F32
int paged_prefill_f32(const float *q, int64_t q_row_stride, const float *k_cache, const float *v_cache,
                      const int64_t *block_tables, int64_t table_stride, const int64_t *chunks, int num_chunks,
                      float *out, int64_t out_row_stride, int num_heads, int num_kv_heads, int head_dim,
                      int64_t num_blocks, int block_size, float scale, int64_t window) {
    (void)q; (void)q_row_stride; (void)k_cache; (void)v_cache; (void)block_tables; (void)table_stride;
    (void)chunks; (void)num_chunks; (void)out; (void)out_row_stride; (void)num_heads; (void)num_kv_heads;
    (void)head_dim; (void)num_blocks; (void)block_size; (void)scale; (void)window;
    return -3;
}
#endif
