/* Prefill attention read in place from the paged KV cache, for the CPU (app/engine/native_attention.py).
 *
 * A prefill chunk is `length` consecutive tokens of one sequence from position `start`: token t attends the
 * sequence's positions 0..start+t (its cached prefix, then the chunk itself, causally), read through the
 * sequence's block table from the cache the step has just written. Every chunk of a step is one call a layer;
 * SDPA took one call a chunk, each spending more in setup than in arithmetic on prompts of a few hundred tokens.
 *
 * Flash attention's order: a work item is one chunk's tile of up to QUERY_TILE tokens under one KV head, whose
 * query rows (each token's group of query heads) pass over the keys KEY_TILE at a time, keeping a running
 * maximum and sum per row (online softmax), so no score matrix larger than a tile is held. First, once a call,
 * every chunk's keys are staged tile by tile in a scratch, transposed into columns, with their values (widened
 * to float32), for all of the chunk's query tiles to read. Both products are blocked like a small GEMM, a few
 * rows at a time: the rows against the tile's key columns (scores), then the rows' weights against the tile's
 * value rows. Keys past a row's own position are skipped: rows that see none of a tile take no part in it,
 * the rest mask their last lanes. On the benchmark's prompts (~150 tokens) this runs at ~120 GFLOP/s on the
 * project's 2-core machine, twice SDPA's speed per chunk.
 *
 * Portable C through GCC's vector extensions (16 floats: one AVX-512 register; narrower machines split it).
 * Values are float32 or bfloat16 (a flag; widened to float32, every sum float32). Compiled with -ffast-math
 * like paged_attention.c, so that expf vectorizes through libmvec.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define LANES 16
#define QUERY_TILE 16 /* tokens of a chunk per work item */
#define KEY_TILE 32   /* keys per pass: two vectors of scores per row (64 measured no faster) */
#define ROW_BLOCK 8   /* query rows multiplied together by the values */
#define SCORE_ROW_BLOCK (16 / (KEY_TILE / LANES)) /* and by the keys: 16 vector accumulators */
#define MAX_HEAD_DIM 256
#define MAX_GROUPS 16

typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
typedef float unaligned_vec __attribute__((vector_size(LANES * sizeof(float)), aligned(sizeof(float))));

static inline vec load(const float *p) { return *(const unaligned_vec *)p; }
static inline void store(float *p, vec x) { *(unaligned_vec *)p = x; }

/* Per thread: one work item's query rows and their running state, float32. */
typedef struct {
    float *query;    /* (rows, head_dim), pre-scaled */
    float *acc;      /* (rows, head_dim): the running weighted sum of values */
    float *scores;   /* (rows, KEY_TILE): the tile's scores, then its softmax weights */
    float *row_max;  /* (rows,) */
    float *row_sum;  /* (rows,) */
} Workspace;

/* scores[r, 0..KEY_TILE) = query[r] . keys_t[:, ...] for `count` rows from `row` (count a constant after
 * inlining): per head_dim step, the tile's key vectors against each row's query value, broadcast. */
