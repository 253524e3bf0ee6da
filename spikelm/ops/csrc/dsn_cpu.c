/* The DSN neuron's forward and backward on CPU, one pass over time each: the C backend of ops.dsn (ops/dsn/c_backend.py).

   Per time row t and channel c (the definition: docs/neuron.md; the float64 reference: ops/dsn/naive.py):
     a'    = b + sum_j w_j x_{t-k+1+j}              (taps before a document's start read 0)
     alpha = max(sigmoid(a')^n, e^-20), n = 1/tau   (1 - alpha = sigmoid(-a') (1 + s + ... + s^(n-1)), s = sigmoid(a'),
                                                     exact near alpha = 1 where 1 - s^n would cancel)
     H_t   = alpha H_{t-1} + (1 - alpha) x_t,  S_t = clip(floor(H_t + 1/2), 0, N)
   The recurrences read only 1 - alpha: H_t = H_{t-1} + (1 - alpha)(x_t - H_{t-1}) and alpha u = u - (1 - alpha) u.
   A float32 alpha near 1 carries an absolute rounding error of ~6e-8, a relative error of 6e-8 / (1 - alpha)
   in the memory's time constant (1 % at 1 - alpha = 6e-6), which compounds over long sequences.
   The backward walks time in reverse with the adjoint u_t = dL/dH_t (u_t = dS_t S'(H_t) + alpha_{t+1} u_{t+1}),
   recomputing a' and alpha from x, and H block by block (K rows) from the membrane the forward saved after
   each block, instead of reading them from memory.
   Every inner loop runs over contiguous channels (blocks of BLOCK, kept in L1), so the compiler
   vectorises it (hence a polynomial exp instead of libm's). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ALPHA_FLOOR 2.0611536224385579e-09f /* exp(LOG_DECAY_FLOOR), LOG_DECAY_FLOOR = -20 */
#define BLOCK 256                           /* channels per work item */
#define MAX_TAPS 16

/* exp(x) for x <= 0 (Cody-Waite reduction + Cephes' degree-6 polynomial, ~1 ulp; flushes below e^-87) */
static inline float exp_nonpos(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    union { int32_t i; float f; } scale;
    scale.i = ((int32_t)n + 127) << 23;
    return p * scale.f;
}

/* alpha, 1 - alpha and dln = d(log alpha)/da' (0 at the floor) from the logits a[0..len) */
static inline __attribute__((always_inline)) void decay_row(const int n, int len, const float *restrict a,
                                                            float *restrict alpha, float *restrict om,
                                                            float *restrict dln) {
    for (int c = 0; c < len; ++c) {
        float av = a[c];
        float e = exp_nonpos(-fabsf(av));
        float inv = 1.0f / (1.0f + e);
        float sig = av >= 0.0f ? inv : e * inv;
        float sneg = av >= 0.0f ? e * inv : inv;
        float p = sig, geo = 1.0f;
#pragma GCC unroll 8
        for (int m = 1; m < n; ++m) {
            geo += p;
            p *= sig;
        }
        int floored = p < ALPHA_FLOOR;
        alpha[c] = floored ? ALPHA_FLOOR : p;
        om[c] = floored ? 1.0f - ALPHA_FLOOR : sneg * geo;
        dln[c] = floored ? 0.0f : (float)n * sneg;
    }
}

static void decay_terms(int n, int len, const float *a, float *alpha, float *om, float *dln) {
    switch (n) { /* n is a constant in each case: the power loop unrolls and the channel loop vectorises */
    case 1: decay_row(1, len, a, alpha, om, dln); break;
    case 2: decay_row(2, len, a, alpha, om, dln); break;
    case 3: decay_row(3, len, a, alpha, om, dln); break;
    case 4: decay_row(4, len, a, alpha, om, dln); break;
    case 5: decay_row(5, len, a, alpha, om, dln); break;
    case 6: decay_row(6, len, a, alpha, om, dln); break;
    case 7: decay_row(7, len, a, alpha, om, dln); break;
    default: decay_row(8, len, a, alpha, om, dln); break;
    }
}

