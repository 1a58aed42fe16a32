"""The training loop on a real slice of Fashion-MNIST: learning, protocol, resume, divergence."""

import json
import math

import pytest
import torch
from torch import nn

from lowbit.config import load_config
from lowbit.errors import TrainingDiverged
from lowbit.train import recalibrate_bn, run

W2A4 = ["plan.weight={name: sawb, bits: 2}", "plan.act={name: pact, bits: 4, init: 4.0}"]


def cfg(*overrides, epochs=3):
    base = ["model.name=resnet8", "model.width=0.5", "data.limit=1200", f"train.epochs={epochs}",
            "train.batch_size=64", "train.lr=0.05", "train.progress=false", "train.threads=2"]
    return load_config(None, base + list(overrides))


def rows(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_short_quantized_training_lowers_the_loss_and_beats_chance(tmp_path, fmnist_small):
    res = run(cfg(*W2A4), tmp_path / "r", data=fmnist_small)
    r = rows(tmp_path / "r")
    assert len(r) == 3
    assert r[-1]["train_loss"] < 0.75 * r[0]["train_loss"]
    assert res.summary["test_acc"] > 0.3  # three times chance (0.1); 1,140 images, 3 epochs
    # the run folder has everything a user needs
    for f in ("config.yaml", "plan.txt", "metrics.jsonl", "last.pt", "best.pt", "summary.json"):
        assert (tmp_path / "r" / f).is_file(), f
    s = res.summary
    assert s["weight_bits"] == [2] and s["act_bits"] == [4]
    assert 1 <= s["best_epoch"] <= 3
    assert s["best_val_acc"] == max(x["val_acc"] for x in r)  # 002: the best validation epoch
    assert s["size_bytes"] < s["fp32_size_bytes"] / 4
    assert all(n <= 4 for n in s["distinct_weight_values"].values())


def test_resume_reproduces_an_uninterrupted_run(tmp_path, fmnist_small):
    c = cfg(*W2A4)
    run(c, tmp_path / "full", data=fmnist_small)

    def kill_after_second_epoch(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(c, tmp_path / "cut", data=fmnist_small, callbacks=[kill_after_second_epoch])
    assert len(rows(tmp_path / "cut")) == 2
    resumed = run(c, tmp_path / "cut", resume=True, data=fmnist_small)
    full, cut = rows(tmp_path / "full"), rows(tmp_path / "cut")
    assert len(cut) == 3
    for a, b in zip(full, cut):
        a.pop("epoch_time"), b.pop("epoch_time")
        assert a == b
    assert resumed.summary["test_acc"] == json.loads((tmp_path / "full" / "summary.json").read_text())["test_acc"]


def test_same_seed_same_result_other_seed_differs(tmp_path, fmnist_small):
    a = run(cfg(epochs=1), tmp_path / "a", data=fmnist_small).summary
    b = run(cfg(epochs=1), tmp_path / "b", data=fmnist_small).summary
    c = run(cfg("train.seed=1", epochs=1), tmp_path / "c", data=fmnist_small).summary
    assert a["test_loss"] == b["test_loss"]
    assert a["test_loss"] != c["test_loss"]


def test_nan_loss_stops_with_a_clear_message(tmp_path, fmnist_small):
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf) at epoch 1, step \d+; lower train.lr"):
        run(cfg("train.lr=1e12", "train.weight_decay=0", epochs=1), tmp_path / "nan", data=fmnist_small)


def test_resume_without_checkpoint_is_an_error(tmp_path, fmnist_small):
    from lowbit.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot resume"):
        run(cfg(epochs=1), tmp_path / "none", resume=True, data=fmnist_small)


@pytest.mark.parametrize("schedule, extra, expect", [
    ("multistep", {"milestones": [2, 3]}, [0.1, 0.1, 0.01, 0.001]),   # lr at the start of epochs 1..4
    ("constant", {}, [0.1, 0.1, 0.1, 0.1]),
    ("cosine", {}, [0.1, 0.1 * (1 + math.cos(math.pi / 4)) / 2, 0.05, 0.1 * (1 + math.cos(3 * math.pi / 4)) / 2]),
])
def test_learning_rate_schedules(schedule, extra, expect):
    import torch

    from lowbit.config import TrainConfig
    from lowbit.train import build_optimizer, build_scheduler

    t = TrainConfig(epochs=4, lr=0.1, schedule=schedule, **extra)
    opt = build_optimizer(torch.nn.Linear(2, 2), t)
    sched = build_scheduler(opt, t, steps_per_epoch=5)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        for _ in range(5):
            opt.step()
            sched.step()
    assert seen == pytest.approx(expect)


def test_onecycle_and_adam_peak_at_lr():
    import torch

    from lowbit.config import TrainConfig
    from lowbit.train import build_optimizer, build_scheduler

    t = TrainConfig(epochs=2, lr=0.01, schedule="onecycle", optimizer="adam")
    opt = build_optimizer(torch.nn.Linear(2, 2), t)
    assert isinstance(opt, torch.optim.Adam)
    sched = build_scheduler(opt, t, steps_per_epoch=10)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(lrs) == pytest.approx(0.01) and lrs[0] < 0.001 and lrs[-1] < 0.001


def test_bad_milestones_are_refused():
    import torch

    from lowbit.config import TrainConfig
    from lowbit.errors import ConfigError
    from lowbit.train import build_optimizer, build_scheduler

    t = TrainConfig(epochs=4, schedule="multistep", milestones=[4])
    with pytest.raises(ConfigError, match="train.milestones"):
        build_scheduler(build_optimizer(torch.nn.Linear(2, 2), t), t, 5)


def test_recalibrate_bn_sets_the_statistics_of_the_network_as_it_is_now():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(), nn.Dropout(0.5))
    x = torch.randn(2, 16, 1, 8, 8)
    before = {k: v.clone() for k, v in model.named_parameters()}
    bn = recalibrate_bn(model, [(x[0], None), (x[1], None), (x[0] * 100, None)], batches=2)
    h = [model[0](xb).detach() for xb in x]  # the conv's outputs of the two batches used
    mean = torch.stack([t.mean((0, 2, 3)) for t in h]).mean(0)
    var = torch.stack([t.var((0, 2, 3), unbiased=True) for t in h]).mean(0)
    assert torch.allclose(bn["1.running_mean"], mean, atol=1e-6)  # the third batch was not used
    assert torch.allclose(bn["1.running_var"], var, atol=1e-5)
    assert int(bn["1.num_batches_tracked"]) == 2 and set(bn) == {"1.running_mean", "1.running_var",
                                                                 "1.num_batches_tracked"}
    assert model[1].momentum == 0.3 and not model.training and not model[3].training
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())


