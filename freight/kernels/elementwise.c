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

/* residual (optional, in/out) += x; out = weight * norm(residual or x), as transformers'
 * decoder layer does: the sum is rounded to the model dtype before the norm. */
void rms_norm_bf16(const uint16_t *x, uint16_t *residual, const uint16_t *weight, uint16_t *out,
                   int64_t rows, int64_t dim, float eps) {
    PAR_IF(rows * dim)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * dim;
        uint16_t *rr = residual ? residual + r * dim : NULL, *o = out + r * dim;
        float ss = 0.f;
        for (int64_t d = 0; d < dim; d++) {
            float v = bf(xr[d]);
            if (rr) { v = rnd(v + bf(rr[d])); rr[d] = to_bf(v); }
            ss += v * v;
        }
        const float inv = 1.f / sqrtf(ss / (float)dim + eps);
        const uint16_t *src = rr ? rr : xr;
        for (int64_t d = 0; d < dim; d++) o[d] = to_bf(bf(weight[d]) * rnd(bf(src[d]) * inv));
    }
}

void rms_norm_f32(const float *x, float *residual, const float *weight, float *out,
                  int64_t rows, int64_t dim, float eps) {
    PAR_IF(rows * dim)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *rr = residual ? residual + r * dim : NULL, *o = out + r * dim;
        float ss = 0.f;
        for (int64_t d = 0; d < dim; d++) {
            float v = xr[d];
            if (rr) { v += rr[d]; rr[d] = v; }
            ss += v * v;
        }
        const float inv = 1.f / sqrtf(ss / (float)dim + eps);
        const float *src = rr ? rr : xr;
        for (int64_t d = 0; d < dim; d++) o[d] = weight[d] * (src[d] * inv);
    }
}

/* Rotary embedding in place (rotate-half form): heads [0, num_heads) of each row, rows
 * row_stride elements apart; cos/sin are float32 tables [max_pos, head_dim]. */
void rotary_bf16(uint16_t *x, int64_t rows, int64_t row_stride, int num_heads, int head_dim,
                 const int64_t *positions, const float *cos_t, const float *sin_t) {
    const int half = head_dim / 2;
    PAR_IF(rows * num_heads * head_dim)
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos_t + positions[r] * head_dim, *s = sin_t + positions[r] * head_dim;
        for (int h = 0; h < num_heads; h++) {
            uint16_t *v = x + r * row_stride + (int64_t)h * head_dim;
            for (int d = 0; d < half; d++) {
                const float x1 = bf(v[d]), x2 = bf(v[d + half]);
                const float c1 = rnd(c[d]), s1 = rnd(s[d]), c2 = rnd(c[d + half]), s2 = rnd(s[d + half]);
                v[d] = to_bf(rnd(x1 * c1) + rnd(-x2 * s1));
                v[d + half] = to_bf(rnd(x2 * c2) + rnd(x1 * s2));
            }
        }
    }
}

void rotary_f32(float *x, int64_t rows, int64_t row_stride, int num_heads, int head_dim,
                const int64_t *positions, const float *cos_t, const float *sin_t) {
    const int half = head_dim / 2;
    PAR_IF(rows * num_heads * head_dim)
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos_t + positions[r] * head_dim, *s = sin_t + positions[r] * head_dim;
        for (int h = 0; h < num_heads; h++) {
            float *v = x + r * row_stride + (int64_t)h * head_dim;
            for (int d = 0; d < half; d++) {
                const float x1 = v[d], x2 = v[d + half];
                v[d] = x1 * c[d] + (-x2) * s[d];
                v[d + half] = x2 * c[d + half] + x1 * s[d + half];
            }
        }
    }
}

/* out = silu(gate) * up, where each row of gate_up is [gate | up]. */
void silu_and_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t dim) {
    PAR_IF(rows * dim)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *g = gate_up + r * 2 * dim, *u = g + dim;
        uint16_t *o = out + r * dim;
        for (int64_t d = 0; d < dim; d++) {
            const float a = bf(g[d]);
            o[d] = to_bf(rnd(a / (1.f + expf(-a))) * bf(u[d]));
        }
    }
}

void silu_and_mul_f32(const float *gate_up, float *out, int64_t rows, int64_t dim) {
    PAR_IF(rows * dim)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate_up + r * 2 * dim, *u = g + dim;
        float *o = out + r * dim;
        for (int64_t d = 0; d < dim; d++) o[d] = (g[d] / (1.f + expf(-g[d]))) * u[d];
    }
}
