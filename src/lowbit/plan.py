"""A ``Plan``: which layers are quantized, with which quantizer and bits, and by which method.

A plan is plain data (YAML-loadable, printable, saved next to every run)::

    weight: {name: sawb, bits: 2}          # default weight quantizer (omit: weights stay FP32)
    act: {name: pact, bits: 2}             # default input-activation quantizer (omit: FP32)
    keep_first: true                       # first conv/linear stays full precision (as in the papers)
    keep_last: true                        # last conv/linear stays full precision
    signed_act: {name: lsq, signed: true}  # optional: the input quantizer of every layer whose input can be
                                           #   negative (a conv/BN/add with no ReLU after it, e.g. MobileNetV2's
                                           #   linear bottleneck; the network input), bits from act; others keep act
    layers:                                # per-layer overrides, by exact name or glob pattern
      "layer3.*": {weight: {bits: 4}}      #   partial specs are merged into the default
      fc: fp                               #   "fp": weight and input activation full precision
    method: {name: ste}                    # how the quantized weight is trained (see lowbit.methods)
    integer: false                         # true: integer-deployable QAT (lowbit.intmode): eval runs the integer model
    integer_residual: output               # integer mode's residual add: output (= onnxruntime QLinearAdd, the
                                           #   default) | accumulator (the first form)
    integer_residual_bits: 8               # integer mode: bits of the tensors added as residuals or pooled; convs
                                           #   read them requantized to their own bits (null: stored at the next
                                           #   conv's input bits). Default 8 with the output add, null with the
                                           #   accumulator add (the first form: ``integer_residual: accumulator``)
    integer_init: lsq                      # integer mode: init of the 8-bit LSQ quantizers it adds (the input,
                                           #   8-bit first/last weights, signed streams): lsq (the paper's) | max
    integer_bias: fine                     # integer mode: the int32 bias (folded BN shift) kept to 1/128 output
                                           #   code by scaling each layer's integer weights by 2^k | coarse
    integer_train_mid: false               # integer mode, output add: true: training rounds each residual conv to
                                           #   the integer network's 8-bit intermediate before the add
    integer_mid_range: cover               # with integer_train_mid: that intermediate covers every value that could
                                           #   matter (cover) | the range the conv's values took in training (observed)

Integer mode's residual defaults changed in session 9 (before: ``accumulator`` and ``null``, the
first form), and ``integer_bias`` was ``coarse`` before session 11; a run folder written before
these keys existed is read with the old values (:func:`lowbit.config.saved_config`), every later
one records them.

Quantizer options go beside ``name`` and ``bits`` (``{name: lsq, bits: 2, per_channel: true}``).
``resolve(model)`` turns a plan into one :class:`LayerPlan` per conv/linear layer.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator
from torch import nn

from .errors import ConfigError

QUANTIZABLE = (nn.modules.conv._ConvNd, nn.Linear)


class QuantSpec(BaseModel):
    """One quantizer: a registered name, bits, and its options (any extra keys)."""

    model_config = ConfigDict(extra="allow")
    name: str
    bits: StrictInt | None = None  # not True / 2.0 / "2": pydantic's lax mode made True one bit

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def merged(self, patch: dict[str, Any]) -> "QuantSpec":
        return QuantSpec(**{**self.model_dump(), **patch})

    def label(self) -> str:
        opts = "".join(f",{k}={v}" for k, v in self.options.items())
        return f"{self.name}{'' if self.bits is None else self.bits}{opts}"


class MethodSpec(BaseModel):
    """A training method by name (``ste``, ...) and its options (extra keys)."""

    model_config = ConfigDict(extra="allow")
    name: str = "ste"

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


PatchOrFP = Union[Literal["fp"], dict[str, Any]]


class LayerOverride(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: PatchOrFP | None = None
    act: PatchOrFP | None = None


class Plan(BaseModel):
    """Per-layer quantization, as data. See the module docstring for the YAML form."""

    model_config = ConfigDict(extra="forbid")
    weight: QuantSpec | None = None
    act: QuantSpec | None = None
    keep_first: bool = True
    keep_last: bool = True
    #: the input quantizer of the layers whose input can be negative (:func:`signed_input_layers`); its
    #: bits default to act's; ``layers`` patches apply on top. None: act everywhere
    signed_act: QuantSpec | None = None
    layers: dict[str, Union[Literal["fp"], LayerOverride]] = Field(default_factory=dict)
    method: MethodSpec = Field(default_factory=MethodSpec)
    integer: bool = False
    #: integer mode's residual add; None (not given): "output" in integer mode, else None (not recorded)
    integer_residual: Literal["accumulator", "output"] | None = None
    #: not given: 8 with the output add in integer mode, else None (an explicit null: the conv's bits)
    integer_residual_bits: StrictInt | None = Field(default=None, ge=2, le=8)
    #: how integer mode initialises the 8-bit LSQ quantizers it adds (network input, the 8-bit first /
    #: last weights, signed residual streams): "lsq" (the paper's, the default) or "max" (max|v|/Qp)
    integer_init: Literal["lsq", "max"] = "lsq"
    #: integer mode's int32 bias: "fine" (weights scaled by 2^k per layer so the folded BatchNorm shift
    #: is kept to 1/128 output code, :func:`lowbit.export.intgraph.weight_prescale`) or "coarse" (rounded
    #: to whole units of the unscaled accumulator: runs before session 11)
    integer_bias: Literal["fine", "coarse"] = "fine"
    #: integer mode, output residual add: true: training rounds each residual conv's output to the
    #: integer network's 8-bit intermediate ``mid`` before the add (:class:`lowbit.intmode.MidRound`);
    #: false (the default): it does not. Session 11 (docs/integer-log.md): it closes a 2-bit MobileNetV2's
    #: gap between integer network and float graph, but ResNet-8 and MobileNetV2 W4A4 trained through
    #: it scored lower, so it is an option, not the default
    integer_train_mid: bool = False
    #: with ``integer_train_mid``: the range ``mid`` covers: "cover" (the default: every conv value whose
    #: sum with some residual lands in the output range; never clamps an output, the coarsest grid) or
    #: "observed" (session 12, an option: only the part of that range the conv's values took in
    #: training, a moving average of each batch's min and max, :class:`lowbit.intmode.MidRound`: a
    #: 2-8x finer grid; training clamps as the integer network does; docs/integer-log.md, session 12, for
    #: why it is not the default). Without ``integer_train_mid`` it has no effect and reads as "cover"
    integer_mid_range: Literal["cover", "observed"] = "cover"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data):
        # "weight: fp" / "act: fp" mean no quantizer
        if isinstance(data, dict):
            data = {k: (None if k in ("weight", "act") and v == "fp" else v) for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _integer_form(self):
        # integer mode's defaults: the output add with an 8-bit residual stream (the form that matched
        # today's mode on ResNet-8 and runs exactly in onnxruntime); "accumulator" alone is the first form
        if not (self.integer and self.integer_train_mid):
            # no mid in training: the range has no effect; recorded as the default, so that a run
            # written while "observed" was the default (for an hour of session 12) is the same config
            self.integer_mid_range = "cover"
        if not self.integer:
            if self.integer_residual == "output":
                raise ValueError("integer_residual is an integer-mode setting: set integer: true")
            if self.integer_residual_bits is not None:
                raise ValueError("integer_residual_bits is an integer-mode setting: set integer: true")
            for k in ("integer_init", "integer_bias", "integer_train_mid"):  # a value that would change nothing
                if getattr(self, k) != type(self).model_fields[k].default:
                    raise ValueError(f"{k} is an integer-mode setting: set integer: true")
            self.integer_residual = None  # recorded as not given: plan.integer=true on a saved config gets the defaults
            return self
        if self.integer_residual is None:
            self.integer_residual = "output"
        if self.integer_train_mid and self.integer_residual != "output":  # accepted before, changing nothing
            raise ValueError("integer_train_mid models the 8-bit intermediate of the output residual add: it takes "
                             "effect with integer_residual: output, not accumulator")
        if "integer_residual_bits" not in self.model_fields_set and self.integer_residual == "output":
            self.integer_residual_bits = 8
        return self

    # -- construction --------------------------------------------------------------------------
    def __init__(self, **data: Any) -> None:
        """``Plan(weight={"name": "sawb", "bits": 2}, ...)``: a bad field is one line, as from a dict (before session
        27: pydantic's four-line ValidationError, which ``except lowbit.LowbitError`` did not catch)."""
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(one_line(e, "plan")) from None

    # a plan inside a Config is validated as before (its errors keep their place: config.plan.weight.bits)
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def from_dict(cls, data: dict | None, where: str = "plan") -> "Plan":
        try:
            return cls.model_validate(data or {})
        except ValidationError as e:
            raise ConfigError(one_line(e, where)) from None

    @classmethod
    def from_yaml(cls, path: str) -> "Plan":
        from .config import read_yaml_mapping  # late: config imports this module

        # as a config file: UTF-8 whatever the locale, and a missing file, a folder, bytes that are not UTF-8, bad YAML
        # or an empty file are one line naming the file (were yaml/OS tracebacks; an empty file was the default plan)
        return cls.from_dict(read_yaml_mapping(path, "plan"), where=path)

    def to_dict(self) -> dict:
        d = self.model_dump(mode="json", exclude_none=False)
        if not self.integer:  # integer-mode keys left unsaid: integer=true on the saved plan gets its defaults
            for k in ("integer_residual", "integer_residual_bits"):
                d.pop(k, None)
        return d

    # -- resolution ----------------------------------------------------------------------------
    def resolve(self, model: nn.Module, ends: tuple[str, str] | None = None,
                frontiers: tuple | None = None) -> list["LayerPlan"]:
        """One :class:`LayerPlan` per conv/linear layer of ``model`` (registration order). ``ends``: the first and
        last layer, ``frontiers``: every layer at either end and every layer the forward calls (:func:`traced_ends`;
        traced here when ``ends`` is not given)."""
        names = quantizable_names(model)
        modules = dict(model.named_modules())
        w = {n: self.weight for n in names}
        a = {n: self.act for n in names}
        if ends is None:
            ends, frontiers = traced_ends(model, names)
        first, last = ends
        if self.keep_first:
            w[first] = a[first] = None
        if self.keep_last:
            w[last] = a[last] = None
        if self.signed_act is not None:
            if self.act is None:
                raise ConfigError("plan.signed_act needs plan.act (the quantizer of the other inputs, and the bits)")
            spec = self.signed_act if self.signed_act.bits is not None else self.signed_act.merged({"bits": self.act.bits})
            for n in signed_input_layers(model):
                if a[n] is not None:
                    a[n] = spec
        source: dict[str, str] = {}
        for pattern, ov in self.layers.items():
            hit = [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)]
            source.update({n: pattern for n in hit})
            if not hit:
                shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
                raise ConfigError(f"plan.layers: '{pattern}' matches no layer; layers are: {shown}")
            for n in hit:
                if ov == "fp":
                    w[n] = a[n] = None
                    continue
                kept = (self.keep_first and n == first, self.keep_last and n == last)
                if any(kept) and n != pattern and w[n] is None and a[n] is None:
                    import warnings

                    warnings.warn(f"plan.layers.{pattern}: the pattern also matches '{n}', which "
                                  f"{'keep_first' if kept[0] else 'keep_last'} keeps in full precision; this pattern "
                                  "quantizes it (name the layer itself to mean it, or narrow the pattern)",
                                  stacklevel=3)
                w[n] = _apply(w[n], self.weight, ov.weight, f"plan.layers.{pattern}.weight")
                a[n] = _apply(a[n], self.act, ov.act, f"plan.layers.{pattern}.act")
        if frontiers is not None:
            _warn_uncalled(frontiers[2], [n for n in names if w[n] is not None or a[n] is not None])
        if frontiers is not None and (self.keep_first or self.keep_last):
            _warn_other_ends(frontiers, first if self.keep_first else None, last if self.keep_last else None,
                             [n for n in names if (w[n] is not None or a[n] is not None) and n not in source])
        if frontiers is not None and len(frontiers) > 3:
            _warn_functional_ends(frontiers, first, last, self.keep_first and w[first] is None and a[first] is None,
                                  self.keep_last and w[last] is None and a[last] is None)
        return [LayerPlan(n, modules[n], w[n], a[n], source.get(n)) for n in names]


