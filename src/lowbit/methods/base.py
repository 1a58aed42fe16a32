"""The method interface: how a quantized layer is trained.

A method supplies three things, and nothing else changes between methods:

1. the **weight parametrization** of each quantized layer (a module registered with
   ``torch.nn.utils.parametrize``, so that ``layer.weight`` *is* the quantized weight) and the
   **activation quantizer** put in front of the layer's input;
2. optional **extra loss terms** (``extra_loss(model)``: DQA's bitwidth penalty, SinReQ);
3. **callbacks** on the training schedule (``setup`` before training, ``on_step`` before each
   batch, ``on_epoch_end``, ``finalize`` after training): temperatures, relaxation factors.

Plain straight-through QAT (:class:`STE`) is the base class with no extras. A new method
subclasses :class:`Method`, overrides what it changes, and registers itself by name.
Parametrization modules expose ``bits`` and ``n_scales`` (what the layer costs at deployment).
"""

from __future__ import annotations

from typing import Callable, ClassVar

from torch import Tensor, nn

from ..errors import ConfigError
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


def build_from_spec(spec: QuantSpec, role: str) -> Quantizer:
    if spec.bits is None and spec.name != "valueset":
        raise ConfigError(f"quantizer '{spec.name}' for {role}: bits is required")
    return build_quantizer(spec.name, spec.bits, role=role, **spec.options)


class Method:
    """Straight-through QAT; the base every other method overrides parts of."""

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self.total_steps = 0
        self.steps_per_epoch = 0

    # -- 1. what a layer is made of --------------------------------------------------------------
    def weight_parametrization(self, layer: str, module: nn.Module, spec: QuantSpec) -> nn.Module:
        return QuantizedWeight(build_from_spec(spec, "weight"))

    def act_quantizer(self, layer: str, module: nn.Module, spec: QuantSpec) -> nn.Module:
        return build_from_spec(spec, "act")

    # -- 2. what the loss adds -------------------------------------------------------------------
    def extra_loss(self, model: nn.Module) -> Tensor | None:
        return None

    # -- 3. schedule callbacks -------------------------------------------------------------------
    def setup(self, model: nn.Module, total_steps: int, steps_per_epoch: int) -> None:
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch

    def on_step(self, model: nn.Module, step: int) -> None:
        """Called before the forward pass of global step ``step`` (0-based)."""

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
    return _METHODS.get(name)(**options)


@register_method("ste")
class STE(Method):
    """Straight-through QAT: forward with Q(w), backward as if Q were the identity (clipped where
    the quantizer clips). The first method; every other one builds on :class:`Method`."""
