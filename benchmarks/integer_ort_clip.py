"""Can the ``Clip`` after each sub-8-bit tensor go from the onnxruntime integer model (issue 17)?

Three probes behind docs/integer-log.md, "Session 14" and "Session 33":

* ``--bounds RUN``: for every conv whose output codes need a ``Clip`` (a code range narrower than
  uint8's), the worst-case accumulator from its integer weights, bias and input code range, requantized:
  where the top of the code range can never be exceeded (and the bottom is uint8's 0), saturation alone
  would clamp, and the ``Clip`` could be dropped exactly. Prints, per layer, the share of channels where
  each end is safe.
* ``--ops``: onnxruntime's time for the exact ways to clamp a uint8 tensor to 0..15: ``Clip``, ``Min`` (the
  upper end only; session 25), or a ``QLinearAdd`` of 0 whose output zero point 240 makes its saturation do the
  upper clamp (1 thread, median of 15 runs, a 256x48x16x16 tensor).
* ``--batches RUN`` (session 33): the exact integer model (``integer_fused``), the same graph with its ``Clip``s
  after ``QLinearConv`` / ``QLinearAdd`` removed (``no_clip``: a timing control only, its codes are NOT the
  trained network's), the FP32 twin and onnxruntime's own int8 (``quantize_static``) at each batch size of
  ``--sizes``, 1 thread. RUN's network and plan, untrained and calibrated (the latency does not depend on the
  weights' values). The four sessions alternate within each of ``--rounds`` rounds; each round times a block of
  calls per session (about 0.1 s of FP32 work); the ratios to onnxruntime's int8 are taken within a round and
  their median and quartiles printed; ``--json`` writes every round.

    python benchmarks/integer_ort_clip.py --bounds benchmarks/results/integer_export/mbv2_ft/runs/FT_W4A4s_int13_fzl_s0
    python benchmarks/integer_ort_clip.py --ops
    python benchmarks/integer_ort_clip.py --batches benchmarks/results/integer_export/mbv2_ft/runs/FT_W4A4s_int13_fzl_s0 \
        --rounds 31 --json benchmarks/results/integer_export/ort/s33/batches_W4A4s_run1.json     # alone on the machine
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


def without_clips(model):
    """``model`` with every ``Clip`` that reads a ``QLinearConv`` / ``QLinearAdd`` output removed (its readers
    read the unclamped tensor): a timing control, not the trained network."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    made = {n.output[0] for n in g.node if n.op_type in ("QLinearConv", "QLinearAdd")}
    skip = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Clip" and n.input[0] in made}
    keep = [n for n in g.node if not (n.op_type == "Clip" and n.output[0] in skip)]
    for n in keep:
        for i, v in enumerate(n.input):
            n.input[i] = skip.get(v, v)
    for o in g.output:
        if o.name in skip:
            raise SystemExit(f"integer_ort_clip: a graph output ({o.name}) is a Clip; no control model")
    del g.node[:]
    g.node.extend(keep)
    return m, len(skip)


def batches(run: str, sizes: list[int], rounds: int, json_out: str | None) -> None:
    import json
    import tempfile
    from pathlib import Path

    import torch

    from integer_ort import calibrated_like, machine
    from lowbit.data import BatchLoader, load_dataset
    from lowbit.export import onnx_export as ox
    from lowbit.export.int_onnx import quantize_static_onnx, variants
    from lowbit.intmode import int_graph

    model, info = calibrated_like(run)
    data = load_dataset("fashion-mnist")
    xt, _ = zip(*BatchLoader(data.test, info, 1000))
    xn = torch.cat(xt)[: max(max(sizes), 200)].numpy().astype(np.float32)
    graph = int_graph(model, torch.from_numpy(xn[:1]))
    v = variants(graph)
    models = {"integer_fused": v["integer_fused"], "fp32": v["fp32"]}
    models["no_clip"], n_clips = without_clips(v["integer_fused"])
    with tempfile.TemporaryDirectory() as d:
        models["ort_int8"] = quantize_static_onnx(v["fp32"], xn[:200], Path(d) / "fp32.onnx", Path(d) / "int8.onnx")
    sess = {k: ox.session(m) for k, m in models.items()}
    name = {k: s.get_inputs()[0].name for k, s in sess.items()}
    rep = {"run": run, "clips_removed_in_no_clip": n_clips, "rounds": rounds, "machine": machine(), "batches": {}}
    print(f"{n_clips} Clips removed in no_clip (timing only, not exact)")
    for b in sizes:
        x = xn[:b]
        for k, s in sess.items():  # warm-up, and the calls per block: about 0.1 s of FP32 work
            s.run(None, {name[k]: x})
        t0 = time.perf_counter()
        sess["fp32"].run(None, {name["fp32"]: x})
        reps = max(1, int(0.1 / max(time.perf_counter() - t0, 1e-6)))
        ms: dict = {k: [] for k in sess}
        for _ in range(rounds):
            for k, s in sess.items():
                t0 = time.perf_counter()
                for _ in range(reps):
                    s.run(None, {name[k]: x})
                ms[k].append(1000 * (time.perf_counter() - t0) / reps)
        ratio = {k: [a / c for a, c in zip(ms[k], ms["ort_int8"])] for k in sess}
        q = {k: [float(np.percentile(r, p)) for p in (25, 50, 75)] for k, r in ratio.items()}
        rep["batches"][str(b)] = {"calls_per_block": reps, "ms": ms, "ratio_to_ort_int8": ratio,
                                  "ratio_quartiles": q, "median_ms": {k: float(np.median(t)) for k, t in ms.items()}}
        print(f"batch {b:4d} ({reps} calls per block): ms per call " +
              ", ".join(f"{k} {np.median(t):.3f}" for k, t in ms.items()))
        print("           / onnxruntime int8, median [quartiles] over rounds: " +
              ", ".join(f"{k} {m:.3f} [{lo:.3f}, {hi:.3f}]" for k, (lo, m, hi) in q.items() if k != "ort_int8"))
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(rep, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bounds", metavar="RUN", default=None)
    ap.add_argument("--ops", action="store_true")
    ap.add_argument("--batches", metavar="RUN", default=None)
    ap.add_argument("--sizes", default="1,8,32,256", help="--batches: the batch sizes")
    ap.add_argument("--rounds", type=int, default=15, help="--batches: alternating rounds per batch size")
    ap.add_argument("--json", default=None, help="--batches: write every round here")
    a = ap.parse_args()
    if a.bounds:
        bounds(a.bounds)
    if a.ops:
        ops()
    if a.batches:
        try:
            sizes = [int(b) for b in a.sizes.split(",")]
        except ValueError:
            raise SystemExit(f"integer_ort_clip: --sizes wants comma-separated integers, got {a.sizes!r}") from None
        if not sizes or min(sizes) < 1:
            raise SystemExit(f"integer_ort_clip: --sizes must be positive, got {a.sizes!r}")
        batches(a.batches, sizes, a.rounds, a.json)


if __name__ == "__main__":
    main()