def test_bn_recalibrate_is_stored_and_used_by_eval_and_export(tmp_path, fmnist_small):
    dqa = ["plan.weight={name: minmax, bits: 2}",
           "plan.method={name: dqa, mixture: [{name: minmax, bits: 4}], lam: 5}"]
    plain = run(cfg(*dqa, epochs=1), tmp_path / "plain", data=fmnist_small).summary
    rec = run(cfg(*dqa, "train.bn_recalibrate=3", epochs=1), tmp_path / "rec", data=fmnist_small).summary
    assert plain["bn_recalibrated_batches"] == 0 and rec["bn_recalibrated_batches"] == 3
    assert rec["test_loss"] != plain["test_loss"]  # same weights, new BatchNorm statistics
    ck = torch.load(tmp_path / "rec" / "best.pt", weights_only=False)
    assert "final_bn" in ck and "final_bn" not in torch.load(tmp_path / "plain" / "best.pt", weights_only=False)
    # every reader of the run folder sees the network the summary measured
    from lowbit.export.api import load_run as export_load_run
    from lowbit.train import BatchLoader, evaluate, load_run

    c, data, model, _ = load_run(tmp_path / "rec")
    assert export_load_run(tmp_path / "rec")[2].state_dict()["bn1.running_mean"].equal(
        model.state_dict()["bn1.running_mean"])
    test = evaluate(model, BatchLoader(fmnist_small.test, fmnist_small.info, 500))
    assert test["loss"] == pytest.approx(rec["test_loss"], rel=1e-6) and test["acc"] == rec["test_acc"]


