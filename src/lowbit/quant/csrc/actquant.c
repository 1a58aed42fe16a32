/* lowbit: single-pass activation fake-quantization kernels (training forward and backward).
 *
 * Built by lowbit/quant/native.py with the system C compiler on first use and loaded with ctypes;
 * the Python side (lowbit.quant.functional, lowbit.methods.mixture) documents what each kernel
 * replaces. Every kernel reads its inputs once and writes its outputs once.
 *
 * Forward values are bit-identical to the eager PyTorch kernels: the same IEEE float32
 * operations in the same order (clamp, subtract the low end, true division by the step, round
 * half to even, multiply, add the low end; a mixture's weighted sum as q0*c0 then fused
 * multiply-adds, as torch's add_(q, alpha=c)). Compile with -ffp-contract=off: only the fmaf()
 * written here may fuse. Scalar gradients (sums over the tensor) are accumulated in double,
 * per thread over a fixed partition, and added in thread order: deterministic for a given
 * thread count, and at least as accurate as torch's float32 sums.
 *
 * -fno-math-errno and -fno-trapping-math let gcc vectorise rintf/floorf and the compare loops;
 * they change no result (nothing here reads errno or the floating-point exception flags).
 *
 * NaN inputs propagate as in torch: clamp keeps NaN, the masks follow aten's comparisons.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAXK 8
#define MAXT 64

/* the thread count a kernel uses: 1..MAXT (the per-thread partial sums are MAXT long) */
static int threads(int n) { return n < 1 ? 1 : (n > MAXT ? MAXT : n); }

/* the part [*b, *e) of n elements that thread t of nt takes (a fixed static partition, 64-aligned) */
static void part(int64_t n, int t, int nt, int64_t *b, int64_t *e) {
    int64_t per = (n + nt - 1) / nt;
    per = (per + 63) & ~(int64_t)63;
    *b = per * t < n ? per * t : n;
    *e = per * (t + 1) < n ? per * (t + 1) : n;
}

/* sum over i in [bb, ee) of EXPR(i) as a float, vectorised: an OpenMP SIMD reduction (the
 * compiler may add the terms in lanes; the order is fixed for a given build) */
#define LANE_SUM(dst, bb, ee, EXPR)                                                          \
    do {                                                                                     \
        float s_ = 0.0f;                                                                     \
        _Pragma("omp simd reduction(+:s_)")                                                  \
        for (int64_t i = (bb); i < (ee); i++) s_ += (EXPR);                                  \
        (dst) = s_;                                                                          \
    } while (0)

/* max over i in [bb, ee) of |x[i]| into dst (NaN ignored, as fmaxf) */
#define ABS_MAX(dst, x, bb, ee)                                                              \
    do {                                                                                     \
        float m_ = (dst);                                                                    \
        _Pragma("omp simd reduction(max:m_)")                                                \
        for (int64_t i = (bb); i < (ee); i++) { float v_ = fabsf((x)[i]); m_ = v_ > m_ ? v_ : m_; }               \
        (dst) = m_;                                                                          \
    } while (0)

static inline float clampf(float v, float lo, float hi) {
    /* torch.clamp: NaN stays NaN */
    return v < lo ? lo : (v > hi ? hi : v);
}

static inline float q_clip(float v, float lo, float hi, float step, int lo_nz) {
    float t = clampf(v, lo, hi);
    if (lo_nz) t = t - lo;
    t = rintf(t / step) * step;
    if (lo_nz) t = t + lo;
    return t;
}

static inline float sq_err_scaled(float x, float s, float h) {
    float v = x * s;
    float d = (v - floorf(clampf(v, -h, h))) - 0.5f;
    return d * d;
}

/* out = sum_k c_k * Q_k(x), Q_k(x) = lo_k + round((clamp(x, lo_k, hi_k) - lo_k)/step_k)*step_k.
 * plain != 0 (K = 1): out = Q_1(x), no multiplication. K and whether some lo_k != 0 (NZ) are
 * compile-time constants in each specialisation, so that the loop has no branch and vectorises. */
