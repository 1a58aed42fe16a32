/* lowbit bit-packed integer conv kernels (issue 18).

   Weight codes c (0..2^wbits-1) and activation codes u (0..2^abits-1) are stored as bit planes, 32
   channels per word (lb_packed.h). With m = a*c + b (the weight's integer form is affine in its code
   for every uniform level set: BWN {-1,1} = 2c-1, SAWB/DoReFa odd integers = 2c-(2^b-1), LSQ = c-2^(b-1),
   TWN = c-1) and k = u - zero:

     S = sum c*u = sum_i sum_j 2^(i+j) popcount(W_i & X_j)     (i, j: weight / activation bit planes)
     U = sum u   = sum_j 2^j popcount(X_j)
     A = sum m*k = a*S + b*U - zero*M,   M = a*sum c + b*n,   K = U - zero*n

   The padding ring of the activation planes holds code 0, so S and U over all KH*KW taps equal the
   in-bounds sums; n and sum c (needed only when zero != 0 or the M/K/n terms are used) are taken over
   the in-bounds taps. Channel bits beyond C are 0 in both operands. For 1-bit weights and activations
   this is the xnor-popcount of binary networks: with w, x in {0,1}, sum (2w-1)(2x-1) = n - 2*popcount(w ^ x),
   and sum (2w-1)*x = 2*popcount(w & x) - popcount(x), one AND and one popcount per 32 channels.
   All sums are exact int32, so the float epilogue sees the same integers as lb_conv_int and the output is
   bit-identical. Cortex-M4/M7/M33 have no popcount instruction: popcounts are SWAR (shift/mask/add). */
#include "lb_packed.h"

#define M1 0x55555555u
#define M2 0x33333333u
#define M4 0x0F0F0F0Fu

/* per-byte bit counts (each byte 0..8) */
static inline uint32_t lb_bytecount(uint32_t v)
{
    v = v - ((v >> 1) & M1);
    v = (v & M2) + ((v >> 2) & M2);
    return (v + (v >> 4)) & M4;
}

/* sum of the four bytes of v (any values 0..255) */
static inline uint32_t lb_bytesum(uint32_t v)
{
    v = (v & 0x00FF00FFu) + ((v >> 8) & 0x00FF00FFu);
    return (v + (v >> 16)) & 0xFFFFu;
}

static inline uint32_t lb_popcount(uint32_t v) { return (lb_bytecount(v) * 0x01010101u) >> 24; }

void lb_pk_pack_act(const lb_pk_geom *g, const uint8_t *u, uint32_t bits, uint32_t *xp)
{
    const int32_t NW = LB_PK_WORDS(g->C), Wp = g->W + 2 * g->PW, Hp = g->H + 2 * g->PH;
    const int32_t px = (int32_t)bits * NW, HW = g->H * g->W;
    int32_t i, c, y, x;
    uint32_t j;
    for (i = 0; i < Hp * Wp * px; i++) xp[i] = 0u;
    for (y = 0; y < g->H; y++)
        for (x = 0; x < g->W; x++) {
            uint32_t *d = xp + ((y + g->PH) * Wp + x + g->PW) * px;
            const uint8_t *s = u + y * g->W + x;
            for (c = 0; c < g->C; c++) {
                uint32_t v = s[c * HW], bit = 1u << (c & 31);
                uint32_t *dw = d + (c >> 5);
                for (j = 0; v; j++, v >>= 1)
                    if (v & 1u) dw[j * (uint32_t)NW] |= bit;
            }
        }
}

/* S of one output: weight planes wk of channel o, activation planes at the window's top-left pixel */
static int32_t lb_pk_dot(const lb_pk_geom *g, const uint32_t *xw, int32_t xrow, const uint32_t *wk,
                         uint32_t abits, uint32_t wbits, int32_t NW)
{
    const int32_t L = g->KW * NW; /* words of one kernel row, per plane */
    int32_t kh, t, s = 0;
    if (wbits == 1 && abits == 1) { /* xnor / AND-popcount: per-byte counts summed in lanes */
        for (kh = 0; kh < g->KH; kh++) {
            const uint32_t *xr = xw + kh * xrow, *wr = wk + kh * L;
            uint32_t lanes = 0; /* <= 8 per byte per word: flush every 31 words */
            for (t = 0; t < L; t++) {
                lanes += lb_bytecount(wr[t] & xr[t]);
                if ((t & 31) == 30) { s += (int32_t)lb_bytesum(lanes); lanes = 0; }
            }
            s += (int32_t)lb_bytesum(lanes);
        }
        return s;
    }
    if (wbits == 2 && abits == 2) { /* per word: c*u = w0x0 + 2(w0x1 + w1x0) + 4 w1x1 in byte lanes (<= 72) */
        for (kh = 0; kh < g->KH; kh++) {
            const uint32_t *xr = xw + kh * xrow, *wr = wk + kh * 2 * L;
            int32_t kw, n;
            for (kw = 0; kw < g->KW; kw++) {
                const uint32_t *x0 = xr + kw * 2 * NW, *w0 = wr + kw * 2 * NW;
                for (n = 0; n < NW; n++) {
                    uint32_t a0 = w0[n], a1 = w0[NW + n], b0 = x0[n], b1 = x0[NW + n];
                    uint32_t v = lb_bytecount(a0 & b0) + ((lb_bytecount(a0 & b1) + lb_bytecount(a1 & b0)) << 1)
                                 + (lb_bytecount(a1 & b1) << 2);
                    s += (int32_t)lb_bytesum(v);
                }
            }
        }
        return s;
    }
    for (kh = 0; kh < g->KH; kh++) { /* general bit-serial */
        const uint32_t *xr = xw + kh * xrow, *wr = wk + kh * (int32_t)wbits * L;
        int32_t kw, n;
        uint32_t i, j;
        for (kw = 0; kw < g->KW; kw++) {
            const uint32_t *xs = xr + kw * (int32_t)abits * NW, *ws = wr + kw * (int32_t)wbits * NW;
            for (n = 0; n < NW; n++)
                for (i = 0; i < wbits; i++)
                    for (j = 0; j < abits; j++)
                        s += (int32_t)(lb_popcount(ws[i * (uint32_t)NW + (uint32_t)n] & xs[j * (uint32_t)NW + (uint32_t)n]) << (i + j));
        }
    }
    return s;
}

