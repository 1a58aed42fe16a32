"""Cost of the integer-only C runtime's plain kernel (``lb_conv``; issue 17) on trained integer-mode runs:
Cortex-M instructions per inference (QEMU ``-icount``, SysTick-calibrated), flash and RAM, every build
checked bit for bit against the integer reference, beside the FP32 twin of the same network
(``lowbit.export.mcu.fp32_graph``: float kernels, the run's latent weights).

    python benchmarks/integer_c_speed.py RUN_DIR [RUN_DIR ...] --images 3 [--targets cortex-m4,cortex-m0] \\
        --json benchmarks/results/integer_export/c_speed/NAME.json

Instruction counts do not depend on the machine's load; they are what compares two versions of the runtime
(run the script twice, with ``PYTHONPATH`` at each version's ``src``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mcu_table import test_images  # noqa: E402

from lowbit.export import IntegerReference  # noqa: E402
from lowbit.export.api import _mem_002, load_run  # noqa: E402
from lowbit.export.intgraph import IntReference  # noqa: E402
from lowbit.export.mcu import build_and_run, fp32_twin_of_int_run  # noqa: E402
from lowbit.intmode import int_graph  # noqa: E402

BUILD = Path("/tmp/lowbit_int_c_speed")


def measure(run_dir: Path, n: int, fp32: bool, targets: list[str]) -> dict:
    cfg, data, model = load_run(run_dir)
    x = test_images(data, n)
    xt = torch.from_numpy(x)
    g = int_graph(model, xt[:1])
    row = {"run": str(run_dir), "images": n, "mem_002": _mem_002(model, xt)}
    d = BUILD / f"{run_dir.parent.name}_{run_dir.name}"  # seeds_ft/W2A2_.../seed0 and W4A4_.../seed0 apart
    want = IntReference(g).run(x)
    for t in targets:
        r = build_and_run(g, d / f"int_{t}", x, want, t, kernels="int", timeout=1200)
        row.setdefault("targets", {})[t] = {k: r[k] for k in ("bit_exact_images", "instructions_per_inference",
                                                            "flash_bytes", "ram_bytes")}
    row["int"] = row["targets"][targets[0]]
    if fp32:
        _, fg = fp32_twin_of_int_run(cfg, data.info, run_dir, xt)
        r = build_and_run(fg, d / "fp32", x, IntegerReference(fg).run(x), targets[0],
                          kernels="int", timeout=1200)
        row["fp32"] = {k: r[k] for k in ("bit_exact_images", "instructions_per_inference", "flash_bytes",
                                         "ram_bytes")}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--no-fp32", action="store_true", help="skip the FP32 twin")
    ap.add_argument("--targets", default="cortex-m4", help="comma-separated targets (the FP32 twin: the first)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    targets = [t for t in a.targets.split(",") if t]
    rows = []
    for r in a.runs:
        row = measure(Path(r), a.images, not a.no_fp32, targets)
        rows.append(row)
        i = row["int"]
        line = f"{Path(r).name:<34} int: " + "; ".join(
            f"{t} {v['bit_exact_images']}/{a.images} bit-exact, {v['instructions_per_inference'] / 1e6:8.2f} M instr, "
            f"flash {v['flash_bytes'] / 1024:7.1f} KiB" for t, v in row["targets"].items())
        line += f", RAM {i['ram_bytes'] / 1024:6.1f} KiB ({i['ram_bytes'] / row['mem_002']['bytes']:.2f}x 002 Mem)"
        if "fp32" in row:
            f = row["fp32"]
            line += (f"; fp32: {f['instructions_per_inference'] / 1e6:8.2f} M instr, "
                     f"FP32/int {f['instructions_per_inference'] / i['instructions_per_inference']:.2f}x")
        print(line, flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
