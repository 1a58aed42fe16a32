"""The method interface: how a quantized layer is trained.

A method supplies three things, and nothing else changes between methods:

1. the **weight parametrization** of each quantized layer (a module registered with
   ``torch.nn.utils.parametrize``, so that ``layer.weight`` *is* the quantized weight) and the
   **activation quantizer** put in front of the layer's input;
2. the **loss**: ``loss(model, batch, output)`` (the task loss, cross-entropy by default; DCQ's
   feature MSE, local losses) plus optional **extra loss terms** (``extra_loss(model)``: DQA's
   bitwidth penalty, SinReQ), and the **parameter groups** the optimizer gets
   (``param_groups(model)``: e.g. learned bits without weight decay);
3. **the step** (``train_step``: forward, loss, backward, optimizer step), overridden by methods
   that step differently (alternating weight/architecture steps, integer updates);
4. **callbacks** on the training schedule (``setup`` before training, ``on_step`` before each
   batch, ``on_epoch_end``, ``finalize`` after training): temperatures, relaxation factors.

:func:`lowbit.fit` calls these; nothing in a method reads files or configs.

Plain straight-through QAT (:class:`STE`) is the base class with no extras. A new method
subclasses :class:`Method`, overrides what it changes, and registers itself by name.
Parametrization modules expose ``bits`` and ``n_scales`` (what the layer costs at deployment).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, TrainingDiverged
from ..plan import QuantSpec
from ..registry import Registry
from ..quant import Quantizer, build_quantizer


class QuantizedWeight(nn.Module):
    """Weight parametrization ``w -> Q(w)`` with the quantizer's straight-through gradient."""

    def __init__(self, quantizer: Quantizer):
        super().__init__()
        self.quantizer = quantizer

    def forward(self, w: Tensor) -> Tensor:
        return self.quantizer(w)

    @property
    def bits(self) -> int:
        return self.quantizer.bits

    @property
    def n_scales(self) -> int:
        return self.quantizer.n_scales

    def set_bits(self, bits: int) -> None:
        """Change the weight's bit width in place (:meth:`lowbit.quant.Quantizer.set_bits`)."""
        self.quantizer.set_bits(bits)


def build_from_spec(spec: QuantSpec, role: str) -> Quantizer:
    if spec.bits is None and spec.name != "valueset":
        raise ConfigError(f"quantizer '{spec.name}' for {role}: bits is required")
    return build_quantizer(spec.name, spec.bits, role=role, **spec.options)


