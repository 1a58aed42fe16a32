"""DCQ (sectioned distillation) and knowledge distillation on a real slice of Fashion-MNIST."""

import json
import math

import pytest
import torch
from torch import nn

from lowbit import create_model, quantize
from lowbit.config import load_config
from lowbit.errors import ConfigError
from lowbit.quantize import quant_state
from lowbit.schedules import distill, kd_loss
from lowbit.schedules.dcq import section_view
from lowbit.schedules.sections import block_macs, blocks, plan_cut, section_state
from lowbit.train import run

BASE = ["model.name=resnet8", "model.width=0.5", "data.limit=1200", "train.batch_size=64", "train.lr=0.05",
        "train.progress=false", "train.threads=1"]
W2 = ["plan.weight={name: twn, bits: 2}"]


def cfg(*overrides):
    return load_config(None, BASE + list(overrides))


def rows(path):
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, fmnist_small):
    """A full-precision ResNet-8 (width 0.5) trained for 3 epochs: the teacher of every test."""
    d = tmp_path_factory.mktemp("teacher") / "fp32"
    run(cfg("train.epochs=3", "train.lr=0.1"), d, data=fmnist_small)
    return d


def dcq_cfg(teacher, *extra):
    return cfg(*W2, f"dcq={{teacher: {teacher}, sections: 2, epochs: 2}}", *extra)


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------
ZOO = [("resnet8", {}), ("resnet20", {"width": 0.25}), ("vgg_small", {"width": 0.125}), ("lenet5", {}),
       ("lenet5", {"batch_norm": True}), ("mobilenetv2", {"width": 0.25})]


@pytest.mark.parametrize("name, kw", ZOO, ids=[f"{n}{'-' + str(k) if k else ''}" for n, k in ZOO])
def test_stitched_fp_students_reproduce_the_teacher_exactly(name, kw):
    torch.manual_seed(0)
    teacher = create_model(name, in_channels=1, num_classes=10, image_size=16, **kw)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        teacher.train()
        teacher(x)
    teacher.eval()
    bl = blocks(teacher, x)
    for n in (2, 3) if name == "resnet8" else (3,):
        cut = plan_cut(bl, n, block_macs(bl, x))
        assert cut.n == n
        # students: copies of the teacher under an FP plan, one per section; stitched into a fresh model
        pieces = {}
        for i in range(n):
            student = create_model(name, in_channels=1, num_classes=10, image_size=16, **kw)
            student.load_state_dict(teacher.state_dict())
            quantize(student, {"weight": None})
            pieces.update(section_state(student, cut, i))
        stitched = quantize(create_model(name, in_channels=1, num_classes=10, image_size=16, **kw), {"weight": None})
        stitched.load_state_dict(pieces)
        stitched.eval()
        with torch.no_grad():
            want = teacher(x)
            assert torch.equal(stitched(x), want)
            h = x  # the section views, one after the other, compute the network
            for i in range(n):
                h = section_view(stitched, cut, i)(h)
            assert torch.equal(h, want)


def test_quantized_section_views_chain_to_the_quantized_network():
    torch.manual_seed(0)
    model = quantize(create_model("resnet8", in_channels=1, num_classes=10, image_size=28),
                     {"weight": {"name": "twn", "bits": 2}, "act": {"name": "pact", "bits": 4}})
    x = torch.randn(3, 1, 28, 28)
    model.eval()
    bl = blocks(model, x)
    cut = plan_cut(bl, 3, block_macs(bl, x))
    views = [section_view(model, cut, i) for i in range(3)]
    assert sum(len(quant_state(v).layers) for v in views) == len(quant_state(model).layers)
    h = x
    with torch.no_grad():
        for v in views:
            h = v(h)
        assert torch.equal(h, model(x))


def test_user_sequential_model_and_a_model_that_is_not_a_chain():
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU()),
                        nn.Flatten(), nn.Linear(4 * 24 * 24, 10))
    x = torch.randn(2, 1, 28, 28)
    bl = blocks(seq, x)
    assert [n for n, _ in bl] == ["0", "1", "2.0", "2.1", "3", "4"]
    cut = plan_cut(bl, ["2"], block_macs(bl, x))
    assert cut.cut_names() == ["2.0"]

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.a(x)) + x

    with pytest.raises(ConfigError, match="does not compute its forward") as e:
        blocks(Skip(), torch.randn(2, 4))
    assert "\n" not in str(e.value)


