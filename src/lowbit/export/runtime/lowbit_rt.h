/* lowbit integer runtime: the kernels of an integer-only network (lowbit integer export).
 *
 * C99, no malloc, no float in any inner loop (float appears only where the network meets the
 * outside: lb_quantize_input turns the float input into codes, and a conv with out_scale != NULL,
 * the classifier, writes float32 logits = (float)acc * out_scale[o]).
 *
 * Tensors (one image): CHW order (channel-major, row-major inside a channel, the layout of
 * PyTorch's NCHW without the batch), stored as unsigned integer codes q in 0..2^bits-1, bit-packed
 * LSB-first: code i occupies stream bits i*bits .. i*bits+bits-1, stream bit t is bit t%8 of byte
 * t/8 (bits = 8 is one plain byte per code). A tensor of n codes takes (n*bits+7)/8 bytes. The
 * real value of a code is scale * (q - zero); the scale only lives in the multipliers below.
 *
 * Requantization (lb_requantize): real multiplier r = mult * 2^(shift-31), mult int32 with 24
 * significant bits (a float32 exactly), shift <= 30; result = rint(f32(f32(x) * r)), ties to even:
 * what a float32 multiply and round gives (and onnxruntime's integer kernels compute), here in
 * integers only: x rounded to 24 significant bits, one 64-bit product, rounded to 24 significant
 * bits, shifted right by 31 - shift with round half to even. mult may be negative.
 *
 * Weights: packed codes (same bit stream), OIHW order: output channel o is the contiguous run
 * o*F .. o*F+F-1, F = (cin/groups)*kh*kw; a code -> integer table lut (int16, lut_rows rows of
 * lut_n entries; row o when lut_rows > 1, else row 0) gives the integer weight m. The weight's real
 * value is s_w[o] * m; s_w is folded into the multipliers.
 */
#ifndef LOWBIT_RT_H
#define LOWBIT_RT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LOWBIT_RT_VERSION 3 /* 3: lb_conv_t.thr; 2: the float32-rounding requantization */

/* rint(f32(f32(x) * mult * 2^(shift - 31))), ties to even, in integers: the one requantization */
int32_t lb_requantize(int32_t x, int32_t mult, int32_t shift);

/* v / 2^s rounded half to even (s >= 0) */
int32_t lb_rne_shift(int32_t v, int32_t s);

/* packed code access (bits 1..8); lb_put ORs into a zeroed buffer */
uint32_t lb_get(const uint8_t *buf, uint32_t idx, uint32_t bits);
/* lb_get itself, inline for the kernels' loops (one byte read for 8-bit codes) */
static inline uint32_t lb_get_inline(const uint8_t *buf, uint32_t idx, uint32_t bits)
{
    uint32_t bit, sh, v;
    if (bits == 8u) return buf[idx];
    bit = idx * bits;
    sh = bit & 7u;
    v = buf[bit >> 3];
    if (sh + bits > 8u) v |= (uint32_t)buf[(bit >> 3) + 1] << 8;
    return (v >> sh) & ((1u << bits) - 1u);
}
void lb_put(uint8_t *buf, uint32_t idx, uint32_t bits, uint32_t v);
/* bytes of n codes at bits */
uint32_t lb_packed_bytes(uint32_t n, uint32_t bits);

/* conv / linear (a linear is a 1x1 conv on a (F, 1, 1) input); groups: grouped and depthwise
 *   A[o,p]  = sum over the in-bounds taps t of m[o,t] * (q_in[t] - in_zero)   (padding is real 0)
 *   acc     = A + bias[o] (+ lb_requantize(q_res[o,p] - res_zero, res_mult[o], res_shift[o]))
 *   out     = out_scale ? (float)acc * out_scale[o]                           (float32 logits)
 *                       : clamp(lb_requantize(acc, mult[o], shift[o]) + out_zero, out_min, out_max)
 * A fused ReLU is out_min = out_zero. res_mult == NULL: no residual.
 * thr != NULL (outputs of at most 2 bits): the same codes by thresholds, no requantization:
 *   out = out_min + #{k < out_max - out_min : u >= thr[o * (out_max - out_min) + k]},  u = mult[o] < 0 ? -acc : acc
 *   (lowbit.export.requant.thresholds: exact for every accumulator the layer can reach; shift is then unused)
 * mid_mult != 0: output residual add (plan integer_residual: output; = onnxruntime QLinearAdd):
 *   mid = clamp(lb_requantize(acc = A + bias[o], mult[o], shift[o]) + mid_zero, 0, 255)
 *   out = clamp(lb_rne_shift((mid - mid_zero) * mid_mult + (q_res - res_zero) * res_mult[o], res_shift[o])
 *               + out_zero, out_min, out_max) */
