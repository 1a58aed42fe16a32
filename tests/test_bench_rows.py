"""lowbit.bench.select_rows: which rows a benchmark script trains (--rows, --part), in one place for the table
scripts; benchmarks/integer_seeds.py raised a KeyError traceback for an unknown row."""
import importlib.util
import sys
from pathlib import Path

import pytest

from lowbit.bench import select_rows
from lowbit.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["a", "b", "c", "d", "e"]


def test_default_every_row_and_parts_split_them():
    assert select_rows(NAMES) == NAMES
    assert select_rows(NAMES, None, "1/2") == ["a", "c", "e"] and select_rows(NAMES, None, "2/2") == ["b", "d"]
    assert select_rows(NAMES, ["d", "b"], "2/2") == ["b"]


@pytest.mark.parametrize("rows, part, msg", [(["a", "x"], None, "unknown rows ['x']; rows: a; b; c; d; e"),
                                             (None, "3/2", "--part must look like K/N"),
                                             (None, "0/2", "--part must look like K/N"),
                                             (None, "1-2", "--part must look like K/N")])
def test_bad_selection_is_one_line(rows, part, msg):
    with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        select_rows(NAMES, rows, part)


@pytest.mark.parametrize("args, msg", [(["--rows", "no such row"], "error: unknown rows ['no such row']; rows: "),
                                       (["--jobs", "no such row:0"], "error: unknown rows ['no such row']; rows: "),
                                       (["--jobs", "today"],
                                        "error: --jobs must look like ROW:SEED,ROW:SEED, got 'today'")])
def test_integer_seeds_unknown_row_is_a_usage_error(args, msg, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("integer_seeds", ROOT / "benchmarks" / "integer_seeds.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import lowbit.bench

    def no_training(*a, **k):
        raise AssertionError("trained before checking the rows")  # the FP32 start came first before session 29

    monkeypatch.setattr(lowbit.bench, "run_grid", no_training)
    monkeypatch.setattr(sys, "argv", ["integer_seeds.py", "--ft", *args])
    with pytest.raises(SystemExit) as e:
        mod.main()
    err = capsys.readouterr().err
    # the message that fits: an unknown row was "--jobs must look like ROW:SEED,ROW:SEED, got None" (ConfigError is a
    # ValueError, caught as a malformed --jobs)
    assert e.value.code == 2 and msg in err and err.count("error:") == 1, err
