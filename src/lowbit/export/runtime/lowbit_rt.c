/* lowbit integer runtime: kernels (see lowbit_rt.h for the contract of every function). */
#include <math.h>
#include <string.h>

#include "lowbit_rt.h"

/* -ffast-math lets the compiler turn lb_quantize_input's x / step into x * (1 / step), which moves input codes at
 * rounding ties (wrong logits, found in session 24). Build this file without it (and without
 * -funsafe-math-optimizations / -freciprocal-math, which define no macro to test), or define LB_ALLOW_FAST_MATH
 * where only lowbit_predict_codes / lowbit_predict_pixels are called (no float input). */
#if defined(__FAST_MATH__) && !defined(LB_ALLOW_FAST_MATH)
#error "lowbit_rt.c: build without -ffast-math (it changes the float input's codes; see the comment above)"
#endif

/* Cortex-M4/M7/M33 (the DSP extension), little-endian (the loops read 4 codes and 2 int16 weights per word): two
 * 16-bit multiply-accumulates per instruction in lb_conv's 3-wide and pointwise loops. The same integers as the
 * portable loops (the sums are exact int32 either way). A big-endian core runs the portable loops. */
#if defined(__ARM_FEATURE_DSP) && defined(__ARM_FEATURE_SIMD32) && defined(__GNUC__) && !defined(LB_NO_DSP) && \
    !defined(__ARM_BIG_ENDIAN)
#include <arm_acle.h>
#define LB_DSP 1
#else
#define LB_DSP 0
#endif

/* v / 2^s rounded half to even, 64-bit (s 0 .. 62) */
static int64_t lb_rne_shift64(int64_t v, int32_t s)
{
    int64_t f, rem, half;
    if (s <= 0) return v;
    f = v >> s; /* floor (arithmetic shift) */
    rem = v - f * ((int64_t)1 << s);
    half = (int64_t)1 << (s - 1);
    return f + (rem > half || (rem == half && (f & 1)));
}

/* the number of significant bits of a */
static int32_t lb_bitlen64(uint64_t a)
{
#if defined(__GNUC__)
    return a ? 64 - __builtin_clzll(a) : 0; /* CLZ */
#else
    int32_t n = 0;
    if (a >> 32) { a >>= 32; n += 32; }
    if (a >> 16) { a >>= 16; n += 16; }
    if (a >> 8) { a >>= 8; n += 8; }
    if (a >> 4) { a >>= 4; n += 4; }
    if (a >> 2) { a >>= 2; n += 2; }
    if (a >> 1) { a >>= 1; n += 1; }
    return n + (int32_t)a;
#endif
}

/* v rounded to 24 significant bits, half to even: the value a float32 holds for the integer v */
static int64_t lb_round24(int64_t v)
{
    const uint64_t a = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    int32_t s;
    if (a < ((uint64_t)1 << 24)) return v; /* every integer below 2^24 is a float32 (most accumulators) */
    s = lb_bitlen64(a) - 24;
    return s > 0 ? lb_rne_shift64(v, s) * ((int64_t)1 << s) : v;
}

/* v / 2^s rounded half to even, 32-bit (s 0 .. 31) */
static int32_t lb_rne_shift32(int32_t v, int32_t s)
{
    int32_t f, rem, half;
    if (s <= 0) return v;
    if (s > 30) return 0; /* |v| <= 2^25 here: below half of 2^s */
    f = v >> s; /* floor (arithmetic shift) */
    rem = v - f * (1 << s);
    half = 1 << (s - 1);
    return f + (rem > half || (rem == half && (f & 1)));
}

#if defined(__GNUC__)
#define LB_INLINE static inline __attribute__((always_inline))
#else
#define LB_INLINE static inline
#endif

/* Thumb-1 cores: ARMv6-M (Cortex-M0/M0+/M1) and ARMv8-M Baseline (M23). Eight registers for most instructions, no
 * multiply-accumulate, no 32x32->64 multiply and no CLZ. -DLB_THUMB1=1 builds their code paths anywhere (the host
 * tests do), =0 turns them off. */
#ifndef LB_THUMB1
#if defined(__ARM_ARCH_6M__) || defined(__ARM_ARCH_8M_BASE__)
#define LB_THUMB1 1
#else
#define LB_THUMB1 0
#endif
#endif

