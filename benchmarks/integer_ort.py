"""Where do the integer ONNX variants disagree with the integer network, and what do they cost?

For an integer-mode run (or, with ``--calibrated``, an untrained BN-calibrated ResNet-8, enough for
timing), every ONNX variant of :mod:`lowbit.export.int_onnx` is run with every code tensor as an
extra graph output and compared with the NumPy integer reference (the model itself):

* ``propagated``: fraction of codes equal to the reference's (differences carried from earlier
  layers included);
* ``local``: the reference op run on onnxruntime's own input codes, compared with onnxruntime's
  output: the disagreement this layer makes by itself;
* prediction agreement on the images run.

``--profile``: onnxruntime's per-op-type time (1 thread, batch 256) of each variant and of
onnxruntime's own ``quantize_static`` int8 model of the FP32 twin (``ort_int8``; with
``--ort-per-channel`` also its per-channel form, ``ort_int8_pc``).

    python benchmarks/integer_ort.py RUN_DIR [--images 10000] [--profile]
    python benchmarks/integer_ort.py --calibrated --bits 2 --profile
    python benchmarks/integer_ort.py RUN_DIR --calibrated --no-agree --latency 10   # RUN_DIR's network and plan,
        # untrained and calibrated: timing a run whose best.pt is not on this machine
    python benchmarks/integer_ort.py --calibrated --bits 8 --weight lsq --model mobilenetv2 --residual output \
        --no-agree --latency 10      # 8-bit weights with an int8 grid: every conv a QLinearConv
    /work/tools/slot --all python benchmarks/integer_ort.py RUN_DIR --no-agree --latency 10
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from lowbit.data import BatchLoader, load_dataset
from lowbit.export.intgraph import IntReference


def calibrated(bits: int, weight: str = "sawb", model: str = "resnet8", residual: str = "accumulator"):
    """An untrained integer-mode network, BN statistics and activation ranges from 3 training-mode
    batches: for latency and profiles only (they do not depend on the weights' values)."""
    from lowbit import create_model, quantize

    data = load_dataset("fashion-mnist", limit=1000)
    torch.manual_seed(0)
    opts = {"width": 0.5} if model == "mobilenetv2" else {}
    m = create_model(model, in_channels=1, num_classes=10, image_size=28, **opts)
    wspec = {"name": weight, "bits": bits, **({"per_channel": True} if weight == "lsq" else {})}
    quantize(m, {"weight": wspec, "act": {"name": "pact", "bits": bits}, "integer": True,
                 "integer_residual": residual})
    return _calibrate(m, data)


def _calibrate(m, data):
    """BatchNorm statistics and activation ranges from 3 training-mode batches of 128; the model in eval mode."""
    xs, _ = zip(*BatchLoader(data.train, data.info, 128))
    m.train()
    with torch.no_grad():
        for x in xs[:3]:
            m(x)
    return m.eval()


def machine() -> dict:
    """What the timings depend on: onnxruntime's version and the CPU (its integer kernels differ with AVX-512 VNNI)."""
    import platform

    import onnxruntime as ort

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"onnxruntime": ort.__version__, "torch": torch.__version__, "cpu": cpu,
            "isa": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]}


def calibrated_like(run: str):
    """``run``'s network and plan (a run folder's config.yaml, or a config file), untrained and calibrated as
    :func:`calibrated` does: for timing a trained run whose best.pt is not on this machine (the latency does not
    depend on the weights' values)."""
    from lowbit.config import load_config
    from lowbit.train import build_model, load_data

    folder = Path(run).is_dir()
    cfg = load_config(Path(run) / "config.yaml" if folder else run, saved=folder)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"init_from": None})})
    data = load_data(cfg)
    return _calibrate(build_model(cfg, data), data), data.info


