"""Can the ``Clip`` after each sub-8-bit tensor go from the onnxruntime integer model (issue 17)?

Two probes behind docs/integer-log.md, "Session 14":

* ``--bounds RUN``: for every conv whose output codes need a ``Clip`` (a code range narrower than
  uint8's), the worst-case accumulator from its integer weights, bias and input code range, requantized:
  where the top of the code range can never be exceeded (and the bottom is uint8's 0), saturation alone
  would clamp, and the ``Clip`` could be dropped exactly. Prints, per layer, the share of channels where
  each end is safe.
* ``--ops``: onnxruntime's time for the exact ways to clamp a uint8 tensor to 0..15: ``Clip``, ``Min`` (the
  upper end only; session 25), or a ``QLinearAdd`` of 0 whose output zero point 240 makes its saturation do the
  upper clamp (1 thread, median of 15 runs, a 256x48x16x16 tensor).

    python benchmarks/integer_ort_clip.py --bounds benchmarks/results/integer_export/mbv2_ft/runs/FT_W4A4s_int13_fzl_s0
    python benchmarks/integer_ort_clip.py --ops
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def bounds(run: str) -> None:
    import torch

    from lowbit.export.int_onnx import code_clip, real_multiplier
    from lowbit.intmode import int_graph
    from lowbit.train import load_run

    _, data, model, _ = load_run(run)
    g = int_graph(model, torch.zeros(1, data.info.in_channels, *data.info.image_size))
    n = whole = 0
    for op in g.ops:
        if getattr(op, "codes", None) is None or op.attrs.get("layer") == "linear" or len(op.inputs) != 1:
            continue  # convs only; residual convs end in QLinearAdd, whose output is clamped the same way
        to, ti = g.tensors[op.output], g.tensors[op.inputs[0]]
        rng = code_clip(op, to)
        if rng is None:
            continue  # uint8's own range: no Clip
        lo = rng[0]
        m = op.m().reshape(op.codes.shape[0], -1).astype(np.int64)
        a, b = -ti.zero, ti.qmax - ti.zero  # the input codes minus their zero point
        acc_hi = op.bias.astype(np.int64) + np.maximum(m * a, m * b).sum(1)
        acc_lo = op.bias.astype(np.int64) + np.minimum(m * a, m * b).sum(1)
        r = real_multiplier(op.mult, op.shift)
        top = np.round(np.maximum(acc_hi * r, acc_lo * r)) + to.zero
        bot = np.round(np.minimum(acc_hi * r, acc_lo * r)) + to.zero
        safe_top, safe_bot = (top <= to.qmax).mean(), (bot >= lo).mean()
        n += 1
        whole += bool(safe_top == 1 and lo == 0)
        print(f"{op.name:34s} groups {op.attrs.get('groups', 1):4d}  codes {lo}..{to.qmax}  channels safe at the top "
              f"{100 * safe_top:5.1f} %, at the bottom {100 * safe_bot:5.1f} %")
    print(f"{n} clipped convs; {whole} whose Clip saturation alone would do")


def ops() -> None:
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper as h

    shape, top = [256, 48, 16, 16], 15

    def model(kind: str) -> bytes:
        x, y = h.make_tensor_value_info("x", T.UINT8, shape), h.make_tensor_value_info("y", T.UINT8, shape)
        if kind == "Clip":
            inits = [h.make_tensor("lo", T.UINT8, [], [0]), h.make_tensor("hi", T.UINT8, [], [top])]
            node = h.make_node("Clip", ["x", "lo", "hi"], ["y"])
        elif kind == "Min":  # the upper end only: the lower one is uint8's own 0 (session 25)
            inits = [h.make_tensor("hi", T.UINT8, [], [top])]
            node = h.make_node("Min", ["x", "hi"], ["y"])
        else:
            inits = [h.make_tensor("s", T.FLOAT, [], [0.1]), h.make_tensor("z", T.UINT8, [], [0]),
                     h.make_tensor("zo", T.UINT8, [], [255 - top])]
            node = h.make_node("QLinearAdd", ["x", "s", "z", "z", "s", "z", "s", "zo"], ["y"], domain="com.microsoft")
        g = h.make_graph([node], kind, [x], [y], inits)
        return h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)]).SerializeToString()

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = {k: ort.InferenceSession(model(k), so, providers=["CPUExecutionProvider"])
            for k in ("Clip", "Min", "QLinearAdd")}
    x = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    clip, mn, qadd = (s.run(None, {"x": x})[0].astype(int) for s in sess.values())
    assert np.array_equal(clip, np.minimum(x, top)) and np.array_equal(mn, clip)  # all three exact
    assert np.array_equal(qadd - (255 - top), clip)
    t: dict = {k: [] for k in sess}
    for _ in range(15):
        for k, s in sess.items():
            t0 = time.perf_counter()
            s.run(None, {"x": x})
            t[k].append(time.perf_counter() - t0)
    print({k: f"{1e3 * float(np.median(v)):.3f} ms" for k, v in t.items()}, f"({x.size / 1e6:.1f} M uint8 elements)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bounds", metavar="RUN", default=None)
    ap.add_argument("--ops", action="store_true")
    a = ap.parse_args()
    if a.bounds:
        bounds(a.bounds)
    if a.ops:
        ops()


if __name__ == "__main__":
    main()