/* On Thumb-1 the 64-bit product and bit length of lb_requantize's common case are libgcc calls (__aeabi_lmul,
 * __clzdi2); with LB_REQUANT32 the same integers come from four 12x12-bit products in 32-bit registers. */
#ifndef LB_REQUANT32
#define LB_REQUANT32 LB_THUMB1
#endif

#if LB_REQUANT32
/* the number of significant bits of a (a < 2^24), without CLZ */
LB_INLINE int32_t lb_bitlen24(uint32_t a)
{
    int32_t n = 0;
    if (a >> 12) { a >>= 12; n = 12; }
    if (a >> 6) { a >>= 6; n += 6; }
    if (a >> 3) { a >>= 3; n += 3; }
    if (a >> 2) { a >>= 2; n += 2; }
    if (a >> 1) { a >>= 1; n += 1; }
    return n + (int32_t)a;
}

/* lb_requantize_inline's common case (|x| < 2^24, |m| < 2^24, m = mult / 128), 32-bit operations only: the
 * magnitudes' product p = H * 2^24 + L (H < 2^24, L < 2^24) from 12-bit halves, rounded to 24 significant bits
 * (q * 2^s), then by 2^t with t = 24 - shift; every rounding is half to even, so symmetric: the sign goes last */
LB_INLINE int32_t lb_requant32(int32_t x, int32_t m, int32_t shift)
{
    const uint32_t a = x < 0 ? (uint32_t)0 - (uint32_t)x : (uint32_t)x;
    const uint32_t b = m < 0 ? (uint32_t)0 - (uint32_t)m : (uint32_t)m;
    const uint32_t ah = a >> 12, al = a & 0xFFFu, bh = b >> 12, bl = b & 0xFFFu;
    const uint32_t mid = ah * bl + al * bh;                 /* < 2^25 */
    const uint32_t low = ((mid & 0xFFFu) << 12) + al * bl;  /* < 2^25 */
    const uint32_t H = ah * bh + (mid >> 12) + (low >> 24), L = low & 0xFFFFFFu;
    const int32_t t = 24 - shift, s = H ? lb_bitlen24(H) : 0;
    uint32_t q = L;
    int32_t r;
    if (s) { /* p has 24 + s bits: drop s of them, half to even */
        const uint32_t rem = L & ((1u << s) - 1u), half = 1u << (s - 1);
        q = (H << (24 - s)) | (L >> s);
        q += rem > half || (rem == half && (q & 1u));
    }
    r = s >= t ? (int32_t)q * (1 << (s - t)) : lb_rne_shift32((int32_t)q, t - s);
    return (x < 0) != (m < 0) ? -r : r;
}
#endif

LB_INLINE int32_t lb_requantize_inline(int32_t x, int32_t mult, int32_t shift)
{
    /* f32(x) * f32(mult): each has 24 significant bits, the exact product is below 2^62 */
    if ((mult & 127) == 0 && x > -(1 << 24) && x < (1 << 24)) {
        /* the common case, with one 64-bit product and otherwise 32-bit steps: x is a float32 and mult =
           m * 2^7 with |m| < 2^24 (quantize_multiplier's multipliers), so f32(x) * f32(mult) = p * 2^7 with
           p = x * m exact below 2^48, and the result is rne(round24(p) / 2^t), t = 31 - shift - 7 */
#if LB_REQUANT32
        return lb_requant32(x, mult / 128, shift);
#else
        const int64_t p = (int64_t)x * (int64_t)(mult / 128);
        const uint64_t a = p < 0 ? (uint64_t)0 - (uint64_t)p : (uint64_t)p;
        const int32_t t = 24 - shift, s = a < ((uint64_t)1 << 24) ? 0 : lb_bitlen64(a) - 24;
        const int32_t q = (int32_t)lb_rne_shift64(p, s); /* round24(p) = q * 2^s, |q| <= 2^24 */
        return s >= t ? q * (1 << (s - t)) : lb_rne_shift32(q, t - s);
#endif
    } else {
        const int64_t m = (mult & 127) ? lb_round24(mult) : (int64_t)mult;
        const int64_t p = lb_round24(lb_round24(x) * m);
        return (int32_t)lb_rne_shift64(p, 31 - shift); /* shift <= 30: 1 .. 62 */
    }
}

