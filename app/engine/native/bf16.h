/* What both CPU kernel files share: bfloat16 <-> float32, and a row of values read as float32. */
#ifndef SOFTSERVE_BF16_H
#define SOFTSERVE_BF16_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits += 0x7fff + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

/* The n values at element `offset` of `base` as float32: in place, or widened from bfloat16 into `buffer`. */
static inline const float *row_f32(const void *base, int64_t offset, int n, int bf16, float *buffer) {
    if (!bf16) return (const float *)base + offset;
    const uint16_t *src = (const uint16_t *)base + offset;
#pragma omp simd
    for (int i = 0; i < n; i++) buffer[i] = bf16_to_float(src[i]);
    return buffer;
}

#endif
