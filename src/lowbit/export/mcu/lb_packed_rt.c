/* lowbit: the bit-packed kernels (lb_packed.c) behind the integer runtime's conv interface (lowbit_rt.h,
   issue 17). The input's packed CHW codes are spread into bit planes (padding ring = code 0), the integer
   sums of each output pixel come from lb_pk_pixel (popcounts), and the epilogue is lb_conv's own
   (lb_conv_out: bias, residual of either form, requantize + clamp + pack, or float logits). */
#include <string.h>
#include "lb_packed_rt.h"


static void lb_pk_pack_codes(const lb_pk_geom *g, const uint8_t *in, uint32_t bits, uint32_t *xp)
{
    const int32_t NW = LB_PK_WORDS(g->C), Wp = g->W + 2 * g->PW, Hp = g->H + 2 * g->PH;
    const int32_t px = (int32_t)bits * NW, HW = g->H * g->W;
    int32_t i, c, y, x;
    for (i = 0; i < Hp * Wp * px; i++) xp[i] = 0u;
    for (c = 0; c < g->C; c++) {
        const uint32_t bit = 1u << (c & 31);
        for (y = 0; y < g->H; y++)
            for (x = 0; x < g->W; x++) {
                uint32_t v = lb_get_inline(in, (uint32_t)(c * HW + y * g->W + x), bits), j;
                uint32_t *dw = xp + ((y + g->PH) * Wp + x + g->PW) * px + (c >> 5);
                for (j = 0; v; j++, v >>= 1)
                    if (v & 1u) dw[j * NW] |= bit;
            }
    }
}

void lb_pk_conv_rt(const lb_conv_t *p, const uint8_t *in, const uint8_t *res, void *out, const uint32_t *wp,
                   const int16_t *wa, const int16_t *wb, uint32_t *xp, int32_t *acc)
{
    const lb_pk_geom g = {p->cin, p->hin, p->win, p->cout, p->kh, p->kw, p->sh, p->sw, p->ph, p->pw, p->hout, p->wout};
    const int32_t P = p->hout * p->wout;
    int32_t o, oy, ox, K, n;
    if (!p->out_scale) memset(out, 0, lb_packed_bytes((uint32_t)(p->cout * P), p->out_bits));
    lb_pk_pack_codes(&g, in, p->in_bits, xp);
    for (oy = 0; oy < p->hout; oy++)
        for (ox = 0; ox < p->wout; ox++) {
            lb_pk_pixel(&g, xp, p->in_bits, p->in_zero, wp, p->w_bits, wa, wb, p->lut_rows, oy, ox, 0, acc,
                        acc + p->cout, &K, &n);
            for (o = 0; o < p->cout; o++) lb_conv_out(p, o, o * P + oy * p->wout + ox, acc[o], res, out);
        }
}
