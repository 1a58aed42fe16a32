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

The life of a model (torchao's prepare/convert, NNCF's wrap-after-load)::

    create_model -> load_weights (optional pretrained FP32 start) -> quantize -> fit / evaluate
                 -> set_bits (change layers' bits in place) -> unquantize (plain layers again)
"""

from __future__ import annotations

import fnmatch
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from .cost import LayerBits
from .errors import ConfigError
from .methods import Method, build_method
from .plan import LayerPlan, Plan, traced_ends

_STATE_ATTR = "_lowbit_state"


@dataclass
class QuantState:
    """What ``quantize`` did to a model: the plan, the method instance and the resolved layers."""

    plan: Plan
    method: Method
    layers: list[LayerPlan]
    hooks: list = field(default_factory=list)
    #: the first and the last layer the forward calls (``plan.traced_ends``, resolved before quantizing)
    ends: tuple[str, str] | None = None

    def table(self) -> str:
        return plan_table(self.layers)


class UncalibratedWarning(UserWarning):
    """A model evaluated before its activation quantizers saw a training batch (:func:`quiet_calibration`)."""


_QUIET = [0]


@contextmanager
def quiet_calibration():
    """No :class:`UncalibratedWarning` inside (a cost probe, whose numbers do not depend on the ranges)."""
    _QUIET[0] += 1
    try:
        yield
    finally:
        _QUIET[0] -= 1


class _InputQuantHook:
    """The forward pre-hook that quantizes a layer's input; on the layer's first input it also checks
    that no signed input lost its negative half (:func:`warn_if_negatives_dropped`; a layer the forward calls more than
    once: the first input of each call), and until its
    quantizer has started it warns (once) when it is evaluated before any training batch."""

    def __init__(self, name: str, warned: list | None = None, calls: int = 1, traced_training: bool | None = None):
        self.name, self.started = name, False
        # the inputs still to check for dropped negatives: one per call of the layer in the forward (a shared conv
        # reads other tensors on its later calls: before session 28 only its first input was checked, and a second
        # call on a signed tensor lost its negative half without a word)
        self.calls = self.to_check = max(1, int(calls))
        # a layer called more than once is checked in forwards of the mode the model was traced in (train or eval),
        # whose calls are those the trace numbered: an eval forward before training skips a training-only call, and
        # used up its check (the training-only call never checked, or checked under another call's number)
        self.traced_training = traced_training
        self.warned = [False] if warned is None else warned  # shared by one model's hooks: one warning a model

    def _check_started(self, q: nn.Module) -> None:
        import warnings

        waiting = [m for m in q.modules() if getattr(m, "is_quantizer", False) and m.awaits_data()]
        if not waiting:
            self.started = True
        elif not q.training and not _QUIET[0]:
            self.started = True
            if not self.warned[0]:
                self.warned[0] = True
                warnings.warn(
                    f"the model is evaluated before its activation quantizers saw a training batch (first: layer "
                    f"'{self.name}', {waiting[0].alias}): their ranges are not set and the outputs mean nothing; run a "
                    "few batches through it in train mode first (calibration; lowbit.fit does)",
                    UncalibratedWarning, stacklevel=2)

    def __call__(self, module: nn.Module, args):
        if not args:  # before session 27: IndexError: tuple index out of range
            raise ConfigError(f"layer '{self.name}' was called with its input as a keyword argument (input=...); its "
                              "input quantizer reads the first positional argument: call the layer as layer(x)")
        x = args[0]
        # _init_seen False: set_bits or load_state_dict emptied a started quantizer's codebook (centroids, LQ-Net)
        q = module.input_quantizer  # (a quantizer without the buffer never reads it: its False would stay)
        if not self.started or (q.__dict__.get("_init_seen") is False and "initialized" in q._buffers):
            self._check_started(module.input_quantizer)
        y = module.input_quantizer(x)
        if self.to_check and (self.calls == 1 or self.traced_training in (None, module.training)):
            call = self.calls - self.to_check + 1
            self.to_check -= 1
            note = "" if self.calls == 1 else f" (its call {call} of {self.calls} in the forward)"
            if warn_if_negatives_dropped(x, y, self.name, note):
                self.to_check = 0  # one warning a layer
        return (y,) + tuple(args[1:])


def warn_if_negatives_dropped(x: torch.Tensor, y: torch.Tensor, where: str, note: str = "") -> bool:
    """Warn (once a layer, on the first input of each of its calls) when an activation quantizer maps a signed input to
    non-negative values only: an unsigned quantizer (PACT, DoReFa, QNN, unsigned LSQ) in front of a
    tensor that is not a ReLU output (a linear bottleneck, a projection, a normalised image) acts as
    a ReLU the network does not have. Returns whether it warned."""
    import warnings

    with torch.no_grad():
        neg = (x < 0).float().mean().item()
        if neg <= 0.01 or y.min().item() < 0:
            return False
    warnings.warn(f"layer '{where}'{note}: its activation quantizer has no negative level, and {100 * neg:.0f}% of its "
                  f"input is negative (min {x.min().item():.3g}): those values become 0, as if a ReLU were there; "
                  "a signed input needs a signed quantizer ({name: lsq, signed: true} for this layer, or "
                  "plan.signed_act: {name: lsq, signed: true} for every layer whose input can be negative)",
                  stacklevel=2)
    return True


def quantize(model: nn.Module, plan: Plan | dict | str | None = None, method: Method | None = None,
             replace: bool = False) -> nn.Module:
    """Quantize ``model`` in place according to ``plan`` (a Plan, a dict, or a YAML path).

    ``method`` is a ready :class:`~lowbit.methods.Method` instance (default: built from
    ``plan.method``). A quantized model is refused unless ``replace=True``, which first removes
    the current quantization keeping the latent weights (:func:`unquantize`) and then applies
    ``plan``: e.g. a fine-tune at other bits from a trained network.
    """
    from .fit import check_model, model_dtype

    check_model(model)
    if isinstance(plan, str):
        plan = Plan.from_yaml(plan)
    elif plan is None or isinstance(plan, dict):
        plan = Plan.from_dict(plan)
    elif not isinstance(plan, Plan):
        raise ConfigError(f"plan must be a Plan, a dict or a YAML path, got {type(plan).__name__}")
    if getattr(model, _STATE_ATTR, None) is not None:
        if not replace:
            raise ConfigError("this model is already quantized; pass replace=True to re-quantize it from its "
                              "latent weights, or call lowbit.unquantize(model) first")
        unquantize(model, keep="latent")
    if method is None:
        method = build_method(plan.method.name, **plan.method.options)
    elif not isinstance(method, Method):
        raise ConfigError(f"method must be a lowbit Method instance, got {type(method).__name__}")
    if plan.integer and method.integer_refusal:
        raise ConfigError(f"plan.integer: method '{method.name}' does not train in integer mode: "
                          f"{method.integer_refusal}")
    if plan.integer:  # before session 27: the first training batch failed in torch's "Input type (float) and bias
        dt = model_dtype(model) or torch.float32  # type (double)"
        if dt != torch.float32:
            raise ConfigError(f"plan.integer: the model is in {dt}; integer mode trains the float32 network it "
                              "deploys: call model.float() before quantize")
    ends, frontiers = traced_ends(model)  # one trace for the plan and the state
    calls = {} if frontiers is None else {n: frontiers[2].count(n) for n in set(frontiers[2])}
    traced = model.training  # the mode the trace counted the calls in (``if self.training:`` branches)
    layers = plan.resolve(model, ends, frontiers)
    if plan.integer:
        from .intmode import integer_layers

        integer_layers(plan, layers, ends[0])
    state = QuantState(plan, method, layers, ends=ends)
    for lp in layers:  # before anything is changed: a weight the user parametrized (weight_norm, spectral_norm)
        if lp.weight is not None and parametrize.is_parametrized(lp.module, "weight"):
            if any(type(p).__module__.startswith("lowbit.")
                   for p in lp.module.parametrizations.weight):  # session 25: it said "remove it first"
                raise ConfigError(f"layer {lp.name} is already quantized by lowbit, though this model is not: the "
                                  "module is shared with a quantized model; give this model its own copy "
                                  "(copy.deepcopy) or keep the layer in full precision here (the other model's "
                                  "quantizers would act in both)")
            raise ConfigError(f"layer {lp.name}: its weight already has a parametrization "
                              f"({type(lp.module.parametrizations.weight[0]).__name__}, e.g. weight_norm); lowbit "
                              "quantizes a plain weight: remove it first (torch.nn.utils.parametrize."
                              "remove_parametrizations(layer, 'weight')) or keep this layer in full precision")
        if lp.weight is not None and lp.weight.options.get("per_channel", lp.weight.name == "lqnet") and \
                isinstance(lp.module, nn.modules.conv._ConvTransposeNd):  # lqnet: per channel unless told otherwise
            raise ConfigError(f"layer {lp.name}: per_channel weights on a {type(lp.module).__name__}, whose weight is "
                              "(in, out, ...): the scales would be per input channel; use per-tensor weights there")
    warned = [False]  # the model's hooks warn once between them (UncalibratedWarning)
    for lp in layers:
        where = f"plan.layers.{lp.source}" if lp.source else f"layer {lp.name}"
        try:  # a bad per-layer override names its field (plan.layers.PATTERN.weight: ...)
            # integer mode's own 8-bit ends (the layers the plan keeps in FP32) take plain STE quantizers: the
            # method's value sets, learned bits, mixtures or regularisers are for the plan's layers (session 24:
            # SINAREQ learned 2 bits for them, RDHS and SinReQ refused them)
            if lp.weight is not None:
                p = (Method.weight_parametrization(method, lp.name, lp.module, lp.weight)
                     if "weight" in lp.integer_roles else method.weight_parametrization(lp.name, lp.module, lp.weight))
                parametrize.register_parametrization(lp.module, "weight", p)
            role = "act"
            if lp.act is not None:
                lp.module.input_quantizer = (Method.act_quantizer(method, lp.name, lp.module, lp.act)
                                             if "act" in lp.integer_roles else
                                             method.act_quantizer(lp.name, lp.module, lp.act))
                state.hooks.append(lp.module.register_forward_pre_hook(_InputQuantHook(lp.name, warned,
                                                                                    calls.get(lp.name, 1), traced)))
        except ConfigError as e:
            role = "act" if lp.weight is None or parametrize.is_parametrized(lp.module, "weight") else "weight"
            _undo(layers, state)  # a refused plan leaves the model as it was (it kept the layers done so far)
            raise ConfigError(f"{where}.{role}: {e}") from None
        except BaseException:
            _undo(layers, state)
            raise
    object.__setattr__(model, _STATE_ATTR, state)
    if plan.integer:
        from .intmode import integerize

        try:  # a model integer mode refuses (an unsupported layer, readers of one tensor with other acts) is left as
            integerize(model, state)  # it was: before session 28 it stayed quantized, without its input hooks, and
        except BaseException:  # the corrected call was refused with "this model is already quantized"
            _undo(layers, state)
            _drop_integer(model)
            object.__setattr__(model, _STATE_ATTR, None)
            raise
    return model


def _remove_weight_parametrization(module: nn.Module, leave_parametrized: bool) -> None:
    """``parametrize.remove_parametrizations(module, "weight")`` on a class of the module's own. torch injects a
    class per parametrized module, but a deep copy (``copy.deepcopy``, ``AveragedModel``) keeps the original's
    (pytorch#80811), and the removal deletes ``weight`` from that shared class: before session 25 unquantizing a
    copy broke the original ("'ParametrizedConv2d' object has no attribute 'weight'") and the reverse."""
    cls = type(module)
    ns = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, ns)
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=leave_parametrized)


def _undo(layers: list[LayerPlan], state: QuantState) -> None:
    """Take back what a ``quantize`` that failed part-way did to ``layers``: its weight parametrizations (the
    original weight kept), input quantizers and hooks."""
    for h in state.hooks:
        h.remove()
    state.hooks.clear()
    for lp in layers:
        if lp.weight is not None and parametrize.is_parametrized(lp.module, "weight"):
            _remove_weight_parametrization(lp.module, leave_parametrized=False)
        if "input_quantizer" in lp.module._modules:
            del lp.module.input_quantizer


def unquantize(model: nn.Module, keep: str = "quantized") -> nn.Module:
    """Remove what :func:`quantize` did, in place: plain ``weight`` parameters, no input
    quantizers, no hooks. ``keep="quantized"`` leaves each layer's current quantized weight (the
    network computes exactly what it did in eval mode, minus the activation quantizers);
    ``keep="latent"`` leaves the trainable latent FP32 weight. A method whose latent state is not
    a weight (RDHS/SGT logits over a value set) only allows ``"quantized"``."""
    if keep not in ("quantized", "latent"):
        raise ConfigError(f"keep must be 'quantized' or 'latent', got '{keep}'")
    state = quant_state(model)
    if state is None:
        raise ConfigError("this model is not quantized")
    was = model.training
    model.eval()  # mixtures compute their final quantizer in eval mode
    try:
        for lp in state.layers:
            m = lp.module
            if parametrize.is_parametrized(m, "weight"):
                original = m.parametrizations.weight.original
                if keep == "latent" and original.shape != m.weight.shape:
                    raise ConfigError(f"layer '{lp.name}': the method's latent state ({tuple(original.shape)}) is "
                                      "not a weight; use keep='quantized'")
                with torch.no_grad():
                    _remove_weight_parametrization(m, leave_parametrized=keep == "quantized")
            if hasattr(m, "input_quantizer"):
                del m.input_quantizer
    finally:
        model.train(was)
    for h in state.hooks:
        h.remove()
    _drop_integer(model)
    object.__setattr__(model, _STATE_ATTR, None)
    return model


def _drop_integer(model: nn.Module) -> None:
    """Remove what integer mode added besides the layers' quantizers: its forward, the tensor quantizers and the
    output-form residual convs' ``mid_round`` (before session 28 unquantize left those: extra state_dict keys, and a
    later integer-mode plan built its network from the stale observed range of the earlier plan's ``mid_round``)."""
    from .intmode import MidRound

    model.__dict__.pop("forward", None)
    for mod in model.modules():
        mod._modules.pop("output_quantizer", None)
        if isinstance(mod._modules.get("mid_round"), MidRound):
            del mod._modules["mid_round"]


def set_bits(model: nn.Module, bits: Mapping[str, int | Mapping[str, int]]) -> nn.Module:
    """Change quantized layers' bits in place: ``{layer or glob: bits}`` sets the weight bits,
    ``{layer: {"weight": b, "act": b}}`` either or both. Cheap (no module is rebuilt, learned
    state such as LSQ's step is kept, the optimizer stays valid); the plan table follows.
    Unknown or full-precision layers, and bits a quantizer does not support, are one-line errors."""
    state = quant_state(model)
    if state is None:
        raise ConfigError("set_bits: the model is not quantized")
    if not isinstance(bits, Mapping):
        raise ConfigError(f"set_bits: bits must be a mapping {{layer or glob: bits}}, got {type(bits).__name__}")
    by_name = {lp.name: lp for lp in state.layers}
    todo: dict[str, dict[str, int]] = {}
    for pattern, b in bits.items():
        hit = [n for n in by_name if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not hit:
            raise ConfigError(f"set_bits: '{pattern}' matches no layer; layers are: {', '.join(list(by_name)[:12])}"
                              + (", ..." if len(by_name) > 12 else ""))
        roles = dict(b) if isinstance(b, Mapping) else {"weight": b}
        bad = set(roles) - {"weight", "act"}
        if bad:
            raise ConfigError(f"set_bits: '{pattern}': roles are weight and act, got {', '.join(sorted(bad))}")
        if pattern not in by_name:  # a glob: the layers it matches that quantize these roles (a name: that layer,
            # refused below if it keeps a role in full precision; before session 24 "*" always hit the FP32 ends)
            hit = [n for n in hit if all(getattr(by_name[n], r) is not None for r in roles)] or hit
        for n in hit:
            todo.setdefault(n, {}).update(roles)
    for n, roles in todo.items():  # check everything before changing anything
        lp = by_name[n]
        for role in roles:
            if (lp.weight if role == "weight" else lp.act) is None:
                raise ConfigError(f"set_bits: layer '{n}' has a full-precision {role}; quantize it in the plan first")
            wide = state.plan.integer_residual_bits
            if role == "act" and wide is not None and isinstance(roles[role], int) and roles[role] < wide:
                from .intmode import residual_stream

                t = residual_stream(state, lp.module.input_quantizer)
                if t is not None:
                    raise ConfigError(f"set_bits: layer '{n}' act: its input '{t}' is also a residual operand or "
                                      f"pooled, stored at {wide} bits (plan.integer_residual_bits) through this "
                                      f"quantizer, so {roles[role]} bits would store it at {roles[role]} bits; give "
                                      "the bits in plan.layers and quantize again")
    done = []  # (quantizer, old bits, layer plan, role, old spec, old state): undone if a later layer fails
    try:
        for n, roles in todo.items():
            lp = by_name[n]
            for role, b in roles.items():
                q = weight_param(lp.module) if role == "weight" else lp.module.input_quantizer
                if not callable(getattr(q, "set_bits", None)):
                    raise ConfigError(f"set_bits: layer '{n}': {type(q).__name__} cannot change its bits")
                old, spec = q.bits, getattr(lp, role)
                # set_bits(old) alone would not undo it: centroids and LQ-Net empty their codebook on any change
                saved = {k: v.clone() for k, v in q.state_dict().items()}
                try:
                    q.set_bits(b)
                except ConfigError as e:
                    raise ConfigError(f"set_bits: layer '{n}' {role}: {e}") from None
                done.append((q, old, lp, role, spec, saved))
                setattr(lp, role, spec.merged({"bits": int(b)}))
                if role == "act":  # integer mode: the convs that read one tensor share its quantizer
                    for other in state.layers:
                        if other is not lp and other.act is not None and \
                                getattr(other.module, "input_quantizer", None) is q:
                            done.append((q, old, other, role, other.act, None))
                            other.act = other.act.merged({"bits": int(b)})
    except Exception:
        for q, old, lp, role, spec, saved in reversed(done):
            q.set_bits(old)
            if saved is not None:
                q.load_state_dict(saved)
            setattr(lp, role, spec)
        raise
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
    from .fit import check_model

    check_model(model)
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


def ends_full_precision(model: nn.Module) -> list[bool]:
    """Whether the first and the last conv/linear layer of a quantized ``model`` stay full precision
    (weights and input), as resolved: integer mode and ``plan.layers`` may quantize what
    ``keep_first`` / ``keep_last`` would keep."""
    state = quant_state(model)
    layers = {lp.name: lp for lp in state.layers}
    ends = state.ends or (state.layers[0].name, state.layers[-1].name)
    return [layers[n].weight is None and layers[n].act is None for n in ends]


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
