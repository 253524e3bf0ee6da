/* The DSN neuron's forward and backward on CPU, one pass over time each (spikelm/ops/cpu_dsn.py).

   Per time row t and channel c (the definition: ../shared/spec/DSN.md, and ops/torch_dsn.py):
     a'    = b + sum_j w_j x_{t-k+1+j}              (taps before a document's start read 0)
     alpha = max(sigmoid(a')^n, e^-20), n = 1/tau   (1 - alpha = sigmoid(-a') (1 + s + ... + s^(n-1)), s = sigmoid(a'),
                                                     exact near alpha = 1 where 1 - s^n would cancel)
     H_t   = alpha H_{t-1} + (1 - alpha) x_t,  S_t = clip(floor(H_t + 1/2), 0, N)
   The backward walks time in reverse with the adjoint u_t = dL/dH_t (u_t = dS_t S'(H_t) + alpha_{t+1} u_{t+1}),
   recomputing a' and alpha from x instead of reading them from memory; it saves nothing but H.
   Work splits into (row, channel block) items; every inner loop runs over contiguous channels, so the
   compiler vectorises it (hence a polynomial exp instead of libm's). */
#include <math.h>
#include <stdint.h>
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
    int64_t B, T, C;
    int k, n;
    float max_spike;
} Problem;