def test_bad_sections_are_one_line_errors():
    x = torch.randn(2, 1, 28, 28)
    bl = blocks(create_model("resnet8", in_channels=1, num_classes=10, image_size=28), x)
    macs = block_macs(bl, x)
    with pytest.raises(ConfigError, match=r"dcq.sections: 'layers.9' is not a block; blocks are: conv1"):
        plan_cut(bl, ["layers.9"], macs)
    with pytest.raises(ConfigError, match="dcq.sections: 9 sections, but the model has 5 blocks"):
        plan_cut(bl, 9, macs)
    with pytest.raises(ConfigError, match="distinct and in execution order"):
        plan_cut(bl, ["layers.2", "layers.1"], macs)
    with pytest.raises(ConfigError, match=r"^config.dcq.sections"):
        cfg("dcq={teacher: x, sections: 0}")
    with pytest.raises(ConfigError, match=r"^config.dcq.workers"):
        cfg("dcq={teacher: x, workers: 0}")


# ---------------------------------------------------------------------------------------------
# DCQ runs
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sequential(tmp_path_factory, teacher_dir, fmnist_small):
    d = tmp_path_factory.mktemp("dcq") / "seq"
    res = run(dcq_cfg(teacher_dir, "dcq.finetune_epochs=1"), d, data=fmnist_small)
    return d, res


def test_dcq_run_trains_sections_stitches_and_summarises(sequential):
    d, res = sequential
    s = res.summary
    for f in ("config.yaml", "plan.txt", "teacher.pt", "sections.json", "sections/section_0.pt",
              "sections/section_1.pt", "metrics.jsonl", "best.pt", "summary.json", "dcq_loss.png"):
        assert (d / f).is_file(), f
    assert not list((d / "sections").glob("*.last.pt"))
    # the feature loss of the first (feature) section goes down
    r0 = rows(d / "sections" / "section_0.jsonl")
    assert len(r0) == 2 and r0[-1]["train_loss"] < r0[0]["train_loss"] and r0[-1]["val_loss"] < r0[0]["val_loss"]
    assert math.isnan(r0[0]["train_acc"])  # feature regression: no class scores
    r1 = rows(d / "sections" / "section_1.jsonl")
    assert len(r1) == 2 and r1[-1]["train_loss"] < r1[0]["train_loss"]  # the last section: labels, cross-entropy
    assert r1[-1]["val_acc"] > 0.2
    m = rows(d / "metrics.jsonl")
    assert [x["epoch"] for x in m] == [0, 1] and m[0]["stage"] == "stitched"
    assert s["best_val_acc"] == max(x["val_acc"] for x in m)
    assert s["weight_bits"] == [2] and s["test_acc"] > 0.3
    assert s["dcq"]["sections"] == 2 and s["dcq"]["cuts"] == ["layers.1.0"]
    assert s["dcq"]["sample_passes"] == 1140 * (2 + 1)
    assert all(n <= 3 for n in s["distinct_weight_values"].values())
    # the run folder loads like any other (lowbit eval / export)
    from lowbit.train import load_run

    _, _, model, _ = load_run(d)
    assert quant_state(model) is not None


def test_parallel_sections_equal_sequential_ones(sequential, tmp_path, teacher_dir, fmnist_small):
    seq_dir, seq = sequential
    par = run(dcq_cfg(teacher_dir, "dcq.workers=2"), tmp_path / "par", data=fmnist_small)  # no fine-tune
    for i in range(2):
        a = torch.load(seq_dir / "sections" / f"section_{i}.pt", weights_only=False)
        b = torch.load(tmp_path / "par" / "sections" / f"section_{i}.pt", weights_only=False)
        assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
    assert par.summary["dcq"]["stitched_test_acc"] == seq.summary["dcq"]["stitched_test_acc"]
    assert par.summary["best_epoch"] == 0 and par.summary["test_acc"] == par.summary["dcq"]["stitched_test_acc"]


