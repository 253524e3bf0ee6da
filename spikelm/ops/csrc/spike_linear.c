/* y = s W^T + b for integer spikes s (float storage): accumulate the weight rows of the inputs that fired.
 *
 * wt is the weight in input-major layout, [in, out] row-major (the transpose of nn.Linear's [out, in]),
 * so the weights of one input feature are one contiguous row of `out` values. For each output tile
 * (a slice of out that stays in L1 with every row's accumulators), the kernel walks the input
 * features that fired in any row and adds s[r, j] * wt[j, tile] to row r: a weight row is read once
 * per call whatever the batch, and inputs that did not fire cost nothing. Four inputs are added per
 * pass at batch 1 (one load and store of the accumulators per four weight rows). The inner loops run
 * over contiguous output features: -O3 -march=native vectorises them (AVX2/AVX-512 FMAs).
 *
 * Weights are float32 or bfloat16 (widened to float32 on load: a 16-bit shift); spikes, bias and
 * accumulation are float32. spike_linear_int8 reads int8 weights with one float32 scale per output
 * feature: the synaptic work is then integer accumulates (spike count x int8 weight into int32, exact),
 * scaled once per output at the end. OpenMP splits the output tiles between threads when there is
 * enough work.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE_FLOATS 4096  /* accumulator floats per tile, all rows together: 16 KB, half of a 32 KB L1d */
#define MIN_TILE 256
#define PARALLEL_MIN_WORK (1 << 20)  /* fired-inputs x outputs below which one thread is faster */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* The input features that fired in any row (cols, ascending) and their spikes, [n, rows] (vals). */
static int64_t fired_columns(const float *s, int64_t rows, int64_t in, int32_t *cols, float *vals) {
    int64_t n = 0;
    for (int64_t j = 0; j < in; j++) {
        int any = 0;
        for (int64_t r = 0; r < rows; r++) any |= s[r * in + j] != 0.0f;
        if (!any) continue;
        cols[n] = (int32_t)j;
        for (int64_t r = 0; r < rows; r++) vals[n * rows + r] = s[r * in + j];
        n++;
    }
    return n;
}

/* One output tile [o0, o0 + len) of every row. W(j) points at weight row j; LOAD(p, o) widens p[o]. */
#define TILE_KERNEL(NAME, WTYPE, LOAD)                                                                     \
    static void NAME(const WTYPE *wt, int64_t out, const int32_t *cols, const float *vals, int64_t n,      \
                     int64_t rows, const float *bias, float *y, int64_t o0, int64_t len) {                 \
        for (int64_t r = 0; r < rows; r++) {                                                               \
            float *acc = y + r * out + o0;                                                                 \
            if (bias) memcpy(acc, bias + o0, len * sizeof(float));                                         \
            else memset(acc, 0, len * sizeof(float));                                                      \
        }                                                                                                  \
        if (rows == 1) {                                                                                   \
            float *restrict acc = y + o0;                                                                  \
            int64_t c = 0;                                                                                 \
            for (; c + 4 <= n; c += 4) {                                                                   \
                const WTYPE *restrict w0 = wt + (int64_t)cols[c] * out + o0;                               \
                const WTYPE *restrict w1 = wt + (int64_t)cols[c + 1] * out + o0;                           \
                const WTYPE *restrict w2 = wt + (int64_t)cols[c + 2] * out + o0;                           \
                const WTYPE *restrict w3 = wt + (int64_t)cols[c + 3] * out + o0;                           \
                const float v0 = vals[c], v1 = vals[c + 1], v2 = vals[c + 2], v3 = vals[c + 3];            \
                for (int64_t o = 0; o < len; o++)                                                          \
                    acc[o] += v0 * LOAD(w0, o) + v1 * LOAD(w1, o) + v2 * LOAD(w2, o) + v3 * LOAD(w3, o);   \
            }                                                                                              \
            for (; c < n; c++) {                                                                           \
                const WTYPE *restrict w0 = wt + (int64_t)cols[c] * out + o0;                               \
                const float v0 = vals[c];                                                                  \
                for (int64_t o = 0; o < len; o++) acc[o] += v0 * LOAD(w0, o);                              \
            }                                                                                              \
            return;                                                                                        \
        }                                                                                                  \
        for (int64_t c = 0; c < n; c++) {                                                                  \
            const WTYPE *restrict w = wt + (int64_t)cols[c] * out + o0;                                    \
            for (int64_t r = 0; r < rows; r++) {                                                           \
                const float v = vals[c * rows + r];                                                        \
                if (v == 0.0f) continue;                                                                   \
                float *restrict acc = y + r * out + o0;                                                    \
                for (int64_t o = 0; o < len; o++) acc[o] += v * LOAD(w, o);                                \
            }                                                                                              \
        }                                                                                                  \
    }

