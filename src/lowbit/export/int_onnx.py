"""ONNX with integer operators for the integer graph, and its FP32 twin.

:func:`to_int_onnx` (opset 21, built with ``onnx.helper`` from the :class:`IntGraph`):

* input: ``uint8`` codes by the input quantizer's own float32 rule (``Mul``/``Clip``/``Round`` or
  ``Max``/``Div``/``Round``/``Min``, then ``Cast``; :func:`_input_codes`), as NumPy and C compute them
  (``QuantizeLinear`` before session 24: one code off at inputs near a half step);
* conv / linear: ``ConvInteger`` (``group`` for grouped and depthwise convs) or ``MatMulInteger``
  on ``uint8`` codes (zero point = the tensor's) and ``int8`` integer weights ``m``: the exact
  int32 accumulator ``A``; ``+ bias`` (int32) (+ the residual requantized into the accumulator:
  ``Round(f32(q_res − zero_res)·r_res)``, cast to int32); then the requantization in float32
  elementwise ops: ``Cast``, ``· r`` (the float32 multiplier ``mult·2^(shift−31)``), ``Round``,
  ``+ zero_out``, ``Clip`` (ReLU and the code range), ``Cast`` to ``uint8``; the classifier:
  ``f32(acc)·out_scale``;
* global average pooling: ``QLinearGlobalAveragePool`` (com.microsoft: int32 sums, the same float32
  requantization; its scale is the stored multiplier exactly, which has at most ``24 − log2 HW``
  significant bits for that), else ``Cast``, ``− zero``, ``ReduceSum`` (exact: integers below 2^24)
  requantized as above; max-pooling directly on ``uint8`` codes.

Every requantization is therefore :func:`lowbit.export.requant.requantize` itself
(``rint(f32(f32(x)·r))``, ties to even): the ONNX model computes the integer model's codes bit for
bit, in both variants (``QLinearConv`` does the same float32 multiply and round inside), except the
fused variant of an ``integer_residual: accumulator`` residual (no onnxruntime kernel rounds a
residual into the accumulator: an 8-bit intermediate approximates it). Integer weights beyond
``int8`` (8-bit SAWB's odd integers up to ±255) cannot go to ``ConvInteger``; such a layer runs ``Conv``/``MatMul``
on the integers as float32 where every sum stays below 2^24 (:func:`~.intgraph.partial_sum_bound`: exact), else, since session 22,
two ``ConvInteger`` on ``m = 16·hi + lo`` (:func:`split_int8`) added as ``16·A_hi + A_lo`` in int32: exact, but
onnxruntime runs that 10x slower than FP32 (the float32 conv rounded such sums before). :func:`float_layers` names
these layers.

:func:`to_fp32_onnx`: the same network in float32 (weights ``g·s_w·m``, biases ``h``, residual
adds, ReLU, pooling, no quantization): the baseline of the latency comparison and the model
``onnxruntime.quantization.quantize_static`` quantizes for the third column.
"""

from __future__ import annotations

import logging

import numpy as np

from .intgraph import IntGraph, IntOp, mid_step, out_range, partial_sum_bound
from .onnx_export import IR_VERSION, OPSET, _Builder, describe
from .requant import real_multiplier

_F = np.float32


def float_layers(graph: IntGraph) -> list[str]:
    """Conv/linear ops whose integer weights do not fit int8: ONNX runs each as a float32 conv on the integers, or as
    two integer ops (:func:`split_int8`) where float32 sums could round; never on ``QLinearConv``."""
    out = []
    for op in graph.ops:
        if op.kind == "conv":
            m = op.m()
            if m.min() < -128 or m.max() > 127:
                out.append(op.name)
    return out


def uint8_weight_layers(graph: IntGraph) -> list[str]:
    """Conv/linear ops within int8 whose weights still go as uint8 (:func:`_u8s8_exact` fails: 8-bit
    inputs with weights beyond ±64): onnxruntime runs them on its uint8 x uint8 kernel."""
    beyond = set(float_layers(graph))
    return [op.name for op in graph.ops if op.kind == "conv" and op.name not in beyond
            and not _u8s8_exact(op.m(), graph.tensors[op.inputs[0]].qmax)]