def test_a_killed_dcq_run_resumes_without_retraining_finished_sections(sequential, tmp_path, teacher_dir,
                                                                       fmnist_small):
    seq_dir, seq = sequential
    c = dcq_cfg(teacher_dir, "dcq.finetune_epochs=1")

    def kill_in_second_section(row):
        if row.get("section") == 1 and row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(c, tmp_path / "cut", data=fmnist_small, callbacks=[kill_in_second_section])
    done = tmp_path / "cut" / "sections" / "section_0.pt"
    assert done.is_file() and (tmp_path / "cut" / "sections" / "section_1.last.pt").is_file()
    stamp = done.stat().st_mtime_ns
    with pytest.raises(ConfigError, match="already holds a DCQ run"):
        run(c, tmp_path / "cut", data=fmnist_small)
    seen = []
    resumed = run(c, tmp_path / "cut", resume=True, data=fmnist_small, callbacks=[seen.append])
    assert done.stat().st_mtime_ns == stamp  # section 0 was not trained again
    assert [(r.get("section"), r["epoch"]) for r in seen] == [(1, 2), (None, 1)]
    a = torch.load(seq_dir / "best.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "best.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.summary["test_acc"] == seq.summary["test_acc"]


def test_teacher_of_another_architecture_is_a_one_line_error(tmp_path, teacher_dir, fmnist_small):
    with pytest.raises(ConfigError, match=r"^dcq.teacher: the teacher is resnet8 \{'width': 0.5\} but model is resnet20") as e:
        run(dcq_cfg(teacher_dir, "model.name=resnet20"), tmp_path / "a", data=fmnist_small)
    assert "\n" not in str(e.value)
    torch.save(torch.load(teacher_dir / "best.pt", weights_only=False)["model"], tmp_path / "t.pt")
    with pytest.raises(ConfigError, match=r"^dcq.teacher: pretrained weights do not fit the model") as e:
        run(dcq_cfg(tmp_path / "t.pt", "model.width=1"), tmp_path / "b", data=fmnist_small)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^dcq.teacher: not found"):
        run(dcq_cfg(tmp_path / "nothing"), tmp_path / "c", data=fmnist_small)
    with pytest.raises(ConfigError, match=r"^train.freeze_bn_after: not supported in a DCQ run"):
        run(dcq_cfg(teacher_dir, "train.freeze_bn_after=0"), tmp_path / "d", data=fmnist_small)


# ---------------------------------------------------------------------------------------------
# knowledge distillation
# ---------------------------------------------------------------------------------------------
def test_kd_loss_equals_the_formula_on_a_hand_example():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    t = torch.tensor([[3.0, 2.0, 1.0], [0.5, 0.0, 0.0]])
    T = 2.0

    def softmax(row):
        e = [math.exp(v / T) for v in row]
        return [v / sum(e) for v in e]

    kl = [sum(pt * math.log(pt / ps) for pt, ps in zip(softmax(tr), softmax(sr))) for sr, tr in zip(s.tolist(), t.tolist())]
    want = T * T * sum(kl) / 2
    assert kd_loss(s, t, T).item() == pytest.approx(want, rel=1e-6)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-7)
    # the method's loss: (1 - alpha) * its own task loss + alpha * KD, with the teacher's logits
    from lowbit.methods import STE

    teacher = nn.Linear(3, 3)
    x, y = torch.randn(2, 3), torch.tensor([2, 0])
    method = distill(STE(), teacher, temperature=T, alpha=0.25)
    assert type(method).__name__ == "DistilledSTE" and method.name == "ste"
    with torch.no_grad():
        tl = teacher(x)
    ce = torch.nn.functional.cross_entropy(s, y)
    assert method.loss(None, (x, y), s).item() == pytest.approx((0.75 * ce + 0.25 * kd_loss(s, tl, T)).item(), rel=1e-6)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    with pytest.raises(ConfigError, match="alpha must be within"):
        distill(STE(), teacher, alpha=2)


def test_training_with_kd_from_a_teacher_runs(tmp_path, teacher_dir, fmnist_small):
    c = cfg(*W2, "train.epochs=1", f"model.init_from={teacher_dir}",
            f"train.distill={{teacher: {teacher_dir}, temperature: 4, alpha: 0.9}}")
    res = run(c, tmp_path / "kd", data=fmnist_small)
    assert res.summary["method_info"]["distill"] == "T=4, alpha=0.9"
    # it learns: accuracy on the training stream (test accuracy after one 2-bit epoch hangs on BatchNorm running
    # statistics of 18 steps, 0.28-0.5 between CPUs with the same seed; tests/test_train.py covers evaluation)
    assert rows(tmp_path / "kd" / "metrics.jsonl")[-1]["train_acc"] > 0.3 and res.summary["test_acc"] > 0.1
    # a teacher file of another architecture: one line
    torch.save(torch.load(teacher_dir / "best.pt", weights_only=False)["model"], tmp_path / "t.pt")
    with pytest.raises(ConfigError, match=r"^train.distill.teacher: pretrained weights do not fit"):
        run(cfg("train.epochs=1", "model.width=1", f"train.distill={{teacher: {tmp_path / 't.pt'}}}"),
            tmp_path / "bad", data=fmnist_small)


