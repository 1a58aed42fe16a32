"""benchmarks/ondevice_table.py's table of ondevice.json files written here (no training)."""
import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "ondevice_table.py"


def test_runs_of_one_row_with_other_overrides_are_said_not_pooled_silently(tmp_path, monkeypatch):
    """niti_int8 seeds 0 and 2 with the default settings, seed 1 with `--set train.epochs=2` (no --tag): the row
    read 3 runs, mean ± std over all three, nothing said."""
    spec = importlib.util.spec_from_file_location("ondevice_table", BENCH)
    b = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(b)
    monkeypatch.setattr(b, "OUT", tmp_path)
    for seed, acc, ov in ((0, 0.90, None), (1, 0.80, ["train.epochs=2"]), (2, 0.92, None)):
        d = tmp_path / "train" / f"niti_int8-s{seed}"
        d.mkdir(parents=True)
        (d / "ondevice.json").write_text(json.dumps({"row": "niti_int8", "seed": seed, "test_acc": acc,
                                                     "integer_test_acc": acc, "wall_s": 10.0, "overrides": ov}))
    line = next(ln for ln in b.table().splitlines() if "| niti_int8 |" in ln)
    assert line == ("| niti | niti_int8 | 12.67 ± 6.43 | 12.67 ± 6.43 | 3 (MIXED settings: no --set / train.epochs=2) "
                    "| 10 |")