typedef struct {
    const float *x, *hist, *h0, *wT, *bias;
    const int32_t *row_start, *start_doc, *end_doc; /* packed (B = 1): per row; NULL for independent rows */
    int64_t B, T, C, sxb, sxt; /* x's strides of rows and time steps (channels are contiguous) */
    int k, n;
    float max_spike;
} Problem;

/* Pointers to the k taps of row t (channel offset c0): x rows, history rows, or zeros. */
static void taps_of_row(const Problem *p, int64_t b, int64_t t, int64_t c0, const float *zeros, const float **tap) {
    for (int j = 0; j < p->k; ++j) {
        int64_t tt = t - (p->k - 1 - j);
        int64_t first = p->row_start ? p->row_start[t] : 0;
        if (tt >= first)
            tap[j] = p->x + b * p->sxb + tt * p->sxt + c0;
        else if (!p->row_start && p->hist)
            tap[j] = p->hist + (b * (p->k - 1) + (p->k - 1) + tt) * p->C + c0;
        else
            tap[j] = zeros;
    }
}

static void logits_of_row(const Problem *p, const float **tap, int64_t c0, int len, float *restrict a) {
    const float *restrict bias = p->bias + c0;
    const float *restrict w0 = p->wT + c0;
    const float *restrict t0 = tap[0];
    if (p->k == 4) { /* the default taps in one pass, summed in the same order as below */
        const float *restrict w1 = w0 + p->C, *restrict w2 = w1 + p->C, *restrict w3 = w2 + p->C;
        const float *restrict t1 = tap[1], *restrict t2 = tap[2], *restrict t3 = tap[3];
        for (int c = 0; c < len; ++c) a[c] = bias[c] + w0[c] * t0[c] + w1[c] * t1[c] + w2[c] * t2[c] + w3[c] * t3[c];
        return;
    }
    for (int c = 0; c < len; ++c) a[c] = bias[c] + w0[c] * t0[c];
    for (int j = 1; j < p->k; ++j) {
        const float *restrict wj = p->wT + j * p->C + c0;
        const float *restrict tj = tap[j];
        for (int c = 0; c < len; ++c) a[c] += wj[c] * tj[c];
    }
}

/* Work items: (row b, a contiguous channel range); each walks time with the whole range per step, so
   memory streams row after row (a walk down one narrow column of [T, C] would stride across pages). */
static int64_t channel_parts(int64_t C, int threads) {
    int64_t parts = threads < 1 ? 1 : threads;
    int64_t most = (C + 63) / 64; /* at least 64 channels per part */
    return parts < most ? parts : most;
}

/* Work item `item` of B * parts: its row *b, first channel *lo; returns its channel count (0: nothing to do). */
static int64_t item_range(int64_t item, int64_t parts, int64_t C, int64_t *b, int64_t *lo) {
    int64_t width = ((C + parts - 1) / parts + 15) / 16 * 16; /* multiples of 16 channels */
    int64_t i = item % parts, hi = (i + 1) * width < C ? (i + 1) * width : C;
    *b = item / parts;
    *lo = i * width < C ? i * width : C;
    return hi - *lo;
}

/* One time step t over the channels [lo, lo + width): hout = H_t from hprev = H_{t-1} (ignored at a document
   start, which starts from the document's initial state or 0; hout may be hprev); spikes S_t into srow if given;
   alpha, 1 - alpha and dln into dec[0..width), dec[width..2 width), dec[2 width..3 width) if given. */
