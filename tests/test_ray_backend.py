"""`lowbit bench SUITE --backend ray`: each (row, seed) a Ray task, results through the one writer."""

import json

import pytest
import yaml

ray = pytest.importorskip("ray", reason="ray is not installed (optional extra: pip install 'lowbit[cluster]')")

from lowbit.bench.suite import run_suite  # noqa: E402

BASE = {"model": {"name": "resnet8", "width": 0.25}, "data": {"name": "digits", "limit": 100},
        "train": {"epochs": 1, "batch_size": 50, "progress": False, "threads": 1}}


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (its start-up is the slow part); lowbit joins it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_a_suite_on_a_local_ray_instance(tmp_path, local_ray):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"name": "r", "base": BASE, "out": str(tmp_path / "out"), "seeds": [0],
                                 "methods": {"FP32": {}, "SAWB": {"plan": {"weight": {"name": "sawb", "bits": 2}}}}}))
    run_suite(p, backend="ray")
    lines = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["row"] for r in lines] == ["FP32", "SAWB"]
    stamp = (tmp_path / "out" / "SAWB" / "seed0" / "summary.json").stat().st_mtime_ns
    run_suite(p, backend="ray")  # finished rows are not trained again (no Ray started for nothing)
    assert (tmp_path / "out" / "SAWB" / "seed0" / "summary.json").stat().st_mtime_ns == stamp


def test_releq_evaluations_on_ray_equal_the_local_ones(tmp_path, local_ray):
    from lowbit.search.evaluator import BitEvaluator, EvalSpec

    base = {"name": "tiny", "model": {"name": "resnet8", "width": 0.25},
            "data": {"name": "digits", "val_fraction": 0.2, "limit": 200, "augment": False},
            "plan": {"weight": {"name": "dorefa", "bits": 8}},
            "train": {"batch_size": 32, "lr": 0.05, "progress": False}}
    spec = EvalSpec(base, ["layers.0.0.conv1", "layers.2.0.conv1"], finetune_steps=2, finetune_lr=0.01, threads=1)
    assignments = [(2, 8), (8, 2), (4, 4)]
    local = BitEvaluator(spec, tmp_path / "local.jsonl").accuracies(assignments)
    on_ray = BitEvaluator(spec, tmp_path / "ray.jsonl", workers=2, backend="ray")
    assert on_ray.accuracies(assignments) == local  # the same fine-tune, bit for bit, in Ray worker processes
    assert on_ray.fits == 0 and on_ray.evaluated == 3  # computed remotely, stored in this process's cache


def test_dcq_sections_on_ray_equal_sequential_ones(tmp_path, local_ray):
    import torch

    from lowbit.config import load_config
    from lowbit.train import run

    base = ["model.name=resnet8", "model.width=0.25", "data.name=digits", "data.limit=300", "train.batch_size=50",
            "train.progress=false", "train.threads=1", "train.lr=0.05"]
    run(load_config(None, base + ["train.epochs=1"]), tmp_path / "teacher")
    dcq = f"dcq={{teacher: {tmp_path / 'teacher'}, sections: 2, epochs: 1}}"
    w2 = "plan.weight={name: twn, bits: 2}"
    seq = run(load_config(None, base + [w2, dcq]), tmp_path / "seq")
    par = run(load_config(None, base + [w2, dcq, "dcq.workers=2", "dcq.backend=ray"]), tmp_path / "ray")
    for i in range(2):
        a = torch.load(tmp_path / "seq" / "sections" / f"section_{i}.pt", weights_only=False)["model"]
        b = torch.load(tmp_path / "ray" / "sections" / f"section_{i}.pt", weights_only=False)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert par.summary["test_acc"] == seq.summary["test_acc"]