#define MIX_FWD_BODY(K, NZ, PLAIN)                                                           \
    for (int64_t i = b; i < e; i++) {                                                        \
        float v = x[i];                                                                      \
        float acc = q_clip(v, lo[0], hi[0], step[0], NZ);                                    \
        if (!(PLAIN)) acc = acc * c[0];                                                      \
        for (int k = 1; k < (K); k++)                                                        \
            acc = fmaf(q_clip(v, lo[k], hi[k], step[k], NZ), c[k], acc);                     \
        out[i] = acc;                                                                        \
    }

#define MIX_FWD_CASES(NZ)                                                                    \
    switch (K) {                                                                             \
    case 1: if (plain) { MIX_FWD_BODY(1, NZ, 1) } else { MIX_FWD_BODY(1, NZ, 0) } break;    \
    case 2: MIX_FWD_BODY(2, NZ, 0) break;                                                    \
    case 3: MIX_FWD_BODY(3, NZ, 0) break;                                                    \
    case 4: MIX_FWD_BODY(4, NZ, 0) break;                                                    \
    default: MIX_FWD_BODY(K, NZ, 0) break;                                                   \
    }

void lb_mix_fwd(const float *x, float *out, int64_t n, int K, const float *lo_, const float *hi_,
                const float *step_, const float *c_, int plain, int nthreads) {
    float lo[MAXK], hi[MAXK], step[MAXK], c[MAXK];
    int lo_nz = 0;
    for (int k = 0; k < K; k++) {
        lo[k] = lo_[k]; hi[k] = hi_[k]; step[k] = step_[k]; c[k] = c_[k];
        lo_nz |= lo[k] != 0.0f;
    }
    nthreads = threads(nthreads);
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
    for (int t = 0; t < nthreads; t++) {
        int64_t b, e;
        part(n, t, nthreads, &b, &e);
        if (lo_nz) { MIX_FWD_CASES(1) } else { MIX_FWD_CASES(0) }
    }
}

/* Backward of lb_mix_fwd, one pass over memory.
 *   gx   = sum_r w_r * (g * 1[glo_r <= x <= ghi_r])   over G clip ranges r (members with equal
 *          ranges merged by the caller; the first term as g*w_0, the next as fmaf, as eager does)
 *   gc_k = sum g * Q_k(x)           (want_gc)
 *   ab_k = sum g * 1[!(x <= hi_k)]  (want_above; PACT's clip gradient, times c_k by the caller)
 * gx may be NULL (no input gradient wanted).
 *
 * The tensor is taken in blocks of 1024 elements (8 KiB of g and x, which stay in L1 while the
 * loops below run over the block, each of which vectorises); block sums are float, added in
 * double. The mask in ab_k is a multiplication by 0/1, not a select: gcc 12.2 -O3
 * miscompiles a select summed in such a loop (if-conversion of a reduction); the load-time
 * self-check in native.py is there to catch such things. */
#define GX_BODY(G)                                                                           \
    for (int64_t i = bb; i < ee; i++) {                                                      \
        float v = x[i], gi = g[i];                                                           \
        float p = ((v >= glo[0]) & (v <= ghi[0])) ? gi : 0.0f;                                  \
        float acc = plain ? p : p * w[0];                                                    \
        for (int r = 1; r < (G); r++)                                                        \
            acc = fmaf(((v >= glo[r]) & (v <= ghi[r])) ? gi : 0.0f, w[r], acc);                  \
        gx[i] = acc;                                                                         \
    }

