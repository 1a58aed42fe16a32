"""The 8-bit LSQ activation quantizers of an integer-mode run: learned step against the statistics
of the tensor they quantize (one batch of the run's test split), and how many of the 256 codes the
batch uses. With ``integer_init: lsq`` (sessions 5-8) the steps start at 2·mean|v|/sqrt(Qp);
``max`` (session 9's default) at max|v|/Qp.

    PYTHONPATH=src python benchmarks/integer_lsq_steps.py benchmarks/results/integer_export/mbv2_ft/runs/FT_W8A8_int_out_r8_s0
"""

from __future__ import annotations

import argparse

import torch

from lowbit.data import BatchLoader
from lowbit.quant.uniform import LSQQuantizer
from lowbit.train import load_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dirs", nargs="+")
    ap.add_argument("--images", type=int, default=256)
    a = ap.parse_args()
    torch.set_num_threads(1)
    for run in a.run_dirs:
        cfg, data, m, _ = load_run(run)
        ist = m._lowbit_state.integer
        x = next(iter(BatchLoader(data.test, data.info, a.images)))[0]
        mods = dict(ist.gm.named_modules())
        seen: dict[str, torch.Tensor] = {}
        hooks = [q.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, i[0].detach()))
                 for n, q in mods.items() if isinstance(q, LSQQuantizer) and q.role == "act"]
        with torch.no_grad():
            ist.gm(x)
        for h in hooks:
            h.remove()
        print(f"{run} (plan.integer_init: {cfg.plan.integer_init})")
        print(f"  {'quantizer':40s} {'step':>7s} {'std':>6s} {'max|v|':>7s} {'step/std':>8s} {'grid/max':>8s} {'codes used':>10s}")
        for n, v in seen.items():
            q = mods[n]
            s = float(q.step.detach().abs())
            codes = torch.clamp(torch.round(v / s), -q.qn, q.qp)
            used = int(codes.max() - codes.min()) + 1
            print(f"  {n:40s} {s:7.4f} {float(v.std()):6.3f} {float(v.abs().max()):7.2f} {s / float(v.std()):8.3f} "
                  f"{q.qp * s / float(v.abs().max()):8.2f} {used:6d}/{q.qn + q.qp + 1}")


if __name__ == "__main__":
    main()
