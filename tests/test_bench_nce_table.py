"""benchmarks/nce_table.py's reading back of finished runs (run folders written here, no training)."""
import importlib.util
import json
from argparse import Namespace
from pathlib import Path

import pytest

from lowbit.errors import ConfigError

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "nce_table.py"


def test_a_finished_run_of_other_arguments_is_refused(tmp_path):
    """A run trained with --epochs 5, read back by a call with --epochs 10: its summary was taken as the 10-epoch
    run's and tabled with the others."""
    spec = importlib.util.spec_from_file_location("nce_table", BENCH)
    b = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(b)
    args = Namespace(model="resnet8", limit=5000, epochs=5, batch_size=128)
    d = tmp_path / "W2A2-orig-s0"
    d.mkdir()
    (d / "config.yaml").write_text(b.base_config(args, 2, 0).to_yaml())
    (d / "summary.json").write_text(json.dumps({"test_acc": 0.8, "_train_seconds": 12.0}))
    assert b.train(b.base_config(args, 2, 0), d, None) == ({"test_acc": 0.8, "_train_seconds": 12.0}, 12.0)
    with pytest.raises(ConfigError, match=r"was trained with another config \(train.epochs: 5 -> 10\)"):
        b.train(b.base_config(Namespace(**{**vars(args), "epochs": 10}), 2, 0), d, None)