/* three members' coefficient sums (and clip sums when AB) over the block in one vectorised pass */
#define SUMS3(NZ, AB)                                                                        \
    {                                                                                        \
        float c0 = 0.0f, c1 = 0.0f, c2 = 0.0f, a0 = 0.0f, a1 = 0.0f, a2 = 0.0f;              \
        _Pragma("omp simd reduction(+:c0,c1,c2,a0,a1,a2)")                                   \
        for (int64_t i = bb; i < ee; i++) {                                                  \
            float v = x[i], gi = g[i];                                                       \
            c0 += gi * q_clip(v, lo[0], hi[0], step[0], NZ);                                 \
            c1 += gi * q_clip(v, lo[1], hi[1], step[1], NZ);                                 \
            c2 += gi * q_clip(v, lo[2], hi[2], step[2], NZ);                                 \
            if (AB) {                                                                        \
                a0 += gi * (float)!(v <= hi[0]);                                             \
                a1 += gi * (float)!(v <= hi[1]);                                             \
                a2 += gi * (float)!(v <= hi[2]);                                             \
            }                                                                                \
        }                                                                                    \
        pc[t][0] += c0; pc[t][1] += c1; pc[t][2] += c2;                                      \
        pa[t][0] += a0; pa[t][1] += a1; pa[t][2] += a2;                                      \
    }

void lb_mix_bwd(const float *g, const float *x, float *gx, int64_t n, int K, const float *lo_,
                const float *hi_, const float *step_, int G, const float *glo_, const float *ghi_,
                const float *w_, int plain, int want_gc, int want_above, double *gc, double *above,
                int nthreads) {
    float lo[MAXK], hi[MAXK], step[MAXK], glo[MAXK], ghi[MAXK], w[MAXK];
    int lo_nz = 0;
    for (int k = 0; k < K; k++) {
        lo[k] = lo_[k]; hi[k] = hi_[k]; step[k] = step_[k];
        lo_nz |= lo[k] != 0.0f;
    }
    for (int r = 0; r < G; r++) { glo[r] = glo_[r]; ghi[r] = ghi_[r]; w[r] = w_[r]; }
    nthreads = threads(nthreads);
    double pc[MAXT][MAXK], pa[MAXT][MAXK];
    memset(pc, 0, sizeof pc);
    memset(pa, 0, sizeof pa);
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
    for (int t = 0; t < nthreads; t++) {
        int64_t b, e;
        part(n, t, nthreads, &b, &e);
        for (int64_t bb = b; bb < e; bb += 1024) {
            int64_t ee = bb + 1024 < e ? bb + 1024 : e;
            if (gx) {
                switch (G) {
                case 1: GX_BODY(1) break;
                case 2: GX_BODY(2) break;
                case 3: GX_BODY(3) break;
                default: GX_BODY(G) break;
                }
            }
            if (K == 3 && want_gc) { /* DQA's 2/4/8 members: the six sums in one pass */
                if (lo_nz) { SUMS3(1, want_above) } else { SUMS3(0, want_above) }
                continue;
            }
            for (int k = 0; k < K; k++) {
                float fc = 0.0f, fa = 0.0f, lk = lo[k], hk = hi[k], sk = step[k];
                if (want_gc) {
                    if (lo_nz) LANE_SUM(fc, bb, ee, g[i] * q_clip(x[i], lk, hk, sk, 1));
                    else LANE_SUM(fc, bb, ee, g[i] * q_clip(x[i], lk, hk, sk, 0));
                }
                if (want_above) LANE_SUM(fa, bb, ee, g[i] * (float)!(x[i] <= hk));
                pc[t][k] += fc;
                pa[t][k] += fa;
            }
        }
    }
    for (int k = 0; k < K; k++) {
        double sc = 0.0, sa = 0.0;
        for (int t = 0; t < nthreads; t++) { sc += pc[t][k]; sa += pa[t][k]; }
        if (gc) gc[k] = sc;
        if (above) above[k] = sa;
    }
}

/* LSQ (Esser et al. 2020) with a per-tensor step s: q = round(clamp(v*inv, qmin, qp)) * s, qmin = -Qn
 * as the caller computes it (+0.0 for Qn = 0: the sign of a clamped zero follows torch's). */
