/* lowbit: the bit-packed kernels on the integer runtime (lowbit_rt.h) of issue 17. See lb_packed_rt.c. */
#ifndef LB_PACKED_RT_H
#define LB_PACKED_RT_H
#include "lb_packed.h"
#include "lowbit_rt.h"

/* lb_conv (groups = 1) with the integer sums from bit planes: same output bit for bit.
   wp: weight planes of the layer ([O][KH][KW][w_bits][words]); m = wa[r]*code + wb[r] must equal w_lut;
   band: output rows whose input rows are packed at a time (0: all); xp: scratch for the planes of one band's
   padded input rows (((band-1)*sh+kh)*(win+2pw)*in_bits*LB_PK_WORDS(cin) words; all hin+2ph rows when band is 0);
   acc: scratch of 2*cout int32. */
void lb_pk_conv_rt(const lb_conv_t *p, const uint8_t *in, const uint8_t *res, void *out, const uint32_t *wp,
                   const int16_t *wa, const int16_t *wb, int32_t band, uint32_t *xp, int32_t *acc);

#endif
