"""The run-folder layer: a config in, a run folder out, on top of :func:`lowbit.fit.fit`.

``run(cfg, run_dir)`` builds data, model (pretrained start if ``model.init_from``) and plan, trains
with ``fit`` and the plan's method, evaluates the held-out validation split after every epoch,
keeps the best-validation checkpoint and reports the test accuracy *at that epoch* (seed 002's
protocol). Everything that touches files or configs lives here; ``fit``/``evaluate`` do not. Every epoch writes ``last.pt`` (model,
optimizer, scheduler, method state) and one line of ``metrics.jsonl``, so ``resume=True`` continues
a killed run and reproduces the metrics of an uninterrupted one (batch order and augmentation are
a function of (seed, epoch); nothing else draws random numbers).

Run folder::

    config.yaml    the resolved config        plan.txt      the per-layer plan table
    metrics.jsonl  one JSON object per epoch  last.pt       checkpoint of the last epoch
    best.pt        best-validation weights    summary.json  test accuracy, bits, size, BitOPs
                   (+ ``final_bn``: re-estimated BatchNorm statistics, with ``train.bn_recalibrate``)

The evaluated, exported network is ``final_model(model, best.pt)``: the best weights, the method's
``finalize`` and, if recorded, the re-estimated BatchNorm statistics.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .config import Config
from .cost import CostSummary, profile
from .data import BatchLoader, DataSplits, load_dataset
from .digest import digest
from .errors import ConfigError, LowbitError
from .fit import FitState, FreezeBatchNorm, model_device, default_optimizer, evaluate, fit, resolve_device
from .methods import STE, Method
from .models import create_model
from .pretrained import load_weights
from .quantize import ends_full_precision, layer_bits, quant_state, quantize, weight_param


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
def build_model(cfg: Config, data: DataSplits) -> nn.Module:
    """Model for the dataset's shape, seeded; pretrained weights if ``model.init_from``; then the
    plan applied (create -> load -> quantize)."""
    torch.manual_seed(cfg.train.seed)
    info = data.info
    model = create_model(cfg.model.name, in_channels=info.in_channels, num_classes=info.num_classes,
                         image_size=info.image_size, **cfg.model.options)
    if cfg.model.init_from:
        try:
            load_weights(model, cfg.model.init_from, keep=cfg.model.init_weights)
        except ConfigError as e:
            raise ConfigError(f"model.init_from: {e}") from None
    return quantize(model, cfg.plan)


def without_init_from(cfg: Config) -> Config:
    """``cfg`` without its pretrained start (``model.init_from``): a run's checkpoints hold every weight, so a resumed
    or reloaded run folder does not read it again (it may have moved or been deleted since)."""
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"init_from": None})})


def load_data(cfg: Config) -> DataSplits:
    d = cfg.data
    return load_dataset(d.name, root=d.root, val_fraction=d.val_fraction, seed=cfg.train.seed, limit=d.limit)


def build_optimizer(model: nn.Module, t, method: Method | None = None) -> torch.optim.Optimizer:
    """``train.optimizer`` over the method's parameter groups (:func:`lowbit.fit.default_optimizer`)."""
    method = method or getattr(quant_state(model), "method", None) or STE()
    return default_optimizer(model, method, t.optimizer, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov,
                             weight_decay=t.weight_decay)