void lb_lsq_fwd(const float *v, float *q, int64_t n, float inv, float s, float qmin, float qp, int nthreads) {
    nthreads = threads(nthreads);
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
    for (int t = 0; t < nthreads; t++) {
        int64_t b, e;
        part(n, t, nthreads, &b, &e);
        for (int64_t i = b; i < e; i++) q[i] = rintf(clampf(v[i] * inv, qmin, qp)) * s;
    }
}

/* LSQ backward, one pass: gv = g * 1[lo < v < hi] (aten's hardtanh_backward), and
 * sums[0] = sum g*q, sums[1] = sum gv*v (the step gradient is (sums[0] - sums[1]) / s). */
void lb_lsq_bwd(const float *g, const float *v, float *gv, int64_t n, float inv, float s, float qmin, float qp,
                float lo, float hi, int want_gs, double *sums, int nthreads) {
    nthreads = threads(nthreads);
    double p0[MAXT], p1[MAXT];
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
    for (int t = 0; t < nthreads; t++) {
        int64_t b, e;
        part(n, t, nthreads, &b, &e);
        double s0 = 0.0, s1 = 0.0;
        for (int64_t bb = b; bb < e; bb += 1024) {
            int64_t ee = bb + 1024 < e ? bb + 1024 : e;
            for (int64_t i = bb; i < ee; i++) {
                float vi = v[i];
                gv[i] = (vi > lo && vi < hi) ? g[i] : 0.0f;
            }
            float f0 = 0.0f, f1 = 0.0f;
            if (want_gs) {
                LANE_SUM(f0, bb, ee, g[i] * (rintf(clampf(v[i] * inv, qmin, qp)) * s));
                LANE_SUM(f1, bb, ee, gv[i] * v[i]);
            }
            s0 += f0;
            s1 += f1;
        }
        p0[t] = s0;
        p1[t] = s1;
    }
    double s0 = 0.0, s1 = 0.0;
    for (int t = 0; t < nthreads; t++) { s0 += p0[t]; s1 += p1[t]; }
    sums[0] = s0;
    sums[1] = s1;
}

/* one row's sum of squared errors for one alpha (see lb_sq_err_sums) */
static float sq_err_row(const float *x, int64_t N, float a, float half_n) {
    const float s = half_n / a, h = half_n;
    double acc = 0.0;
    for (int64_t bb = 0; bb < N; bb += 1024) {
        int64_t ee = bb + 1024 < N ? bb + 1024 : N;
        float f;
        LANE_SUM(f, bb, ee, sq_err_scaled(x[i], s, h));
        acc += f;
    }
    return (float)acc / (s * s);
}

/* SAWB's MSE search (003 eq. 12; lowbit.quant.uniform._sq_err_sums): for R rows of N weights and C
 * candidate alphas per row, out[r*C + c] = sum_i (v_i - Q(v_i))^2 / s^2 with s = (n/2)/alpha,
 * v = x*s, Q(v) = floor(clamp(v, -h, h)) + 1/2, h = n/2 (the levels of the symmetric n-step grid
 * in the scaled space). The same float32 operations per element as the torch version; the sum is
 * a vectorised float sum per 1024-element block, added in double (torch's vecdot sums in another
 * order). */
void lb_sq_err_sums(const float *rows, int64_t R, int64_t N, const float *alpha, int64_t C, float half_n,
                    float *out, int nthreads) {
    nthreads = threads(nthreads);
#pragma omp parallel for num_threads(nthreads) schedule(static) collapse(2)
    for (int64_t r = 0; r < R; r++) {
        for (int64_t c = 0; c < C; c++) out[r * C + c] = sq_err_row(rows + r * N, N, alpha[r * C + c], half_n);
    }
}

/* SAWB's coarse-to-fine search for argmin_alpha of the MSE per row (lowbit.quant.uniform.
 * _mse_alpha_rows, the same float32 steps): alpha = amax*k/grid, k = 1..grid, then `refine`
 * rounds of best + d*{-3,-2,-1,1,2,3} with d divided by 4 each round (candidates outside
 * (0, amax] replaced by the best), the first minimum winning ties, a round's winner kept only if
 * strictly better. Errors as lb_sq_err_sums. */
