/* Spike-sparse matrix products for training on CPU: the C kernel of ops/spike_matmul.py.

   Y = S W^T + b for S [R, I] holding mostly zeros (integer spikes in float storage), and the weight's
   gradient dW^T = S^T dY, both walking only the non-zero entries of S:
     csr:     S's non-zero entries row by row (row pointers, column indices, values), once per forward;
     forward: Y[r, :] = b + sum over S's non-zeros (r, i) of S[r, i] W^T[i, :];
     csc:     the same entries column by column (a counting sort of the CSR), for the backward;
     dw:      dW^T[i, :] = sum over the non-zeros (r, i) of column i of S[r, i] dY[r, :].
   The gradient of S itself, dY W, is dense (every input's surrogate gradient needs it): the caller's matmul.
   Each output is a sum over the non-zeros in ascending order (of i for Y, of r for dW^T), accumulated in
   registers over a tile of TILE contiguous output features (GCC/Clang vector types, lowered to the widest
   SIMD the target has), so results do not depend on the thread count. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 32
typedef float vec8 __attribute__((vector_size(32)));
typedef float vec8u __attribute__((vector_size(32), aligned(4))); /* unaligned loads and stores */

static inline vec8 load8(const float *p) { return *(const vec8u *)p; }
static inline void store8(float *p, vec8 v) { *(vec8u *)p = v; }

/* dst[0..n) = sum_q val[q] * rows[q][off + 0..n), q over [0, count), for one tile (n <= TILE) */
static inline void accumulate_tile(int64_t count, const int32_t *index, const float *val, const float *base,
                                   int64_t ld, int64_t off, int64_t n, const float *init, float *dst) {
    if (n == TILE) {
        vec8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        if (init) a0 = load8(init), a1 = load8(init + 8), a2 = load8(init + 16), a3 = load8(init + 24);
        for (int64_t q = 0; q < count; ++q) {
            const float *w = base + (int64_t)index[q] * ld + off;
            const float v = val[q];
            a0 += v * load8(w);
            a1 += v * load8(w + 8);
            a2 += v * load8(w + 16);
            a3 += v * load8(w + 24);
        }
        store8(dst, a0), store8(dst + 8, a1), store8(dst + 16, a2), store8(dst + 24, a3);
        return;
    }
    float acc[TILE];
    for (int64_t o = 0; o < n; ++o) acc[o] = init ? init[o] : 0.0f;
    for (int64_t q = 0; q < count; ++q) {
        const float *w = base + (int64_t)index[q] * ld + off;
        const float v = val[q];
        for (int64_t o = 0; o < n; ++o) acc[o] += v * w[o];
    }
    memcpy(dst, acc, n * sizeof(float));
}

/* S [R, I] (row stride lds) -> col, val [nnz] at the row offsets rowptr [R + 1] (spike_matmul_count's). Each
   row is compacted without branches (a spike pattern is unpredictable) into a per-thread buffer, then copied. */
void spike_matmul_csr(const float *S, int64_t R, int64_t I, int64_t lds, const int64_t *rowptr, int32_t *col,
                      float *val, int threads) {
#pragma omp parallel num_threads(threads)
    {
        int32_t *bcol = malloc((I + 1) * sizeof(int32_t));
        float *bval = malloc((I + 1) * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; ++r) {
            const float *s = S + r * lds;
            int64_t n = 0;
            if (bcol && bval) {
                for (int64_t i = 0; i < I; ++i) {
                    bcol[n] = (int32_t)i, bval[n] = s[i];
                    n += s[i] != 0.0f;
                }
                memcpy(col + rowptr[r], bcol, n * sizeof(int32_t));
                memcpy(val + rowptr[r], bval, n * sizeof(float));
            } else { /* no buffer: the branching walk */
                for (int64_t i = 0; i < I; ++i)
                    if (s[i] != 0.0f) col[rowptr[r] + n] = (int32_t)i, val[rowptr[r] + n++] = s[i];
            }
        }
        free(bcol), free(bval);
    }
}

/* non-zeros per row into rowptr[1..R] as a running sum (rowptr[0] = 0); returns nnz */
int64_t spike_matmul_count(const float *S, int64_t R, int64_t I, int64_t lds, int64_t *rowptr, int threads) {
    rowptr[0] = 0;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < R; ++r) {
        const float *s = S + r * lds;
        int64_t n = 0;
        for (int64_t i = 0; i < I; ++i) n += s[i] != 0.0f;
        rowptr[r + 1] = n;
    }
    for (int64_t r = 0; r < R; ++r) rowptr[r + 1] += rowptr[r];
    return rowptr[R];
}

/* Y [R, O] = S W^T (+ bias [O] if given), S as CSR, WT [I, O] row-major */
void spike_matmul_forward(int64_t R, int64_t O, const int64_t *rowptr, const int32_t *col, const float *val,
                          const float *WT, const float *bias, float *Y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < R; ++r) {
        const int64_t p = rowptr[r], count = rowptr[r + 1] - p;
        for (int64_t o0 = 0; o0 < O; o0 += TILE) {
            const int64_t n = O - o0 < TILE ? O - o0 : TILE;
            accumulate_tile(count, col + p, val + p, WT, O, o0, n, bias ? bias + o0 : NULL, Y + r * O + o0);
        }
    }
}

/* The CSR's entries column by column: colptr [I + 1], row [nnz], cval [nnz] (rows ascending in each column). */
void spike_matmul_csc(int64_t R, int64_t I, const int64_t *rowptr, const int32_t *col, const float *val,
                      int64_t *colptr, int32_t *row, float *cval) {
    memset(colptr, 0, (I + 1) * sizeof(int64_t));
    const int64_t nnz = rowptr[R];
    for (int64_t p = 0; p < nnz; ++p) colptr[col[p] + 1]++;
    for (int64_t i = 0; i < I; ++i) colptr[i + 1] += colptr[i];
    for (int64_t r = 0; r < R; ++r)
        for (int64_t p = rowptr[r]; p < rowptr[r + 1]; ++p) {
            int64_t q = colptr[col[p]]++;
            row[q] = (int32_t)r, cval[q] = val[p];
        }
    for (int64_t i = I; i > 0; --i) colptr[i] = colptr[i - 1]; /* the fill advanced each start to the next's */
    colptr[0] = 0;
}

/* dWT [I, O] = S^T dY, S as CSC, dY [R, O] row-major */
void spike_matmul_dw(int64_t I, int64_t O, const int64_t *colptr, const int32_t *row, const float *cval,
                     const float *dY, float *dWT, int threads) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 4)
    for (int64_t i = 0; i < I; ++i) {
        const int64_t p = colptr[i], count = colptr[i + 1] - p;
        for (int64_t o0 = 0; o0 < O; o0 += TILE) {
            const int64_t n = O - o0 < TILE ? O - o0 : TILE;
            accumulate_tile(count, row + p, cval + p, dY, O, o0, n, NULL, dWT + i * O + o0);
        }
    }
}
