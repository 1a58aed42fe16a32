"""Cortex-M benchmark (issue 18): flash, RAM, instructions per inference on Cortex-M4, Cortex-M3 and Cortex-M0 (no
FPU; QEMU -icount) and x86 (valgrind callgrind), wall time per inference on this CPU (1 thread), for W1A1 / W2A2 /
W4A4 / W8A8 ResNet-8 on Fashion-MNIST, each against the FP32 build of the same network from the same generator.

Runs (short training, benchmarks/results/mcu/configs/*.yaml; train them first):

    for L in W1A1 W2A2 W4A4 W8A8 W1A1_int W2A2_int W4A4_int W8A8_int MBV2_W4A4_int MBV2_W8A8_int; do
      rm -rf benchmarks/results/mcu/runs/$L   # the committed folder: its small files only, and a finished run is not retrained
      lowbit train benchmarks/results/mcu/configs/$L.yaml --out benchmarks/results/mcu/runs/$L; done
    python benchmarks/mcu_table.py            # -> benchmarks/results/mcu/{results.json,README.md}

Builds per bit width (every one checked bit-exact against its NumPy reference under QEMU):
  fp32        the FP32 twin (float kernels; lowbit.export.mcu.fp32_graph) of the float-activation run
  float/int   today's C export (float activations between layers), plain integer kernel
  float/auto  the same with the bit-packed kernels where the bits make them pay (xnor W1A1, bit-serial <= 2 bits)
  float/packed  bit-packed kernels forced at any bits (W4A4, W8A8: to show where they stop paying)
  int/int, int/auto   issue 17's integer-only runtime (runs trained with plan.integer: true), plain / packed
MobileNetV2 (MBV2_W4A4, MBV2_W8A8) has integer-mode runs only: its FP32 twin is the unquantized network with
the integer run's latent weights. A label whose float-mode run folder is gone reuses its fp32/float rows from
results.json (the README says which).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.export import IntegerReference, lower
from lowbit.export.api import _mem_002, load_run
from lowbit.export.c_export import CFLAGS
from lowbit.export.mcu import TARGETS as TARGETS_MCU
from lowbit.export.mcu import build_and_run, fp32_graph, fp32_twin_of_int_run

OUT = Path("benchmarks/results/mcu")
BUILD = Path("/tmp/lowbit_mcu_build")  # generated C, ELFs and host builds (not committed)
LABELS = ("W1A1", "W2A2", "W4A4", "W8A8", "MBV2_W4A4", "MBV2_W8A8")
TARGETS = {"W1A1": 4.0, "W2A2": 2.0}  # fewer instructions than FP32 (issue 18)


def test_images(data, n: int) -> np.ndarray:
    from lowbit.data import BatchLoader

    x, _ = next(iter(BatchLoader(data.test, data.info, n)))
    return x[:n].float().numpy()


def host_build(c_dir: Path) -> Path:
    """The same generated C built for this CPU (gcc -O2, no -march: baseline x86-64)."""
    srcs = sorted(p.name for p in c_dir.glob("*.c") if p.name not in ("mcu_main.c", "startup.c", "stub.c"))
    exe = c_dir / "host"
    subprocess.run(["gcc", *CFLAGS, "-Wno-unused-function", "-o", str(exe), *srcs, "-lm"], cwd=c_dir, check=True,
                   capture_output=True)
    return exe


def callgrind(exe: Path, x: np.ndarray, n_out: int) -> float:
    """x86 instructions per inference: callgrind, counting only inside lowbit_predict."""
    fin, fout, cg = exe.parent / "in.f32", exe.parent / "out.f32", exe.parent / "callgrind.out"
    x.astype(np.float32).tofile(fin)
    r = subprocess.run(["valgrind", "--tool=callgrind", "--toggle-collect=lowbit_predict",
                        f"--callgrind-out-file={cg}", str(exe), str(fin), str(len(x)), str(fout)],
                       capture_output=True, text=True, check=True)
    m = re.search(r"Collected : (\d+)", r.stderr)
    return int(m.group(1)) / len(x)


def wall(exes: dict[str, Path], x: np.ndarray, repeats: int = 3) -> dict[str, float]:
    """Seconds per inference of every host build, 1 thread, builds alternating, median of repeats."""
    fin = OUT / "wall_in.f32"
    x.astype(np.float32).tofile(fin)
    times: dict[str, list[float]] = {k: [] for k in exes}
    for _ in range(repeats):
        for k, exe in exes.items():
            t0 = time.perf_counter()
            subprocess.run([str(exe), str(fin), str(len(x)), str(exe.parent / "wall_out.f32")], check=True)
            times[k].append((time.perf_counter() - t0) / len(x))
    fin.unlink()
    return {k: float(np.median(v)) for k, v in times.items()}


#: the cores without an FPU, beside the Cortex-M4: every float operation of a build is a libgcc soft-float call
#: (the ARMv6-M Cortex-M0 has no 64-bit multiply, CLZ or DSP instructions either)
NO_FPU = ("cortex-m3", "cortex-m0")
CORE_KEYS = ("bit_exact_images", "images", "flash_bytes", "ram_bytes", "instructions_per_inference", "machine")
#: the real part of the Cortex-M0 target (QEMU's micro:bit is given 4 MiB of each to run any model)
NRF51 = TARGETS_MCU["nrf51822"]


def one_build(name: str, graph, d: Path, x: np.ndarray, expected: np.ndarray, kernels: str, cg_images: int) -> dict:
    r = build_and_run(graph, d, x, expected, "cortex-m4", kernels=kernels, timeout=600)
    for core in NO_FPU:
        c = build_and_run(graph, d.with_name(d.name + "_" + core[7:]), x, expected, core, kernels=kernels,
                          timeout=3600)
        r[core.replace("-", "_")] = {k: c[k] for k in CORE_KEYS}
    exe = host_build(d)
    r["x86_instructions_per_inference"] = callgrind(exe, x[:cg_images], expected.shape[1])
    r["host_exe"] = str(exe)
    r["name"] = name
    m3, m0 = r["cortex_m3"], r["cortex_m0"]
    print(f"  {name:<14} bit-exact {r['bit_exact_images']}/{r['images']} (M3 {m3['bit_exact_images']}, "
          f"M0 {m0['bit_exact_images']})  flash {r['flash_bytes'] / 1024:7.1f} KiB  RAM {r['ram_bytes'] / 1024:6.1f} KiB  "
          f"M4 {r['instructions_per_inference'] / 1e6:8.2f} M  M3 {m3['instructions_per_inference'] / 1e6:8.2f} M  "
          f"M0 {m0['instructions_per_inference'] / 1e6:8.2f} M  "
          f"x86 {r['x86_instructions_per_inference'] / 1e6:8.2f} M", flush=True)
    return r


def untrained_integer_model(cfg, data):
    """The run's network and plan in integer mode (plan.integer: true), NOT trained: random weights, BN
    statistics and activation ranges from 4 training-mode forward passes on 128 training images. For the
    cost figures only (flash, RAM, instructions do not depend on the weights' values)."""
    from lowbit.data import BatchLoader
    from lowbit.train import build_model

    icfg = cfg.model_copy(deep=True)
    icfg.plan.integer = True
    m = build_model(icfg, data)
    xb, _ = next(iter(BatchLoader(data.train, data.info, 128)))
    m.train()
    with torch.no_grad():
        for _ in range(4):
            m(xb.float())
    return m.eval()


def run_label(label: str, n_qemu: int, cg_images: int, saved: dict | None = None) -> dict:
    """One label's builds. Its float-mode run (runs/LABEL) gives the FP32 twin and the float/* builds;
    without it, ``saved`` (its row of an earlier results.json) supplies them, or, for an integer-only
    label (MobileNetV2), the FP32 twin comes from the integer run's latent weights."""
    res: dict = {"label": label}
    builds = {}
    frun, irun = OUT / "runs" / label, OUT / "runs" / f"{label}_int"
    src = frun if (frun / "best.pt").is_file() else irun
    if not (src / "best.pt").is_file():
        raise LowbitError(f"{label}: neither {frun} nor {irun} holds a trained run")
    cfg, data, model = load_run(src)
    x = test_images(data, n_qemu)
    xt = torch.from_numpy(x)
    if src == frun:
        res["accuracy"] = json.loads((frun / "summary.json").read_text()).get("test_acc")
        res["mem_002"] = _mem_002(model, xt)
        graph = lower(model, xt[:2])
        fg = fp32_graph(graph)
        builds["fp32"] = one_build("fp32", fg, BUILD / label / "fp32", x, IntegerReference(fg).run(x), "int",
                                   cg_images)
        want = IntegerReference(graph).run(x)
        kinds = ("int", "auto") if label in TARGETS else ("int", "packed")
        for k in kinds:
            builds[f"float/{k}"] = one_build(f"float/{k}", graph, BUILD / label / f"float_{k}", x, want, k,
                                             cg_images)
    elif saved and "builds" in saved and all(c.replace("-", "_") in b for k, b in saved["builds"].items()
                                             if not k.startswith("int/") for c in NO_FPU):
        # the float-mode run folder is not kept: its rows (and host builds, for the wall step) are reused
        for k in ("accuracy", "mem_002"):
            res[k] = saved.get(k)
        builds.update({k: b for k, b in saved["builds"].items() if not k.startswith("int/")})
        res["float_reused"] = True
        print("  fp32, float/*: reused from results.json", flush=True)
    else:  # an integer-only label: the FP32 twin from the run's latent weights
        fm, fg = fp32_twin_of_int_run(cfg, data.info, irun, xt)
        res["mem_002"] = _mem_002(fm, xt)
        res["fp32_from_int_run"] = True
        builds["fp32"] = one_build("fp32", fg, BUILD / label / "fp32", x, IntegerReference(fg).run(x), "int",
                                   cg_images)
    from lowbit.export.intgraph import IntReference
    from lowbit.intmode import int_graph

    if (irun / "best.pt").is_file():
        imodel = model if src == irun else load_run(irun)[2]
        res["accuracy_int"] = json.loads((irun / "summary.json").read_text()).get("test_acc")
    else:  # cost only: an untrained integer-mode model, BN statistics and ranges from training images
        imodel = untrained_integer_model(cfg, data)
        res["int_untrained"] = True
    try:
        ig = int_graph(imodel, xt[:1])
    except LowbitError as e:  # issue 17's integer mode refuses the plan
        res["int_error"] = str(e)
        print(f"  int/*: {e}")
        ig = None
    if ig is not None:
        iwant = IntReference(ig).run(x)
        res["mem_002_int"] = _mem_002(imodel, xt)
        for k in ("int", "auto") if label in TARGETS else ("int",):
            builds[f"int/{k}"] = one_build(f"int/{k}", ig, BUILD / label / f"int_{k}", x, iwant, k, cg_images)
    res["builds"] = builds
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", default=",".join(LABELS))
    ap.add_argument("--qemu-images", type=int, default=3)
    ap.add_argument("--callgrind-images", type=int, default=1)
    ap.add_argument("--wall-images", type=int, default=20)
    ap.add_argument("--wall-repeats", type=int, default=3)
    ap.add_argument("--wall-only", action="store_true",
                    help="only the wall-time step, on the host builds of the last run")
    ap.add_argument("--skip-wall", action="store_true")
    ap.add_argument("--wall-slot", choices=("all", "one"), default="all",
                    help="how the wall step was run: under `slot --all` (the default, nothing else of the project "
                         "computing) or in one ordinary slot on a loaded machine (the README says so)")
    args = ap.parse_args()
    if args.wall_only:
        saved = json.loads((OUT / "results.json").read_text())
        results = saved["results"]
        for k in ("wall_images", "wall_repeats", "wall_slot"):
            saved["args"][k] = getattr(args, k)
        args = argparse.Namespace(**saved["args"])
        wall_step(results, args)
        finish(results, args)
        return
    results = []
    prev = OUT / "results.json"
    saved = {r["label"]: r for r in json.loads(prev.read_text())["results"]} if prev.is_file() else {}
    for label in args.labels.split(","):
        print(label, flush=True)
        try:
            results.append(run_label(label, args.qemu_images, args.callgrind_images, saved.get(label)))
        except (LowbitError, subprocess.CalledProcessError, FileNotFoundError) as e:
            print(f"  {label}: {e}")
            results.append({"label": label, "error": str(e)})
    if prev.is_file():  # a subset of labels re-run: keep the others' rows
        done = {r["label"] for r in results}
        old = [r for r in json.loads(prev.read_text())["results"] if r["label"] not in done]
        results = sorted(old + results, key=lambda r: LABELS.index(r["label"]) if r["label"] in LABELS else 99)
        args.labels = ",".join(r["label"] for r in results)
    if not args.skip_wall:
        wall_step(results, args)
    finish(results, args)


def wall_step(results: list[dict], args) -> None:
    """Wall time: every host build of every label, alternating, in one block."""
    exes = {f"{r['label']} {k}": Path(b["host_exe"]) for r in results for k, b in r.get("builds", {}).items()}
    args.wall_loadavg = round(os.getloadavg()[0], 2)  # 1-minute load average when the step starts
    if exes:
        from lowbit.data import load_dataset

        xw = test_images(load_dataset("fashion-mnist", limit=args.wall_images, val_fraction=0.0), args.wall_images)
        secs = wall(exes, xw, args.wall_repeats)
        for r in results:
            for k, b in r.get("builds", {}).items():
                b["wall_ms_per_inference"] = 1e3 * secs[f"{r['label']} {k}"]


def finish(results: list[dict], args) -> None:
    for r in results:
        for b in r.get("builds", {}).values():
            b.pop("logits", None)
    (OUT / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1, default=str))
    (OUT / "README.md").write_text(readme(results, args))
    print(readme(results, args))


