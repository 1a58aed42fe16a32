"""train.float_warmup_epochs (schedules/warmup.py): FP32 epochs, then the plan, in one run folder."""

import json
import math

import pytest
import yaml

from lowbit.config import load_config
from lowbit.errors import ConfigError
from lowbit.schedules.warmup import stage_configs
from lowbit.train import format_summary, load_run, run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = ["model.name=resnet8", "model.width=0.5", "data.limit=1200", "train.batch_size=64", "train.lr=0.05",
        "train.progress=false", "train.threads=1"]
W2A4 = ["plan.weight={name: sawb, bits: 2}", "plan.act={name: pact, bits: 4, init: 4.0}"]


def cfg(*overrides):
    return load_config(None, BASE + W2A4 + ["train.epochs=3", "train.float_warmup_epochs=1", *overrides])


def rows(run_dir):
    out = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in out:
        r.pop("epoch_time")
    return out


@pytest.fixture(scope="module")
def warm_run(tmp_path_factory, fmnist_small):
    d = tmp_path_factory.mktemp("warm") / "r"
    return d, run(cfg(), d, data=fmnist_small)


def test_one_config_trains_what_two_runs_chained_by_init_from_train(warm_run, tmp_path, fmnist_small):
    d, res = warm_run
    # by hand: an FP32 run of 1 epoch at a constant lr, then the plan for 2 epochs from it, the lr where a 3-epoch
    # cosine is after 1 epoch (0.05·½(1 + cos(π/3)) = 0.0375)
    run(load_config(None, BASE + ["train.epochs=1", "train.schedule=constant"]), tmp_path / "w", data=fmnist_small)
    assert 0.05 * 0.5 * (1 + math.cos(math.pi / 3)) != 0.0375  # the lr is kept to 12 significant digits
    hand = run(load_config(None, BASE + W2A4 + ["train.epochs=2", "train.lr=0.0375", f"model.init_from={tmp_path / 'w'}"]),
               tmp_path / "q", data=fmnist_small)
    assert rows(d / "warmup") == rows(tmp_path / "w")
    assert rows(d) == rows(tmp_path / "q")
    assert res.summary["test_loss"] == hand.summary["test_loss"]
    assert res.summary["test_acc"] == hand.summary["test_acc"]


def test_the_folder_records_the_config_as_given_and_evaluates_like_any_run(warm_run):
    d, res = warm_run
    assert yaml.safe_load((d / "config.yaml").read_text()) == cfg().to_dict()
    warm = json.loads((d / "warmup" / "summary.json").read_text())
    assert warm["weight_bits"] == [] and warm["act_bits"] == []  # the warm-up is FP32
    assert rows(d / "warmup")[0]["lr"] == 0.05  # constant
    s = res.summary
    assert s["weight_bits"] == [2] and s["act_bits"] == [4] and s["float_warmup_epochs"] == 1
    assert len(rows(d)) == 2 and 1 <= s["best_epoch"] <= 2  # the best epoch is a quantized one
    assert "after 1 FP32 warm-up epoch" in format_summary(s)
    _, _, model, _ = load_run(d)  # eval / export read the folder as any run's
    from lowbit.quantize import quant_state

    assert quant_state(model) is not None


@pytest.mark.parametrize("kill_at", [1, 2])  # 1: the warm-up's last epoch (no summary yet); 2: the plan's first
@pytest.mark.parametrize("resume", [True, False])  # --resume, or the same config started again (lowbit bench)
def test_a_cut_run_continues_to_the_uninterrupted_result(warm_run, tmp_path, fmnist_small, kill_at, resume):
    if kill_at == 2 and not resume:  # the plan's stage has a checkpoint: only --resume continues it
        with pytest.raises(ConfigError, match="use --resume"):
            _cut_and_continue(tmp_path, fmnist_small, kill_at, resume)
        return
    res = _cut_and_continue(tmp_path, fmnist_small, kill_at, resume)
    d, full = warm_run
    assert rows(tmp_path / "r") == rows(d) and rows(tmp_path / "r" / "warmup") == rows(d / "warmup")
    assert res.summary["test_loss"] == full.summary["test_loss"]


def _cut_and_continue(tmp_path, data, kill_at, resume):
    calls = []

    def kill(row):
        calls.append(row)
        if len(calls) == kill_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cfg(), tmp_path / "r", data=data, callbacks=[kill])
    if kill_at == 1:
        assert not (tmp_path / "r" / "warmup" / "summary.json").exists()
    if not resume:
        from lowbit.runfolder import check_fresh

        check_fresh(tmp_path / "r", cfg().to_yaml())  # what a new start checks first
    return run(cfg(), tmp_path / "r", resume=resume, data=data)


def test_another_config_does_not_continue_a_cut_warm_up(tmp_path, fmnist_small):
    from lowbit.runfolder import check_fresh

    def kill(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cfg(), tmp_path / "r", data=fmnist_small, callbacks=[kill])
    with pytest.raises(ConfigError, match=r"still in its FP32 warm-up \(warmup/\); `lowbit train --resume"):
        load_run(tmp_path / "r")  # eval / export of a folder still warming up
    with pytest.raises(ConfigError, match="already holds a run"):
        check_fresh(tmp_path / "r", cfg("train.seed=1").to_yaml())


def test_a_warm_up_that_cannot_start_leaves_no_folder(tmp_path, fmnist_small):
    with pytest.raises(ConfigError, match="pretrained weights|init_from"):
        run(cfg(f"model.init_from={tmp_path / 'missing.pt'}"), tmp_path / "r", data=fmnist_small)
    from lowbit.runfolder import discard_if_unused

    assert discard_if_unused(tmp_path / "r")  # what the CLI does with a folder it made: only the lock was left
    # a plan that cannot apply to the model fails before the warm-up trains, and leaves nothing either
    with pytest.raises(ConfigError, match="nope"):
        run(cfg("plan.layers={nope: fp}"), tmp_path / "p", data=fmnist_small)
    assert not (tmp_path / "p" / "warmup").exists() and discard_if_unused(tmp_path / "p")


@pytest.mark.parametrize("overrides,msg", [
    (["train.float_warmup_epochs=3"], r"float_warmup_epochs \(3\) must be less than epochs \(3\)"),
    (["train.schedule=multistep"], "the multistep schedule cannot go on after the warm-up"),
    (["train.freeze_bn_after=1"], r"freeze_bn_after \(1\) must be more than float_warmup_epochs \(1\)"),
    (["train.float_warmup_epochs=-1"], "float_warmup_epochs"),
    (["dcq={teacher: t.pt}"], "does not combine with dcq"),
])
def test_bad_warm_up_configs_are_one_line_errors(overrides, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        cfg(*overrides)
    assert "\n" not in str(e.value)


def test_stage_configs_keep_the_plan_for_the_second_stage_only(tmp_path):
    c = cfg("train.freeze_bn_after=2.5", "train.bn_recalibrate=3", "plan.layers={layer1.0.conv1: fp}")
    warm, main = stage_configs(c, tmp_path)
    assert warm.plan.weight is None and warm.plan.act is None and warm.plan.layers == {}
    assert (warm.train.epochs, warm.train.schedule, warm.train.lr) == (1, "constant", 0.05)
    assert warm.train.freeze_bn_after is None and warm.train.bn_recalibrate == 0
    assert main.plan == c.plan and main.train.epochs == 2 and main.train.freeze_bn_after == 1.5
    assert main.train.bn_recalibrate == 3 and main.model.init_from == str(tmp_path / "warmup")
    assert stage_configs(cfg("train.schedule=constant"), tmp_path)[1].train.lr == 0.05