static inline __attribute__((always_inline)) void score_rows(const Workspace *w, const float *keys_t, int row,
                                                             int count, int head_dim) {
    enum { VECTORS = KEY_TILE / LANES };
    vec s[SCORE_ROW_BLOCK][VECTORS];
#pragma GCC unroll 8
    for (int i = 0; i < count; i++)
#pragma GCC unroll 4
        for (int x = 0; x < VECTORS; x++) s[i][x] = (vec){0};
    const float *q = w->query + (int64_t)row * head_dim;
    for (int d = 0; d < head_dim; d++) {
        vec key[VECTORS];
#pragma GCC unroll 4
        for (int x = 0; x < VECTORS; x++) key[x] = load(keys_t + d * KEY_TILE + x * LANES);
#pragma GCC unroll 8
        for (int i = 0; i < count; i++) {
            const float qd = q[i * head_dim + d];
#pragma GCC unroll 4
            for (int x = 0; x < VECTORS; x++) s[i][x] += qd * key[x];
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < count; i++)
#pragma GCC unroll 4
        for (int x = 0; x < VECTORS; x++) store(w->scores + (row + i) * KEY_TILE + x * LANES, s[i][x]);
}

/* acc[r] += sum_j weights[r, j] * value_j for `count` rows from `row`, one vector of head_dim at a time (the
 * last few values of a head_dim that is not a multiple of LANES one by one). */
static inline __attribute__((always_inline)) void add_values(const Workspace *w, const float *values, int keys,
                                                             int row, int count, int head_dim) {
    int d = 0;
    for (; d + LANES <= head_dim; d += LANES) {
        vec a[ROW_BLOCK];
#pragma GCC unroll 8
        for (int i = 0; i < count; i++) a[i] = load(w->acc + (int64_t)(row + i) * head_dim + d);
        for (int j = 0; j < keys; j++) {
            const vec value = load(values + j * head_dim + d);
#pragma GCC unroll 8
            for (int i = 0; i < count; i++) a[i] += w->scores[(row + i) * KEY_TILE + j] * value;
        }
#pragma GCC unroll 8
        for (int i = 0; i < count; i++) store(w->acc + (int64_t)(row + i) * head_dim + d, a[i]);
    }
    for (; d < head_dim; d++)
        for (int i = 0; i < count; i++)
            for (int j = 0; j < keys; j++)
                w->acc[(int64_t)(row + i) * head_dim + d] += w->scores[(row + i) * KEY_TILE + j] * values[j * head_dim + d];
}

/* Rows first..rows-1, where row r is token r / groups of the tile, at cache position position0 + r / groups;
 * the tile's keys are positions key0..key0+keys-1. Scores -> softmax weights; each row's running max, sum and
 * accumulator rescaled to its new max. */
static void softmax_rows(Workspace *w, int first, int rows, int groups, int position0, int key0, int keys,
                         int head_dim) {
    for (int r = first; r < rows; r++) {
        int visible = position0 + r / groups - key0 + 1;
        visible = visible < keys ? visible : keys;
        float *s = w->scores + r * KEY_TILE;
        float tile_max = -FLT_MAX;
#pragma omp simd reduction(max : tile_max)
        for (int j = 0; j < KEY_TILE; j++) tile_max = j < visible && s[j] > tile_max ? s[j] : tile_max;
        const float old_max = w->row_max[r], new_max = tile_max > old_max ? tile_max : old_max;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < KEY_TILE; j++) {
            s[j] = j < visible ? expf(s[j] - new_max) : 0.0f;
            sum += s[j];
        }
        if (old_max == -FLT_MAX) { /* the row's first tile: nothing to rescale */
            w->row_sum[r] = sum;
        } else {
            const float alpha = expf(old_max - new_max);
            w->row_sum[r] = w->row_sum[r] * alpha + sum;
            if (alpha != 1.0f) {
                float *a = w->acc + (int64_t)r * head_dim;
#pragma omp simd
                for (int d = 0; d < head_dim; d++) a[d] *= alpha;
            }
        }
        w->row_max[r] = new_max;
    }
}

/* The keys of positions key0..key0+KEY_TILE-1 under KV head h, read through `table`, as columns of keys_t
 * (head_dim, KEY_TILE), and their values as rows of `values` (KEY_TILE, head_dim); zeros past `positions`. */
static void stage_key_tile(float *keys_t, float *values, const void *k, const void *v, const int64_t *table,
                           int key0, int positions, int h, int head_dim, int64_t num_blocks, int block_size,
                           int bf16) {
    const int64_t head_base = (int64_t)h * num_blocks;
    float buffer[MAX_HEAD_DIM];
    for (int j = 0; j < KEY_TILE; j++) {
        const int p = key0 + j;
        if (p >= positions) {
            for (int d = 0; d < head_dim; d++) keys_t[d * KEY_TILE + j] = 0.0f;
            memset(values + j * head_dim, 0, sizeof(float) * head_dim);
            continue;
        }
        const int64_t slot = (head_base + table[p / block_size]) * block_size + p % block_size;
        const float *key = row_f32(k, slot * head_dim, head_dim, bf16, buffer);
        for (int d = 0; d < head_dim; d++) keys_t[d * KEY_TILE + j] = key[d];
        memcpy(values + j * head_dim, row_f32(v, slot * head_dim, head_dim, bf16, buffer), sizeof(float) * head_dim);
    }
}

