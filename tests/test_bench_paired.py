"""lowbit.bench.report.paired / format_paired: the paired-by-seed difference the dqa, valuesearch and sinreq tables
print (one place; the three tables each had a copy)."""
import importlib.util
from pathlib import Path

import pytest

from lowbit.bench.report import format_paired, paired

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _rec(row, seed, acc):
    return {"row": row, "seed": seed, "test_acc": acc}


def test_paired_by_seed_only_where_both_rows_ran():
    recs = [_rec("a", 0, 0.80), _rec("b", 0, 0.75), _rec("a", 1, 0.90), _rec("b", 1, 0.80), _rec("a", 2, 0.99)]
    m, sd, n = paired(recs, "a", "b")
    assert n == 2 and m == pytest.approx(0.075) and sd == pytest.approx(0.0353553, abs=1e-6)
    assert format_paired((m, sd, n)) == "+7.50 ± 3.54 (n=2)"
    assert paired(recs, "a", "c") is None and format_paired(None) == "n/a"


def test_one_pair_prints_no_spread():
    """One pair was printed "± 0.00" (a spread measured as zero) by all three tables."""
    p = paired([_rec("a", 3, 0.86), _rec("b", 3, 0.85)], "a", "b")
    assert p[1] is None and format_paired(p) == "+1.00 ± – (n=1)"


@pytest.mark.parametrize("name", ["dqa_table", "valuesearch_table", "sinreq_table"])
def test_tables_use_the_shared_difference(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.paired is paired and mod.format_paired is format_paired
