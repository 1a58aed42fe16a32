"""benchmarks/releq_table.py's results.jsonl across calls (the search and fine-tunes replaced by a stub)."""
import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "releq_table.py"


def _row(seed, budget, method):
    return {"seed": seed, "budget": budget, "method": method, "bits": [2], "avg_bits": 2.0, "weighted_bits": 2.0,
            "evaluations": 10, "eval_seconds": 1.0, "search_val_acc": 0.8, "reward": 0.5, "final_test_acc": 0.9,
            "final_val_acc": 0.9, "fp32_test_acc": 0.91, "loss_pt": 1.0, "mem_bits": 1.0, "size_bits": 1.0,
            "releq_seconds": 5.0, "episodes": 4, "fp32_val_acc": 0.9}


def test_a_call_for_other_seeds_keeps_the_rows_of_earlier_calls(tmp_path):
    """A call with --seeds 1 after one with --seeds 0 rewrote results.jsonl with seed 1's rows alone: seed 0's,
    whose FP32 checkpoints need not exist any more, were lost."""
    spec = importlib.util.spec_from_file_location("releq_table", BENCH)
    b = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(b)
    calls = []
    b.one = lambda config, seed, budget, out, overrides: calls.append((seed, budget)) or [
        _row(seed, budget, m) for m in ("releq", "uniform")]
    for seeds in (["0"], ["1"], ["0", "1"]):
        b.main(["cfg.yaml", "--seeds", *seeds, "--out", str(tmp_path)])
    rows = [json.loads(ln) for ln in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert calls == [(0, "none"), (1, "none")]  # the third call read both seeds back
    assert [(r["seed"], r["method"]) for r in rows] == [(0, "releq"), (0, "uniform"), (1, "releq"), (1, "uniform")]