# ---------------------------------------------------------------------------------------------
# the optional on-disk feature cache
# ---------------------------------------------------------------------------------------------
def test_feature_cache_trains_the_same_weights_and_runs_the_teacher_once_per_batch(sequential, tmp_path, teacher_dir,
                                                                                   fmnist_small):
    from lowbit.schedules import dcq as dcq_mod

    seq_dir, seq = sequential
    calls = []
    real_cut = dcq_mod.FeatureStream._cut

    def counting_cut(self, k, x, y, key, b):
        if k and (self.cache is None or not self.cache._path(k, self.stream, key, b).is_file()):
            calls.append((self.i, k, self.stream))
        return real_cut(self, k, x, y, key, b)

    dcq_mod.FeatureStream._cut = counting_cut
    try:
        c = dcq_cfg(teacher_dir, "dcq.finetune_epochs=1", "dcq.feature_cache_mb=64")
        res = run(c, tmp_path / "cached", data=fmnist_small)
    finally:
        dcq_mod.FeatureStream._cut = real_cut
    for i in range(2):  # the same weights as without the cache, bit for bit
        a = torch.load(seq_dir / "sections" / f"section_{i}.pt", weights_only=False)
        b = torch.load(tmp_path / "cached" / "sections" / f"section_{i}.pt", weights_only=False)
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert res.summary["test_acc"] == seq.summary["test_acc"]
    info = res.summary["dcq"]["section_info"]
    # section 0 computed cut 1 (its target) on every train and val batch; section 1 read it from disk
    n_train, n_val = math.ceil(1140 / 64), 1
    assert sum(1 for i, k, s in calls if i == 0 and k == 1 and s == "train") == 2 * n_train
    assert sum(1 for i, k, s in calls if i == 0 and k == 1 and s == "val") == n_val  # fixed across epochs
    assert not [c for c in calls if c[0] == 1]
    assert info[1]["feature_cache"]["misses"] == 0 and info[1]["feature_cache"]["hits"] > 0
    assert info[0]["feature_cache"]["bytes_used"] <= 64 * 2**20


def test_feature_cache_size_limit_and_stale_entries(tmp_path):
    from lowbit.schedules.featcache import FeatureCache

    y = torch.arange(4)
    f = torch.randn(4, 8, 3, 3)  # 4*72*4 + 4*8 = 1184 bytes an entry
    c = FeatureCache(tmp_path / "c", 3000, {"a": 1})
    assert c.put(1, "train", "e0", 0, y, f) and c.put(1, "train", "e0", 1, y, f)
    assert not c.put(1, "train", "e0", 2, y, f)  # the third would pass 3000 bytes: left out
    assert c.bytes_used() == 2 * 1184 and c.stats()["entries_refused_by_limit"] == 1
    assert torch.equal(c.get(1, "train", "e0", 0, y), f) and c.get(1, "train", "e0", 2, y) is None
    with pytest.raises(ConfigError, match="holds another batch"):
        c.get(1, "train", "e0", 0, y.flip(0))
    with pytest.raises(ConfigError, match="another data/teacher setting"):
        FeatureCache(tmp_path / "c", 3000, {"a": 2})
    (tmp_path / "c" / "cut1" / "train_e0_b1.pt").write_bytes(b"trunc")
    with pytest.raises(ConfigError, match="unreadable"):
        c.get(1, "train", "e0", 1, y)


def test_dcq_with_a_mixture_method_reports_the_sections_end_of_schedule(tmp_path):
    """DCQ + DQA: the sections anneal T to t_end; the stitched network's method was never set up, so
    summary.json said "Q1 weight at end: min 0.3362" (softmax at T = 100) for mixtures that ended at 1.0."""
    small = ["model.name=resnet8", "model.width=0.25", "data.name=digits", "data.limit=300", "train.epochs=1",
             "train.batch_size=32", "train.progress=false", "train.threads=1"]
    teacher = tmp_path / "fp32"
    run(load_config(None, small), teacher)
    dqa = ("plan.method={name: dqa, mixture: [{name: sawb, bits: 4}, {name: sawb, bits: 8}]}",
           "plan.weight={name: sawb, bits: 2}")
    plain = run(load_config(None, small + list(dqa)), tmp_path / "plain").summary["method_info"]
    res = run(load_config(None, small + list(dqa) + [f"dcq={{teacher: {teacher}, sections: 2}}"]), tmp_path / "dcq")
    info = res.summary["method_info"]
    assert plain["Q1 weight at end"].startswith("min 1.0000")
    assert info["Q1 weight at end"] == plain["Q1 weight at end"], info
    assert "whole training" not in info["schedule"]