def quantizable_names(model: nn.Module) -> list[str]:
    """The conv/linear layers of ``model``, in registration order (none: a one-line error)."""
    names = [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
    if not names:
        raise ConfigError("the model has no Conv or Linear layer to quantize")
    return names


def traced_ends(model: nn.Module, names: list[str] | None = None) -> tuple[tuple[str, str], tuple | None]:
    """From one ``torch.fx`` trace: the first and the last conv/linear layer the forward calls (a user's module may
    register its classifier before its convs: before session 23 the registration order picked them), and the
    frontiers: the layers with no conv/linear before them (they read the network input) and those with none after
    them (they make an output), and every layer it calls, in call order (once per call: a shared layer the forward
    calls twice is there twice), and the functional convs/linears (``F.conv2d``, ``F.linear``) with no conv/linear
    module before them and those with none after them. Where the model does not trace: the registration order, said
    in a warning, and no frontiers."""
    if names is None:
        names = quantizable_names(model)
    try:
        nodes = list(_trace(model).graph.nodes)
    except Exception as e:  # noqa: BLE001 - any model torch.fx cannot trace: the registration order, said
        import warnings

        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
        warnings.warn(f"keep_first/keep_last: torch.fx cannot trace {type(model).__name__} ({why}), so the first and "
                      f"last layers are taken in registration order: '{names[0]}' and '{names[-1]}'; if the forward "
                      "calls others first or last, name them in plan.layers (e.g. {NAME: fp})", stacklevel=3)
        return (names[0], names[-1]), None
    known = set(names)
    is_layer = {n: n.op == "call_module" and n.target in known for n in nodes}
    calls = [n.target for n in nodes if is_layer[n]]  # a layer the forward calls twice is there twice
    order = list(dict.fromkeys(calls))
    above: dict = {}
    for n in nodes:  # topological order
        above[n] = any(is_layer[i] or above[i] for i in n.all_input_nodes)
    below: dict = {}
    for n in reversed(nodes):
        below[n] = any(is_layer[u] or below[u] for u in n.users)
    firsts = list(dict.fromkeys(n.target for n in nodes if is_layer[n] and not above[n]))
    lasts = list(dict.fromkeys(n.target for n in nodes if is_layer[n] and not below[n]))
    ends = (order[0], order[-1]) if order else (names[0], names[-1])
    # functional convs/linears (F.conv2d(x, self.w)) at either end: not layers quantize sees (session 28: a forward
    # whose first op was F.conv2d on an nn.Parameter had keep_first keep the second conv, without a word)
    funcs = _functional_layers()
    fun = [n for n in nodes if n.op == "call_function" and n.target in funcs]
    # an end reads the network input (makes an output): a functional call on parameters only (a learned query,
    # a positional table) is neither, though no layer is before it
    reads: dict = {}
    for n in nodes:
        reads[n] = n.op == "placeholder" or any(reads[i] for i in n.all_input_nodes)
    makes: dict = {}
    for n in reversed(nodes):
        makes[n] = n.op == "output" or any(makes[u] for u in n.users)
    fun_firsts = [f"{n.name} ({_fname(n.target)})" for n in fun if reads[n] and not above[n]]
    fun_lasts = [f"{n.name} ({_fname(n.target)})" for n in fun if makes[n] and not below[n]]
    return ends, (firsts, lasts, calls, fun_firsts, fun_lasts)


def _functional_layers() -> set:
    import torch
    import torch.nn.functional as F

    return {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.linear,
            torch.conv1d, torch.conv2d, torch.conv3d}


def _fname(f) -> str:
    name = getattr(f, "__name__", str(f))
    return f"F.{name}"


def _trace(model: nn.Module):
    """``torch.fx.symbolic_trace`` with every conv/linear layer a leaf: fx traces into a subclass defined outside
    torch.nn (a user's ``class MyConv(nn.Conv2d)``), whose ``F.conv2d`` then was no call of the layer (session 27:
    keep_first kept the second conv and quantized the one on the image; "the forward does not call them")."""
    import torch.fx as fx

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, QUANTIZABLE) or super().is_leaf_module(m, qualname)

    tracer = Tracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph)