def build_scheduler(opt, t, steps_per_epoch: int, stages: list[int] | tuple[int, ...] = ()):
    """Stepped once per batch; milestones are given in epochs. ``stages``: the global steps where the
    method starts a new training stage (:meth:`lowbit.methods.Method.stage_starts`, e.g. greedy
    local-loss blocks); the schedule then restarts at each (cosine from ``train.lr`` to 0 over every
    stage's own steps, or constant)."""
    total = t.epochs * steps_per_epoch
    starts = sorted({0, *(s for s in stages if 0 < s < total)})
    if len(starts) > 1:
        if t.schedule not in ("cosine", "constant"):
            raise ConfigError(f"train.schedule: {t.schedule} does not restart per training stage of method "
                              "(greedy blocks); use cosine or constant")
        ends = starts[1:] + [total]

        def stage_cosine(step: int) -> float:
            k = max(0, bisect.bisect_right(starts, step) - 1)
            return 0.5 * (1 + math.cos(math.pi * min(step - starts[k], ends[k] - starts[k]) / (ends[k] - starts[k])))

        return torch.optim.lr_scheduler.LambdaLR(opt, stage_cosine if t.schedule == "cosine" else lambda _: 1.0)
    if t.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if t.schedule == "multistep":
        bad = [m for m in t.milestones if not 0 < m < t.epochs]
        if bad:
            raise ConfigError(f"train.milestones: {bad} not within 1..{t.epochs - 1} (epochs)")
        return torch.optim.lr_scheduler.MultiStepLR(opt, [m * steps_per_epoch for m in t.milestones], t.gamma)
    if t.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=t.lr, total_steps=total)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: BatchLoader, batches: int) -> dict[str, torch.Tensor]:
    """Re-estimate every BatchNorm's running mean and variance on up to ``batches`` batches of
    ``loader`` with the network as it is now (e.g. after a mixture was hardened to Q_1, whose outputs
    the statistics gathered during training do not describe). BatchNorm layers run in train mode
    with a cumulative average; every other module stays in eval mode (quantizer state is untouched);
    no gradients, no parameter changes. Returns the new BatchNorm buffers (state-dict keys)."""
    bns = {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    if not bns or batches <= 0:
        return {}
    model.eval()
    momenta = {}
    for name, m in bns.items():
        momenta[name] = m.momentum
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
        m.train()
    dev = model_device(model)
    for i, (x, _) in enumerate(loader):
        if i >= batches:
            break
        model(x.to(dev))
    for name, m in bns.items():
        m.momentum = momenta[name]
    model.eval()
    return {f"{name}.{b}": v.clone() for name, m in bns.items() for b, v in m.named_buffers()}


def recalibrate_run_bn(model: nn.Module, cfg: Config, data: DataSplits, batches: int) -> dict[str, torch.Tensor]:
    """What ``train.bn_recalibrate`` does at the end of a run: ``recalibrate_bn`` on the run's
    shuffled, un-augmented training batches (seeded by the run's seed)."""
    loader = BatchLoader(data.train, data.info, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed)
    return recalibrate_bn(model, loader, batches)


def final_model(model: nn.Module, checkpoint: dict) -> nn.Module:
    """The network a run reports and exports, from its ``best.pt`` contents: the best weights, the
    method's ``finalize`` (e.g. harden a mixture), then the re-estimated BatchNorm statistics if the
    run recorded them (``train.bn_recalibrate``). In place; returns ``model``."""
    model.load_state_dict(checkpoint["model"])
    method = quant_state(model).method
    if "method" in checkpoint:  # the schedule as at the best epoch (DQA's T, BinaryRelax's omega): finalize's facts
        method.load_state_dict(checkpoint["method"])  # are the best network's (before session 26: the last step's)
    method.finalize(model)
    if checkpoint.get("final_bn"):
        model.load_state_dict(checkpoint["final_bn"], strict=False)
    return model


def load_run(run_dir: str | Path) -> tuple[Config, DataSplits, nn.Module, dict]:
    """A finished run folder's network as the run reported it: (config, data, model in eval mode,
    the best.pt checkpoint), through ``final_model``. Used by ``lowbit eval`` and the exporter."""
    from .runfolder import run_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no config.yaml)")
    ck_path = run_dir / "best.pt"
    if not ck_path.is_file():
        done = _epochs_recorded(run_dir)
        why = ("best.pt is missing although last.pt is there: it was deleted or moved, or the run was killed before "
               f"writing it; `lowbit train --resume {run_dir}` writes it again"
               if (run_dir / "last.pt").is_file() and _resume_writes_best(run_dir) else
               "best.pt is missing although last.pt is there: it was deleted or moved (last.pt does not hold the best "
               "epoch, so a resume cannot write it again)"
               if (run_dir / "last.pt").is_file() else
               f"metrics.jsonl records {done} finished epoch(s), but the checkpoints are not in the folder: deleted, "
               "or not copied or committed with it" + ("; or the first could not be written (a full disk), and the "
                                                        "same `lowbit train` command starts the run again" if done == 1
                                                        else "") if done else
               f"it is still in its FP32 warm-up (warmup/); `lowbit train --resume {run_dir}` continues it"
               if (run_dir / "warmup").is_dir() else "the run did not finish an epoch")
        raise ConfigError(f"{run_dir} has no best.pt checkpoint ({why})")
    cfg = run_config(run_dir)
    data = load_data(cfg)
    # the checkpoint holds every weight: the pretrained start (model.init_from) is not read again,
    # so a run folder evaluates and exports after its start moved or from another directory
    model = build_model(without_init_from(cfg), data)
    ck = load_checkpoint(ck_path, config=cfg)
    with checkpoint_fits(ck_path, run_dir):
        final_model(model, ck)
    model.eval()
    return cfg, data, model, ck