def test_dcq_fine_tune_that_never_beats_the_stitched_network_reports_its_schedule(tmp_path, monkeypatch):
    """best.pt is the stitched network (epoch 0): its "Q1 weight at end" is the sections' end, as without the
    fine-tune; it read best.pt's step (the sections' last) against the fine-tune's length (T = 1.7: min 0.498)."""
    import importlib

    small = ["model.name=resnet8", "model.width=0.25", "data.name=digits", "data.limit=300", "train.epochs=1",
             "train.batch_size=32", "train.progress=false", "train.threads=1"]
    teacher = tmp_path / "fp32"
    run(load_config(None, small), teacher)
    dqa = ["plan.method={name: dqa, mixture: [{name: sawb, bits: 4}, {name: sawb, bits: 8}]}",
           "plan.weight={name: sawb, bits: 2}"]
    plain = run(load_config(None, small + dqa + [f"dcq={{teacher: {teacher}, sections: 2}}"]), tmp_path / "plain")
    fit_module = importlib.import_module("lowbit.fit")
    real = fit_module.evaluate
    monkeypatch.setattr(fit_module, "evaluate", lambda m, b, device=None: {**real(m, b, device), "acc": 0.0})
    res = run(load_config(None, small + dqa + [f"dcq={{teacher: {teacher}, sections: 2, finetune_epochs: 2}}"]),
              tmp_path / "fine")
    assert res.summary["best_epoch"] == 0
    assert res.summary["method_info"]["Q1 weight at end"] == plain.summary["method_info"]["Q1 weight at end"]


def test_a_dcq_run_whose_config_was_edited_after_a_kill_is_not_resumed(tmp_path):
    """config.yaml edited between a kill and --resume (weights 2 -> 4 bits): the finished section was trained at 2
    bits; it resumed and stitched it into a network the summary called W4."""
    import yaml

    from lowbit.runfolder import run_config

    small = ["model.name=resnet8", "model.width=0.25", "data.name=digits", "data.limit=300", "train.epochs=1",
             "train.batch_size=32", "train.progress=false", "train.threads=1"]
    teacher = tmp_path / "fp32"
    run(load_config(None, small), teacher)
    c = load_config(None, small + ["plan.weight={name: minmax, bits: 2}", f"dcq={{teacher: {teacher}, sections: 2}}"])

    def kill_in_second_section(row):
        if row.get("section") == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(c, tmp_path / "dcq", callbacks=[kill_in_second_section])
    p = tmp_path / "dcq" / "config.yaml"
    d = yaml.safe_load(p.read_text())
    d["plan"]["weight"]["bits"] = 4
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    with pytest.raises(ConfigError, match=r"trained with another config \(plan.weight.bits: 2 -> 4\)"):
        run(run_config(tmp_path / "dcq"), tmp_path / "dcq", resume=True)
    d["plan"]["weight"]["bits"], d["train"]["threads"] = 2, 2  # threads (VOLATILE) is no edit
    d["dcq"]["feature_cache_mb"] = 16  # nor where and how the sections run (the same weights: docs/dcq.md)
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    assert run(run_config(tmp_path / "dcq"), tmp_path / "dcq", resume=True).summary["weight_bits"] == [2]


def test_feature_cache_of_a_run_moved_to_another_data_root_is_read(tmp_path):
    """data.root is where this machine keeps the data (runfolder.VOLATILE): a DCQ run moved to a machine with the
    data elsewhere resumes past its RUN/feature_cache (it was 'written for another data/teacher setting')."""
    from lowbit.schedules.featcache import FeatureCache

    a = cfg("data.root=/machine_a/data").to_dict()
    FeatureCache(tmp_path / "c", 3000, FeatureCache.fingerprint(a, ["x"], tmp_path / "teacher.pt"))
    b = cfg("data.root=/machine_b/data").to_dict()
    FeatureCache(tmp_path / "c", 3000, FeatureCache.fingerprint(b, ["x"], tmp_path / "teacher.pt"))
    with pytest.raises(ConfigError, match="another data/teacher setting"):
        FeatureCache(tmp_path / "c", 3000, FeatureCache.fingerprint(cfg("data.limit=600").to_dict(), ["x"],
                                                                    tmp_path / "teacher.pt"))