def _warn_uncalled(called: list[str], quantized: list[str]) -> None:
    """Warn about quantized layers the forward never calls as modules (session 27: a conv whose weight a forward
    used in ``F.conv2d(x, self.conv.weight)`` had its weight quantized but its input quantizer never ran, while the
    plan table and ``layer_bits`` gave it 2-bit inputs and ``cost.profile`` counted no MACs for it)."""
    import warnings

    # a layer inside a called one (a LoRA-style nn.Linear subclass calling its own nn.Linear children): the trace
    # keeps every conv/linear a leaf (:func:`_trace`), so it does not see the inner call
    calls, inside = set(called), tuple(c + "." for c in called)
    missed = [n for n in quantized if n not in calls and not n.startswith(inside)]
    if missed:
        shown = ", ".join(missed[:6]) + (", ..." if len(missed) > 6 else "")
        warnings.warn(f"layer(s) {shown}: the forward does not call them as modules (unused, or their weight used "
                      "functionally): their input quantizers never run and the cost model counts no MACs for them; "
                      "call the module, or keep them in full precision (plan.layers: {NAME: fp})", stacklevel=4)


def _warn_other_ends(frontiers: tuple[list[str], list[str], list[str]], first: str | None, last: str | None,
                     quantized: list[str]) -> None:
    """keep_first / keep_last keep one layer each; warn where others also read the network input or make an
    output and are quantized (session 25: a second conv on the image got an unsigned quantizer that clipped its
    negative half, 76.6 % for 81.6 %; of two heads one was 2-bit, the other FP32)."""
    import warnings

    for keep, kept, others, what in (("keep_first", first, frontiers[0], "read the network input with no conv or "
                                      "linear before them"),
                                     ("keep_last", last, frontiers[1], "make an output with no conv or linear after "
                                      "them")):
        extra = [n for n in others if kept is not None and n != kept and n in quantized]
        if extra:
            warnings.warn(f"{keep} keeps '{kept}' in full precision, but these layers also {what} and are "
                          f"quantized: {', '.join(repr(n) for n in extra)}; keep them too with plan.layers "
                          f"({{{extra[0]}: fp}}), or name them in plan.layers to say the quantizer is meant",
                          stacklevel=4)


