"""000 Table 4 analogue: training time and peak memory of RDHS and SGT relative to FP32, at 1/2/3 bits.

Every configuration (FP32; BinaryConnect = sign-STE over {±1}, as the plain-QAT reference; SGT and
RDHS over {±1}, {±1, ±1/2}, {±1, ±1/2, ±1/4, ±1/8}) trains in a FRESH Python process, so its peak
resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own: the same model, batch
size, optimizer (SGD, momentum, weight decay: ``lowbit.train.build_optimizer``) and method hooks
as ``lowbit train``, on one fixed random batch (a batch's values do not change the cost of a
step), ``--warmup`` untimed steps then ``--steps`` timed ones. The processes take turns
(``--repeats`` rounds, the order rotated each round), so a slow moment of a shared machine hits
all configurations alike; a configuration's time ratio is the median over rounds of its median
step time over FP32's in the same round.

    python benchmarks/valuesearch_cost.py --model resnet20 --threads 1 --repeats 3 --steps 20 \\
        --out benchmarks/results/valuesearch_cost

Memory is reported three ways: the whole process's peak (torch itself is ~300 MB of it, the same
in every configuration); the training increment (peak minus the resident size after the model
was built, before the first step: activations, gradients, optimizer state, the method's
temporaries; both are subject to the allocator's reuse, so differences of a few MiB are noise);
and, exactly, the bytes autograd saves for the backward pass of one step (where RDHS's softmax
and SGT's one-byte index show). 000's Table 4 counts GPU memory, closest to the last two.
"weight path ms" times the quantized weights' forward + backward alone (no convolutions): the
part of a step each method adds, which on a small CNN with a large batch is a small share of it.
Epoch time is the step time times the steps of one Fashion-MNIST epoch (57,000 training images).
Writes cost.json and cost.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETS = {1: ("binary", "{±1}"), 2: ("po2-2bit", "{±1, ±1/2}"), 3: ("po2-3bit", "{±1, ±1/2, ±1/4, ±1/8}")}
TRAIN_IMAGES = 57_000  # Fashion-MNIST training split less the 5% validation


def configs() -> dict[str, dict]:
    """Label -> plan."""
    vs = lambda b: {"name": "valueset", "values": SETS[b][0], "scale": "none"}  # noqa: E731
    out = {"FP32": {}, "BinaryConnect (STE) {±1}": {"weight": vs(1), "method": {"name": "ste"}}}
    for b in SETS:
        out[f"SGT {b} bit"] = {"weight": vs(b), "method": {"name": "sgt"}}
        out[f"RDHS {b} bit"] = {"weight": vs(b), "method": {"name": "rdhs", "mu": 0.0}}
    return out


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---------------------------------------------------------------------------------------------
# one configuration, in its own process
# ---------------------------------------------------------------------------------------------
def worker(label: str, args) -> dict:
    import torch
    import torch.nn.functional as F

    from lowbit.config import TrainConfig
    from lowbit.models import create_model
    from lowbit.quantize import quant_state, quantize
    from lowbit.train import build_optimizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = quantize(create_model(args.model, in_channels=1, num_classes=10, image_size=28), configs()[label])
    method = quant_state(model).method
    n = args.warmup + args.steps
    opt = build_optimizer(model, TrainConfig(lr=0.1, weight_decay=5e-4))
    method.setup(model, n, n)
    x = torch.randn(args.batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch_size,))
    model.train()
    rss_before = rss_mib()
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        method.on_step(model, i)
        loss = F.cross_entropy(model(x), y)
        extra = method.extra_loss(model)
        if extra is not None:
            loss = loss + extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    rss_peak = rss_mib()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"label": label, "step_s": statistics.median(times[args.warmup:]), "rss_before_mib": rss_before,
            "rss_peak_mib": rss_peak, "saved_mib": saved_for_backward(model, x, y) / 2**20,
            "weight_path_ms": 1e3 * weight_path_s(model), "trainable_params": trainable}


def weight_path_s(model, reps: int = 10) -> float:
    """Median time of the quantized weights' own forward + backward (every parametrized layer's
    ``layer.weight`` and its gradient to the trainable tensor), without the convolutions: the
    part of a step a method adds, isolated. 0 for FP32."""
    import torch
    from torch.nn.utils import parametrize

    layers = [m for m in model.modules() if parametrize.is_parametrized(m, "weight")]
    if not layers:
        return 0.0
    grads = [torch.randn_like(m.weight) for m in layers]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.autograd.backward([m.weight for m in layers], grads)
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return statistics.median(times)


def saved_for_backward(model, x, y) -> int:
    """Bytes autograd keeps for the backward pass of one step (each tensor once): activations,
    weights, and what the method's autograd functions save (RDHS: y; SGT: one byte per weight).
    Exact and free of allocator noise, unlike the RSS."""
    import torch
    import torch.nn.functional as F

    seen: dict = {}

    def pack(t):
        key = (t.data_ptr(), t.numel(), t.dtype)
        seen[key] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    del loss
    return sum(seen.values())


# ---------------------------------------------------------------------------------------------
# the driver: fresh processes, interleaved rounds
# ---------------------------------------------------------------------------------------------
def run_one(label: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", label, "--model", args.model, "--batch-size", str(args.batch_size),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{label}: worker failed\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def summarise(rounds: list[dict[str, dict]], labels: list[str]) -> list[dict]:
    rows = []
    for lb in labels:
        rs = [r[lb] for r in rounds]
        time_ratio = statistics.median(r[lb]["step_s"] / r["FP32"]["step_s"] for r in rounds)
        inc = lambda d: d["rss_peak_mib"] - d["rss_before_mib"]  # noqa: E731
        peak = statistics.median(d["rss_peak_mib"] for d in rs)
        rows.append({
            "config": lb,
            "step_s": statistics.median(d["step_s"] for d in rs),
            "epoch_s": statistics.median(d["step_s"] for d in rs) * math.ceil(TRAIN_IMAGES / rs[0].get("batch", 128)),
            "time_ratio": time_ratio,
            "rss_peak_mib": peak,
            "peak_ratio": statistics.median(d["rss_peak_mib"] / r["FP32"]["rss_peak_mib"] for d, r in zip(rs, rounds)),
            "train_mib": statistics.median(inc(d) for d in rs),
            "train_ratio": statistics.median(inc(d) / max(inc(r["FP32"]), 1e-9) for d, r in zip(rs, rounds)),
            "saved_mib": rs[0]["saved_mib"],
            "weight_path_ms": statistics.median(d["weight_path_ms"] for d in rs),
            "saved_ratio": rs[0]["saved_mib"] / rounds[0]["FP32"]["saved_mib"],
            "trainable_params": rs[0]["trainable_params"],
            "rounds": len(rs),
        })
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| configuration | step s | epoch s (est.) | time / FP32 | peak RSS MiB | peak / FP32 | "
             "training increment MiB | increment / FP32 | saved for backward MiB | saved / FP32 | weight path ms "
             "| trainable params |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['step_s']:.3f} | {r['epoch_s']:.0f} | {r['time_ratio']:.2f} | "
                     f"{r['rss_peak_mib']:.0f} | {r['peak_ratio']:.2f} | {r['train_mib']:.0f} | "
                     f"{r['train_ratio']:.2f} | {r['saved_mib']:.1f} | {r['saved_ratio']:.3f} | "
                     f"{r['weight_path_ms']:.2f} | {r['trainable_params']:,} |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    """000 Table 4's claims and the issue's targets, on these numbers."""
    by = {r["config"]: r for r in rows}
    out = []
    for b in SETS:
        s, d = by.get(f"SGT {b} bit"), by.get(f"RDHS {b} bit")
        if not (s and d):
            continue
        out.append(f"- {b} bit: SGT time {s['time_ratio']:.2f}x (target <= 1.2), increment {s['train_ratio']:.2f}x, "
                   f"peak {s['peak_ratio']:.2f}x (target <= 1.1); RDHS time {d['time_ratio']:.2f}x (target <= 1.4), "
                   f"increment {d['train_ratio']:.2f}x, peak {d['peak_ratio']:.2f}x; SGT faster: "
                   f"{'yes' if s['step_s'] < d['step_s'] else 'no'}, lighter (saved for backward "
                   f"{s['saved_mib']:.1f} vs {d['saved_mib']:.1f} MiB): "
                   f"{'yes' if s['saved_mib'] < d['saved_mib'] else 'no'}")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all configurations (order rotated)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/valuesearch_cost")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps({**worker(args.worker, args), "batch": args.batch_size}))
        return
    labels = list(configs())
    rounds = []
    for k in range(args.repeats):
        order = labels[k % len(labels):] + labels[:k % len(labels)]
        rounds.append({lb: run_one(lb, args) for lb in order})
        print(f"round {k + 1}/{args.repeats}: " + ", ".join(f"{lb} {rounds[-1][lb]['step_s']:.3f}s" for lb in labels),
              flush=True)
    rows = summarise(rounds, labels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost.json").write_text(json.dumps({"args": vars(args), "rows": rows, "rounds": rounds}, indent=2) + "\n")
    head = (f"{args.model}, batch {args.batch_size}, {args.threads} thread(s), {args.steps} timed steps x "
            f"{args.repeats} interleaved rounds, one fresh process per configuration and round\n\n")
    table, ver = markdown(rows), verdict(rows)
    (out / "cost.md").write_text(head + table + "\n\n" + ver)
    print(table + "\n\n" + ver)


if __name__ == "__main__":
    main()