def _epochs_recorded(run_dir: Path) -> int:
    """The epochs ``metrics.jsonl`` records (0 without it)."""
    metrics = run_dir / "metrics.jsonl"
    return sum(1 for ln in metrics.read_text().splitlines() if ln.strip()) if metrics.is_file() else 0


def _last_is_best(ck: dict) -> bool:
    """Whether the checkpoint ``last.pt`` (``ck``) records its own epoch as the run's best."""
    return (ck.get("best") or {}).get("epoch") == ck.get("epoch", -2) + 1


def _resume_writes_best(run_dir: Path) -> bool:
    """Whether ``--resume`` would write a missing best.pt (:func:`complete_best`): an unfinished run whose last.pt is
    its best epoch."""
    if (run_dir / "summary.json").is_file():
        return False
    try:
        ck = load_checkpoint(run_dir / "last.pt", map_location="cpu")
    except ConfigError:
        return False
    return _last_is_best(ck)


def unfinished_note(run_dir: str | Path) -> str:
    """'' for a finished run folder (summary.json); else a note that its best.pt is the best epoch so far of a run
    that did not finish (killed, interrupted): eval and export said nothing of it before session 27."""
    run_dir = Path(run_dir)
    # a DCQ run (sections.json) writes best.pt (the stitched network) before its fine-tune's first last.pt
    if (run_dir / "summary.json").is_file() or not ((run_dir / "last.pt").is_file()
                                                      or (run_dir / "sections.json").is_file()):
        return ""
    return (f"note            {run_dir} did not finish training ({_epochs_recorded(run_dir)} epoch(s) in metrics.jsonl, "
            f"no summary.json): this is its best epoch so far; `lowbit train --resume {run_dir}` continues it")