#define LOAD_F32(p, o) ((p)[o])
#define LOAD_BF16(p, o) bf16_to_f32((p)[o])
TILE_KERNEL(tile_f32, float, LOAD_F32)
TILE_KERNEL(tile_bf16, uint16_t, LOAD_BF16)

/* int8 weights: one output tile, int32 accumulators (acc, len x rows), then y = scale x acc + bias. */
static void tile_int8(const int8_t *q, const float *scale, int64_t out, const int32_t *cols, const int32_t *ivals,
                      int64_t n, int64_t rows, const float *bias, float *y, int64_t o0, int64_t len, int32_t *acc) {
    memset(acc, 0, len * rows * sizeof(int32_t));
    if (rows == 1) {
        int32_t *restrict a = acc;
        int64_t c = 0;
        for (; c + 4 <= n; c += 4) {
            const int8_t *restrict q0 = q + (int64_t)cols[c] * out + o0;
            const int8_t *restrict q1 = q + (int64_t)cols[c + 1] * out + o0;
            const int8_t *restrict q2 = q + (int64_t)cols[c + 2] * out + o0;
            const int8_t *restrict q3 = q + (int64_t)cols[c + 3] * out + o0;
            const int32_t v0 = ivals[c], v1 = ivals[c + 1], v2 = ivals[c + 2], v3 = ivals[c + 3];
            for (int64_t o = 0; o < len; o++) a[o] += v0 * q0[o] + v1 * q1[o] + v2 * q2[o] + v3 * q3[o];
        }
        for (; c < n; c++) {
            const int8_t *restrict q0 = q + (int64_t)cols[c] * out + o0;
            const int32_t v0 = ivals[c];
            for (int64_t o = 0; o < len; o++) a[o] += v0 * q0[o];
        }
    } else {
        for (int64_t c = 0; c < n; c++) {
            const int8_t *restrict w = q + (int64_t)cols[c] * out + o0;
            for (int64_t r = 0; r < rows; r++) {
                const int32_t v = ivals[c * rows + r];
                if (v == 0) continue;
                int32_t *restrict a = acc + r * len;
                for (int64_t o = 0; o < len; o++) a[o] += v * w[o];
            }
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        float *restrict yr = y + r * out + o0;
        const int32_t *restrict a = acc + r * len;
        for (int64_t o = 0; o < len; o++) yr[o] = (float)a[o] * scale[o0 + o] + (bias ? bias[o0 + o] : 0.0f);
    }
}

/* s [rows, in] float32 spikes, wt [in, out] (float32, or bfloat16 when wt_bf16), bias [out] or NULL,
 * y [rows, out] float32. Runs only when at most max_fired input features fired (in any row) and returns
 * their number; else writes nothing and returns SL_TOO_DENSE. wt may be NULL: then SL_NEED_WEIGHTS
 * instead of a product (the caller makes the layout only for a product that will run).
 * SL_NO_MEMORY when the index lists cannot be allocated. */
#define SL_TOO_DENSE (-1)
#define SL_NEED_WEIGHTS (-2)
#define SL_NO_MEMORY (-3)
#define SL_NOT_INTEGER (-4)

int64_t spike_linear(const float *s, int64_t rows, int64_t in, const void *wt, int wt_bf16, int64_t out,
                     const float *bias, float *y, int64_t max_fired, int threads) {
    int32_t *cols = malloc((in > 0 ? in : 1) * sizeof(int32_t));
    float *vals = malloc((in * rows > 0 ? in * rows : 1) * sizeof(float));
    if (!cols || !vals) {
        free(cols);
        free(vals);
        return SL_NO_MEMORY;
    }
    const int64_t n = fired_columns(s, rows, in, cols, vals);
    if (n > max_fired || !wt) {
        free(cols);
        free(vals);
        return n > max_fired ? SL_TOO_DENSE : SL_NEED_WEIGHTS;
    }
    int64_t tile = TILE_FLOATS / (rows > 0 ? rows : 1);
    tile = tile < MIN_TILE ? MIN_TILE : tile & ~(int64_t)15;  /* whole 64-byte lines */
    const int64_t tiles = (out + tile - 1) / tile;
    const int parallel = threads > 1 && tiles > 1 && n * out >= PARALLEL_MIN_WORK;
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t o0 = t * tile;
        const int64_t len = out - o0 < tile ? out - o0 : tile;
        if (wt_bf16) tile_bf16((const uint16_t *)wt, out, cols, vals, n, rows, bias, y, o0, len);
        else tile_f32((const float *)wt, out, cols, vals, n, rows, bias, y, o0, len);
    }
    free(cols);
    free(vals);
    return n;
}