def _u8s8_exact(m: np.ndarray, in_qmax: int) -> bool:
    """Whether onnxruntime's uint8 x int8 kernels compute ``Σ m·x`` exactly for codes ``x <= in_qmax``.
    On x86 without VNNI (AVX2) MLAS multiplies uint8 by int8 with ``vpmaddubsw``, which adds two
    products in a saturating int16: ``2·in_qmax·max|m|`` must stay below 2^15 (7-bit weights for
    8-bit inputs: why onnxruntime's quantizer has ``reduce_range``). Otherwise the weights go as
    uint8 ``m + 128`` with zero point 128 (the uint8 x uint8 kernel widens to int16 first: exact)."""
    return 2 * int(in_qmax) * int(np.abs(m).max(initial=0)) <= 32767


def split_int8(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer weights ``m`` (|m| <= 2047) as ``16·hi + lo`` with ``hi`` and ``lo`` (-8..7) in int8: a layer whose
    weights do not fit int8 runs as two integer ops whose int32 sums make its accumulator exactly."""
    m = np.asarray(m, dtype=np.int64)
    if np.abs(m).max(initial=0) > 2047:
        raise ValueError("split_int8: integer weights beyond ±2047")
    hi = np.floor_divide(m + 8, 16)
    return hi, m - 16 * hi


def _weights(b: _Builder, base: str, w: np.ndarray, in_qmax: int, o: int, per_channel_zp: bool):
    """(weights, zero point) initializers: int8 ``w`` with zero point 0 where the uint8 x int8
    kernels are exact (:func:`_u8s8_exact`), else uint8 ``w + 128`` with zero point 128."""
    from onnx import TensorProto as T

    shape = (o,) if per_channel_zp else ()
    if _u8s8_exact(w, in_qmax):
        return b.int_const(base + ".w", w, T.INT8), b.int_const(base + ".w_zp", np.zeros(shape, np.int64), T.INT8)
    return (b.int_const(base + ".w", w.astype(np.int64) + 128, T.UINT8),
            b.int_const(base + ".w_zp", np.full(shape, 128, np.int64), T.UINT8))


def _requant_float(b: _Builder, acc_f: str, scale: np.ndarray, zero: int, lo: int, hi: int, base: str, shp) -> str:
    from onnx import TensorProto as T

    y = b.node("Mul", [acc_f, b.const(base + ".rq_scale", scale.astype(_F).reshape(shp))], base=base)
    y = b.node("Round", [y], base=base)
    if zero:
        y = b.node("Add", [y, b.const(base + ".zero", np.array(zero, _F))], base=base)
    y = b.node("Clip", [y, b.const(base + ".lo", np.array(lo, _F)), b.const(base + ".hi", np.array(hi, _F))], base=base)
    return b.node("Cast", [y], base=base, to=T.UINT8)


def _input_codes(b: _Builder, x: str, a) -> str:
    """uint8 input codes ``k − qmin`` by the input quantizer's own float32 rule, op for op as
    :meth:`lowbit.export.levels.ActQuant.codes` and the C runtime's ``lb_quantize_input`` compute them (a NaN
    reads as 0 in both; the NumPy reference refuses it):
    ``mul_clip`` ``Round(Clip(x·inv, qmin, qmax))``, ``clip_div`` ``Min(Round((Max(x, lo) − lo) / step), qmax)``.
    (``QuantizeLinear``, used before session 24, divides by the scale: it differed from ``x·inv`` by one code
    at inputs within a float32 rounding of a half step.)"""
    from onnx import TensorProto as T

    f = np.float32
    # a NaN input reads as 0, as the C runtime does (a Cast of NaN to uint8 is undefined); ±inf clamp to the ends
    x = b.node("Where", [b.node("IsNaN", [x], base="in"), _scalar(b, "in.zero", f(0.0)), x], base="in")
    if a.rule == "mul_clip":
        t = b.node("Mul", [x, _scalar(b, "in.inv", f(a.inv))], base="in")
        t = b.node("Clip", [t, _scalar(b, "in.qmin", f(a.qmin)), _scalar(b, "in.qmax", f(a.qmax))], base="in")
        k = b.node("Round", [t], base="in")
    elif a.rule == "clip_div":
        t = b.node("Max", [x, _scalar(b, "in.lo", f(a.lo))], base="in")
        if a.lo != 0.0:
            t = b.node("Sub", [t, _scalar(b, "in.lo", f(a.lo))], base="in")
        k = b.node("Round", [b.node("Div", [t, _scalar(b, "in.step", f(a.step))], base="in")], base="in")
        k = b.node("Min", [k, _scalar(b, "in.qmax", f(a.qmax))], base="in")
    else:  # pragma: no cover - tensor_q gives the integer graph's input a uniform rule
        raise ValueError(f"integer ONNX: input rule {a.rule!r}")
    if a.qmin != 0:
        k = b.node("Sub", [k, _scalar(b, "in.qmin", f(a.qmin))], base="in")
    return b.node("Cast", [k], base="in", to=T.UINT8)


def to_int_onnx(graph: IntGraph, scales: dict[str, np.ndarray], fused: bool = False):
    """The integer ONNX model (module docstring). ``scales``: per conv op name, the real value of
    one accumulator unit ``eff`` (float64, from :func:`eff_scales`). ``fused``: convs as
    ``QLinearConv`` (+ ``QLinearAdd`` from the com.microsoft domain for a residual, through an
    8-bit intermediate at half the output step): onnxruntime's fused integer kernels, one more
    rounding per residual layer."""
    from onnx import TensorProto as T
    from onnx import helper

    b = _Builder()
    tq = graph.tensors
    for op in graph.ops:
        if op.kind == "quant_in":
            b.node("Identity", [_input_codes(b, op.inputs[0] + "__in", op.act)], op.output)
        elif op.kind == "conv":
            _int_conv(b, op, graph, scales[op.name], fused)
        elif op.kind == "gap":
            _gap(b, op, graph)
        elif op.kind == "maxpool":
            (ph, pw) = op.attrs["padding"]
            b.node("MaxPool", [op.inputs[0]], op.output, kernel_shape=list(op.attrs["kernel"]),
                   strides=list(op.attrs["stride"]), pads=[ph, pw, ph, pw])
        elif op.kind == "flatten":
            b.node("Flatten", [op.inputs[0]], op.output, axis=1)
    inp = helper.make_tensor_value_info(graph.input + "__in", T.FLOAT, ["N", *graph.input_shape])
    out = helper.make_tensor_value_info(graph.output, T.FLOAT, ["N", *graph.output_shape])
    g = helper.make_graph(b.nodes, "lowbit_integer", [inp], [out], b.inits)
    ms = fused or any(op.attrs.get("residual") == "output" or op.kind == "gap" for op in graph.ops)
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    model = helper.make_model(g, opset_imports=opsets, producer_name="lowbit")
    model.ir_version = IR_VERSION
    describe(model, graph, "integer network, " + ("QLinearConv / QLinearAdd (fused)" if fused
                                                  else "ConvInteger / MatMulInteger on uint8 codes"),
             input_name=graph.input + "__in")
    return model


def _gap_scale(op: IntOp, hw: int) -> float | None:
    """``x_scale`` that makes onnxruntime's ``QLinearGlobalAveragePool`` (``y_scale`` 1) multiply by
    exactly the stored float32 multiplier: its scale is ``f32(x_scale / f32(hw))``; None where no
    float32 does that (a multiplier with more than ``24 − log2 hw`` significant bits) or the op's
    range check would refuse it."""
    r = _F(real_multiplier(op.mult[0], op.shift[0]))
    xs = _F(np.float64(r) * hw)
    if np.float64(xs) != np.float64(r) * hw or _F(xs / (_F(1.0) * _F(hw))) != r or not 2.0**-32 <= r < 256:
        return None
    return float(xs)


def _gap(b: _Builder, op: IntOp, graph: IntGraph) -> None:
    """Global average pooling: ``QLinearGlobalAveragePool`` (com.microsoft; on x86 it sums the codes
    in int32 and requantizes in float32 like ``QLinearConv``: :func:`requantize` exactly), else
    ``Cast``, ``− zero``, ``ReduceSum`` (exact: integers below 2^24) and the float32 requantization."""
    from onnx import TensorProto as T

    ti, to = graph.tensors[op.inputs[0]], graph.tensors[op.output]
    hw = int(np.prod(op.in_shape[1:]))
    xs = _gap_scale(op, hw)
    if xs is not None:
        y = b.node("QLinearGlobalAveragePool", [
            op.inputs[0], _scalar(b, op.name + ".x_s", xs), b.int_const(op.name + ".x_zp", np.array(ti.zero), T.UINT8),
            _scalar(b, op.name + ".y_s", 1.0), b.int_const(op.name + ".y_zp", np.array(to.zero), T.UINT8)],
            base=op.name, domain="com.microsoft", channels_last=0)
        b.node("Identity", [_clip_codes(b, y, op, to)], op.output)
        return
    x = b.node("Cast", [op.inputs[0]], base=op.name, to=T.FLOAT)
    if ti.zero:
        x = b.node("Sub", [x, b.const(op.name + ".zin", np.array(ti.zero, _F))], base=op.name)
    x = b.node("ReduceSum", [x, b.int_const(op.name + ".axes", np.array([2, 3]), T.INT64)], base=op.name, keepdims=1)
    y = _requant_float(b, x, real_multiplier(op.mult[0], op.shift[0]), to.zero, 0, to.qmax, op.name, ())
    b.node("Identity", [y], op.output)


def _scalar(b: _Builder, base: str, v: float) -> str:
    """A float32 scalar initializer of rank 0 (``_Builder.const`` makes rank 1)."""
    from onnx import numpy_helper

    n = b.name(base)
    b.inits.append(numpy_helper.from_array(np.array(v, dtype=_F), n))
    return n


def _qlinear_conv(b: _Builder, op: IntOp, graph: IntGraph, eff: np.ndarray) -> bool:
    """QLinearConv (+ QLinearAdd for a residual, + Clip to the code range): onnxruntime's fused
    integer kernels. Returns False when the layer does not fit them (weights beyond int8)."""
    from onnx import TensorProto as T

    tq = graph.tensors
    ti = tq[op.inputs[0]]
    m = op.m().reshape(op.codes.shape)
    if m.min() < -127 or m.max() > 127 or op.attrs["layer"] == "linear" or op.out_scale is not None:
        return False
    base = op.name
    o = m.shape[0]
    if len(op.inputs) == 1 or op.attrs.get("residual") == "output":
        # scales 1 (input), |real multiplier| (weights), 1 (output): onnxruntime's output scale
        # x_s·w_s/y_s is then the multiplier itself in float32, the codes the integer model's
        real = real_multiplier(op.mult, op.shift)
        sign = np.where(real < 0, -1, 1)
        mid = op.attrs.get("residual") == "output"
        zp = op.attrs["mid_zero"] if mid else tq[op.output].zero
        (ph, pw) = op.attrs["padding"]
        w, w_zp = _weights(b, base, m * sign.reshape(o, 1, 1, 1), ti.qmax, o, True)
        y = b.node("QLinearConv", [
            op.inputs[0], _scalar(b, base + ".x_s", 1.0), b.int_const(base + ".x_zp", np.array(ti.zero), T.UINT8),
            w, b.const(base + ".w_s", np.abs(real).astype(_F)), w_zp,
            _scalar(b, base + ".y_s", 1.0), b.int_const(base + ".y_zp", np.array(zp), T.UINT8),
            b.int_const(base + ".b", op.bias.astype(np.int64) * sign, T.INT32)], base=base,
            kernel_shape=list(op.attrs["kernel"]), strides=list(op.attrs["stride"]), pads=[ph, pw, ph, pw],
            group=int(op.attrs.get("groups", 1)))
        if mid:
            y = _qlinear_add(b, op, graph, y)
        b.node("Identity", [_clip_codes(b, y, op, tq[op.output])], op.output)
        return True
    # residual: accumulator (the residual is rounded into the accumulator before the one
    # requantization): no onnxruntime kernel computes that; an 8-bit intermediate at half the
    # output step and QLinearAdd approximate it (one more rounding)
    sign = np.where(eff < 0, -1, 1)  # a negative per-channel scale: flip the row (scales stay positive)
    w = m * sign.reshape(o, 1, 1, 1)
    bias = op.bias.astype(np.int64) * sign
    to = tq[op.output]
    res = len(op.inputs) > 1
    # with a residual, the conv writes an 8-bit intermediate (zero 128) at half the output step
    s_y, z_y = (to.scale / 2, 128) if res else (to.scale, to.zero)
    (ph, pw) = op.attrs["padding"]
    wq, w_zp = _weights(b, base, w, ti.qmax, o, True)
    y = b.node("QLinearConv", [
        op.inputs[0], _scalar(b, base + ".x_s", ti.scale), b.int_const(base + ".x_zp", np.array(ti.zero), T.UINT8),
        wq, b.const(base + ".w_s", (np.abs(eff) / ti.scale).astype(_F)), w_zp,
        _scalar(b, base + ".y_s", s_y), b.int_const(base + ".y_zp", np.array(z_y), T.UINT8),
        b.int_const(base + ".b", bias, T.INT32)], base=base, kernel_shape=list(op.attrs["kernel"]),
        strides=list(op.attrs["stride"]), pads=[ph, pw, ph, pw], group=int(op.attrs.get("groups", 1)))
    if res:
        tr = tq[op.inputs[1]]
        y = b.node("QLinearAdd", [
            y, _scalar(b, base + ".a_s", s_y), b.int_const(base + ".a_zp", np.array(z_y), T.UINT8),
            op.inputs[1], _scalar(b, base + ".r_s", tr.scale),
            b.int_const(base + ".r_zp", np.array(tr.zero), T.UINT8),
            _scalar(b, base + ".o_s", to.scale), b.int_const(base + ".o_zp", np.array(to.zero), T.UINT8)],
            base=base, domain="com.microsoft")
    b.node("Identity", [_clip_codes(b, y, op, to)], op.output)
    return True


def code_clip(op: IntOp, to) -> tuple[int, int] | None:
    """The range ``(lo, hi)`` a uint8 output ``to`` of ``op`` must be clipped to: from its zero after a
    ReLU, up to ``qmax``; None where that is uint8's own range (saturation clamps it)."""
    lo, hi = out_range(op, to)
    return (lo, hi) if lo > 0 or hi < 255 else None


