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


def test_the_full_table_does_not_pool_session_28s_sample_into_the_earlier_seeds(bench):
    """The full table (no --seeds) pooled the seeds of session 28's sample finished so far (another FP32 start, a test
    of its own over its 100 seeds) into the int13_fzl − today_c cell of seeds 20-35: with 5 of them run, the cell
    quoted in docs/integer-log.md (16 pairs) read 21 pairs, unlabelled."""
    import json

    acc = {**{f"FT_W4A4s_{m}_s{s}": a for s in bench.INT_SEEDS_S17 for m, a in (("today_c", 86.0), ("int13_fzl", 85.7))},
           **{f"FT_W4A4s_{m}_s{s}": a for s in range(36, 41) for m, a in (("today_c", 86.0), ("int13_fzl", 87.0))}}
    bench._acc = lambda run: (acc[Path(run).name], 88.0) if Path(run).name in acc else None
    text = bench.table()
    cell = json.loads((bench.OUT / "summary.json").read_text())["W4A4s int13_fzl vs today_c"]
    assert cell["seeds"] == 16 and cell["mean"] == pytest.approx(-0.3)
    assert text.startswith("Seeds 36-135 (session 28's sample, from `runs/MBV2_fp32_pretrain_s28`) are not in this "
                           "table: `--table --seeds 36-135`.")
    bench.table(bench.FRESH_SEEDS_S28)  # the sample's own table keeps them
    fresh = json.loads((bench.OUT / "summary_seeds36-135.json").read_text())["W4A4s int13_fzl vs today_c"]
    assert fresh["seeds"] == 5 and fresh["mean"] == pytest.approx(1.0)


@pytest.mark.parametrize("bound", [-0.496, -0.504])
def test_a_bound_near_the_target_is_printed_on_its_side_of_it(bench, bound):
    """Session 28's test is met when the bound of int13_fzl − today_c is above −0.5: a bound of −0.496 (met) and one of
    −0.504 (not met) were both printed "≥ -0.50"."""
    import json

    from lowbit.bench.report import lower_bound

    spread = [-0.1, 0.1, -0.1, 0.1]
    shift = bound - lower_bound(spread)
    acc = {**{f"FT_W4A4s_today_c_s{s}": 86.0 for s in range(36, 40)},
           **{f"FT_W4A4s_int13_fzl_s{s}": 86.0 + shift + e for s, e in zip(range(36, 40), spread)}}
    bench._acc = lambda run: (acc[Path(run).name], 88.0) if Path(run).name in acc else None
    text = bench.table(bench.FRESH_SEEDS_S28)
    cell = json.loads((bench.OUT / "summary_seeds36-135.json").read_text())["W4A4s int13_fzl vs today_c"]
    assert cell["lower95"] == pytest.approx(bound, abs=1e-9)
    assert f"(4; ≥ {bound:+.3f})" in text
