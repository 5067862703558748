/* Decode attention read in place from the paged KV cache, for the CPU (app/engine/native_attention.py).
 *
 * One query token per row. The cache of one layer is head-major, (kv_heads, num_blocks, block_size,
 * head_dim) as app/engine/kv_cache.py keeps it, so position p of a row lives at block table[p / block_size],
 * offset p % block_size. Each (row, KV head) is one work item over OpenMP (torch's own libgomp, already
 * loaded under the same soname, so both share one thread pool): the group of query heads that share the KV
 * head reads each key and value once, in two passes (scores, then the softmax-weighted sum of values).
 * Nothing is gathered or copied first, which is what the SDPA path spends most of its time on.
 *
 * Values are float32 or bfloat16 (a flag; bfloat16 is widened to float32, every sum is float32).
 * Compiled with -ffast-math (so that expf vectorizes through glibc's libmvec) but linked without it, so
 * that loading the library does not switch the process to flush-to-zero.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define MAX_HEAD_DIM 256
#define MAX_GROUPS 16

/* Ask for row `index` of rows of row_bytes (a key or value of one head) to be brought into the cache. Blocks
 * of a row's table lie anywhere in the cache, a page or more apart, where the hardware prefetcher stops; so
 * pass 1 asks for the key a block ahead and for the value it will read in pass 2. */
static inline void prefetch_row(const void *base, int64_t index, int row_bytes) {
    const char *row = (const char *)base + index * row_bytes;
    for (int offset = 0; offset < row_bytes; offset += 64) __builtin_prefetch(row + offset, 0, 2);
}

/* q, out: (rows, heads, head_dim); k, v: (kv_heads, num_blocks, block_size, head_dim);
 * tables: (rows, table_width) block ids; lengths: (rows,) keys each row attends (positions 0..length-1).
 * threads: the OpenMP threads to use (torch.get_num_threads()).
 * Returns 0, or -1 if a shape is past the compiled limits (nothing is written then). */
int paged_decode_attention(const void *q, const void *k, const void *v, void *out, const int64_t *tables,
                           int64_t table_width, const int32_t *lengths, int rows, int heads, int kv_heads,
                           int head_dim, int64_t num_blocks, int block_size, float scale, int bf16,
                           int threads) {
    const int groups = heads / kv_heads, row_bytes = head_dim * (bf16 ? 2 : 4);
    if (head_dim > MAX_HEAD_DIM || groups > MAX_GROUPS || groups * kv_heads != heads) return -1;
    int max_length = 0;
    for (int r = 0; r < rows; r++) max_length = lengths[r] > max_length ? lengths[r] : max_length;

#pragma omp parallel num_threads(threads)
    {
        float *scores = malloc(sizeof(float) * (size_t)groups * (size_t)(max_length > 0 ? max_length : 1));
        float query[MAX_GROUPS * MAX_HEAD_DIM], acc[MAX_GROUPS * MAX_HEAD_DIM], buffer[MAX_HEAD_DIM];
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int r = 0; r < rows; r++) {
            for (int h = 0; h < kv_heads; h++) {
                const int length = lengths[r];
                const int64_t *table = tables + (int64_t)r * table_width;
                const int64_t head_base = (int64_t)h * num_blocks;
                const int64_t q_row = (int64_t)r * heads + (int64_t)h * groups;
                for (int g = 0; g < groups; g++)
                    memcpy(query + g * head_dim, row_f32(q, (q_row + g) * head_dim, head_dim, bf16, buffer),
                           sizeof(float) * head_dim);

                /* pass 1: every group head's score for every key */
                for (int p = 0; p < length; p++) {
                    const int64_t slot = (head_base + table[p / block_size]) * block_size + p % block_size;
                    if (p + block_size < length)
                        prefetch_row(k, (head_base + table[p / block_size + 1]) * block_size + p % block_size,
                                     row_bytes);
                    prefetch_row(v, slot, row_bytes);
                    const float *key = row_f32(k, slot * head_dim, head_dim, bf16, buffer);
                    for (int g = 0; g < groups; g++) {
                        const float *qg = query + g * head_dim;
                        float s = 0.0f;
#pragma omp simd reduction(+ : s)
                        for (int d = 0; d < head_dim; d++) s += qg[d] * key[d];
                        scores[(int64_t)g * length + p] = s * scale;
                    }
                }
                /* softmax over each group head's scores (unnormalised; divided at the end) */
                float total[MAX_GROUPS];
                for (int g = 0; g < groups; g++) {
                    float *sg = scores + (int64_t)g * length;
                    float best = -FLT_MAX;  /* finite: -ffast-math assumes no infinities */
                    for (int p = 0; p < length; p++) best = sg[p] > best ? sg[p] : best;
                    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                    for (int p = 0; p < length; p++) {
                        sg[p] = expf(sg[p] - best);
                        sum += sg[p];
                    }
                    total[g] = sum;
                }
                /* pass 2: the weighted sum of values */
                memset(acc, 0, sizeof(float) * groups * head_dim);
                for (int p = 0; p < length; p++) {
                    const int64_t slot = (head_base + table[p / block_size]) * block_size + p % block_size;
                    const float *value = row_f32(v, slot * head_dim, head_dim, bf16, buffer);
                    for (int g = 0; g < groups; g++) {
                        const float w = scores[(int64_t)g * length + p];
                        float *ag = acc + g * head_dim;
#pragma omp simd
                        for (int d = 0; d < head_dim; d++) ag[d] += w * value[d];
                    }
                }
                for (int g = 0; g < groups; g++) {
                    const float inverse = 1.0f / total[g];
                    const int64_t o = (q_row + g) * head_dim;
                    for (int d = 0; d < head_dim; d++) {
                        const float x = acc[g * head_dim + d] * inverse;
                        if (bf16) ((uint16_t *)out)[o + d] = float_to_bf16(x);
                        else ((float *)out)[o + d] = x;
                    }
                }
            }
        }
        free(scores);
    }
    return 0;
}

/* The step's new keys and values into their slots: row t of k_new, v_new (tokens, kv_heads, head_dim; rows
 * k_stride, v_stride values apart, heads contiguous) -> position slots[t] (block * block_size + offset) of
 * each head of the layer's cache (kv_heads, num_slots, head_dim). element_size: 4 (float32) or 2 (bfloat16);
 * nothing is converted. threads: the OpenMP threads to use. */
void write_kv(void *k_cache, void *v_cache, const void *k_new, int64_t k_stride, const void *v_new,
              int64_t v_stride, const int64_t *slots, int tokens, int kv_heads, int head_dim, int64_t num_slots,
              int element_size, int threads) {
    const size_t row_bytes = (size_t)head_dim * element_size;
    /* Each copy lands in a line that is rarely cached, so one thread waits on memory for most of it: with more
     * than a few tokens (120 rows of a decode step: 720 copies a layer), both threads share them. */
#pragma omp parallel for num_threads(threads) schedule(static) if (tokens >= 32)
    for (int t = 0; t < tokens; t++) {
        const char *k_row = (const char *)k_new + (size_t)t * k_stride * element_size;
        const char *v_row = (const char *)v_new + (size_t)t * v_stride * element_size;
        for (int h = 0; h < kv_heads; h++) {
            const size_t dst = ((size_t)h * num_slots + slots[t]) * row_bytes;
            memcpy((char *)k_cache + dst, k_row + h * row_bytes, row_bytes);
            memcpy((char *)v_cache + dst, v_row + h * row_bytes, row_bytes);
        }
    }
}