static void step_row(const Problem *p, int64_t b, int64_t t, int64_t lo, int64_t width, const float *zeros,
                     const float *hprev, float *hout, float *srow, float *dec) {
    float a[BLOCK], alpha[BLOCK], om[BLOCK], dln[BLOCK];
    const float *tap[MAX_TAPS], *tap_c[MAX_TAPS];
    int64_t doc = p->start_doc ? p->start_doc[t] : (t == 0 ? b : -1);
    if (doc >= 0) { /* a fresh membrane (or the document's initial state) */
        for (int64_t c = 0; c < width; ++c) hout[c] = p->h0 ? p->h0[doc * p->C + lo + c] : 0.0f;
        hprev = hout;
    }
    taps_of_row(p, b, t, lo, zeros, tap);
    for (int64_t c0 = 0; c0 < width; c0 += BLOCK) {
        int len = (int)(width - c0 < BLOCK ? width - c0 : BLOCK);
        for (int j = 0; j < p->k; ++j) tap_c[j] = tap[j] == zeros ? zeros : tap[j] + c0;
        logits_of_row(p, tap_c, lo + c0, len, a);
        decay_terms(p->n, len, a, alpha, om, dln);
        const float *xt = p->x + b * p->sxb + t * p->sxt + lo + c0, *hp = hprev + c0;
        float *ho = hout + c0;
        for (int c = 0; c < len; ++c) ho[c] = hp[c] + om[c] * (xt[c] - hp[c]); /* not alpha h + om x: see the header */
        if (dec) {
            memcpy(dec + c0, alpha, len * sizeof(float));
            memcpy(dec + width + c0, om, len * sizeof(float));
            memcpy(dec + 2 * width + c0, dln, len * sizeof(float));
        }
        if (srow) {
            float *st = srow + c0;
            for (int c = 0; c < len; ++c) {
                float s = floorf(ho[c] + 0.5f);
                s = s < 0.0f ? 0.0f : s;
                st[c] = s > p->max_spike ? p->max_spike : s;
            }
        }
    }
}

/* x [B, T, C] with strides (sxb, sxt, 1) (e.g. one half of a projection's output, read in place); spikes [B, T, C].
   The membrane is saved only every K rows: Hc [B, ceil(T / K), C] holds H after each block of K rows (the
   backward recomputes the rows in between, so a layer keeps T/K rows of membrane instead of T; fresh memory
   costs first-touch page faults). finals [docs, C]: H at each document's last row (end_doc; NULL: row T-1 of
   each b). Returns 0, or 1 when out of memory. */
int dsn_cpu_forward(const float *x, const float *hist, const float *h0, const float *wT, const float *bias,
                    const int32_t *row_start, const int32_t *start_doc, const int32_t *end_doc, int64_t B, int64_t T,
                    int64_t C, int64_t sxb, int64_t sxt, int k, int n, float max_spike, int64_t K, float *spikes,
                    float *Hc, float *finals, int threads) {
    Problem p = {x, hist, h0, wT, bias, row_start, start_doc, end_doc, B, T, C, sxb, sxt, k, n, max_spike};
    int64_t parts = channel_parts(C, threads), nblk = (T + K - 1) / K;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < B * parts; ++item) {
        int64_t b, lo, width = item_range(item, parts, C, &b, &lo);
        if (width <= 0) continue;
        float *h = malloc(width * sizeof(float));
        if (!h) {
#pragma omp atomic write
            failed = 1;
            continue;
        }
        float zeros[BLOCK] = {0};
        for (int64_t t = 0; t < T; ++t) {
            step_row(&p, b, t, lo, width, zeros, h, h, spikes + (b * T + t) * C + lo, NULL);
            if (t % K == K - 1 || t == T - 1) memcpy(Hc + (b * nblk + t / K) * C + lo, h, width * sizeof(float));
            int64_t end = end_doc ? end_doc[t] : (t == T - 1 ? b : -1);
            if (end >= 0) memcpy(finals + end * C + lo, h, width * sizeof(float));
        }
        free(h);
    }
    return failed;
}

/* dx [B, T, C]; dw_part [B, k, C] and db_part [B, C] (summed over B by the caller); dh0 [docs, C] or NULL;
   da_head [B, k-1, C] or NULL (d a' of the first k-1 rows: the caller turns them into the history's gradient).
   surrogate: 0 rect (1 where 0 <= H <= N), 1 atan (sum over thresholds of (sa/2) / (1 + (pi/2 sa (H - m - 1/2))^2)).
   Returns 0, or 1 when out of memory. */