/* As spike_linear, with q [in, out] int8 and scale [out] (y[:, o] = scale[o] x sum_j s_j q[j, o] + bias[o]):
 * the spikes must be integers in [-2^15, 2^15] (else SL_NOT_INTEGER, nothing written), so that with
 * in <= 2^16 the int32 sums are exact. */
int64_t spike_linear_int8(const float *s, int64_t rows, int64_t in, const int8_t *q, const float *scale, int64_t out,
                          const float *bias, float *y, int64_t max_fired, int threads) {
    int32_t *cols = malloc((in > 0 ? in : 1) * sizeof(int32_t));
    float *vals = malloc((in * rows > 0 ? in * rows : 1) * sizeof(float));
    int32_t *ivals = malloc((in * rows > 0 ? in * rows : 1) * sizeof(int32_t));
    int64_t status = 0;
    if (!cols || !vals || !ivals) {
        status = SL_NO_MEMORY;
        goto done;
    }
    const int64_t n = fired_columns(s, rows, in, cols, vals);
    if (n > max_fired || !q) {
        status = n > max_fired ? SL_TOO_DENSE : SL_NEED_WEIGHTS;
        goto done;
    }
    for (int64_t i = 0; i < n * rows; i++) {
        const float v = vals[i];
        if (!(v >= -32768.0f && v <= 32768.0f) || v != (float)(int32_t)v || in > 65536) {
            status = SL_NOT_INTEGER;
            goto done;
        }
        ivals[i] = (int32_t)v;
    }
    int64_t tile = TILE_FLOATS / (rows > 0 ? rows : 1);
    tile = tile < MIN_TILE ? MIN_TILE : tile & ~(int64_t)15;
    const int64_t tiles = (out + tile - 1) / tile;
    const int parallel = threads > 1 && tiles > 1 && n * out >= PARALLEL_MIN_WORK;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (parallel) reduction(| : failed)
    {
        int32_t *acc = malloc(tile * (rows > 0 ? rows : 1) * sizeof(int32_t));
        if (!acc) failed = 1;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            if (!acc) continue;
            const int64_t o0 = t * tile;
            const int64_t len = out - o0 < tile ? out - o0 : tile;
            tile_int8(q, scale, out, cols, ivals, n, rows, bias, y, o0, len, acc);
        }
        free(acc);
    }
    status = failed ? SL_NO_MEMORY : n;
done:
    free(cols);
    free(vals);
    free(ivals);
    return status;
}