def _warn_functional_ends(frontiers, first: str, last: str, kept_first: bool, kept_last: bool) -> None:
    """Warn where the forward's first (last) conv/linear is a functional call (``F.conv2d(x, self.w)``): quantize
    quantizes Conv/Linear modules only, so it stays in full precision, and keep_first (keep_last) is not keeping the
    layer on the network input (output) but the first (last) module, which may be meant to be quantized."""
    import warnings

    for end, funcs, kept, keep, what in (("first", frontiers[3], kept_first, "keep_first", "reads the network input"),
                                         ("last", frontiers[4], kept_last, "keep_last", "makes an output")):
        if not funcs:
            continue
        module = first if end == "first" else last
        # the kept module may be an end itself, beside the functional call (a stem and a functional branch both on the
        # image): before session 29 the warning said it was "not the layer that reads the network input" there too
        also = module in (frontiers[0] if end == "first" else frontiers[1])
        then = (f"; {keep} keeps '{module}', the {end} conv/linear module, in full precision too, "
                + (f"which also {what}" if also else f"though it is not the layer that {what}")
                + f": to quantize it, name it in plan.layers ({{{module}: {{weight: {{}}, act: {{}}}}}}: the plan's "
                "quantizers)") if kept else ""
        warnings.warn(f"the forward's {end} conv/linear is a functional call, {', '.join(funcs)}: quantize quantizes "
                      f"Conv/Linear modules only, so it stays in full precision (use an nn.Conv2d / nn.Linear module "
                      f"to quantize it){then}", stacklevel=4)


