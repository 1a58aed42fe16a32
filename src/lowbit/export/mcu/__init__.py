"""Cortex-M targets for the C export: cross-compile with arm-none-eabi-gcc, run under QEMU (issue 18).

    rep = build_and_run(graph, "out/cortex-m4", samples, expected, target="cortex-m4")

writes the generated C (:func:`lowbit.export.c_export.write_c`, bit-packed kernels from
:mod:`.packed` where a layer's bits make them pay), a main that runs the embedded sample images and
prints their logits (hex bit patterns) and SysTick counts through semihosting, a minimal startup
(``startup.c``: vector table at the start of FLASH, FPU enabled in CPACR before any float code) and
the board's linker script; builds with ``arm-none-eabi-gcc -mthumb -O2`` (hard float; soft float on the
Cortex-M3, which has no FPU) and
``--specs=rdimon.specs``; runs ``qemu-system-arm -M <board> -nographic -semihosting -icount shift=0``
with a timeout; checks the logits bit for bit against ``expected`` (the NumPy reference).

Cost per inference: under ``-icount shift=0`` QEMU executes one instruction per virtual nanosecond
and SysTick runs on the board's processor clock (25 MHz on mps2-an386/an500: one tick per 40
instructions; 20 MHz on mps2-an505: 50), so ``ticks x instructions-per-tick`` is the count of
executed instructions, deterministic run to run (resolution: one tick). The main measures the
instructions per tick itself on a fixed loop of known length before the images, and the result is
checked to be an integer.

Flash and RAM of the model: ``arm-none-eabi-size`` of the program minus that of the same program with
an empty ``lowbit_predict`` (so the C library, startup, printf and the embedded test images are not
counted): flash = text + data, static RAM = data + bss; plus the stack high-water mark of one
inference (painted and scanned by the main).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import ConfigError
from ..graph import Graph, Op, WeightQ
from .packed import PackedKernels

HERE = Path(__file__).resolve().parent
PACKAGES = "gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm"
TOOLS = ("arm-none-eabi-gcc", "arm-none-eabi-size", "qemu-system-arm")
MCU_CFLAGS = ["-mthumb", "-std=c99", "-O2", "-ffp-contract=off", "-ffunction-sections", "-fdata-sections",
              "-Wall", "-Wextra", "-Wno-unused-function"]
CALIB_LOOP = 1_000_000  # iterations of a 2-instruction loop


@dataclass(frozen=True)
class Target:
    name: str
    machine: str  # qemu-system-arm -M
    cpu_flags: tuple[str, ...]
    ldscript: str


TARGETS = {
    # no FPU: every float operation is a call into libgcc's soft float (the integer network needs none in its layers)
    "cortex-m3": Target("cortex-m3", "mps2-an385", ("-mcpu=cortex-m3", "-mfloat-abi=soft"), "mps2-an385.ld"),
    "cortex-m4": Target("cortex-m4", "mps2-an386", ("-mcpu=cortex-m4", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"),
                        "mps2-an386.ld"),
    "cortex-m7": Target("cortex-m7", "mps2-an500", ("-mcpu=cortex-m7", "-mfloat-abi=hard", "-mfpu=fpv5-d16"),
                        "mps2-an500.ld"),
    "cortex-m33": Target("cortex-m33", "mps2-an505", ("-mcpu=cortex-m33", "-mfloat-abi=hard", "-mfpu=fpv5-sp-d16"),
                         "mps2-an505.ld"),
}


def target(name: str) -> Target:
    if name not in TARGETS:
        raise ConfigError(f"export: unknown target {name!r}; allowed: {', '.join(TARGETS)}")
    return TARGETS[name]


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def check_tools() -> None:
    """One-line ConfigError naming the first missing tool."""
    miss = missing_tools()
    if miss:
        raise ConfigError(f"export --target: '{miss[0]}' not found on PATH; install {PACKAGES} "
                          f"(scripts/install_mcu_tools.sh)")


# ---------------------------------------------------------------------------------------------
# the FP32 twin: the same network from the same generator, float kernels
# ---------------------------------------------------------------------------------------------
def fp32_graph(graph: Graph) -> Graph:
    """The same network with every weight decoded to float32 and no activation quantizer, so every
    conv/linear runs the float kernel (BN of a quantized layer stays the per-channel affine after the
    accumulator). The speed and size baseline of the bit-packed/integer builds."""
    ops = []
    for op in graph.ops:
        if op.kind == "conv":
            w = op.weight.dequantize() if isinstance(op.weight, WeightQ) else op.weight
            op = Op(**{**op.__dict__, "weight": np.asarray(w, np.float32), "act": None})
        ops.append(op)
    return Graph(ops, graph.input, graph.output, graph.input_shape, graph.output_shape, dict(graph.meta))


def fp32_twin_of_int_run(cfg, info, run_dir, x):
    """``(model, graph)``: the FP32 network of an integer-mode run (which has no float-mode twin of its own): the
    same model, unquantized, with the run's latent weights (:func:`lowbit.pretrained.load_weights`), and its FP32
    build's graph (:func:`fp32_graph` of it lowered on ``x``). Its cost does not depend on the weight values; it
    has no trained accuracy of its own."""
    from ...models import create_model
    from ...pretrained import load_weights
    from ..graph import lower

    m = create_model(cfg.model.name, in_channels=info.in_channels, num_classes=info.num_classes,
                     image_size=info.image_size, **cfg.model.options)
    load_weights(m, run_dir)
    m.eval()
    return m, fp32_graph(lower(m, x[:2]))


# ---------------------------------------------------------------------------------------------
# generated main
# ---------------------------------------------------------------------------------------------
def _hexf(a) -> list[str]:
    return [f"0x{v:08x}u" for v in np.asarray(a, np.float32).reshape(-1).view(np.uint32)]


def write_main(out_dir: Path, samples: np.ndarray, expected: np.ndarray, pixels: np.ndarray | None = None) -> Path:
    """``mcu_main.c``: calibration loop, then every sample through ``lowbit_predict`` with its SysTick
    count and logits (hex), the count of bit-exact samples, the stack high-water mark. With ``pixels`` (the
    samples' raw uint8 images; an integer build with ``lowbit_predict_pixels``) every sample again from its
    pixels: its count, and whether its logits equal ``expected`` bit for bit."""
    n = len(samples)
    s, e = np.asarray(samples, np.float32).reshape(n, -1), np.asarray(expected, np.float32).reshape(n, -1)
    if pixels is not None:
        px = np.asarray(pixels, np.uint8).reshape(n, -1)
        body = ",\n".join("  " + ", ".join(str(int(v)) for v in px.reshape(-1)[i: i + 24])
                          for i in range(0, px.size, 24))
        pixel_arr = f"static const uint8_t pixels[{px.size}] = {{\n{body}\n}};"
        pixel_run = """    for (i = 0; i < N_SAMPLES; i++) {
        t0 = lb_cycles();
        lowbit_predict_pixels(pixels + i * LOWBIT_IN_SIZE, y);
        t1 = lb_cycles();
        printf("lowbit-mcu pixels %d ticks %lu exact %d\\n", i, (unsigned long)(t1 - t0),
               memcmp(y, expected + i * LOWBIT_OUT_SIZE, sizeof y) == 0);
    }"""
    else:
        pixel_arr = pixel_run = ""

    def arr(name, a):
        items = _hexf(a)
        body = ",\n".join("  " + ", ".join(items[i: i + 8]) for i in range(0, len(items), 8))
        return f"static const uint32_t {name}[{len(items)}] = {{\n{body}\n}};"

    src = f"""/* Generated by lowbit.export.mcu: runs the embedded samples on the board, prints through semihosting. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include "model.h"

void lb_systick_start(void);
uint64_t lb_cycles(void);
#define N_SAMPLES {n}
#define STACK_PAINT 16384u
{arr("samples", s)}
{arr("expected", e)}
{pixel_arr}

static void __attribute__((noinline)) lb_calib(uint32_t n)
{{
    __asm__ volatile("1: subs %0, %0, #1\\n\\tbne 1b" : "+r"(n) : : "cc"); /* 2 instructions per iteration */
}}

