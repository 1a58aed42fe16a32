"""The CLI: every bad input is one line naming the field and the allowed values; no traceback."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from lowbit.cli import main
from lowbit.config import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
TINY = ["model.name=resnet8", "model.width=0.25", "data.limit=300", "train.epochs=1", "train.batch_size=100",
        "train.progress=false"]


def err_of(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    assert code == 2, out
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowbit: error: "), out.err
    assert "Traceback" not in out.err
    return lines[0]


@pytest.fixture
def config(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"model": {"name": "resnet8"}, "plan": {"weight": {"name": "sawb", "bits": 2}}}))
    return str(p)


@pytest.mark.parametrize("override, expected", [
    ("model.name=resnet7", "model.name: unknown model 'resnet7'; available: "),
    ("model.depth=3", "model 'resnet8' has no option depth; its options: width, activation"),
    ("data.name=imagenet", "data.name: unknown dataset 'imagenet'; available: "),
    ("plan.weight.name=sawbb", "plan.weight: unknown quantizer 'sawbb'; available: "),
    ("plan.weight.bits=9", "plan.weight: quantizer 'sawb' supports bits 1..8, got 9"),
    ("plan.weight={name: bwn, bits: 2}", "plan.weight: quantizer 'bwn' supports bits 1, got 2"),
    ("plan.act={name: pact, bits: 2, alpha: 3}", "plan.act: quantizer 'pact' has no option alpha; its options: init"),
    ("plan.method.name=magic", "plan.method: unknown method 'magic'; available: "),
    ("train.epochs=abc", "config.train.epochs: Input should be a valid integer"),
    ("train.optimizer=rmsprop", "config.train.optimizer: Input should be 'sgd' or 'adam'"),
    ("train.lr=-1", "config.train.lr: Input should be greater than 0"),
    ("train.colour=red", "config.train.colour: unknown field"),
    ("data.val_fraction=0.7", "config.data.val_fraction: Input should be less than 0.5"),
])
def test_bad_values_give_one_line_errors(capsys, config, override, expected):
    assert expected in err_of(capsys, ["info", config, override])


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])  # PYTHONIOENCODING=ascii; LC_ALL=C PYTHONUTF8=0
def test_stdout_that_cannot_encode_plus_minus_gets_an_escape_not_a_traceback(monkeypatch, errors):
    """PYTHONIOENCODING=ascii or latin-1, a latin-1 locale, LC_ALL=C with PYTHONUTF8=0: info of a value-set plan
    ended with a UnicodeEncodeError traceback (status 1) at '{±1}'; lowbit export's 'max |Δlogit|' alike, after
    the export was written (status 1 is also that of a failed exactness check)."""
    import io
    import sys

    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors=errors)
    monkeypatch.setattr(sys, "stdout", out)
    sgt = str(Path(__file__).parent.parent / "configs" / "sgt_w1.yaml")
    assert main(["info", sgt, "data.name=digits", "model.name=resnet8", "model.width=0.25"]) == 0
    assert out.errors == errors  # the caller's stream as it was
    out.flush()
    text = out.buffer.getvalue().decode("ascii")
    assert "value_space: {\\xb11} (searched {\\xb11})" in text.splitlines()


def test_a_run_name_the_locale_cannot_encode_is_one_line(tmp_path):
    """LC_ALL=C with PYTHONUTF8=0 (file names in ascii): a config's name 'modèle' was a UnicodeEncodeError traceback
    from mkdir (status 1)."""
    import os
    import subprocess
    import sys

    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(f"name: modèle\nmodel: {{name: resnet8}}\nout_dir: {tmp_path}\n".encode())
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0"}
    out = subprocess.run([sys.executable, "-m", "lowbit", "train", str(cfg)], capture_output=True, env=env, timeout=120)
    err = out.stderr.decode("ascii", "replace")
    assert out.returncode == 2 and "Traceback" not in err, err
    line = err.splitlines()[-1]
    assert line.startswith("lowbit: error: cannot write '") and "mod\\xe8le-" in line and \
        line.endswith("' in ascii, this locale's encoding: use UTF-8 (PYTHONUTF8=1 or LC_ALL=C.UTF-8) or an ASCII name")


def test_missing_files_give_one_line_errors(capsys, tmp_path, config):
    assert "config file not found: " in err_of(capsys, ["train", str(tmp_path / "nope.yaml")])
    line = err_of(capsys, ["info", config, "data.name=cifar10", f"data.root={tmp_path}"])
    assert "cifar10" in line and str(tmp_path) in line
    assert "no best.pt" in err_of(capsys, ["eval", str(_empty_run(tmp_path))])
    assert "not a run folder" in err_of(capsys, ["eval", str(tmp_path)])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    assert "not valid YAML" in err_of(capsys, ["info", str(bad)])


def test_out_below_a_file_is_refused_before_announcing_a_run_folder(capsys, tmp_path, config):
    """It printed 'run folder: F/sub', then "Not a directory"."""
    (tmp_path / "afile").write_text("x")
    code = main(["train", config, *TINY, "--out", str(tmp_path / "afile" / "sub")])
    out = capsys.readouterr()
    assert code == 2 and "run folder" not in out.out, out
    assert out.err.strip() == (f"lowbit: error: {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file, so no run "
                               "folder can be made below it")


def _empty_run(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "config.yaml").write_text("model: {name: resnet8}\n")
    return d


def test_override_syntax_error(capsys, config):
    assert "must look like key.sub=value" in err_of(capsys, ["info", config, "train.epochs"])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_info_prints_plan_and_cost(capsys, config):
    assert main(["info", config, "data.limit=50"]) == 0
    out = capsys.readouterr().out
    assert "layers.0.0.conv1" in out and "sawb2" in out and "BitOPs" in out and "compression" in out


def test_info_optimizer_memory_follows_the_optimizer_state_torch_keeps(capsys, config):
    """torch.optim.SGD keeps a momentum buffer only at momentum > 0 (Adam two moments)."""
    import re

    mb = {}
    for opt in ("train.momentum=0.9", "train.momentum=0", "train.optimizer=adam"):
        assert main(["info", config, "data.limit=50", opt]) == 0
        line = next(v for v in capsys.readouterr().out.splitlines() if v.startswith("training memory"))
        latent, optim = (float(v) for v in re.search(r"latent params ([\d.]+) MB \+ optimizer ([\d.]+) MB", line).groups())
        mb[opt] = round(optim / latent, 1)
    assert mb == {"train.momentum=0.9": 1.0, "train.momentum=0": 0.0, "train.optimizer=adam": 2.0}


def test_train_then_eval_then_refuse_overwrite(capsys, tmp_path, config):
    run_dir = tmp_path / "run"
    assert main(["train", config, *TINY, "--out", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "model size" in out and "BitOPs" in out
    assert main(["eval", str(run_dir)]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert main(["info", str(run_dir)]) == 0
    assert "packed" in capsys.readouterr().out.lower()
    assert main(["export", str(run_dir), "--format", "packed", "--limit", "50"]) == 0
    assert (run_dir / "export" / "packed" / "model.safetensors").is_file()
    if shutil.which("gcc"):  # the C API under a prefix of the user's (two models in one firmware)
        assert main(["export", str(run_dir), "--format", "c", "--limit", "20", "--c-prefix", "kws",
                     "--out", str(tmp_path / "x")]) == 0
        h = (tmp_path / "x" / "c" / "model.h").read_text()
        assert "void kws_predict(const float *input, float *logits);" in h and "lowbit_predict" not in h
    capsys.readouterr()
    assert "already holds a run" in err_of(capsys, ["train", config, *TINY, "--out", str(run_dir)])


def test_report_figures_of_003(capsys, tmp_path):
    """`lowbit report attention RUN_DIR` (003 Fig. 3) and `lowbit report loss-surface CONFIG` (Fig. 4)."""
    cfg = Path(__file__).parent.parent / "configs" / "dqa_w2_minmax.yaml"
    run_dir = tmp_path / "dqa"
    assert main(["train", str(cfg), *TINY, "--out", str(run_dir)]) == 0
    capsys.readouterr()
    assert main(["report", "attention", str(run_dir), "--out", str(tmp_path / "att.png")]) == 0
    assert (tmp_path / "att.png").stat().st_size > 0
    assert main(["report", "loss-surface", str(cfg), *TINY[:3], "--steps", "3", "--out", str(tmp_path / "ls.png")]) == 0
    assert (tmp_path / "ls.png").stat().st_size > 0
    assert "usage: lowbit report attention" in err_of(capsys, ["report", "attention"])


def test_optional_extras_missing_are_one_line_naming_the_extra(capsys, tmp_path, monkeypatch):
    """A plain `pip install lowbit` has neither matplotlib (the 'plot' extra) nor gymnasium (the 'search' extra):
    `lowbit report` ended in a ModuleNotFoundError traceback (after writing report.md/csv), and ReLeQ's message
    said `pip install -e '.[search]'`, which works only in a checkout of the repository."""
    import json
    import sys

    (tmp_path / "results.jsonl").write_text(json.dumps({"row": "A", "test_acc": 0.5, "size_bytes": 8, "bitops": 1}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    for argv in (["report", str(tmp_path)], ["report", "attention", str(tmp_path)],
                 ["report", "loss-surface", str(tmp_path / "c.yaml")], ["report", "sinreq", str(tmp_path)]):
        assert "the 'plot' extra: pip install 'lowbit[plot]'" in err_of(capsys, argv)
    assert not (tmp_path / "report.md").exists()
    assert main(["report", str(tmp_path), "--no-plots"]) == 0 and (tmp_path / "report.md").is_file()
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "gymnasium", None)
    for name in [m for m in sys.modules if m.startswith("lowbit.search.")]:  # imported again, without gymnasium
        monkeypatch.delitem(sys.modules, name)
    line = err_of(capsys, ["search", "releq", str(tmp_path / "c.yaml")])
    assert "the 'search' extra (gymnasium missing): pip install 'lowbit[search]'" in line and "-e" not in line


def test_eval_json_is_json_and_a_recalibrated_validation_is_labelled(capsys, tmp_path, config):
    """Session 24: `lowbit eval --json` printed the text before the JSON; after train.bn_recalibrate eval showed the
    recalibrated validation accuracy under the training summary's label (another number, the same words)."""
    import json

    run_dir = tmp_path / "run"
    assert main(["train", config, *TINY, "train.bn_recalibrate=2", "data.val_fraction=0.2", "--out", str(run_dir)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--json"]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert "test accuracy" in out.err and summary["test_acc"] == json.loads((run_dir / "summary.json").read_text())["test_acc"]
    trained = json.loads((run_dir / "summary.json").read_text())["best_val_acc"]
    assert summary["best_val_acc"] != trained  # recalibration moved it (5.00 % -> 13.33 % on this tiny run)
    assert f"training picked the epoch at {100 * trained:.2f}% (before train.bn_recalibrate)" in out.err


def test_eval_shows_the_methods_training_facts_not_a_reloaded_methods(capsys, tmp_path):
    """Session 24: after a DQA run `lowbit eval` printed 'Q1 weight at end 0.3362' (a freshly built method's) where
    training had recorded 1.0000, and the schedule 'over the whole training' for 'over 3 batches'."""
    import json

    cfg = str(Path(__file__).parent.parent / "configs" / "dqa_w2_sawb.yaml")
    run_dir = tmp_path / "run"
    assert main(["train", cfg, *TINY, "--out", str(run_dir)]) == 0
    trained = json.loads((run_dir / "summary.json").read_text())["method_info"]
    assert "Q1 weight at end" in trained
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method_info"] == trained


def test_info_shows_the_methods_training_facts_not_a_reloaded_methods(capsys, tmp_path):
    """Session 26: `lowbit info RUN_DIR` printed a freshly built method's 'Q1 weight at end' (0.33, the attention at
    T(0) = 100) and 'over the whole training' where the run's summary.json records 1.0000 and 'over 3 batches'."""
    import json

    cfg = str(Path(__file__).parent.parent / "configs" / "dqa_w2_sawb.yaml")
    run_dir = tmp_path / "run"
    assert main(["train", cfg, *TINY, "--out", str(run_dir)]) == 0
    trained = json.loads((run_dir / "summary.json").read_text())["method_info"]
    capsys.readouterr()
    assert main(["info", str(run_dir)]) == 0
    out = capsys.readouterr().out
    for k, v in trained.items():
        assert f"{k}: {v}\n" in out


def test_a_run_folder_moved_to_another_data_root_is_read_there(capsys, tmp_path):
    """Session 26: `lowbit info RUN data.root=DIR` was refused ("the overrides change that") and a config.yaml whose
    data.root was set to where this machine keeps the data was 'edited after training': a run folder copied to a
    machine with its data elsewhere could not be described or evaluated. data.root is where the data is, not the run."""
    import shutil

    from lowbit.data import FASHION_MNIST_ROOT

    cfg = str(Path(__file__).parent.parent / "configs" / "quickstart.yaml")
    run_dir = tmp_path / "run"
    assert main(["train", cfg, *TINY, "--out", str(run_dir)]) == 0
    moved = tmp_path / "elsewhere"
    shutil.copytree(FASHION_MNIST_ROOT, moved)
    capsys.readouterr()
    assert main(["info", str(run_dir), f"data.root={moved}"]) == 0
    text = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(text.replace("data:\n", f"data:\n  root: {moved}\n", 1)
                                         if "root:" not in text else
                                         "\n".join(f"  root: {moved}" if ln.strip().startswith("root:") else ln
                                                   for ln in text.splitlines()) + "\n")
    assert main(["eval", str(run_dir)]) == 0


def test_version_and_python_m_lowbit():
    """`lowbit --version` and `python -m lowbit` (a package user's entry points; session 27's packaging audit)."""
    import subprocess
    import sys

    import lowbit

    out = subprocess.run([sys.executable, "-m", "lowbit", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"lowbit {lowbit.__version__}"


def test_eval_and_export_of_an_unfinished_run_say_so(tmp_path, config, capsys):
    """A run killed after epoch 1 of 2: eval and export reported its interim best.pt as if the run were done."""
    from lowbit.train import run

    c = load_config(config, TINY[:3] + ["train.epochs=2"] + TINY[4:] + ["data.name=digits"])

    def kill(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(c, tmp_path / "r", callbacks=[kill])
    assert main(["eval", str(tmp_path / "r")]) == 0
    assert "did not finish training (1 epoch(s)" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "r"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unfinished"] is True  # --json: stdout is the JSON alone
    assert main(["export", str(tmp_path / "r"), "--format", "packed"]) == 0
    assert f"lowbit train --resume {tmp_path / 'r'}` continues it" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "r")]) == 0
    assert "did not finish" not in capsys.readouterr().out


def test_a_full_disk_at_the_start_leaves_a_folder_the_same_command_can_use(tmp_path, config, capsys,
                                                                                   monkeypatch):
    """A disk that filled while config.yaml was written: 'lowbit: error: No space left on device' (no file named)
    and an empty config.yaml that refused the same command afterwards ('already holds a run')."""
    real = Path.write_text

    def full(self, text, *a, **k):
        if "config.yaml" in self.name:
            real(self, "")
            raise OSError(28, "No space left on device")
        return real(self, text, *a, **k)

    argv = ["train", config, *TINY, "data.name=digits", "--out", str(tmp_path / "run")]
    monkeypatch.setattr(Path, "write_text", full)
    assert err_of(capsys, argv) == f"lowbit: error: {tmp_path / 'run' / 'config.yaml'}: No space left on device"
    monkeypatch.undo()
    assert main(argv) == 0  # space freed: the same command trains


def test_export_into_a_read_only_or_full_folder_is_one_line(tmp_path, config, capsys, monkeypatch):
    """safetensors raises its own SafetensorError for a read-only folder or a full disk: lowbit export ended in a
    traceback (status 1)."""
    import safetensors
    import safetensors.numpy

    assert main(["train", config, *TINY, "data.name=digits", "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()

    def read_only(tensors, filename, metadata=None):
        raise safetensors.SafetensorError(f"Error while serializing: I/O error: Read-only file system (os error 30) "
                                          f"at path \"{filename}.tmpX\"")

    monkeypatch.setattr(safetensors.numpy, "save_file", read_only)
    line = err_of(capsys, ["export", str(tmp_path / "run"), "--format", "packed"])
    assert "model.safetensors: could not be written (Read-only file system (os error 30))" in line
    monkeypatch.undo()  # session 29: a write that names no file (model.json, onnx.save, the C sources) on a full disk
    real = Path.write_text  # said 'lowbit: error: No space left on device', not where

    def full(self, text, *a, **k):
        if self.name == "model.json":
            raise OSError(28, "No space left on device")
        return real(self, text, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    assert err_of(capsys, ["export", str(tmp_path / "run"), "--format", "packed", "--limit", "10"]) == \
        f"lowbit: error: {tmp_path / 'run' / 'export'}: No space left on device"


def test_a_missing_best_pt_promises_a_resume_only_where_it_writes_one(tmp_path, config, capsys):
    """best.pt deleted from a finished run, or from an unfinished one whose last.pt is not the best epoch: eval said
    `lowbit train --resume` writes it again, and the resume then failed with 'best.pt: no such checkpoint'."""
    from lowbit.train import run

    c = load_config(config, TINY[:3] + ["train.epochs=2"] + TINY[4:] + ["data.name=digits"])
    run(c, tmp_path / "r")
    (tmp_path / "r" / "best.pt").unlink()
    msg = err_of(capsys, ["eval", str(tmp_path / "r")])
    if "writes it again" in msg:  # then the resume must do so
        assert main(["train", "--resume", str(tmp_path / "r")]) == 0


def test_eval_of_a_dcq_run_killed_before_its_fine_tune_says_so(tmp_path, capsys, monkeypatch):
    """A DCQ run killed after stitching (best.pt: the stitched network, epoch 0) before its first fine-tune epoch
    wrote last.pt: eval reported the stitched network as the run's result, with no note (unfinished_note looked
    for last.pt only, which DCQ writes from its first fine-tune epoch on)."""
    import importlib

    from lowbit.train import run

    base = ["model.name=lenet5", "data.name=fashion-mnist", "data.limit=300", "train.batch_size=100", "train.progress=false",
            "train.threads=1", "train.epochs=1"]
    run(load_config(None, base), tmp_path / "teacher")
    c = load_config(None, base + ["plan.weight={name: twn, bits: 2}",
                                  f"dcq={{teacher: {tmp_path / 'teacher'}, sections: 2, epochs: 1, finetune_epochs: 1}}"])
    dcq = importlib.import_module("lowbit.schedules.dcq")

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(dcq, "RunFolder", killed)  # built right before the fine-tune's fit
    with pytest.raises(KeyboardInterrupt):
        run(c, tmp_path / "s")
    monkeypatch.undo()
    assert (tmp_path / "s" / "best.pt").is_file() and not (tmp_path / "s" / "last.pt").exists()
    assert main(["eval", str(tmp_path / "s")]) == 0
    assert "did not finish training" in capsys.readouterr().out


def test_a_closed_output_pipe_is_one_line_with_the_runs_state(tmp_path, capsys, monkeypatch):
    """`lowbit train ... | head -1`: the summary's print met a closed pipe and the finished run ended in
    'lowbit: error: Broken pipe' with status 2 (a file error's form)."""
    import argparse
    import os

    from lowbit import cli

    def func(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(os, "dup2", lambda *a: None)  # pytest's captured stdout stays
    (tmp_path / "summary.json").write_text("{}")
    assert cli._dispatch(argparse.Namespace(func=func, run_folder=tmp_path)) == 141
    assert capsys.readouterr().err.strip() == (f"lowbit: output closed (broken pipe); the run finished: "
                                               f"`lowbit eval {tmp_path}` shows its result")


def _full_at(monkeypatch, names):
    """Path.write_text of a file in ``names`` fails as on a full disk: when flushed, an OSError naming no file."""
    real = Path.write_text

    def full(self, text, *a, **k):
        if self.name in names:
            raise OSError(28, "No space left on device")
        return real(self, text, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)


def test_a_full_disk_names_the_folder_where_the_failed_write_names_no_file(tmp_path, config, capsys, monkeypatch):
    """Session 29: a write that fails when flushed raises an OSError without a file name (Path.write_text of plan.txt,
    a metrics line, the export's model.json, onnx.save, report.md): on a full disk `lowbit train`, `lowbit export` and
    `lowbit report` said 'lowbit: error: No space left on device', not where."""
    _full_at(monkeypatch, {"plan.txt", "report.md"})
    argv = ["train", config, *TINY, "data.name=digits", "--out", str(tmp_path / "run")]
    assert err_of(capsys, argv) == f"lowbit: error: {tmp_path / 'run'}: No space left on device"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.jsonl").write_text('{"row": "A", "seed": 0, "test_acc": 0.5, "size_bytes": 100, '
                                                  '"bitops": 10}\n')
    assert err_of(capsys, ["report", str(tmp_path / "b"), "--no-plots"]) == \
        f"lowbit: error: {tmp_path / 'b'}: No space left on device"
