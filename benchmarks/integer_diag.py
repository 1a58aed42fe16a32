"""Integer mode diagnostic: how far is the fake-quantized float graph (what training sees, here with
BN on running statistics) from the integer network (what eval, test and export run)?

Trains a width-0.5 ResNet-8 at W2A2 in integer mode on 3,000 Fashion-MNIST images for 2 epochs, then
on the first 200 test images compares every tensor's codes (float graph: quantizer output / step +
zero; integer: the NumPy reference), and on the first 2,000 the predictions and accuracies.

    python benchmarks/integer_diag.py [RUN_DIR]
"""

from __future__ import annotations

import shutil
import sys

import numpy as np
import torch

from lowbit.config import Config
from lowbit.data import BatchLoader
from lowbit.export.intgraph import IntReference
from lowbit.intmode import int_graph
from lowbit.train import load_run, run


def main() -> None:
    d = sys.argv[1] if len(sys.argv) > 1 else "/tmp/integer_diag"
    cfg = {"model": {"name": "resnet8", "width": 0.5}, "data": {"name": "fashion-mnist", "limit": 3000},
           "plan": {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}, "integer": True,
                    "integer_residual": "accumulator", "integer_init": "lsq"},
           "train": {"epochs": 2, "batch_size": 64, "lr": 0.1, "threads": 1, "progress": False}}
    shutil.rmtree(d, ignore_errors=True)
    run(Config.model_validate(cfg), d)
    _, data, m, _ = load_run(d)
    xs, ys = zip(*BatchLoader(data.test, data.info, 1000))
    x, y = torch.cat(xs)[:2000], torch.cat(ys)[:2000]
    ist = m._lowbit_state.integer
    with torch.no_grad():
        yi, yf = m(x), ist.gm(x)
    print(f"integer acc {(yi.argmax(1) == y).float().mean():.4f}  float-graph acc {(yf.argmax(1) == y).float().mean():.4f}"
          f"  same prediction {(yi.argmax(1) == yf.argmax(1)).float().mean():.4f}")
    xs200 = x[:200]
    g = int_graph(m, xs200[:1])
    mods = dict(m.named_modules())
    cap = {}
    hooks = [mods[p].register_forward_hook(lambda mod, i, o, r=r: cap.__setitem__(r, o.detach()))
             for r, p in ist.quantizer.items()]
    with torch.no_grad():
        ist.gm(xs200)
    for h in hooks:
        h.remove()
    ref, T, env, xn = IntReference(g), g.tensors, {}, xs200.numpy()
    for op in g.ops:
        env[op.output] = ref.run_op(op, env, xn)
        if op.output in cap:
            t = T[op.output]
            cf = np.rint(cap[op.output].numpy() / t.scale) + t.zero
            ci = env[op.output].reshape(cf.shape)
            print(f"{op.output:24s} {t.bits} bit: codes equal {(cf == ci).mean():.4f}, max diff {np.abs(cf - ci).max():.0f}")


if __name__ == "__main__":
    main()
