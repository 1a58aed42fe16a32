"""The accuracy of a per-layer bit assignment: one function that every bit search shares.

``BitEvaluator(spec).accuracy(bits)`` starts from the same network every time (the config's model,
``model.init_from`` loaded, the plan applied: FP32 or quantized weights), sets the searched layers'
weight bits with :func:`lowbit.set_bits`, fine-tunes ``finetune_steps`` steps on the training split
with :func:`lowbit.fit` and returns the accuracy on the *validation* split (:func:`lowbit.evaluate`;
the test split is never read). The fine-tune batches and the random state are the same for every
assignment, so an assignment's accuracy is a function of its bits: it is cached on disk (one JSON
line per assignment, ``cache.jsonl``) and a repeated assignment costs nothing.

ReLeQ, the baselines (uniform, random, per-layer sensitivity) and any later backend call only
:meth:`BitEvaluator.accuracy` / :meth:`BitEvaluator.accuracies`; the latter runs the missing
assignments in ``workers`` processes or Ray tasks (:mod:`lowbit.parallel`; each rebuilt from the
picklable :class:`EvalSpec`, torch threads divided between them).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..errors import ConfigError

Bits = tuple[int, ...]


@dataclass
class EvalSpec:
    """Everything a worker process needs to rebuild the evaluator (plain data, picklable)."""

    config: dict  # a lowbit Config as a dict (model.init_from: the starting checkpoint)
    layers: list[str] | None  # the searched layers, in order (None: every weight-quantized layer)
    finetune_steps: int = 50
    finetune_lr: float = 0.01
    seed: int = 0
    threads: int | None = None
    extra: dict = field(default_factory=dict)


def _key(bits: Sequence[int]) -> str:
    return ",".join(str(int(b)) for b in bits)


class BitEvaluator:
    """Validation accuracy of bit assignments after a short fine-tune, cached by the bit tuple."""

    def __init__(self, spec: EvalSpec, cache_path: str | Path | None = None, workers: int = 1,
                 backend: str = "local", address: str | None = None):
        if spec.finetune_steps < 0:
            raise ConfigError(f"finetune_steps must be >= 0, got {spec.finetune_steps}")
        if workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        self.spec = spec
        self.workers = workers
        # with workers, every evaluation runs at the workers' thread count, in this process too: torch's threads
        # change a fine-tune's numbers, and an assignment evaluated here (2 threads) and in a worker (1) gave
        # 16.67 % and 20.00 % (session 27), so an accuracy depended on where it ran, not only on its bits
        self.eval_threads = max(1, (spec.threads or torch.get_num_threads()) // workers) if workers > 1 else None
        self.backend, self.address = backend, address
        self.cache_path = Path(cache_path) if cache_path else None
        self.cache: dict[str, dict] = {}
        self.fits = 0  # fine-tunes run in this process (the cache test counts them)
        self.evaluated = 0  # assignments computed (here or in workers), i.e. cache misses
        self._built = False
        if self.cache_path and self.cache_path.is_file():
            for line in self.cache_path.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self.cache[_key(rec["bits"])] = rec

    # -- the network ------------------------------------------------------------------------------
    def _build(self) -> None:
        if self._built:
            return
        from ..config import Config
        from ..data import BatchLoader
        from ..train import build_model, load_data

        if self.spec.threads:
            torch.set_num_threads(self.spec.threads)
        cfg = Config.model_validate(self.spec.config)
        self.cfg = cfg
        self.data = load_data(cfg)
        self.model = build_model(cfg, self.data)
        from ..quantize import quant_state

        names = [lp.name for lp in quant_state(self.model).layers if lp.weight is not None]
        if self.spec.layers is None:
            self.spec.layers = names
        missing = [n for n in self.spec.layers if n not in names]
        if missing or not self.spec.layers:
            raise ConfigError(f"search layers {missing or '[]'} are not weight-quantized layers; these are: "
                              f"{', '.join(names) or 'none'}")
        self.start = copy.deepcopy(self.model.state_dict())
        t = cfg.train
        loader = BatchLoader(self.data.train, self.data.info, t.batch_size, shuffle=True,
                             augment=cfg.data.augment, seed=self.spec.seed)
        self.train_batches = list(itertools.islice(_epochs(loader), self.spec.finetune_steps))
        self.val = BatchLoader(self.data.val, self.data.info, t.eval_batch_size)
        if len(self.data.val) == 0:
            raise ConfigError("the search needs a validation split (data.val_fraction > 0)")
        self._built = True

    def compute(self, bits: Sequence[int]) -> dict:
        """Fine-tune and evaluate one assignment now (no cache)."""
        self._build()
        if len(bits) != len(self.spec.layers):
            raise ConfigError(f"expected {len(self.spec.layers)} bit widths, got {len(bits)}")
        t0 = time.perf_counter()
        was = torch.get_num_threads()
        if self.eval_threads:
            torch.set_num_threads(self.eval_threads)
        try:
            res = self._finetune_and_evaluate(bits)
        finally:
            torch.set_num_threads(was)
        return {"bits": [int(b) for b in bits], "acc": res["acc"], "loss": res["loss"],
                "seconds": round(time.perf_counter() - t0, 4)}

    def _finetune_and_evaluate(self, bits: Sequence[int]) -> dict:
        from ..fit import evaluate, fit
        from ..quantize import set_bits
        from ..train import build_optimizer

        model = self.model
        model.load_state_dict(self.start)
        set_bits(model, {n: int(b) for n, b in zip(self.spec.layers, bits)})
        with torch.random.fork_rng(devices=[]):  # seeded here, without resetting the caller's generator
            torch.manual_seed(self.spec.seed)  # (the agent samples its actions from it)
            if self.train_batches:
                t = self.cfg.train.model_copy(update={"lr": self.spec.finetune_lr})
                fit(model, self.train_batches, optimizer=build_optimizer(model, t), epochs=1)
                self.fits += 1
            return evaluate(model, self.val)

    # -- cached API -------------------------------------------------------------------------------
    def _store(self, rec: dict) -> None:
        self.cache[_key(rec["bits"])] = rec
        self.evaluated += 1
        if self.cache_path:
            with open(self.cache_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def cached(self, bits: Sequence[int]) -> dict | None:
        return self.cache.get(_key(bits))

    def record(self, bits: Sequence[int]) -> dict:
        """The cached record (acc, loss, seconds) of ``bits``, computing it on a miss."""
        rec = self.cache.get(_key(bits))
        if rec is None:
            rec = self.compute(bits)
            self._store(rec)
        return rec

    def accuracy(self, bits: Sequence[int]) -> float:
        return self.record(bits)["acc"]

    def accuracies(self, many: Iterable[Sequence[int]]) -> list[float]:
        """Accuracies of many assignments; the missing ones in ``workers`` processes."""
        many = [tuple(int(b) for b in bits) for bits in many]
        todo = list(dict.fromkeys(b for b in many if _key(b) not in self.cache))
        if (self.workers > 1 or self.backend != "local") and len(todo) > 1:
            from ..parallel import make_pool

            spec = copy.deepcopy(self.spec)
            spec.threads = self.eval_threads or self.spec.threads or torch.get_num_threads()
            with make_pool(self.backend, self.workers, spec.threads, self.address, _worker_init, (spec,)) as pool:
                for rec in pool.map(_worker_compute, todo):
                    self._store(rec)
        else:
            for b in todo:
                self.record(b)
        return [self.cache[_key(b)]["acc"] for b in many]


def _epochs(loader):
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


_WORKER: BitEvaluator | None = None


def _worker_init(spec: EvalSpec) -> None:
    global _WORKER
    os.environ["OMP_NUM_THREADS"] = str(spec.threads or 1)
    _WORKER = BitEvaluator(spec)


def _worker_compute(bits: Bits) -> dict:
    return _WORKER.compute(bits)
