/* Linear layers over a few rows (decode steps) on the CPU, in float32 (app/engine/native_linear.py).
 *
 * With a few rows, a linear layer is a stream of its weights from memory with a little arithmetic on each.
 * oneDNN (app/engine/linear_kernels.py) computes such a GEMM and then waits for the next weights, or waits and
 * then computes: on this project's 2-core machine, 24 rows through every layer of the default model ran at
 * ~10 GB/s with the machine reading 20 GB/s, the compute time and the memory time added, not overlapped
 * (BENCHMARKS.md). Here each tile of weights, while it is multiplied, asks for the tile two ahead
 * (software prefetch into L2), so the memory stream runs under the arithmetic.
 *
 * The weights are the model's own, row-major (out_features, in_features), as torch holds them: no packed
 * copy. A tile is 4 weight rows (outputs) by up to 6 input rows: 24 vector accumulators over the
 * in-features, each step 4 weight loads and 6 input loads for 24 FMAs, then one transposing reduction
 * that yields each input row's 4 outputs as one 128-bit store. The weight tile stays in L1 while every
 * group of 6 input rows passes over it, so each weight is read from memory once a call.
 *
 * A call may cover several weight matrices that read the same input (q, k and v; gate and up): their
 * outputs are written side by side, as one GEMM over their concatenation would. Tiles are split over
 * OpenMP threads (torch's libgomp, see paged_attention.c) in contiguous runs, so each thread streams.
 *
 * AVX-512 only: elsewhere few_rows_linear_supported() says 0 and the engine keeps oneDNN for every batch.
 */
#include <stdint.h>

#if defined(__AVX512F__) && defined(__AVX512DQ__)
#include <immintrin.h>

enum { TILE_ROWS = 6, TILE_OUTPUTS = 4, PREFETCH_TILES_AHEAD = 2 };

typedef struct {
    const float *weights; /* the tile's first weight row */
    int outputs;          /* weight rows in the tile, 1 to TILE_OUTPUTS */
    int column;           /* its first output's column in out */
} Tile;

/* Tile t of the weight matrices laid end to end; outputs 0 past the last tile. */
static Tile tile_at(const float *const *weights, const int *weight_rows, int matrices, int in_features, int t) {
    int column = 0;
    for (int m = 0; m < matrices; m++) {
        int tiles = (weight_rows[m] + TILE_OUTPUTS - 1) / TILE_OUTPUTS;
        if (t < tiles) {
            int first = t * TILE_OUTPUTS, left = weight_rows[m] - first;
            return (Tile){weights[m] + (int64_t)first * in_features,
                          left < TILE_OUTPUTS ? left : TILE_OUTPUTS, column + first};
        }
        t -= tiles;
        column += weight_rows[m];
    }
    return (Tile){0, 0, 0};
}

/* out[r, o] = bias[o] + sum_i x[r, i] * w[o, i] for rows r < rows, outputs o < outputs (both constants after
 * inlining); meanwhile prefetch `prefetch_lines` cache lines a step, from `prefetch` on (at least one a step:
 * a prefetch is a hint, which never faults, so running past the weights at the end costs nothing). */
static inline __attribute__((always_inline)) void multiply_tile(
    const float *x, int64_t x_stride, const float *w, int in_features, const float *bias, float *out,
    int64_t out_stride, int rows, int outputs, const char *prefetch, int prefetch_lines) {
    __m512 acc[TILE_ROWS][TILE_OUTPUTS];
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
        for (int o = 0; o < outputs; o++) acc[r][o] = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= in_features; i += 16, prefetch += 64 * prefetch_lines) {
        __m512 wv[TILE_OUTPUTS];
#pragma GCC unroll 4
        for (int o = 0; o < outputs; o++) wv[o] = _mm512_loadu_ps(w + (int64_t)o * in_features + i);
        _mm_prefetch(prefetch, _MM_HINT_T1);
        for (int p = 1; p < prefetch_lines; p++) _mm_prefetch(prefetch + 64 * p, _MM_HINT_T1);
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++) {
            const __m512 xv = _mm512_loadu_ps(x + r * x_stride + i);
#pragma GCC unroll 4
            for (int o = 0; o < outputs; o++) acc[r][o] = _mm512_fmadd_ps(xv, wv[o], acc[r][o]);
        }
    }
    if (i < in_features) {  /* the last in-features, fewer than 16: masked loads read zeros past the end */
        const __mmask16 mask = (__mmask16)((1u << (in_features - i)) - 1);
        __m512 wv[TILE_OUTPUTS];
#pragma GCC unroll 4
        for (int o = 0; o < outputs; o++) wv[o] = _mm512_maskz_loadu_ps(mask, w + (int64_t)o * in_features + i);
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++) {
            const __m512 xv = _mm512_maskz_loadu_ps(mask, x + r * x_stride + i);
#pragma GCC unroll 4
            for (int o = 0; o < outputs; o++) acc[r][o] = _mm512_fmadd_ps(xv, wv[o], acc[r][o]);
        }
    }
    if (outputs == TILE_OUTPUTS) {
        /* Sum each row's four accumulators at once: after the interleaving adds, each 128-bit lane holds
         * partial sums of outputs 0-3 in order; then the four lanes are added. */
        const __m128 b = bias ? _mm_loadu_ps(bias) : _mm_setzero_ps();
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++) {
            __m512 a01 = _mm512_add_ps(_mm512_unpacklo_ps(acc[r][0], acc[r][1]),
                                       _mm512_unpackhi_ps(acc[r][0], acc[r][1]));
            __m512 a23 = _mm512_add_ps(_mm512_unpacklo_ps(acc[r][2], acc[r][3]),
                                       _mm512_unpackhi_ps(acc[r][2], acc[r][3]));
            __m512 lanes = _mm512_add_ps(_mm512_shuffle_ps(a01, a23, 0x44), _mm512_shuffle_ps(a01, a23, 0xEE));
            __m256 halves = _mm256_add_ps(_mm512_castps512_ps256(lanes), _mm512_extractf32x8_ps(lanes, 1));
            __m128 sums = _mm_add_ps(_mm256_castps256_ps128(halves), _mm256_extractf128_ps(halves, 1));
            _mm_storeu_ps(out + r * out_stride, _mm_add_ps(sums, b));
        }
        return;
    }
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
        for (int o = 0; o < outputs; o++)
            out[r * out_stride + o] = _mm512_reduce_add_ps(acc[r][o]) + (bias ? bias[o] : 0.0f);
}

