"""Where a Cortex-M build's instructions go: one inference of a ``lowbit export --target`` build under QEMU with
``-d in_asm,exec,nochain``, every executed instruction counted (each translated block's instructions times how often
the block ran), then summed per function and per source line (``arm-none-eabi-addr2line``; the build is compiled
again with ``-g``, which changes no instruction).

    lowbit export RUN --format c --target cortex-m0 --out EXP
    python benchmarks/mcu_profile.py EXP/c/cortex-m0 --target cortex-m0 [--lines 20]

The program's first test image only, without the pixel entry point; the total includes the start-up's SysTick
calibration loop (about 2 M instructions), which ``lowbit export`` subtracts. QEMU's log of one ResNet-8 inference
is about 1 GB; it is removed afterwards.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import tempfile
from pathlib import Path

from lowbit.export.mcu import MCU_CFLAGS, target


def profile(c_dir: Path, tgt_name: str, work: Path) -> tuple[collections.Counter, collections.Counter, int]:
    tgt = target(tgt_name)
    d = work / "c"
    shutil.copytree(c_dir, d, ignore=shutil.ignore_patterns("*.elf"))
    main = (d / "mcu_main.c").read_text()
    main = main.replace("#define N_SAMPLES 3", "#define N_SAMPLES 1")
    main = main.replace("lowbit_predict_pixels(pixels + i * LOWBIT_IN_SIZE, y);", "")
    (d / "mcu_main.c").write_text(main)
    srcs = sorted(p.name for p in d.glob("*.c") if p.name not in ("main.c", "mcu_main.c", "startup.c", "stub.c"))
    subprocess.run(["arm-none-eabi-gcc", *tgt.cpu_flags, *MCU_CFLAGS, "-g", "--specs=nosys.specs", "-nostartfiles",
                    "-T", "board.ld", "-Wl,--gc-sections", "-o", "p.elf", "mcu_main.c", "startup.c", *srcs, "-lm"],
                   cwd=d, check=True)
    log = work / "q.log"
    subprocess.run(["qemu-system-arm", "-M", tgt.machine, *tgt.qemu_args, "-nographic", "-semihosting", "-icount",
                    "shift=0", "-kernel", "p.elf", "-d", "in_asm,exec,nochain", "-D", str(log)],
                   cwd=d, check=True, capture_output=True, timeout=3600)
    blocks: dict[int, list[int]] = {}  # block start -> its instructions' addresses
    runs: collections.Counter = collections.Counter()
    cur: list[int] | None = None
    with open(log, errors="replace") as f:
        for line in f:
            if line.startswith("Trace"):
                runs[int(line.split("/")[1], 16)] += 1
            elif line.startswith("IN:"):
                cur = None
            elif line.startswith("0x"):
                a = int(line.split(":")[0], 16)
                if cur is None:
                    cur = blocks.setdefault(a, [])
                    cur.clear()
                cur.append(a)
    log.unlink()
    per_addr: collections.Counter = collections.Counter()
    for pc, n in runs.items():
        for a in blocks.get(pc, []):
            per_addr[a] += n
    syms = []
    nm = subprocess.run(["arm-none-eabi-nm", "-n", "-S", str(d / "p.elf")], capture_output=True, text=True).stdout
    for line in nm.splitlines():
        p = line.split()
        if len(p) == 4 and p[2] in "tTwW":
            syms.append((int(p[0], 16), int(p[1], 16), p[3]))
    funcs: collections.Counter = collections.Counter()
    for a, n in per_addr.items():
        funcs[next((name for s, size, name in syms if s <= a < s + size), "?")] += n
    addrs = sorted(per_addr)
    where = subprocess.run(["arm-none-eabi-addr2line", "-e", str(d / "p.elf")], input="\n".join(map(hex, addrs)),
                           capture_output=True, text=True).stdout.splitlines()
    lines: collections.Counter = collections.Counter()
    for a, w in zip(addrs, where):
        lines[w.split("/")[-1].split(" ")[0]] += per_addr[a]
    return funcs, lines, sum(per_addr.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("c_dir", help="a build folder of lowbit export --target (EXP/c/TARGET)")
    ap.add_argument("--target", default="cortex-m0")
    ap.add_argument("--lines", type=int, default=20, help="how many source lines to list")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as w:
        funcs, lines, total = profile(Path(a.c_dir), a.target, Path(w))
    print(f"{total / 1e6:.2f} M instructions (one inference and the SysTick calibration)")
    for name, n in funcs.most_common(10):
        print(f"  {name:32s} {n / 1e6:8.2f} M {100 * n / total:5.1f} %")
    print("by source line:")
    for name, n in lines.most_common(a.lines):
        print(f"  {name:32s} {n / 1e6:8.2f} M {100 * n / total:5.1f} %")


if __name__ == "__main__":
    main()