# --- a researcher's audit of the run life cycle (session 24): each of these failed before ----------------------
def _cut_after_first_epoch(c, run_dir, data):
    def kill(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(c, run_dir, data=data, callbacks=[kill])


def test_a_run_resumes_after_its_pretrained_start_is_gone(tmp_path, fmnist_small):
    """last.pt holds every weight: --resume no longer reads model.init_from (it failed once the file was moved)."""
    from lowbit.models import create_model

    torch.manual_seed(5)
    start = tmp_path / "start.pt"
    torch.save(create_model("resnet8", in_channels=1, num_classes=10, width=0.5).state_dict(), start)
    c = cfg(*W2A4, f"model.init_from={start}", epochs=2)
    full = run(c, tmp_path / "full", data=fmnist_small).summary
    _cut_after_first_epoch(c, tmp_path / "cut", fmnist_small)
    start.unlink()
    assert run(c, tmp_path / "cut", resume=True, data=fmnist_small).summary["test_acc"] == full["test_acc"]


def test_a_corrupt_checkpoint_is_refused_by_its_checksum(tmp_path, fmnist_small):
    """torch.load does not check the zip's CRCs: two flipped bytes inside a weight loaded and evaluated 15 points
    lower. Checkpoints now carry a SHA-256 of their numbers."""
    from lowbit.errors import ConfigError
    from lowbit.train import load_checkpoint

    run(cfg(epochs=1), tmp_path / "r", data=fmnist_small)
    p = tmp_path / "r" / "best.pt"
    ck = load_checkpoint(p)  # intact: loads
    assert len(ck["sha256"]) == 64
    w = max(ck["model"].values(), key=lambda t: t.numel()).numpy().tobytes()
    raw = bytearray(p.read_bytes())
    at = raw.find(w[:64])
    assert at > 0
    raw[at + 20] ^= 0x40
    p.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match="do not match the checksum"):
        load_checkpoint(p)


def test_resume_drops_a_metrics_line_cut_short_and_warns_on_other_numerics(tmp_path, fmnist_small):
    """A full disk can leave half a line in metrics.jsonl (--resume failed with a JSONDecodeError); resuming with
    other threads continues but says it will not reproduce the uninterrupted run bit for bit."""
    c = cfg(*W2A4, "train.threads=1", epochs=2)
    _cut_after_first_epoch(c, tmp_path / "cut", fmnist_small)
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_loss": 1.7')
    with pytest.warns(RuntimeWarning, match="threads 1 -> 2"):
        run(cfg(*W2A4, "train.threads=2", epochs=2), tmp_path / "cut", resume=True, data=fmnist_small)
    assert [r["epoch"] for r in rows(tmp_path / "cut")] == [1, 2]


def test_a_checkpoint_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    from lowbit.errors import LowbitError
    from lowbit.train import _save

    def full_disk(obj, f):
        open(f, "wb").write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1024 vs 980")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(LowbitError, match="last.pt: could not be written .*is the disk full"):
        _save(tmp_path / "last.pt", {"model": {}, "epoch": 0})
    assert not (tmp_path / "last.tmp").exists() and not (tmp_path / "last.pt").exists()


