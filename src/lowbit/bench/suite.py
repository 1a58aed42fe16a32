"""Benchmark suites: a base config and a grid (methods x bits x models x widths x seeds) in YAML.

    name: qat002
    base: ../configs/fp32.yaml          # a config file (relative to the suite) or an inline mapping
    base_overrides: {train: {epochs: 3}}
    methods:                            # label -> config patch (plan, model options, method, ...)
      FP32: {}
      LSQ: {plan: {weight: {name: lsq}, act: {name: lsq}}}          # no bits: takes each of `bits`
      BNN: {plan: {weight: {name: bnn, bits: 1}, act: {name: bnn, bits: 1}}, model: {activation: hardtanh}}
    bits: [3]                           # fills weight/act specs that give no bits
    models: [resnet20]
    widths: [1.0]
    seeds: [0, 1, 2]
    reference: FP32                     # epoch-time ratios and Δ accuracy against this method (its row of
                                        # the same model and width)
    out: bench_out/qat002               # default: bench_out/<name>

``expand(suite)`` gives one row per (method, bits, model, width); each row runs once per seed
with the core loop (``lowbit.bench.runner``), skipping finished runs, so a killed suite resumes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from ..errors import ConfigError
from ..plan import one_line
from .runner import aggregate, deep_merge, run_grid, write_results


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "suite"
    base: str | dict[str, Any] = Field(default_factory=dict)
    base_overrides: dict[str, Any] = Field(default_factory=dict)
    methods: dict[str, dict[str, Any]] = Field(min_length=1)
    bits: list[StrictInt] = Field(default_factory=list)  # not true (one bit), as QuantSpec.bits
    models: list[str] = Field(default_factory=list)
    widths: list[Annotated[float, Field(gt=0)]] = Field(default_factory=list)
    seeds: list[Annotated[StrictInt, Field(ge=0)]] = Field(default_factory=lambda: [0])
    reference: str | None = None
    out: str | None = None


@dataclass
class Row:
    label: str
    method: str
    overrides: dict
    meta: dict = field(default_factory=dict)


def load_suite(path: str | Path) -> tuple[Suite, dict, Path]:
    """The suite, its resolved base config (as a dict) and its default output folder."""
    from ..config import check_finite, read_yaml_mapping

    path = Path(path)
    data = read_yaml_mapping(path, "suite")
    check_finite(data, "suite")
    try:
        suite = Suite.model_validate(data)
    except ValidationError as e:
        raise ConfigError(one_line(e, "suite")) from None
    bad = [b for b in suite.bits if not 1 <= b <= 8]
    if bad:
        raise ConfigError(f"suite.bits: bits 1..8, got {bad[0]}")
    for key, why in (("seeds", "each seed is one run folder"), ("bits", "each is one row"),
                     ("models", "each is one row"), ("widths", "each is one row")):
        values = getattr(suite, key) or []
        dup = [v for i, v in enumerate(values) if v in values[:i]]  # before: bits, models and widths silently merged
        if dup:
            raise ConfigError(f"suite.{key}: {dup[0]} appears twice ({why})")
    if isinstance(suite.base, str):
        base_path = (path.parent / suite.base).resolve()
        if not base_path.is_file():
            raise ConfigError(f"suite.base: config file not found: {base_path}")
        base = read_yaml_mapping(base_path)
        check_finite(base, "suite.base")
    else:
        base = copy.deepcopy(suite.base)
    base = deep_merge(base, suite.base_overrides)
    if suite.reference is not None and suite.reference not in suite.methods:
        raise ConfigError(f"suite.reference: '{suite.reference}' is not one of the methods: {', '.join(suite.methods)}")
    out = Path(suite.out) if suite.out else Path("bench_out") / suite.name
    return suite, base, out


def _needs_bits(patch: dict) -> bool:
    plan = patch.get("plan", {}) or {}
    return any(isinstance(plan.get(r), dict) and plan[r].get("bits") is None and plan[r].get("name") != "valueset"
               for r in ("weight", "act"))


def _with_bits(patch: dict, b: int) -> dict:
    p = copy.deepcopy(patch)
    for r in ("weight", "act"):
        spec = p.get("plan", {}).get(r)
        if isinstance(spec, dict) and spec.get("bits") is None:
            spec["bits"] = b
    return p


def expand(suite: Suite) -> list[Row]:
    """One row per method x (bits, where the method takes them) x model x width."""
    rows = []
    models = suite.models or [None]
    widths = suite.widths or [None]
    for method, patch in suite.methods.items():
        bit_list = suite.bits if _needs_bits(patch) else [None]
        if _needs_bits(patch) and not suite.bits:
            raise ConfigError(f"suite.methods.{method}: a quantizer has no bits and the suite has no `bits` list")
        for b in bit_list:
            for m in models:
                for w in widths:
                    ov = _with_bits(patch, b) if b is not None else copy.deepcopy(patch)
                    label = method
                    if b is not None:
                        label += f" {b}b"
                    if m is not None:
                        ov = deep_merge(ov, {"model": {"name": m}})
                        label += f" {m}" if len(models) > 1 else ""
                    if w is not None:
                        ov = deep_merge(ov, {"model": {"width": w}})
                        label += f" x{w:g}" if len(widths) > 1 else ""
                    rows.append(Row(label, method, ov, {"method": method, "bits": b, "model": m, "width": w}))
    return rows


def _check_base_bits(base: dict, rows: list[Row]) -> None:
    """A base quantizer without bits that a row leaves so: say that a suite's ``bits`` fill only the methods'
    quantizers (before session 25: "supports integer bits 1..8, got None")."""
    plan = base.get("plan") or {}
    for role in ("weight", "act"):
        spec = plan.get(role)
        if not (isinstance(spec, dict) and spec.get("name") and spec.get("bits") is None
                and spec.get("name") != "valueset"):
            continue
        for r in rows:
            if role not in (r.overrides.get("plan") or {}):  # a method's own spec for the role gets the bits
                raise ConfigError(f"row '{r.label}': plan.{role}: the base's quantizer '{spec['name']}' has no bits, "
                                  "and a suite's `bits` fill only the quantizers its methods name: give bits in the "
                                  "base or in the method")


def references(rows: list[Row], reference: str | None) -> dict[str, str] | None:
    """Each row's reference row: the ``reference`` method's row of the same model and width (and bits, where it
    has a row at the row's bits). Before session 23 every row was compared with the reference method's first row,
    whatever its model or width."""
    if reference is None:
        return None
    out = {}
    for r in rows:
        same = [x for x in rows if x.method == reference and x.meta["model"] == r.meta["model"]
                and x.meta["width"] == r.meta["width"]]
        pick = [x for x in same if x.meta["bits"] == r.meta["bits"]] or same
        if pick:
            out[r.label] = pick[0].label
    return out


#: what ``lowbit bench`` and ``lowbit report`` write into a suite's folder, beside its row folders
BENCH_FILES = {"results.jsonl", "summary.csv", "summary.md", "report.md", "report.csv", "acc_vs_bits.png",
               "acc_vs_size.png", ".lock"}


def check_out(out: Path, rows: list[Row]) -> None:
    """A one-line error where ``out`` is a file, or a folder that no suite wrote: files other than
    :data:`BENCH_FILES` and run folders, or those names in a folder without runs or results. Before
    session 25 a suite run into such a folder replaced a ``summary.md`` of the user's own without a word."""
    from ..runfolder import atomic_tmp_target
    from .runner import slug

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    if not out.is_dir():
        return
    ours = {slug(r.label) for r in rows}
    runs = [e for e in out.iterdir() if e.is_dir() and (e.name in ours or any(e.glob("seed*/config.yaml")))]
    foreign = sorted(e.name for e in out.iterdir() if e.name not in BENCH_FILES and e not in runs
                     and atomic_tmp_target(e.name) not in BENCH_FILES)  # a results write killed halfway
    if not runs and not (out / "results.jsonl").is_file():
        foreign += sorted(e.name for e in out.iterdir() if e.name in BENCH_FILES and e.name != ".lock")
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ConfigError(f"--out {out} holds files no lowbit bench wrote ({shown}): choose another folder")


def run_suite(path: str | Path, workers: int = 1, out: str | Path | None = None, dry_run: bool = False,
              reuse: bool = False, backend: str = "local", address: str | None = None) -> dict:
    """Run (or, with ``dry_run``, only validate and list) a suite; returns records, table, paths."""
    suite, base, default_out = load_suite(path)
    out = Path(out) if out else default_out
    rows = expand(suite)
    _check_base_bits(base, rows)
    check_out(out, rows)
    grid = {r.label: r.overrides for r in rows}
    records = run_grid(grid, base, suite.seeds, out, workers=workers, dry_run=dry_run, reuse=reuse,
                       backend=backend, address=address)
    if dry_run:
        return {"rows": [r.label for r in rows], "runs": len(rows) * len(suite.seeds), "out": str(out)}
    meta = {r.label: r.meta for r in rows}
    for rec in records:  # the row's place in the grid, beside (not over) the run's own model, method, ...
        rec["suite"] = dict(meta[rec["row"]])
    ref = references(rows, suite.reference)
    agg = aggregate(records, ref)
    workers = 1 if backend == "local" and workers <= 1 else max(2, workers)  # Ray: tasks at once
    table = write_results(out, records, agg, ref, meta={"suite": str(path), "seeds": suite.seeds}, workers=workers)
    return {"records": records, "table": table, "out": str(out)}
