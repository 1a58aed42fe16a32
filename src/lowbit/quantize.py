"""``quantize(model, plan)``: the one call that applies a plan to any ``nn.Module``.

For every conv/linear layer the plan quantizes, it

* registers the method's weight parametrization with ``torch.nn.utils.parametrize``, so
  ``layer.weight`` *is* the quantized weight and the trainable latent weight is
  ``layer.parametrizations.weight.original``; every layer type and model works unchanged;
* puts the method's activation quantizer in front of the layer as ``layer.input_quantizer``,
  applied by a forward pre-hook (the layer's *input* is quantized: that is what a low-bit
  MAC array consumes, and it needs no knowledge of where the model's ReLUs are).

The same model object is returned; ``quant_state(model)`` gives the plan, the method and the
per-layer table. Layers the plan keeps in full precision are left untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torch.nn.utils import parametrize

from .cost import LayerBits
from .errors import ConfigError
from .methods import Method, build_method
from .plan import LayerPlan, Plan

_STATE_ATTR = "_lowbit_state"


@dataclass
class QuantState:
    """What ``quantize`` did to a model: the plan, the method instance and the resolved layers."""

    plan: Plan
    method: Method
    layers: list[LayerPlan]
    hooks: list = field(default_factory=list)

    def table(self) -> str:
        return plan_table(self.layers)


def _input_quant_hook(module: nn.Module, args):
    return (module.input_quantizer(args[0]),) + tuple(args[1:])


def quantize(model: nn.Module, plan: Plan | dict | str | None = None) -> nn.Module:
    """Quantize ``model`` in place according to ``plan`` (a Plan, a dict, or a YAML path)."""
    if isinstance(plan, str):
        plan = Plan.from_yaml(plan)
    elif plan is None or isinstance(plan, dict):
        plan = Plan.from_dict(plan)
    if getattr(model, _STATE_ATTR, None) is not None:
        raise ConfigError("this model is already quantized; build a fresh model to apply another plan")
    method = build_method(plan.method.name, **plan.method.options)
    layers = plan.resolve(model)
    state = QuantState(plan, method, layers)
    for lp in layers:
        if lp.weight is not None:
            p = method.weight_parametrization(lp.name, lp.module, lp.weight)
            parametrize.register_parametrization(lp.module, "weight", p)
        if lp.act is not None:
            lp.module.input_quantizer = method.act_quantizer(lp.name, lp.module, lp.act)
            state.hooks.append(lp.module.register_forward_pre_hook(_input_quant_hook))
    object.__setattr__(model, _STATE_ATTR, state)
    return model


def quant_state(model: nn.Module) -> QuantState | None:
    """The :class:`QuantState` of a quantized model, or None for an untouched one."""
    return getattr(model, _STATE_ATTR, None)


def weight_param(module: nn.Module) -> nn.Module | None:
    """The weight parametrization module of a quantized layer (None if the weight is plain)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight[0]
    return None


def layer_bits(model: nn.Module) -> dict[str, LayerBits]:
    """Per-layer bits for :func:`lowbit.cost.profile`: weight bits, input-activation bits and the
    number of full-precision scale numbers each layer stores. FP layers are left out."""
    out = {}
    for name, m in model.named_modules():
        wp = weight_param(m)
        aq = getattr(m, "input_quantizer", None)
        if wp is None and aq is None:
            continue
        wb = wp.bits if wp is not None else None
        ab = aq.bits if aq is not None else None
        n = (wp.n_scales if wp is not None else 0) + (aq.n_scales if aq is not None else 0)
        out[name] = LayerBits(
            weight=None if wb is None or wb >= 32 else wb,
            act=None if ab is None or ab >= 32 else ab,
            n_scales=n,
        )
    return out


def plan_table(layers: list[LayerPlan]) -> str:
    """The per-layer table: layer, type, weight shape, weight quantizer, activation quantizer, params."""
    rows = [("layer", "type", "shape", "weight", "act", "params")]
    total = 0
    for lp in layers:
        shape = tuple(lp.module.weight.shape)
        n = lp.module.weight.numel() + (lp.module.bias.numel() if getattr(lp.module, "bias", None) is not None else 0)
        total += n
        rows.append((
            lp.name, lp.kind, "x".join(map(str, shape)),
            lp.weight.label() if lp.weight else "fp32",
            lp.act.label() if lp.act else "fp32",
            f"{n:,}",
        ))
    rows.append(("total", "", "", "", "", f"{total:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)
