"""The integer C export as a firmware team builds it (session 24, an embedded engineer's audit): strict warnings,
flags that would change the input's codes, two models in one firmware, C++ includers, the descriptor size."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from lowbit import create_model
from lowbit.errors import ConfigError
from lowbit.export.c_export import run_c
from lowbit.export.int_c import _DESC_BYTES, RUNTIME_DIR, compile_int_c, write_int_c
from lowbit.intmode import int_graph

from quant_helpers import settled

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STRICT = ["-std=c99", "-O2", "-Wall", "-Wextra", "-Wpedantic", "-Wshadow", "-Wconversion", "-Wsign-conversion",
          "-Wcast-align", "-Wstrict-prototypes", "-Wmissing-prototypes", "-Wundef", "-Wdouble-promotion",
          "-Wfloat-equal", "-Werror"]
W2A2 = {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}, "integer": True}
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc")


def _graph(plan=W2A2, seed=0, norm=True):
    m = settled(create_model("resnet8", in_channels=1, num_classes=10, image_size=28, width=0.25), (1, 28, 28), plan,
                seed=seed)
    g = int_graph(m, torch.zeros(1, 1, 28, 28))
    if norm:
        g.meta = {"input_normalisation": {"mean": [0.25], "std": [0.5]}}
    return m, g


def _cc(cmd, cwd):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@needs_gcc
@pytest.mark.parametrize("cc", ["gcc", "arm-none-eabi-gcc cortex-m4", "arm-none-eabi-gcc cortex-m0", "clang",
                                "clang cortex-m4"])
def test_the_runtime_builds_warning_free_with_strict_flags(cc, tmp_path):
    """A firmware team's -Werror build: before session 24 the DSP loops gave 36 -Wsign-conversion warnings, the
    float input one -Wfloat-equal, and clang an unused function on the Cortex-M4."""
    prog, *cpu = cc.split()
    if shutil.which(prog) is None:
        pytest.skip(f"{prog} not installed (scripts/install_mcu_tools.sh installs it)")
    target = []
    if cpu and prog == "clang":
        arm_inc = "/usr/lib/arm-none-eabi/include"
        if shutil.which("arm-none-eabi-gcc") is None:
            pytest.skip("no arm-none-eabi headers (scripts/install_mcu_tools.sh installs them)")
        target = ["--target=thumbv7em-none-eabihf", f"-mcpu={cpu[0]}", "-mfpu=fpv4-sp-d16", "-mfloat-abi=hard",
                  "-isystem", arm_inc]
    elif cpu:
        target = ["-mthumb", f"-mcpu={cpu[0]}"]
    mcu = RUNTIME_DIR.parent / "mcu"
    for src in [RUNTIME_DIR / "lowbit_rt.c"] + ([mcu / "lb_packed.c", mcu / "lb_packed_rt.c"] if cpu else []):
        _cc([prog, *target, *STRICT, f"-I{RUNTIME_DIR}", f"-I{mcu}", "-c", str(src), "-o", str(tmp_path / "x.o")],
            tmp_path)


@needs_gcc
def test_fast_math_is_refused_and_reciprocal_math_keeps_the_input_codes(tmp_path, monkeypatch):
    """-ffast-math let gcc turn the clip_div input rule's x / step into x * (1 / step): 2 of 46 images changed
    logits (session 24). lowbit_rt.c now stops such a build, and without __FAST_MATH__ to test
    (-funsafe-math-optimizations) the division stays one division per element. Inputs at half steps."""
    m, g = _graph({**W2A2, "layers": {"conv1": {"act": {"name": "pact", "bits": 8}}}})
    a = g.ops[0].act
    assert a.rule == "clip_div"
    k = np.random.default_rng(0).integers(0, a.qmax, size=(12, 1, 28, 28))
    x = ((k + 0.5) * np.float32(a.step) + np.float32(a.lo)).astype(np.float32)
    with torch.no_grad():
        y = m(torch.from_numpy(x)).numpy()
    write_int_c(g, tmp_path / "c")
    monkeypatch.setenv("LOWBIT_CFLAGS", "-O3 -funsafe-math-optimizations")
    exe = compile_int_c(tmp_path / "c")
    assert np.array_equal(run_c(exe, x, 10).view(np.uint32), y.view(np.uint32))
    monkeypatch.setenv("LOWBIT_CFLAGS", "-O2 -ffast-math")
    with pytest.raises(ConfigError, match="build without -ffast-math"):
        compile_int_c(tmp_path / "c")
    monkeypatch.setenv("LOWBIT_CFLAGS", "-O2 -ffast-math -DLB_ALLOW_FAST_MATH")  # the escape, for codes-only builds
    compile_int_c(tmp_path / "c")


@needs_gcc
def test_two_models_link_into_one_program_with_prefixes_and_a_cpp_includer(tmp_path):
    """Two exports in one firmware clashed (lowbit_predict, the include guard, LOWBIT_* macros) and model.h had no
    extern "C". With prefixes both link beside one runtime, a C++ file includes both headers, and each model
    computes its own logits."""
    ma, ga = _graph(seed=0)
    mb, gb = _graph({**W2A2, "weight": {"name": "sawb", "bits": 4}, "act": {"name": "pact", "bits": 4}}, seed=1)
    write_int_c(ga, tmp_path / "kws", prefix="kws")
    write_int_c(gb, tmp_path / "vww", prefix="vww")
    h = (tmp_path / "kws" / "model.h").read_text()
    assert "void kws_predict(const float *input, float *logits);" in h and "#define KWS_IN_SIZE 784" in h
    assert "lowbit_predict" not in h and "LOWBIT_IN_SIZE" not in h and 'extern "C"' in h
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        want = np.concatenate([ma(torch.from_numpy(x)).numpy(), mb(torch.from_numpy(x)).numpy()], 1)
    x.tofile(tmp_path / "x.bin")
    main = r"""