def test_option_combinations_session25(tmp_path):
    """Session 25 (a researcher combining training options): model.init_from a NITI run loaded its never-trained
    latent weights (9.0 % for the run's 49.5 %); train.distill with method local changed only the classifier; a
    teacher trained on another dataset was accepted; DCQ with multistep milestones beyond its own epochs was refused
    after every section had trained. Each is now refused up front."""
    import lowbit
    from lowbit.cli import main
    from lowbit.errors import ConfigError

    niti = tmp_path / "niti"
    assert main(["train", "configs/niti_lenet5.yaml", "data.limit=256", "train.epochs=1", "train.progress=false",
                 "train.threads=1", "--out", str(niti)]) == 0
    base = ["configs/fp32.yaml", "model.name=lenet5", "model.batch_norm=false", "model.bias=false",
            "data.limit=256", "train.epochs=1", "train.progress=false", "train.threads=1"]
    with pytest.raises(ConfigError, match="a NITI run trains its integer weights, not the latent ones"):
        lowbit.run(lowbit.load_config(base[0], overrides=base[1:] + [f"model.init_from={niti}"]), tmp_path / "a")
    with pytest.raises(ConfigError, match="a NITI run's checkpoint, whose latent weights were never trained"):
        lowbit.load_weights(lowbit.create_model("lenet5", in_channels=1, num_classes=10, image_size=28,
                                                batch_norm=False, bias=False), niti / "best.pt")
    r = lowbit.run(lowbit.load_config(base[0], overrides=base[1:] + [f"model.init_from={niti}",
                                                                      "model.init_weights=quantized"]), tmp_path / "b")
    assert r.summary["test_acc"] > 0.2  # the NITI run's integer weights (chance is 0.1)
    with pytest.raises(ConfigError, match="distill: method 'local' trains on its own error signals"):
        lowbit.run(lowbit.load_config("configs/local_w3a3.yaml", overrides=[
            "data.limit=256", "train.epochs=1", "train.progress=false", f"train.distill.teacher={tmp_path / 'b'}"]),
            tmp_path / "c")
    with pytest.raises(ConfigError, match="was trained on fashion-mnist, this run trains on digits"):
        lowbit.run(lowbit.load_config(base[0], overrides=base[1:] + [
            "data.name=digits", "model.name=resnet8", f"train.distill.teacher={tmp_path / 'b'}"]), tmp_path / "d")
    # SINAREQ's finetune_epochs beyond the run: refused before the run folder is written (it was refused at the
    # method's setup, leaving a folder that then blocked the same --out)
    assert main(["train", "configs/sinareq_dorefa.yaml", "data.limit=64", "train.epochs=1", "--out",
                 str(tmp_path / "sf")]) == 2
    assert not (tmp_path / "sf").exists()
    with pytest.raises(ConfigError, match=r"train.milestones: \[2\] not within 1..1 \(dcq.finetune_epochs"):
        lowbit.load_config("configs/dcq_w2_twn.yaml", overrides=[
            "train.epochs=4", "train.schedule=multistep", "train.milestones=[2]", "dcq.epochs=3",
            "dcq.finetune_epochs=2"])


def test_a_saved_run_with_milestones_it_ignored_still_loads(tmp_path):
    """session 26: milestones/gamma without schedule multistep are refused; a run folder written before (where they
    had no effect) still reads, as the run that trained."""
    from lowbit.config import load_config
    from lowbit.errors import ConfigError

    (tmp_path / "config.yaml").write_text("train: {epochs: 3, schedule: cosine, milestones: [1], gamma: 0.5}\n")
    with pytest.raises(ConfigError, match="take effect with schedule multistep"):
        load_config(tmp_path / "config.yaml")
    cfg = load_config(tmp_path / "config.yaml", saved=True)
    assert cfg.train.milestones == [] and cfg.train.schedule == "cosine"


