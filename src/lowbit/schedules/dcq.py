"""DCQ, divide-and-conquer quantization (seed 001): a schedule over :func:`lowbit.fit`.

A trained full-precision teacher is cut at block boundaries into sections
(:mod:`lowbit.schedules.sections`). Student section i is the teacher's section i copied (the
config's model with the teacher's weights, quantized by the plan as a *whole* network, so the
first/last-layer full-precision rule is the network's, then cut the same way) and trained with
``fit`` to map the teacher's input features of section i to the teacher's output features of
section i (feature MSE, :func:`lowbit.schedules.distill.feature_regression`); the last section
trains on the labels with the method's own loss, plus Hinton KD from the teacher's last section
with ``dcq.distill``. The sections are independent, so they train in parallel worker processes
(``dcq.workers``; spawn context; each worker rebuilds data, teacher and student from the config and
the run folder, with the torch threads divided between the workers). Teacher features are
computed batch by batch from the same seeded, augmented stream as a normal run (by default nothing of
the training set's features is held beyond one batch; ``dcq.feature_cache_mb`` turns on an on-disk
cache with that size limit, :mod:`lowbit.schedules.featcache`, so the teacher runs each of its sections
once per batch instead of once per section that needs it). Then the trained sections are
loaded into one quantized network (each section's BatchNorm statistics were gathered on teacher
inputs; ``dcq.bn_recalibrate`` re-estimates them on the stitched network), optionally fine-tuned
end to end (``dcq.finetune_epochs``, with ``fit`` and the run folder callback), evaluated,
summarised and written like any run.

Run folder (besides run()'s config.yaml, plan.txt, metrics.jsonl, best.pt, last.pt, summary.json)::

    teacher.pt              the teacher's weights (what every worker loads)
    sections.json           the cut: block names per section, MACs, parameters
    sections/section_I.pt   a finished section's weights (keys of the whole student) + its history
    sections/section_I.jsonl        per-epoch rows: train_loss (feature MSE or task loss), val_loss
    sections/section_I.last.pt      the running section's checkpoint (a killed run resumes there)
    dcq_loss.png            each section's loss over its epochs

``metrics.jsonl`` starts with epoch 0, the stitched network (``stage: stitched``); the fine-tune
epochs follow, and best.pt is the best validation epoch among them (seed 002's protocol).
``resume=True`` skips finished sections, continues a running one from its last epoch, then the
fine-tune from ``last.pt``.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..config import Config
from ..data import BatchLoader, DataSplits
from ..errors import ConfigError
from ..fit import FitState, evaluate, fit, progress_bar, resolve_device, to_device
from ..models import create_model
from ..pretrained import load_weights
from ..quantize import _STATE_ATTR, QuantState, quant_state
from ..train import (RunFolder, RunResult, _save, _truncate_metrics, build_model, build_optimizer, build_scheduler,
                     complete_best, final_model, load_data, make_summary, recalibrate_run_bn)
from .featcache import FeatureCache
from .distill import distill, example_input, feature_regression, load_teacher
from .sections import Cut, block_list, block_macs, blocks, describe, plan_cut, section_modules, section_state

SECTIONS = "sections"


# ---------------------------------------------------------------------------------------------
# the teacher's feature stream
# ---------------------------------------------------------------------------------------------
class FeatureStream:
    """Batches for section i: ``(teacher input of section i, teacher output of section i)``, or
    ``(teacher input of the last section, labels)`` when ``last``, computed batch by batch from
    ``loader`` by the teacher's ``sections`` (0..i-1 for the input, i for the output). Epoch-aware like
    the loader (``set_epoch``), so ``fit`` can resume. With a :class:`FeatureCache` every cut's
    features are read from / written to disk (``stream`` names the loader: train or val)."""

    def __init__(self, loader, sections: list[nn.Module], i: int, last: bool, device: torch.device,
                 cache: FeatureCache | None = None, stream: str = "train"):
        self.loader, self.sections, self.i, self.last, self.device = loader, sections, i, last, device
        self.cache, self.stream = cache, stream

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def _epoch_key(self) -> str:
        varies = getattr(self.loader, "shuffle", True) or getattr(self.loader, "augment", True)
        return f"e{self.loader.epoch}" if varies else "fixed"

    def _cut(self, k: int, x, y, key: str, b: int):
        """The teacher's features entering section k (k = 0: the images)."""
        if k == 0:
            return x
        if self.cache is not None:
            h = self.cache.get(k, self.stream, key, b, y)
            if h is not None:
                return h.to(self.device)
        h = self.sections[k - 1](self._cut(k - 1, x, y, key, b))
        if self.cache is not None:
            self.cache.put(k, self.stream, key, b, y, h)
        return h

    def __iter__(self):
        key = self._epoch_key() if self.cache is not None else ""
        for b, (x, y) in enumerate(self.loader):
            x, y = to_device((x, y), self.device)
            with torch.no_grad():  # (not around the yield: the consumer trains with gradients)
                h = self._cut(self.i, x, y, key, b)
                batch = (h, y) if self.last else (h, self._cut(self.i + 1, x, y, key, b))
            yield batch


