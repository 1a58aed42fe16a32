"""Every malformed input is one line naming the field or file and what is allowed, exit status 2,
no traceback, never silent acceptance (issue 19). A table of bad inputs across the CLI's arguments,
YAML configs, overrides, data files, run folders and suites, run in-process through
``lowbit.cli.main``; a few through a real subprocess to prove the exit status and the absence of
a traceback; and ``lowbit --help`` without importing torch."""

import contextlib
import gzip
import io
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lowbit.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SRC = str(Path(__file__).parent.parent / "src")
OK = "model: {name: resnet8, width: 0.25}\ndata: {name: digits, limit: 100}\ntrain: {epochs: 1, progress: false}\n"
Q = OK + "plan: {weight: {name: sawb, bits: 2}}\n"
SUITE = {"name": "s", "base": yaml.safe_load(OK), "methods": {"FP32": {}}, "seeds": [0]}


def suite(**patch):
    return yaml.safe_dump({**SUITE, **patch})


def _idx(ndim_dims, data=b"", magic=None):
    dims = ndim_dims
    head = struct.pack(">HBB", 0, 0x08, len(dims)) if magic is None else magic
    return head + b"".join(struct.pack(">I", d) for d in dims) + data


GOOD_IDX = {"train-images-idx3-ubyte": _idx((2, 28, 28), bytes(2 * 784)),
            "train-labels-idx1-ubyte": _idx((2,), bytes([1, 2])),
            "t10k-images-idx3-ubyte": _idx((2, 28, 28), bytes(2 * 784)),
            "t10k-labels-idx1-ubyte": _idx((2,), bytes([3, 4]))}


def idx_with(**over):
    files = {f"data/{k}": v for k, v in GOOD_IDX.items()}
    files.update({f"data/{k.replace('_', '-')}": v for k, v in over.items()})
    return files


def fm(*extra):  # a config on the IDX files in {d}/data
    return ["info", "{d}/c.yaml", "data.name=fashion-mnist", "data.root={d}/data", "data.limit=null", *extra]


