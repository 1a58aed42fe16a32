"""SAWB vs min-max quantization MSE on Kaiming-initialised weights (docs/issue11_quant_contract.md).

Usage: python benchmarks/sawb_mse.py [auto|closed_form|mse]
"""
import torch, math
from torch import nn
from lowbit.quant import build_quantizer
from lowbit.quant.uniform import SAWB_COEFFS
torch.manual_seed(0)
shapes = [(16, 3, 3, 3), (16, 16, 3, 3), (32, 16, 3, 3), (64, 32, 3, 3), (64, 64, 3, 3), (10, 64)]
ws = []
for s in shapes:
    w = torch.empty(s); nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"); ws.append(w)
    w2 = torch.empty(s); nn.init.kaiming_uniform_(w2, a=math.sqrt(5)); ws.append(w2)  # torch default init
def mse(name, w, bits, pc, **o):
    q = build_quantizer(name, bits, per_channel=pc, **o)
    with torch.no_grad():
        y = q(w)
    zero_rows = int((y.flatten(1).abs().sum(1) == 0).sum()) if pc else int(y.abs().sum() == 0)
    return ((y - w) ** 2).mean().item() / (w ** 2).mean().item(), zero_rows
import sys
mode = sys.argv[1] if len(sys.argv) > 1 else "auto"
for pc in (False, True):
    print("per_channel" if pc else "per_tensor", "| relative MSE (mean over", len(ws), "tensors), zero rows")
    for bits in range(2, 9):
        r = {}
        for name, o in (("minmax", {}), ("sawb", {"alpha": mode}), ("sawb", {"alpha": "mse"})):
            if name == "sawb" and o["alpha"] == "closed_form" and bits not in SAWB_COEFFS:
                continue
            v = [mse(name, w, bits, pc, **o) for w in ws]
            r[name + ":" + o.get("alpha", "")] = (sum(a for a, _ in v) / len(v), sum(z for _, z in v))
        print(bits, "  ".join(f"{k} {m:.3e} ({z})" for k, (m, z) in r.items()))