@torch.no_grad()
def feature_loss(model: nn.Module, stream) -> float:
    """Mean squared error (per element) of ``model`` against the stream's teacher features, eval mode."""
    was = model.training
    model.eval()
    total, n = torch.zeros((), dtype=torch.float64), 0
    try:
        with parametrize.cached():
            for h, target in stream:
                total += F.mse_loss(model(h), target, reduction="sum").double().cpu()
                n += target.numel()
    finally:
        model.train(was)
    return total.item() / max(n, 1)


# ---------------------------------------------------------------------------------------------
# building teacher and students from the run folder
# ---------------------------------------------------------------------------------------------
def _teacher(cfg: Config, data: DataSplits, run_dir: Path) -> nn.Module:
    info = data.info
    model = create_model(cfg.model.name, in_channels=info.in_channels, num_classes=info.num_classes,
                         image_size=info.image_size, **cfg.model.options)
    load_weights(model, run_dir / "teacher.pt")
    return model.eval().requires_grad_(False)


def _student(cfg: Config, data: DataSplits, run_dir: Path) -> nn.Module:
    """create -> the teacher's weights -> quantize(plan): the whole student network."""
    c = cfg.model_copy(deep=True)
    c.model.init_from = str(run_dir / "teacher.pt")
    return build_model(c, data)


#: dcq fields that decide where and how the sections run, not their weights (docs/dcq.md: parallel, Ray and cached
#: sections train the same weights): a resume may change them, as train.threads
_HOW = {"workers", "backend", "address", "feature_cache_mb", "feature_cache_dir"}


def _trained(cfg_dict: dict) -> dict:
    dcq = cfg_dict.get("dcq")
    return {**cfg_dict, "dcq": {k: v for k, v in dcq.items() if k not in _HOW}} if isinstance(dcq, dict) else cfg_dict


def _read_cut(run_dir: Path, names: list[str]) -> Cut:
    meta = json.loads((run_dir / "sections.json").read_text())
    return Cut([names.index(n) for n in meta["cuts"]], names)


def section_view(model: nn.Module, cut: Cut, i: int) -> nn.Sequential:
    """Section ``i`` of a (quantized) model as an ``nn.Sequential`` sharing its modules, with a
    quant state holding the section's layers (so ``fit`` and the method see a quantized model)."""
    view = section_modules(block_list(model), cut)[i]
    object.__setattr__(view, "whole_network", model)  # DQA's S (003 eq. 6) counts the whole network's weights
    qs = quant_state(model)
    if qs is not None:
        inside = {id(m) for m in view.modules()}
        object.__setattr__(view, _STATE_ATTR,
                           QuantState(qs.plan, qs.method, [lp for lp in qs.layers if id(lp.module) in inside]))
    return view


