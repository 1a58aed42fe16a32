"""Run folders never lose or mix results (issue 19): each problem found as a user, reproduced."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lowbit.bench.runner import check_labels, run_grid
from lowbit.bench.suite import run_suite
from lowbit.cli import main
from lowbit.config import load_config
from lowbit.errors import ConfigError
from lowbit.runfolder import RunFolderBusy, check_fresh, lock_run, new_run_dir
from lowbit.train import run

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SRC = str(Path(__file__).parent.parent / "src")
TINY = {"model": {"name": "resnet8", "width": 0.25}, "data": {"name": "digits", "limit": 200},
        "train": {"epochs": 1, "batch_size": 100, "progress": False, "threads": 1}}


def tiny(**over):
    from lowbit.bench.runner import deep_merge
    from lowbit.config import Config

    return Config.model_validate(deep_merge(TINY, over))


def _env():
    return {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}


def test_two_trains_in_the_same_second_get_two_folders(tmp_path):
    a = new_run_dir(tmp_path, "run", stamp="20260101-000000")
    b = new_run_dir(tmp_path, "run", stamp="20260101-000000")
    assert a != b and a.is_dir() and b.is_dir() and b.name == "run-20260101-000000-2"
    # from two processes at once: every folder handed out once
    code = ("import sys; from lowbit.runfolder import new_run_dir; "
            f"print(new_run_dir({str(tmp_path)!r}, 'p', stamp='S'))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
             for _ in range(3)]
    names = [p.communicate()[0].strip() for p in procs]
    assert len(set(names)) == 3, names


def test_a_folder_in_use_by_another_process_is_refused(tmp_path):
    run_dir = tmp_path / "r"
    code = ("import sys, time; from lowbit.runfolder import lock_run\n"
            f"with lock_run({str(run_dir)!r}):\n    print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=f"pid {holder.pid}"):
            run(tiny(), run_dir)
        assert not (run_dir / "config.yaml").exists()  # nothing written by the refused process
    finally:
        holder.communicate("")
    with lock_run(run_dir):  # the holder is gone: the kernel dropped its lock
        with lock_run(run_dir):  # re-entrant in one process (bench holds it, then run() takes it)
            pass


def test_out_onto_other_files_or_an_earlier_run_is_refused(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_text("precious")
    assert main(["train", str(cfg), "--out", str(mine)]) == 2
    assert "holds files lowbit did not write (holiday.jpg)" in capsys.readouterr().err
    assert (mine / "holiday.jpg").read_text() == "precious" and sorted(p.name for p in mine.iterdir()) == ["holiday.jpg"]
    # a finished run without last.pt (deleted to save space) is not overwritten
    done = tmp_path / "done"
    done.mkdir()
    for f, text in (("config.yaml", tiny().to_yaml()), ("summary.json", "{}"), ("best.pt", "x")):
        (done / f).write_text(text)
    assert main(["train", str(cfg), "--out", str(done)]) == 2
    assert "already holds a run (finished" in capsys.readouterr().err
    assert (done / "summary.json").read_text() == "{}"
    with pytest.raises(ConfigError, match="already holds a run"):
        run(tiny(), done)


def test_an_aborted_start_of_the_same_config_may_start_again(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    (d / "config.yaml").write_text(tiny().to_yaml())
    (d / "metrics.jsonl").write_text("")
    check_fresh(d, tiny().to_yaml())  # same config, no checkpoint: fine
    with pytest.raises(ConfigError, match="without a checkpoint"):
        check_fresh(d, tiny(train={"lr": 0.01}).to_yaml())


def test_labels_differing_only_in_punctuation_are_an_error(tmp_path):
    check_labels(["LSQ 2b", "LSQ 3b", "LSQ.2b"])
    with pytest.raises(ConfigError, match="'LSQ 2b' and 'LSQ/2b' both map to folder 'LSQ_2b'"):
        check_labels(["LSQ 2b", "LSQ/2b"])
    with pytest.raises(ConfigError, match="both map to folder"):
        run_grid({"a b": {}, "a-b": {}, "a:b": {}}, TINY, [0], tmp_path / "out", log=lambda s: None)
    assert not (tmp_path / "out").exists()  # refused before anything was trained


def _suite(tmp_path, lr=0.05, rows=("FP32",)):
    p = tmp_path / "suite.yaml"
    base = {**TINY, "train": {**TINY["train"], "lr": lr}}
    p.write_text(yaml.safe_dump({"name": "s", "base": base, "out": str(tmp_path / "out"), "seeds": [0],
                                 "methods": {r: {} for r in rows}}))
    return p


def test_a_changed_suite_into_an_old_folder_is_an_error_unless_reuse(tmp_path, capsys):
    run_suite(_suite(tmp_path))
    first = json.loads((tmp_path / "out" / "results.jsonl").read_text())
    p = _suite(tmp_path, lr=0.2)
    assert main(["bench", str(p)]) == 2
    err = capsys.readouterr().err
    assert "was trained with another config (train.lr: 0.05 -> 0.2)" in err and "--reuse" in err
    assert main(["bench", str(p), "--reuse"]) == 0  # explicitly: report the old run
    again = json.loads((tmp_path / "out" / "results.jsonl").read_text())
    assert again["test_acc"] == first["test_acc"] and again["config"]["train"]["lr"] == 0.05


def _bench_when(go, suite_path):
    go.wait()
    with open(os.devnull, "w") as null:
        sys.stdout = null
        code = main(["bench", suite_path])
    os._exit(code)


def test_two_bench_processes_on_one_suite_train_each_row_once(tmp_path):
    import multiprocessing as mp

    p = _suite(tmp_path, rows=("A", "B"))
    ctx = mp.get_context("fork")  # two processes, without paying torch's import twice
    go = ctx.Event()
    procs = [ctx.Process(target=_bench_when, args=(go, str(p))) for _ in range(2)]
    for pr in procs:
        pr.start()
    go.set()  # both start together
    for pr in procs:
        pr.join(120)
    assert [pr.exitcode for pr in procs] == [0, 0]
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["row"] for x in lines) == ["A", "B"]  # no duplicate, none interleaved
    for r in "AB":
        metrics = (tmp_path / "out" / r / "seed0" / "metrics.jsonl").read_text().splitlines()
        assert len(metrics) == 1  # one epoch, trained once (a second trainer would append a line)
        assert json.loads(lines[0])["epochs"] == 1


def test_no_validation_split_claims_no_validation_accuracy(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "data": {**TINY["data"], "val_fraction": 0.0}}))
    assert main(["train", str(cfg), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "no validation split" in out and "val 100" not in out
    strict = dict(parse_constant=lambda c: pytest.fail(f"{c} in a JSON file"))
    row = json.loads((tmp_path / "r" / "metrics.jsonl").read_text(), **strict)
    assert row["val_acc"] is None and row["val_loss"] is None
    summary = json.loads((tmp_path / "r" / "summary.json").read_text(), **strict)
    assert summary["best_val_acc"] is None and summary["best_epoch"] == 1
    # a run folder edited after training: one line naming the checkpoint and the config
    c = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    c["model"]["width"] = 0.5
    (tmp_path / "r" / "config.yaml").write_text(yaml.safe_dump(c))
    assert main(["eval", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "best.pt does not fit" in err and "config.yaml" in err and len(err.splitlines()) == 1
    assert load_config(tmp_path / "r" / "config.yaml").model.options["width"] == 0.5


def test_a_start_that_fails_before_writing_leaves_no_empty_folder(tmp_path, capsys):
    """A bad model.init_from fails after the CLI made NAME-STAMP (or --out): before session 24 the folder stayed,
    holding only .lock. A folder that existed before is kept."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "name": "bad", "out_dir": str(tmp_path / "runs"),
                                   "model": {**TINY["model"], "init_from": str(tmp_path / "nowhere.pt")}}))
    for extra in ([], ["--out", str(tmp_path / "o")]):
        assert main(["train", str(cfg), *extra]) != 0
        assert "pretrained weights not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert list((tmp_path / "runs").iterdir()) == []
    (tmp_path / "mine").mkdir()
    assert main(["train", str(cfg), "--out", str(tmp_path / "mine")]) != 0
    assert (tmp_path / "mine").is_dir()


