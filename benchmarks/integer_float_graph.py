"""Where an integer-mode run loses accuracy: the fake-quantized float graph it trained (BatchNorm on
running statistics) against the integer network, on the first N test images of the run's own split,
plus the range of every tensor quantizer's learned parameter (PACT alpha, LSQ step). With
``--layers N``: tensor by tensor, in graph order, on the first N images, how many codes of the
float graph's quantizer output differ from the integer network's codes, the largest difference,
and each conv's accumulator unit in output codes (``|real multiplier|``: the integer network rounds
a folded BatchNorm's shift to whole accumulator units, up to half of that many codes of error).
``--mid``: the float graph also rounds each output-form residual conv to the integer network's 8-bit
intermediate ``mid`` (step ``s_mid``, zero ``mid_zero``; forward hooks, evaluation only), to see how
much of the difference that rounding accounts for where training did not model it (``plan.integer_train_mid``). ``--bias fine``
(or ``coarse``): evaluate the integer network with that ``plan.integer_bias`` instead of the run's.
``--mid-grid``: per output-form residual conv, how coarse ``mid`` is: its step and the residual's in
output steps, and the conv output's spread in ``mid`` steps (on the first 500 images).
``--skip-integer`` leaves out the integer network (NumPy; minutes on MobileNetV2's 8,000 test images,
whose accuracy is the run's own ``test_acc``). ``--unround-outputs``: also the float graph with every
``output_quantizer`` bypassed (the tensors integer mode stores for a residual add or a pooling, e.g.
MobileNetV2's 8-bit residual stream, left unrounded; evaluation only): what rounding them costs the
trained network.

    PYTHONPATH=src python benchmarks/integer_float_graph.py benchmarks/results/integer_export/mbv2/runs/MBV2_W8A8_int \\
        benchmarks/results/integer_export/mbv2/runs/MBV2_W4A4_int --images 1000
    PYTHONPATH=src python benchmarks/integer_float_graph.py benchmarks/results/integer_export/mbv2/runs/MBV2_W8A8_int \\
        --images 1000 --layers 200
    PYTHONPATH=src python benchmarks/integer_float_graph.py benchmarks/results/integer_export/seeds/W8A8_integer_out_r8/seed0 \\
        --images 1000 --layers 200 --mid
    PYTHONPATH=src python benchmarks/integer_float_graph.py benchmarks/results/integer_export/mbv2_ft/runs/FT_W8A8s_int13_fzl_s0 \\
        --images 8000 --unround-outputs --skip-integer
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from lowbit.data import BatchLoader
from lowbit.export.intgraph import mid_step
from lowbit.export.requant import real_multiplier
from lowbit.intmode import code_agreement, int_graph, round_to_mid
from lowbit.train import load_run


def layers(m, x: torch.Tensor, g) -> None:
    """Per tensor: float graph (eval) vs integer network ``g`` codes, and each conv's accumulator unit."""
    agree = code_agreement(m, x, g)
    units = {op.output: op for op in g.ops}
    print(f"  {'tensor':28s} {'bits':>4s} {'differ %':>8s} {'max':>4s} {'acc unit (codes)':>16s}")
    for name, (bits, frac, big) in agree.items():
        op = units[name]
        unit = f"{np.abs(real_multiplier(op.mult, op.shift)).max():.3g}" if op.mult is not None else "-"
        print(f"  {name:28s} {bits:4d} {100 * frac:8.2f} {big:4d} {unit:>16s}")


def residual_convs(m, g):
    """(op, module) for each output-form residual conv of ``g``: the module whose output is the
    conv(+BN) value that the integer network requantizes to ``mid`` (its BatchNorm, else the conv)."""
    units = {u.name: u for u in m._lowbit_state.integer.units}
    for op in g.ops:
        if op.kind == "conv" and op.attrs.get("residual") == "output":
            u = units[op.name]
            yield op, (u.bn if u.bn is not None else u.module)


def mid_hooks(m, g) -> list:
    """Forward hooks that round each output-form residual conv's (BN) output to ``mid``'s grid."""
    hooks = []
    for op, mod in residual_convs(m, g):
        s_mid = mid_step(op, g.tensors[op.output])
        z = op.attrs["mid_zero"]
        hooks.append(mod.register_forward_hook(lambda _m, _i, o, s=s_mid, z=z: round_to_mid(o, s, z)))
        print(f"  {op.name}: mid step = {s_mid / g.tensors[op.output].scale:g} x the output step")
    return hooks