# ---------------------------------------------------------------------------------------------
# one section (in a worker process or in this one)
# ---------------------------------------------------------------------------------------------
@dataclass
class SectionJob:
    """Picklable inputs of :func:`train_section`: everything else is rebuilt from them."""

    cfg: dict
    run_dir: str
    index: int
    threads: int | None = None
    data: DataSplits | None = None  # the caller's splits (else the worker loads the config's)


class _SectionFolder:
    """fit callback: the validation feature loss, one line of ``section_I.jsonl`` and the
    section's checkpoint after every epoch, then the user's callbacks."""

    def __init__(self, sdir: Path, i: int, val: FeatureStream | None, user=()):
        self.sdir, self.i, self.val, self.user = sdir, i, val, list(user)

    def on_epoch_end(self, state: FitState, row: dict) -> None:
        if self.val is not None:
            row["val_loss"] = feature_loss(state.model, self.val)
        row["section"] = self.i
        with open(self.sdir / f"section_{self.i}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        _save(self.sdir / f"section_{self.i}.last.pt", state.checkpoint())
        for cb in self.user:
            cb(row)


def train_section(job: SectionJob, data: DataSplits | None = None,
                  callbacks: list[Callable[[dict], None]] | None = None) -> dict:
    """Train student section ``job.index`` on the teacher's features; writes
    ``sections/section_I.pt``. Module level, so that spawn workers can run it."""
    if job.threads:
        torch.set_num_threads(job.threads)
    cfg = Config.model_validate(job.cfg)
    d, t, i = cfg.dcq, cfg.train, job.index
    run_dir = Path(job.run_dir)
    sdir = run_dir / SECTIONS
    data = data or job.data or load_data(cfg)
    device = resolve_device(t.device)

    teacher = _teacher(cfg, data, run_dir).to(device)
    tbl = block_list(teacher)
    cut = _read_cut(run_dir, [n for n, _ in tbl])
    t_secs = section_modules(tbl, cut)
    student = _student(cfg, data, run_dir).to(device)
    view = section_view(student, cut, i)
    method = quant_state(student).method
    last = i == cut.n - 1
    cache = None
    if d.feature_cache_mb:
        cache = FeatureCache(Path(d.feature_cache_dir) if d.feature_cache_dir else run_dir / "feature_cache",
                             int(d.feature_cache_mb * 2**20),
                             FeatureCache.fingerprint(job.cfg, cut.cut_names(), run_dir / "teacher.pt"))
    if not last:
        feature_regression(method)
    elif d.distill is not None:
        distill(method, t_secs[i], d.distill.temperature, d.distill.alpha)

    ts = t.model_copy(update={"epochs": d.epochs or t.epochs})
    train = FeatureStream(BatchLoader(data.train, data.info, t.batch_size, shuffle=True, augment=cfg.data.augment,
                                      seed=t.seed), t_secs, i, last, device, cache, "train")
    val = FeatureStream(BatchLoader(data.val, data.info, t.eval_batch_size), t_secs, i, last, device, cache, "val")
    opt = build_optimizer(view, ts, method)
    sched = build_scheduler(opt, ts, len(train))
    ck_path, rows_path = sdir / f"section_{i}.last.pt", sdir / f"section_{i}.jsonl"
    ck = None
    if ck_path.is_file():
        ck = torch.load(ck_path, weights_only=False, map_location=device)
        _truncate_metrics(rows_path, ck["epoch"] + 1)
    else:
        rows_path.write_text("")
    folder = _SectionFolder(sdir, i, None if last else val, callbacks or [])
    fit(view, train, method, opt, sched, epochs=ts.epochs, device=device, callbacks=[folder],
        val_batches=val if last else None, resume=ck, progress=False)
    rows = [json.loads(ln) for ln in rows_path.read_text().splitlines() if ln.strip()]
    _save(sdir / f"section_{i}.pt", {"model": section_state(student, cut, i), "history": rows,
                                     "feature_cache": cache.stats() if cache is not None else None})
    ck_path.unlink(missing_ok=True)
    return {"section": i, "train_loss": rows[-1]["train_loss"], "val_loss": rows[-1]["val_loss"]}


class _Progress:
    """One tqdm bar over all section epochs, fed by polling the sections' metrics files (works for
    worker processes and for sections trained in this process alike)."""

    def __init__(self, sdir: Path, n: int, epochs: int, enabled: bool):
        self.sdir, self.n, self.epochs, self.enabled = sdir, n, epochs, enabled
        self.stop = threading.Event()

    def __enter__(self):
        if self.enabled:
            self.shown = None  # the bar is redrawn when a section finishes an epoch, not every poll (a log's lines)
            self.bar = progress_bar(total=self.n * self.epochs, desc=f"DCQ {self.n} sections", logs=True)
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def _poll(self) -> None:
        while not self.stop.wait(0.5):
            self._update()

    def _update(self) -> None:
        done, post = 0, []
        for i in range(self.n):
            try:
                rows = [json.loads(ln) for ln in (self.sdir / f"section_{i}.jsonl").read_text().splitlines() if ln.strip()]
            except (OSError, ValueError):
                rows = []
            done += len(rows)
            post.append(f"s{i} {len(rows)}/{self.epochs}" + (f" {rows[-1]['train_loss']:.3g}" if rows else ""))
        if (done, post) == self.shown:
            return
        self.shown = done, post
        self.bar.n = done
        self.bar.set_postfix_str("  ".join(post), refresh=True)

    def __exit__(self, *exc):
        if self.enabled:
            self.stop.set()
            self.thread.join()
            self._update()
            self.bar.close()
        return False


def _train_sections(cfg: Config, run_dir: Path, todo: list[int], data: DataSplits, callbacks,
                    send_data: bool) -> None:
    d, t = cfg.dcq, cfg.train
    workers = min(d.workers, len(todo))
    if workers <= 1 and d.backend == "local":
        for i in todo:
            train_section(SectionJob(cfg.to_dict(), str(run_dir), i), data=data, callbacks=callbacks)
        return
    from ..parallel import make_pool

    per = max(1, (t.threads or torch.get_num_threads()) // max(workers, 1))
    backend = d.backend
    d = cfg.to_dict()
    d["train"]["progress"] = False
    with make_pool(backend, max(workers, 1), per, cfg.dcq.address) as pool:
        futures = [pool.submit(train_section, SectionJob(d, str(run_dir), i, per, data if send_data else None))
                   for i in todo]
        try:
            for f in futures:
                f.result()  # a worker's error is raised here
        except BaseException:
            for f in futures:
                f.cancel()
            raise


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def run_dcq(cfg: Config, run_dir: str | Path, resume: bool = False, data: DataSplits | None = None,
            callbacks: list[Callable[[dict], None]] | None = None) -> RunResult:
    """Train ``cfg`` (with a ``dcq`` section) into ``run_dir``; ``lowbit.run`` calls this for such a config.

    ``callbacks`` get every metrics row: the sections' (with a ``section`` key) when they train in
    this process (``dcq.workers: 1``), and the fine-tune epochs'. Raising from one stops the run
    there, resumable."""
    d, t = cfg.dcq, cfg.train
    if d is None:
        raise ConfigError("run_dcq: the config has no dcq section")
    if t.distill is not None:
        raise ConfigError("train.distill: a DCQ run distills with dcq.distill (from dcq.teacher)")
    if t.freeze_bn_after is not None:
        raise ConfigError("train.freeze_bn_after: not supported in a DCQ run (its sections and fine-tune train with "
                          "batch statistics; use dcq.bn_recalibrate)")
    if cfg.model.init_from:
        raise ConfigError("model.init_from: a DCQ run starts every section from dcq.teacher; remove init_from")
    if d.backend == "ray":  # the pool is made after the run folder is written: without Ray, refused before it
        from ..parallel import import_ray

        import_ray()
    run_dir = Path(run_dir)
    sdir = run_dir / SECTIONS
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    given = data is not None  # the caller's splits go to the workers too (else each loads them)
    data = data or load_data(cfg)
    example = example_input(data.info)

    if resume:
        if not (run_dir / "sections.json").is_file():
            raise ConfigError(f"cannot resume: {run_dir} holds no DCQ run (no sections.json)")
        recorded = json.loads((run_dir / "sections.json").read_text()).get("config")
        if isinstance(recorded, dict):  # the sections were trained with it (config.yaml may be edited since)
            from ..runfolder import edits_since

            edited = edits_since(_trained(recorded), _trained(cfg.to_dict()))
            if edited:
                raise ConfigError(f"cannot resume {run_dir}: its sections were trained with another config ({edited})")
        teacher = _teacher(cfg, data, run_dir)
        bl = blocks(teacher, example)
        cut = _read_cut(run_dir, [n for n, _ in bl])
    else:
        if (run_dir / "sections.json").exists():
            raise ConfigError(f"{run_dir} already holds a DCQ run; resume it or choose another folder")
        teacher = load_teacher(d.teacher, cfg, data, "dcq.teacher", same_architecture=True)
        bl = blocks(teacher, example)
        cut = plan_cut(bl, d.sections, block_macs(bl, example))
        sdir.mkdir(parents=True, exist_ok=True)
        _save(run_dir / "teacher.pt", teacher.state_dict())
    macs = block_macs(bl, example)
    params = [sum(p.numel() for p in m.parameters()) for _, m in bl]
    described = describe(cut, macs, params)
    if not resume:
        (run_dir / "sections.json").write_text(json.dumps({"cuts": cut.cut_names(), "sections": described,
                                                           "config": cfg.to_dict()}, indent=2)
                                               + "\n")
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        (run_dir / "plan.txt").write_text(quant_state(_student(cfg, data, run_dir)).table() + "\n")

    # 1. the sections, in parallel or one after the other; finished ones are skipped
    epochs = d.epochs or t.epochs
    todo = [i for i in range(cut.n) if not (sdir / f"section_{i}.pt").is_file()]
    t0 = time.perf_counter()
    with _Progress(sdir, cut.n, epochs, enabled=t.progress and bool(todo)):
        _train_sections(cfg, run_dir, todo, data, callbacks, send_data=given)
    sections_wall = time.perf_counter() - t0
    records = [torch.load(sdir / f"section_{i}.pt", weights_only=False) for i in range(cut.n)]

    # 2. stitch: the sections' weights into one student; BatchNorm re-estimated if asked
    student = _student(cfg, data, run_dir).to(device)
    sd = student.state_dict()
    for rec in records:
        sd.update(rec["model"])
    student.load_state_dict(sd)
    if d.bn_recalibrate:
        recalibrate_run_bn(student, cfg, data, d.bn_recalibrate)
    train_loader = BatchLoader(data.train, data.info, t.batch_size, shuffle=True, augment=cfg.data.augment, seed=t.seed)
    # the sections' schedules ended at their last step (DQA's T, BinaryRelax's omega): the stitched network's too
    # (before session 26 it was at its start: the summary and an eval_mode: mixture evaluation described T = 100)
    quant_state(student).method.end_schedule(student, (d.epochs or t.epochs) * len(train_loader), len(train_loader))
    val_loader = BatchLoader(data.val, data.info, t.eval_batch_size)
    test_loader = BatchLoader(data.test, data.info, t.eval_batch_size)
    stitched_val = evaluate(student, val_loader, device)
    stitched_test = evaluate(student, test_loader, device)
    row0 = {"epoch": 0, "stage": "stitched", "train_loss": math.nan, "train_acc": math.nan,
            "val_loss": stitched_val["loss"], "val_acc": stitched_val["acc"], "lr": math.nan,
            "epoch_time": sections_wall}

    # 3. the optional end-to-end fine-tune (fit + run()'s run-folder callback), best validation epoch
    best = {"val_acc": stitched_val["acc"], "epoch": 0}
    last = run_dir / "last.pt"
    ck = None
    if d.finetune_epochs and resume and last.is_file():
        ck = torch.load(last, weights_only=False, map_location=device)
        best = ck["best"]
        _truncate_metrics(run_dir / "metrics.jsonl", ck["epoch"] + 1)
        complete_best(run_dir, ck, device)
    else:
        (run_dir / "metrics.jsonl").write_text(json.dumps(row0) + "\n")
        _save(run_dir / "best.pt", {"model": student.state_dict(), "epoch": 0,
                                    "method": quant_state(student).method.state_dict()})
    method = quant_state(student).method
    if d.finetune_epochs:
        if d.distill is not None:
            distill(method, teacher.to(device), d.distill.temperature, d.distill.alpha)
        ft = t.model_copy(update={"epochs": d.finetune_epochs, "lr": d.finetune_lr or t.lr})
        opt = build_optimizer(student, ft, method)
        sched = build_scheduler(opt, ft, len(train_loader))
        folder = RunFolder(run_dir, best, callbacks or [])
        fit(student, train_loader, method, opt, sched, epochs=ft.epochs, device=device, callbacks=[folder],
            val_batches=val_loader, resume=ck, progress=t.progress)
        best = folder.best

    # 4. as run(): the best epoch's network, finalized, evaluated, summarised
    best_ck = torch.load(run_dir / "best.pt", weights_only=False, map_location=device)
    best_ck.pop("final_bn", None)
    final_model(student, best_ck)
    if t.bn_recalibrate:
        best_ck["final_bn"] = recalibrate_run_bn(student, cfg, data, t.bn_recalibrate)
        _save(run_dir / "best.pt", best_ck)
    test = evaluate(student, test_loader, device)
    summary = make_summary(cfg, student, data, test, best)
    summary["dcq"] = dcq_record(cfg, data, described, records, stitched_val, stitched_test,
                                sections_wall if todo else None, len(todo))
    from ..runfolder import atomic_write

    atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")  # whole or absent: it marks a finished run
    from ..viz.dcq import plot_dcq

    try:
        plot_dcq(run_dir)
    except ImportError as e:  # matplotlib is the optional "plot" extra (as NCE's and ReLeQ's plots)
        if not (e.name or "").startswith("matplotlib"):
            raise
    return RunResult(run_dir, summary, student)


def dcq_record(cfg: Config, data: DataSplits, described: list[dict], records: list[dict], stitched_val: dict,
               stitched_test: dict, sections_wall: float | None, trained_now: int) -> dict:
    """summary.json's ``dcq`` entry: the cut, per-section losses and times, the stitched network's
    accuracy (before any fine-tune) and the training budget in sample-passes (docs/dcq.md)."""
    d = cfg.dcq
    n = len(data.train)
    epochs = d.epochs or cfg.train.epochs
    shares = [s["mac_share"] for s in described]
    # teacher forwards (no backward) per training sample, in units of one whole-network forward
    teacher_fwd = sum(sum(shares[: i + 1]) if (i < len(shares) - 1 or d.distill) else sum(shares[:i])
                      for i in range(len(shares)))
    return {
        "teacher": d.teacher, "sections": len(described), "cuts": [s["blocks"][0] for s in described[1:]],
        "section_epochs": epochs, "finetune_epochs": d.finetune_epochs, "workers": d.workers,
        "section_info": [{**s, "train_loss": r["history"][-1]["train_loss"], "val_loss": r["history"][-1]["val_loss"],
                          "time_s": sum(h["epoch_time"] for h in r["history"]),
                          "feature_cache": r.get("feature_cache")}
                         for s, r in zip(described, records)],
        "sections_wall_s": sections_wall, "sections_trained_this_session": trained_now,
        "stitched_val_acc": stitched_val["acc"], "stitched_test_acc": stitched_test["acc"],
        # student training steps, each sample weighted by the section's share of the network's MACs
        "sample_passes": n * (epochs + d.finetune_epochs),
        "teacher_forward_sample_passes": n * (epochs * teacher_fwd + (d.finetune_epochs if d.distill else 0)),
    }
