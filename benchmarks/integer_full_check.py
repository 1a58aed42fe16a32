"""Export checks of one integer-mode run on the FULL Fashion-MNIST test set (10,000 images, whatever the
run's own ``data.limit``): PyTorch integer model, the packed file through NumPy, the C build on every
image, and the ONNX variants (issue 17: "agreement with PyTorch on all 10,000 test images for every backend").

    PYTHONPATH=src python benchmarks/integer_full_check.py benchmarks/results/mcu/runs/W8A8_int \\
        --json benchmarks/results/integer_export/full_W8A8.json

``--residual output`` exports the run's weights with ``integer_residual: output`` instead of the
run's own residual add (the same trained network, the onnxruntime-exact add; the report says so);
``--bias fine`` likewise with ``integer_bias: fine`` (each layer's integer weights scaled by 2^k).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lowbit.data import BatchLoader, load_dataset
from lowbit.export.api import load_run
from lowbit.export.int_api import export_int_model, format_int_report


def full_test_split(cfg, run_data) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole test split of the run's dataset, normalised as the run was (its mean/std come from
    its own training slice): (images, labels)."""
    data = load_dataset(cfg.data.name, root=cfg.data.root)
    xs, ys = zip(*BatchLoader(data.test, run_data.info, 1000))
    return torch.cat(xs), torch.cat(ys)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--json", required=True, help="report file (committed)")
    ap.add_argument("--export-dir", default="/tmp/lowbit_full_check", help="export files (not committed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--c-images", type=int, default=None,
                    help="run the C build on the first N test images only (default: all; MobileNetV2's C build "
                         "takes about 0.15 s per image here)")
    ap.add_argument("--residual", choices=("accumulator", "output"), default=None,
                    help="export with this integer_residual instead of the run's")
    ap.add_argument("--bias", choices=("fine", "coarse"), default=None,
                    help="export with this integer_bias instead of the run's (same weights)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cfg, run_data, model = load_run(Path(args.run_dir))
    plan = model._lowbit_state.plan
    trained_with = plan.integer_residual
    if args.residual:
        plan.integer_residual = args.residual
    recorded_bias = plan.integer_bias
    if args.bias:
        plan.integer_bias = args.bias
    x, y = full_test_split(cfg, run_data)
    rep = export_int_model(model, x, args.export_dir, labels=y, c_images=args.c_images, latency_repeats=0, log=print)
    rep.update(run=args.run_dir, seconds=time.perf_counter() - t0, integer_residual=plan.integer_residual,
               trained_with_integer_residual=trained_with, integer_residual_bits=plan.integer_residual_bits,
               integer_bias=plan.integer_bias, trained_with_integer_bias=recorded_bias)
    Path(args.json).write_text(json.dumps(rep, indent=1, default=float))
    print(format_int_report(rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
