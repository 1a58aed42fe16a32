"""benchmarks/sinreq_table.py's comparisons on records written here (no training)."""
import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "sinreq_table.py"


def test_one_seed_has_no_spread():
    """A row of one seed read "85.00 ± 0.00" in the SinReQ vs plain table, which shows no number of seeds."""
    spec = importlib.util.spec_from_file_location("sinreq_table", BENCH)
    b = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(b)
    qe = {"quant error": "mean |u-Q(u)|/step 0.250"}
    more = {"mem_002_bits": 8192, "weight_bits": [4], "config": {"model": {}}}
    recs = [{**more, **r} for r in [{"row": "W4A4 DoReFa", "seed": 0, "test_acc": 0.85, "method_info": qe},
            {"row": "W4A4 DoReFa + SinReQ", "seed": 0, "test_acc": 0.86, "method_info": qe},
            {"row": "W4A4 DoReFa + SinReQ", "seed": 1, "test_acc": 0.88, "method_info": qe}]]
    text, _ = b.comparisons(recs, {})
    assert "| W4A4 | DoReFa | 85.00 ± – | 87.00 ± 1.41 | +1.00 ± – (n=1) | 0.250 → 0.250 |" in text.splitlines()
