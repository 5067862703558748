/* The elementwise parts of a decoder layer, each one pass over memory, for the CPU
 * (app/engine/native_layer_ops.py). In torch each is several kernels, every one reading and writing the whole
 * activation: RMSNorm five (pow, mean, add, rsqrt, mul) and a multiply by the weight, RoPE three plus a
 * rolled copy, SiLU-and-mul two. They compute what the model's torch forms compute (app/engine/model.py),
 * in float32, rounding to bfloat16 where torch rounds, so results agree to float32 rounding.
 *
 * Rows are split over OpenMP threads (torch's libgomp, see paged_attention.c). Values are float32 or
 * bfloat16 (the flag `bf16`); every input row is `stride` values after the previous one.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* Rows of bfloat16 are widened into float32 buffers (row_f32), computed on, and narrowed back; float32 rows
 * are computed on in place. Either way the arithmetic below is one loop over float32 arrays, which vectorizes. */
static inline void narrow(const float *src, uint16_t *dst, int n) {
#pragma omp simd
    for (int i = 0; i < n; i++) dst[i] = float_to_bf16(src[i]);
}

static inline float round_as(float x, int bf16) {  /* what a tensor of the model's dtype would hold */
    return bf16 ? bf16_to_float(float_to_bf16(x)) : x;
}

/* out (rows, dim) = weight * (x / sqrt(mean(x^2) + eps)), the normalised value rounded to the dtype before
 * the weight scales it, as HF's LlamaRMSNorm. */
void rms_norm(const void *x, int64_t stride, const void *weight, void *out, int rows, int dim, float eps,
              int bf16, int threads) {
    float weight_buffer[bf16 ? dim : 1];
    const float *w = row_f32(weight, 0, dim, bf16, weight_buffer);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int r = 0; r < rows; r++) {
        float in_buffer[bf16 ? dim : 1], result[dim];
        const float *row = row_f32(x, (int64_t)r * stride, dim, bf16, in_buffer);
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int d = 0; d < dim; d++) sum += row[d] * row[d];
        const float scale = 1.0f / sqrtf(sum / dim + eps);
        float *o = bf16 ? result : (float *)out + (int64_t)r * dim;
#pragma omp simd
        for (int d = 0; d < dim; d++) o[d] = w[d] * round_as(row[d] * scale, bf16);
        if (bf16) narrow(result, (uint16_t *)out + (int64_t)r * dim, dim);
    }
}

/* gate_up (rows, 2 * width: gate, then up) -> out (rows, width) = silu(gate) * up, silu's value rounded
 * to the dtype before the product, as torch's F.silu(gate) * up. */
void silu_and_mul(const void *gate_up, int64_t stride, void *out, int rows, int width, int bf16, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int r = 0; r < rows; r++) {
        float gate_buffer[bf16 ? width : 1], up_buffer[bf16 ? width : 1], result[width];
        const float *gate = row_f32(gate_up, (int64_t)r * stride, width, bf16, gate_buffer);
        const float *up = row_f32(gate_up, (int64_t)r * stride + width, width, bf16, up_buffer);
        float *o = bf16 ? result : (float *)out + (int64_t)r * width;
#pragma omp simd
        for (int d = 0; d < width; d++) o[d] = round_as(gate[d] / (1.0f + expf(-gate[d])), bf16) * up[d];
        if (bf16) narrow(result, (uint16_t *)out + (int64_t)r * width, width);
    }
}

/* Rotary embedding in place on `heads` rows of head_dim values a token (token t's head h at t * stride + h *
 * head_dim), as the model's apply_rope: x * cos + roll(x, head_dim / 2) * sin_signed (sin with its first
 * half negated), with cos, sin_signed (tokens, head_dim) in the model's dtype; the first product rounded to
 * the dtype before the second is added, as torch.addcmul(x * cos, ...). */
void rope(void *x, int64_t stride, const void *cos, const void *sin_signed, int tokens, int heads, int head_dim,
          int bf16, int threads) {
    const int half = head_dim / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < tokens; t++) {
        float cos_buffer[bf16 ? head_dim : 1], sin_buffer[bf16 ? head_dim : 1], in[head_dim], result[head_dim];
        const float *c = row_f32(cos, (int64_t)t * head_dim, head_dim, bf16, cos_buffer);
        const float *s = row_f32(sin_signed, (int64_t)t * head_dim, head_dim, bf16, sin_buffer);
        for (int h = 0; h < heads; h++) {
            const int64_t offset = (int64_t)t * stride + (int64_t)h * head_dim;
            const float *row = row_f32(x, offset, head_dim, bf16, in);
            if (!bf16) memcpy(in, row, sizeof(float) * head_dim);  /* written in place below: keep a copy */
#pragma omp simd
            for (int d = 0; d < half; d++) {
                result[d] = round_as(in[d] * c[d], bf16) + in[half + d] * s[d];
                result[half + d] = round_as(in[half + d] * c[half + d], bf16) + in[d] * s[half + d];
            }
            if (bf16) narrow(result, (uint16_t *)x + offset, head_dim);
            else memcpy((float *)x + offset, result, sizeof(float) * head_dim);
        }
    }
}