def model_name(label: str) -> str:
    return label.replace("MBV2_", "MobileNetV2-0.5 ") if label.startswith("MBV2_") else f"ResNet-8 {label}"


def readme(results: list[dict], args) -> str:
    lines = [
        "# Cortex-M4 / Cortex-M3 / Cortex-M0 / x86 cost of the bit-packed and integer C builds (issues 17, 18)", "",
        "Commands (session 18: all ten runs trained again from `configs/`, then every row measured again; session "
        "19 measured every row twice more: with the Cortex-M3 added (the M4 and x86 counts came out identical to "
        "session 18's), then after the DSP loops of `lb_conv` (this table: the `int/*` rows' M4 counts fell 4-24 %, "
        "the `fp32` and `float/*` rows are unchanged; MobileNetV2's `fp32` rows are those of the first run, which "
        "its second reused); session 20 measured every row three times more: with the Cortex-M0 added and both C "
        "exports' arenas placed by `lowbit.export.memplan` (RAM fell by 3.1 KiB in the `fp32` and `float/*` rows and "
        "by 0.8-5.4 KiB in the ResNet-8 `int/*` rows; the M4 and M3 counts moved by at most 0.02 %, the x86 counts by "
        "at most 0.33 %, where memcpy and memset met other alignments), after the thresholds that replace the "
        "requantization of outputs of at most 2 bits (the W1A1 and W2A2 `int/*` rows 4.6-11 % fewer M4 "
        "instructions and 8-19 % fewer M0 instructions, the other `int/*` rows 0.4-1.1 % more on the M4 and M3 for "
        "the test per output), then with the bit-packed kernels' input planes packed a band of rows at a time "
        "(`int/auto` RAM 2.7 / 5.5 KiB lower at W1A1 / W2A2 for 1.9 / 0.9 % more M4 instructions; the "
        "`float/*` bit-packed rows within 0.03 %); session 21 once more, after the 8-bit ends of the integer builds "
        "kept one code table instead of one per output channel (this table: 12.0 KiB less flash in every `int/*` "
        "row, every instruction count unchanged; MobileNetV2's `fp32` rows reused from session 20's first run)):", "",
        "```",
        "for L in W1A1 W2A2 W4A4 W8A8 W1A1_int W2A2_int W4A4_int W8A8_int MBV2_W4A4_int MBV2_W8A8_int; do",
        "  rm -rf benchmarks/results/mcu/runs/$L   # the committed folder: its small files only, and a finished run "
        "is not retrained",
        "  lowbit train benchmarks/results/mcu/configs/$L.yaml --out benchmarks/results/mcu/runs/$L; done",
        "PYTHONPATH=src python benchmarks/mcu_table.py --skip-wall",
        ("PYTHONPATH=src python benchmarks/mcu_table.py --wall-only "
         if getattr(args, "wall_slot", "all") == "all" else
         "PYTHONPATH=src python benchmarks/mcu_table.py --wall-only --wall-slot one ")
        + f"--wall-images {args.wall_images} --wall-repeats {args.wall_repeats}",
        "```", "",
        "A run of `--labels A,B` rewrites the rows of those labels and keeps the others; a label without its "
        "float-mode run folder reuses its `fp32`/`float/*` rows from results.json (marked `reused`). Session 18 "
        "re-trained every run with today's code (integer mode's defaults of later sessions, e.g. `integer_bias: "
        "fine`, apply where the configs do not pin them, so the accuracies moved by up to 3.2 points) "
        "and measured every row with session 18's integer runtime (docs/integer-log.md, \"Session 18\"). The wall step "
        "times every host build of every row in one block, builds alternating: its ratios come from one run; "
        + ("it ran alone on the machine"
           if getattr(args, "wall_slot", "all") == "all" else
           "**PARTIAL: it ran in one ordinary slot on a loaded machine**: the wall ratios confirm the direction of "
           "the instruction ratios, not their size")
        + f" (1-minute load average at its start: {getattr(args, 'wall_loadavg', float('nan'))}).", "",
        "ResNet-8 on Fashion-MNIST, **short training** (8,000 images, 2 epochs); MobileNetV2 width 0.5 "
        "(stride-1 stem, 1280-channel last conv, `configs/MBV2_*_int.yaml`) **shorter** (4,000 images, 1 epoch): "
        "the accuracies are far from converged; the cost figures do not depend on them. Cortex-M4 = QEMU "
        "mps2-an386, `-icount shift=0`, instructions = SysTick ticks x 40 (calibrated on a fixed loop in every run), "
        f"mean over {args.qemu_images} test images, every build bit-exact vs its NumPy reference. Cortex-M3 = QEMU "
        "mps2-an385, the same count and check, built with `-mcpu=cortex-m3 -mfloat-abi=soft` (the M3 has no FPU: "
        "every float operation is a libgcc soft-float call; since session 19). Cortex-M0 = QEMU microbit (nRF51822, "
        "given 4 MiB of flash and RAM so that every model runs), the same count at 62.5 instructions per SysTick "
        "tick (16 MHz), built with `-mcpu=cortex-m0 -mfloat-abi=soft` (ARMv6-M: no FPU, and no 64-bit multiply, CLZ "
        "or DSP instructions; since session 20). The table's flash and RAM are the M4 build's; the M0's own are in "
        "the list below it. "
        "x86 = valgrind "
        f"callgrind, instructions inside `lowbit_predict` (gcc -O2, baseline x86-64), {args.callgrind_images} "
        f"image. Wall = this CPU, 1 thread, {args.wall_images} images per process, builds alternating, median of "
        f"{args.wall_repeats}. Flash / RAM: arm-none-eabi-size of the program minus the same program with an empty "
        "model; RAM = static (data + bss) + measured stack. 002 Mem = params at their bits + largest activation at "
        "max(b, 4) bits (of the float-mode run for `fp32`/`float/*`, of the integer-mode model for `int/*`, whose "
        "first/last layers are 8-bit). Builds: `fp32` = FP32 twin (float kernels) of the float-activation run "
        "(MobileNetV2, which has no float-mode run: of the unquantized network with the integer run's latent "
        "weights; its 002 Mem is then the FP32 network's); `float/*` = the float-activation C export, `int/*` = "
        "issue 17's integer-only runtime (activations as packed codes); `*/int` plain integer kernel, `*/auto` "
        "bit-packed kernels where the bits make them pay, `*/packed` bit-packed forced. Depthwise convs run the "
        "float kernel in `fp32` and the runtime's `lb_conv` (groups) in `int/*`.", "",
        "| model | build | kernels | bit-exact | flash KiB | FP32 / this | RAM KiB | FP32 / this | RAM / 002 Mem | "
        "M4 Minstr | FP32 / this | M3 Minstr | FP32 / this | M0 Minstr | FP32 / this | x86 Minstr | FP32 / this | "
        "wall ms | FP32 / this |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    from collections import Counter

    nan = float("nan")

    def m3(b: dict) -> float:
        return b.get("cortex_m3", {}).get("instructions_per_inference", nan)

    def m0(b: dict) -> float:
        return b.get("cortex_m0", {}).get("instructions_per_inference", nan)
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error']} |||||||||||||||||| ")
            continue
        fp = r["builds"]["fp32"]
        for k, b in r["builds"].items():
            mem = (r.get("mem_002_int") if k.startswith("int/") else r["mem_002"])["bytes"]
            kinds = ", ".join(f"{a} {n}" for a, n in sorted(Counter(b["kernels"].values()).items()))
            acc = r.get("accuracy_int") if k.startswith("int/") else r.get("accuracy")
            name = model_name(r["label"])
            if k == "fp32" and r.get("fp32_from_int_run"):
                name += " (latent weights of the int run)"
            elif acc is not None:
                name += f" ({100 * acc:.1f}%)"
            elif k.startswith("int/") and r.get("int_untrained"):
                name += " (untrained)"
            if r.get("float_reused") and not k.startswith("int/"):
                name += ", reused"
            lines.append(
                f"| {name} | {k} | {kinds} | {b['bit_exact_images']}/{b['images']} | {b['flash_bytes'] / 1024:.1f} | "
                f"{fp['flash_bytes'] / b['flash_bytes']:.2f} | {b['ram_bytes'] / 1024:.1f} | "
                f"{fp['ram_bytes'] / b['ram_bytes']:.2f} | {b['ram_bytes'] / mem:.2f} | "
                f"{b['instructions_per_inference'] / 1e6:.2f} | "
                f"{fp['instructions_per_inference'] / b['instructions_per_inference']:.2f} | "
                f"{m3(b) / 1e6:.2f} | {m3(fp) / m3(b):.2f} | {m0(b) / 1e6:.2f} | {m0(fp) / m0(b):.2f} | "
                f"{b['x86_instructions_per_inference'] / 1e6:.2f} | "
                f"{fp['x86_instructions_per_inference'] / b['x86_instructions_per_inference']:.2f} | "
                f"{b.get('wall_ms_per_inference', nan):.2f} | "
                f"{fp.get('wall_ms_per_inference', nan) / b.get('wall_ms_per_inference', nan):.2f} |")
        if r.get("int_error"):
            lines.append(f"| {r['label']} | int/* | not built: {r['int_error']} ||||||||||||||||||")
    lines += ["", "Targets (issue 18): W1A1 >= 4x fewer instructions than FP32, W2A2 >= 2x; RAM <= 1.1x 002 Mem.", ""]
    for r in results:
        if "builds" not in r:
            continue
        fp = r["builds"]["fp32"]["instructions_per_inference"]
        mem = r["mem_002"]["bytes"]
        for k, b in r["builds"].items():
            if k == "fp32":
                continue
            m = (r.get("mem_002_int") or r["mem_002"])["bytes"] if k.startswith("int/") else mem
            ratio = fp / b["instructions_per_inference"]
            t = TARGETS.get(r["label"])
            spd = (f"{ratio:.2f}x fewer M4 instructions than FP32" if ratio >= 1 else
                   f"{1 / ratio:.2f}x MORE M4 instructions than FP32")
            spd += f" ({'meets' if ratio >= t else 'misses'} >= {t:g}x fewer)" if t else ""
            spd += (f", {m3(r['builds']['fp32']) / m3(b):.2f}x / {m0(r['builds']['fp32']) / m0(b):.2f}x fewer on the "
                    "Cortex-M3 / M0 (no FPU)")
            ram = f"RAM {b['ram_bytes'] / m:.2f}x 002 Mem ({'meets' if b['ram_bytes'] <= 1.1 * m else 'misses'} <= 1.1x)"
            c0 = b.get("cortex_m0", {})
            if c0:  # the M0 build's own flash and RAM (its code and stack differ from the M4's)
                fits = c0["flash_bytes"] <= NRF51.flash_size and c0["ram_bytes"] <= NRF51.ram_size
                ram += (f"; on the M0 {c0['flash_bytes'] / 1024:.1f} KiB flash, {c0['ram_bytes'] / 1024:.1f} KiB RAM: "
                        f"{'fits' if fits else 'does not fit'} an nRF51822 (256 KiB / 16 KiB)")
            lines.append(f"- {model_name(r['label'])} {k}: {spd}; {ram}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