void lb_pk_pixel(const lb_pk_geom *g, const uint32_t *xp, int32_t yb, uint32_t abits, int32_t zero, const uint32_t *wp,
                 uint32_t wbits, const int16_t *wa, const int16_t *wb, int32_t rows, int32_t oy, int32_t ox,
                 int need_m, int32_t *A, int32_t *M, int32_t *K, int32_t *n)
{
    const int32_t NW = LB_PK_WORDS(g->C), Wp = g->W + 2 * g->PW;
    const int32_t apx = (int32_t)abits * NW, xrow = Wp * apx;
    const int32_t wtap = (int32_t)wbits * NW, wout = g->KH * g->KW * wtap;
    const int32_t y0 = oy * g->SH - g->PH, x0 = ox * g->SW - g->PW;
    const int32_t kh0 = y0 < 0 ? -y0 : 0, kh1 = g->H - y0 < g->KH ? g->H - y0 : g->KH;
    const int32_t kw0 = x0 < 0 ? -x0 : 0, kw1 = g->W - x0 < g->KW ? g->W - x0 : g->KW;
    const uint32_t *xw = xp + ((oy * g->SH - yb) * Wp + ox * g->SW) * apx; /* padded coordinates, from row yb */
    const int32_t cnt = g->C * (kh1 - kh0) * (kw1 - kw0);
    int32_t o, kh, kw, w, U = 0;
    need_m = need_m || zero != 0;
    /* U = sum u over the window (the padding ring adds 0) */
    for (kh = 0; kh < g->KH; kh++)
        for (kw = 0; kw < g->KW; kw++) {
            const uint32_t *xs = xw + kh * xrow + kw * apx;
            uint32_t j;
            for (j = 0; j < abits; j++)
                for (w = 0; w < NW; w++) U += (int32_t)(lb_popcount(xs[j * (uint32_t)NW + (uint32_t)w]) << j);
        }
    *n = cnt;
    *K = U - zero * cnt;
    for (o = 0; o < g->O; o++) {
        const int32_t r = rows > 1 ? o : 0, a = wa[r], b = wb[r];
        const uint32_t *wk = wp + o * wout;
        const int32_t S = lb_pk_dot(g, xw, xrow, wk, abits, wbits, NW);
        int32_t ms = 0;
        if (need_m) { /* M = a * sum c + b * n over the in-bounds taps */
            int32_t csum = 0;
            uint32_t i;
            for (kh = kh0; kh < kh1; kh++)
                for (kw = kw0; kw < kw1; kw++)
                    for (i = 0; i < wbits; i++)
                        for (w = 0; w < NW; w++)
                            csum += (int32_t)(lb_popcount(wk[(kh * g->KW + kw) * wtap + (int32_t)i * NW + w]) << i);
            ms = a * csum + b * cnt;
            M[o] = ms;
        }
        A[o] = a * S + b * U - zero * ms;
    }
}

void lb_pk_conv(const lb_pk_geom *g, const uint32_t *xp, uint32_t abits, int32_t zero, const uint32_t *wp,
                uint32_t wbits, const int16_t *wa, const int16_t *wb, int32_t rows, const float *ca,
                const float *cb, const float *cc, const float *cd, const float *bias, float *y, int32_t *acc)
{
    const int32_t OHW = g->OH * g->OW;
    int32_t *ms = acc + g->O;
    int32_t o, oy, ox, ks, cnt;
    for (oy = 0; oy < g->OH; oy++)
        for (ox = 0; ox < g->OW; ox++) {
            lb_pk_pixel(g, xp, 0, abits, zero, wp, wbits, wa, wb, rows, oy, ox, cb != 0, acc, ms, &ks, &cnt);
            for (o = 0; o < g->O; o++) {
                float t = (float)acc[o] * ca[o];
                if (cb) t = t + (float)ms[o] * cb[o];
                if (cc) t = t + (float)ks * cc[o];
                if (cd) t = t + (float)cnt * cd[o];
                t = t + bias[o];
                y[o * OHW + oy * g->OW + ox] = t;
            }
        }
}