/* One work item: tokens t0..t0+tokens-1 of a chunk (row q_row0 of q and out holds token t0, at cache position
 * position0) under KV head h, whose staged key tiles start at `staged` (each 2 * head_dim * KEY_TILE floats). */
static void attend_tile(Workspace *w, const void *q, int64_t q_stride, void *out, const float *staged, int64_t q_row0,
                        int position0, int tokens, int h, int heads, int groups, int head_dim, float scale, int bf16) {
    const int rows = tokens * groups, last_position = position0 + tokens - 1;
    const int64_t tile_floats = 2 * (int64_t)head_dim * KEY_TILE;
    float buffer[MAX_HEAD_DIM];
    for (int r = 0; r < rows; r++) {
        const int64_t element = (q_row0 + r / groups) * q_stride + ((int64_t)h * groups + r % groups) * head_dim;
        const float *src = row_f32(q, element, head_dim, bf16, buffer);
        for (int d = 0; d < head_dim; d++) w->query[(int64_t)r * head_dim + d] = src[d] * scale;
        w->row_max[r] = -FLT_MAX;
        w->row_sum[r] = 0.0f;
    }
    memset(w->acc, 0, sizeof(float) * (size_t)rows * head_dim);

    for (int key0 = 0; key0 <= last_position; key0 += KEY_TILE) {
        const int keys = last_position + 1 - key0 < KEY_TILE ? last_position + 1 - key0 : KEY_TILE;
        const float *keys_t = staged + (key0 / KEY_TILE) * tile_floats, *values = keys_t + head_dim * KEY_TILE;
        /* rows whose token sits before key0 see none of this tile */
        const int first_token = key0 > position0 ? key0 - position0 : 0, first = first_token * groups;
        int r = first;
        for (; r + SCORE_ROW_BLOCK <= rows; r += SCORE_ROW_BLOCK) score_rows(w, keys_t, r, SCORE_ROW_BLOCK, head_dim);
        for (; r < rows; r++) score_rows(w, keys_t, r, 1, head_dim);
        softmax_rows(w, first, rows, groups, position0, key0, keys, head_dim);
        r = first;
        for (; r + ROW_BLOCK <= rows; r += ROW_BLOCK) add_values(w, values, keys, r, ROW_BLOCK, head_dim);
        for (; r < rows; r++) add_values(w, values, keys, r, 1, head_dim);
    }

    for (int r = 0; r < rows; r++) {
        const int64_t element = ((q_row0 + r / groups) * heads + (int64_t)h * groups + r % groups) * head_dim;
        const float inverse = 1.0f / w->row_sum[r];
        for (int d = 0; d < head_dim; d++) {
            const float x = w->acc[(int64_t)r * head_dim + d] * inverse;
            if (bf16) ((uint16_t *)out)[element + d] = float_to_bf16(x);
            else ((float *)out)[element + d] = x;
        }
    }
}

int prefill_attention_key_tile(void) { return KEY_TILE; }

/* q, out: (tokens, heads, head_dim), the step's rows (q's rows q_stride values apart, out contiguous); k, v: (kv_heads,
 * num_blocks, block_size, head_dim).
 * Chunk c: its tokens are rows offsets[c].. offsets[c]+lengths[c]-1 of q and out, at positions starts[c]..,
 * over block table tables[c] (table_width ids). Rows of q outside every chunk are neither read nor written.
 * scratch: float32 workspace of scratch_floats, at least 2 * kv_heads * head_dim * KEY_TILE * (the sum over
 * chunks of their positions starts[c] + lengths[c], each rounded up to KEY_TILE).
 * Returns 0, or -1 if a shape is past the compiled limits or the scratch is too small (nothing is written then). */
