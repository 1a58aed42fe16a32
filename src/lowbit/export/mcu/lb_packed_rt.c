/* lowbit: the bit-packed kernels (lb_packed.c) behind the integer runtime's conv interface (lowbit_rt.h,
   issue 17). The input's packed CHW codes are spread into bit planes a band of rows at a time (padding ring =
   code 0; packed.pk_band chooses the band), the integer
   sums of each output pixel come from lb_pk_pixel (popcounts), and the epilogue is lb_conv's own
   (lb_conv_out: bias, residual of either form, requantize + clamp + pack, or float logits). */
#include <string.h>
#include "lb_packed_rt.h"


/* the planes of the padded input rows yb .. yb+rows-1 (the padding ring: code 0) */
static void lb_pk_pack_codes(const lb_pk_geom *g, const uint8_t *in, uint32_t bits, int32_t yb, int32_t rows,
                             uint32_t *xp)
{
    const int32_t NW = LB_PK_WORDS(g->C), Wp = g->W + 2 * g->PW;
    const int32_t px = (int32_t)bits * NW, HW = g->H * g->W;
    const int32_t y0 = yb - g->PH < 0 ? 0 : yb - g->PH, y1 = yb + rows - g->PH < g->H ? yb + rows - g->PH : g->H;
    int32_t i, c, y, x;
    for (i = 0; i < rows * Wp * px; i++) xp[i] = 0u;
    for (c = 0; c < g->C; c++) {
        const uint32_t bit = 1u << (c & 31);
        for (y = y0; y < y1; y++)
            for (x = 0; x < g->W; x++) {
                uint32_t v = lb_get_inline(in, (uint32_t)(c * HW + y * g->W + x), bits), j;
                uint32_t *dw = xp + ((y + g->PH - yb) * Wp + x + g->PW) * px + (c >> 5);
                for (j = 0; v; j++, v >>= 1)
                    if (v & 1u) dw[j * (uint32_t)NW] |= bit;
            }
    }
}

void lb_pk_conv_rt(const lb_conv_t *p, const uint8_t *in, const uint8_t *res, void *out, const uint32_t *wp,
                   const int16_t *wa, const int16_t *wb, int32_t band, uint32_t *xp, int32_t *acc)
{
    const lb_pk_geom g = {p->cin, p->hin, p->win, p->cout, p->kh, p->kw, p->sh, p->sw, p->ph, p->pw, p->hout, p->wout};
    const int32_t P = p->hout * p->wout, R = band > 0 && band < p->hout ? band : p->hout;
    int32_t o, oy, oy0, ox, K, n;
    if (!p->out_scale) memset(out, 0, lb_packed_bytes((uint32_t)(p->cout * P), p->out_bits));
    for (oy0 = 0; oy0 < p->hout; oy0 += R) { /* a band of output rows: the planes of its input rows */
        const int32_t oy1 = oy0 + R < p->hout ? oy0 + R : p->hout, yb = oy0 * p->sh;
        lb_pk_pack_codes(&g, in, p->in_bits, yb, (oy1 - oy0 - 1) * p->sh + p->kh, xp);
        for (oy = oy0; oy < oy1; oy++)
            for (ox = 0; ox < p->wout; ox++) {
                lb_pk_pixel(&g, xp, yb, p->in_bits, p->in_zero, wp, p->w_bits, wa, wb, p->lut_rows, oy, ox, 0, acc,
                            acc + p->cout, &K, &n);
                for (o = 0; o < p->cout; o++) lb_conv_out(p, o, o * P + oy * p->wout + ox, acc[o], res, out);
            }
    }
}