def load_checkpoint(path: str | Path, map_location=None, config: Config | None = None) -> dict:
    """A lowbit checkpoint (best.pt, last.pt); a truncated, corrupt or foreign file is one line.
    With ``config``, the config recorded in the checkpoint (if any) must equal it: a run folder
    whose config.yaml was edited after training (e.g. other bits, same shapes) is an error, not a
    silently different network."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such checkpoint (it was deleted or moved, or the run never wrote it)")
    try:
        ck = torch.load(path, weights_only=False, map_location=map_location)
    except PermissionError as e:  # not readable by this user: not a corrupt file, as it said before session 29
        raise ConfigError(f"{path}: the checkpoint could not be read ({e.strerror or e})") from None
    except Exception as e:  # pickle, zip and torch errors alike: say which file, in one line
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{path}: not a readable lowbit checkpoint ({msg[:120]}); the file is truncated "
                          "or corrupt") from None
    if not isinstance(ck, dict) or not isinstance(ck.get("model"), dict) or "epoch" not in ck:
        raise ConfigError(f"{path}: not a lowbit checkpoint (expected a dict with 'model' and 'epoch')")
    if "sha256" in ck and ck["sha256"] != digest({k: ck[k] for k in _DIGESTED if k in ck}):
        raise ConfigError(f"{path}: its numbers do not match the checksum it was saved with; the file is corrupt "
                          "(restore it from a copy, or --resume from last.pt / retrain)")
    if config is not None and isinstance(ck.get("config"), dict):
        from .runfolder import edits_since

        edited = edits_since(ck["config"], config.to_dict())
        if edited:
            raise ConfigError(f"{path} does not fit {path.parent / 'config.yaml'} (the config was edited after "
                              f"training: {edited})")
    return ck


class checkpoint_fits:
    """Turn a state-dict mismatch (a run folder whose config.yaml was edited after training) into
    one line naming the folder."""

    def __init__(self, path: Path, run_dir: Path):
        self.path, self.run_dir = path, run_dir

    def __enter__(self):
        return self

    def __exit__(self, typ, e, tb):
        if typ is not None and issubclass(typ, (RuntimeError, KeyError, ValueError)) and not isinstance(e, ConfigError):
            msg = (str(e).strip().splitlines() or [typ.__name__])[0].replace("Error(s) in loading state_dict for ", "")
            raise ConfigError(f"{self.path} does not fit {self.run_dir / 'config.yaml'} (the config no longer "
                              f"matches the checkpoint: {msg[:120]})") from None
        return False


def distinct_weight_values(model: nn.Module) -> dict[str, int]:
    """Number of distinct values each quantized layer's weight takes now (a check, not a claim)."""
    out = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if weight_param(m) is not None:
                out[name] = int(torch.unique(m.weight).numel())
    return out


def cost_of(model: nn.Module, data: DataSplits) -> CostSummary:
    from .quantize import quiet_calibration

    x = (data.test.images[:1].float() / 255.0).to(model_device(model))
    with torch.no_grad(), quiet_calibration():  # the cost does not depend on the ranges (`lowbit info CONFIG`)
        was = model.training
        model.eval()
        model(x)  # quantizers record their current levels (scale counts depend on them)
        model.train(was)
        return profile(model, x, layer_bits(model))


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    run_dir: Path
    summary: dict
    model: nn.Module