def test_a_saved_adam_run_with_the_momentum_it_ignored_still_loads(tmp_path):
    """session 29: train.momentum other than 0.9 with optimizer adam is refused; a run folder written before (adam
    ignored it) still reads, as the run that trained: `lowbit eval`, export and --resume of it said "train.momentum is
    SGD's (got 0.5 with optimizer adam ...)"."""
    from lowbit.config import load_config
    from lowbit.errors import ConfigError

    (tmp_path / "config.yaml").write_text("train: {epochs: 3, optimizer: adam, lr: 0.01, momentum: 0.5}\n")
    with pytest.raises(ConfigError, match="train.momentum is SGD's"):
        load_config(tmp_path / "config.yaml")
    cfg = load_config(tmp_path / "config.yaml", saved=True)
    assert cfg.train.optimizer == "adam" and cfg.train.momentum == 0.9 and cfg.train.lr == 0.01


def test_a_kill_between_the_two_checkpoints_keeps_best_pt_and_its_record_together(tmp_path, fmnist_small,
                                                                                             monkeypatch):
    """Killed between the two checkpoint writes of an epoch that improved validation: best.pt held the killed
    epoch while last.pt recorded the earlier best; a resume whose retrained epoch did not reproduce it bit for bit
    (other threads, another machine, a GPU) kept the killed epoch's weights under the earlier epoch's record."""
    import importlib

    fit_module = importlib.import_module("lowbit.fit")
    train_module = importlib.import_module("lowbit.train")

    val_acc = iter([0.10, 0.20, 0.05, 0.06])  # epochs 1, 2 as trained; then whatever a resume trains again
    real_evaluate, real_save = fit_module.evaluate, train_module._save

    def evaluate(*a, **k):
        return {**real_evaluate(*a, **k), "acc": next(val_acc)}

    saves = []

    def save(path, obj):
        if path.name in ("best.pt", "last.pt"):
            saves.append(path.name)
            if len(saves) == 4:  # epoch 2's second checkpoint: the process dies before writing it
                raise KeyboardInterrupt
        real_save(path, obj)

    monkeypatch.setattr(fit_module, "evaluate", evaluate)
    monkeypatch.setattr(train_module, "_save", save)
    c = cfg(*W2A4, epochs=3)
    with pytest.raises(KeyboardInterrupt):
        run(c, tmp_path / "r", data=fmnist_small)
    monkeypatch.setattr(train_module, "_save", real_save)
    res = run(c, tmp_path / "r", resume=True, data=fmnist_small)
    best = torch.load(tmp_path / "r" / "best.pt", weights_only=False)
    assert best["epoch"] == res.summary["best_epoch"] == 2
    assert res.summary["best_val_acc"] == 0.20


def test_resuming_an_old_order_folder_killed_between_best_and_last_is_refused(tmp_path, fmnist_small,
                                                                                     monkeypatch):
    """Before session 27 best.pt was written before last.pt: a kill between them left best.pt at the killed epoch,
    newer than last.pt, whose record names an earlier best epoch. complete_best only repairs the case where last.pt
    is itself the best epoch; otherwise a resume whose retrained epoch did not improve kept the killed epoch's
    weights in best.pt under the earlier epoch's name and accuracy."""
    import importlib

    from lowbit.errors import ConfigError

    fit_module = importlib.import_module("lowbit.fit")
    train_module = importlib.import_module("lowbit.train")
    val_acc = iter([0.20, 0.10, 0.30, 0.15])  # epochs 1, 2, 3 as trained; then epoch 3 trained again
    real_evaluate, real_save = fit_module.evaluate, train_module._save

    def evaluate(*a, **k):
        return {**real_evaluate(*a, **k), "acc": next(val_acc)}

    saves = []

    def save(path, obj):  # the old order at epoch 3: best.pt written, then killed before last.pt
        if path.name in ("best.pt", "last.pt"):
            saves.append(path.name)
            if len(saves) == 4:
                real_save(path.with_name("best.pt"), {"model": obj["model"], "epoch": 3, "method": obj["method"],
                                                      **({"config": obj["config"]} if "config" in obj else {})})
                raise KeyboardInterrupt
        real_save(path, obj)

    monkeypatch.setattr(fit_module, "evaluate", evaluate)
    monkeypatch.setattr(train_module, "_save", save)
    c = cfg(*W2A4, "train.threads=1", epochs=3)
    with pytest.raises(KeyboardInterrupt):
        run(c, tmp_path / "r", data=fmnist_small)
    monkeypatch.setattr(train_module, "_save", real_save)
    try:
        res = run(c, tmp_path / "r", resume=True, data=fmnist_small)
    except ConfigError as e:  # refused: epoch 1's weights are gone
        assert "best.pt holds epoch 3" in str(e)
        return
    best = torch.load(tmp_path / "r" / "best.pt", weights_only=False)
    assert best["epoch"] == res.summary["best_epoch"]