int32_t lb_requantize(int32_t x, int32_t mult, int32_t shift) { return lb_requantize_inline(x, mult, shift); }

uint32_t lb_packed_bytes(uint32_t n, uint32_t bits) { return (n * bits + 7u) >> 3; }

uint32_t lb_get(const uint8_t *buf, uint32_t idx, uint32_t bits) { return lb_get_inline(buf, idx, bits); }

LB_INLINE void lb_put_inline(uint8_t *buf, uint32_t idx, uint32_t bits, uint32_t v)
{
    uint32_t bit = idx * bits, byte = bit >> 3, sh = bit & 7u;
    if (bits == 8u) {
        buf[idx] = (uint8_t)v;
        return;
    }
    buf[byte] |= (uint8_t)(v << sh);
    if (sh + bits > 8u) buf[byte + 1] |= (uint8_t)(v >> (8u - sh));
}

void lb_put(uint8_t *buf, uint32_t idx, uint32_t bits, uint32_t v) { lb_put_inline(buf, idx, bits, v); }

/* codes idx .. idx + n - 1 of a packed stream (bits < 8), one byte each (lut NULL) or through the int16 table lut
 * (to16): lb_get_inline's values, read as a stream (each byte loaded once, the codes shifted out of a register),
 * without reading a byte past the last code's */
LB_INLINE void lb_unpack_run(const uint8_t *buf, uint32_t idx, uint32_t n, uint32_t bits, uint8_t *to8,
                             const int16_t *lut, int16_t *to16)
{
    const uint32_t bit = idx * bits, mask = (1u << bits) - 1u;
    const uint8_t *q = buf + (bit >> 3);
    uint32_t acc = (uint32_t)*q++ >> (bit & 7u), have = 8u - (bit & 7u), i;
    for (i = 0; i < n; i++) {
        if (have < bits) {
            acc |= (uint32_t)*q++ << have;
            have += 8u;
        }
        if (lut)
            to16[i] = lut[acc & mask];
        else
            to8[i] = (uint8_t)(acc & mask);
        acc >>= bits;
        have -= bits;
    }
}

static int32_t lb_clamp(int32_t v, int32_t lo, int32_t hi) { return v < lo ? lo : v > hi ? hi : v; }

int32_t lb_rne_shift(int32_t v, int32_t s) { return (int32_t)lb_rne_shift64(v, s); }

/* w[0..2] * (a[0..2] - z): one 3-wide row of a window */
#define LB_ROW3(w, a, z) ((int32_t)(w)[0] * ((int32_t)(a)[0] - (z)) + (int32_t)(w)[1] * ((int32_t)(a)[1] - (z)) + \
                          (int32_t)(w)[2] * ((int32_t)(a)[2] - (z)))

/* sum over every tap of w * (u - z) for the output whose window starts at ur and, when ur2 is not NULL,
 * for the one at ur2 (two outputs share each weight load); inlined with z = 0 for inputs after a ReLU */