def test_cli_errors_of_the_machine_and_interrupts_are_one_line(tmp_path, capsys, monkeypatch):
    """Session 24: a full disk or a read-only folder printed a traceback; Ctrl-C said 'RUN_DIR' literally, and
    --resume even where no epoch had finished (then it fails)."""
    import errno

    import lowbit.cli as cli

    def no_space(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "r" / "metrics.jsonl"))

    monkeypatch.setattr(cli, "cmd_eval", no_space)
    assert main(["eval", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"lowbit: error: {tmp_path / 'r' / 'metrics.jsonl'}: No space left on device"
    monkeypatch.undo()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(TINY))

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", interrupt, raising=False)
    monkeypatch.setattr("lowbit.train.run", interrupt)
    assert main(["train", str(cfg), "--out", str(tmp_path / "o")]) == 130
    err = capsys.readouterr().err
    assert "holds no finished epoch yet: start the same command again" in err and "RUN_DIR" not in err


def test_a_start_that_died_writing_its_first_checkpoint_can_start_again(tmp_path):
    """best.pt written, last.pt not (the disk filled between the two): the folder was stuck ('--resume': no
    checkpoint; a new start: 'already holds a run (without a checkpoint: best.pt ...)')."""
    c = tiny()
    d = tmp_path / "r"
    d.mkdir()
    for f, text in (("config.yaml", c.to_yaml()), ("plan.txt", ""), ("metrics.jsonl", '{"epoch": 1}\n'),
                    ("best.pt", "x")):
        (d / f).write_text(text)
    check_fresh(d, c.to_yaml())  # may start again
    with pytest.raises(ConfigError, match="already holds a run"):
        check_fresh(d, tiny(train={"epochs": 2}).to_yaml())  # another config: refused


def test_train_into_a_folder_another_process_is_training_says_so(tmp_path):
    """It said 'use --resume D' (check_fresh saw last.pt), and --resume then failed: the folder was busy."""
    run_dir = tmp_path / "r"
    run(tiny(), run_dir)
    (run_dir / "summary.json").unlink()  # an unfinished run, as during training
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from lowbit.runfolder import lock_run\n"
                               f"with lock_run({str(run_dir)!r}):\n    print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=f"a run is training there now \\(lowbit process {holder.pid}\\)"):
            check_fresh(run_dir, tiny().to_yaml())
    finally:
        holder.communicate("")
    with pytest.raises(ConfigError, match="use --resume"):  # nobody holds it now
        check_fresh(run_dir, tiny().to_yaml())


def test_a_start_whose_first_last_pt_could_not_be_written_starts_again(tmp_path, monkeypatch):
    """Session 29: the disk filled while the first epoch's last.pt was written (metrics.jsonl, written before it, held
    that epoch's line, and no checkpoint was there): after freeing space the same command was refused ('already holds
    a run (without a checkpoint ...)'), --resume too ('no checkpoint'), `lowbit bench` stopped at that row, and eval
    said the checkpoints had been deleted or not copied."""
    import torch

    from lowbit.errors import LowbitError

    real = torch.save

    def full_disk(obj, f, *a, **k):
        if Path(f).name == "last.tmp":
            open(f, "wb").write(b"PK")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(LowbitError, match="last.pt: could not be written"):
        run(tiny(), tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [".lock", "config.yaml", "metrics.jsonl", "plan.txt"]
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 1
    from lowbit.train import load_run

    with pytest.raises(ConfigError, match="or the first could not be written \\(a full disk\\), and the same `lowbit "
                                          "train` command starts the run again"):  # it said: deleted, or not copied
        load_run(tmp_path / "r")
    monkeypatch.undo()  # space freed
    with pytest.raises(ConfigError, match="already holds a run"):  # another config is still refused
        check_fresh(tmp_path / "r", tiny(train={"epochs": 2}).to_yaml())
    again = run(tiny(), tmp_path / "r")  # the same run starts again, and gives the uninterrupted run's result
    assert [json.loads(ln)["epoch"] for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()] == [1]
    assert again.summary == run(tiny(), tmp_path / "u").summary