def test_a_run_gives_the_caller_its_thread_count_back(tmp_path):
    """Session 28: train.threads stayed set after the run: the caller's setting was lost, and a later run in the
    process whose config leaves train.threads unset ("None: all cores") trained with it."""
    from lowbit.data import load_dataset

    data = load_dataset("fashion-mnist", limit=100, val_fraction=0.2, seed=0)
    was = torch.get_num_threads()
    torch.set_num_threads(2)  # the caller's; the run computes with its own train.threads=1
    try:
        run(load_config(None, ["model.name=resnet8", "model.width=0.25", "data.limit=100", "train.epochs=1",
                               "train.batch_size=40", "train.progress=false", "train.threads=1"]),
            tmp_path / "r", data=data)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(was)


def test_a_file_that_cannot_be_read_is_not_called_corrupt(tmp_path, monkeypatch):
    """Session 29: a best.pt the user may not read (another user's run folder on a shared cluster, mode 600) was 'not a
    readable lowbit checkpoint ([Errno 13] Permission denied ...); the file is truncated or corrupt', and so were
    model.init_from's weights; an unreadable CIFAR batch 'is not a CIFAR python batch'."""
    from lowbit.data.cifar import read_batch
    from lowbit.errors import ConfigError, DataError
    from lowbit.pretrained import _read_file
    from lowbit.train import _save, load_checkpoint

    p = tmp_path / "best.pt"
    _save(p, {"model": {}, "epoch": 0})
    batch = tmp_path / "data_batch_1"
    batch.write_bytes(b"x")

    def denied(f, *a, **k):
        raise PermissionError(13, "Permission denied", str(f))

    monkeypatch.setattr(torch, "load", denied)
    monkeypatch.setattr("lowbit.data.cifar.open", denied, raising=False)
    with pytest.raises(ConfigError) as e:
        load_checkpoint(p)
    assert str(e.value) == f"{p}: the checkpoint could not be read (Permission denied)"
    with pytest.raises(ConfigError) as e:
        _read_file(p)
    assert str(e.value) == f"{p}: the weights file could not be read (Permission denied)"
    with pytest.raises(DataError) as e:
        read_batch(batch, "cifar10", "labels")
    assert str(e.value) == f"cifar10: {batch} could not be read (Permission denied)"


def test_a_checkpoint_that_cannot_replace_the_old_one_names_it_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    """Session 29: last.pt immutable (chattr +i) or otherwise not replaceable: the rename failed after torch.save,
    and the error named last.tmp ('lowbit: error: RUN/last.tmp: Operation not permitted'), which stayed in the folder."""
    import os

    from lowbit.errors import LowbitError
    from lowbit.train import _save, load_checkpoint

    _save(tmp_path / "last.pt", {"model": {}, "epoch": 0})

    def immutable(src, dst):
        raise PermissionError(1, "Operation not permitted", str(src), None, str(dst))

    monkeypatch.setattr(os, "replace", immutable)
    with pytest.raises(LowbitError) as e:
        _save(tmp_path / "last.pt", {"model": {}, "epoch": 1})
    assert str(e.value) == f"{tmp_path / 'last.pt'}: could not be replaced by the new checkpoint (Operation not permitted)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 0  # the earlier checkpoint is intact
