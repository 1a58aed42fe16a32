/* lowbit bit-packed integer conv kernels (issue 18). See lb_packed.c. */
#ifndef LB_PACKED_H
#define LB_PACKED_H
#include <stdint.h>

/* conv geometry: input C x H x W, output O x OH x OW, kernel KH x KW, stride SH, SW, zero padding PH, PW
   (the generated code's lb_geom without its last field, groups) */
typedef struct {
    int32_t C, H, W, O, KH, KW, SH, SW, PH, PW, OH, OW;
} lb_pk_geom;

/* 32-bit words holding C channels */
#define LB_PK_WORDS(C) (((C) + 31) / 32)

/* Bit planes of an activation: codes u (uint8, C x H x W, values < 2^bits) -> xp, laid out
   [(H + 2PH) x (W + 2PW) pixels][bits planes][LB_PK_WORDS(C) words], bit c%32 of word c/32 of plane j
   = bit j of u[c]; the padding ring is code 0. xp holds (H+2PH)*(W+2PW)*bits*LB_PK_WORDS(C) words. */
void lb_pk_pack_act(const lb_pk_geom *g, const uint8_t *u, uint32_t bits, uint32_t *xp);

/* The integer conv of lb_conv_int (generated code, c_export.py) on bit planes, bit for bit:
   weight codes c (planes wp, [O][KH][KW][wbits][LB_PK_WORDS(C)]) map to integers m = wa[r]*c + wb[r]
   (r = o if rows > 1 else 0); activation codes u (planes xp, lb_pk_pack_act) to k = u - zero.
   Over the in-bounds taps: A = sum m*k, M = sum m, K = sum k, n = #taps, exactly, then
   y = f(A)*ca + f(M)*cb + f(K)*cc + f(n)*cd + bias (float32, in this order; NULL terms skipped).
   wbits = abits = 1 runs the xnor/AND-popcount path, wbits = abits = 2 a 2-bit bit-serial path with
   byte-lane partial counts, anything else the general bit-serial loop (any 1..8 bits).
   acc: int32 scratch of 2*O entries. */
void lb_pk_conv(const lb_pk_geom *g, const uint32_t *xp, uint32_t abits, int32_t zero, const uint32_t *wp,
                uint32_t wbits, const int16_t *wa, const int16_t *wb, int32_t rows, const float *ca,
                const float *cb, const float *cc, const float *cd, const float *bias, float *y, int32_t *acc);

/* The integer sums of one output pixel (oy, ox) for every output channel o: A[o] = sum m*k, and, when
   need_m (or zero != 0), M[o] = sum m; *K = sum k, *n = #taps (in-bounds taps). xp holds the planes of the
   padded input rows from yb on (lb_pk_pack_act's layout; 0: all of them). The core of lb_pk_conv and of the
   integer runtime's packed conv (lb_packed_rt.c, which packs a band of rows at a time). */
void lb_pk_pixel(const lb_pk_geom *g, const uint32_t *xp, int32_t yb, uint32_t abits, int32_t zero, const uint32_t *wp,
                 uint32_t wbits, const int16_t *wa, const int16_t *wb, int32_t rows, int32_t oy, int32_t ox,
                 int need_m, int32_t *A, int32_t *M, int32_t *K, int32_t *n);

#endif