def test_feature_cache_written_with_data_root_in_its_fingerprint_is_read(tmp_path):
    """Before data.root left the fingerprint (session 26's review) a cache recorded it (None by default): a DCQ run
    with dcq.feature_cache_mb killed before then was refused on --resume ('another data/teacher setting')."""
    from lowbit.schedules.featcache import FeatureCache

    a = cfg().to_dict()
    old = {**FeatureCache.fingerprint(a, ["x"], tmp_path / "teacher.pt"), "data": a["data"]}  # as written then
    assert old["data"]["root"] is None
    FeatureCache(tmp_path / "c", 3000, old)
    FeatureCache(tmp_path / "c", 3000, FeatureCache.fingerprint(a, ["x"], tmp_path / "teacher.pt"))
    with pytest.raises(ConfigError, match="another data/teacher setting"):
        FeatureCache(tmp_path / "c", 3000, FeatureCache.fingerprint(cfg("data.limit=600").to_dict(), ["x"],
                                                                    tmp_path / "teacher.pt"))


def test_a_dcq_run_without_matplotlib_finishes(tmp_path, monkeypatch):
    """matplotlib is the optional "plot" extra: a DCQ run of a plain `pip install lowbit` ended in a
    ModuleNotFoundError traceback (status 1) after its summary.json, at the loss plot."""
    import sys

    small = ["model.name=resnet8", "model.width=0.25", "data.name=digits", "data.limit=300", "train.epochs=1",
             "train.batch_size=32", "train.progress=false", "train.threads=1"]
    teacher = tmp_path / "fp32"
    run(load_config(None, small), teacher)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    res = run(load_config(None, small + W2 + [f"dcq={{teacher: {teacher}, sections: 2}}"]), tmp_path / "dcq")
    assert (tmp_path / "dcq" / "summary.json").is_file() and res.summary["test_acc"] >= 0
    assert not (tmp_path / "dcq" / "dcq_loss.png").exists()


def test_a_ray_dcq_run_without_ray_is_refused_before_its_run_folder(tmp_path, monkeypatch):
    """dcq.backend: ray without Ray installed wrote teacher.pt, sections.json, config.yaml, plan.txt, then said "the
    ray backend needs Ray"; the folder then refused a new run ("already holds a DCQ run")."""
    import sys

    from lowbit.cli import main

    small = ["model.name=resnet8", "model.width=0.25", "data.name=digits", "data.limit=300", "train.epochs=1",
             "train.batch_size=32", "train.progress=false", "train.threads=1"]
    run(load_config(None, small), tmp_path / "fp32")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    config = tmp_path / "c.yaml"
    config.write_text("model: {name: resnet8, width: 0.25}\ndata: {name: digits, limit: 300}\n"
                      f"dcq: {{teacher: {tmp_path / 'fp32'}, backend: ray}}\n")
    with pytest.raises(ConfigError, match="the ray backend needs Ray"):
        run(load_config(config), tmp_path / "dcq")
    assert [p.name for p in (tmp_path / "dcq").iterdir()] == [".lock"]
    assert main(["train", str(config), "--out", str(tmp_path / "cli")]) == 2
    assert not (tmp_path / "cli").exists()  # a start that wrote nothing leaves no folder


def test_dqa_in_a_dcq_section_normalises_its_penalty_by_the_whole_network():
    # 003 eq. 6: S is the number of weights of the whole network; a section trained alone (fit(view, ...))
    # counted only its own layers, so the same lam pushed a 3-section cut's first section 15x harder
    from lowbit.methods.dqa import network_weights

    torch.manual_seed(0)
    plan = {"weight": {"name": "minmax", "bits": 2},
            "method": {"name": "dqa", "mixture": [{"name": "minmax", "bits": 4}, {"name": "minmax", "bits": 8}]}}
    student = quantize(create_model("resnet8", in_channels=1, num_classes=10, image_size=28, width=0.25), plan)
    ex = torch.randn(2, 1, 28, 28)
    bl = blocks(student, ex)
    cut = plan_cut(bl, 3, block_macs(bl, ex))
    method = quant_state(student).method
    for i in range(cut.n):
        method.setup(section_view(student, cut, i), 10, 5)
        assert method.S == network_weights(student)