class Method:
    """Straight-through QAT; the base every other method overrides parts of."""

    name: ClassVar[str] = ""

    #: whether ``train_step`` learns from :meth:`loss` (``train.distill`` replaces that loss: it cannot apply where
    #: the step computes its own error signal)
    loss_based: bool = True
    #: whether the step's update is a gradient of the parameters that torch.distributed's DDP averages over ranks
    #: (a method that changes parameters otherwise would let the ranks drift apart under ``torchrun``)
    ddp: bool = True
    #: why the method cannot train in integer mode (``plan.integer: true``), or None where it can: integer mode
    #: trains a traced graph of the model, so a method that hooks modules the graph does not call, or that trains its
    #: own integer arithmetic, would train another network than the one evaluated and exported
    integer_refusal: ClassVar[str | None] = None

    def __init__(self) -> None:
        self.total_steps = 0
        self.steps_per_epoch = 0

    # -- 1. what a layer is made of --------------------------------------------------------------
    def weight_parametrization(self, layer: str, module: nn.Module, spec: QuantSpec) -> nn.Module:
        return QuantizedWeight(build_from_spec(spec, "weight"))

    def act_quantizer(self, layer: str, module: nn.Module, spec: QuantSpec) -> nn.Module:
        return build_from_spec(spec, "act")

    # -- 2. the loss and what the optimizer trains -------------------------------------------------
    def loss(self, model: nn.Module, batch: Any, output: Tensor) -> Tensor:
        """The task loss of a batch (what the metrics report as ``train_loss``)."""
        from ..fit import class_targets

        if len(batch) < 2:
            raise ConfigError("a batch must be a tuple (x, y, ...) of inputs and labels, got one item (no labels)")
        return F.cross_entropy(output, class_targets(output, batch[1]))

    def extra_loss(self, model: nn.Module) -> Tensor | None:
        """Regularisers added to the task loss for the gradient (not reported as train_loss)."""
        return None

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Optimizer parameter groups. Default: one group with every trainable parameter (weight
        decay on all of them, He et al.'s CIFAR recipe; this includes PACT's clip α, whose L2 decay
        is part of PACT). A group's own keys (``lr``, ``weight_decay``) override the defaults."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    # -- 3. the step -------------------------------------------------------------------------------
    def train_step(self, model: nn.Module, batch: Any, optimizer: torch.optim.Optimizer | None, step: int):
        """One optimisation step on ``batch`` (already on the model's device); returns a
        :class:`lowbit.fit.StepResult`. Raises :class:`~lowbit.errors.TrainingDiverged` on a
        non-finite loss before any parameter changes."""
        from ..fit import StepResult, check_output

        x = batch[0]
        out = model(x)
        check_output(out)  # before a loss of the method's own: the step returns the output for the accuracy
        loss = self.loss(model, batch, out)
        extra = self.extra_loss(model)
        total = loss if extra is None else loss + extra
        if not torch.isfinite(total):
            raise TrainingDiverged(f"loss became {total.item()}")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        return StepResult(loss.detach(), out.detach(), len(x))

    # -- 4. schedule callbacks -------------------------------------------------------------------
    def check_epochs(self, epochs: int) -> None:
        """A one-line :class:`ConfigError` where the method cannot train ``epochs`` epochs; called by ``setup``
        and, before a run folder is written, by the config's checks (:func:`lowbit.config.validate_names`)."""

    def setup(self, model: nn.Module, total_steps: int, steps_per_epoch: int) -> None:
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch

    def on_step(self, model: nn.Module, step: int) -> None:
        """Called before the forward pass of global step ``step`` (0-based)."""

    def stage_starts(self, model: nn.Module, total_steps: int) -> list[int]:
        """Global steps (0-based, > 0) where the method starts a new training stage of a run of
        ``total_steps`` steps (greedy local loss: the next block); the run's learning-rate schedule
        restarts at each (:func:`lowbit.train.build_scheduler`). Default: none, one stage."""
        return []

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        """Called after epoch ``epoch`` (0-based) finished training, before validation."""

    def finalize(self, model: nn.Module) -> None:
        """Called once after training (e.g. harden a mixture into its lowest-bit quantizer)."""

    def log(self) -> dict[str, float]:
        """Scalars to show in the progress bar and the metrics (temperature, η, ...)."""
        return {}

    def epoch_record(self, model: nn.Module) -> dict:
        """JSON-able values added to the epoch's metrics line (e.g. every layer's attention)."""
        return {}

    def summary(self, model: nn.Module) -> dict:
        """JSON-able facts for summary.json and ``lowbit info`` (e.g. the value space used)."""
        return {}

    def state_dict(self) -> dict:
        """Schedule state that a resumed run needs (learned tensors live in the model)."""
        return {}

    def end_schedule(self, model: nn.Module, total_steps: int, steps_per_epoch: int) -> None:
        """Put the schedule where ``total_steps`` of training leave it, on a network whose parts trained elsewhere
        (DCQ's stitched student; each section's own run of the method annealed). Default: no schedule."""

    def load_state_dict(self, state: dict) -> None:
        pass


_METHODS = Registry("method")


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        return _METHODS.register(name)(cls)

    return deco


def list_methods() -> list[str]:
    return _METHODS.names()


def build_method(name: str, **options) -> Method:
    _METHODS.check_options(name, options)
    try:
        return _METHODS.get(name)(**options)
    except (TypeError, ValueError) as e:  # an option of the wrong type (form: [a], mu: 3): before, a traceback
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"method '{name}': {e}") from None


@register_method("ste")
class STE(Method):
    """Straight-through QAT: forward with Q(w), backward as if Q were the identity (clipped where
    the quantizer clips). The first method; every other one builds on :class:`Method`."""
