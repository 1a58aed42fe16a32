"""ONNX export of a packed model: QuantizeLinear/DequantizeLinear (QDQ) graph, and its FP32 twin.

Built with ``onnx.helper`` from the packed graph (not from PyTorch), so ONNX, the NumPy reference
and the C code all come from the same file. Opset 21 (int4/uint4 Q/DQ, supported by onnxruntime):

* quantized input activation: ``Clip`` to the trained range, ``QuantizeLinear`` into a
  ``uint4``/``int4`` container (bits <= 4) or ``uint8``/``int8`` (5..8 bits), ``DequantizeLinear``;
  a grid whose code 0 is not 0 (min-max on signed inputs) is shifted by ``Sub``/``Add`` around it;
  the ``mul_clip`` rule (LSQ) is ``Mul`` by ``1/s``, ``Clip`` to the codes and ``QuantizeLinear`` at scale 1
  (at scale ``s`` it divides: one code apart from the rule near half steps);
* quantized weight with an integer form ``off + s·m`` (:func:`lowbit.export.levels.integer_form`):
  the integers ``m`` as an ``int4``/``int8``/``int16`` initializer, ``DequantizeLinear`` with the
  per-tensor or per-output-channel (``axis=0``) scale ``s``, then ``Add(off)`` if ``off != 0``;
  a value set with no integer form is stored as its decoded float weight (ONNX has no LUT type);
* BatchNorm of a quantized layer: ``Mul``/``Add`` per channel after the conv (as in the integer
  graph); of a full-precision layer: folded into its float weight and bias.

The FP32 twin (``qdq=False``) is the same network in plain float: no Q/DQ, dequantized weights
with every BatchNorm folded. It is the baseline of the latency comparison.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from .graph import Graph, Op, WeightQ
from .levels import ActQuant, integer_form

OPSET = 21
IR_VERSION = 10


class _Builder:
    def __init__(self):
        self.nodes, self.inits = [], []
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}__{self._n}"

    def const(self, base: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), n))
        return n

    def int_const(self, base: str, values: np.ndarray, dtype: int) -> str:
        """An integer initializer of ONNX type ``dtype``. 8-, 16-, 32- and 64-bit types are stored as raw
        little-endian bytes (as varint ``int32_data`` an int8 weight took about 5.5 bytes: integer ONNX files
        were 3.5x larger, before session 24); int4/uint4 through ``helper.make_tensor``, which packs them."""
        from onnx import TensorProto as T
        from onnx import helper

        n = self.name(base)
        v = np.asarray(values)
        raw = {T.INT8: "<i1", T.UINT8: "<u1", T.INT16: "<i2", T.UINT16: "<u2", T.INT32: "<i4", T.INT64: "<i8"}
        if dtype in raw:
            a = v.astype(raw[dtype])
            if not np.array_equal(a, v):
                raise ValueError(f"{base}: values outside the range of ONNX type {dtype}")
            self.inits.append(helper.make_tensor(n, dtype, list(v.shape), a.tobytes(), raw=True))
        else:
            self.inits.append(helper.make_tensor(n, dtype, list(v.shape), v.reshape(-1).astype(int).tolist()))
        return n

    def node(self, op_type: str, inputs: list[str], output: str | None = None, base: str = "t", **attrs) -> str:
        from onnx import helper

        out = output or self.name(base)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(op_type), **attrs))
        return out


def _int_type(lo: int, hi: int) -> int:
    from onnx import TensorProto as T

    if lo >= 0:
        return T.UINT4 if hi <= 15 else T.UINT8 if hi <= 255 else T.UINT16
    return T.INT4 if -8 <= lo and hi <= 7 else T.INT8 if -128 <= lo and hi <= 127 else T.INT16


def _act_nearest(b: _Builder, x: str, a: ActQuant, base: str) -> str:
    """The ``nearest`` rule (QDQ has none): k = Σ_j [x >= m_j] (GreaterOrEqual, Cast, Add), then
    the level ``Gather(levels, k)``: the same float32 comparisons, so the same codes."""
    from onnx import TensorProto as T

    k = None
    for j, m in enumerate(a.thresholds):
        ge = b.node("GreaterOrEqual", [x, b.const(f"{base}.act_th{j}", np.array(m, np.float32))], base=base)
        c = b.node("Cast", [ge], base=base, to=T.INT64)
        k = c if k is None else b.node("Add", [k, c], base=base)
    return b.node("Gather", [b.const(base + ".act_levels", np.asarray(a.table, np.float32)), k], base=base)


def _act_qdq(b: _Builder, x: str, a: ActQuant, base: str, channels: int | None = None) -> str:
    """Clip, QuantizeLinear, DequantizeLinear. ``channels``: the DequantizeLinear's scale as that many equal
    values along axis 1 (the same numbers), which keeps onnxruntime's WeightBiasQuantization pass, which only
    takes a per-tensor input scale, from re-quantizing the conv's float weight or bias (see :func:`_conv`)."""
    if a.rule == "nearest":
        return _act_nearest(b, x, a, base)
    f = np.float32
    lo = f(a.real_lo)
    if lo != 0.0:
        x = b.node("Sub", [x, b.const(base + ".act_lo", np.array(lo, f))], base=base)
    clip_lo, clip_hi = f(a.qmin) * f(a.step), f(a.qmax) * f(a.step)
    qscale = a.step
    if a.rule == "mul_clip":  # the rule's x·(1/s), not QuantizeLinear's x / s (one code apart near half steps)
        x = b.node("Mul", [x, b.const(base + ".act_inv", np.array(a.inv, f))], base=base)
        clip_lo, clip_hi, qscale = f(a.qmin), f(a.qmax), 1.0
    x = b.node("Clip", [x, b.const(base + ".clip_lo", np.array(clip_lo, f)),
                        b.const(base + ".clip_hi", np.array(clip_hi, f))], base=base)
    scale = b.const(base + ".act_scale", np.array(a.step, f))
    zp = b.int_const(base + ".act_zp", np.array(0), _int_type(a.qmin, a.qmax))
    qs = scale if qscale == a.step else b.const(base + ".act_qscale", np.array(qscale, f))
    q = b.node("QuantizeLinear", [x, qs, zp], base=base)
    if channels is None:
        x = b.node("DequantizeLinear", [q, scale, zp], base=base)
    else:
        x = b.node("DequantizeLinear", [q, b.const(base + ".act_scale_c", np.full(channels, a.step, f)),
                                        b.int_const(base + ".act_zp_c", np.zeros(channels), _int_type(a.qmin, a.qmax))],
                   base=base, axis=1)
    if lo != 0.0:
        x = b.node("Add", [x, b.const(base + ".act_lo", np.array(lo, f))], base=base)
    return x