# (id, files to write under {d}, argv, expected text in the one error line)
# files: name -> str | bytes; "{run}" in argv is a copy of a finished tiny run folder
CASES = [
    # --- command line: arguments ------------------------------------------------------------------
    ("no-command", {}, [], "required: command"),
    ("unknown-command", {}, ["frobnicate"], "invalid choice: 'frobnicate'"),
    ("train-no-config", {}, ["train"], "train needs a CONFIG file"),
    ("train-resume-and-config", {"c.yaml": OK}, ["train", "{d}/c.yaml", "--resume", "{run}"], "--resume takes the config"),
    ("train-out-missing-value", {}, ["train", "x.yaml", "--out"], "argument --out: expected one argument"),
    ("train-unknown-flag", {}, ["train", "x.yaml", "--epochs", "3"], "unrecognized arguments: --epochs 3"),
    ("bench-workers-0", {"s.yaml": suite()}, ["bench", "{d}/s.yaml", "--workers", "0"], "argument --workers: must be an integer >= 1, got 0"),
    ("bench-workers-neg", {"s.yaml": suite()}, ["bench", "{d}/s.yaml", "--workers", "-2"], "argument --workers: must be an integer >= 1"),
    ("bench-workers-text", {"s.yaml": suite()}, ["bench", "{d}/s.yaml", "--workers", "many"], "'many' is not an integer"),
    ("bench-backend", {"s.yaml": suite()}, ["bench", "{d}/s.yaml", "--backend", "slurm"], "argument --backend: invalid choice"),
    ("export-limit-0", {}, ["export", "{run}", "--limit", "0"], "argument --limit: must be an integer >= 1, got 0"),
    ("export-limit-neg", {}, ["export", "{run}", "--limit", "-5"], "argument --limit: must be an integer >= 1"),
    ("export-c-images-0", {}, ["export", "{run}", "--c-images", "0"], "argument --c-images: must be an integer >= 1"),
    ("export-c-images-neg", {}, ["export", "{run}", "--c-images", "-1"], "argument --c-images"),
    ("export-limit-float", {}, ["export", "{run}", "--limit", "2.5"], "'2.5' is not an integer"),
    ("export-format", {}, ["export", "{run}", "--format", "tflite"], "tflite"),
    ("export-c-prefix", {}, ["export", "{run}", "--format", "c", "--c-prefix", "lb_net"], "C prefix 'lb_net': give a C identifier"),
    ("budget-ratio-0", {}, ["budget", "--ratio", "0"], "argument --ratio: must be a finite number > 0, got 0"),
    ("budget-ratio-neg", {}, ["budget", "--ratio", "-8"], "argument --ratio: must be a finite number > 0"),
    ("budget-ratio-nan", {}, ["budget", "--ratio", "nan"], "argument --ratio: must be a finite number > 0, got nan"),
    ("budget-ratio-inf", {}, ["budget", "--ratio", "inf"], "argument --ratio: must be a finite number > 0, got inf"),
    ("budget-kib-0", {}, ["budget", "--budget-kib", "0"], "argument --budget-kib: must be a finite number > 0"),
    # before session 23 9 and 16 bits were priced and emitted into a suite that bench then refused
    ("budget-bits-9", {}, ["budget", "--bits", "2", "9"], "argument --bits: must be 1..8 bits"),
    # before session 23 init_weights without init_from was accepted and ignored
    ("init-weights-alone", {"c.yaml": OK}, ["info", "{d}/c.yaml", "model.init_weights=quantized"],
     "init_weights: 'quantized' takes effect with init_from"),
    ("budget-kib-nan", {}, ["budget", "--budget-kib", "NaN"], "argument --budget-kib: must be a finite number > 0"),
    ("budget-kib-neg-inf", {}, ["budget", "--budget-kib", "-inf"], "argument --budget-kib"),
    ("budget-none", {}, ["budget"], "one of the arguments --ratio --budget-kib is required"),
    ("budget-both", {}, ["budget", "--ratio", "8", "--budget-kib", "10"], "not allowed with argument"),
    ("budget-epochs-0", {}, ["budget", "--ratio", "8", "--epochs", "0"], "argument --epochs: must be an integer >= 1"),
    ("budget-seeds-neg", {}, ["budget", "--ratio", "8", "--seeds", "-1"], "argument --seeds: must be an integer >= 0"),
    ("budget-limit-0", {}, ["budget", "--ratio", "8", "--limit", "0"], "argument --limit: must be an integer >= 1"),
    ("budget-bits-0", {}, ["budget", "--ratio", "8", "--bits", "0"], "argument --bits: must be an integer >= 1"),
    ("budget-bits-33", {}, ["budget", "--ratio", "8", "--bits", "33", "--dataset", "digits", "--model", "resnet8"], "bits"),
    ("budget-model", {}, ["budget", "--ratio", "8", "--model", "resnet7", "--dataset", "digits"], "unknown model 'resnet7'"),
    ("budget-dataset", {}, ["budget", "--ratio", "8", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    ("report-steps-0", {}, ["report", "loss-surface", "{d}/c.yaml", "--steps", "0"], "argument --steps: must be an integer >= 1"),
    ("report-span-nan", {}, ["report", "loss-surface", "{d}/c.yaml", "--span", "nan"], "argument --span: must be a finite number > 0"),
    ("report-span-0", {}, ["report", "loss-surface", "{d}/c.yaml", "--span", "0"], "argument --span"),
    ("report-no-results", {}, ["report", "{d}"], "no results file"),
    ("report-attention-no-run", {}, ["report", "attention"], "usage: lowbit report attention RUN_DIR"),
    ("report-bad-jsonl", {"r/results.jsonl": "{not json\n"}, ["report", "{d}/r"], "results.jsonl:1: not a JSON line"),
    ("report-empty-jsonl", {"r/results.jsonl": "\n"}, ["report", "{d}/r"], "holds no runs"),
    ("report-foreign-jsonl", {"r/results.jsonl": '{"a": 1}\n'}, ["report", "{d}/r"], "is this a lowbit results file"),
    ("report-two-no-out", {"a/results.jsonl": "", "b/results.jsonl": ""}, ["report", "{d}/a", "{d}/b"], "--out"),
    # --- YAML config files ------------------------------------------------------------------------
    ("config-missing", {}, ["info", "{d}/nope.yaml"], "config file not found"),
    ("config-empty", {"c.yaml": ""}, ["info", "{d}/c.yaml"], "c.yaml: the file is empty"),
    ("config-only-comments", {"c.yaml": "# nothing\n"}, ["info", "{d}/c.yaml"], "c.yaml: the file is empty"),
    ("config-not-utf8", {"c.yaml": b"name: \xff\xfe run\n"}, ["info", "{d}/c.yaml"], "c.yaml: not UTF-8 text"),
    ("config-binary", {"c.yaml": bytes(range(256))}, ["info", "{d}/c.yaml"], "c.yaml"),
    ("config-bad-yaml", {"c.yaml": "model: {name: resnet8\n"}, ["info", "{d}/c.yaml"], "not valid YAML"),
    ("config-tab", {"c.yaml": "model:\n\tname: resnet8\n"}, ["info", "{d}/c.yaml"], "not valid YAML"),
    ("config-list", {"c.yaml": "- a\n- b\n"}, ["info", "{d}/c.yaml"], "the top level must be a mapping"),
    ("config-scalar", {"c.yaml": "42\n"}, ["info", "{d}/c.yaml"], "the top level must be a mapping"),
    ("config-directory", {"cdir/x": ""}, ["info", "{d}/cdir"], "is not a run folder (no config.yaml)"),
    ("config-unknown-top", {"c.yaml": OK + "trian: {epochs: 2}\n"}, ["info", "{d}/c.yaml"], "config.trian: unknown field"),
    ("config-model-list", {"c.yaml": "model: [resnet8]\n"}, ["info", "{d}/c.yaml"], "config.model"),
    ("lr-nan", {"c.yaml": OK.replace("epochs: 1", "epochs: 1, lr: .nan")}, ["info", "{d}/c.yaml"],  # not a 2nd train:
     "train.lr: nan is not a finite number"),
    ("lr-inf", {"c.yaml": OK.replace("epochs: 1", "epochs: 1, lr: .inf")}, ["info", "{d}/c.yaml"], "train.lr: inf is not a finite number"),
    ("momentum-nan", {"c.yaml": OK.replace("epochs: 1", "epochs: 1, momentum: .nan")}, ["info", "{d}/c.yaml"], "train.momentum: nan"),
    ("wd-neg-inf", {"c.yaml": OK.replace("epochs: 1", "epochs: 1, weight_decay: -.inf")}, ["info", "{d}/c.yaml"], "train.weight_decay: -inf"),
    ("gamma-nan", {"c.yaml": OK.replace("epochs: 1", "epochs: 1, gamma: .nan")}, ["info", "{d}/c.yaml"], "train.gamma: nan"),
    ("val-fraction-nan", {"c.yaml": OK.replace("limit: 100", "limit: 100, val_fraction: .nan")}, ["info", "{d}/c.yaml"], "data.val_fraction: nan"),
    ("width-nan", {"c.yaml": OK.replace("width: 0.25", "width: .nan")}, ["info", "{d}/c.yaml"], "model.width: nan"),
    ("pact-init-nan", {"c.yaml": OK + "plan: {act: {name: pact, bits: 2, init: .nan}}\n"}, ["info", "{d}/c.yaml"], "plan.act.init: nan"),
    ("method-option-inf", {"c.yaml": OK + "plan: {weight: {name: sawb, bits: 2}, method: {name: dqa, lam: .inf}}\n"}, ["info", "{d}/c.yaml"], "plan.method.lam: inf"),
    ("epochs-0", {"c.yaml": OK.replace("epochs: 1", "epochs: 0")}, ["info", "{d}/c.yaml"], "config.train.epochs: Input should be greater than or equal to 1"),
    ("epochs-float", {"c.yaml": OK.replace("epochs: 1", "epochs: 1.5")}, ["info", "{d}/c.yaml"], "config.train.epochs"),
    ("batch-0", {"c.yaml": OK.replace("epochs: 1", "epochs: 1, batch_size: 0")}, ["info", "{d}/c.yaml"], "config.train.batch_size"),
    ("eval-batch-neg", {"c.yaml": OK.replace("epochs: 1", "epochs: 1, eval_batch_size: -1")}, ["info", "{d}/c.yaml"], "config.train.eval_batch_size"),
    ("threads-0", {"c.yaml": OK.replace("epochs: 1", "epochs: 1, threads: 0")}, ["info", "{d}/c.yaml"], "config.train.threads"),
    ("seed-neg", {"c.yaml": OK.replace("epochs: 1", "epochs: 1, seed: -1")}, ["info", "{d}/c.yaml"], "config.train.seed: Input should be greater than or equal to 0"),
    ("device-tpu", {"c.yaml": OK.replace("epochs: 1", "epochs: 1, device: tpu")}, ["info", "{d}/c.yaml"], "config.train.device"),
    ("schedule", {"c.yaml": OK.replace("epochs: 1", "epochs: 1, schedule: linear")}, ["info", "{d}/c.yaml"], "config.train.schedule"),
    ("val-fraction-neg", {"c.yaml": OK.replace("limit: 100", "limit: 100, val_fraction: -0.1")}, ["info", "{d}/c.yaml"], "config.data.val_fraction"),
    ("limit-0", {"c.yaml": OK.replace("limit: 100", "limit: 0")}, ["info", "{d}/c.yaml"], "config.data.limit"),
    ("augment-text", {"c.yaml": OK.replace("limit: 100", "limit: 100, augment: maybe")}, ["info", "{d}/c.yaml"], "config.data.augment"),
    ("width-0", {"c.yaml": OK.replace("width: 0.25", "width: 0")}, ["info", "{d}/c.yaml"], "width"),
    ("width-neg", {"c.yaml": OK.replace("width: 0.25", "width: -1")}, ["info", "{d}/c.yaml"], "width"),
    ("name-slash", {"c.yaml": "name: a/b\n" + OK}, ["train", "{d}/c.yaml"], "name 'a/b': the run folder is out_dir/NAME-TIME, so name must be a folder name without '/'"),
    ("width-huge", {"c.yaml": OK.replace("width: 0.25", "width: 10000")}, ["info", "{d}/c.yaml"], "model resnet8 (width=10000): not enough memory to build it (one tensor of 921,600,000,000 bytes)"),
    ("activation", {"c.yaml": OK.replace("width: 0.25", "width: 0.25, activation: gelu")}, ["info", "{d}/c.yaml"], "activation"),
    ("bits-0", {"c.yaml": OK + "plan: {weight: {name: sawb, bits: 0}}\n"}, ["info", "{d}/c.yaml"], "plan.weight: quantizer 'sawb' supports bits 1..8, got 0"),
    ("bits-text", {"c.yaml": OK + "plan: {weight: {name: sawb, bits: two}}\n"}, ["info", "{d}/c.yaml"], "config.plan.weight.bits"),
    ("weight-no-name", {"c.yaml": OK + "plan: {weight: {bits: 2}}\n"}, ["info", "{d}/c.yaml"], "config.plan.weight.name"),
    ("act-weight-only", {"c.yaml": OK + "plan: {act: {name: sawb, bits: 2}}\n"}, ["info", "{d}/c.yaml"], "plan.act"),
    ("sign-after-relu", {"c.yaml": OK + "plan: {weight: {name: bnn, bits: 1}, act: {name: bnn, bits: 1}}\n"}, ["info", "{d}/c.yaml"], "plan.act: 'bnn' takes sign(x), but model 'resnet8' has activation relu"),
    ("init-from-missing", {"c.yaml": OK.replace("width: 0.25", "width: 0.25, init_from: nowhere.pt")}, ["train", "{d}/c.yaml", "--out", "{d}/o"], "pretrained weights not found: nowhere.pt"),
    ("init-from-corrupt", {"c.yaml": OK.replace("width: 0.25", "width: 0.25, init_from: '{d}/w.pt'"), "w.pt": b"PK\x03\x04garbage"}, ["train", "{d}/c.yaml", "--out", "{d}/o"], "not a readable PyTorch weights file"),
    ("distill-alpha", {"c.yaml": OK.replace("epochs: 1", "epochs: 1, distill: {teacher: t, alpha: 2}")}, ["info", "{d}/c.yaml"], "config.train.distill.alpha"),
    ("milestones", {"c.yaml": OK.replace("epochs: 1", "epochs: 2, schedule: multistep, milestones: [5]")}, ["train", "{d}/c.yaml", "--out", "{d}/o"], "train.milestones: [5] not within 1..1"),
    ("milestones-one-epoch", {"c.yaml": OK.replace("epochs: 1", "epochs: 1, schedule: multistep, milestones: [1]")},
     ["train", "{d}/c.yaml", "--out", "{d}/o"], "train.epochs is 1: there is no epoch boundary for a milestone"),
    # --- overrides ----------------------------------------------------------------------------------
    ("override-no-equals", {"c.yaml": OK}, ["info", "{d}/c.yaml", "train.epochs"], "override 'train.epochs' must look like key.sub=value"),
    ("override-empty-key", {"c.yaml": OK}, ["info", "{d}/c.yaml", "=3"], "bad key"),
    ("override-double-dot", {"c.yaml": OK}, ["info", "{d}/c.yaml", "train..lr=1"], "bad key 'train..lr'"),
    ("override-not-section", {"c.yaml": OK}, ["info", "{d}/c.yaml", "train.lr.x=1"], "config.train.lr"),
    ("override-section-scalar", {"c.yaml": OK}, ["info", "{d}/c.yaml", "train=3"], "config.train"),
    ("override-unknown", {"c.yaml": OK}, ["info", "{d}/c.yaml", "train.colour=red"], "config.train.colour: unknown field"),
    ("override-nan", {"c.yaml": OK}, ["info", "{d}/c.yaml", "train.lr=.nan"], "train.lr: nan is not a finite number"),
    ("override-inf-momentum", {"c.yaml": OK}, ["info", "{d}/c.yaml", "train.momentum=-.inf"], "train.momentum"),
    ("layer-bits", {"c.yaml": Q}, ["info", "{d}/c.yaml", "plan.layers={layers.0.0.conv1: {weight: {bits: 99}}}"], "plan.layers.layers.0.0.conv1"),
    ("layer-quantizer", {"c.yaml": Q}, ["info", "{d}/c.yaml", "plan.layers={fc: {weight: {name: nope}}}"], "plan.layers.fc"),
    ("layer-unknown-name", {"c.yaml": Q}, ["info", "{d}/c.yaml", "plan.layers={nolayer: {weight: {bits: 4}}}"], "nolayer"),
    ("layer-option", {"c.yaml": Q}, ["info", "{d}/c.yaml", "plan.layers={fc: {weight: {bits: 4, colour: red}}}"], "plan.layers.fc"),
    ("layer-nan", {"c.yaml": Q}, ["info", "{d}/c.yaml", "plan.layers={fc: {act: {name: pact, bits: 2, init: .nan}}}"], "plan.layers.fc.act.init: nan"),
    ("layer-bad-value", {"c.yaml": Q}, ["info", "{d}/c.yaml", "plan.layers={fc: 3}"], "plan.layers.fc"),
    ("channels-bad", {"c.yaml": OK}, ["info", "{d}/c.yaml", "model.channels={conv1: -3}"], "model.channels"),
    ("model-option", {"c.yaml": OK}, ["info", "{d}/c.yaml", "model.depth=3"], "model 'resnet8' has no option depth"),
    ("method-option", {"c.yaml": Q}, ["info", "{d}/c.yaml", "plan.method={name: ste, speed: 3}"], "plan.method"),
    ("dataset-name", {"c.yaml": OK}, ["info", "{d}/c.yaml", "data.name=imagenet"], "data.name: unknown dataset 'imagenet'"),
    # --- data files ---------------------------------------------------------------------------------
    ("data-root-missing", {"c.yaml": OK}, fm("data.root={d}/nowhere"), "nowhere"),
    ("idx-truncated-header", {"c.yaml": OK, **idx_with(train_images_idx3_ubyte=b"\x00\x00")}, fm(), "train-images-idx3-ubyte"),
    ("idx-truncated-body", {"c.yaml": OK, **idx_with(train_images_idx3_ubyte=_idx((2, 28, 28), bytes(100)))}, fm(), "train-images-idx3-ubyte"),
    ("idx-bad-magic", {"c.yaml": OK, **idx_with(train_labels_idx1_ubyte=b"\x12\x34\x08\x01" + struct.pack(">I", 2) + b"\x01\x02")}, fm(), "train-labels-idx1-ubyte"),
    ("idx-labels-range", {"c.yaml": OK, **idx_with(t10k_labels_idx1_ubyte=_idx((2,), bytes([3, 200])))}, fm(), "labels"),
    ("idx-count-mismatch", {"c.yaml": OK, **idx_with(train_labels_idx1_ubyte=_idx((3,), bytes([1, 2, 3])))}, fm(), "train"),
    ("idx-empty-file", {"c.yaml": OK, **idx_with(t10k_images_idx3_ubyte=b"")}, fm(), "t10k-images-idx3-ubyte"),
    ("idx-gz-corrupt", {"c.yaml": OK, **{f"data/{k}": v for k, v in GOOD_IDX.items() if k != "t10k-labels-idx1-ubyte"},
                        "data/t10k-labels-idx1-ubyte.gz": b"\x1f\x8b\x08\x00garbage"}, fm(), "t10k-labels-idx1-ubyte.gz"),
    ("idx-gz-truncated", {"c.yaml": OK, **{f"data/{k}": v for k, v in GOOD_IDX.items() if k != "t10k-labels-idx1-ubyte"},
                          "data/t10k-labels-idx1-ubyte.gz": gzip.compress(GOOD_IDX["t10k-labels-idx1-ubyte"])[:-9]}, fm(), "t10k-labels-idx1-ubyte.gz"),
    ("cifar-no-root", {"c.yaml": OK}, ["info", "{d}/c.yaml", "data.name=cifar10"], "cifar10"),
    ("cifar-corrupt", {"c.yaml": OK, "cf/cifar-10-batches-py/data_batch_1": b"not a pickle"},
     ["info", "{d}/c.yaml", "data.name=cifar10", "data.root={d}/cf"], "cifar"),
    ("svhn-corrupt", {"c.yaml": OK, "sv/train_32x32.mat": b"MATLAB garbage", "sv/test_32x32.mat": b"x"},
     ["info", "{d}/c.yaml", "data.name=svhn", "data.root={d}/sv"], "svhn"),
    # --- run folders --------------------------------------------------------------------------------
    ("eval-missing", {}, ["eval", "{d}/nowhere"], "is not a run folder (no config.yaml)"),
    ("eval-not-run", {"x/a.txt": "hi"}, ["eval", "{d}/x"], "is not a run folder (no config.yaml)"),
    ("eval-no-best", {"x/config.yaml": OK}, ["eval", "{d}/x"], "has no best.pt checkpoint (the run did not finish an epoch)"),
    ("eval-checkpoints-not-copied", {"x/config.yaml": OK, "x/metrics.jsonl": '{"epoch": 1}\n{"epoch": 2}\n'}, ["eval", "{d}/x"],
     "metrics.jsonl records 2 finished epoch(s), but the checkpoints are not in the folder"),
    ("eval-corrupt-best", {"run/best.pt": b"garbage"}, ["eval", "{run}"], "best.pt: not a readable lowbit checkpoint"),
    ("eval-truncated-best", {"run/best.pt": "TRUNCATE"}, ["eval", "{run}"], "best.pt: not a readable lowbit checkpoint"),
    ("eval-foreign-best", {"run/best.pt": "TENSOR"}, ["eval", "{run}"], "best.pt: not a lowbit checkpoint"),
    ("eval-config-edited", {"run/config.yaml": "EDIT model.width=0.5"}, ["eval", "{run}"], "best.pt does not fit"),
    ("eval-config-not-utf8", {"run/config.yaml": b"\xff\xfe"}, ["eval", "{run}"], "config.yaml: not UTF-8 text"),
    ("eval-config-empty", {"run/config.yaml": ""}, ["eval", "{run}"], "config.yaml: the file is empty"),
    ("info-run-config-edited", {"run/config.yaml": "EDIT plan.weight.bits=4"}, ["info", "{run}"], "the config was edited after training: plan.weight.bits: 2 -> 4"),
    # an edit that no longer validates: what it changed comes first, then why it is invalid
    ("eval-config-edited-invalid", {"run/config.yaml": "EDIT plan.integer_residual=output"}, ["eval", "{run}"],
     "config.yaml (the config was edited after training: plan.integer_residual: '<absent>' -> 'output'; as edited: config.plan"),
    ("info-run-config-edited-invalid", {"run/config.yaml": "EDIT plan.integer_residual=output"}, ["info", "{run}"],
     "the config was edited after training: plan.integer_residual: '<absent>' -> 'output'; as edited"),
    # an override on a run folder is not an edit of its config.yaml (it said "the config was edited after training")
    ("info-run-override", {}, ["info", "{run}", "train.batch_size=7"],
     "a run folder is described as it was trained, and the overrides change that (train.batch_size:"),
    ("export-corrupt-best", {"run/best.pt": "TRUNCATE"}, ["export", "{run}", "--format", "packed"], "not a readable lowbit checkpoint"),
    ("export-missing", {}, ["export", "{d}/nowhere"], "nowhere"),
    ("resume-missing", {}, ["train", "--resume", "{d}/nowhere"], "nowhere is not a run folder (no config.yaml)"),
    ("resume-no-last", {"run/last.pt": None}, ["train", "--resume", "{run}"], "cannot resume: no checkpoint"),
    # a finished run whose best.pt was deleted (before session 23: "the run did not finish an epoch", and for
    # --resume "[Errno 2] ...; the file is truncated or corrupt")
    ("eval-best-deleted", {"run/best.pt": None}, ["eval", "{run}"], "best.pt is missing although last.pt is there"),
    ("resume-best-deleted", {"run/best.pt": None}, ["train", "--resume", "{run}"], "best.pt: no such checkpoint"),
    ("resume-corrupt-last", {"run/last.pt": "TRUNCATE"}, ["train", "--resume", "{run}"], "last.pt: not a readable lowbit checkpoint"),
    ("resume-config-edited", {"run/config.yaml": "EDIT model.width=0.5"}, ["train", "--resume", "{run}"], "last.pt does not fit"),
    ("out-onto-file", {"c.yaml": OK, "afile": "x"}, ["train", "{d}/c.yaml", "--out", "{d}/afile"], "is a file, not a run folder"),
    ("out-foreign-files", {"c.yaml": OK, "o/notes.txt": "mine"}, ["train", "{d}/c.yaml", "--out", "{d}/o"], "holds files lowbit did not write (notes.txt)"),
    ("out-finished-run", {"c.yaml": OK}, ["train", "{d}/c.yaml", "--out", "{run}"], "already holds a run (finished"),
    ("out-finished-no-last", {"c.yaml": OK, "run/last.pt": None}, ["train", "{d}/c.yaml", "--out", "{run}"], "already holds a run (finished"),
    # --- suites -------------------------------------------------------------------------------------
    ("suite-missing", {}, ["bench", "{d}/nope.yaml"], "suite file not found"),
    # session 25: a folder given as the suite said "not found"; --out onto a folder of one's own files replaced them
    ("suite-directory", {"sdir/x": ""}, ["bench", "{d}/sdir"], "sdir is a folder; a suite is a YAML file"),
    ("suite-out-foreign", {"s.yaml": suite(), "o/summary.md": "my notes"}, ["bench", "{d}/s.yaml", "--out", "{d}/o"], "/o holds files no lowbit bench wrote (summary.md): choose another folder"),
    ("suite-out-file", {"s.yaml": suite(), "afile": "x"}, ["bench", "{d}/s.yaml", "--dry-run", "--out", "{d}/afile"], "is a file, not a folder"),
    ("suite-base-no-bits", {"s.yaml": suite(base_overrides={"plan": {"weight": {"name": "sawb"}}}, methods={"A": {}}, bits=[2])}, ["bench", "{d}/s.yaml", "--dry-run"], "row 'A': plan.weight: the base's quantizer 'sawb' has no bits, and a suite's `bits` fill only the quantizers its methods name"),
    ("sinareq-finetune-epochs", {"c.yaml": OK + "plan: {weight: {name: dorefa, bits: 8}, method: {name: sinareq, finetune_epochs: 2}}\n"}, ["train", "{d}/c.yaml", "--out", "{d}/o"], "option finetune_epochs (2) must be below train.epochs (1)"),
    ("freeze-gradient-alone", {"c.yaml": OK}, ["info", "{d}/c.yaml", "train.freeze_bn_gradient=batch"], "freeze_bn_gradient: batch takes effect with freeze_bn_after"),
    ("dcq-niti", {"c.yaml": "model: {name: lenet5, batch_norm: false, bias: false}\ndata: {name: digits}\nplan: {weight: {name: pow2int, bits: 8}, keep_first: false, keep_last: false, method: {name: niti}}\ndcq: {teacher: x}\n"}, ["train", "{d}/c.yaml", "--out", "{d}/o"], "dcq: method 'niti' does not train DCQ's sections"),
    ("dcq-local", {"c.yaml": "model: {name: resnet8, width: 0.25}\ndata: {name: digits}\nplan: {weight: {name: sawb, bits: 3}, act: {name: pact, bits: 3}, method: {name: local}}\ndcq: {teacher: x}\n"}, ["train", "{d}/c.yaml", "--out", "{d}/o"], "dcq: method 'local' does not train DCQ's sections"),
    ("suite-model-unknown-row", {"s.yaml": suite(methods={"A": {"model": {"name": "resnt8"}}})}, ["bench", "{d}/s.yaml", "--dry-run"], "row 'A': model.name: unknown model 'resnt8'"),
    ("suite-empty", {"s.yaml": ""}, ["bench", "{d}/s.yaml"], "s.yaml: the file is empty"),
    ("suite-not-utf8", {"s.yaml": b"name: \xff\n"}, ["bench", "{d}/s.yaml"], "s.yaml: not UTF-8 text"),
    ("suite-bad-yaml", {"s.yaml": "methods: {A: \n"}, ["bench", "{d}/s.yaml"], "not valid YAML"),
    ("suite-list", {"s.yaml": "- 1\n"}, ["bench", "{d}/s.yaml"], "the top level must be a mapping"),
    ("suite-no-methods", {"s.yaml": "name: s\n"}, ["bench", "{d}/s.yaml"], "suite.methods: Field required"),
    ("suite-empty-methods", {"s.yaml": suite(methods={})}, ["bench", "{d}/s.yaml"], "suite.methods"),
    ("suite-unknown-key", {"s.yaml": suite(epochs=3)}, ["bench", "{d}/s.yaml"], "suite.epochs: unknown field"),
    ("suite-seeds-neg", {"s.yaml": suite(seeds=[-1])}, ["bench", "{d}/s.yaml", "--dry-run"], "seed"),
    ("suite-seeds-text", {"s.yaml": suite(seeds=["a"])}, ["bench", "{d}/s.yaml"], "suite.seeds.0"),
    ("suite-seeds-dup", {"s.yaml": suite(seeds=[0, 0])}, ["bench", "{d}/s.yaml", "--dry-run"], "suite.seeds: 0 appears twice"),
    # duplicate bits, models or widths: one row each, merged without a word (session 25; --dry-run listed both)
    ("suite-bits-dup", {"s.yaml": suite(methods={"L": {"plan": {"weight": {"name": "sawb"}}}}, bits=[2, 4, 2])}, ["bench", "{d}/s.yaml", "--dry-run"], "suite.bits: 2 appears twice"),
    ("suite-models-dup", {"s.yaml": suite(models=["resnet8", "resnet8"])}, ["bench", "{d}/s.yaml", "--dry-run"], "suite.models: resnet8 appears twice"),
    ("suite-widths-dup", {"s.yaml": suite(widths=[1, 1.0])}, ["bench", "{d}/s.yaml", "--dry-run"], "suite.widths: 1.0 appears twice"),
    ("suite-bits-0", {"s.yaml": suite(methods={"L": {"plan": {"weight": {"name": "sawb"}}}}, bits=[0])}, ["bench", "{d}/s.yaml", "--dry-run"], "bits 1..8, got 0"),
    ("suite-width-0", {"s.yaml": suite(widths=[0.0])}, ["bench", "{d}/s.yaml", "--dry-run"], "width"),
    ("suite-width-nan", {"s.yaml": suite(widths=[float("nan")])}, ["bench", "{d}/s.yaml", "--dry-run"], "nan is not a finite number"),
    ("suite-lr-inf", {"s.yaml": suite(base_overrides={"train": {"lr": float("inf")}})}, ["bench", "{d}/s.yaml", "--dry-run"], "inf is not a finite number"),
    ("suite-base-missing", {"s.yaml": suite(base="nope.yaml")}, ["bench", "{d}/s.yaml"], "suite.base: config file not found"),
    ("suite-base-bad-yaml", {"s.yaml": suite(base="b.yaml"), "b.yaml": "a: [\n"}, ["bench", "{d}/s.yaml"], "b.yaml: not valid YAML"),
    ("suite-base-list", {"s.yaml": suite(base="b.yaml"), "b.yaml": "- 1\n"}, ["bench", "{d}/s.yaml"], "b.yaml: the top level must be a mapping"),
    ("suite-base-not-utf8", {"s.yaml": suite(base="b.yaml"), "b.yaml": b"\xff"}, ["bench", "{d}/s.yaml"], "b.yaml: not UTF-8 text"),
    ("suite-reference", {"s.yaml": suite(reference="X")}, ["bench", "{d}/s.yaml"], "suite.reference: 'X' is not one of the methods"),
    ("suite-label-collision", {"s.yaml": suite(methods={"A b": {}, "A/b": {}})}, ["bench", "{d}/s.yaml", "--dry-run"], "both map to folder 'A_b'"),
    ("suite-label-empty-slug", {"s.yaml": suite(methods={"//": {}})}, ["bench", "{d}/s.yaml", "--dry-run"], "has no letter or digit"),
    ("suite-method-not-mapping", {"s.yaml": suite(methods={"A": 3})}, ["bench", "{d}/s.yaml"], "suite.methods.A"),
    ("suite-row-invalid", {"s.yaml": suite(methods={"A": {"train": {"epochs": 0}}})}, ["bench", "{d}/s.yaml", "--dry-run"], "row 'A'.train.epochs"),
    ("suite-model-unknown", {"s.yaml": suite(models=["resnet7"])}, ["bench", "{d}/s.yaml", "--dry-run"], "unknown model 'resnet7'"),
    ("suite-no-bits-list", {"s.yaml": suite(methods={"L": {"plan": {"weight": {"name": "sawb"}}}})}, ["bench", "{d}/s.yaml"], "has no bits"),
    ("suite-changed-config", {"s.yaml": "CHANGED"}, ["bench", "{d}/s.yaml"], "was trained with another config"),
    ("suite-ray-missing", {"s.yaml": suite()}, ["bench", "{d}/s.yaml", "--backend", "ray"], "RAY"),
    # --- session 26 (cfgfuzz): accepted before, or a traceback -------------------------------------------
    ("quant-bool-option-text", {"c.yaml": OK + "plan: {weight: {name: lsq, bits: 2, per_channel: 'false'}}\n"},
     ["info", "{d}/c.yaml"], "option per_channel must be true or false, got 'false'"),
    ("quant-bool-option-list", {"c.yaml": OK + "plan: {weight: {name: sat, bits: 2, scale_grad: [0]}}\n"},
     ["info", "{d}/c.yaml"], "option scale_grad must be true or false"),
    ("method-option-unhashable", {"c.yaml": Q.replace("bits: 2}}", "bits: 2}, method: {name: binaryrelax, "
                                                      "form: [a]}}")},
     ["info", "{d}/c.yaml"], "method 'binaryrelax'"),
    ("method-option-scalar", {"c.yaml": Q.replace("bits: 2}}", "bits: 2}, method: {name: niti, mu: 3}}")},
     ["info", "{d}/c.yaml"], "method 'niti'"),
    ("lr-inf-as-text", {"c.yaml": OK}, ["info", "{d}/c.yaml", "train.lr=inf"], "train.lr: inf is not a finite number"),
    ("lr-1e400-as-text", {"c.yaml": OK.replace("epochs: 1", "epochs: 1, lr: 1e400")}, ["info", "{d}/c.yaml"],
     "train.lr: inf is not a finite number"),
    ("milestones-without-multistep", {"c.yaml": OK}, ["info", "{d}/c.yaml", "train.epochs=3", "train.milestones=[1]"],
     "take effect with schedule multistep"),
    ("gamma-without-multistep", {"c.yaml": OK}, ["info", "{d}/c.yaml", "train.gamma=0.5"],
     "take effect with schedule multistep"),
    ("epochs-true", {"c.yaml": OK}, ["info", "{d}/c.yaml", "train.epochs=true"], "epochs: a number, got true"),
    ("lr-yes", {"c.yaml": OK}, ["info", "{d}/c.yaml", "train.lr=yes"], "lr: a number, got true"),
    ("seed-past-64-bits", {"c.yaml": OK}, ["info", "{d}/c.yaml", "train.seed=99999999999999999999"], "train.seed"),
    ("duplicate-key", {"c.yaml": OK + "train: {epochs: 2}\n"}, ["info", "{d}/c.yaml"], "key 'train' appears twice"),
    ("nested-too-deeply", {"c.yaml": "q: " + "[" * 5000 + "]" * 5000 + "\n"}, ["info", "{d}/c.yaml"],
     "nested too deeply"),
    ("suite-bits-true", {"s.yaml": suite(bits=[True], methods={"W": {"plan": {"weight": {"name": "sawb"}}}})},
     ["bench", "{d}/s.yaml", "--dry-run"], "suite.bits.0: Input should be a valid integer"),
    ("search-not-utf8", {"s.yaml": b"model: {name: resnet8}\nname: caf\xe9\n"}, ["search", "releq", "{d}/s.yaml"],
     "not UTF-8"),
    ("quant-number-option-true", {"c.yaml": OK + "plan: {act: {name: pact, bits: 2, init: true}}\n"},
     ["info", "{d}/c.yaml"], "option init must be a number, got true"),  # trained with alpha = 1.0
    ("method-number-option-true", {"c.yaml": OK + "plan: {method: {name: local, beta: true}}\n"},
     ["info", "{d}/c.yaml"], "option beta must be a number, got true"),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("finished")
    (d / "c.yaml").write_text(Q)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["train", str(d / "c.yaml"), "--out", str(d / "run")]) == 0
    return d / "run"


def _edit_config(path: Path, item: str):
    from lowbit.config import apply_overrides

    path.write_text(yaml.safe_dump(apply_overrides(yaml.safe_load(path.read_text()), [item])))


def _prepare(case_files: dict, d: Path, run: Path | None) -> None:
    import torch

    for name, content in case_files.items():
        p = d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            p.unlink()
        elif content == "TRUNCATE":
            data = p.read_bytes()
            p.write_bytes(data[: len(data) // 2])
        elif content == "TENSOR":
            torch.save(torch.zeros(3), p)
        elif isinstance(content, str) and content.startswith("EDIT "):
            _edit_config(p, content[5:])
        elif content == "CHANGED":  # a suite trained once, then changed: the old folder must not be reported
            p.write_text(suite(out=str(d / "out")))
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                assert main(["bench", str(p)]) == 0
            p.write_text(suite(out=str(d / "out"), base_overrides={"train": {"lr": 0.3}}))
        elif isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content.replace("{d}", str(d)))


def run_case(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("name, files, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_status_2(name, files, argv, expected, tmp_path, finished_run, monkeypatch):
    needs_run = any("{run}" in a for a in argv) or any(k.startswith("run/") for k in files)
    run = None
    if needs_run:
        run = tmp_path / "run"
        shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns(".lock"))
    if name == "suite-ray-missing":
        monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
        expected = "the ray backend needs Ray"
    monkeypatch.chdir(tmp_path)
    _prepare(files, tmp_path, run)
    argv = [a.replace("{d}", str(tmp_path)).replace("{run}", str(run)) for a in argv]
    code, out, err = run_case(argv)
    lines = err.strip().splitlines()
    assert code == 2, (code, out[-300:], err[-600:])
    assert len(lines) == 1 and lines[0].startswith("lowbit") and " error: " in lines[0], err
    assert "Traceback" not in err
    assert expected in lines[0], lines[0]


def test_the_table_has_at_least_100_bad_inputs():
    assert len(CASES) >= 100 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("argv", [
    ["train", "--out"],
    ["bench", "nope.yaml", "--workers", "0"],
    ["info", "{d}/bin.yaml"],
    ["budget", "--ratio", "nan"],
])
def test_through_a_real_process_status_2_one_line_no_traceback(argv, tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe")
    argv = [a.replace("{d}", str(tmp_path)) for a in argv]
    res = subprocess.run([sys.executable, "-m", "lowbit.cli", *argv], capture_output=True, text=True,
                         env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}, timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and res.stdout == ""


def test_help_and_argument_errors_do_not_import_torch():
    code = ("import sys, lowbit.cli\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "try:\n    lowbit.cli.main(['bench', 'x.yaml', '--workers', '0'])\nexcept SystemExit as e:\n    assert e.code == 2\n"
            "assert 'torch' not in sys.modules, 'torch imported by an argument error'\n")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": SRC})
    assert res.returncode == 0, res.stderr
    t1 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "lowbit.cli", "--help"], capture_output=True, text=True,
                         env={"PYTHONPATH": SRC})
    assert res.returncode == 0 and "train" in res.stdout
    assert time.perf_counter() - t1 < 1.0 and t1 - t0 < 1.0  # torch alone takes longer than this to import


def test_yaml_merge_keys_still_load(tmp_path):
    """Session 26's duplicate-key loader built the `<<` key itself: every config or suite using YAML's merge key
    (`act: {<<: *q, bits: 4}`) was 'not valid YAML'. A key merged in and given again is an override, not twice."""
    from lowbit.config import load_config
    from lowbit.errors import ConfigError

    p = tmp_path / "c.yaml"
    p.write_text(OK + "plan:\n  weight: &q {name: lsq, bits: 2}\n  act: {<<: *q, bits: 4}\n")
    cfg = load_config(p)
    assert cfg.plan.act.name == "lsq" and cfg.plan.act.bits == 4 and cfg.plan.weight.bits == 2
    p.write_text(OK + "plan:\n  weight: &q {name: lsq, bits: 2}\n  act: {<<: *q, bits: 4, bits: 3}\n")
    with pytest.raises(ConfigError, match="key 'bits' appears twice"):
        load_config(p)


def test_yaml_merge_key_override_in_a_merged_anchor_reused_by_alias(tmp_path):
    """An anchored mapping first met inside a merge (`<<: &q {<<: *base, bits: 4}`) is flattened in place by PyYAML
    before it is built; its alias (`*q`) then read the override as 'key 'bits' appears twice'."""
    from lowbit.config import load_config
    from lowbit.errors import ConfigError

    p = tmp_path / "c.yaml"
    p.write_text(OK + "plan:\n  weight:\n    <<: &q\n      <<: &base {name: lsq, bits: 2}\n      bits: 4\n  act: *q\n")
    cfg = load_config(p)
    assert cfg.plan.weight.bits == 4 and cfg.plan.act.bits == 4 and cfg.plan.act.name == "lsq"
    p.write_text(OK + "plan:\n  weight:\n    <<: &q\n      <<: {name: lsq, bits: 2}\n      bits: 4\n      bits: 3\n"
                      "  act: *q\n")
    with pytest.raises(ConfigError, match="key 'bits' appears twice"):
        load_config(p)


def test_yaml_merge_of_a_mapping_that_overrides_its_own_merge(tmp_path):
    """`m: {<<: *b, g: 2}` merged again (`<<: *m`) read b's g (1): PyYAML 6.0.4 keeps the first pair of a key whose
    string is one object (one-letter keys, such as DQA's g), so the override was silently lost."""
    import yaml

    from lowbit.config import _UniqueKeyLoader

    doc = "b: &b {name: dqa, g: 1, lam: 5}\nm: &m {<<: *b, g: 2}\nmethod: {<<: *m, lam: 3}\n"
    assert yaml.load(doc, Loader=_UniqueKeyLoader)["method"] == {"name": "dqa", "g": 2, "lam": 3}
