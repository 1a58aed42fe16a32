"""QAT step-time overhead vs FP32, measured interleaved in one process.

Epoch times from separate runs drift with whatever else the machine does. Here every
configuration trains the same model on the same fixed batch, and the configurations take turns
(round-robin, ``--rounds`` times ``--steps`` steps each), so a slow moment hits all of them; the
ratio is the median step time of a configuration over FP32's.

    python benchmarks/qat_overhead.py --model resnet8 --threads 2 --rounds 5 --steps 10
    python benchmarks/qat_overhead.py --set dqa --threads 1 --rounds 3 --steps 5 --out benchmarks/results/dqa_overhead

``--set dqa`` times the rows of ``dqa_table.py`` (003 Tables 1-2); a step then includes the method's
per-batch work (temperature update, α normalisation, penalty), exactly as the training loop does.

Writes overhead.json and overhead.md into --out and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit.models import create_model
from lowbit.quantize import quant_state, quantize

CONFIGS = {
    "FP32": {},
    "W2 min-max": {"weight": {"name": "minmax", "bits": 2}},
    "W2 SAWB": {"weight": {"name": "sawb", "bits": 2}},
    "W2 LSQ": {"weight": {"name": "lsq", "bits": 2}},
    "W1 BWN": {"weight": {"name": "bwn", "bits": 1}},
    "W2A2 LSQ": {"weight": {"name": "lsq", "bits": 2}, "act": {"name": "lsq", "bits": 2}},
    "W2A2 PACT+SAWB": {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=["core", "dqa"], default="core", help="which configurations")
    ap.add_argument("--model", default="resnet8")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/qat_overhead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch_size,))
    if args.set == "dqa":
        from dqa_table import ROWS as configs  # the table's own rows, not a copy
    else:
        configs = CONFIGS
    total = (args.rounds * args.steps + 2) * len(configs)  # schedules span every step taken here
    setups = {}
    for label, plan in configs.items():
        torch.manual_seed(0)
        m = quantize(create_model(args.model, in_channels=1, num_classes=10, image_size=28), plan)
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        quant_state(m).method.setup(m, total, total)
        setups[label] = (m, opt)
    count = {id(m): 0 for m, _ in setups.values()}

    def step(m, opt):
        method = quant_state(m).method
        method.on_step(m, count[id(m)])
        count[id(m)] += 1
        loss = F.cross_entropy(m(x), y)
        extra = method.extra_loss(m)
        if extra is not None:
            loss = loss + extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for m, opt in setups.values():  # warm-up (allocator, LSQ init)
        for _ in range(2):
            step(m, opt)
    times: dict[str, list[float]] = {k: [] for k in setups}
    for _ in range(args.rounds):
        for label, (m, opt) in setups.items():
            for _ in range(args.steps):
                t = time.perf_counter()
                step(m, opt)
                times[label].append(time.perf_counter() - t)
    fp = statistics.median(times["FP32"])
    rows = [{"config": k, "step_ms": 1000 * statistics.median(v), "ratio": statistics.median(v) / fp}
            for k, v in times.items()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    md = ["| config | step ms (median) | ratio to FP32 |", "|---|---|---|"]
    md += [f"| {r['config']} | {r['step_ms']:.1f} | {r['ratio']:.2f} |" for r in rows]
    (out / "overhead.md").write_text("\n".join(md) + f"\n\n{json.dumps(vars(args))}\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
