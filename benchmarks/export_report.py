"""Deployment benchmark: export trained runs and check every format against PyTorch.

For each run folder (config.yaml + best.pt): the packed file (size vs FP32 and vs the limit
1.02·Σ params·bits/8 + float32 numbers), the NumPy integer reference, the ONNX QDQ model run by
onnxruntime and the C99 code compiled with gcc, each compared with the PyTorch fake-quantized
model on the run's whole test set (prediction agreement, mismatches, max logit difference; C
also bit for bit against NumPy), onnxruntime latency QDQ vs the FP32 ONNX twin measured side by
side (1 thread, median over repeats), and the C flash/RAM vs seed 002's memory formula.

    python benchmarks/export_report.py benchmarks/results/qat_core/W2A2_PACT-SAWB \\
        benchmarks/results/qat_core/W1_BWN --out benchmarks/results/export

Artifacts go to OUT/<run name>/{packed,onnx,c}; the table to OUT/results.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lowbit.export import export_run, format_report


def row(name: str, r: dict) -> str:
    p, n, o, c = r["packed"], r["numpy"], r["onnx"], r["c"]
    m = c["mem_002"]

    def agree(x: dict) -> str:
        return f"{100 * x['agreement']:.2f} ({x['mismatches']}; {x['max_logit_diff']:.1e})"

    c_cell = f"{agree(c)}, bit-exact {c['bit_exact_images']}/{c['images']}" if c.get("compiled") else "not built"
    return (f"| {name} | {r['weight']} / {r['act']} | {100 * r['torch']['accuracy']:.2f} | "
            f"{p['fp32_bytes'] / 1024:.1f} | {p['file_bytes'] / 1024:.2f} | {p['limit_bytes'] / 1024:.2f} "
            f"{'ok' if p['within_limit'] else 'OVER'} | {p['vs_fp32']:.1f}x | "
            f"{agree(n)} | {agree(o)} | {c_cell} | "
            f"{o['latency_ms']['qdq']:.1f} / {o['latency_ms']['fp32']:.1f} = {o['latency_ratio']:.2f} | "
            f"{c['flash_bytes'] / 1024:.1f} | {c['ram_bytes'] / 1024:.1f} | {m['bytes'] / 1024:.1f} |")


HEADER = [
    ("| run | weight / act | PyTorch acc % | FP32 KiB | packed KiB | limit KiB | vs FP32 | NumPy agree % "
     "(mism.; max Δlogit) | ONNX agree % | C agree %, bit-exact vs NumPy | ORT ms QDQ / FP32 = ratio | "
     "C flash KiB | C RAM KiB | 002 Mem KiB |"),
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders (config.yaml + best.pt)")
    ap.add_argument("--out", default="benchmarks/results/export")
    ap.add_argument("--limit", type=int, default=None, help="first N test images only (quick checks)")
    ap.add_argument("--c-images", type=int, default=None, help="images through the C code (default: all)")
    ap.add_argument("--latency-batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=30, help="latency repeats (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (onnxruntime always uses 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    reports, rows = {}, []
    for rd in args.runs:
        name = Path(rd).name
        t0 = time.perf_counter()
        rep = export_run(rd, out_dir=out / name, limit=args.limit, c_images=args.c_images,
                         latency_batch=args.latency_batch, latency_repeats=args.repeats,
                         log=lambda s, n=name: print(f"[{n}] {s}", flush=True))
        rep["seconds"] = time.perf_counter() - t0
        print(format_report(rep), flush=True)
        reports[name] = rep
        rows.append(row(name, rep))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "runs": reports}, indent=2) + "\n")
    note = ("Agreement: share of test images whose predicted class equals the PyTorch fake-quantized model's "
            "(mismatching images; largest |logit difference|). Packed: model.safetensors incl. its header; "
            "limit = 1.02·Σ params·bits/8 + float32 numbers (scales, level sets, BN affine, FP32 first/last "
            "layers). onnxruntime: 1 thread, median of the repeats, QDQ and FP32 ONNX alternating, batch of "
            f"{args.latency_batch}. C RAM: float32 activation arena + code/row scratch; 002 Mem = params at "
            "their bits + largest activation at max(b, 4) bits.")
    notes = ["", note]
    table = "\n".join(HEADER + rows + notes)
    (out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