def _channel_shape(op: Op, n: int) -> tuple[int, ...]:
    return (n,) if op.attrs["layer"] == "linear" else (1, n, 1, 1)


def _conv(b: _Builder, op: Op, qdq: bool) -> None:
    f = np.float32
    x = op.inputs[0]
    o = op.weight.shape[0]
    w_shape = op.weight.shape
    base = op.name
    wq = op.weight if isinstance(op.weight, WeightQ) else None
    bias = None
    post_mul = post_add = None
    form = None
    if wq is not None and qdq:
        form = integer_form(wq.levels.levels64())
        if form is not None:
            m_lut, s, off = form
            rows = wq.row_index()
            m = m_lut[rows[:, None], wq.codes.reshape(o, -1).astype(np.int64)].reshape(w_shape)
            per_row = wq.levels.rows > 1
            dt = _int_type(int(m.min()), int(m.max()))
            mi = b.int_const(base + ".w_int", m, dt)
            sc = b.const(base + ".w_scale", (s if per_row else s[:1].reshape(())).astype(f))
            zp = b.int_const(base + ".w_zp", np.zeros(o if per_row else ()), dt)
            w = b.node("DequantizeLinear", [mi, sc, zp], base=base, **({"axis": 0} if per_row else {}))
            if np.any(off != 0):
                offv = off[rows] if per_row else np.full(o, off[0])
                w = b.node("Add", [w, b.const(base + ".w_off", offv.astype(f).reshape((o,) + (1,) * (len(w_shape) - 1)))],
                           base=base)
        else:
            w = b.const(base + ".w", wq.dequantize())
        if op.scale is not None:
            post_mul, post_add = op.scale, op.shift
        elif op.shift is not None:
            bias = op.shift
    else:
        wf = (wq.dequantize() if wq is not None else op.weight).astype(np.float64)
        bf = None if op.bias is None else op.bias.astype(np.float64)
        if op.scale is not None:  # the FP32 twin folds every BN
            wf = wf * op.scale.astype(np.float64).reshape((o,) + (1,) * (wf.ndim - 1))
            bf = op.shift.astype(np.float64)
        elif op.shift is not None:
            bf = op.shift.astype(np.float64)
        w = b.const(base + ".w", wf.astype(f))
        bias = bf
    if qdq and op.act is not None:
        # onnxruntime's WeightBiasQuantization pass (on by default) re-quantizes a float weight or bias of a conv
        # whose input is a per-tensor DequantizeLinear, to int8 / int32: other numbers than ours. A per-channel
        # input scale (equal values) is outside that pass, so a default session runs this model as exported
        x = _act_qdq(b, x, op.act, base, channels=w_shape[1] * int(op.attrs.get("groups", 1))
                     if (form is None or bias is not None) else None)
    ins = [x, w] + ([b.const(base + ".b", bias.astype(f))] if bias is not None else [])
    out = op.output if post_mul is None else None
    if op.attrs["layer"] == "linear":
        y = b.node("Gemm", ins, out, base=base, transB=1)
    else:
        (ph, pw) = op.attrs["padding"]
        y = b.node("Conv", ins, out, base=base, kernel_shape=list(op.attrs["kernel"]),
                   strides=list(op.attrs["stride"]), pads=[ph, pw, ph, pw], group=int(op.attrs.get("groups", 1)))
    if post_mul is not None:
        shp = _channel_shape(op, o)
        y = b.node("Mul", [y, b.const(base + ".bn_scale", post_mul.astype(f).reshape(shp))], base=base)
        b.node("Add", [y, b.const(base + ".bn_shift", post_add.astype(f).reshape(shp))], op.output)