LB_INLINE void lb_taps(const int16_t *wk, const uint8_t *ur, const uint8_t *ur2, int32_t cin_g, int32_t KH,
                       int32_t KW, int32_t W, int32_t HWin, int32_t z, int32_t *a0, int32_t *a1)
{
    int32_t c, kh, kw, s0 = 0, s1 = 0;
    if (KH == 1 && KW == 1) { /* pointwise: one tap per channel */
        if (ur2)
            for (c = 0; c < cin_g; c++, ur += HWin, ur2 += HWin) {
                const int32_t w = wk[c];
                s0 += w * ((int32_t)*ur - z);
                s1 += w * ((int32_t)*ur2 - z);
            }
        else
            for (c = 0; c < cin_g; c++, ur += HWin) s0 += (int32_t)wk[c] * ((int32_t)*ur - z);
    } else if (ur2 == ur + 1 && KW == 3) { /* stride 1: the two windows share two of each row's three codes */
        for (c = 0; c < cin_g; c++, ur += HWin - KH * W)
            for (kh = 0; kh < KH; kh++, ur += W, wk += 3) {
                const int32_t w0 = wk[0], w1 = wk[1], w2 = wk[2];
                int32_t t = (int32_t)ur[0] - z;
                s0 += w0 * t;
                t = (int32_t)ur[1] - z;
                s0 += w1 * t;
                s1 += w0 * t;
                t = (int32_t)ur[2] - z;
                s0 += w2 * t;
                s1 += w1 * t;
                t = (int32_t)ur[3] - z;
                s1 += w2 * t;
            }
    } else if (ur2 && KW == 3 && KH == 3 && !LB_THUMB1) { /* 3x3 windows unrolled (Thumb-1 spills its 18 values) */
        for (c = 0; c < cin_g; c++, ur += HWin, ur2 += HWin, wk += 9) {
            s0 += LB_ROW3(wk, ur, z) + LB_ROW3(wk + 3, ur + W, z) + LB_ROW3(wk + 6, ur + 2 * W, z);
            s1 += LB_ROW3(wk, ur2, z) + LB_ROW3(wk + 3, ur2 + W, z) + LB_ROW3(wk + 6, ur2 + 2 * W, z);
        }
    } else if (ur2 && KW == 3) { /* 3-wide rows unrolled */
        for (c = 0; c < cin_g; c++, ur += HWin - KH * W, ur2 += HWin - KH * W)
            for (kh = 0; kh < KH; kh++, ur += W, ur2 += W, wk += 3) {
                s0 += LB_ROW3(wk, ur, z);
                s1 += LB_ROW3(wk, ur2, z);
            }
    } else if (ur2) {
        for (c = 0; c < cin_g; c++, ur += HWin - KH * W, ur2 += HWin - KH * W)
            for (kh = 0; kh < KH; kh++, ur += W, ur2 += W)
                for (kw = 0; kw < KW; kw++) {
                    const int32_t w = *wk++;
                    s0 += w * ((int32_t)ur[kw] - z);
                    s1 += w * ((int32_t)ur2[kw] - z);
                }
    } else {
        for (c = 0; c < cin_g; c++, ur += HWin - KH * W)
            for (kh = 0; kh < KH; kh++, ur += W)
                for (kw = 0; kw < KW; kw++) s0 += (int32_t)*wk++ * ((int32_t)ur[kw] - z);
    }
    *a0 = s0;
    *a1 = s1;
}

#if !LB_DSP
/* pointwise, four neighbouring outputs (stride 1; the portable twin of lb_taps1x4_dsp): sums of w * (code - z), one
 * weight load for four products; inlined with z = 0 for inputs after a ReLU */
LB_INLINE void lb_taps1x4(const int16_t *wk, const uint8_t *ur, int32_t cin_g, int32_t HWin, int32_t z, int32_t *a)
{
    int32_t c, s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (c = 0; c < cin_g; c++, ur += HWin) {
        const int32_t w = wk[c];
        s0 += w * ((int32_t)ur[0] - z);
        s1 += w * ((int32_t)ur[1] - z);
        s2 += w * ((int32_t)ur[2] - z);
        s3 += w * ((int32_t)ur[3] - z);
    }
    a[0] = s0;
    a[1] = s1;
    a[2] = s2;
    a[3] = s3;
}
#endif

void lb_conv_out(const lb_conv_t *p, int32_t o, int32_t at, int32_t acc, const uint8_t *res, void *out)
{
    const uint32_t ob = p->out_bits, rb = p->res_bits;
    acc += p->bias[o];
    if (p->res_mult && p->mid_mult) { /* output residual add */
        const int32_t mid = lb_clamp(lb_requantize_inline(acc, p->mult[o], p->shift[o]) + p->mid_zero, 0, 255);
        const int32_t v = (mid - p->mid_zero) * p->mid_mult +
                          ((int32_t)lb_get_inline(res, (uint32_t)at, rb) - p->res_zero) * p->res_mult[o];
        const int32_t q = lb_rne_shift(v, p->res_shift[o]) + p->out_zero;
        lb_put_inline((uint8_t *)out, (uint32_t)at, ob, (uint32_t)lb_clamp(q, p->out_min, p->out_max));
        return;
    }
    if (p->res_mult)
        acc += lb_requantize_inline((int32_t)lb_get_inline(res, (uint32_t)at, rb) - p->res_zero, p->res_mult[o], p->res_shift[o]);
    if (p->out_scale) {
        ((float *)out)[at] = (float)acc * p->out_scale[o];
    } else if (p->thr) { /* few codes: count the thresholds at or below the accumulator (bisection) */
        const int32_t n = p->out_max - p->out_min, *t = p->thr + o * n, u = p->mult[o] < 0 ? -acc : acc;
        int32_t a = 0, b = n;
        while (a < b) {
            const int32_t m = (a + b) >> 1;
            if (u >= t[m])
                a = m + 1;
            else
                b = m;
        }
        lb_put_inline((uint8_t *)out, (uint32_t)at, ob, (uint32_t)(p->out_min + a));
    } else {
        const int32_t v = lb_requantize_inline(acc, p->mult[o], p->shift[o]) + p->out_zero;
        lb_put_inline((uint8_t *)out, (uint32_t)at, ob, (uint32_t)lb_clamp(v, p->out_min, p->out_max));
    }
}

