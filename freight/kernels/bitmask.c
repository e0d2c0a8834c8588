/* Grammar token bitmask -> logits: tokens whose bit is clear get -inf, in place.
 *
 * Row i of the mask (words int32 words, bit t % 32 of word t / 32 = token t allowed)
 * belongs to logits row rows[i]. Whole words are the common case: all allowed (a JSON
 * string's body) is skipped, none allowed (structure, few tokens valid) is a run of
 * stores; only mixed words look at single bits. Plain C, compiled with -march=native,
 * so the loops vectorise for AVX2 or AVX-512 alike. -inf is written as its bit pattern
 * (-ffast-math may assume no infinities in arithmetic, never in stores).
 */
#include <stdint.h>

#define APPLY_BITMASK(NAME, T, NEG_INF)                                                        \
    void NAME(T *logits, int64_t row_stride, const int32_t *mask, const int64_t *rows,        \
              int64_t n_rows, int64_t words, int64_t vocab) {                                  \
        _Pragma("omp parallel for schedule(static) if (n_rows * vocab > (1 << 18))")           \
        for (int64_t i = 0; i < n_rows; i++) {                                                 \
            T *row = logits + rows[i] * row_stride;                                            \
            const uint32_t *m = (const uint32_t *)(mask + i * words);                          \
            for (int64_t w = 0; w < words; w++) {                                              \
                uint32_t bits = m[w];                                                          \
                int64_t base = w * 32;                                                         \
                int64_t n = vocab - base < 32 ? vocab - base : 32;                             \
                if (n <= 0) break;                                                             \
                if (bits == 0xFFFFFFFFu) continue;                                             \
                T *x = row + base;                                                             \
                if (bits == 0) {                                                               \
                    for (int64_t b = 0; b < n; b++) x[b] = NEG_INF;                            \
                } else {                                                                       \
                    for (int64_t b = 0; b < n; b++) x[b] = ((bits >> b) & 1u) ? x[b] : NEG_INF; \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }

APPLY_BITMASK(apply_bitmask_f32, uint32_t, 0xFF800000u)
APPLY_BITMASK(apply_bitmask_bf16, uint16_t, (uint16_t)0xFF80u)
