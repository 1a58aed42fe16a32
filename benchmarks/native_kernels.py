"""The native activation kernels (``lowbit.quant.native``) against the torch kernels, one op at a time.

Each row times one training-path operation on a ResNet-8-sized activation (batch 128, 16 channels,
28x28: 1.6 M floats) or weight (64x64x3x3), with the native kernels off ("torch") and on ("native"),
alternating, and reports the median of ``--repeats`` calls (milliseconds) and their ratio. Forward and
backward are timed together through autograd, as training runs them, and each call's minor page
faults are counted (a fresh 6.4 MB buffer that glibc maps anew costs ~1,600 of them). Run alone on
the machine; the single-member rows move by ~2x between processes (see the results README).

    OMP_NUM_THREADS=1 python benchmarks/native_kernels.py --threads 1 --json benchmarks/results/qat_overhead_core/native_kernels_t1.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch

from lowbit.methods.mixture import fused_mix
from lowbit.quant import build_quantizer, native
from lowbit.quant.functional import _ClipRound, _LSQFn


def cases():
    torch.manual_seed(0)
    x = torch.randn(128, 16, 28, 28).relu_() * 2
    g = torch.randn_like(x)
    w = torch.randn(64, 64, 3, 3) * 0.05
    pact = [build_quantizer("pact", b, role="act", init=i) for b, i in ((2, 1.5), (4, 2.5), (8, 3.0))]
    minmax = [build_quantizer("minmax", b, role="act") for b in (2, 4, 8)]
    c = torch.softmax(torch.tensor([0.3, -0.2, 0.1]), 0)

    def clip_round():
        xr, hr = x.clone().requires_grad_(True), torch.tensor(1.5, requires_grad=True)
        _ClipRound.apply(xr, torch.tensor(0.0), hr, 3).backward(g)

    def lsq():
        vr, sr = x.clone().requires_grad_(True), torch.tensor(0.4, requires_grad=True)
        _LSQFn.apply(vr, sr, 0, 3, 0.01).backward(g)

    def mixture(members):
        def run():
            xr, cr = x.clone().requires_grad_(True), c.clone().requires_grad_(True)
            fused_mix(xr, cr, members).backward(g)
        return run

    sawb2, sawb8 = build_quantizer("sawb", 2, role="weight"), build_quantizer("sawb", 8, role="weight")
    return {
        "PACT 2-bit clip-round, forward + backward (1.6 M)": clip_round,
        "LSQ 2-bit, forward + backward (1.6 M)": lsq,
        "DQA mixture PACT 2/4/8, forward + backward (1.6 M)": mixture(pact),
        "DQA mixture min-max 2/4/8, forward + backward (1.6 M)": mixture(minmax),
        "SAWB 2-bit alpha, closed form + auto check (37 k weights)": lambda: sawb2.alpha(w),
        "SAWB 8-bit alpha, MSE search (37 k weights)": lambda: sawb8.alpha(w),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not native.available():
        raise SystemExit(f"the native kernels are not available: {native._state['failed'] or 'LOWBIT_NATIVE=0'}")
    rows = []
    for name, fn in cases().items():
        times, faults = {False: [], True: []}, {False: [], True: []}
        for on in (False, True):  # warm-up
            native.enable(on)
            fn()
        for _ in range(args.repeats):
            for on in (False, True):
                native.enable(on)
                f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t = time.perf_counter()
                fn()
                times[on].append(time.perf_counter() - t)
                faults[on].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
        native.enable(True)
        t0, t1 = statistics.median(times[False]) * 1e3, statistics.median(times[True]) * 1e3
        rows.append({"op": name, "torch_ms": round(t0, 3), "native_ms": round(t1, 3), "speedup": round(t0 / t1, 2),
                     "torch_faults": statistics.median(faults[False]), "native_faults": statistics.median(faults[True])})
    md = [f"| op ({args.threads} thread{'s' if args.threads > 1 else ''}, median of {args.repeats}) | torch ms | "
          "native ms | torch / native | page faults per call, torch / native |", "|---|---|---|---|---|"]
    md += [f"| {r['op']} | {r['torch_ms']:.2f} | {r['native_ms']:.2f} | {r['speedup']:.2f} | "
           f"{r['torch_faults']:.0f} / {r['native_faults']:.0f} |" for r in rows]
    print("\n".join(md))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "torch": torch.__version__, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