/* paint STACK_PAINT bytes below this function's frame; returns the lowest painted address */
static uintptr_t __attribute__((noinline)) lb_paint(void)
{{
    volatile uint32_t here = 0, *p = (volatile uint32_t *)((uintptr_t)&here & ~(uintptr_t)3u) - 1;
    uint32_t i;
    for (i = 0; i < STACK_PAINT / 4; i++) p[-(int32_t)i] = 0xDEADBEEFu;
    return (uintptr_t)(p - (STACK_PAINT / 4 - 1));
}}

/* lowest address written since lb_paint (the painted words are scanned upward) */
static uintptr_t lb_low_water(uintptr_t bottom)
{{
    volatile uint32_t *p = (volatile uint32_t *)bottom;
    while (*p == 0xDEADBEEFu) p++;
    return (uintptr_t)p;
}}

int main(void)
{{
    static float y[LOWBIT_OUT_SIZE];
    uint64_t t0, t1;
    int i, j, bad = 0;
    uintptr_t bottom, sp;
    uint32_t stack = 0;
    lb_systick_start();
    t0 = lb_cycles();
    lb_calib({CALIB_LOOP}u);
    t1 = lb_cycles();
    printf("lowbit-mcu calib %u %lu\\n", 2u * {CALIB_LOOP}u, (unsigned long)(t1 - t0));
    for (i = 0; i < N_SAMPLES; i++) {{
        __asm__ volatile("mov %0, sp" : "=r"(sp));
        bottom = lb_paint();
        t0 = lb_cycles();
        lowbit_predict((const float *)(const void *)(samples + i * LOWBIT_IN_SIZE), y);
        t1 = lb_cycles();
        if ((uint32_t)(sp - lb_low_water(bottom)) > stack) stack = (uint32_t)(sp - lb_low_water(bottom));
        printf("lowbit-mcu image %d ticks %lu logits", i, (unsigned long)(t1 - t0));
        for (j = 0; j < LOWBIT_OUT_SIZE; j++) {{
            uint32_t v;
            memcpy(&v, &y[j], 4);
            printf(" %08lx", (unsigned long)v);
        }}
        printf("\\n");
        if (memcmp(y, expected + i * LOWBIT_OUT_SIZE, sizeof y) != 0) bad++;
    }}
{pixel_run}
    printf("lowbit-mcu bitexact %d/%d stack %lu\\n", N_SAMPLES - bad, N_SAMPLES, (unsigned long)stack);
    return bad != 0;
}}
"""
    p = out_dir / "mcu_main.c"
    p.write_text(src)
    return p


STUB = """/* lowbit.export.mcu: an empty model, to measure what the model adds to the program */
#include "model.h"
void lowbit_predict(const float *input, float *logits) { (void)input; (void)logits; }
#ifdef LOWBIT_PIXEL_INPUT
void lowbit_predict_pixels(const uint8_t *pixels, float *logits) { (void)pixels; (void)logits; }
#endif
"""


# ---------------------------------------------------------------------------------------------
# build, size, run
# ---------------------------------------------------------------------------------------------
def _run(cmd: list[str], cwd: Path, what: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"export --target: {what} did not finish in {timeout:.0f} s") from None
    if r.returncode != 0:
        lines = (r.stderr.strip() or r.stdout.strip()).splitlines() or [f"exit status {r.returncode}"]
        first = next((ln for ln in lines if "error" in ln.lower() or "fault" in ln.lower()), lines[0])
        if "rdimon.specs" in first:
            first = "newlib (rdimon.specs) missing; install libnewlib-arm-none-eabi"
        raise ConfigError(f"export --target: {what} failed: {first.strip()}")
    return r


def build(c_dir: str | Path, tgt: Target, stub: bool = False) -> Path:
    """Cross-compile the generated C + mcu_main.c + startup into ``model.elf`` (``stub.elf``)."""
    check_tools()
    d = Path(c_dir).resolve()
    for f in ("startup.c", tgt.ldscript):
        shutil.copyfile(HERE / f, d / f)
    if stub:
        (d / "stub.c").write_text(STUB)
        srcs = ["stub.c"]
    else:
        srcs = sorted(p.name for p in d.glob("*.c") if p.name not in ("main.c", "mcu_main.c", "startup.c", "stub.c"))
    exe = d / ("stub.elf" if stub else "model.elf")
    cmd = ["arm-none-eabi-gcc", *tgt.cpu_flags, *MCU_CFLAGS, "--specs=rdimon.specs", "-T", tgt.ldscript,
           "-Wl,--gc-sections", "-o", exe.name, "mcu_main.c", "startup.c", *srcs, "-lm"]
    _run(cmd, d, "arm-none-eabi-gcc")
    return exe


def elf_size(elf: Path) -> dict:
    """``arm-none-eabi-size`` (Berkeley format): text, data, bss bytes."""
    out = _run(["arm-none-eabi-size", str(elf)], elf.parent, "arm-none-eabi-size").stdout.splitlines()
    text, data, bss = (int(v) for v in out[1].split()[:3])
    return {"text": text, "data": data, "bss": bss}


def run_qemu(elf: Path, tgt: Target, timeout: float = 120.0) -> str:
    cmd = ["qemu-system-arm", "-M", tgt.machine, "-nographic", "-semihosting", "-icount", "shift=0",
           "-kernel", str(elf)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"export --target: qemu-system-arm -M {tgt.machine} did not finish in {timeout:.0f} s") from None
    out = r.stdout
    if "lowbit: Cortex-M fault" in out or "lowbit-mcu bitexact" not in out:
        last = (out.strip() or r.stderr.strip() or f"exit status {r.returncode}").splitlines()[-1]
        raise ConfigError(f"export --target: the program failed under qemu-system-arm -M {tgt.machine}: {last}")
    return out


def parse_output(out: str, n_out: int) -> dict:
    m = re.search(r"lowbit-mcu calib (\d+) (\d+)", out)
    instr, ticks = int(m.group(1)), int(m.group(2))
    ipt = instr / ticks
    if abs(ipt - round(ipt)) > 0.01 * ipt:
        raise ConfigError(f"export --target: SysTick calibration is not an integer count of instructions per tick "
                          f"({instr} instructions in {ticks} ticks); is -icount shift=0 on?")
    ipt = int(round(ipt))
    imgs = re.findall(r"lowbit-mcu image (\d+) ticks (\d+) logits((?: [0-9a-f]{8})+)", out)
    ticks_img = [int(t) for _, t, _ in imgs]
    logits = np.array([[int(v, 16) for v in lg.split()] for _, _, lg in imgs], dtype=np.uint32).view(np.float32)
    if logits.shape[1:] != (n_out,):
        raise ConfigError("export --target: unexpected program output (logits)")
    be = re.search(r"lowbit-mcu bitexact (\d+)/(\d+) stack (\d+)", out)
    res = {"instructions_per_tick": ipt, "ticks": ticks_img, "instructions": [t * ipt for t in ticks_img],
           "logits": logits, "bit_exact_device": int(be.group(1)), "stack_bytes": int(be.group(3))}
    px = re.findall(r"lowbit-mcu pixels (\d+) ticks (\d+) exact (\d)", out)
    if px:  # the same images from their raw pixels (lowbit_predict_pixels)
        res.update({"pixel_images": len(px), "pixel_bit_exact_images": sum(int(e) for _, _, e in px),
                    "pixel_instructions_per_inference": float(np.mean([int(t) * ipt for _, t, _ in px]))})
    return res


def build_and_run(graph: Graph, out_dir: str | Path, samples: np.ndarray, expected: np.ndarray,
                  target_name: str = "cortex-m4", kernels: str = "auto", timeout: float = 120.0,
                  sizes: bool = True, pixels: np.ndarray | None = None) -> dict:
    """Generate, cross-compile, run under QEMU and check one build; returns a JSON-able report.

    ``graph``: a :class:`~lowbit.export.graph.Graph` (the float-activation C export,
    :func:`~lowbit.export.c_export.write_c`) or an integer graph of issue 17
    (:class:`~lowbit.export.intgraph.IntGraph`, :func:`~lowbit.export.int_c.write_int_c`: activations
    as packed integer codes); ``kernels``: "auto" (bit-packed kernels where a layer's bits make them
    pay), "int" (the plain integer kernel everywhere), "packed" (bit-packed wherever possible).
    ``sizes=False`` skips the second (empty-model) build: no flash/RAM figures. ``pixels``: the samples' raw uint8
    images, for an integer graph that records its input normalisation: the program also runs every sample
    through ``lowbit_predict_pixels`` (its instructions, its bit-exactness; flash then holds both entry points)."""
    from ..c_export import write_c

    tgt = target(target_name)
    check_tools()
    out = Path(out_dir)
    samples = np.asarray(samples, np.float32)
    expected = np.asarray(expected, np.float32)
    if isinstance(graph, Graph):
        hook = PackedKernels(kernels)
        ce = write_c(graph, out, conv_hook=hook)
        chosen, runtime = hook.chosen, "float activations (c_export)"
    else:
        from ..int_c import write_int_c
        from .packed import patch_int_c

        if out.exists():
            for f in out.glob("lb_packed*"):
                f.unlink()
        ce = write_int_c(graph, out)
        chosen, runtime = patch_int_c(graph, out, kernels), "integer (int_c, lowbit_rt)"
    if pixels is not None and (isinstance(graph, Graph) or "LOWBIT_PIXEL_INPUT" not in (out / "model.h").read_text()):
        raise ConfigError("export --target: pixels need an integer graph that records its input normalisation")
    write_main(out, samples, expected, pixels)
    elf = build(out, tgt)
    full = elf_size(elf)
    base = elf_size(build(out, tgt, stub=True)) if sizes else None
    res = parse_output(run_qemu(elf, tgt, timeout), expected.shape[1])
    lg = res.pop("logits")
    exact = int(np.all(lg.view(np.uint32) == expected.view(np.uint32), axis=1).sum())
    flash = (full["text"] + full["data"]) - (base["text"] + base["data"]) if base else None
    static_ram = (full["data"] + full["bss"]) - (base["data"] + base["bss"]) if base else None
    return {"target": tgt.name, "machine": tgt.machine, "dir": str(out), "elf": str(elf),
            "runtime": runtime, "kernels": chosen, "size": full, "size_without_model": base,
            "flash_bytes": flash, "static_ram_bytes": static_ram, "ram_bytes": static_ram + res["stack_bytes"] if base else None,
            "generator_flash_bytes": ce.flash_bytes, "generator_ram_bytes": ce.ram_bytes,
            "images": len(samples), "bit_exact_images": exact, **res,
            "instructions_per_inference": float(np.mean(res["instructions"]))}
