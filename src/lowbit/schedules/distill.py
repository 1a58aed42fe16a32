"""Knowledge distillation for every method, and the feature-regression loss of DCQ's sections.

Both change only a method's ``loss`` hook, so they are *mixins* put on any
:class:`~lowbit.methods.Method` instance (its class becomes ``Distilled<Class>``, a subclass whose
``loss`` calls the method's own ``loss`` through ``super()``). Everything else the method does (its
parametrizations, ``extra_loss``, ``param_groups``, ``train_step``, schedule callbacks, ``finalize``)
is untouched, and the change is made *in place*: ``quant_state(model).method`` and any module that
refers to the method see it::

    model = lowbit.quantize(model, plan)
    method = lowbit.schedules.distill(lowbit.quant_state(model).method, teacher, temperature=4, alpha=0.9)
    lowbit.fit(model, batches, method)

Hinton et al., "Distilling the Knowledge in a Neural Network" (2015):

    loss = (1 - alpha) · task + alpha · T² · KL( softmax(teacher(x) / T) || softmax(student(x) / T) )

with the KL averaged over the batch; ``task`` is the method's own loss (cross-entropy by default).
The teacher runs in eval mode, without gradients, on the output's device.
In a config: ``train.distill: {teacher: RUN_DIR | FILE.pt, temperature: 4, alpha: 0.9}``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..methods import Method


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T² · KL(softmax(teacher/T) || softmax(student/T)), mean over the batch."""
    t = float(temperature)
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


class _Distilling(Method):
    """Mixin: the method's loss mixed with the KD term against ``self.kd_teacher``."""

    kd_teacher: nn.Module
    kd_temperature: float
    kd_alpha: float

    def loss(self, model: nn.Module, batch: Any, output: Tensor) -> Tensor:
        task = super().loss(model, batch, output)
        if self.kd_alpha == 0:
            return task
        teacher = self.kd_teacher
        p = next(teacher.parameters(), None)
        if p is not None and p.device != output.device:
            teacher.to(output.device)
        with torch.no_grad():
            target = teacher(batch[0])
        return (1 - self.kd_alpha) * task + self.kd_alpha * kd_loss(output, target, self.kd_temperature)

    def summary(self, model: nn.Module) -> dict:
        return {**super().summary(model), "distill": f"T={self.kd_temperature:g}, alpha={self.kd_alpha:g}"}


class _FeatureTarget(Method):
    """Mixin: the loss is the MSE between the output and ``batch[1]`` (a teacher's features); the
    step reports no class scores (fit shows no training accuracy)."""

    def loss(self, model: nn.Module, batch: Any, output: Tensor) -> Tensor:
        return F.mse_loss(output, batch[1])

    def train_step(self, model, batch, optimizer, step):
        res = super().train_step(model, batch, optimizer, step)
        res.output = None
        return res

    def summary(self, model: nn.Module) -> dict:
        return {**super().summary(model), "loss": "feature MSE"}


@lru_cache(maxsize=None)
def _mixed(mixin: type, cls: type) -> type:
    prefix = {_Distilling: "Distilled", _FeatureTarget: "FeatureRegression"}[mixin]
    return type(f"{prefix}{cls.__name__}", (mixin, cls), {"__module__": cls.__module__})


def _with(method: Method, mixin: type) -> Method:
    if not isinstance(method, Method):
        raise ConfigError(f"expected a lowbit Method instance, got {type(method).__name__}")
    if not isinstance(method, mixin):
        method.__class__ = _mixed(mixin, type(method))
    return method