#if LB_DSP
LB_INLINE uint32_t lb_ld32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4); /* one LDR (unaligned access is allowed on ARMv7-M / ARMv8-M) */
    return v;
}

/* (a0, a2) and (a1, a3) of the bytes a0 a1 a2 a3 of x, as two 16-bit halves each (UXTB16, UXTB16 ROR #8) */
LB_INLINE uint32_t lb_even(uint32_t x)
{
    uint32_t r;
    __asm__("uxtb16 %0, %1" : "=r"(r) : "r"(x)); /* __uxtb16 takes uint8x4_t in gcc and int8x4_t in clang */
    return r;
}
LB_INLINE uint32_t lb_odd(uint32_t x)
{
    uint32_t r;
    __asm__("uxtb16 %0, %1, ror #8" : "=r"(r) : "r"(x));
    return r;
}

/* one 3-wide row of a window: a0 w0 + a2 w2 and a1 w1 + a3 * 0 by two SMLADs; w: the row's int16 w0, w2, w1, 0
 * (read as two words by memcpy: the scratch is int16, of any alignment) */
#define LB_ROW3_DSP(s, x, w) \
    ((s) = __smlad((int16x2_t)lb_odd(x), (int16x2_t)lb_ld32((const uint8_t *)((w) + 2)), \
                   __smlad((int16x2_t)lb_even(x), (int16x2_t)lb_ld32((const uint8_t *)(w)), (s))))

/* 3-wide rows on the DSP extension: for every channel and kernel row, the codes a0 a1 a2 (a3) of one LDR, split
 * by UXTB16. Sums of w * code for the outputs at ur and (if not NULL) ur2; the caller subtracts
 * in_zero * sum(w). Reads one byte past each window (the band buffer has slack). */
LB_INLINE void lb_taps3_dsp(const int16_t *wp, const uint8_t *ur, const uint8_t *ur2, int32_t cin_g, int32_t KH,
                            int32_t W, int32_t HWin, int32_t *a0, int32_t *a1)
{
    int32_t c, kh, s0 = 0, s1 = 0;
    if (ur2 && KH == 3) { /* 3x3, two outputs per weight load */
        for (c = 0; c < cin_g; c++, ur += HWin, ur2 += HWin, wp += 12) {
            LB_ROW3_DSP(s0, lb_ld32(ur), wp);
            LB_ROW3_DSP(s1, lb_ld32(ur2), wp);
            LB_ROW3_DSP(s0, lb_ld32(ur + W), wp + 4);
            LB_ROW3_DSP(s1, lb_ld32(ur2 + W), wp + 4);
            LB_ROW3_DSP(s0, lb_ld32(ur + 2 * W), wp + 8);
            LB_ROW3_DSP(s1, lb_ld32(ur2 + 2 * W), wp + 8);
        }
    } else if (ur2) {
        for (c = 0; c < cin_g; c++, ur += HWin - KH * W, ur2 += HWin - KH * W)
            for (kh = 0; kh < KH; kh++, ur += W, ur2 += W, wp += 4) {
                LB_ROW3_DSP(s0, lb_ld32(ur), wp);
                LB_ROW3_DSP(s1, lb_ld32(ur2), wp);
            }
    } else {
        for (c = 0; c < cin_g; c++, ur += HWin - KH * W)
            for (kh = 0; kh < KH; kh++, ur += W, wp += 4) LB_ROW3_DSP(s0, lb_ld32(ur), wp);
    }
    *a0 = s0;
    *a1 = s1;
}

