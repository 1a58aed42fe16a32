"""Which onnxruntime kernel each conv of an integer-mode run gets (issue 17, session 21).

Per run: the conv/linear layers, the largest integer weight |m|, the layers whose weights do not fit int8
(``int_onnx.float_layers``: float32 ``Conv`` in onnxruntime, e.g. 8-bit SAWB's odd levels up to ±255) and the
layers whose weights go as uint8 (``int_onnx.uint8_weight_layers``: weights beyond ±64 on 8-bit codes, the
exact uint8 x uint8 kernel). The rest run on onnxruntime's uint8 x int8 ``QLinearConv``.

    python benchmarks/integer_onnx_kernels.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import sys

import numpy as np
import torch


def main() -> None:
    from lowbit.export.int_onnx import float_layers, uint8_weight_layers
    from lowbit.intmode import int_graph
    from lowbit.schedules.distill import example_input
    from lowbit.train import load_run

    torch.set_num_threads(1)
    print("| run | conv/linear layers | max abs integer weight | float32 Conv (beyond int8) | uint8 weights | uint8 x int8 |")
    print("|---|---|---|---|---|---|")
    for run in sys.argv[1:]:
        _, data, model, _ = load_run(run)
        g = int_graph(model, example_input(data.info, 1))
        convs = [op for op in g.ops if op.kind == "conv"]
        fl, u8 = float_layers(g), uint8_weight_layers(g)
        print(f"| {run} | {len(convs)} | {max(int(np.abs(op.m()).max()) for op in convs)} | {len(fl)} | {len(u8)} | "
              f"{len(convs) - len(fl) - len(u8)} |")


if __name__ == "__main__":
    main()