#include <stdio.h>
#include "kws/model.h"
#include "vww/model.h"
int main(void) {
    static float x[KWS_IN_SIZE], y[KWS_OUT_SIZE + VWW_OUT_SIZE];
    FILE *f = fopen("x.bin", "rb");
    if (!f || fread(x, sizeof x, 1, f) != 1) return 2;
    fclose(f);
    kws_predict(x, y);
    vww_predict(x, y + KWS_OUT_SIZE);
    f = fopen("y.bin", "wb");
    fwrite(y, sizeof y, 1, f);
    fclose(f);
    return 0;
}
"""
    (tmp_path / "main.c").write_text(main)
    (tmp_path / "main.cpp").write_text(main)
    rt = str(tmp_path / "kws" / "lowbit_rt.c")
    flags = ["-O2", f"-I{tmp_path / 'kws'}", "-c"]
    for name in ("kws", "vww"):
        _cc(["gcc", "-std=c99", *flags, str(tmp_path / name / "model.c"), "-o", f"{name}.o"], tmp_path)
    _cc(["gcc", "-std=c99", *flags, rt, "-o", "rt.o"], tmp_path)
    _cc(["gcc", "-std=c99", "-O2", "main.c", "kws.o", "vww.o", "rt.o", "-lm", "-o", "two_c"], tmp_path)
    if shutil.which("g++"):
        _cc(["g++", "-O2", f"-I{tmp_path / 'kws'}", "main.cpp", "kws.o", "vww.o", "rt.o", "-lm", "-o", "two_cpp"],
            tmp_path)
        # and model.c itself as C++ (C++20 wants designated initializers in declaration order)
        _cc(["g++", "-std=c++20", "-x", "c++", *flags, str(tmp_path / "kws" / "model.c"), "-o", "kws_cpp.o"], tmp_path)
    for exe in ["two_c"] + (["two_cpp"] if shutil.which("g++") else []):
        _cc([str(tmp_path / exe)], tmp_path)
        got = np.fromfile(tmp_path / "y.bin", dtype=np.float32).reshape(1, 20)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), exe
    for bad in ("lb_x", "9a", "a-b", ""):
        with pytest.raises(ConfigError, match="C prefix"):
            write_int_c(ga, tmp_path / "bad", prefix=bad)


def test_the_header_says_what_the_input_is_and_what_the_flash_figure_counts(tmp_path):
    _, g = _graph()
    write_int_c(g, tmp_path)
    h = (tmp_path / "model.h").read_text()
    assert "normalised: x = (pixel / 255 - mean) / std per channel, mean [0.25], std [0.5]" in h
    assert "logits[i] is class label i" in h and "LOWBIT_DESC_BYTES" in h and "the stack" in h


@pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None, reason="no arm-none-eabi-gcc")
def test_descriptor_bytes_are_sizeof_lb_conv_t_on_a_cortex_m(tmp_path):
    """The report counted 124 bytes per lb_conv_t; arm-none-eabi-gcc lays it out in 144."""
    (tmp_path / "s.c").write_text('#include "lowbit_rt.h"\nchar lb_size[sizeof(lb_conv_t)];\n')
    _cc(["arm-none-eabi-gcc", "-mthumb", "-mcpu=cortex-m4", f"-I{RUNTIME_DIR}", "-c", "s.c", "-o", "s.o"], tmp_path)
    out = _cc(["arm-none-eabi-nm", "-S", "s.o"], tmp_path).stdout
    size = next(int(line.split()[1], 16) for line in out.splitlines() if line.endswith("lb_size"))
    assert size == _DESC_BYTES == 144


@needs_gcc
def test_nan_and_infinite_inputs_are_defined_in_c_and_onnx(tmp_path):
    """A NaN input was undefined behaviour in C ((int32_t)NaN) and an arbitrary code in ONNX (Cast of NaN): both
    now read it as 0; ±inf clamp to the ends of the input grid. C and both integer ONNX files agree."""
    from lowbit.export import onnx_export as ox
    from lowbit.export.int_onnx import variants

    m, g = _graph()
    x = np.random.default_rng(1).standard_normal((4, 1, 28, 28)).astype(np.float32)
    x[0, 0, :5, :5] = np.nan
    x[1, 0, 3, :] = np.inf
    x[2, 0, :, 7] = -np.inf
    clean = np.nan_to_num(x, nan=0.0, posinf=1e30, neginf=-1e30)  # the reference refuses non-finite inputs
    with torch.no_grad():
        want = m(torch.from_numpy(clean)).numpy()
    write_int_c(g, tmp_path / "c")
    got_c = run_c(compile_int_c(tmp_path / "c"), x, 10)
    assert np.array_equal(got_c.view(np.uint32), want.view(np.uint32))
    for name in ("integer", "integer_fused"):
        got = ox.run(ox.session(variants(g)[name]), x)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), name