def with_outputs(model, names):
    """The ONNX model with every named tensor as an extra graph output."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(helper.make_tensor_value_info(n, TensorProto.UINT8, None))
    return m


def agreement(graph, models: dict, xn: np.ndarray, batch: int = 500) -> dict:
    from lowbit.export import onnx_export as ox

    T = graph.tensors
    names = [op.output for op in graph.ops if op.output in T and op.kind != "flatten"]
    out = {}
    for k, model in models.items():
        sess = ox.session(with_outputs(model, names))
        onames = [o.name for o in sess.get_outputs()]
        stats = defaultdict(lambda: [0, 0, 0, 0])  # equal, local-equal, count, max diff
        pred_same = 0
        ref = IntReference(graph)
        for i in range(0, len(xn), batch):
            xb = xn[i: i + batch]
            env = ref.tensors(xb)
            res = dict(zip(onames, sess.run(None, {sess.get_inputs()[0].name: xb.astype(np.float32)})))
            ort_env = {n: res[n].astype(np.int64).reshape(env[n].shape) for n in names}
            ort_env.update({n: ort_env[op.inputs[0]].reshape(len(xb), -1) for op in graph.ops if op.kind == "flatten"
                            for n in [op.output]})
            for op in graph.ops:
                if op.output not in names:
                    continue
                a, r = ort_env[op.output], env[op.output]
                loc = ref.run_op(op, ort_env, xb)
                s = stats[op.output]
                s[0] += int((a == r).sum())
                s[1] += int((a == loc).sum())
                s[2] += a.size
                s[3] = max(s[3], int(np.abs(a - r).max()))
            pred_same += int((res[graph.output].argmax(1) == env[graph.output].argmax(1)).sum())
        layers = {n: {"bits": T[n].bits, "propagated": s[0] / s[2], "local": s[1] / s[2], "max_diff": s[3]}
                  for n, s in stats.items()}
        out[k] = {"images": len(xn), "predictions_equal": pred_same, "layers": layers}
        print(f"{k}: predictions equal {pred_same}/{len(xn)}")
        for n, L in layers.items():
            print(f"   {n:28s} {L['bits']} bit  codes equal {L['propagated']:.5f}  local {L['local']:.5f}  "
                  f"max diff {L['max_diff']}")
    return out


def profile(models: dict, x: np.ndarray, runs: int = 3) -> dict:
    """Per-op-type milliseconds per batch (onnxruntime's profiler, 1 thread; mean of ``runs``)."""
    import onnxruntime as ort

    out = {}
    for k, model in models.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.enable_profiling = True
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=["WeightBiasQuantization"])
        name = sess.get_inputs()[0].name
        sess.run(None, {name: x})
        for _ in range(runs):
            sess.run(None, {name: x})
        prof = sess.end_profiling()
        ev = json.loads(Path(prof).read_text())
        Path(prof).unlink()
        t = defaultdict(float)
        for e in ev:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                t[e["args"]["op_name"]] += e["dur"] / 1000 / (runs + 1)
        out[k] = dict(sorted(t.items(), key=lambda kv: -kv[1]))
        print(k, {a: round(b, 1) for a, b in out[k].items()}, f"total {sum(t.values()):.1f} ms")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?")
    ap.add_argument("--calibrated", action="store_true")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--weight", default="sawb", help="--calibrated: the weight quantizer (sawb, lsq per channel)")
    ap.add_argument("--model", default="resnet8", choices=["resnet8", "mobilenetv2"],
                    help="--calibrated: the network (mobilenetv2: width 0.5)")
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--variants", default=None, help="comma-separated (default: every variant)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-agree", action="store_true")
    ap.add_argument("--latency", type=int, default=0, metavar="REPEATS",
                    help="median ms per batch of 256 (1 thread, sessions alternating) of every variant, "
                         "the FP32 twin and onnxruntime's quantize_static of it; run under slot --all")
    ap.add_argument("--ort-per-channel", action="store_true",
                    help="with --profile/--latency: also onnxruntime's quantize_static with per-channel weights "
                         "(ort_int8_pc), the form of integer mode's per-channel multipliers")
    ap.add_argument("--json", default=None)
    ap.add_argument("--residual", default=None, choices=["accumulator", "output"],
                    help="evaluate/export with this integer_residual instead of the run's")
    args = ap.parse_args()
    from lowbit.export.int_onnx import variants
    from lowbit.intmode import int_graph

    data = load_dataset("fashion-mnist")
    info = data.info
    if args.calibrated and args.run:
        model, info = calibrated_like(args.run)
    elif args.calibrated:
        model = calibrated(args.bits, args.weight, args.model, args.residual or "accumulator")
    else:
        from lowbit.train import load_run

        # the full test split, normalised as the run was (its mean/std come from its own training slice)
        _, run_data, model, _ = load_run(args.run)
        info = run_data.info
    xt, _ = zip(*BatchLoader(data.test, info, 1000))
    xn = torch.cat(xt)[: args.images].numpy().astype(np.float32)
    if args.residual:
        model._lowbit_state.plan.integer_residual = args.residual
    graph = int_graph(model, torch.from_numpy(xn[:1]))
    models = variants(graph)
    if args.variants:
        models = {k: models[k] for k in args.variants.split(",")}
    rep = {}
    if not args.no_agree:
        rep["agreement"] = agreement(graph, {k: v for k, v in models.items() if k != "fp32"}, xn)
    if (args.profile or args.latency) and "fp32" in models:
        import tempfile

        from lowbit.export.int_onnx import quantize_static_onnx

        with tempfile.TemporaryDirectory() as d:  # onnxruntime's own int8 model of the FP32 twin
            models["ort_int8"] = quantize_static_onnx(models["fp32"], xn[:200], Path(d) / "fp32.onnx",
                                                      Path(d) / "int8.onnx")
            if args.ort_per_channel:
                models["ort_int8_pc"] = quantize_static_onnx(models["fp32"], xn[:200], Path(d) / "fp32.onnx",
                                                             Path(d) / "int8_pc.onnx", per_channel=True)
    if args.profile:
        rep["profile_ms"] = profile(models, xn[:256])
    if args.latency:
        from lowbit.export import onnx_export as ox

        sessions = {k: ox.session(v) for k, v in models.items()}
        lat = ox.latency(sessions, xn[:256], args.latency)
        rep["latency_ms"] = lat
        rep["speedup_vs_fp32"] = {k: lat["fp32"] / v for k, v in lat.items()}
        print("latency ms (batch 256, 1 thread):", {k: round(v, 1) for k, v in lat.items()},
              "speed-up vs fp32:", {k: round(v, 2) for k, v in rep["speedup_vs_fp32"].items()})
    rep["machine"] = machine()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rep, indent=1))


if __name__ == "__main__":
    main()
