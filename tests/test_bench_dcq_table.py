"""benchmarks/dcq_table.py --collect on run folders written here (no training)."""
import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "dcq_table.py"


@pytest.fixture
def dcq():
    spec = importlib.util.spec_from_file_location("dcq_table", BENCH)
    b = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(b)
    return b


def _finished_runs(b, out: Path, epochs: int, accs: dict) -> None:
    """Run folders as lowbit.run leaves them (config.yaml, metrics.jsonl, summary.json), trained with --epochs."""
    a = argparse.Namespace(epochs=epochs, finetune=max(1, epochs // 4), teacher_epochs=epochs, limit=5000,
                           start_lr=0.02, threads=1)
    specs = b.rows(a)
    for (row, seed), acc in accs.items():
        d = out / "runs" / row / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump(b.config(a, row, specs[row], seed, out)))
        (d / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "val_acc": acc}) + "\n" for e in range(epochs)))
        (d / "summary.json").write_text(json.dumps({"test_acc": acc, "best_epoch": epochs - 1, "best_val_acc": acc,
                                                    "weight": "dorefa 1b", "act": "fp"}))


def test_runs_trained_with_other_arguments_are_refused_not_tabled_under_these(dcq, tmp_path):
    """Runs trained with --epochs 8, collected with --epochs 4: the table's header said "4 epochs budget" over the
    8-epoch runs (a finished run was skipped as done whatever its config)."""
    _finished_runs(dcq, tmp_path, 8, {("fp32", 0): 0.90, ("w1_ste", 0): 0.80, ("w1_ste_fp32start", 0): 0.85,
                                      ("fp32", 1): 0.90, ("w1_ste", 1): 0.78, ("w1_ste_fp32start", 1): 0.86})
    argv = ["--collect", "--seeds", "0", "1", "--rows", "w1_ste", "w1_ste_fp32start", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        dcq.main(argv + ["--epochs", "4"])
    assert str(e.value).startswith(f"dcq_table: {tmp_path / 'runs' / 'fp32' / 'seed0'} was trained with another config "
                                   "(train.epochs: 8 -> 4) (and 5 more runs); give the arguments")
    assert not (tmp_path / "results.md").exists()
    dcq.main(argv + ["--epochs", "8"])  # the arguments they were trained with: the table
    row = next(r for r in json.loads((tmp_path / "results.json").read_text())["rows"] if r["row"] == "w1_ste_fp32start")
    assert (row["n"], row["test_acc"], row["paired_diff"]) == (2, "85.50 ± 0.71", "+6.50 ± 2.12")


def test_one_seed_has_no_spread_and_a_paired_difference_says_its_pairs(dcq, tmp_path):
    """One seed was shown as "± 0.00" (a spread measured as zero), and a paired difference over fewer seeds than
    its row's (the reference row lacking a seed) did not say how many pairs it averaged."""
    _finished_runs(dcq, tmp_path, 8, {("fp32", 0): 0.90, ("fp32", 1): 0.90, ("w1_ste", 0): 0.80,
                                      ("w1_ste_fp32start", 0): 0.85, ("w1_ste_fp32start", 1): 0.87})
    dcq.main(["--collect", "--seeds", "0", "1", "--rows", "w1_ste", "w1_ste_fp32start", "--epochs", "8",
              "--out", str(tmp_path)])
    rows = {r["row"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert (rows["w1_ste"]["n"], rows["w1_ste"]["test_acc"]) == (1, "80.00 ± –")
    assert (rows["w1_ste_fp32start"]["test_acc"], rows["w1_ste_fp32start"]["paired_diff"]) == ("86.00 ± 1.41",
                                                                                              "+5.00 ± – (n=1)")