int dsn_cpu_backward(const float *x, const float *hist, const float *h0, const float *wT, const float *bias,
                     const int32_t *row_start, const int32_t *start_doc, const int32_t *end_doc, const float *Hc,
                     const float *grad_s, const float *grad_last, int64_t B, int64_t T, int64_t C, int64_t sxb,
                     int64_t sxt, int k, int n, float max_spike, int64_t K, int surrogate, float sa, float *dx,
                     float *dw_part, float *db_part, float *dh0, float *da_head, int threads) {
    Problem p = {x, hist, h0, wT, bias, row_start, start_doc, end_doc, B, T, C, sxb, sxt, k, n, max_spike};
    int64_t parts = channel_parts(C, threads), nblk = (T + K - 1) / K;
    const int km1 = k - 1;
    const float half_pi_sa = 1.57079632679489662f * sa;
    int failed = 0;
    if (B * parts == 0) return 0; /* no rows or no channels: nothing to do (and no width to size a buffer by) */
    const int64_t most = ((C + parts - 1) / parts + 15) / 16 * 16; /* an item's channel count at most (item_range) */
#pragma omp parallel num_threads(threads)
    {
    /* per channel of an item's range: u_{t+1}, alpha_{t+1}, the conv's bias and weight gradients, the ring of
       d a' of rows t+1 .. t+k-1 (slot row % (k-1), zeroed across a document start): zeroed per item; then the
       block's recomputed membranes Hb [K][width], and its rows' alpha, 1 - alpha and dln Db [K][3][width] (kept
       from the recomputation rather than computed again). One buffer per thread, reused by its items. */
    float *buffer = malloc((size_t)most * (2 + 2 * k + 4 * K) * sizeof(float));
    if (!buffer) {
#pragma omp atomic write
        failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t item = 0; item < B * parts; ++item) {
        int64_t b, lo, width = item_range(item, parts, C, &b, &lo);
        if (width <= 0 || !buffer) continue;
        float *state = buffer;
        memset(state, 0, (size_t)width * (2 + 2 * k) * sizeof(float));
        float *u_next = state, *om_next = state + width, *db = state + 2 * width;
        float *dw = state + 3 * width, *ring = state + (3 + k) * width; /* dw [k][width], ring [k-1][width] */
        float *Hb = state + (2 + 2 * k) * width, *Db = Hb + K * width;
        float zeros[BLOCK] = {0}, u[BLOCK], da[BLOCK];
        const float *tap[MAX_TAPS], *tap_c[MAX_TAPS];
        for (int64_t t = T - 1; t >= 0; --t) {
            int64_t row = b * T + t, t0 = t / K * K;
            if (t == T - 1 || t % K == K - 1) { /* entering a block from its end: recompute its membranes */
                const float *before = t0 > 0 ? Hc + (b * nblk + t0 / K - 1) * C + lo : Hb; /* (row 0 starts afresh) */
                for (int64_t r = t0; r <= t; ++r)
                    step_row(&p, b, r, lo, width, zeros, r > t0 ? Hb + (r - t0 - 1) * width : before,
                             Hb + (r - t0) * width, NULL, Db + (r - t0) * 3 * width);
            }
            taps_of_row(&p, b, t, lo, zeros, tap);
            int64_t end = end_doc ? end_doc[t] : (t == T - 1 ? b : -1);
            int64_t doc = start_doc ? start_doc[t] : (t == 0 ? b : -1);
            for (int64_t c0 = 0; c0 < width; c0 += BLOCK) {
                int len = (int)(width - c0 < BLOCK ? width - c0 : BLOCK);
                int64_t off = lo + c0; /* channel offset in the full row */
                for (int j = 0; j < k; ++j) tap_c[j] = tap[j] == zeros ? zeros : tap[j] + c0;
                const float *dec = Db + (t - t0) * 3 * width + c0;
                const float *alpha = dec, *om = dec + width, *dln = dec + 2 * width;
                const float *Ht = Hb + (t - t0) * width + c0, *xt = x + b * sxb + t * sxt + off;
                float *un = u_next + c0, *on = om_next + c0; /* alpha_{t+1} u_{t+1} = un - on un */
                /* u = dS S'(H) + alpha_{t+1} u_{t+1} (+ the final state's gradient at a document's last row) */
                if (grad_s) {
                    const float *gs = grad_s + row * C + off;
                    if (surrogate == 0) {
                        for (int c = 0; c < len; ++c)
                            u[c] = (Ht[c] >= 0.0f && Ht[c] <= max_spike ? gs[c] : 0.0f) + (un[c] - on[c] * un[c]);
                    } else {
                        for (int c = 0; c < len; ++c) u[c] = 0.0f;
                        for (int m = 0; m < (int)max_spike; ++m) {
                            float th = (float)m + 0.5f;
                            for (int c = 0; c < len; ++c) {
                                float z = half_pi_sa * (Ht[c] - th);
                                u[c] += (0.5f * sa) / (1.0f + z * z);
                            }
                        }
                        for (int c = 0; c < len; ++c) u[c] = gs[c] * u[c] + (un[c] - on[c] * un[c]);
                    }
                } else {
                    for (int c = 0; c < len; ++c) u[c] = un[c] - on[c] * un[c];
                }
                if (end >= 0 && grad_last)
                    for (int c = 0; c < len; ++c) u[c] += grad_last[end * C + off + c];
                /* d a' = u (H_{t-1} - x_t) d alpha / d a',  d alpha / d a' = alpha dln */
                if (doc >= 0) {
                    for (int c = 0; c < len; ++c) {
                        float prev = h0 ? h0[doc * C + off + c] : 0.0f;
                        da[c] = u[c] * (prev - xt[c]) * alpha[c] * dln[c];
                    }
                    if (dh0)
                        for (int c = 0; c < len; ++c) dh0[doc * C + off + c] = alpha[c] * u[c];
                } else {
                    const float *Hp = t > t0 ? Ht - width : Hc + (b * nblk + t0 / K - 1) * C + off;
                    for (int c = 0; c < len; ++c) da[c] = u[c] * (Hp[c] - xt[c]) * alpha[c] * dln[c];
                }
                /* dx_t = (1 - alpha) u + sum_m w_{k-1-m} d a'_{t+m} (the conv's transpose) */
                float *dxt = dx + row * C + off;
                const float *wl = p.wT + (int64_t)km1 * C + off;
                for (int c = 0; c < len; ++c) dxt[c] = om[c] * u[c] + wl[c] * da[c];
                for (int m = 1; m <= km1; ++m) {
                    const float *wm = p.wT + (int64_t)(km1 - m) * C + off;
                    const float *r = ring + ((t + m) % km1) * width + c0;
                    for (int c = 0; c < len; ++c) dxt[c] += wm[c] * r[c];
                }
                for (int j = 0; j < k; ++j) {
                    const float *tj = tap_c[j];
                    float *dwj = dw + j * width + c0;
                    for (int c = 0; c < len; ++c) dwj[c] += da[c] * tj[c];
                }
                for (int c = 0; c < len; ++c) db[c0 + c] += da[c];
                if (da_head && t < km1) memcpy(da_head + ((b * km1) + t) * C + off, da, len * sizeof(float));
                if (doc < 0) {
                    if (km1 > 0) memcpy(ring + (t % km1) * width + c0, da, len * sizeof(float));
                    memcpy(on, om, len * sizeof(float));
                    memcpy(un, u, len * sizeof(float));
                }
            }
            if (doc >= 0) { /* the previous row belongs to another document: nothing flows back into it */
                memset(ring, 0, (size_t)km1 * width * sizeof(float));
                memset(u_next, 0, width * sizeof(float));
            }
        }
        for (int j = 0; j < k; ++j) memcpy(dw_part + (b * k + j) * C + lo, dw + j * width, width * sizeof(float));
        memcpy(db_part + b * C + lo, db, width * sizeof(float));
    }
    free(buffer);
    }
    return failed;
}