/* Pointers to the k taps of row t (channel offset c0): x rows, history rows, or zeros. */
static void taps_of_row(const Problem *p, int64_t b, int64_t t, int64_t c0, const float *zeros, const float **tap) {
    for (int j = 0; j < p->k; ++j) {
        int64_t tt = t - (p->k - 1 - j);
        int64_t first = p->row_start ? p->row_start[t] : 0;
        if (tt >= first)
            tap[j] = p->x + (b * p->T + tt) * p->C + c0;
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
    for (int c = 0; c < len; ++c) a[c] = bias[c] + w0[c] * t0[c];
    for (int j = 1; j < p->k; ++j) {
        const float *restrict wj = p->wT + j * p->C + c0;
        const float *restrict tj = tap[j];
        for (int c = 0; c < len; ++c) a[c] += wj[c] * tj[c];
    }
}

/* spikes, H [B, T, C]; returns 0 */
int dsn_cpu_forward(const float *x, const float *hist, const float *h0, const float *wT, const float *bias,
                    const int32_t *row_start, const int32_t *start_doc, int64_t B, int64_t T, int64_t C, int k, int n,
                    float max_spike, float *spikes, float *H, int threads) {
    Problem p = {x, hist, h0, wT, bias, row_start, start_doc, NULL, B, T, C, k, n, max_spike};
    int64_t blocks = (C + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < B * blocks; ++item) {
        int64_t b = item / blocks, c0 = (item % blocks) * BLOCK;
        int len = (int)(C - c0 < BLOCK ? C - c0 : BLOCK);
        float zeros[BLOCK] = {0}, h[BLOCK], a[BLOCK], alpha[BLOCK], om[BLOCK], dln[BLOCK];
        const float *tap[MAX_TAPS];
        for (int64_t t = 0; t < T; ++t) {
            int64_t doc = start_doc ? start_doc[t] : (t == 0 ? b : -1);
            if (doc >= 0) { /* a fresh membrane (or the document's initial state) */
                for (int c = 0; c < len; ++c) h[c] = h0 ? h0[doc * C + c0 + c] : 0.0f;
            }
            taps_of_row(&p, b, t, c0, zeros, tap);
            logits_of_row(&p, tap, c0, len, a);
            decay_terms(n, len, a, alpha, om, dln);
            const float *xt = x + (b * T + t) * C + c0;
            float *Ht = H + (b * T + t) * C + c0, *St = spikes + (b * T + t) * C + c0;
            for (int c = 0; c < len; ++c) {
                float hv = alpha[c] * h[c] + om[c] * xt[c];
                h[c] = hv;
                Ht[c] = hv;
                float s = floorf(hv + 0.5f);
                s = s < 0.0f ? 0.0f : s;
                St[c] = s > max_spike ? max_spike : s;
            }
        }
    }
    return 0;
}

/* dx [B, T, C]; dw_part [B, k, C] and db_part [B, C] (summed over B by the caller); dh0 [docs, C] or NULL;
   da_head [B, k-1, C] or NULL (d a' of the first k-1 rows: the caller turns them into the history's gradient).
   surrogate: 0 rect (1 where 0 <= H <= N), 1 atan (sum over thresholds of (sa/2) / (1 + (pi/2 sa (H - m - 1/2))^2)). */
int dsn_cpu_backward(const float *x, const float *hist, const float *h0, const float *wT, const float *bias,
                     const int32_t *row_start, const int32_t *start_doc, const int32_t *end_doc, const float *H,
                     const float *grad_s, const float *grad_last, int64_t B, int64_t T, int64_t C, int k, int n,
                     float max_spike, int surrogate, float sa, float *dx, float *dw_part, float *db_part, float *dh0,
                     float *da_head, int threads) {
    Problem p = {x, hist, h0, wT, bias, row_start, start_doc, end_doc, B, T, C, k, n, max_spike};
    int64_t blocks = (C + BLOCK - 1) / BLOCK;
    const int km1 = k - 1;
    const float half_pi_sa = 1.57079632679489662f * sa;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < B * blocks; ++item) {
        int64_t b = item / blocks, c0 = (item % blocks) * BLOCK;
        int len = (int)(C - c0 < BLOCK ? C - c0 : BLOCK);
        float zeros[BLOCK] = {0}, a[BLOCK], alpha[BLOCK], om[BLOCK], dln[BLOCK], u[BLOCK], da[BLOCK];
        float u_next[BLOCK] = {0}, alpha_next[BLOCK] = {0}, dw[MAX_TAPS][BLOCK], db[BLOCK] = {0};
        float ring[MAX_TAPS][BLOCK]; /* d a' of rows t+1 .. t+k-1 at slot (row % (k-1)), zero across a document start */
        const float *tap[MAX_TAPS];
        memset(dw, 0, sizeof(dw));
        memset(ring, 0, sizeof(ring));
        for (int64_t t = T - 1; t >= 0; --t) {
            int64_t row = b * T + t;
            taps_of_row(&p, b, t, c0, zeros, tap);
            logits_of_row(&p, tap, c0, len, a);
            decay_terms(n, len, a, alpha, om, dln);
            const float *Ht = H + row * C + c0, *xt = x + row * C + c0;
            /* u = dS S'(H) + alpha_{t+1} u_{t+1} (+ the final state's gradient at a document's last row) */
            if (grad_s) {
                const float *gs = grad_s + row * C + c0;
                if (surrogate == 0) {
                    for (int c = 0; c < len; ++c)
                        u[c] = (Ht[c] >= 0.0f && Ht[c] <= max_spike ? gs[c] : 0.0f) + alpha_next[c] * u_next[c];
                } else {
                    for (int c = 0; c < len; ++c) u[c] = 0.0f;
                    for (int m = 0; m < (int)max_spike; ++m) {
                        float th = (float)m + 0.5f;
                        for (int c = 0; c < len; ++c) {
                            float z = half_pi_sa * (Ht[c] - th);
                            u[c] += (0.5f * sa) / (1.0f + z * z);
                        }
                    }
                    for (int c = 0; c < len; ++c) u[c] = gs[c] * u[c] + alpha_next[c] * u_next[c];
                }
            } else {
                for (int c = 0; c < len; ++c) u[c] = alpha_next[c] * u_next[c];
            }
            int64_t end = end_doc ? end_doc[t] : (t == T - 1 ? b : -1);
            if (end >= 0 && grad_last)
                for (int c = 0; c < len; ++c) u[c] += grad_last[end * C + c0 + c];
            int64_t doc = start_doc ? start_doc[t] : (t == 0 ? b : -1);
            /* d a' = u (H_{t-1} - x_t) d alpha / d a',  d alpha / d a' = alpha dln */
            if (doc >= 0) {
                for (int c = 0; c < len; ++c) {
                    float prev = h0 ? h0[doc * C + c0 + c] : 0.0f;
                    da[c] = u[c] * (prev - xt[c]) * alpha[c] * dln[c];
                }
                if (dh0)
                    for (int c = 0; c < len; ++c) dh0[doc * C + c0 + c] = alpha[c] * u[c];
            } else {
                const float *Hp = Ht - C;
                for (int c = 0; c < len; ++c) da[c] = u[c] * (Hp[c] - xt[c]) * alpha[c] * dln[c];
            }
            /* dx_t = (1 - alpha) u + sum_m w_{k-1-m} d a'_{t+m} (the conv's transpose) */
            float *dxt = dx + row * C + c0;
            const float *wl = p.wT + (int64_t)km1 * C + c0;
            for (int c = 0; c < len; ++c) dxt[c] = om[c] * u[c] + wl[c] * da[c];
            for (int m = 1; m <= km1; ++m) {
                const float *wm = p.wT + (int64_t)(km1 - m) * C + c0, *r = ring[(t + m) % km1];
                for (int c = 0; c < len; ++c) dxt[c] += wm[c] * r[c];
            }
            for (int j = 0; j < k; ++j) {
                const float *tj = tap[j];
                for (int c = 0; c < len; ++c) dw[j][c] += da[c] * tj[c];
            }
            for (int c = 0; c < len; ++c) db[c] += da[c];
            if (da_head && t < km1) memcpy(da_head + ((b * km1) + t) * C + c0, da, len * sizeof(float));
            if (doc >= 0) { /* the previous row belongs to another document: nothing flows back into it */
                memset(ring, 0, sizeof(ring));
                for (int c = 0; c < len; ++c) alpha_next[c] = 0.0f, u_next[c] = 0.0f;
            } else {
                if (km1 > 0) memcpy(ring[t % km1], da, len * sizeof(float));
                memcpy(alpha_next, alpha, len * sizeof(float));
                memcpy(u_next, u, len * sizeof(float));
            }
        }
        for (int j = 0; j < k; ++j) memcpy(dw_part + (b * k + j) * C + c0, dw[j], len * sizeof(float));
        memcpy(db_part + b * C + c0, db, len * sizeof(float));
    }
    return 0;
}