typedef struct {
    int32_t cin, hin, win, cout, hout, wout;
    int32_t kh, kw, sh, sw, ph, pw, groups;
    uint8_t in_bits;
    int32_t in_zero;
    const uint8_t *w_codes;
    uint8_t w_bits;
    const int16_t *w_lut;
    int32_t lut_rows, lut_n;
    const int32_t *bias, *mult, *shift;
    const int32_t *res_mult, *res_shift;
    uint8_t res_bits;
    int32_t res_zero;
    int32_t mid_zero, mid_mult;
    uint8_t out_bits;
    int32_t out_zero, out_min, out_max;
    const float *out_scale;
    int32_t band; /* output rows per band of the unpacked input (0: all rows at once) */
    const int32_t *thr; /* the requantization and clamp as ascending thresholds per output channel, or NULL */
} lb_conv_t;

/* in: packed codes; res: packed codes of the residual (same shape as the output) or NULL;
 * out: packed codes (uint8_t *) or float logits (float *) when out_scale is set; scratch: F int16
 * (one decoded weight row; 4 per kernel row, F / 3 * 4, for 3-wide kernels), followed, when in_bits < 8, the
 * conv pads or band splits it, by the input rows of one band of output rows unpacked to one byte per code,
 * padded with in_zero: cin * ((band - 1) * sh + kh) * (win + 2pw) bytes (band: the descriptor's, or hout when
 * 0), and 4 bytes of slack; (those bytes + 4 + 1) / 2 int16 more (lowbit.export.int_c.conv_scratch) */
void lb_conv(const lb_conv_t *p, const uint8_t *in, const uint8_t *res, void *out, int16_t *scratch);

/* lb_conv's epilogue for output o at position at (o*hout*wout + oy*wout + ox), from its integer sum
 * acc = sum m*(q - in_zero) without the bias: adds the bias and the residual (either form), then writes
 * the requantized, clamped code packed at out_bits, or the float logit (out_scale). For kernels that
 * compute the sums their own way (the bit-packed kernels of lb_packed_rt.c). */
void lb_conv_out(const lb_conv_t *p, int32_t o, int32_t at, int32_t acc, const uint8_t *res, void *out);

/* global average pooling of (c, hw) codes:
 * out[c] = clamp(lb_requantize(sum_p (q - in_zero), mult, shift) + out_zero, 0, 2^out_bits - 1) */
void lb_avgpool_global(int32_t c, int32_t hw, uint8_t in_bits, int32_t in_zero, int32_t mult, int32_t shift,
                       uint8_t out_bits, int32_t out_zero, const uint8_t *in, uint8_t *out);

/* max pooling on codes (codes are monotone in the real value); padding taps are skipped */
void lb_maxpool(int32_t c, int32_t h, int32_t w, int32_t oh, int32_t ow, int32_t kh, int32_t kw, int32_t sh,
                int32_t sw, int32_t ph, int32_t pw, uint8_t bits, const uint8_t *in, uint8_t *out);

/* elementwise add of two quantized tensors:
 * out = clamp(out_zero + lb_requantize(a - a_zero, a_mult, a_shift) + lb_requantize(b - b_zero, b_mult, b_shift),
 *             out_min, out_max) */
void lb_add(int32_t n, uint8_t a_bits, int32_t a_zero, int32_t a_mult, int32_t a_shift, uint8_t b_bits,
            int32_t b_zero, int32_t b_mult, int32_t b_shift, uint8_t out_bits, int32_t out_zero, int32_t out_min,
            int32_t out_max, const uint8_t *a, const uint8_t *b, uint8_t *out);

/* requantize a tensor to another scale / zero / bits:
 * out = clamp(lb_requantize(q - in_zero, mult, shift) + out_zero, out_min, out_max) */
void lb_requantize_tensor(int32_t n, uint8_t in_bits, int32_t in_zero, int32_t mult, int32_t shift,
                          uint8_t out_bits, int32_t out_zero, int32_t out_min, int32_t out_max,
                          const uint8_t *in, uint8_t *out);

/* the network's float input -> codes (the boundary; the float32 rule of the input quantizer):
 *   rule 0 (clip_div): k = min(rintf((max(x, lo) - lo) / step), qmax)
 *   rule 1 (mul_clip): k = rintf(min(max(x * inv, qmin), qmax))
 * stored q = k - qmin, packed at bits */
void lb_quantize_input(const float *x, int32_t n, int rule, float lo, float step, float inv, int32_t qmin,
                       int32_t qmax, uint8_t bits, uint8_t *out);

/* raw 8-bit pixels -> codes, no float: q = lut[256 * ch + pixel] (the table folds the input normalisation and
 * the input quantizer; lowbit.export.intgraph.pixel_table), stored channel-major (C x HW), packed at bits.
 * hwc = 0: pixels are C x H x W; hwc = 1: H x W x C (interleaved, as a camera gives them) */
void lb_pixels_to_codes(const uint8_t *px, int32_t c, int32_t hw, int hwc, const uint8_t *lut, uint8_t bits,
                        uint8_t *out);

#ifdef __cplusplus
}
#endif
#endif