#: modules whose output is never negative, and those that pass their input's sign through
_NONNEG_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softplus)
_SAME_SIGN_MODULES = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                      nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
                      nn.Flatten, nn.Dropout, nn.Identity, nn.Upsample)
_SAME_SIGN_FUNCTIONS = ("flatten", "view", "reshape", "permute", "contiguous", "mean", "max_pool2d", "avg_pool2d",
                        "adaptive_avg_pool2d", "adaptive_max_pool2d", "dropout", "squeeze", "unsqueeze", "transpose")


def signed_input_layers(model: nn.Module) -> list[str]:
    """Names of the conv/linear layers whose input can be negative, from a ``torch.fx`` trace: an input
    is non-negative when it comes from a ReLU (ReLU6, sigmoid, softplus), through pooling, flatten,
    dropout or reshapes, or as a sum / product / concatenation of non-negative tensors; anything else
    (the network input, a conv or BatchNorm with no ReLU after it, e.g. MobileNetV2's linear
    bottleneck) counts as signed. A model ``torch.fx`` cannot trace is a ``ConfigError``."""
    import operator

    import torch
    import torch.nn.functional as F
    from torch import fx

    try:
        gm = _trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure: the user's model has data-dependent control flow
        raise ConfigError(f"plan.signed_act needs a model torch.fx can trace ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:120]}); name the signed layers in plan.layers instead") from None
    mods = dict(gm.named_modules())
    nonneg: dict[fx.Node, bool] = {}
    relus = (F.relu, torch.relu, F.relu6, torch.sigmoid, F.sigmoid, F.softplus)

    def arg0(n: fx.Node) -> bool:
        return bool(n.args) and isinstance(n.args[0], fx.Node) and nonneg.get(n.args[0], False)

    def all_args(n: fx.Node) -> bool:  # every operand a non-negative tensor (x + c, x - y, alpha=: signed)
        nodes = list(n.all_input_nodes)
        direct = n.target is torch.cat or (not n.kwargs and all(isinstance(a, fx.Node) for a in n.args))
        return direct and bool(nodes) and all(nonneg.get(a, False) for a in nodes)

    for n in gm.graph.nodes:
        v = False
        if n.op == "call_module":
            m = mods[n.target]
            v = isinstance(m, _NONNEG_MODULES) or (isinstance(m, _SAME_SIGN_MODULES) and arg0(n))
        elif n.op == "call_function":
            name = getattr(n.target, "__name__", "")
            if n.target in relus:
                v = True
            elif n.target in (operator.add, operator.mul, torch.add, torch.mul, torch.cat):
                v = all_args(n)
            elif name in _SAME_SIGN_FUNCTIONS:
                v = arg0(n)
        elif n.op == "call_method":
            v = n.target in ("relu", "relu_", "sigmoid") or (n.target in _SAME_SIGN_FUNCTIONS and arg0(n))
        nonneg[n] = v
    signed = {n.target for n in gm.graph.nodes
              if n.op == "call_module" and isinstance(mods[n.target], QUANTIZABLE) and not arg0(n)}
    return [name for name, _ in model.named_modules() if name in signed]


