"""Integer-only deployment benchmark (issue 17): integer-mode QAT vs today's mode, and the export.

Part 1 (``--train``): ResNet-8 on a Fashion-MNIST slice (``--limit`` training images, ``--epochs``),
W2A2 / W4A4 / W8A8 (SAWB weights, PACT activations), each in today's mode (first conv / last
linear FP32, float BN, float residuals) and in integer mode (``plan.integer: true``: every layer
quantized, BN as per-channel requantization, residual adds and pooling on codes); test accuracy at
the best validation epoch. Runs through ``lowbit.bench.run_grid`` (finished runs are skipped).

Part 2 (``--export``): every integer run exported (integer package, C, integer ONNX) and checked
on the whole test set: agreement with the PyTorch integer-mode model (NumPy reference from the
file, C build, ONNX), C RAM vs seed 002's Mem, C flash vs the packed size, onnxruntime latency of
the integer ONNX vs the FP32 ONNX vs onnxruntime's own ``quantize_static`` of that FP32 model.

    python benchmarks/integer_export.py --train --limit 10000 --epochs 3     # slot
    python benchmarks/integer_export.py --export --c-images 2000              # slot
    python benchmarks/integer_export.py --mbv2                                # slot (untrained MobileNetV2)
    /work/tools/slot --all python benchmarks/integer_export.py --latency      # timing, both cores held
    python benchmarks/integer_export.py --table                               # results.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OUT = Path("benchmarks/results/integer_export")
BITS = (2, 4, 8)


def rows() -> dict:
    r = {}
    for b in BITS:
        plan = {"weight": {"name": "sawb", "bits": b}, "act": {"name": "pact", "bits": b}}
        r[f"W{b}A{b} today"] = {"plan": plan}
        r[f"W{b}A{b} integer"] = {"plan": {**plan, "integer": True, "integer_residual": "accumulator",
                                                  "integer_init": "lsq"}}
    return r


def train(args) -> None:
    from lowbit.bench import aggregate, run_grid, write_results

    base = {
        "model": {"name": "resnet8"},
        "data": {"name": "fashion-mnist", "limit": args.limit},
        "train": {"epochs": args.epochs, "batch_size": 128, "lr": 0.1, "schedule": "cosine", "threads": 1,
                  "progress": False},
    }
    records = run_grid(rows(), base, [0], OUT / "runs", workers=1)
    agg = aggregate(records, reference="W8A8 today")
    print(write_results(OUT / "runs", records, agg, reference="W8A8 today", meta=vars(args)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--export", action="store_true")
    ap.add_argument("--limit", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--c-images", type=int, default=None, help="images through the C build (default: all)")
    ap.add_argument("--only", default=None, help="export only runs whose name contains this")
    ap.add_argument("--mbv2", action="store_true", help="export an untrained (BN-calibrated) MobileNetV2")
    ap.add_argument("--latency", action="store_true", help="onnxruntime timing of the exported ONNX files")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.train:
        train(args)
    if args.export:
        from lowbit.export.int_api import export_int_runs

        runs = [r for r in sorted((OUT / "runs").glob("*integer*/seed0")) if args.only is None or args.only in str(r)]
        export_int_runs(runs, OUT / "reports", c_images=args.c_images)
    if args.mbv2:
        mbv2(args)
    if args.latency:
        latency()
    if args.table:
        print(table())


def mbv2(args) -> None:
    """MobileNetV2 (width 0.5) at W4A4 and W8A8 in integer mode, untrained: BN statistics and
    quantizer ranges from 3 training-mode passes over 256 training images (no optimizer step);
    exported and checked like a trained run on the first 2,000 test images (no accuracy claim: the
    network is untrained)."""
    import torch

    from lowbit import create_model, quantize
    from lowbit.data import BatchLoader, load_dataset
    from lowbit.export.int_api import export_int_model, format_int_report

    data = load_dataset("fashion-mnist")
    xs, _ = zip(*BatchLoader(data.train, data.info, 256))
    xt, yt = zip(*BatchLoader(data.test, data.info, 1000))
    x, y = torch.cat(xt)[:2000], torch.cat(yt)[:2000]  # PARTIAL: 2,000 test images (machine time)
    for b in (4, 8):
        name = f"mobilenetv2_w0.5_W{b}A{b}_integer_untrained"
        if (OUT / "reports" / f"{name}.json").is_file():
            continue
        torch.manual_seed(0)
        m = create_model("mobilenetv2", in_channels=1, num_classes=10, image_size=28, width=0.5)
        quantize(m, {"weight": {"name": "sawb", "bits": b}, "act": {"name": "pact", "bits": b}, "integer": True,
                     "integer_residual": "accumulator", "integer_init": "lsq"})
        m.train()
        with torch.no_grad():
            for i in range(3):
                m(xs[i])
        rep = export_int_model(m, x, OUT / "reports" / "export" / name, labels=y, c_images=args.c_images or 200,
                               latency_repeats=0, meta={"model": "mobilenetv2", "width": 0.5, "untrained": True})
        rep["run"] = name
        (OUT / "reports" / f"{name}.json").write_text(json.dumps(rep, indent=1, default=float))
        print(format_int_report(rep))


def latency(batch: int = 256, repeats: int = 20) -> None:
    """onnxruntime, 1 thread, median ms per batch: integer (ConvInteger), integer (QLinearConv),
    FP32 twin and quantize_static of the FP32 twin, sessions alternating."""
    import numpy as np
    import onnx
    import torch

    from lowbit.data import BatchLoader, load_dataset
    from lowbit.export import onnx_export as ox
    from lowbit.export.int_api import onnx_latency

    data = load_dataset("fashion-mnist")
    xt, _ = zip(*BatchLoader(data.test, data.info, batch))
    x = torch.cat(xt)[:batch].numpy().astype(np.float32)
    res = {}
    for d in sorted((OUT / "reports" / "export").glob("*/onnx")):
        files = {"integer": "model_integer.onnx", "integer_fused": "model_integer_fused.onnx",
                 "fp32": "model_fp32.onnx", "ort_int8": "model_ort_int8.onnx"}
        sessions = {k: ox.session(onnx.load(str(d / f))) for k, f in files.items()}
        res[d.parent.name] = onnx_latency(sessions, x, repeats)
        print(d.parent.name, res[d.parent.name])
    (OUT / "latency.json").write_text(json.dumps(res, indent=1))


def table() -> str:
    """results.md from the reports, the runs' summaries and latency.json."""
    reports = {p.stem: json.loads(p.read_text()) for p in sorted((OUT / "reports").glob("*.json"))}
    lat = json.loads((OUT / "latency.json").read_text()) if (OUT / "latency.json").is_file() else {}
    summ = {}
    for p in (OUT / "runs").glob("*/seed0/summary.json"):
        summ[p.parent.parent.name] = json.loads(p.read_text())
    lines = ["| model | acc % integer mode (today's mode) | NumPy bit-exact | C bit-exact (images) | ONNX ConvInteger / "
             "QLinearConv / ORT int8 agree | packed B (numbers / file) | C flash B | C RAM B | 002 Mem B (integer model / "
             "today's) | RAM / Mem (integer / today's) | ORT ms ConvInteger / QLinearConv / FP32 / quantize_static |",
             "|" + "---|" * 11]
    for name, r in reports.items():
        today = summ.get(name.replace("integer", "today"))
        acc_t = f" ({100 * today['test_acc']:.2f})" if today else ""
        acc = r["torch"]["accuracy"]
        acc_s = ("untrained" if "untrained" in name else f"{100 * acc:.2f}") + acc_t
        mem = r["c"]["mem_002"]["bytes"]
        mem_t = today["mem_002_bits"] / 8 if today else None
        ram = r["c"]["ram_bytes"]
        o = r["onnx"]
        agree = " / ".join(f"{o[k]['images'] - o[k]['mismatches']}" for k in ("integer", "integer_fused", "ort_int8"))
        L = lat.get(name, {}).get("latency_ms")
        lat_s = " / ".join(f"{L[k]:.1f}" for k in ("integer", "integer_fused", "fp32", "ort_int8")) if L else "-"
        lines.append(
            f"| {name} | {acc_s} | {r['numpy']['bit_exact_images']}/{r['images']} | {r['c']['bit_exact_images']}/"
            f"{r['c']['images']} | {agree} of {o['integer']['images']} | {r['packed']['numbers_bytes']} / "
            f"{r['packed']['file_bytes']} | {r['c']['flash_bytes']} (+{r['c']['descriptor_bytes']}) | {ram} | "
            f"{mem:.0f} / {mem_t:.0f} | {ram / mem:.2f} / {ram / mem_t:.2f} | {lat_s} |" if mem_t else
            f"| {name} | {acc_s} | {r['numpy']['bit_exact_images']}/{r['images']} | {r['c']['bit_exact_images']}/"
            f"{r['c']['images']} | {agree} of {o['integer']['images']} | {r['packed']['numbers_bytes']} / "
            f"{r['packed']['file_bytes']} | {r['c']['flash_bytes']} (+{r['c']['descriptor_bytes']}) | {ram} | "
            f"{mem:.0f} / - | {ram / mem:.2f} / - | {lat_s} |")
    text = "\n".join(lines) + "\n"
    (OUT / "results.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
