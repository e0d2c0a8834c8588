/* Fused elementwise kernels for CPU steps: one pass over memory and one call instead of
 * the 7-15 small PyTorch ops each stands for (at decode sizes those ops cost more in
 * dispatch than in arithmetic). Each follows the Hugging Face modules' rounding: in
 * bfloat16 every intermediate that PyTorch would round to bf16 is rounded here too,
 * so outputs equal the op-by-op results. Built by build.py, called through ctypes.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t to_bf(float f) {  /* round to nearest even (finite inputs) */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float rnd(float f) { return bf(to_bf(f)); }  /* value after a bf16 round trip */

#define PAR_IF(work) const int64_t work_ = (work); _Pragma("omp parallel for if(work_ > 8192)")

#define ID(x) (x)

/* Each kernel is written once over LOAD (element -> float), STORE (float -> element) and RND
 * (the value after a round trip through the element type), and instantiated for bf16 and f32. */

/* residual (optional, in/out) += x; out = weight * norm(residual or x), as transformers'
 * decoder layer does: the sum is rounded to the model dtype before the norm. */
#define RMS_NORM(NAME, T, LOAD, STORE, RND)                                                        \
void NAME(const T *x, T *residual, const T *weight, T *out, int64_t rows, int64_t dim, float eps) {\
    PAR_IF(rows * dim)                                                                             \
    for (int64_t r = 0; r < rows; r++) {                                                           \
        const T *xr = x + r * dim;                                                                 \
        T *rr = residual ? residual + r * dim : NULL, *o = out + r * dim;                          \
        float ss = 0.f;                                                                            \
        for (int64_t d = 0; d < dim; d++) {                                                        \
            float v = LOAD(xr[d]);                                                                 \
            if (rr) { v = RND(v + LOAD(rr[d])); rr[d] = STORE(v); }                                \
            ss += v * v;                                                                           \
        }                                                                                          \
        const float inv = 1.f / sqrtf(ss / (float)dim + eps);                                      \
        const T *src = rr ? rr : xr;                                                               \
        for (int64_t d = 0; d < dim; d++) o[d] = STORE(LOAD(weight[d]) * RND(LOAD(src[d]) * inv)); \
    }                                                                                              \
}

/* Rotary embedding in place (rotate-half form): heads [0, num_heads) of each row, rows
 * row_stride elements apart; cos/sin are float32 tables [max_pos, head_dim]. */
#define ROTARY(NAME, T, LOAD, STORE, RND)                                                          \
void NAME(T *x, int64_t rows, int64_t row_stride, int num_heads, int head_dim,                     \
          const int64_t *positions, const float *cos_t, const float *sin_t) {                      \
    const int half = head_dim / 2;                                                                 \
    PAR_IF(rows * num_heads * head_dim)                                                            \
    for (int64_t r = 0; r < rows; r++) {                                                           \
        const float *c = cos_t + positions[r] * head_dim, *s = sin_t + positions[r] * head_dim;    \
        for (int h = 0; h < num_heads; h++) {                                                      \
            T *v = x + r * row_stride + (int64_t)h * head_dim;                                     \
            for (int d = 0; d < half; d++) {                                                       \
                const float x1 = LOAD(v[d]), x2 = LOAD(v[d + half]);                               \
                const float c1 = RND(c[d]), s1 = RND(s[d]), c2 = RND(c[d + half]), s2 = RND(s[d + half]);\
                v[d] = STORE(RND(x1 * c1) + RND(-x2 * s1));                                        \
                v[d + half] = STORE(RND(x2 * c2) + RND(x1 * s2));                                  \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
}

/* out = silu(gate) * up, where each row of gate_up is [gate | up]. */
#define SILU_AND_MUL(NAME, T, LOAD, STORE, RND)                                                    \
void NAME(const T *gate_up, T *out, int64_t rows, int64_t dim) {                                   \
    PAR_IF(rows * dim)                                                                             \
    for (int64_t r = 0; r < rows; r++) {                                                           \
        const T *g = gate_up + r * 2 * dim, *u = g + dim;                                          \
        T *o = out + r * dim;                                                                      \
        for (int64_t d = 0; d < dim; d++) {                                                        \
            const float a = LOAD(g[d]);                                                            \
            o[d] = STORE(RND(a / (1.f + expf(-a))) * LOAD(u[d]));                                  \
        }                                                                                          \
    }                                                                                              \
}

RMS_NORM(rms_norm_bf16, uint16_t, bf, to_bf, rnd)
RMS_NORM(rms_norm_f32, float, ID, ID, ID)
ROTARY(rotary_bf16, uint16_t, bf, to_bf, rnd)
ROTARY(rotary_f32, float, ID, ID, ID)
SILU_AND_MUL(silu_and_mul_bf16, uint16_t, bf, to_bf, rnd)
SILU_AND_MUL(silu_and_mul_f32, float, ID, ID, ID)