void lb_mse_alpha_rows(const float *rows, int64_t R, int64_t N, float half_n, int grid, int refine, float eps,
                       float *out, int nthreads) {
    nthreads = threads(nthreads);
    static const float off[6] = {-3.0f, -2.0f, -1.0f, 1.0f, 2.0f, 3.0f};
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < R; r++) {
        const float *x = rows + r * N;
        float amax = 0.0f;
        ABS_MAX(amax, x, 0, N);
        amax = amax < eps ? eps : amax;
        float best = 0.0f, best_err = 0.0f;
        for (int k = 0; k < grid; k++) {
            float c = amax * ((float)(k + 1) / (float)grid);
            float e = sq_err_row(x, N, c, half_n);
            if (k == 0 || e < best_err) { best_err = e; best = c; }
        }
        float d = amax / (float)grid;
        for (int round = 0; round < refine; round++) {
            d = d / 4.0f;
            float rb = 0.0f, re = 0.0f;
            for (int j = 0; j < 6; j++) {
                float c = best + d * off[j];
                if (!(c > 0.0f && c <= amax)) c = best;
                float e = sq_err_row(x, N, c, half_n);
                if (j == 0 || e < re) { re = e; rb = c; }
            }
            if (re < best_err) { best_err = re; best = rb; }
        }
        out[r] = best;
    }
}

static inline float sq_err_direct(float x, float a, float step) {
    /* lowbit.quant.uniform._sym_mse's element: clamp(x,-a,a) + a, / step, round, * step, - a; minus x, squared */
    float q = (rintf((clampf(x, -a, a) + a) / step) * step) - a;
    float d = q - x;
    return d * d;
}

/* SAWB's closed form per row (SAWBQuantizer.alpha at 2-4 bits, Choi et al. 2018):
 * alpha = c1*sqrt(E[x^2]) + c2*E|x|, bad = alpha <= 0, and with check_max also
 * bad |= MSE(max(alpha, eps)) > MSE(max|x|) on the symmetric n-step grid (_sym_mse). One pass for
 * the moments, one for the two MSEs; sums in double. */
void lb_sawb_closed(const float *rows, int64_t R, int64_t N, float c1, float c2, float n, int check_max, float eps,
                    float *alpha, uint8_t *bad, int nthreads) {
    nthreads = threads(nthreads);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < R; r++) {
        const float *x = rows + r * N;
        double s2 = 0.0, s1 = 0.0;
        float amax = 0.0f;
        for (int64_t bb = 0; bb < N; bb += 1024) {
            int64_t ee = bb + 1024 < N ? bb + 1024 : N;
            float f2, f1;
            LANE_SUM(f2, bb, ee, x[i] * x[i]);
            LANE_SUM(f1, bb, ee, fabsf(x[i]));
            s2 += f2;
            s1 += f1;
            ABS_MAX(amax, x, bb, ee);
        }
        float a = c1 * sqrtf((float)s2 / (float)N) + c2 * ((float)s1 / (float)N);
        int b = !(a > 0.0f);
        if (check_max && !b) {
            float a1 = a < eps ? eps : a, st1 = (2.0f * a1) / n, st2 = (2.0f * amax) / n;
            double e1 = 0.0, e2 = 0.0;
            for (int64_t bb = 0; bb < N; bb += 1024) {
                int64_t ee = bb + 1024 < N ? bb + 1024 : N;
                float f1, f2;
                LANE_SUM(f1, bb, ee, sq_err_direct(x[i], a1, st1));
                LANE_SUM(f2, bb, ee, sq_err_direct(x[i], amax, st2));
                e1 += f1;
                e2 += f2;
            }
            b = (float)e1 / (float)N > (float)e2 / (float)N;
        }
        alpha[r] = a;
        bad[r] = (uint8_t)b;
    }
}
