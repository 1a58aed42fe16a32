"""Training schedules over :func:`lowbit.fit`: knowledge distillation for any method, DCQ, and an FP32 warm-up
before the plan (``train.float_warmup_epochs``, :mod:`lowbit.schedules.warmup`).

>>> from lowbit.schedules import distill, run_dcq
>>> distill(lowbit.quant_state(model).method, teacher, temperature=4, alpha=0.9)  # KD, any method
>>> run_dcq(cfg, "runs/dcq")             # or `lowbit train CONFIG` with a `dcq:` section

A schedule never copies the loop: it calls ``fit``/``evaluate`` and changes what a method's hooks do.
"""

from .distill import distill, feature_regression, kd_loss, load_teacher
from .sections import blocks, plan_cut


def run_dcq(*args, **kwargs):
    """:func:`lowbit.schedules.dcq.run_dcq` (imported late: it needs the run-folder layer)."""
    from .dcq import run_dcq as _run

    return _run(*args, **kwargs)


__all__ = ["blocks", "distill", "feature_regression", "kd_loss", "load_teacher", "plan_cut", "run_dcq"]
