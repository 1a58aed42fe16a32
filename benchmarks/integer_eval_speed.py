"""How long integer mode's evaluation takes: the integer network (``IntReference``, what ``model.eval()``
of an integer-mode model runs) against the fake-quantized float graph the same model trains (BatchNorm on
running statistics), on the same test images, one process, alternating, median of repeats.

    python benchmarks/integer_eval_speed.py RUN_DIR [RUN_DIR ...] --images 1000 --threads 1 \\
        --json benchmarks/results/integer_export/eval_speed/NAME.json

The float graph is the yardstick measured in the same run (wall time moves with the machine; the
ratio is what to compare across code versions). ``logits_sha256`` identifies the integer network's
logits bit for bit, so two versions of the code can be shown to compute the same numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from lowbit.data.transforms import normalize
from lowbit.export.intgraph import IntReference
from lowbit.intmode import int_graph
from lowbit.train import load_run


def measure(run_dir: str, images: int, repeats: int) -> dict:
    cfg, data, model, _ = load_run(run_dir)
    model.eval()
    x = normalize(data.test.images[:images], torch.tensor(data.info.mean), torch.tensor(data.info.std))
    graph = int_graph(model, x[:1])
    xn = x.numpy()
    gm = model._lowbit_state.integer.gm
    t_int, t_float, logits = [], [], None
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            logits = IntReference(graph).run(xn)
            t_int.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for i in range(0, len(x), 250):
                gm(x[i: i + 250])
            t_float.append(time.perf_counter() - t0)
    ti, tf = float(np.median(t_int)), float(np.median(t_float))
    return {"run": run_dir, "images": int(len(x)), "repeats": repeats, "integer_s": ti, "float_graph_s": tf,
            "integer_over_float": ti / tf, "logits_sha256": hashlib.sha256(np.ascontiguousarray(logits).tobytes()).hexdigest()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for r in a.runs:
        row = measure(r, a.images, a.repeats)
        rows.append(row)
        print(f"{Path(r).name:<28} {row['images']} images: integer {row['integer_s']:7.2f} s, float graph "
              f"{row['float_graph_s']:6.2f} s, ratio {row['integer_over_float']:5.2f}x  logits {row['logits_sha256'][:12]}",
              flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"threads": a.threads, "torch": torch.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