def _clip_codes(b: _Builder, y: str, op: IntOp, to) -> str:
    """``y`` (uint8) clipped to the output's code range (:func:`code_clip`; no node where saturation does it)."""
    from onnx import TensorProto as T

    rng = code_clip(op, to)
    if rng:
        y = b.node("Clip", [y, b.int_const(op.name + ".lo", np.array(rng[0]), T.UINT8),
                            b.int_const(op.name + ".hi", np.array(rng[1]), T.UINT8)], base=op.name)
    return y


def _qlinear_add(b: _Builder, op: IntOp, graph: IntGraph, mid: str) -> str:
    """The output residual add (``attrs["residual"] == "output"``, :func:`.intgraph.residual_output_constants`)
    as ``QLinearAdd`` (com.microsoft): scales ``mid_mult·2^−S``, ``res_mult·2^−S`` and 1 make every float32
    operation onnxruntime does exact, so after :func:`_clip_codes` (the caller's) it gives the integer model's codes."""
    from onnx import TensorProto as T

    a, base = op.attrs, op.name
    tr, to = graph.tensors[op.inputs[1]], graph.tensors[op.output]
    big_s = int(op.res_shift[0])
    y = b.node("QLinearAdd", [
        mid, _scalar(b, base + ".a_s", a["mid_mult"] * 2.0**-big_s),
        b.int_const(base + ".a_zp", np.array(a["mid_zero"]), T.UINT8),
        op.inputs[1], _scalar(b, base + ".r_s", int(op.res_mult[0]) * 2.0**-big_s),
        b.int_const(base + ".r_zp", np.array(tr.zero), T.UINT8),
        _scalar(b, base + ".o_s", 1.0), b.int_const(base + ".o_zp", np.array(to.zero), T.UINT8)],
        base=base, domain="com.microsoft")
    return y