int paged_prefill_attention(const void *q, int64_t q_stride, const void *k, const void *v, void *out, const int64_t *tables,
                            int64_t table_width, const int32_t *offsets, const int32_t *lengths,
                            const int32_t *starts, int chunks, int heads, int kv_heads, int head_dim,
                            int64_t num_blocks, int block_size, float scale, int bf16, float *scratch,
                            int64_t scratch_floats, int threads) {
    const int groups = heads / kv_heads;
    if (head_dim > MAX_HEAD_DIM || groups > MAX_GROUPS || groups * kv_heads != heads) return -1;
    const int64_t tile_floats = 2 * (int64_t)head_dim * KEY_TILE;
    /* Key tiles (chunk, KV head, tile) and query tiles (chunk, tile) as flat lists; first_key_tile[c]: chunk c's
     * first in the staged list, where its KV head h's tiles follow h * key_tiles(c) on. */
    int key_tiles = 0, query_tiles = 0;
    int64_t *first_key_tile = malloc(sizeof(int64_t) * (size_t)(chunks + 1));
    for (int c = 0; c < chunks; c++) {
        first_key_tile[c] = key_tiles;
        key_tiles += kv_heads * ((starts[c] + lengths[c] + KEY_TILE - 1) / KEY_TILE);
        query_tiles += (lengths[c] + QUERY_TILE - 1) / QUERY_TILE;
    }
    first_key_tile[chunks] = key_tiles;
    if ((int64_t)key_tiles * tile_floats > scratch_floats) {
        free(first_key_tile);
        return -1;
    }
    int *tile_chunk = malloc(sizeof(int) * (size_t)(query_tiles + 1)), *tile_first = malloc(sizeof(int) * (size_t)(query_tiles + 1));
    for (int c = 0, t = 0; c < chunks; c++)
        for (int first = 0; first < lengths[c]; first += QUERY_TILE, t++) tile_chunk[t] = c, tile_first[t] = first;

#pragma omp parallel num_threads(threads)
    {
        /* 1: every chunk's keys and values, tile by tile, into the scratch (each once, for all its queries) */
#pragma omp for schedule(static)
        for (int t = 0; t < key_tiles; t++) {
            int c = 0;
            while (first_key_tile[c + 1] <= t) c++;
            const int per_head = (int)((first_key_tile[c + 1] - first_key_tile[c]) / kv_heads);
            const int h = (int)((t - first_key_tile[c]) / per_head), tile = (int)((t - first_key_tile[c]) % per_head);
            float *keys_t = scratch + (int64_t)t * tile_floats;
            stage_key_tile(keys_t, keys_t + head_dim * KEY_TILE, k, v, tables + (int64_t)c * table_width,
                           tile * KEY_TILE, starts[c] + lengths[c], h, head_dim, num_blocks, block_size, bf16);
        }
        /* (the loop's implied barrier: every tile is staged before any is read) */

        /* 2: the query tiles, each over its staged keys; one allocation for the workspace, 64-byte lines */
        const size_t rows = (size_t)QUERY_TILE * groups, line = 64 / sizeof(float);
        const size_t rows_padded = (rows + line - 1) / line * line;
        const size_t floats = 2 * rows * head_dim + rows * KEY_TILE + 2 * rows_padded;
        float *memory = aligned_alloc(64, sizeof(float) * ((floats + line - 1) / line * line));
        Workspace w;
        w.query = memory;
        w.acc = w.query + rows * head_dim;
        w.scores = w.acc + rows * head_dim;
        w.row_max = w.scores + rows * KEY_TILE;
        w.row_sum = w.row_max + rows_padded;
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int t = 0; t < query_tiles; t++) {
            for (int h = 0; h < kv_heads; h++) {
                const int c = tile_chunk[t], first = tile_first[t];
                const int tokens = lengths[c] - first < QUERY_TILE ? lengths[c] - first : QUERY_TILE;
                const int per_head = (int)((first_key_tile[c + 1] - first_key_tile[c]) / kv_heads);
                const float *staged = scratch + (first_key_tile[c] + (int64_t)h * per_head) * tile_floats;
                attend_tile(&w, q, q_stride, out, staged, (int64_t)offsets[c] + first, starts[c] + first, tokens, h, heads,
                            groups, head_dim, scale, bf16);
            }
        }
        free(memory);
    }
    free(first_key_tile);
    free(tile_chunk);
    free(tile_first);
    return 0;
}