/* pointwise, four neighbouring outputs (stride 1): sums of w * code */
LB_INLINE void lb_taps1x4_dsp(const int16_t *wk, const uint8_t *ur, int32_t cin_g, int32_t HWin, int32_t *a)
{
    int32_t c, s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (c = 0; c < cin_g; c++, ur += HWin) {
        const uint32_t x = lb_ld32(ur), e = lb_even(x), o = lb_odd(x);
        const int32_t w = wk[c];
        s0 = __smlabb((int32_t)e, w, s0);
        s2 = __smlatb((int32_t)e, w, s2);
        s1 = __smlabb((int32_t)o, w, s1);
        s3 = __smlatb((int32_t)o, w, s3);
    }
    a[0] = s0;
    a[1] = s1;
    a[2] = s2;
    a[3] = s3;
}
#endif

void lb_conv(const lb_conv_t *p, const uint8_t *in, const uint8_t *res, void *out, int16_t *scratch)
{
    const int32_t cin_g = p->cin / p->groups, cout_g = p->cout / p->groups;
    const int32_t KH = p->kh, KW = p->kw, SH = p->sh, SW = p->sw, KK = KH * KW, F = cin_g * KK;
    const int32_t P = p->hout * p->wout, z = p->in_zero;
    const int32_t R = p->band > 0 && p->band < p->hout ? p->band : p->hout; /* output rows per band */
    const int unpack = p->in_bits != 8u || p->ph || p->pw || R < p->hout;
    const uint32_t ib = p->in_bits, wb = p->w_bits;
    int16_t *wrow = scratch;
    const int32_t FW = KW == 3 ? F / 3 * 4 : F; /* the weight row's int16 (3-wide rows: 4 per row, DSP layout) */
    int32_t o, j, oy, ox, oy0;
    if (!p->out_scale) memset(out, 0, lb_packed_bytes((uint32_t)(p->cout * P), p->out_bits));
    for (oy0 = 0; oy0 < p->hout; oy0 += R) { /* a band of output rows */
        const int32_t oy1 = oy0 + R < p->hout ? oy0 + R : p->hout;
        const uint8_t *u = in; /* the input rows the band reads, one byte per code, padded */
        int32_t W = p->win, HW = p->hin * p->win, y0 = 0; /* y0: the input row (padded) of u's first row */
        if (unpack) {
            /* the band's input rows, for every channel, unpacked after the weight row to one byte per code, with
               the padding as the code z (a real 0: it adds w * (z - z) = 0), so that every window is inside */
            const int32_t H = p->hin, W0 = p->win, Wp = W0 + 2 * p->pw, rows = (oy1 - oy0 - 1) * SH + KH;
            uint8_t *ub = (uint8_t *)(scratch + FW);
            int32_t c, r;
            y0 = oy0 * SH;
            memset(ub, z, (size_t)(p->cin * rows * Wp));
            for (c = 0; c < p->cin; c++)
                for (r = 0; r < rows; r++) {
                    const int32_t iy = y0 + r - p->ph;
                    uint8_t *row = ub + (c * rows + r) * Wp + p->pw;
                    uint32_t at;
                    if (iy < 0 || iy >= H) continue; /* a padding row */
                    at = (uint32_t)((c * H + iy) * W0);
                    if (ib == 8u)
                        memcpy(row, in + at, (size_t)W0);
                    else
                        lb_unpack_run(in, at, (uint32_t)W0, ib, row, NULL, NULL);
                }
            u = ub;
            W = Wp;
            HW = rows * Wp;
        }
        for (o = 0; o < p->cout; o++) {
            const int16_t *lt = p->w_lut + (p->lut_rows > 1 ? o * p->lut_n : 0);
            const uint8_t *ug = u + (o / cout_g) * cin_g * HW; /* the input channels of o's group */
            if (wb == 8u)
                for (j = 0; j < F; j++) wrow[j] = lt[p->w_codes[o * F + j]];
            else
                lb_unpack_run(p->w_codes, (uint32_t)(o * F), (uint32_t)F, wb, NULL, lt, wrow);
#if LB_DSP
            int32_t zw = 0; /* in_zero * sum of the row's weights (the DSP loops sum w * code) */
            const int dsp3 = KW == 3 && unpack, dsp1 = KK == 1 && SW == 1;
            if (dsp3) { /* rows (w0, w2), (w1, 0), from the back: the row is rewritten in place */
                for (j = F / 3 - 1; j >= 0; j--) {
                    const int16_t w0 = wrow[3 * j], w1 = wrow[3 * j + 1], w2 = wrow[3 * j + 2];
                    wrow[4 * j] = w0;
                    wrow[4 * j + 1] = w2;
                    wrow[4 * j + 2] = w1;
                    wrow[4 * j + 3] = 0;
                    zw += z * ((int32_t)w0 + w1 + w2);
                }
            } else if (dsp1) {
                for (j = 0; j < F; j++) zw += z * (int32_t)wrow[j];
            }
#endif
            for (oy = oy0; oy < oy1; oy++) {
                const uint8_t *ury = ug + (oy * SH - y0) * W;
                for (ox = 0; ox < p->wout; ox++) {
                    const int32_t at = o * P + oy * p->wout + ox;
                    const uint8_t *ur = ury + ox * SW, *ur2 = ox + 1 < p->wout ? ur + SW : NULL; /* two at once */
                    int32_t acc, acc1;
#if LB_DSP
                    if (dsp1 && ox + 3 < p->wout) { /* four at once */
                        int32_t a4[4], k;
                        lb_taps1x4_dsp(wrow, ur, cin_g, HW, a4);
                        for (k = 0; k < 4; k++) lb_conv_out(p, o, at + k, (int32_t)((uint32_t)a4[k] - (uint32_t)zw), res, out);
                        ox += 3;
                        continue;
                    }
                    if (dsp3) {
                        lb_taps3_dsp(wrow, ur, ur2, cin_g, KH, W, HW, &acc, &acc1);
                        lb_conv_out(p, o, at, (int32_t)((uint32_t)acc - (uint32_t)zw), res, out);
                        if (ur2) {
                            lb_conv_out(p, o, at + 1, (int32_t)((uint32_t)acc1 - (uint32_t)zw), res, out);
                            ox++;
                        }
                        continue;
                    }
#endif
#if !LB_DSP
                    if (KK == 1 && SW == 1 && ox + 3 < p->wout) { /* pointwise: four at once */
                        int32_t a4[4], k;
                        if (z == 0)
                            lb_taps1x4(wrow, ur, cin_g, HW, 0, a4);
                        else
                            lb_taps1x4(wrow, ur, cin_g, HW, z, a4);
                        for (k = 0; k < 4; k++) lb_conv_out(p, o, at + k, a4[k], res, out);
                        ox += 3;
                        continue;
                    }
#endif
                    if (z == 0) /* after a ReLU: the codes are the integers */
                        lb_taps(wrow, ur, ur2, cin_g, KH, KW, W, HW, 0, &acc, &acc1);
                    else
                        lb_taps(wrow, ur, ur2, cin_g, KH, KW, W, HW, z, &acc, &acc1);
                    lb_conv_out(p, o, at, acc, res, out);
                    if (ur2) {
                        lb_conv_out(p, o, at + 1, acc1, res, out);
                        ox++;
                    }
                }
            }
        }
    }
}

