"""Integer-only deployment (issue 17): fixed-point requantization, integer-mode QAT, the integer
package, the C runtime and the integer ONNX model."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from lowbit.export.requant import quantize_multiplier, real_multiplier, requantize

CC = shutil.which("cc") or shutil.which("gcc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler on PATH")


def _cases(n=20000, seed=0):
    rng = np.random.default_rng(seed)
    real = np.exp(rng.uniform(np.log(1e-9), np.log(2.0**29), n)) * rng.choice([-1.0, 1.0], n)
    x = rng.integers(-2**31 + 1, 2**31 - 1, n)
    # keep x * real inside int32 (what a requantized output is)
    lim = (2**31 - 2**20) / np.maximum(np.abs(real), 1.0)
    x = np.clip(x, -lim, lim)
    x = x.astype(np.int64)
    x[:200] = rng.integers(-300, 300, 200)  # small accumulators with moderate multipliers
    real[:200] = np.exp(rng.uniform(np.log(1e-3), np.log(1e3), 200))
    real[:100] = 0.5
    return real, x


def test_requantize_equals_float_formula_within_one_code():
    real, x = _cases()
    m, sh = quantize_multiplier(real)
    assert m.dtype == np.int32 and sh.dtype == np.int32
    big = np.abs(real) >= 2.0**-31
    assert np.all(np.abs(np.abs(m[big]) - 2**30.5) <= 2**30.5)  # normalised mantissas
    assert np.allclose(real_multiplier(m, sh)[big], real[big], rtol=2**-30)
    got = requantize(x, m, sh)
    want = np.rint(x.astype(np.float64) * real)  # float64 is exact enough here (|x real| < 2^31)
    assert np.abs(got - want).max() <= 1
    # round half up on exact ties: 0.5 * odd
    assert requantize(np.array([1, 3, -1, -3]), *quantize_multiplier(np.full(4, 0.5))).tolist() == [1, 2, 0, -1]


def test_requantize_torch_equals_numpy():
    torch = pytest.importorskip("torch")
    real, x = _cases(2000, seed=1)
    m, sh = quantize_multiplier(real)
    assert np.array_equal(requantize(torch.from_numpy(x), m, sh).numpy(), requantize(x, m, sh))


@needs_cc
def test_requantize_c_is_bit_exact(tmp_path):
    from lowbit.export.int_c import RUNTIME_DIR

    real, x = _cases(5000, seed=2)
    m, sh = quantize_multiplier(real)
    drv = tmp_path / "drv.c"
    drv.write_text('#include <stdio.h>\n#include "lowbit_rt.h"\nint main(void){long a,b,c;'
                   'while(scanf("%ld %ld %ld",&a,&b,&c)==3)printf("%d\\n",lb_requantize((int32_t)a,(int32_t)b,(int32_t)c));'
                   'return 0;}\n')
    exe = tmp_path / "drv"
    subprocess.run([CC, "-std=c99", "-O2", "-I", str(RUNTIME_DIR), str(drv), str(RUNTIME_DIR / "lowbit_rt.c"),
                    "-o", str(exe), "-lm"], check=True)
    inp = "\n".join(f"{a} {b} {c}" for a, b, c in zip(x, m, sh))
    out = subprocess.run([str(exe)], input=inp, capture_output=True, text=True, check=True).stdout.split()
    assert np.array_equal(np.array(out, dtype=np.int64), requantize(x, m, sh))
