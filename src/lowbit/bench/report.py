"""``lowbit report RESULTS [RESULTS ...]``: seed 002's table (mean ± std test error per method) and two plots.

RESULTS is a ``results.jsonl`` (one line per run, as written by ``lowbit bench`` and every
``benchmarks/`` script) or a folder holding one. Rows keep the order of the file; each row is
one label (method, bits, model, width) with its seeds pooled. Written next to RESULTS (or --out):
``report.md``, ``report.csv``, ``acc_vs_bits.png`` and ``acc_vs_size.png``.

Several RESULTS (e.g. the budget suites for C = 8 and C = 16) are drawn on the same axes, one curve
per file named by its folder (002's "optimal precision" figure), and tabled one after the other;
``--out`` is then required.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from ..errors import ConfigError


def load_results(path: str | Path) -> tuple[list[dict], Path]:
    p = Path(path)
    if p.is_dir():
        p = p / "results.jsonl"
    if not p.is_file():
        raise ConfigError(f"no results file at {p} (expected the results.jsonl written by `lowbit bench`)")
    records = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise ConfigError(f"{p}:{i}: not a JSON line") from None
    if not records:
        raise ConfigError(f"{p} holds no runs")
    missing = [k for k in ("row", "test_acc", "size_bytes", "bitops") if k not in records[0]]
    if missing:
        raise ConfigError(f"{p}: records lack {', '.join(missing)}; is this a lowbit results file?")
    return records, p.parent


def _bits(rec: dict, key: str) -> str:
    b = rec.get(key) or []
    return "/".join(map(str, b)) if b else "32"


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n); 0 for one value):
    the uncertainty of a paired difference averaged over seeds."""
    n = len(values)
    return statistics.fmean(values), (statistics.stdev(values) / n ** 0.5 if n > 1 else 0.0)


def lower_bound(values: list[float], level: float = 0.95) -> float:
    """One-sided lower confidence bound of the mean at ``level`` (Student's t, n − 1 degrees of
    freedom): "the mean is at least this" for a paired difference averaged over seeds, the test of a
    target such as "integer mode loses at most 0.5 points" (bound > −0.5). −inf for fewer than two values."""
    if not 0 < level < 1:
        raise ConfigError(f"level must be in (0, 1), got {level}")
    n = len(values)
    if n < 2:
        return float("-inf")
    from scipy.stats import t

    m, se = mean_se(values)
    return m - float(t.ppf(level, n - 1)) * se


def paired(records: list[dict], a: str, b: str) -> tuple[float, float | None, int] | None:
    """Row ``a`` minus row ``b`` of a results file, paired by seed (same init and batch order): mean, sample
    standard deviation over the seeds (None for one pair: no spread was measured) and the number of pairs;
    None where no seed has both rows."""
    acc = {(r["row"], r["seed"]): r["test_acc"] for r in records}
    d = [acc[(a, s)] - acc[(b, s)] for (row, s) in acc if row == a and (b, s) in acc]
    if not d:
        return None
    return statistics.fmean(d), (statistics.stdev(d) if len(d) > 1 else None), len(d)


def format_paired(p: tuple[float, float | None, int] | None) -> str:
    """``paired``'s result in points as tables print it: "+1.20 ± 0.30 (n=3)", "+1.00 ± – (n=1)", or "n/a"."""
    if p is None:
        return "n/a"
    sd = "–" if p[1] is None else f"{100 * p[1]:.2f}"
    return f"{100 * p[0]:+.2f} ± {sd} (n={p[2]})"


def format_bound(bound: float, target: float = -0.5) -> str:
    """A lower bound as a table prints it: two decimals, more where two would round it onto ``target`` (−0.504 and
    −0.496 both read −0.50 before, one missing a "bound above −0.5" target and the other meeting it). Up to 17
    decimals, which tell any float from the target (six printed −0.49999999 and −0.50000001 both as −0.500000)."""
    for digits in range(2, 18):
        text = f"{bound:+.{digits}f}"
        if bound == target or float(text) != target:
            break
    return text