void lb_avgpool_global(int32_t c, int32_t hw, uint8_t in_bits, int32_t in_zero, int32_t mult, int32_t shift,
                       uint8_t out_bits, int32_t out_zero, const uint8_t *in, uint8_t *out)
{
    const int32_t hi = (1 << out_bits) - 1;
    int32_t i, k;
    memset(out, 0, lb_packed_bytes((uint32_t)c, out_bits));
    for (i = 0; i < c; i++) {
        int32_t s = 0;
        for (k = 0; k < hw; k++) s += (int32_t)lb_get_inline(in, (uint32_t)(i * hw + k), (uint32_t)in_bits) - in_zero;
        lb_put(out, (uint32_t)i, out_bits, (uint32_t)lb_clamp(lb_requantize(s, mult, shift) + out_zero, 0, hi));
    }
}

void lb_maxpool(int32_t c, int32_t h, int32_t w, int32_t oh, int32_t ow, int32_t kh, int32_t kw, int32_t sh,
                int32_t sw, int32_t ph, int32_t pw, uint8_t bits, const uint8_t *in, uint8_t *out)
{
    int32_t i, oy, ox, a, b;
    memset(out, 0, lb_packed_bytes((uint32_t)(c * oh * ow), bits));
    for (i = 0; i < c; i++)
        for (oy = 0; oy < oh; oy++)
            for (ox = 0; ox < ow; ox++) {
                uint32_t m = 0;
                for (a = 0; a < kh; a++) {
                    int32_t iy = oy * sh - ph + a;
                    if (iy < 0 || iy >= h) continue;
                    for (b = 0; b < kw; b++) {
                        int32_t ix = ox * sw - pw + b;
                        uint32_t v;
                        if (ix < 0 || ix >= w) continue;
                        v = lb_get_inline(in, (uint32_t)((i * h + iy) * w + ix), (uint32_t)bits);
                        if (v > m) m = v;
                    }
                }
                lb_put(out, (uint32_t)((i * oh + oy) * ow + ox), bits, m);
            }
}

