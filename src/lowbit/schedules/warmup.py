"""A float warm-up before the plan: ``train.float_warmup_epochs: N``, a schedule over :func:`lowbit.train.run`.

The first N of ``train.epochs`` train the config's model unquantized (FP32: no plan, at the config's lr held
constant) into the run folder's ``warmup/``, a run folder of its own; then the plan trains the rest from those
weights (``model.init_from: RUN_DIR/warmup``, latent weights), as an ordinary run in the run folder, its lr going
on where the config's schedule would be after N epochs (cosine: ``lr·½(1 + cos(π·N/epochs))`` to 12 significant
digits; constant: ``lr``).
So one config trains what two runs chained by ``model.init_from`` train, number for number
(tests/test_warmup.py), and a user needs neither the second config nor the first run's folder name.

Integer mode from scratch is the use (docs/export.md): on ResNet-8 its defaults lost 0.2-1.1 points to today's
mode trained from scratch (docs/integer-log.md, "Session 33"); after one FP32 epoch they matched or beat it at
W2A2 / W4A4 / W8A8 (+2.29 / +0.25 / +0.22, a test declared in advance; ``benchmarks/integer_seeds.py``, the rows
``integer warm1``). The warm-up lifts today's mode too (+2.12 / +0.50 / +0.22): docs/integer-log.md, "Session 34".

Run folder: config.yaml is the config as given (``float_warmup_epochs`` in it); ``metrics.jsonl``, ``best.pt``,
``last.pt`` and ``summary.json`` are the quantized stage's (its epochs count from 1: the best epoch is among
them, never an FP32 one); ``warmup/`` holds the FP32 stage's. ``resume`` (and a restart of the same config in
a folder whose warm-up was cut short) continues whichever stage was running.

The warm-up drops what belongs to the quantized network: BatchNorm freezing (``freeze_bn_after``, counted from
the run's start, must fall after the warm-up), ``bn_recalibrate`` and distillation.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from ..config import Config
from ..errors import ConfigError
from ..plan import Plan

WARMUP_DIR = "warmup"


def stage_configs(cfg: Config, run_dir: str | Path) -> tuple[Config, Config]:
    """(the FP32 warm-up's config, the quantized stage's config) of ``cfg`` trained into ``run_dir``."""
    t = cfg.train
    n, epochs = t.float_warmup_epochs, t.epochs
    if not n:
        raise ConfigError("stage_configs: the config has no train.float_warmup_epochs")
    warm_train = t.model_copy(update={"epochs": n, "schedule": "constant", "float_warmup_epochs": 0,
                                      "freeze_bn_after": None, "freeze_bn_gradient": "running",
                                      "bn_recalibrate": 0, "distill": None})
    warm = cfg.model_copy(update={"name": f"{cfg.name} (FP32 warm-up)", "train": warm_train,
                                  "plan": Plan(weight=None, act=None)})
    # to 12 significant digits: 0.1 after 1 of 3 epochs is 0.075, as a user would write it (0.07500000000000001
    # unrounded), so that the two runs chained by hand with the written lr compute the same numbers
    lr = float(f"{t.lr * 0.5 * (1 + math.cos(math.pi * n / epochs)):.12g}") if t.schedule == "cosine" else t.lr
    main_train = t.model_copy(update={
        "epochs": epochs - n, "lr": lr, "float_warmup_epochs": 0,
        "freeze_bn_after": None if t.freeze_bn_after is None else t.freeze_bn_after - n})
    model = cfg.model.model_copy(update={"init_from": str(Path(run_dir) / WARMUP_DIR), "init_weights": "latent"})
    return warm, cfg.model_copy(update={"train": main_train, "model": model})


def run_warmup(cfg: Config, run_dir: str | Path, resume: bool = False, data=None,
               callbacks: list[Callable[[dict], None]] | None = None):
    """Train ``cfg`` (``train.float_warmup_epochs`` > 0) into ``run_dir``: the FP32 warm-up, then the plan.
    ``lowbit.train.run`` calls this for such a config (holding ``run_dir``'s lock). Returns the quantized
    stage's :class:`lowbit.train.RunResult`; each callback gets every epoch's row, the warm-up's first."""
    from .. import distributed as ddp
    from ..runfolder import atomic_write, discard_if_unused
    from ..train import _run, build_model, load_data, run, without_init_from

    if ddp.active():
        raise ConfigError("torchrun: train.float_warmup_epochs does not run distributed yet; run it in one process, "
                          "or chain two runs with model.init_from")
    run_dir = Path(run_dir)
    warm_cfg, main_cfg = stage_configs(cfg, run_dir)

    def say(line: str) -> None:  # beside fit's epoch lines, which count each stage's epochs from 1
        if cfg.train.progress:
            from tqdm import tqdm

            tqdm.write(line)

    data = data or load_data(cfg)
    wdir = run_dir / WARMUP_DIR
    if not (wdir / "summary.json").is_file():
        fresh = not (run_dir / "config.yaml").is_file()
        if fresh:
            # the plan on this model before the warm-up trains: a plan that cannot apply fails now, not after it
            build_model(without_init_from(cfg), data)
            # a run folder from the start: --resume finds it
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(run_dir / "config.yaml", cfg.to_yaml())
        say(f"FP32 warm-up: {warm_cfg.train.epochs} of {cfg.train.epochs} epochs, into {wdir}")
        try:
            run(warm_cfg, wdir, resume=(wdir / "last.pt").is_file(), data=data, callbacks=callbacks)
        except BaseException:
            if fresh and discard_if_unused(wdir):  # it failed before writing anything (a bad model, a missing file):
                (run_dir / "config.yaml").unlink(missing_ok=True)  # no run folder is left, as a plain run leaves none
            raise
    say(f"the plan, from the warm-up's weights: {main_cfg.train.epochs} of {cfg.train.epochs} epochs, lr "
        f"{main_cfg.train.lr:g} {cfg.train.schedule}")
    return _run(main_cfg, run_dir, resume and (run_dir / "last.pt").is_file(), data, callbacks, record=cfg)
