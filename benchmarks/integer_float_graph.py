"""Where an integer-mode run loses accuracy: the fake-quantized float graph it trained (BatchNorm on
running statistics) against the integer network, on the first N test images of the run's own split,
plus the range of every tensor quantizer's learned parameter (PACT alpha, LSQ step).

    PYTHONPATH=src python benchmarks/integer_float_graph.py benchmarks/results/integer_export/mbv2/runs/MBV2_W8A8_int \\
        benchmarks/results/integer_export/mbv2/runs/MBV2_W4A4_int --images 1000
"""

from __future__ import annotations

import argparse

import torch

from lowbit.data import BatchLoader
from lowbit.train import load_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--images", type=int, default=1000)
    args = ap.parse_args()
    for run in args.runs:
        _, data, m, _ = load_run(run)
        xs, ys = zip(*BatchLoader(data.test, data.info, 500))
        x, y = torch.cat(xs)[: args.images], torch.cat(ys)[: args.images]
        with torch.no_grad():
            graph = (m._lowbit_state.integer.gm(x).argmax(1) == y).float().mean().item()
            integer = (m(x).argmax(1) == y).float().mean().item()
        params = sorted((float(p.detach().abs().max()), f"{n}.{pn}") for n, q in m.named_modules()
                        if n.endswith(("input_quantizer", "output_quantizer")) for pn, p in q.named_parameters())
        print(f"{run}: {len(x)} images, float graph {100 * graph:.2f} %, integer network {100 * integer:.2f} %; "
              f"tensor quantizer parameters {params[0][0]:.4g} ({params[0][1]}) .. {params[-1][0]:.4g} ({params[-1][1]})")


if __name__ == "__main__":
    main()