def _int_conv(b: _Builder, op: IntOp, graph: IntGraph, eff: np.ndarray, fused: bool = False) -> None:
    from onnx import TensorProto as T

    if fused and _qlinear_conv(b, op, graph, eff):
        return
    tq = graph.tensors
    ti = tq[op.inputs[0]]
    base = op.name
    m = op.m().reshape(op.codes.shape)
    o = m.shape[0]
    linear = op.attrs["layer"] == "linear"
    shp = (o,) if linear else (1, o, 1, 1)
    x_zp = b.int_const(base + ".x_zp", np.array(ti.zero), T.UINT8)

    def integer_op(wt: np.ndarray, name: str) -> str:  # the exact int32 sums of the codes with int8 weights wt
        if linear:
            w, w_zp = _weights(b, name, wt.reshape(o, -1).T, ti.qmax, o, False)
            return b.node("MatMulInteger", [op.inputs[0], w, x_zp, w_zp], base=base)
        (ph, pw) = op.attrs["padding"]
        w, w_zp = _weights(b, name, wt, ti.qmax, o, False)
        return b.node("ConvInteger", [op.inputs[0], w, x_zp, w_zp], base=base, kernel_shape=list(op.attrs["kernel"]),
                      strides=list(op.attrs["stride"]), pads=[ph, pw, ph, pw], group=int(op.attrs.get("groups", 1)))

    if m.min() >= -128 and m.max() <= 127:
        acc = integer_op(m.astype(np.int64), base)
    elif partial_sum_bound(m, ti) < 2**24:
        # integers beyond int8 (8-bit SAWB's odd levels up to ±255) whose every sum stays below 2^24: float32
        # Conv/MatMul on the integers is exact (and onnxruntime runs it far faster than the split below)
        x = b.node("Cast", [op.inputs[0]], base=base, to=T.FLOAT)
        if ti.zero:
            x = b.node("Sub", [x, b.const(base + ".zin", np.array(ti.zero, _F))], base=base)
        w = b.const(base + ".wf", m.astype(_F).reshape(o, -1).T if linear else m.astype(_F))
        if linear:
            acc = b.node("MatMul", [x, w], base=base)
        else:
            (ph, pw) = op.attrs["padding"]
            acc = b.node("Conv", [x, w], base=base, kernel_shape=list(op.attrs["kernel"]),
                         strides=list(op.attrs["stride"]), pads=[ph, pw, ph, pw], group=int(op.attrs.get("groups", 1)))
        acc = b.node("Cast", [acc], base=base, to=T.INT32)
    else:  # beyond int8 and sums that may pass 2^24: m = 16·hi + lo, two integer ops, exact
        hi, lo = split_int8(m)
        acc = b.node("Add", [b.node("Mul", [integer_op(hi, base + ".hi"), b.int_const(base + ".x16", np.array(16), T.INT32)],
                                    base=base), integer_op(lo, base + ".lo")], base=base)
    acc = b.node("Add", [acc, b.int_const(base + ".bias", op.bias.astype(np.int64).reshape(shp), T.INT32)], base=base)
    if op.attrs.get("residual") == "output":
        mid = _requant_float(b, b.node("Cast", [acc], base=base, to=T.FLOAT), real_multiplier(op.mult, op.shift),
                             op.attrs["mid_zero"], 0, 255, base, shp)
        b.node("Identity", [_clip_codes(b, _qlinear_add(b, op, graph, mid), op, tq[op.output])], op.output)
        return
    if len(op.inputs) > 1:  # the residual rounded into the accumulator: requantize(q_res − zero, res_mult, res_shift)
        tr = tq[op.inputs[1]]
        r = b.node("Cast", [op.inputs[1]], base=base, to=T.FLOAT)
        if tr.zero:
            r = b.node("Sub", [r, b.const(base + ".zres", np.array(tr.zero, _F))], base=base)
        r = b.node("Mul", [r, b.const(base + ".res_scale",
                                      real_multiplier(op.res_mult, op.res_shift).astype(_F).reshape(shp))], base=base)
        r = b.node("Cast", [b.node("Round", [r], base=base)], base=base, to=T.INT32)
        acc = b.node("Add", [acc, r], base=base)
    acc_f = b.node("Cast", [acc], base=base, to=T.FLOAT)
    if op.out_scale is not None:
        b.node("Mul", [acc_f, b.const(base + ".out_scale", op.out_scale.astype(_F).reshape(shp))], op.output)
        return
    to = tq[op.output]
    y = _requant_float(b, acc_f, real_multiplier(op.mult, op.shift), to.zero, *out_range(op, to), base, shp)
    b.node("Identity", [y], op.output)