def describe(model, graph, what: str, input_name: str | None = None) -> None:
    """Write into ``model`` what a consumer needs beside the graph (session 24: the files carried nothing):
    ``doc_string`` and ``metadata_props`` with the input's layout and normalisation, the output, the run,
    model, dataset and quantizers (from ``graph.meta``, as ``export_run`` records them), and lowbit's version."""
    import json

    from .. import __version__

    meta = dict(getattr(graph, "meta", None) or {})
    shape = " x ".join(map(str, graph.input_shape))
    norm = meta.get("input_normalisation") or {}
    rule = ("x = (pixel / 255 - mean) / std per channel (input_mean, input_std)" if norm.get("mean") is not None
            else "as the training data pipeline fed the model (no normalisation recorded)")
    props = {"lowbit_version": __version__, "lowbit_model": what,
             "input": f"{input_name or graph.input}: float32 N x {shape} (channels first), normalised: {rule}",
             "output": f"{graph.output}: float32 logits N x {' x '.join(map(str, graph.output_shape))}; "
                       "index i is the dataset's class label i"}
    if norm.get("mean") is not None:
        props["input_mean"], props["input_std"] = json.dumps(norm["mean"]), json.dumps(norm["std"])
    for k in ("run", "epoch", "checkpoint_sha256", "model", "dataset", "classes", "weight", "act", "method"):
        if meta.get(k) is not None:
            props[k] = str(meta[k])
    ms = sorted({n.op_type for n in model.graph.node if n.domain == "com.microsoft"})
    if ms:
        props["runtime"] = f"onnxruntime: uses {', '.join(ms)} of the com.microsoft domain"
    model.doc_string = f"lowbit {__version__}: {what}. " + props["input"] + ". " + props["output"] + "." + \
        (f" Runs in {props['runtime']}." if ms else "")
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)


def to_onnx(graph: Graph, qdq: bool = True):
    """The ONNX ``ModelProto`` of a packed graph: QDQ (default) or the FP32 twin (``qdq=False``)."""
    from onnx import TensorProto, helper

    b = _Builder()
    for op in graph.ops:
        x = op.inputs
        if op.kind == "conv":
            _conv(b, op, qdq)
        elif op.kind == "relu":
            b.node("Relu", x, op.output)
        elif op.kind == "add":
            b.node("Add", x, op.output)
        elif op.kind == "gap":
            b.node("GlobalAveragePool", x, op.output)
        elif op.kind == "flatten":
            b.node("Flatten", x, op.output, axis=1)
        elif op.kind == "maxpool":
            (ph, pw) = op.attrs["padding"]
            b.node("MaxPool", x, op.output, kernel_shape=list(op.attrs["kernel"]),
                   strides=list(op.attrs["stride"]), pads=[ph, pw, ph, pw])
        elif op.kind == "affine":
            shp = (1, -1) + (1,) * (len(op.in_shape) - 1)
            y = b.node("Mul", [x[0], b.const(op.name + ".scale", op.scale.reshape(shp))], base=op.name)
            b.node("Add", [y, b.const(op.name + ".shift", op.shift.reshape(shp))], op.output)
        else:  # pragma: no cover - graph.lower only emits the kinds above
            raise ValueError(op.kind)
    inp = helper.make_tensor_value_info(graph.input, TensorProto.FLOAT, ["N", *graph.input_shape])
    out = helper.make_tensor_value_info(graph.output, TensorProto.FLOAT, ["N", *graph.output_shape])
    g = helper.make_graph(b.nodes, "lowbit_" + ("qdq" if qdq else "fp32"), [inp], [out], b.inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lowbit")
    model.ir_version = IR_VERSION
    describe(model, graph, "QDQ model (fake-quantized activations and weights)" if qdq
             else "FP32 twin of the QDQ model (dequantized weights, BatchNorm folded)")
    return model


def check(model) -> None:
    """``onnx.checker`` with full shape inference (raises on an invalid model)."""
    import onnx

    onnx.checker.check_model(model, full_check=True)


def session(model, threads: int = 1):
    """An onnxruntime CPU session (graph optimizations on, ``threads`` intra-op threads)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # onnxruntime's WeightBiasQuantization pass would re-quantize a float weight that meets a
    # DequantizeLinear input to int8 (a value-set layer stored as float weights): not our model.
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["WeightBiasQuantization"])


def run(sess, x: np.ndarray, batch: int = 500) -> np.ndarray:
    name = sess.get_inputs()[0].name
    x = np.asarray(x, dtype=np.float32)
    return np.concatenate([sess.run(None, {name: x[i: i + batch]})[0] for i in range(0, len(x), batch)])


def latency(sessions: dict, x: np.ndarray, repeats: int = 20) -> dict[str, float]:
    """Median milliseconds per call of each session on the batch ``x``, measured side by side
    (the sessions alternate within every repeat, so load on a shared machine hits both alike)."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():  # warm-up
        run(s, x, len(x))
    for _ in range(repeats):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            run(s, x, len(x))
            times[k].append(1000 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}
