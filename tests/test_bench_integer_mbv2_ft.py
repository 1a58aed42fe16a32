"""benchmarks/integer_mbv2_ft.py's table of a seed range (no run is read: the accuracies are given)."""
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "integer_mbv2_ft.py"


@pytest.fixture
def bench(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("integer_mbv2_ft", BENCH)
    b = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(b)
    monkeypatch.setattr(b, "OUT", tmp_path)
    return b


@pytest.mark.parametrize("missing", [None, "int13_fzl", "today_c"])
def test_a_seed_range_is_partial_until_every_declared_run_of_every_seed_finished(bench, missing):
    """Session 28's sample (seeds 36-135, today_c and int13_fzl at W4A4s): a seed counted as finished when any of
    its runs had, so with the last seed's integer run still training the table showed the bound over 99 pairs
    unlabelled."""
    seeds, last = bench.FRESH_SEEDS_S28, bench.FRESH_SEEDS_S28[-1]
    done = {f"FT_W4A4s_{m}_s{s}" for s in seeds for m in ("today_c", "int13_fzl")} - {f"FT_W4A4s_{missing}_s{last}"}
    bench._acc = lambda run: (88.0, 90.0) if Path(run).name in done else None
    head = bench.table(seeds).splitlines()[0]
    assert head == ("Seeds 36-135 only." if missing is None else
                    "Seeds 36-135 only. PARTIAL: 99 of these 100 seeds have every declared run finished.")
