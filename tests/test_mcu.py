"""lowbit.export.mcu: bit-packed kernels equal the plain integer kernel; Cortex-M build under QEMU."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit import create_model, quantize
from lowbit.errors import ConfigError
from lowbit.export import IntegerReference, lower
from lowbit.export.c_export import CFLAGS, KERNELS
from lowbit.export.mcu import TARGETS, build_and_run, check_tools, fp32_graph, missing_tools, parse_output, run_qemu
from lowbit.export.mcu.packed import SOURCES, affine_form, choose, pack_act_planes, pack_weight_planes
from lowbit.export.numpy_ref import ConvKernel, prepare
from lowbit.export.pack import pack_codes
from quant_helpers import OddKernelNet, settled

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HARNESS = """
#include <math.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include "lb_packed.h"
typedef struct { int32_t C, H, W, O, KH, KW, SH, SW, PH, PW, OH, OW, G; } lb_geom;  /* as generated */
""" + KERNELS + """
void ref_conv(const lb_pk_geom *p, const uint8_t *xq, int32_t zero, const uint8_t *wc, uint32_t bits, const int16_t *lut,
              int32_t rows, int32_t L, const float *ca, const float *cb, const float *cc, const float *cd,
              const float *bias, float *y, int16_t *wrow)
{
    const lb_geom g = {p->C, p->H, p->W, p->O, p->KH, p->KW, p->SH, p->SW, p->PH, p->PW, p->OH, p->OW, 1};
    lb_conv_int(&g, xq, zero, wc, bits, lut, rows, L, ca, cb, cc, cd, bias, y, wrow);
}
"""


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """The plain integer kernel (c_export.KERNELS) and lb_packed.c in one host shared library."""
    assert shutil.which("gcc"), "the kernel tests need gcc"
    d = tmp_path_factory.mktemp("kern")
    for f in SOURCES:
        shutil.copyfile(f, d / f.name)
    (d / "harness.c").write_text(HARNESS)
    subprocess.run(["gcc", *CFLAGS, "-Wno-unused-function", "-shared", "-fPIC", "-o", str(d / "k.so"), "harness.c",
                    "lb_packed.c", "-lm"], cwd=d, check=True, capture_output=True)
    return ctypes.CDLL(str(d / "k.so"))


def _p(a):
    return None if a is None else a.ctypes.data_as(ctypes.c_void_p)


def run_both(lib, rng, C, H, W, O, K, S, P, wbits, abits, rows, zero, terms, unit=False):
    """One random layer through lb_conv_int and lb_pk_pack_act + lb_pk_conv; returns (plain, packed, A)."""
    OH, OW = (H + 2 * P - K) // S + 1, (W + 2 * P - K) // S + 1
    geom = np.array([C, H, W, O, K, K, S, S, P, P, OH, OW], dtype=np.int32)
    u = rng.integers(0, 2**abits, size=(C, H, W)).astype(np.uint8)
    codes = rng.integers(0, 2**wbits, size=(O, C, K, K)).astype(np.uint8)
    a = rng.integers(-3, 4, size=rows).astype(np.int16)
    b = rng.integers(-(2**wbits), 2**wbits, size=rows).astype(np.int16)
    lut = (a[:, None].astype(np.int64) * np.arange(2**wbits)[None, :] + b[:, None]).astype(np.int16)
    f = lambda: rng.uniform(-1, 1, O).astype(np.float32)  # noqa: E731
    ca = np.ones(O, np.float32) if unit else f()
    cb, cc, cd = (f() if t in terms else None for t in ("cb", "cc", "cd"))
    bias = np.zeros(O, np.float32) if unit else f()
    y_ref, y_pk = np.zeros((O, OH, OW), np.float32), np.zeros((O, OH, OW), np.float32)
    wc = pack_codes(codes.reshape(-1), wbits)
    wrow = np.zeros(C * K * K, np.int16)
    lib.ref_conv(_p(geom), _p(u), zero, _p(wc), wbits, _p(lut), rows, 2**wbits, _p(ca), _p(cb), _p(cc), _p(cd),
                 _p(bias), _p(y_ref), _p(wrow))
    xp = np.zeros((H + 2 * P) * (W + 2 * P) * abits * ((C + 31) // 32), np.uint32)
    lib.lb_pk_pack_act(_p(geom), _p(u), abits, _p(xp))
    assert np.array_equal(xp, pack_act_planes(u, abits, P, P).reshape(-1))  # C packing == NumPy twin
    wp = np.ascontiguousarray(pack_weight_planes(codes, wbits).reshape(-1))
    acc = np.zeros(2 * O, np.int32)
    lib.lb_pk_conv(_p(geom), _p(xp), abits, zero, _p(wp), wbits, _p(a), _p(b), rows, _p(ca), _p(cb), _p(cc), _p(cd),
                   _p(bias), _p(y_pk), _p(acc))
    # A = sum m*(u - zero) over in-bounds taps, straight from the definition (float64 sums of integers: exact)
    m = lut[np.arange(O) if rows > 1 else np.zeros(O, int)][np.arange(O)[:, None], codes.reshape(O, -1)]
    xpad = np.pad(u.astype(np.int64) - zero, ((0, 0), (P, P), (P, P)))
    win = np.lib.stride_tricks.sliding_window_view(xpad, (K, K), axis=(1, 2))[:, ::S, ::S][:, :OH, :OW]
    A = np.einsum("of,pf->op", m.astype(np.float64),
                  win.transpose(1, 2, 0, 3, 4).reshape(OH * OW, -1).astype(np.float64)).reshape(O, OH, OW)
    return y_ref, y_pk, A


BITS = [(b, b) for b in range(1, 9)] + [(1, 2), (2, 1), (1, 8), (8, 1), (3, 5), (4, 2)]


@pytest.mark.parametrize("wbits,abits", BITS)
def test_packed_kernel_equals_plain_integer_kernel(kernels, wbits, abits):
    rng = np.random.default_rng(100 * wbits + abits)
    cases = [  # C, H, W, O, K, S, P, rows, zero, terms
        (1, 5, 5, 3, 3, 1, 1, 1, 0, ()),
        (17, 6, 7, 5, 3, 1, 1, 5, 0, ()),
        (33, 5, 6, 3, 3, 2, 1, 1, 1, ("cb",)),
        (35, 4, 5, 7, 1, 2, 0, 7, 0, ("cc", "cd")),
        (65, 3, 3, 3, 3, 1, 0, 1, 2 ** (abits - 1), ("cb", "cc", "cd")),
        (1023, 1, 1, 3, 1, 1, 0, 3, 0, ()),  # a linear layer with more than 31 words per tap row
    ]
    for C, H, W, O, K, S, P, rows, zero, terms in cases:
        y_ref, y_pk, _ = run_both(kernels, rng, C, H, W, O, K, S, P, wbits, abits, rows, zero, terms)
        assert np.array_equal(y_ref.view(np.uint32), y_pk.view(np.uint32)), (C, H, W, O, K, S, P, zero, terms)
        # with a unit rescale the outputs are f32(A), A the integer sum itself: both kernels equal it
        y_ref, y_pk, A = run_both(kernels, rng, C, H, W, O, K, S, P, wbits, abits, rows, zero, (), unit=True)
        assert np.array_equal(y_pk, A.astype(np.float32)) and np.array_equal(y_ref, y_pk)


def resnet(plan: dict, width: float = 0.25) -> torch.nn.Module:
    torch.manual_seed(0)
    m = create_model("resnet8", in_channels=1, num_classes=10, image_size=28, width=width)
    quantize(m, plan)
    m.train()
    with torch.no_grad():
        for _ in range(2):
            m(torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    return m.eval()


W1A1 = {"weight": {"name": "bwn", "bits": 1}, "act": {"name": "pact", "bits": 1}}
W2A2 = {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}}


def test_kernel_choice_by_bits():
    x = torch.randn(2, 1, 28, 28)
    for plan, want in ((W1A1, "xnor"), (W2A2, "bitserial"),
                       ({"weight": {"name": "sawb", "bits": 4}, "act": {"name": "pact", "bits": 4}}, "int"),
                       ({"weight": {"name": "po2", "bits": 2}, "act": {"name": "pact", "bits": 2}}, "int")):
        ks = [k for k in prepare(lower(resnet(plan), x)) if isinstance(k, ConvKernel)]
        assert [choose(k) for k in ks] == ["int"] + [want] * (len(ks) - 2) + ["int"]  # FP32 first/last: float kernel
    assert affine_form(np.array([[-3, -1, 1, 3]])) is not None and affine_form(np.array([[-4, -2, -1, 1]])) is None


needs_tools = pytest.mark.skipif(bool(missing_tools()), reason=f"Cortex-M tools missing: {', '.join(missing_tools())} "
                                 "(scripts/install_mcu_tools.sh)")


@needs_tools
def test_tiny_model_on_cortex_m4_under_qemu_is_bit_exact(tmp_path):
    m = resnet(W1A1)
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(5)).numpy()
    g = lower(m, torch.from_numpy(x))
    want = IntegerReference(g).run(x)
    r = build_and_run(g, tmp_path / "m4", x, want, "cortex-m4")
    assert r["bit_exact_images"] == 2 and r["bit_exact_device"] == 2
    assert set(r["kernels"].values()) == {"float", "xnor"}
    assert r["instructions_per_tick"] == 40  # mps2-an386: 25 MHz SysTick, 1 instruction / ns under -icount shift=0
    assert 0 < r["flash_bytes"] < r["size"]["text"] + r["size"]["data"] and r["ram_bytes"] > 4 * 784
    # deterministic: a second run counts the same instructions
    again = parse_output(run_qemu(Path(r["elf"]), TARGETS["cortex-m4"]), 10)
    assert again["instructions"] == r["instructions"]
    # mps2-an500 (25 MHz), mps2-an505 (20 MHz), mps2-an385 (25 MHz; no FPU: the float kernels in soft float), the
    # micro:bit (16 MHz; ARMv6-M, no FPU)
    for tgt, ipt in (("cortex-m7", 40), ("cortex-m33", 50), ("cortex-m3", 40), ("cortex-m0", 62.5)):
        rt = build_and_run(g, tmp_path / tgt, x[:1], want[:1], tgt, sizes=False)
        assert rt["bit_exact_images"] == 1 and rt["instructions_per_tick"] == ipt
    # the FP32 build of the same network from the same generator is bit-exact with its own NumPy reference
    fg = fp32_graph(g)
    rf = build_and_run(fg, tmp_path / "fp", x[:1], IntegerReference(fg).run(x[:1]), "cortex-m4", sizes=False)
    assert rf["bit_exact_images"] == 1 and set(rf["kernels"].values()) == {"float"}
    # its float activations do not fit the nRF51822's 16 KiB of RAM: the linker's one line, with the part's name
    with pytest.raises(ConfigError, match=r"nrf51822: the program does not fit the nRF51822 \(256 KiB flash, 16 KiB "
                                          r"RAM\): region `RAM' overflowed by \d+ bytes$"):
        build_and_run(fg, tmp_path / "nrf", x[:1], IntegerReference(fg).run(x[:1]), "nrf51822", sizes=False)


@needs_tools
@pytest.mark.parametrize("residual", ["accumulator", "output"])
def test_integer_runtime_with_packed_kernels_on_cortex_m4(tmp_path, residual):
    # issue 17's integer-only runtime (activations as packed codes): the bit-packed kernels replace lb_conv
    # in the 2-bit layers, and both builds equal the integer reference bit for bit; the residual layers too,
    # in either form (lb_conv's epilogue, lb_conv_out, adds the residual; before session 18 the output form
    # kept lb_conv)
    from lowbit.export.intgraph import IntReference as IntRef
    from lowbit.intmode import int_graph

    m = settled(create_model("resnet8", in_channels=1, num_classes=10, image_size=28, width=0.25), (1, 28, 28),
                {**W2A2, "integer": True, "integer_residual": residual}, passes=2)
    x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(5)).numpy()
    g = int_graph(m, torch.from_numpy(x))
    want = IntRef(g).run(x)
    packed = build_and_run(g, tmp_path / "auto", x, want, "cortex-m4")
    assert packed["bit_exact_images"] == 1 and "bitserial" in packed["kernels"].values()
    res_layers = {op.name for op in g.ops if op.kind == "conv" and len(op.inputs) == 2}
    assert res_layers  # the residual blocks' second convs
    assert {packed["kernels"][n] for n in res_layers} == {"bitserial"}
    plain = build_and_run(g, tmp_path / "int", x, want, "cortex-m4", kernels="int", sizes=False)
    assert plain["bit_exact_images"] == 1 and set(plain["kernels"].values()) == {"int"}
    if residual == "output":  # cores without an FPU: the same integers (the boundary's float ops in soft float);
        # ARMv6-M (the M0) has no 64-bit multiply or CLZ either: the requantization's calls into libgcc
        # nrf51822: the M0 with the real part's 16 KiB of RAM and 256 KiB of flash, the whole program inside
        for tgt, board in (("cortex-m3", "mps2-an385"), ("cortex-m0", "microbit"), ("nrf51822", "microbit")):
            r = build_and_run(g, tmp_path / tgt, x, want, tgt, sizes=False)
            assert r["bit_exact_images"] == 1 and r["machine"] == board


@needs_tools
def test_a_stack_that_overflows_a_parts_ram_does_not_fit(tmp_path, monkeypatch):
    """A program whose static data link into the part's RAM but leave too little for the stack faulted under QEMU
    (or ran into .bss), and the report was "the program failed ...: lowbit-mcu calib ..." (a user audit, session
    23). Now it does not fit, with the stack it needs (measured with more RAM), so that "auto" kernels fall back to
    the plain kernel as for a link that overflows."""
    import dataclasses

    from lowbit.export import mcu
    from lowbit.export.intgraph import IntReference as IntRef
    from lowbit.intmode import int_graph

    m = settled(create_model("resnet8", in_channels=1, num_classes=10, image_size=28, width=0.25), (1, 28, 28),
                {**W2A2, "integer": True}, passes=2)
    x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(5)).numpy()
    g = int_graph(m, torch.from_numpy(x))
    r = build_and_run(g, tmp_path / "fits", x, IntRef(g).run(x), "nrf51822", kernels="int", sizes=False)
    static = r["size"]["data"] + r["size"]["bss"]
    assert r["bit_exact_images"] == 1 and r["stack_bytes"] > 64
    monkeypatch.setitem(mcu.TARGETS, "nrf51822", dataclasses.replace(mcu.TARGETS["nrf51822"], ram_size=static + 64))
    need = r["stack_bytes"]
    with pytest.raises(mcu.DoesNotFit, match=rf"does not fit the nRF51822 .*: its static RAM \({static} B\) "
                                             rf"leaves 64 B for the stack, which needs {need} B .* overflowed by "
                                             rf"{need - 64} bytes"):
        build_and_run(g, tmp_path / "tight", x, IntRef(g).run(x), "nrf51822", kernels="int", sizes=False)


@needs_tools
def test_a_w2a2_resnet8_runs_in_the_nrf51822s_16_kib_of_ram(tmp_path, monkeypatch):
    """The micro:bit's part (Cortex-M0, 256 KiB flash, 16 KiB RAM): a full-width W2A2 ResNet-8 in integer mode (the
    accumulator-form residual, as the MCU benchmark's runs) fits with the bit-packed kernels, their bit planes
    packed a band of rows at a time (packed.pk_band). With planes of the whole input (as before session 20) they
    would not: "auto" then falls back to the plain kernel and says why. The same network's float-activation export
    does not fit at all, nor does the default residual form (one line each: the part, the region, the bytes over)."""
    from lowbit.export.intgraph import IntReference as IntRef
    from lowbit.export.mcu import packed
    from lowbit.intmode import int_graph

    m = settled(create_model("resnet8", in_channels=1, num_classes=10, image_size=28),
                (1, 28, 28), {**W2A2, "integer": True, "integer_residual": "accumulator"}, passes=2)
    x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(5)).numpy()
    g = int_graph(m, torch.from_numpy(x))
    r = build_and_run(g, tmp_path / "nrf", x, IntRef(g).run(x), "nrf51822")
    assert r["bit_exact_images"] == 1 and "bitserial" in r["kernels"].values() and "packed_kernels_did_not_fit" not in r
    assert r["size"]["data"] + r["size"]["bss"] + r["stack_bytes"] <= 16 * 1024  # the whole program's RAM
    monkeypatch.setattr(packed, "PK_BAND_SHARE", 100.0)  # the whole input's planes at once
    r = build_and_run(g, tmp_path / "nrf_whole", x, IntRef(g).run(x), "nrf51822")
    assert r["bit_exact_images"] == 1 and set(r["kernels"].values()) == {"int"}
    assert "does not fit the nRF51822 (256 KiB flash, 16 KiB RAM): region `RAM' overflowed by" in \
        r["packed_kernels_did_not_fit"]
    fg = lower(m, torch.from_numpy(x))
    with pytest.raises(ConfigError, match=r"does not fit the nRF51822 .* bytes \(this C export keeps float32 "
                                          r"activations; a run trained in integer mode"):
        build_and_run(fg, tmp_path / "float", x, IntegerReference(fg).run(x), "nrf51822", sizes=False)
    with pytest.raises(ConfigError, match=r"does not fit the nRF51822 .* overflowed by \d+ bytes$"):  # the FP32 twin
        build_and_run(fp32_graph(fg), tmp_path / "fp32", x, IntegerReference(fp32_graph(fg)).run(x), "nrf51822",
                      sizes=False)
    # the default residual form's 8-bit streams do not fit either: the error names the form that does
    m = settled(create_model("resnet8", in_channels=1, num_classes=10, image_size=28),
                (1, 28, 28), {**W2A2, "integer": True}, passes=2)
    g = int_graph(m, torch.from_numpy(x))
    with pytest.raises(ConfigError, match=r"region `RAM' overflowed by \d+ bytes \(the 8-bit residual streams of "
                                          r"integer_residual: output .* integer_residual: accumulator"):
        build_and_run(g, tmp_path / "output_form", x, IntRef(g).run(x), "nrf51822", sizes=False)


@needs_tools
def test_integer_runtime_dsp_loops_on_cortex_m4_and_m33(tmp_path):
    """The DSP extension's loops of lb_conv (SMLAD on 3-wide rows, four pointwise outputs per load; session 19)
    compute the integer reference's numbers: a small MobileNetV2 (pointwise and depthwise convs, signed 4-bit
    inputs with zero point 8, 8-bit residual streams read in place) on two cores that have the extension, and on
    the Cortex-M3, which has not (the portable loops, as on the host)."""
    from lowbit.export.intgraph import IntReference as IntRef
    from lowbit.intmode import int_graph

    signed = {"act": {"name": "lsq", "bits": 4, "signed": True}}
    plan = {"weight": {"name": "sawb", "bits": 4}, "act": {"name": "pact", "bits": 4}, "integer": True,
            "layers": {"features.[4-9].conv.0": signed, "features.1[0-9].conv.0": signed, "features.20": signed}}
    m = settled(create_model("mobilenetv2", in_channels=1, num_classes=10, image_size=16, width=0.25), (1, 16, 16),
                plan, passes=20, batch=8)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2)).numpy()
    g = int_graph(m, torch.from_numpy(x))
    want = IntRef(g).run(x)
    assert len({np.asarray(v).tobytes() for v in want}) == 2  # two different images, two different outputs
    for tgt in ("cortex-m4", "cortex-m33", "cortex-m3"):
        r = build_and_run(g, tmp_path / tgt, x, want, tgt, kernels="int", sizes=False)
        assert r["bit_exact_images"] == 2, tgt
    src = (tmp_path / "cortex-m4" / "lowbit_rt.c").read_text()
    assert "__smlad" in src and "__smlabb" in src
    # a 1x3 kernel of stride (1, 2) and odd output widths: the DSP loop's rows not unrolled, one output alone
    m = settled(OddKernelNet(), (1, 11, 11),
                {**W2A2, "act": {"name": "pact", "bits": 2, "init": 2.0}, "integer": True}, passes=20)
    x = torch.randn(2, 1, 11, 11, generator=torch.Generator().manual_seed(3)).numpy()
    g = int_graph(m, torch.from_numpy(x))
    want = IntRef(g).run(x)
    r = build_and_run(g, tmp_path / "odd", x, want, "cortex-m4", kernels="int", sizes=False)
    assert r["bit_exact_images"] == 2


def test_missing_tool_is_one_line_naming_it(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="'arm-none-eabi-gcc' not found.*install gcc-arm-none-eabi"):
        check_tools()
    with pytest.raises(ConfigError, match="unknown target 'cortex-a53'"):
        build_and_run(None, "x", np.zeros((1, 1)), np.zeros((1, 1)), "cortex-a53")


def test_export_run_checks_the_target_before_any_work(tmp_path):
    from lowbit.export import export_run

    with pytest.raises(ConfigError, match="unknown target 'cortex-a53'; allowed: cortex-m0, cortex-m3, cortex-m4, cortex-m7, cortex-m33, nrf51822"):
        export_run(tmp_path / "no-run", formats="c", target="cortex-a53")


@needs_tools
def test_export_of_an_integer_run_on_cortex_m4_reports_its_fp32_build(tmp_path):
    """lowbit export INTEGER_RUN --target: the integer C runtime under QEMU beside the FP32 build of the same
    network (the run's latent weights, unquantized), as for a float-mode run."""
    from lowbit.config import load_config
    from lowbit.export import export_run
    from lowbit.export.api import format_mcu
    from lowbit.train import run

    cfg = load_config(Path(__file__).parent.parent / "configs" / "w2a2_integer.yaml",
                      ["model.width=0.25", "data.limit=300", "train.epochs=1", "train.batch_size=100",
                       "train.progress=false"])
    run(cfg, tmp_path / "run")
    rep = export_run(tmp_path / "run", out_dir=tmp_path / "export", formats="c", limit=20, target="cortex-m4",
                     c_images=2, mcu_images=1)
    # the packed file records the data's normalisation, so the C build also runs from raw pixels (session 19)
    assert rep["c"]["pixel_images"] == 2 and rep["c"]["pixel_bit_exact_images"] == 2
    m = rep["mcu"]
    assert m["bit_exact_images"] == 1 and m["fp32"]["bit_exact_images"] == 1
    assert m["pixel_images"] == 1 and m["pixel_bit_exact_images"] == 1  # on the core, from raw pixels
    assert 0 < m["pixel_instructions_per_inference"] < m["instructions_per_inference"]  # no float input to quantize
    assert m["fewer_instructions_than_fp32"] == m["fp32"]["instructions_per_inference"] / m["instructions_per_inference"]
    assert m["fp32"]["dir"] != m["dir"] and m["fp32"]["instructions_per_inference"] > 0
    assert m["fp32"]["ram_bytes"] > m["ram_bytes"]  # float32 activations against packed codes
    assert "FP32 build:" in format_mcu(m)


def test_every_data_file_of_the_package_is_in_its_wheel():
    """A non-editable install (a wheel) holds only the .py files and the package-data globs of pyproject.toml;
    before session 19 the Cortex-M files (startup.c, the packed kernels, the boards' linker scripts) were not among
    them, so ``--target`` failed on a pip-installed lowbit. Every other file under src/lowbit must match a glob."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    src = root / "src"
    files = [p for p in (src / "lowbit").rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
             and "__pycache__" not in p.parts]
    assert any(p.suffix == ".ld" for p in files)
    missing = []
    for p in files:
        rel = p.relative_to(src)
        ok = False
        for pkg, globs in data.items():
            base = Path(*pkg.split("."))
            if base in rel.parents:
                sub = rel.relative_to(base).as_posix()
                ok = ok or any(fnmatch.fnmatch(sub, g) and sub.count("/") == g.count("/") for g in globs)
        if not ok:
            missing.append(str(rel))
    assert not missing, f"not in pyproject.toml's package-data: {missing}"


def test_a_quantized_build_that_runs_more_instructions_says_so():
    """Before session 23 the report said "(the quantized build: 0.84x fewer)" for one that ran 1.19x more."""
    from lowbit.export.api import _fewer

    assert _fewer(14.12) == "14.12x fewer" and _fewer(0.84) == "1.19x MORE instructions"