def table_rows(records: list[dict]) -> list[dict]:
    """One row per label: test error mean ± std over its runs (seeds), bits, size, BitOPs."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["row"], []).append(r)
    rows = []
    for label, rs in groups.items():
        errs = [1.0 - r["test_acc"] for r in rs]
        r0 = rs[0]
        suite = r0.get("suite") or {}
        rows.append({
            # the suite's method label (a curve of the bits plot); records written before session 25 held it
            # in "method", over the run's own training method
            "row": label, "method": suite.get("method") or r0.get("method", label),
            # the bits plot's curve: the method, and the model and width where the suite lists several (before
            # session 26 a suite's widths or models were joined into one zig-zag line per method)
            "curve": " ".join([suite.get("method") or r0.get("method", label)]
                              + ([str(suite["model"])] if suite.get("model") else [])
                              + ([f"x{suite['width']:g}"] if suite.get("width") is not None else [])),
            "w_bits": _bits(r0, "weight_bits"), "a_bits": _bits(r0, "act_bits"),
            "width": (r0.get("config") or {}).get("model", {}).get("width", r0.get("width") or 1.0),
            "n": len(rs), "err_mean": statistics.fmean(errs),
            "err_std": statistics.stdev(errs) if len(errs) > 1 else 0.0,
            "size_kib": r0["size_bytes"] / 1024, "bitops_g": r0["bitops"] / 1e9,
            "epochs": r0.get("epochs"), "test_images": r0.get("test_images"),
            "reused_other_config": sum(1 for r in rs if r.get("reused_other_config")),
        })
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| method | W bits | A bits | width | test error % (mean ± std) | runs | size KiB | GBitOPs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spread = f"{100 * r['err_std']:.2f}" if r["n"] > 1 else "–"  # one run has no spread (was "± 0.00")
        lines.append(f"| {r['row']} | {r['w_bits']} | {r['a_bits']} | {r['width']:g} | "
                     f"{100 * r['err_mean']:.2f} ± {spread} | {r['n']} | "
                     f"{r['size_kib']:.1f} | {r['bitops_g']:.3f} |")
    notes = []  # what `lowbit bench`'s summary.md says under the same runs (before: dropped here)
    sizes = sorted({r.get("test_images") for r in rows if r.get("test_images")})
    if sizes:
        notes.append(f"Test error on {' / '.join(f'{n:,}' for n in sizes)} test images (data.limit also cuts "
                     "the test set).")
    mixed = [f"{r['row']} ({r['reused_other_config']} of {r['n']} runs)" for r in rows if r.get("reused_other_config")]
    if mixed:
        notes.append("**Reused runs of another config** (`--reuse`): " + ", ".join(mixed) + ".")
    return "\n".join(lines) + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")


def _curves(sets: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The curves of the accuracy-vs-bits plot: one per method of each set (a method with one row is one
    marker); a set whose methods each have one row, all at different weight bits (a budget suite: one
    precision per row), is one curve named after the set. Before session 25 any set with one row per method
    was one curve, so a comparison of methods at the same bits was drawn as a single unlabelled line."""
    curves: dict[str, list[dict]] = {}
    for name, rows in sets.items():
        by_method: dict[str, list[dict]] = {}
        for r in rows:
            by_method.setdefault(r.get("curve") or r["method"], []).append(r)
        sweep = len({r["w_bits"] for r in rows}) == len(rows)
        if sweep and all(len(v) == 1 for v in by_method.values()):
            curves[name if len(sets) > 1 else "all rows"] = rows
        else:
            curves.update({(f"{name}: {m}" if len(sets) > 1 else m): rs for m, rs in by_method.items()})
    return curves


def _plots(sets: dict[str, list[dict]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rs in _curves(sets).items():
        xs = [int(r["w_bits"].split("/")[0]) for r in rs]
        order = sorted(range(len(xs)), key=xs.__getitem__)
        ax.errorbar([xs[i] for i in order], [100 * (1 - rs[i]["err_mean"]) for i in order],
                    yerr=[100 * rs[i]["err_std"] for i in order], marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("weight bits")
    ax.set_ylabel("test accuracy % (mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "acc_vs_bits.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in sets.items():
        color = None
        for r in rows:
            line = ax.errorbar(r["size_kib"], 100 * (1 - r["err_mean"]), yerr=100 * r["err_std"], marker="o",
                               capsize=3, color=color, label=name if color is None and len(sets) > 1 else None)
            color = line.lines[0].get_color() if len(sets) > 1 else None
            ax.annotate(r["row"], (r["size_kib"], 100 * (1 - r["err_mean"])), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("model size at the trained bits (KiB)")
    ax.set_ylabel("test accuracy % (mean ± std)")
    ax.grid(alpha=0.3)
    if len(sets) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "acc_vs_size.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def report(results: str | Path | list, out: str | Path | None = None, plots: bool = True) -> dict:
    """Build the table (printed form returned), write report.md/.csv and the plots. ``results`` is
    one results file/folder or a list of them (drawn together; ``out`` required)."""
    many = list(results) if isinstance(results, (list, tuple)) else [results]
    if not many:
        raise ConfigError("no results given")
    if len(many) > 1 and out is None:
        raise ConfigError("several results: say where the combined report goes with --out")
    sets: dict[str, list[dict]] = {}
    csv_rows: list[dict] = []
    for res in many:
        records, where = load_results(res)
        name = where.name or str(where)
        if name in sets:
            name = str(where)
        sets[name] = table_rows(records)
        csv_rows += [{"results": name, **r} for r in sets[name]]
    out = Path(out) if out else where
    out.mkdir(parents=True, exist_ok=True)
    if len(sets) == 1:
        md = markdown(next(iter(sets.values())))
    else:
        md = "\n\n".join(f"**{name}**\n\n{markdown(rows)}" for name, rows in sets.items())
    # UTF-8 whatever the locale: a latin-1 one wrote '±' as byte 0xB1 (no UTF-8 reader shows it), a C one failed on it
    (out / "report.md").write_text(md + "\n", encoding="utf-8")
    with open(out / "report.csv", "w", newline="", encoding="utf-8") as f:
        fields = list(csv_rows[0]) if len(sets) > 1 else [k for k in csv_rows[0] if k != "results"]
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(csv_rows)
    files = [out / "report.md", out / "report.csv"] + (_plots(sets, out) if plots else [])
    return {"table": md, "rows": csv_rows if len(sets) > 1 else next(iter(sets.values())),
            "files": [str(f) for f in files]}