def eff_scales(graph: IntGraph) -> dict[str, np.ndarray]:
    """Per conv op: the real value of one accumulator unit, from the stored integers
    (``mult·2^(shift−31)·s_out``, ``s_mid`` for an output residual add; the classifier stores it
    as ``out_scale``)."""
    out = {}
    for op in graph.ops:
        if op.kind != "conv":
            continue
        if op.out_scale is not None:
            out[op.name] = op.out_scale.astype(np.float64)
        elif op.attrs.get("residual") == "output":  # mult/shift requantize to mid: s_mid = s_out·mid_mult/2^S
            out[op.name] = real_multiplier(op.mult, op.shift) * mid_step(op, graph.tensors[op.output])
        else:
            out[op.name] = real_multiplier(op.mult, op.shift) * graph.tensors[op.output].scale
    return out


def to_fp32_onnx(graph: IntGraph, scales: dict[str, np.ndarray]):
    """The float32 network the integer graph approximates (module docstring)."""
    from onnx import TensorProto as T
    from onnx import helper

    b = _Builder()
    tq = graph.tensors
    relu_after: set[str] = set()
    for op in graph.ops:
        x = op.inputs
        if op.kind == "quant_in":
            b.node("Identity", [x[0] + "__in"], op.output)
        elif op.kind == "conv":
            eff = scales[op.name]
            s_in = tq[op.inputs[0]].scale
            m = op.m().reshape(op.codes.shape).astype(np.float64)
            o = m.shape[0]
            w = (m * (eff / s_in).reshape((o,) + (1,) * (m.ndim - 1))).astype(_F)
            bias = (op.bias.astype(np.float64) * eff).astype(_F)
            if op.attrs["layer"] == "linear":
                y = b.node("Gemm", [x[0], b.const(op.name + ".w", w.reshape(o, -1)), b.const(op.name + ".b", bias)],
                           base=op.name, transB=1)
            else:
                (ph, pw) = op.attrs["padding"]
                y = b.node("Conv", [x[0], b.const(op.name + ".w", w), b.const(op.name + ".b", bias)], base=op.name,
                           kernel_shape=list(op.attrs["kernel"]), strides=list(op.attrs["stride"]),
                           pads=[ph, pw, ph, pw], group=int(op.attrs.get("groups", 1)))
            if len(x) > 1:
                y = b.node("Add", [y, x[1]], base=op.name)
            if op.attrs.get("relu"):
                y = b.node("Relu", [y], base=op.name)
            b.node("Identity", [y], op.output)
        elif op.kind == "gap":
            b.node("GlobalAveragePool", x, op.output)
        elif op.kind == "maxpool":
            (ph, pw) = op.attrs["padding"]
            b.node("MaxPool", x, op.output, kernel_shape=list(op.attrs["kernel"]),
                   strides=list(op.attrs["stride"]), pads=[ph, pw, ph, pw])
        elif op.kind == "flatten":
            b.node("Flatten", x, op.output, axis=1)
    del relu_after
    inp = helper.make_tensor_value_info(graph.input + "__in", T.FLOAT, ["N", *graph.input_shape])
    out = helper.make_tensor_value_info(graph.output, T.FLOAT, ["N", *graph.output_shape])
    g = helper.make_graph(b.nodes, "lowbit_fp32", [inp], [out], b.inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lowbit")
    model.ir_version = IR_VERSION
    describe(model, graph, "FP32 twin of the integer network (float weights g*s_w*m)", input_name=graph.input + "__in")
    return model


def quantize_static_onnx(fp32_model, calib: np.ndarray, path_in, path_out, per_channel: bool = False):
    """onnxruntime's own static int8 quantization (QDQ, per-tensor, uint8 activations, int8
    weights, MinMax calibration on ``calib``) of the FP32 model; ``per_channel``: one weight scale
    per output channel, as integer mode's folded BatchNorm has."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    onnx.save(fp32_model, str(path_in))
    name = fp32_model.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{name: calib[i: i + 1].astype(_F)} for i in range(len(calib))])

        def get_next(self):
            return next(self.it, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its "Please consider to run pre-processing" warnings on every export
    try:
        quantize_static(str(path_in), str(path_out), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel)
    finally:
        root.setLevel(level)
    return onnx.load(str(path_out))


def variants(graph: IntGraph) -> dict:
    """Every ONNX form of an integer graph, by name: ``integer`` (ConvInteger + float32 epilogue),
    ``integer_fused`` (QLinearConv / QLinearAdd) and ``fp32`` (the float twin)."""
    sc = eff_scales(graph)
    return {"integer": to_int_onnx(graph, sc), "integer_fused": to_int_onnx(graph, sc, fused=True),
            "fp32": to_fp32_onnx(graph, sc)}