void lb_add(int32_t n, uint8_t a_bits, int32_t a_zero, int32_t a_mult, int32_t a_shift, uint8_t b_bits,
            int32_t b_zero, int32_t b_mult, int32_t b_shift, uint8_t out_bits, int32_t out_zero, int32_t out_min,
            int32_t out_max, const uint8_t *a, const uint8_t *b, uint8_t *out)
{
    int32_t i;
    memset(out, 0, lb_packed_bytes((uint32_t)n, out_bits));
    for (i = 0; i < n; i++) {
        int32_t v = out_zero + lb_requantize((int32_t)lb_get_inline(a, (uint32_t)i, (uint32_t)a_bits) - a_zero, a_mult, a_shift)
                    + lb_requantize((int32_t)lb_get_inline(b, (uint32_t)i, (uint32_t)b_bits) - b_zero, b_mult, b_shift);
        lb_put(out, (uint32_t)i, out_bits, (uint32_t)lb_clamp(v, out_min, out_max));
    }
}

void lb_requantize_tensor(int32_t n, uint8_t in_bits, int32_t in_zero, int32_t mult, int32_t shift,
                          uint8_t out_bits, int32_t out_zero, int32_t out_min, int32_t out_max,
                          const uint8_t *in, uint8_t *out)
{
    int32_t i;
    memset(out, 0, lb_packed_bytes((uint32_t)n, out_bits));
    for (i = 0; i < n; i++) {
        int32_t v = lb_requantize((int32_t)lb_get_inline(in, (uint32_t)i, (uint32_t)in_bits) - in_zero, mult, shift) + out_zero;
        lb_put(out, (uint32_t)i, out_bits, (uint32_t)lb_clamp(v, out_min, out_max));
    }
}

void lb_quantize_input(const float *x, int32_t n, int rule, float lo, float step, float inv, int32_t qmin,
                       int32_t qmax, uint8_t bits, uint8_t *out)
{
    int32_t i;
    memset(out, 0, lb_packed_bytes((uint32_t)n, bits));
    for (i = 0; i < n; i++) {
        float v = x[i];
        if (isnan(v)) v = 0.0f; /* a NaN input (a failed sensor) reads as 0, as the integer ONNX does; no UB */
        if (rule == 0) {
            float d = step;
#if defined(__GNUC__)
            __asm__("" : "+r"(d)); /* opaque per element: no 1 / step hoisted out of the loop (-freciprocal-math) */
#endif
            if (v < lo) v = lo;
            v = rintf((v - lo) / d);
            if (v > (float)qmax) v = (float)qmax;
        } else {
            v = v * inv;
            if (v < (float)qmin) v = (float)qmin;
            if (v > (float)qmax) v = (float)qmax;
            v = rintf(v);
        }
        lb_put(out, (uint32_t)i, bits, (uint32_t)((int32_t)v - qmin));
    }
}

void lb_pixels_to_codes(const uint8_t *px, int32_t c, int32_t hw, int hwc, const uint8_t *lut, uint8_t bits,
                        uint8_t *out)
{
    int32_t ch, i;
    memset(out, 0, lb_packed_bytes((uint32_t)(c * hw), bits));
    for (ch = 0; ch < c; ch++) {
        const uint8_t *t = lut + 256 * ch;
        const uint8_t *p = hwc ? px + ch : px + ch * hw;
        const int32_t step = hwc ? c : 1;
        for (i = 0; i < hw; i++) lb_put_inline(out, (uint32_t)(ch * hw + i), bits, t[p[i * step]]);
    }
}
