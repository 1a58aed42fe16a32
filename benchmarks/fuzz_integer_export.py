"""Fuzz the integer-mode export (``plan.integer: true``) with random small CNNs.

Each case is one seed: a random CNN (1-3 input channels, 7-16 px; 1-4 convs with kernel 1/3/5, stride 1/2,
padding 0/1/2, groups 1 / depthwise / grouped, optional BatchNorm, ReLU, MaxPool2d, residual add of a
same-shaped tensor; then global average pooling or a flatten and 1-2 linears), a random integer-mode plan
(weight sawb/lsq, act pact/lsq, bits 2-8 each, per-layer bit overrides, the integer_* options), BatchNorm and
quantizer ranges settled by a few train-mode forwards, then ``export_int_model`` with the C build under
AddressSanitizer + UBSan (``LOWBIT_CFLAGS``). A case passes when NumPy, C and both ONNX models compute the
PyTorch integer model's logits bit for bit, the C self-test passes, ``failed_checks`` is empty and the
report's counts agree with what was checked.

    python benchmarks/fuzz_integer_export.py --seeds 0 100 --out benchmarks/results/integer_export/fuzz
    python benchmarks/fuzz_integer_export.py --replay benchmarks/results/integer_export/fuzz/cases.jsonl

writes ``cases.jsonl`` (one line per seed) into ``--out`` and prints a summary table. Outcomes:

* ``pass``          every check passed (``dead`` lists the integer tensors that were constant on the batch)
* ``refused``       a one-line ConfigError from ``quantize`` (supported-layer check): correct behaviour
* ``refused_late``  a ConfigError only while settling or exporting (or a multi-line one)
* ``wrong``         some backend is not bit-exact (or the report contradicts itself)
* ``crash``         another exception, or the compiled C model failed (sanitizer report, signal)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

SANITIZE = "-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
os.environ.setdefault("LOWBIT_CFLAGS", SANITIZE)
os.environ.setdefault("ASAN_OPTIONS", "detect_leaks=0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# random architectures
# ---------------------------------------------------------------------------------------------
def _out(h, k, s, p):
    return (h + 2 * p - k) // s + 1


def random_arch(rng: random.Random) -> dict:
    c, h = rng.randint(1, 3), rng.randint(7, 16)
    stress = rng.random() < 0.5
    wide = 16 if stress else 8
    arch = {"in_channels": c, "size": h, "layers": [], "tail": None, "linears": [], "stress": {}}
    shapes = [(c, h)]  # shape of every tensor produced so far (index 0: the input)
    n_conv = rng.randint(0 if stress else 1, 4)
    for i in range(n_conv):
        want_res = rng.random() < 0.3
        for _ in range(20):
            k = rng.choice([1, 3, 5])
            if want_res:
                s, p = 1, k // 2
            else:
                s, p = rng.choice([1, 1, 2]), rng.choice([0, 1, 2])
            if _out(h, k, s, p) >= 1 and k <= h + 2 * p:
                break
        else:
            k, s, p = 1, 1, 0
        g = rng.choice(["1", "1", "dw", "grouped"])
        if want_res:
            o = c
            if g == "grouped":
                divs = [d for d in range(2, c + 1) if c % d == 0]
                g = divs and rng.choice(divs) or 1
            elif g == "dw":
                g = c
            else:
                g = 1
        elif g == "dw":
            o, g = c * rng.choice([1, 1, 2]), c
        elif g == "grouped":
            divs = [d for d in range(2, c + 1) if c % d == 0]
            if divs:
                g = rng.choice(divs)
                o = g * rng.randint(1, 3)
            else:
                g, o = 1, rng.randint(2, wide)
        else:
            g, o = 1, rng.randint(2, wide)
        oh = _out(h, k, s, p)
        L = {"kind": "conv", "name": f"c{i}", "in": c, "out": o, "k": k, "stride": s, "pad": p, "groups": int(g),
             "bias": rng.random() < 0.4, "bn": rng.random() < 0.7, "relu": rng.random() < 0.75, "res": None,
             # an Identity/Dropout between the conv(+BN) and its add/ReLU (session 22)
             "mid": rng.choice(["identity", "dropout"]) if rng.random() < 0.1 else None}
        if want_res and o == c and oh == h:
            cands = [j for j, sh in enumerate(shapes) if sh == (o, oh)]
            # the conv's own input (identity shortcut) mostly, else an earlier tensor of that shape
            L["res"] = len(shapes) - 1 if rng.random() < 0.7 else rng.choice(cands)
        arch["layers"].append(L)
        c, h = o, oh
        shapes.append((c, h))
        if rng.random() < 0.15:
            arch["layers"].append({"kind": rng.choice(["identity", "dropout"])})
        if rng.random() < 0.3 and h >= 2:
            for _ in range(10):
                pk, ps = rng.choice([2, 3]), rng.choice([1, 2])
                pp = rng.choice([0, 1]) if pk >= 2 else 0
                if pp <= pk // 2 and _out(h, pk, ps, pp) >= 1 and pk <= h + 2 * pp:
                    arch["layers"].append({"kind": "maxpool", "k": pk, "stride": ps, "pad": pp})
                    h = _out(h, pk, ps, pp)
                    shapes.append((c, h))
                    break
    arch["tail"] = rng.choice(["gap", "gap", "flatten", "flatten_module", "view", "view_n"])
    if not any(L["kind"] == "conv" for L in arch["layers"]) and arch["tail"] == "gap":
        arch["tail"] = "flatten"
    feats = c if arch["tail"] == "gap" else c * h * h
    arch["feats"] = feats
    n_lin = rng.randint(1, 2)
    for j in range(n_lin):
        last = j == n_lin - 1
        o = rng.randint(2, 10) if last else rng.randint(4, 16)
        arch["linears"].append({"name": f"fc{j}", "in": feats, "out": o, "relu": not last,
                                "bn": (not last) and rng.random() < 0.2})
        feats = o
    if stress:
        # weight / BatchNorm edits before settling (seeded): all-positive weights (large accumulators,
        # saturated codes), an all-zero output channel, negative / zero BatchNorm gammas
        names = [L["name"] for L in arch["layers"] if L["kind"] == "conv"] + [L["name"] for L in arch["linears"]]
        st = arch["stress"]
        for n in names:
            r = rng.random()
            if r < 0.2:
                st[n] = "abs"
            elif r < 0.3:
                st[n] = "zero_row"
            elif r < 0.4:
                st[n] = "scale10"
        for L in arch["layers"] + arch["linears"]:
            if L.get("bn") and rng.random() < 0.5:
                st[L["name"] + "_bn"] = rng.choice(["neg_gamma", "neg_gamma", "mixed_gamma", "mixed_gamma", "big_shift",
                                                     "big_shift", "zero_gamma"])
        if rng.random() < 0.2:
            st["input"] = rng.choice(["const", "scale10", "positive"])
    return arch


class FuzzNet(nn.Module):
    def __init__(self, arch: dict):
        super().__init__()
        self.arch = arch
        self.mods = nn.ModuleDict()
        for i, L in enumerate(arch["layers"]):
            if L["kind"] == "conv":
                self.mods[L["name"]] = nn.Conv2d(L["in"], L["out"], L["k"], stride=L["stride"], padding=L["pad"],
                                                 groups=L["groups"], bias=L["bias"])
                if L["bn"]:
                    self.mods[L["name"] + "_bn"] = nn.BatchNorm2d(L["out"])
                if L.get("mid"):
                    self.mods[L["name"] + "_mid"] = nn.Identity() if L["mid"] == "identity" else nn.Dropout(0.1)
            elif L["kind"] == "maxpool":
                self.mods[f"pool{i}"] = nn.MaxPool2d(L["k"], L["stride"], L["pad"])
            elif L["kind"] == "identity":
                self.mods[f"id{i}"] = nn.Identity()
            elif L["kind"] == "dropout":
                self.mods[f"drop{i}"] = nn.Dropout(0.1)
        if arch["tail"] == "gap":
            self.mods["gap"] = nn.AdaptiveAvgPool2d(1)
        if arch["tail"] == "flatten_module":
            self.mods["flat"] = nn.Flatten()
        for L in arch["linears"]:
            self.mods[L["name"]] = nn.Linear(L["in"], L["out"])
            if L["bn"]:
                self.mods[L["name"] + "_bn"] = nn.BatchNorm1d(L["out"])
        with torch.no_grad():
            for n, how in arch.get("stress", {}).items():
                if n == "input":
                    continue
                mod = self.mods[n]
                if how == "abs":
                    mod.weight.abs_()
                elif how == "zero_row":
                    mod.weight[0].zero_()
                    if mod.bias is not None:
                        mod.bias[0] = 0.5
                elif how == "scale10":
                    mod.weight.mul_(10.0)
                elif how == "neg_gamma":
                    mod.weight.neg_()
                elif how == "zero_gamma":
                    mod.weight[0] = 0.0
                elif how == "mixed_gamma":
                    mod.weight.copy_(torch.linspace(-2.0, 2.0, mod.weight.numel()) + 0.1)  # no exact 0
                elif how == "big_shift":
                    mod.bias.copy_(torch.linspace(-3.0, 3.0, mod.bias.numel()))

    def forward(self, x):
        ts = [x]
        for i, L in enumerate(self.arch["layers"]):
            if L["kind"] == "conv":
                y = self.mods[L["name"]](ts[-1])
                if L["bn"]:
                    y = self.mods[L["name"] + "_bn"](y)
                if L.get("mid"):
                    y = self.mods[L["name"] + "_mid"](y)
                if L["res"] is not None:
                    y = y + ts[L["res"]]
                if L["relu"]:
                    y = torch.relu(y)
                ts.append(y)
            elif L["kind"] == "maxpool":
                ts.append(self.mods[f"pool{i}"](ts[-1]))
            elif L["kind"] == "identity":
                ts[-1] = self.mods[f"id{i}"](ts[-1])
            elif L["kind"] == "dropout":
                ts[-1] = self.mods[f"drop{i}"](ts[-1])
        x = ts[-1]
        tail = self.arch["tail"]
        if tail == "gap":
            x = torch.flatten(self.mods["gap"](x), 1)
        elif tail == "flatten":
            x = torch.flatten(x, 1)
        elif tail == "flatten_module":
            x = self.mods["flat"](x)
        elif tail == "view_n":  # view(-1, N) with N the features per sample (session 22)
            x = x.view(-1, self.arch["feats"])
        else:
            x = x.view(x.size(0), -1)
        for L in self.arch["linears"]:
            x = self.mods[L["name"]](x)
            if L["bn"]:
                x = self.mods[L["name"] + "_bn"](x)
            if L["relu"]:
                x = torch.relu(x)
        return x


# ---------------------------------------------------------------------------------------------
# random plans
# ---------------------------------------------------------------------------------------------
def random_plan(rng: random.Random, arch: dict) -> dict:
    wq = rng.choice(["sawb", "sawb", "lsq", "lsq"])
    weight = {"name": wq, "bits": rng.randint(2, 8)}
    if rng.random() < 0.3:
        weight["per_channel"] = True
    aq = rng.choice(["pact", "lsq"])
    act = {"name": aq, "bits": rng.randint(2, 8)}
    if aq == "pact":
        act["init"] = rng.choice([1.0, 2.0, 2.0, 4.0, 6.0])
    plan = {"weight": weight, "act": act, "integer": True}
    if rng.random() < 0.4:
        plan["keep_first"] = rng.random() < 0.5
    if rng.random() < 0.4:
        plan["keep_last"] = rng.random() < 0.5
    if rng.random() < 0.2:
        plan["signed_act"] = {"name": "lsq", "signed": True}
    r = rng.random()
    if r < 0.35:
        plan["integer_residual"] = "accumulator"
    elif r < 0.7:
        plan["integer_residual"] = "output"
    r = rng.random()
    if r < 0.3:
        plan["integer_residual_bits"] = None
    elif r < 0.6:
        plan["integer_residual_bits"] = rng.randint(2, 8)
    if rng.random() < 0.3:
        plan["integer_bias"] = rng.choice(["fine", "coarse"])
    if rng.random() < 0.3:
        plan["integer_init"] = rng.choice(["lsq", "max"])
    if rng.random() < 0.25:
        mid_range = rng.choice(["cover", "observed"])  # drawn either way: every seed keeps its case
        if plan.get("integer_residual") != "accumulator":  # mid is the output add's (refused with accumulator)
            plan["integer_train_mid"] = True
            plan["integer_mid_range"] = mid_range
    names = [L["name"] for L in arch["layers"] if L["kind"] == "conv"] + [L["name"] for L in arch["linears"]]
    over = {}
    for n in names:
        if rng.random() < 0.25:
            o = {}
            if rng.random() < 0.5:
                o["weight"] = {"bits": rng.randint(2, 8)}
            else:
                o["act"] = {"bits": rng.randint(2, 8)}
            over["mods." + n] = o
    if over:
        plan["layers"] = over
    return plan


# ---------------------------------------------------------------------------------------------
# one case
# ---------------------------------------------------------------------------------------------
N_IMAGES = 16


def build_case(seed: int):
    rng = random.Random(seed)
    arch = random_arch(rng)
    plan = random_plan(rng, arch)
    settle = {"passes": rng.choice([3, 5, 10]), "batch": 16, "input_scale": rng.choice([1.0, 1.0, 3.0])}
    return arch, plan, settle


def settle_model(arch, plan, settle, seed):
    from lowbit import quantize

    torch.manual_seed(seed)
    m = FuzzNet(arch)
    quantize(m, plan)
    return m


def make_input(arch, n, g, scale):
    shape = (arch["in_channels"], arch["size"], arch["size"])
    x = torch.randn(n, *shape, generator=g) * scale
    how = arch.get("stress", {}).get("input")
    if how == "const":  # one value per image: every pixel equal
        x = x[:, :1, :1, :1].expand(n, *shape).contiguous()
    elif how == "scale10":
        x = x * 10
    elif how == "positive":
        x = x.abs() + 1.0
    return x


def train_settle(m, arch, settle, seed):
    m.train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(settle["passes"]):
            m(make_input(arch, settle["batch"], g, settle["input_scale"]))
    return m.eval()


def _short(e: BaseException) -> str:
    s = f"{type(e).__name__}: {e}"
    return s if len(s) < 2000 else s[:2000] + " ..."


def run_case(seed: int, out_root: Path, keep: bool = False, case: tuple | None = None) -> dict:
    """One case: ``seed``'s random model and plan, or ``case`` = (arch, plan, settle) as a record holds them (a
    replay: the generator may have changed since)."""
    from lowbit.errors import ConfigError

    arch, plan, settle = case if case is not None else build_case(seed)
    rec = {"seed": seed, "arch": arch, "plan": plan, "settle": settle, "outcome": None, "problems": [],
           "phase": None, "error": None}
    t0 = time.perf_counter()
    phase = "quantize"
    try:
        m = settle_model(arch, plan, settle, seed)
        phase = "settle"
        m = train_settle(m, arch, settle, seed)
        x = make_input(arch, N_IMAGES, torch.Generator().manual_seed(seed + 1), settle["input_scale"])
        phase = "eval"
        with torch.no_grad():
            y_all = m(x).numpy()
            y_one = np.concatenate([m(x[i: i + 1]).numpy() for i in range(3)])
        if not np.array_equal(y_all[:3].view(np.uint32), y_one.view(np.uint32)):
            rec["problems"].append(f"eval forward depends on the batch: max diff {np.abs(y_all[:3] - y_one).max()}")
        phase = "int_graph"
        from lowbit.export.intgraph import IntReference
        from lowbit.intmode import int_graph

        env = IntReference(int_graph(m, x[:1])).tensors(x.numpy())
        rec["dead"] = sorted(k for k, v in env.items() if len(np.unique(v)) < 2)
        rec["n_tensors"] = len(env)
        phase = "export"
        from lowbit.export.int_api import export_int_model

        d = Path(tempfile.mkdtemp(prefix=f"fuzz_s{seed}_", dir=out_root))
        with warnings.catch_warnings(record=True) as wl:
            warnings.simplefilter("always")
            r = export_int_model(m, x, d, c_images=None, latency_repeats=0, latency_batch=8, calib=8)
        rec["warnings"] = sorted({str(w.message)[:300] for w in wl})
        phase = "check"
        rec["problems"] += check_report(r, y_all, plan, arch)
        rec["report"] = {"numpy": r["numpy"], "c": {k: r["c"].get(k) for k in
                                                     ("compiled", "self_test", "self_test_ok", "bit_exact_images",
                                                      "images", "mismatches", "max_logit_diff", "arena_bytes")},
                         "onnx": {k: r["onnx"][k] for k in ("integer", "integer_fused", "fp32")},
                         "failed_checks": r["failed_checks"]}
        rec["outcome"] = "wrong" if rec["problems"] else "pass"
        if not keep:
            import shutil

            shutil.rmtree(d, ignore_errors=True)
    except ConfigError as e:
        rec["error"] = _short(e)
        rec["phase"] = phase
        msg = str(e)
        if "compiled C model failed" in msg or "failed to build" in msg.lower():
            rec["outcome"] = "crash"
        elif phase == "quantize" and "\n" not in msg.strip():
            rec["outcome"] = "refused"
        else:
            rec["outcome"] = "refused_late"
    except Exception as e:  # noqa: BLE001
        rec["error"] = _short(e)
        rec["phase"] = phase
        rec["traceback"] = traceback.format_exc()[-3000:]
        rec["outcome"] = "crash"
    if rec["outcome"] == "pass" and rec["problems"]:
        rec["outcome"] = "wrong"
    if rec["outcome"] in ("refused", "refused_late", "crash") and rec["problems"]:
        rec["outcome"] = "wrong"  # a batch-dependent eval forward found before the error
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def check_report(r: dict, y: np.ndarray, plan: dict, arch: dict) -> list[str]:
    p = []
    n = len(y)
    if r["images"] != n:
        p.append(f"report images {r['images']} != {n}")
    nr = r["numpy"]
    if nr["images"] != n or nr["bit_exact_images"] != n:
        p.append(f"NumPy {nr['bit_exact_images']}/{nr['images']} bit-exact with PyTorch "
                 f"(max logit diff {nr['max_logit_diff']:.3g}, {nr['mismatches']} argmax mismatches)")
    c = r.get("c") or {}
    if not c.get("compiled"):
        p.append("C not compiled")
    else:
        if not c.get("self_test_ok"):
            p.append(f"C self-test failed: {c.get('self_test')!r}")
        if c["images"] != n or c["bit_exact_images"] != n:
            p.append(f"C {c['bit_exact_images']}/{c['images']} bit-exact with NumPy (vs PyTorch: max logit diff "
                     f"{c['max_logit_diff']:.3g}, {c['mismatches']} argmax mismatches)")
    o = r["onnx"]
    oi = o["integer"]
    if oi["images"] != n or oi["max_logit_diff"] != 0 or oi["mismatches"]:
        p.append(f"ONNX integer: max logit diff {oi['max_logit_diff']:.3g}, {oi['mismatches']} argmax mismatches")
    of = o["integer_fused"]
    # the fused variant approximates an accumulator-form residual (documented); exact otherwise
    acc_res = any(L.get("res") is not None for L in arch["layers"] if L["kind"] == "conv") and \
        plan.get("integer_residual", "output") == "accumulator"
    if (of["max_logit_diff"] != 0 or of["mismatches"]) and not acc_res:
        p.append(f"ONNX fused (QLinearConv): max logit diff {of['max_logit_diff']:.3g}, {of['mismatches']} argmax "
                 "mismatches (no accumulator-form residual)")
    # failed_checks must list exactly the NumPy / C failures found above
    own = [q for q in p if q.startswith(("NumPy", "C "))]
    if bool(own) != bool(r["failed_checks"]):
        p.append(f"failed_checks {r['failed_checks']} disagrees with the checks {own}")
    return p


def summarise(recs: list[dict]) -> str:
    from collections import Counter

    cnt = Counter(r["outcome"] for r in recs)
    lines = [f"{len(recs)} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(cnt.items()))]
    live = [r for r in recs if r["outcome"] == "pass"]
    if live:
        fully = sum(not r.get("dead") for r in live)
        lines.append(f"passes with every integer tensor live on the batch: {fully}/{len(live)}")
    lines.append(f"{'seed':>6}  {'outcome':<13} {'s':>6}  detail")
    for r in recs:
        if r["outcome"] == "pass":
            det = f"dead {len(r.get('dead', []))}/{r.get('n_tensors')}"
        else:
            det = "; ".join(r["problems"]) or f"[{r['phase']}] {r['error']}"
        lines.append(f"{r['seed']:>6}  {r['outcome']:<13} {r['seconds']:>6.1f}  {det.splitlines()[0][:200] if det else ''}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", nargs=2, type=int, default=[0, 20], metavar=("A", "B"), help="seeds A..B-1")
    ap.add_argument("--out", default="benchmarks/results/integer_export/fuzz")
    ap.add_argument("--keep", action="store_true", help="keep each case's export folder")
    ap.add_argument("--budget", type=float, default=None, help="stop after this many seconds")
    ap.add_argument("--replay", metavar="CASES_JSONL", default=None,
                    help="re-run the cases a cases.jsonl recorded that did not pass (their own models and plans); "
                         "prints each outcome, writes nothing")
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fuzz_int_", dir="/tmp"))
    if a.replay:
        recs = [json.loads(ln) for ln in Path(a.replay).read_text().splitlines() if ln.strip()]
        again = [run_case(r["seed"], work, case=(r["arch"], r["plan"], r["settle"]))
                 for r in recs if r["outcome"] != "pass"]
        for r in again:
            print(f"seed {r['seed']}: {r['outcome']}" + (f" [{r['phase']}] {r['error']}" if r["outcome"] != "pass" else ""))
        print(summarise(again).splitlines()[0])
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    recs = []
    t0 = time.perf_counter()
    with open(out / "cases.jsonl", "a") as f:
        for seed in range(*a.seeds):
            if a.budget is not None and time.perf_counter() - t0 > a.budget:
                break
            rec = run_case(seed, work, keep=a.keep)
            recs.append(rec)
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
            print(f"seed {seed}: {rec['outcome']} ({rec['seconds']} s) "
                  + ("; ".join(rec["problems"]) or (rec["error"] or "").splitlines()[0][:200] if rec["outcome"] != "pass"
                     else f"dead {len(rec.get('dead', []))}/{rec.get('n_tensors')}"), flush=True)
    s = summarise(recs)
    print(s)
    (out / f"summary_{a.seeds[0]}_{a.seeds[1]}.txt").write_text(s + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
