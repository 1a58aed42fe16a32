"""QAT step-time overhead vs FP32, measured interleaved in one process.

Epoch times from separate runs drift with whatever else the machine does. Here every
configuration trains the same model on the same fixed batch, and the configurations take turns
(round-robin, ``--rounds`` times ``--steps`` steps each), so a slow moment hits all of them; the
ratio is the median step time of a configuration over FP32's.

    python benchmarks/qat_overhead.py --model resnet8 --threads 2 --rounds 5 --steps 10
    python benchmarks/qat_overhead.py --set dqa --threads 1 --rounds 3 --steps 5 --out benchmarks/results/dqa_overhead

``--set dqa`` times the rows of ``dqa_table.py`` (003 Tables 1-2); a step then includes the method's
per-batch work (temperature update, α normalisation, penalty), exactly as the training loop does.

Besides wall-clock time, each step's process CPU time is recorded (``cpu_ms``, ``cpu_ratio``):
on a machine shared with other processes it is not inflated by the time this process waits for a
core (with more than one thread it sums the threads' time, so wall time is the measure on a
quiet machine), and its minor page faults (``faults``: pages the kernel had to map and zero for
fresh allocations; glibc returns large freed blocks to the kernel, so a temporary tensor can cost
one fault per 4 KiB page, and how often that happens differs from process to process). Run with
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296``
(recorded in the JSON) to keep freed memory in the process for every row alike.

``--before`` adds, for every quantized configuration, a ``[before]`` row: the same model stepped
with the activation kernels as they were before issue 11 (``qat_before.py``: the pre-change
backward passes, unfused activation mixtures), interleaved with the others.

``plain PyTorch`` is the model from ``create_model`` that ``quantize()`` never saw, stepped by a
bare loop (no lowbit call at all); ``FP32`` is ``quantize(model, {})`` (nothing registered: the
same plain modules) stepped by the same loop as the quantized rows (method hooks included).

``--eager`` adds an ``[eager]`` row per quantized configuration: the same model stepped with the
native C kernels switched off (``lowbit.quant.native``, ``LOWBIT_NATIVE=0``): the torch kernels
that were the default before them, interleaved with the others.

``--compile`` adds a ``[compiled]`` row per quantized configuration: the opt-in
``torch.compile`` activation kernels (``lowbit.quant.compiled``, ``LOWBIT_COMPILE=1``); the
first warm-up step of each such row includes compiling (reported as ``first_step_s``).

Writes NAME.json and NAME.md (``--name``, default overhead) into --out and prints the table.
``--processes K`` repeats the whole measurement in K fresh processes and reports each row's
median, min and max ratio over them (a process's memory layout moves a ratio more than the
rounds within one process do).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit.models import create_model
from lowbit.quant import compiled, native
from lowbit.quantize import quant_state, quantize

#: row kinds that step with a kernel switch flipped: (module with enable(), value during the step)
SWITCHES = {"compiled": (compiled, True), "eager": (native, False)}

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
    ap.add_argument("--name", default="overhead", help="file name (without extension) of the results")
    ap.add_argument("--before", action="store_true",
                    help="add a [before] row per quantized configuration: the pre-issue-11 kernels")
    ap.add_argument("--eager", action="store_true",
                    help="add an [eager] row per quantized configuration: the native C kernels switched off")
    ap.add_argument("--compile", action="store_true",
                    help="add a [compiled] row per quantized configuration: the torch.compile kernels")
    ap.add_argument("--no-plain", dest="plain", action="store_false",
                    help="leave out the plain PyTorch row (create_model only, no lowbit call)")
    ap.add_argument("--only", nargs="*", default=None, metavar="TEXT",
                    help="keep only the configurations whose label contains one of these (FP32 always)")
    ap.add_argument("--processes", type=int, default=1,
                    help="run the whole measurement in K fresh processes, one after the other (NAME_p0..), and "
                         "write NAME.md/.json with each row's median, min and max ratio over them: a process's "
                         "memory layout moves a ratio by up to ~0.1, more than rounds within one process do")
    args = ap.parse_args()
    if args.processes > 1:
        return over_processes(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch_size,))
    if args.set == "dqa":
        from dqa_table import ROWS as configs  # the table's own rows, not a copy
    else:
        configs = CONFIGS
    if args.only:
        configs = {k: v for k, v in configs.items() if k == "FP32" or any(o in k for o in args.only)}
    rows = [(label, plan, False) for label, plan in configs.items()]
    if args.before:
        from qat_before import before_kernels

        rows += [(f"{label} [before]", plan, True) for label, plan in configs.items() if plan]
    if args.eager:
        rows += [(f"{label} [eager]", plan, "eager") for label, plan in configs.items() if plan]
    if args.compile:
        rows += [(f"{label} [compiled]", plan, "compiled") for label, plan in configs.items() if plan]
    total = (args.rounds * args.steps + 2) * len(rows)  # schedules span every step taken here
    setups = {}
    if args.plain:
        torch.manual_seed(0)
        pm = create_model(args.model, in_channels=1, num_classes=10, image_size=28)
        setups["plain PyTorch"] = (pm, torch.optim.SGD(pm.parameters(), lr=0.01, momentum=0.9), None)
    for label, plan, before in rows:
        torch.manual_seed(0)
        m = quantize(create_model(args.model, in_channels=1, num_classes=10, image_size=28), plan)
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        quant_state(m).method.setup(m, total, total)
        setups[label] = (m, opt, before)
    count = {id(m): 0 for m, _, _ in setups.values()}

    def plain_step(m, opt):
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def step(m, opt, before):
        if before is None:
            return plain_step(m, opt)
        if before in SWITCHES:  # "compiled": the torch.compile kernels on; "eager": the native ones off
            module, on = SWITCHES[before]
            module.enable(on)
            try:
                return lowbit_step(m, opt)
            finally:
                module.enable(not on)
        if before:
            with before_kernels():
                return lowbit_step(m, opt)
        return lowbit_step(m, opt)

    def lowbit_step(m, opt):
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

    compiled.enable(False)  # only the [compiled] rows (LOWBIT_COMPILE is ignored here)
    if native.available():  # built and self-checked before any timing
        native.enable(True)
    meta_native = native._state["failed"] or ("on" if native.available() else "off")
    first: dict[str, float] = {}
    for label, (m, opt, before) in setups.items():  # warm-up (allocator, LSQ init, compiling)
        for i in range(2):
            t = time.perf_counter()
            step(m, opt, before)
            if i == 0:
                first[label] = time.perf_counter() - t
    times: dict[str, list[float]] = {k: [] for k in setups}
    cpu: dict[str, list[float]] = {k: [] for k in setups}
    faults: dict[str, list[int]] = {k: [] for k in setups}
    for _ in range(args.rounds):
        for label, (m, opt, before) in setups.items():
            for _ in range(args.steps):
                f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t, c = time.perf_counter(), time.process_time()
                step(m, opt, before)
                times[label].append(time.perf_counter() - t)
                cpu[label].append(time.process_time() - c)
                faults[label].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
    med = {k: statistics.median(v) for k, v in times.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    plain = med["plain PyTorch"] if args.plain else None
    out_rows = []
    for k in times:
        r = {"config": k, "step_ms": 1000 * med[k], "ratio": med[k] / med["FP32"],
             "cpu_ms": 1000 * cmed[k], "cpu_ratio": cmed[k] / cmed["FP32"], "first_step_s": round(first[k], 3),
             "faults": statistics.median(faults[k])}
        if plain:
            r["ratio_plain"] = med[k] / plain
            r["cpu_ratio_plain"] = cmed[k] / cmed["plain PyTorch"]
        out_rows.append(r)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**vars(args), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""), "native": meta_native}
    (out / f"{args.name}.json").write_text(json.dumps({"args": meta, "rows": out_rows}, indent=2) + "\n")
    md = ["| config | step ms (median) | ratio to FP32 | ratio to plain PyTorch | CPU ms | CPU-time ratio to FP32 |",
          "|---|---|---|---|---|---|"]
    md += [f"| {r['config']} | {r['step_ms']:.1f} | {r['ratio']:.2f} | "
           f"{r['ratio_plain']:.2f} | " if plain else f"| {r['config']} | {r['step_ms']:.1f} | {r['ratio']:.2f} | - | "
           for r in out_rows]
    md[0] += " page faults per step (median) |"
    md[1] += "---|"
    md[2:] = [line + f"{r['cpu_ms']:.1f} | {r['cpu_ratio']:.2f} | {r['faults']:.0f} |" for line, r in zip(md[2:], out_rows)]
    (out / f"{args.name}.md").write_text("\n".join(md) + f"\n\n{json.dumps(meta)}\n")
    print("\n".join(md))


def over_processes(args) -> None:
    import subprocess
    import sys

    argv, skip = [], False
    for a in sys.argv[1:]:  # this command line without --processes / --name
        if skip:
            skip = False
        elif a in ("--processes", "--name"):
            skip = True
        elif not a.startswith(("--processes=", "--name=")):
            argv.append(a)
    ratios: dict[str, list[float]] = {}
    faults: dict[str, list[float]] = {}
    for i in range(args.processes):
        subprocess.run([sys.executable, __file__, *argv, "--name", f"{args.name}_p{i}"], check=True)
        for r in json.loads((Path(args.out) / f"{args.name}_p{i}.json").read_text())["rows"]:
            ratios.setdefault(r["config"], []).append(r["ratio"])
            faults.setdefault(r["config"], []).append(r.get("faults", float("nan")))
    rows = [{"config": k, "ratios": v, "median": statistics.median(v), "min": min(v), "max": max(v),
             "faults": faults[k]} for k, v in ratios.items()]
    md = [f"| config | ratio to FP32: median of {args.processes} processes | min | max | each | page faults per step, each |",
          "|---|---|---|---|---|---|"]
    md += [f"| {r['config']} | {r['median']:.2f} | {r['min']:.2f} | {r['max']:.2f} | "
           + " ".join(f"{v:.2f}" for v in r["ratios"]) + " | " + " ".join(f"{v:.0f}" for v in r["faults"]) + " |"
           for r in rows]
    meta = {**vars(args), "torch": torch.__version__, "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "")}
    (Path(args.out) / f"{args.name}.json").write_text(json.dumps({"args": meta, "rows": rows}, indent=2) + "\n")
    (Path(args.out) / f"{args.name}.md").write_text("\n".join(md) + f"\n\n{json.dumps(meta)}\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