def distill(method: Method, teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9) -> Method:
    """Make ``method`` (in place; returned) add Hinton's KD from ``teacher`` (a module mapping the
    batch's input to logits) to its loss. Applying it again replaces teacher and settings."""
    if not temperature > 0:
        raise ConfigError(f"distill: temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise ConfigError(f"distill: alpha must be within [0, 1], got {alpha}")
    if not isinstance(teacher, nn.Module):
        raise ConfigError(f"distill: the teacher must be an nn.Module, got {type(teacher).__name__}")
    if not method.loss_based:
        raise ConfigError(f"distill: method '{method.name}' trains on its own error signals (NITI: an integer "
                          "error; local: each block's own loss), not the one loss distillation changes; train without "
                          "train.distill")
    teacher.eval().requires_grad_(False)
    method = _with(method, _Distilling)
    method.kd_teacher, method.kd_temperature, method.kd_alpha = teacher, float(temperature), float(alpha)
    return method


def feature_regression(method: Method) -> Method:
    """Make ``method`` (in place; returned) train on ``(input, target features)`` batches with the
    MSE between the output and the target (DCQ's student sections)."""
    return _with(method, _FeatureTarget)


# ---------------------------------------------------------------------------------------------
# teachers from a config
# ---------------------------------------------------------------------------------------------
def load_teacher(source: str | Path, cfg, data, where: str, same_architecture: bool = False) -> nn.Module:
    """The teacher network of ``source``, in eval mode without gradients.

    * a run folder: the network that run reported (``load_run``); its architecture may differ from
      the config's unless ``same_architecture`` (then its weights must fit the config's model, and
      the config's model with those weights is returned, unquantized: DCQ cuts and copies it);
    * a .pt file: the config's model with the file's weights (:func:`lowbit.load_weights`).

    Every mismatch is one line prefixed with ``where``.
    """
    from ..models import create_model
    from ..pretrained import load_weights, plain_state_dict
    from ..quantize import quant_state
    from ..train import load_run

    p = Path(source)
    info = data.info
    fresh = create_model(cfg.model.name, in_channels=info.in_channels, num_classes=info.num_classes,
                         image_size=info.image_size, **cfg.model.options)
    try:
        if p.is_dir():
            if not (p / "config.yaml").is_file():
                raise ConfigError(f"{p} is a folder but not a run folder (no config.yaml)")
            tcfg, _, teacher, _ = load_run(p)
            if tcfg.data.name != cfg.data.name:  # session 25: a 28x28 Fashion-MNIST teacher taught an 8x8 digits run
                raise ConfigError(f"{p} was trained on {tcfg.data.name}, this run trains on {cfg.data.name}")
            if same_architecture:
                qs = quant_state(teacher)
                if qs is not None and any(lp.weight or lp.act for lp in qs.layers):
                    raise ConfigError(f"{p} is a quantized run; a full-precision teacher is needed")
                if tcfg.model.name != cfg.model.name or tcfg.model.options != cfg.model.options:
                    desc = lambda m: f"{m.name} {m.options}" if m.options else m.name  # noqa: E731
                    raise ConfigError(f"the teacher is {desc(tcfg.model)} but model is {desc(cfg.model)}")
                teacher = load_weights(fresh, plain_state_dict(teacher.state_dict()))
        elif p.is_file():
            teacher = load_weights(fresh, p)
        else:
            raise ConfigError(f"not found: {p} (a run folder or a .pt file)")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    teacher.eval().requires_grad_(False)
    return teacher


def check_logits(teacher: nn.Module, example: Tensor, num_classes: int, where: str) -> None:
    """One-line error when the teacher does not map this data's input to ``num_classes`` logits."""
    with torch.no_grad():
        try:
            t = teacher(example)
        except RuntimeError as e:
            raise ConfigError(f"{where}: the teacher does not take this data's input "
                              f"({str(e).splitlines()[0][:120]})") from None
    if tuple(t.shape) != (len(example), num_classes):
        raise ConfigError(f"{where}: the teacher gives outputs of shape {tuple(t.shape[1:])}, the data has "
                          f"{num_classes} classes")


def example_input(info, n: int = 2) -> Tensor:
    """A fixed random batch of the dataset's input shape (probes; no global RNG drawn)."""
    h, w = info.image_size if isinstance(info.image_size, (tuple, list)) else (info.image_size,) * 2
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, info.in_channels, h, w, generator=g)


def distill_from_config(method: Method, cfg, data, device) -> Method:
    """``train.distill`` of ``cfg`` applied to ``method`` (in place)."""
    d = cfg.train.distill
    teacher = load_teacher(d.teacher, cfg, data, "train.distill.teacher").to(device)
    check_logits(teacher, example_input(data.info).to(device), data.info.num_classes, "train.distill.teacher")
    return distill(method, teacher, d.temperature, d.alpha)