def mid_grid(m, g, x: torch.Tensor) -> None:
    """Per output-form residual conv: ``mid``'s step and the residual's step in output steps, and the
    conv(+BN) output (the float graph, before any rounding to ``mid``) in ``mid`` steps: its standard
    deviation and the share of values outside ``mid``'s 0..255 (clamped)."""
    seen = {}
    hooks = [mod.register_forward_hook(lambda _m, _i, o, k=op.name: seen.__setitem__(k, o.detach()))
             for op, mod in residual_convs(m, g)]
    with torch.no_grad():
        m._lowbit_state.integer.gm(x)
    for h in hooks:
        h.remove()
    print(f"  {'conv':28s} {'mid/out step':>12s} {'res/out step':>12s} {'std (mid steps)':>15s} {'clamped %':>9s}")
    for op in g.ops:
        if op.name not in seen:
            continue
        t_out, t_res = g.tensors[op.output], g.tensors[op.inputs[1]]
        s_mid = mid_step(op, t_out)
        q = torch.round(seen[op.name] / s_mid) + op.attrs["mid_zero"]
        out = ((q < 0) | (q > 255)).float().mean().item()
        print(f"  {op.name:28s} {s_mid / t_out.scale:12g} {t_res.scale / t_out.scale:12.3g} "
              f"{(seen[op.name].std() / s_mid).item():15.2f} {100 * out:9.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--layers", type=int, default=0, metavar="N",
                    help="also compare the float graph and the integer network tensor by tensor on N images")
    ap.add_argument("--mid", action="store_true",
                    help="round the float graph's output-form residual convs to the integer network's 8-bit mid")
    ap.add_argument("--mid-grid", action="store_true",
                    help="each output-form residual conv's mid step, residual step and output spread (in mid steps)")
    ap.add_argument("--skip-integer", action="store_true",
                    help="do not run the integer network (its accuracy on the whole test split is the run's test_acc)")
    ap.add_argument("--unround-outputs", action="store_true",
                    help="also the float graph with every output_quantizer bypassed (residual streams, pooled tensors)")
    ap.add_argument("--bias", choices=["fine", "coarse"], default=None,
                    help="the integer network's bias (plan.integer_bias; default: as the run recorded it)")
    args = ap.parse_args()
    for run in args.runs:
        _, data, m, _ = load_run(run)
        if args.bias:
            m._lowbit_state.plan.integer_bias = args.bias
        xs, ys = zip(*BatchLoader(data.test, data.info, 500))
        x, y = torch.cat(xs)[: args.images], torch.cat(ys)[: args.images]
        g = int_graph(m, x[:1])  # the integer network, as m(x) runs it in eval without hooks
        with torch.no_grad():
            # before any hook: the integer network (NumPy, slow: --skip-integer leaves it out)
            integer = float("nan") if args.skip_integer else (m(x).argmax(1) == y).float().mean().item()
            hooks = mid_hooks(m, g) if args.mid else []
            graph = (m._lowbit_state.integer.gm(x).argmax(1) == y).float().mean().item()
        params = sorted((float(p.detach().abs().max()), f"{n}.{pn}") for n, q in m.named_modules()
                        if n.endswith(("input_quantizer", "output_quantizer")) for pn, p in q.named_parameters())
        shown = "not run (--skip-integer)" if args.skip_integer else f"{100 * integer:.2f} %"
        print(f"{run}: {len(x)} images, float graph {100 * graph:.2f} %, integer network {shown}; "
              f"tensor quantizer parameters {params[0][0]:.4g} ({params[0][1]}) .. {params[-1][0]:.4g} ({params[-1][1]})")
        if args.unround_outputs:
            outs = [q for n, q in m._lowbit_state.integer.gm.named_modules() if n.endswith("output_quantizer")]
            bypass = [q.register_forward_hook(lambda _m, i, _o: i[0]) for q in outs]
            with torch.no_grad():
                free = (m._lowbit_state.integer.gm(x).argmax(1) == y).float().mean().item()
            for h in bypass:
                h.remove()
            print(f"  float graph with its {len(outs)} output quantizers bypassed: {100 * free:.2f} % "
                  f"({100 * (free - graph):+.2f} points)")
        if args.layers:
            layers(m, x[: args.layers], g)
        if args.mid_grid:
            mid_grid(m, g, x[:500])
        for h in hooks:
            h.remove()


if __name__ == "__main__":
    main()