def _apply(current: QuantSpec | None, default: QuantSpec | None, patch, where: str) -> QuantSpec | None:
    if patch is None:
        return current
    if patch == "fp":
        return None
    base = current or default
    try:
        if base is None or "name" in patch and patch["name"] != base.name:
            return QuantSpec(**patch)
        return base.merged(patch)
    except ValidationError as e:
        raise ConfigError(one_line(e, where)) from None


@dataclass
class LayerPlan:
    """The resolved plan of one layer: its weight and input-activation quantizer specs."""

    name: str
    module: nn.Module
    weight: QuantSpec | None
    act: QuantSpec | None
    #: the plan.layers pattern that set this layer's specs (None: the plan's defaults)
    source: str | None = None
    #: the roles ("weight", "act") integer mode quantized at 8 bits because the plan kept them in full precision:
    #: plain STE quantizers, not the method's (a method's value sets, learned bits or mixtures are the plan's)
    integer_roles: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return "linear" if isinstance(self.module, nn.Linear) else "conv"


def one_line(e: ValidationError, where: str) -> str:
    """A pydantic ValidationError as one line: 'where.field: message (input ...)'."""
    parts = []
    for err in e.errors()[:3]:
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith(("function-", "literal[")))
        msg = err["msg"]
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{where}.{loc}: {msg}" if loc else f"{where}: {msg}")
    more = f" (+{len(e.errors()) - 3} more)" if len(e.errors()) > 3 else ""
    return "; ".join(parts) + more
