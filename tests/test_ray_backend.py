"""`lowbit bench SUITE --backend ray`: each (row, seed) a Ray task, results through the one writer."""

import json

import pytest
import yaml

ray = pytest.importorskip("ray", reason="ray is not installed (optional extra: pip install 'lowbit[cluster]')")

from lowbit.bench.suite import run_suite  # noqa: E402

BASE = {"model": {"name": "resnet8", "width": 0.25}, "data": {"name": "digits", "limit": 100},
        "train": {"epochs": 1, "batch_size": 50, "progress": False, "threads": 1}}


def test_a_suite_on_a_local_ray_instance(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"name": "r", "base": BASE, "out": str(tmp_path / "out"), "seeds": [0],
                                 "methods": {"FP32": {}, "SAWB": {"plan": {"weight": {"name": "sawb", "bits": 2}}}}}))
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        run_suite(p, backend="ray")
    finally:
        ray.shutdown()
    lines = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["row"] for r in lines] == ["FP32", "SAWB"]
    stamp = (tmp_path / "out" / "SAWB" / "seed0" / "summary.json").stat().st_mtime_ns
    run_suite(p, backend="ray")  # finished rows are not trained again (no Ray started for nothing)
    assert (tmp_path / "out" / "SAWB" / "seed0" / "summary.json").stat().st_mtime_ns == stamp