#define MULTIPLY(rows_, outputs_)                                                                          \
    multiply_tile(x_rows, x_stride, tile.weights, in_features, tile_bias, out_rows, out_stride, rows_,      \
                  outputs_, prefetch, prefetch_lines)

/* One tile's weights times up to TILE_ROWS input rows, with the row and output counts as constants. */
static void multiply_rows(const float *x_rows, int64_t x_stride, int rows, Tile tile, int in_features,
                          const float *tile_bias, float *out_rows, int64_t out_stride, const char *prefetch,
                          int prefetch_lines) {
#define ROWS_CASES(outputs_)                                                                               \
    switch (rows) {                                                                                        \
    case 6: MULTIPLY(6, outputs_); break;                                                                  \
    case 5: MULTIPLY(5, outputs_); break;                                                                  \
    case 4: MULTIPLY(4, outputs_); break;                                                                  \
    case 3: MULTIPLY(3, outputs_); break;                                                                  \
    case 2: MULTIPLY(2, outputs_); break;                                                                  \
    default: MULTIPLY(1, outputs_); break;                                                                 \
    }
    switch (tile.outputs) {
    case 4: ROWS_CASES(4) break;
    case 3: ROWS_CASES(3) break;
    case 2: ROWS_CASES(2) break;
    default: ROWS_CASES(1) break;
    }
#undef ROWS_CASES
}

int few_rows_linear_supported(void) { return 1; }

/* out (rows, sum of weight_rows) = x (rows, in_features) @ [weights[0]; weights[1]; ...].T + bias.
 * x rows lie x_stride floats apart, out rows out_stride; bias (sum of weight_rows floats) may be NULL. */
void few_rows_linear(const float *x, int64_t x_stride, int rows, int in_features, const float *const *weights,
                     const int *weight_rows, int matrices, const float *bias, float *out, int64_t out_stride,
                     int threads) {
    if (rows <= 0) return;
    int tiles = 0;
    for (int m = 0; m < matrices; m++) tiles += (weight_rows[m] + TILE_OUTPUTS - 1) / TILE_OUTPUTS;
    const int passes = (rows + TILE_ROWS - 1) / TILE_ROWS, steps = in_features / 16;
    /* The tile PREFETCH_TILES_AHEAD on is one run of memory (consecutive rows of one matrix); each pass over
     * this tile fetches its share of that run, the same number of lines at each step: one line a step from
     * 19 rows on, up to 4 for a single pass. */
    const int tile_lines = (TILE_OUTPUTS * in_features + 15) / 16;
    const int steps_in_all = passes * (steps > 0 ? steps : 1);
    const int lines_per_step = (tile_lines + steps_in_all - 1) / steps_in_all;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < tiles; t++) {
        const Tile tile = tile_at(weights, weight_rows, matrices, in_features, t);
        const Tile ahead = tile_at(weights, weight_rows, matrices, in_features, t + PREFETCH_TILES_AHEAD);
        const char *next = (const char *)(ahead.outputs ? ahead.weights : tile.weights);
        const float *tile_bias = bias ? bias + tile.column : 0;
        for (int pass = 0; pass < passes; pass++) {
            const int first_row = pass * TILE_ROWS, left = rows - first_row;
            multiply_rows(x + first_row * x_stride, x_stride, left < TILE_ROWS ? left : TILE_ROWS, tile,
                          in_features, tile_bias, out + first_row * out_stride + tile.column, out_stride,
                          next + (int64_t)pass * steps * lines_per_step * 64, lines_per_step);
        }
    }
}

#else

int few_rows_linear_supported(void) { return 0; }

void few_rows_linear(const float *x, int64_t x_stride, int rows, int in_features, const float *const *weights,
                     const int *weight_rows, int matrices, const float *bias, float *out, int64_t out_stride,
                     int threads) {
    (void)x, (void)x_stride, (void)rows, (void)in_features, (void)weights, (void)weight_rows, (void)matrices;
    (void)bias, (void)out, (void)out_stride, (void)threads;
}

#endif