def json_safe(obj):
    """NaN and infinities become null (JSON has no NaN; a metrics line must stay valid JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


#: what a checkpoint's digest covers (the numbers that decide the network and its training)
_DIGESTED = ("model", "optimizer", "scheduler", "method", "epoch")


def _save(path: Path, obj) -> None:
    if isinstance(obj, dict) and "model" in obj and "epoch" in obj:  # a checkpoint (not a bare state dict)
        obj = {**obj, "sha256": digest({k: obj[k] for k in _DIGESTED if k in obj})}
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(obj, tmp)
    except (RuntimeError, OSError) as e:  # torch's writer says "unexpected pos ..." on a full disk
        tmp.unlink(missing_ok=True)
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LowbitError(f"{path}: could not be written ({msg[:100]}); is the disk full or the folder "
                          "read-only?") from None
    try:
        os.replace(tmp, path)  # never leave a half-written checkpoint
    except OSError as e:  # e.g. an immutable path (before session 29: "last.tmp: Operation not permitted", left behind)
        tmp.unlink(missing_ok=True)
        raise LowbitError(f"{path}: could not be replaced by the new checkpoint ({e.strerror or e})") from None


def numerics_env() -> dict:
    """What changes a run's numbers without changing its config: torch's threads (sums split differently),
    lowbit's native activation kernels (their scalar gradients summed in double) and torchrun's processes.
    Recorded in last.pt; a resume under other values warns that it will not reproduce the uninterrupted run bit for
    bit."""
    from . import distributed as ddp
    from .quant import native

    # the number of torchrun processes too: each takes its shard of a global batch (a resume in one process of a
    # two-process run trained other epochs, 37.20 % against 34.87 %, without a word; session 24)
    return {"threads": torch.get_num_threads(), "native_kernels": bool(native.available()),
            "processes": ddp.world_size()}


def best_checkpoint(model_state: dict, epoch: int, method_state: dict, config: dict | None) -> dict:
    """best.pt's contents: the weights and method state of the best epoch (1-based), and the run's config."""
    return {"model": model_state, "epoch": epoch, "method": method_state, **({"config": config} if config else {})}


def complete_best(run_dir: Path, ck: dict, device=None) -> None:
    """On resume: where ``last.pt`` (``ck``) records its own epoch as the best but ``best.pt`` does not hold it (killed
    between the two writes of :class:`RunFolder`), write ``best.pt`` from ``last.pt``. Not in a finished run (summary.json):
    its best.pt was whole when it finished, so a missing one was deleted and stays an error."""
    best, path = ck.get("best") or {}, run_dir / "best.pt"
    if (run_dir / "summary.json").is_file():
        return
    held = load_checkpoint(path, map_location=device)["epoch"] if path.is_file() else None
    if held is not None and held > ck["epoch"] + 1 and held != best.get("epoch"):
        # written before last.pt by lowbit before session 27, then killed: the recorded best epoch's weights are gone
        raise ConfigError(f"{path} holds epoch {held}, newer than last.pt (epoch {ck['epoch'] + 1}, whose best is epoch "
                          f"{best.get('epoch')}): the run was killed between its checkpoints by a lowbit before session "
                          f"27, and epoch {best.get('epoch')}'s weights are gone; train it anew (another --out)")
    if _last_is_best(ck) and held != best["epoch"]:
        _save(path, best_checkpoint(ck["model"], best["epoch"], ck.get("method", {}), ck.get("config")))


class RunFolder:
    """The ``fit`` callback that keeps a run folder: after every epoch one line of
    ``metrics.jsonl``, ``best.pt`` when validation improved (002's best epoch; with no validation
    split, the last epoch) and ``last.pt`` (everything ``fit(resume=...)`` needs), then the user's
    callbacks (each gets the metrics row; raising from one stops the run there, resumable)."""

    def __init__(self, run_dir: Path, best: dict, user_callbacks=(), config: dict | None = None):
        self.run_dir, self.best, self.user = run_dir, best, list(user_callbacks)
        self.config = config  # recorded in both checkpoints: an edited config.yaml is then caught

    def on_epoch_end(self, state: FitState, row: dict) -> None:
        # no validation split (data.val_fraction 0): the last epoch is "best", with no accuracy claimed
        no_val = math.isnan(row["val_acc"])
        score = float(state.epoch) if no_val else row["val_acc"]
        improved = self.best.get("epoch", -1) < 0 or score > self.best.get("_score", self.best["val_acc"])
        if improved:
            self.best = {"val_acc": None if no_val else score, "epoch": state.epoch + 1, "_score": score}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(json_safe(row), allow_nan=False) + "\n")
        _save(self.run_dir / "last.pt", {**state.checkpoint(), "best": self.best, "numerics": numerics_env(),
                                         **({"config": self.config} if self.config else {})})
        # best.pt after last.pt, which records this epoch as the best: a kill between the two is repaired by --resume
        # from last.pt (before session 27 best.pt came first, and a resume that did not retrain the killed epoch bit
        # for bit kept that epoch's weights in best.pt under the earlier best epoch's name and accuracy)
        if improved:
            _save(self.run_dir / "best.pt", best_checkpoint(state.model.state_dict(), state.epoch + 1,
                                                            state.method.state_dict(), self.config))
        for cb in self.user:
            cb(row)


def run(cfg: Config, run_dir: str | Path, resume: bool = False, data: DataSplits | None = None,
        callbacks: list[Callable[[dict], None]] | None = None) -> RunResult:
    """Train ``cfg`` into ``run_dir`` (created; with ``resume``, continued from ``last.pt``).

    ``data`` reuses already loaded splits; each callback gets the epoch's metrics row after the
    epoch is checkpointed (raising from one stops the run there, resumable).

    The folder is locked for the whole run (a second process gets a one-line error), and a new run
    never starts in a folder that holds other files or an earlier run (:mod:`lowbit.runfolder`).
    Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank trains its shard and rank 0 alone writes
    the folder (:mod:`lowbit.distributed`).
    """
    from .runfolder import check_fresh, lock_run

    run_dir = Path(run_dir)
    from .distributed import is_writer

    from .parallel import callers_threads

    with callers_threads():  # train.threads is the run's
        if not is_writer():
            return _run(cfg, run_dir, resume, data, callbacks)
        with lock_run(run_dir):
            if not resume:
                check_fresh(run_dir, cfg.to_yaml())
            return _run(cfg, run_dir, resume, data, callbacks)


def _run(cfg: Config, run_dir: Path, resume: bool, data: DataSplits | None,
         callbacks: list[Callable[[dict], None]] | None, record: Config | None = None) -> RunResult:
    """``record``: the config the run folder records (config.yaml, checkpoints, summary) when it is not ``cfg``, the
    one trained: a schedule's stage (schedules/warmup.py)."""
    from . import distributed as ddp

    if ddp.active() and cfg.dcq is not None:
        raise ConfigError("torchrun: DCQ does not run distributed (its sections train one after another, each "
                          "with its own folder state); run it in one process")
    if cfg.dcq is not None:  # divide-and-conquer quantization: a schedule over fit (schedules/dcq.py)
        from .schedules.dcq import run_dcq

        return run_dcq(cfg, run_dir, resume=resume, data=data, callbacks=callbacks)
    if cfg.train.float_warmup_epochs:  # an FP32 warm-up, then the plan (schedules/warmup.py)
        from .schedules.warmup import run_warmup

        return run_warmup(cfg, run_dir, resume=resume, data=data, callbacks=callbacks)
    record = record or cfg
    t = cfg.train
    run_dir = Path(run_dir)
    if t.threads:
        torch.set_num_threads(t.threads)
    if ddp.active():  # under torchrun: this process is one rank (lowbit.distributed)
        ddp.init()
    writer = ddp.is_writer()
    device = resolve_device(t.device)
    if ddp.active() and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if ddp.active() and t.sync_batchnorm:  # before the run folder is written
        ddp.check_sync_batchnorm(device)
    data = data or load_data(cfg)
    # resuming: last.pt holds every weight, so the pretrained start (model.init_from) is not read again (a run
    # whose start was moved or deleted resumes; session 24)
    model = build_model(without_init_from(cfg) if resume else cfg, data).to(device)
    state = quant_state(model)
    method = state.method
    if ddp.active() and not method.ddp:
        raise ConfigError(f"torchrun: method '{method.name}' does not run distributed (its update is not a gradient "
                          "that DDP averages over the ranks, which would drift apart); run it in one process")
    if t.distill is not None:  # knowledge distillation from a teacher, any method (schedules/distill.py)
        from .schedules.distill import distill_from_config

        method = distill_from_config(method, cfg, data, device)

    if ddp.active():  # each rank its shard of every global batch
        train_loader = ddp.sharded_loader(data.train, data.info, t.batch_size, shuffle=True, augment=cfg.data.augment,
                                          seed=t.seed)
    else:
        train_loader = BatchLoader(data.train, data.info, t.batch_size, shuffle=True, augment=cfg.data.augment,
                                   seed=t.seed)
    val_loader = BatchLoader(data.val, data.info, t.eval_batch_size)
    test_loader = BatchLoader(data.test, data.info, t.eval_batch_size)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ConfigError("data: the training split is empty")
    opt = build_optimizer(model, t, method)
    sched = build_scheduler(opt, t, steps_per_epoch, method.stage_starts(model, t.epochs * steps_per_epoch))

    ck, best = None, {"val_acc": -1.0, "epoch": -1}
    last = run_dir / "last.pt"
    if resume:
        if not last.is_file():
            raise ConfigError(f"cannot resume: no checkpoint {last}")
        ck = load_checkpoint(last, map_location=device, config=record)
        if "best" not in ck:
            raise ConfigError(f"{last}: not a last.pt checkpoint (no 'best' record)")
        best = ck["best"]
        was, now = ck.get("numerics"), numerics_env()
        diff = ", ".join(f"{k} {was[k]} -> {v}" for k, v in now.items() if was and k in was and was[k] != v)
        if diff:
            import warnings

            warnings.warn(f"resuming {run_dir} with other numerics than it trained with ({diff}; train.threads, "
                          "LOWBIT_NATIVE, torchrun's processes): the run continues, but will not equal an "
                          "uninterrupted run",
                          RuntimeWarning, stacklevel=2)
        if writer:
            _truncate_metrics(run_dir / "metrics.jsonl", ck["epoch"] + 1)
            complete_best(run_dir, ck, device)
    elif writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        from .runfolder import atomic_write

        atomic_write(run_dir / "config.yaml", record.to_yaml())  # whole or absent: an empty one blocked a restart
        (run_dir / "plan.txt").write_text(state.table() + "\n")
        (run_dir / "metrics.jsonl").write_text("")

    if ck is not None:  # a folder whose config.yaml was edited after training: one line, before fit
        with checkpoint_fits(last, run_dir):
            model.load_state_dict(ck["model"])
    fit_callbacks: list = []
    if t.freeze_bn_after is not None:
        fit_callbacks.append(FreezeBatchNorm(t.freeze_bn_after, t.freeze_bn_gradient))
    if ddp.active():  # SyncBatchNorm, quantizer priming, DistributedDataParallel, metrics over all ranks
        model, method = ddp.setup(model, train_loader, method, device, ck["epoch"] + 1 if ck else 0,
                                  t.sync_batchnorm)
        fit_callbacks.append(ddp.MetricsAcrossRanks())
    folder = RunFolder(run_dir, best, callbacks or [], config=record.to_dict())
    if writer:  # one run folder, written by rank 0
        fit_callbacks.append(folder)
    fit(model, train_loader, method, opt, sched, epochs=t.epochs, device=device, callbacks=fit_callbacks,
        val_batches=val_loader, resume=ck, progress=t.progress and writer)
    if not writer:
        ddp.finish()
        return RunResult(run_dir, {}, model)

    best_ck = load_checkpoint(run_dir / "best.pt", map_location=device)
    best_ck.pop("final_bn", None)
    final_model(model, best_ck)  # the weights that are evaluated and exported (e.g. a hardened mixture)
    if t.bn_recalibrate:
        best_ck["final_bn"] = recalibrate_run_bn(model, cfg, data, t.bn_recalibrate)
        _save(run_dir / "best.pt", best_ck)
    test = evaluate(model, test_loader)
    summary = make_summary(record, model, data, test, folder.best)
    from .runfolder import atomic_write

    atomic_write(run_dir / "summary.json", json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")
    if ddp.active():
        ddp.finish()
    return RunResult(run_dir, summary, model)


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop metric lines of epochs after the checkpoint (a run killed between the two writes), and a last line
    cut short (a disk that filled while it was written: before session 24 --resume failed on it)."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        rows = []
        for i, ln in enumerate(lines):
            try:
                rows.append((json.loads(ln)["epoch"], ln))
            except (ValueError, KeyError, TypeError):
                if i < len(lines) - 1:
                    raise ConfigError(f"{path}: line {i + 1} is not a metrics row; the file is corrupt") from None
        path.write_text("".join(ln + "\n" for epoch, ln in rows if epoch <= epochs_done))


def quantizer_label(model: nn.Module, kind: str, default) -> str:
    """What the model's layers use for ``kind`` ('weight' or 'act'): the plan's default label where
    layers use it, then each other quantizer and bits some layers use (``plan.layers``, integer mode's
    8-bit ends) with those layers, e.g. ``sawb2 (lsq8 on conv1, fc)``. Full-precision layers are left out."""
    label = default.label() if default is not None else "fp32"
    short = f"{default.name}{'' if default.bits is None else default.bits}" if default is not None else None
    used_default, others = False, {}
    state = quant_state(model)
    for lp in state.layers if state is not None else []:
        spec = getattr(lp, kind)
        if spec is None:
            continue
        s = f"{spec.name}{'' if spec.bits is None else spec.bits}"
        if s == short:
            used_default = True
        else:
            others.setdefault(s, []).append(lp.name)
    more = [f"{s} on {', '.join(names) if len(names) <= 3 else f'{len(names)} layers'}" for s, names in others.items()]
    if not more:
        return label
    return f"{label} ({'; '.join(more)})" if used_default else "; ".join(more)


def make_summary(cfg: Config, model: nn.Module, data: DataSplits, test: dict, best: dict) -> dict:
    cost = cost_of(model, data)
    bits = layer_bits(model)
    wb = sorted({b.weight for b in bits.values() if b.weight})
    ab = sorted({b.act for b in bits.values() if b.act})
    return {
        "name": cfg.name,
        "model": cfg.model.name,
        "dataset": cfg.data.name,
        "method": cfg.plan.method.name,
        "weight": quantizer_label(model, "weight", cfg.plan.weight),
        "act": quantizer_label(model, "act", cfg.plan.act),
        "weight_bits": wb, "act_bits": ab,
        "first_last_fp": ends_full_precision(model),
        "best_epoch": best["epoch"], "best_val_acc": best.get("val_acc"),
        "test_acc": test["acc"], "test_loss": test["loss"], "test_images": test.get("n"),
        "params": cost.params, "macs": cost.macs, "bitops": cost.bitops,
        "size_bytes": cost.size_bytes, "fp32_size_bytes": cost.fp32_size_bytes,
        "mem_002_bits": cost.mem_bits,
        "bn_recalibrated_batches": cfg.train.bn_recalibrate,
        # best_epoch counts the quantized epochs, after these (schedules/warmup.py)
        **({"float_warmup_epochs": cfg.train.float_warmup_epochs} if cfg.train.float_warmup_epochs else {}),
        "distinct_weight_values": distinct_weight_values(model),
        "method_info": quant_state(model).method.summary(model),
    }


def _test_images(s: dict) -> str:
    """", on N test images" (data.limit also cuts the test set); empty for summaries written before session 25."""
    n = s.get("test_images")
    return f", {n:,} test images" if n else ""


def format_summary(s: dict) -> str:
    bits = f"W{'/'.join(map(str, s['weight_bits'])) or '32'}A{'/'.join(map(str, s['act_bits'])) or '32'}"
    va = s.get("best_val_acc")
    if va is None or (isinstance(va, float) and math.isnan(va)):
        where = f"last epoch {s['best_epoch']}, no validation split"
    else:
        n = s.get("float_warmup_epochs")
        after = f" after {n} FP32 warm-up epoch{'s' if n > 1 else ''}" if n else ""
        where = f"best validation epoch {s['best_epoch']}{after}, val {100 * va:.2f}%"
    return "\n".join([
        f"test accuracy   {100 * s['test_acc']:.2f}%  ({where}"
        f"{_test_images(s)})",
        f"bits            {bits}  weight {s['weight']}, act {s['act']}, method {s['method']}"
        f"{', first/last layer FP32' if all(s['first_last_fp']) else ''}",
        f"model size      {s['size_bytes'] / 1024:.1f} KiB at these bits vs {s['fp32_size_bytes'] / 1024:.1f} KiB FP32 "
        f"({s['fp32_size_bytes'] / s['size_bytes']:.1f}x smaller)",
        f"BitOPs          {s['bitops'] / 1e9:.3f} G per image ({s['macs'] / 1e6:.2f} M MACs; "
        f"FP32 would be {32 * 32 * s['macs'] / 1e9:.2f} G)",
        f"memory (002)    {s['mem_002_bits'] / 8 / 1024:.1f} KiB = params at their bits + largest activation",
        *(f"{k:<15s} {v}" for k, v in s.get("method_info", {}).items()),
    ])
