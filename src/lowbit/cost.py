"""Cost model: parameters, MACs, BitOPs, model size and memory of a (quantized) CNN.

Everything is measured on an arbitrary ``nn.Module`` with ONE forward pass (:func:`profile`) and
a per-layer bit assignment ``bits: Mapping[str, LayerBits]`` (module name as in
``model.named_modules()`` -> bits of that Conv/Linear layer's weight and input activation).

Memory formulas follow seed 002 ("Number of parameters and memory"): a model with ``N_p``
parameters at ``b_p`` bits whose largest activation has ``N_a`` elements needs, for one
inference,

    Mem = N_p * b_p + N_a * max(b_p, 4)      bits                       (:func:`mem_002`)

(activations are kept at >= 4 bits). Seed 002's table ("Towards on-device training", ResNet-20 on
CIFAR-10) splits the memory of on-device training into latent parameters (32 bit), optimizer
state (~ one more copy of the parameters) and *all* activations stored for the backward pass
(``x B``, the batch size); :func:`training_memory` reproduces that table for any model.

Counting rules
--------------
*Quantizable layers* are ``torch.nn.modules.conv._ConvNd`` (Conv1d/2d/3d and the transposed ones)
and ``nn.Linear``. Their submodules are quantizer state and are not visited, except the Conv/Linear
layers inside them (a LoRA-style subclass whose forward calls its own ``nn.Linear`` children, directly
or in a container such as peft's ``lora_A = nn.ModuleDict({"default": nn.Linear(...)})``).

*Quantizers* are ignored everywhere (their parameters are quantizer state, reported through
``LayerBits.n_scales``, never as model parameters, and their outputs are not activations). A
module is a quantizer when it says so: a true ``is_quantizer`` attribute, which
:class:`lowbit.quant.base.Quantizer` sets for every quantizer (the cost model does not import
it). The ``parametrizations`` container that ``torch.nn.utils.parametrize`` adds to a
module is ignored too.

``N_p`` (``CostSummary.params``) is the number of elements of the module-level tensors:

* a Conv/Linear layer contributes exactly ``weight.numel() + bias.numel()``, where ``weight`` is
  the tensor the layer *uses* (``module.weight``, i.e. the parametrized value if the weight is
  registered with ``torch.nn.utils.parametrize``; the trainable ``original`` may have another
  shape). Any other ``nn.Parameter`` registered directly on a Conv/Linear (a step size, a clip
  value) is quantizer state and is not counted;
* every other visited module contributes its own parameters (``recurse=False``; e.g. the
  BatchNorm affine ``weight``/``bias`` = 2*C), parametrized tensors again by their used shape.

Buffers (BatchNorm running statistics) are not parameters. A tensor shared by several modules
is counted once in the totals.

Activations are the outputs of the *hooked* modules: every quantizable layer and every other
visited module that has no visited children ("leaf"), plus the network input. Outputs of
functional calls inside a module's ``forward`` are not seen as stored tensors, but the largest
activation ``N_a`` also counts the input of every hooked module (a ``torch.cat`` or
``F.interpolate`` result read by a conv, a pool or a BatchNorm). All activation numbers are
*elements per sample* (tensor elements divided by the batch size ``example_input.shape[0]``).
MACs (per sample, bias adds none) use the weight the layer actually uses: a Conv does
``out_elems * (C_in/groups) * prod(kernel)`` (so depthwise convs are right), a transposed Conv
``in_elems * (C_out/groups) * prod(kernel)``, a Linear ``out_elems * in_features`` (leading dims
beyond the batch included). BitOPs are ``MACs * w_bits * a_bits`` (32*32 for a float layer).
If a module runs several times in one pass, its MACs add up and its ``in_elems``/``out_elems``
are the largest of the calls.

Units: sizes are in bits unless the name says bytes; MB = 1e6 bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from lowbit.errors import ConfigError

__all__ = [
    "CostSummary",
    "LayerBits",
    "LayerCost",
    "count_params",
    "mem_002",
    "profile",
    "training_memory",
]

FP_BITS = 32
#: seed 002 keeps activations at no fewer than this many bits: b_a = max(b_p, 4)
MIN_ACT_BITS = 4
_LAYER_TYPES = (_ConvNd, nn.Linear)
_STORED_RULES = ("all", "layer_inputs")


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def _check_bit_width(what: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} must be an integer in 1..32 or None, got {value!r}")
    if not 1 <= value <= FP_BITS:
        raise ConfigError(f"{what} must be in 1..32 (or None for full precision), got {value}")


@dataclass(frozen=True)
class LayerBits:
    """Bit widths of one Conv/Linear layer.

    ``weight``: bits of the weight, ``act``: bits of the layer's INPUT activation; ``None`` means
    full precision (32-bit float). ``n_scales``: extra full-precision (32-bit) numbers the
    quantizers of this layer store (scales, offsets, learned levels).
    """

    weight: int | None
    act: int | None
    n_scales: int = 0

    def __post_init__(self) -> None:
        _check_bit_width("LayerBits.weight", self.weight)
        _check_bit_width("LayerBits.act", self.act)
        if isinstance(self.n_scales, bool) or not isinstance(self.n_scales, int) or self.n_scales < 0:
            raise ConfigError(f"LayerBits.n_scales must be an integer >= 0, got {self.n_scales!r}")

    @property
    def w_bits(self) -> int:
        return FP_BITS if self.weight is None else self.weight

    @property
    def a_bits(self) -> int:
        return FP_BITS if self.act is None else self.act


_FP = LayerBits(None, None, 0)


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------
@dataclass
class LayerCost:
    """Cost of one Conv/Linear layer (activation numbers are per sample)."""

    name: str
    kind: str  # "conv" or "linear"
    weight_shape: tuple[int, ...]
    params: int  # weight + bias elements
    macs: int  # multiply-accumulates for one input sample
    w_bits: int  # 32 when full precision
    a_bits: int  # bits of the input activation, 32 when full precision
    bitops: int  # macs * w_bits * a_bits
    size_bits: int  # weight*w_bits + bias*32 + n_scales*32
    out_elems: int  # output elements per sample
    in_elems: int  # input elements per sample
    n_scales: int = 0


@dataclass
class CostSummary:
    """Totals of :func:`profile` (see the module docstring for the counting rules)."""

    layers: list[LayerCost]
    params: int  # N_p
    macs: int
    bitops: int  # over Conv/Linear only; a full-precision layer counts 32*32 per MAC
    size_bits: int  # quantized Conv/Linear weights at their bits, everything else and scales at 32
    fp32_size_bits: int  # N_p * 32 (a float model has no quantizer scales)
    max_act_elems: int  # N_a, largest activation (elements per sample), the input included
    mem_bits: float  # param bits (size_bits without scales) + N_a * max(act_bits, 4)
    act_bits: int = FP_BITS  # b_a used in mem_bits: the largest input bit width of the layers in `bits`
    n_scales: int = 0  # total quantizer scales (32 bit each) included in size_bits

    @property
    def param_bits(self) -> int:
        """Bits of the parameters alone (``size_bits`` without the quantizer scales)."""
        return self.size_bits - FP_BITS * self.n_scales

    @property
    def size_bytes(self) -> float:
        return self.size_bits / 8

    @property
    def fp32_size_bytes(self) -> float:
        return self.fp32_size_bits / 8

    @property
    def compression(self) -> float:
        """fp32_size_bits / size_bits (1.0 for a model without parameters)."""
        return self.fp32_size_bits / self.size_bits if self.size_bits else 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        for layer in d["layers"]:
            layer["weight_shape"] = list(layer["weight_shape"])
        d.update(
            param_bits=self.param_bits,
            size_bytes=self.size_bytes,
            fp32_size_bytes=self.fp32_size_bytes,
            compression=self.compression,
        )
        return d

    def table(self) -> str:
        """Per-layer table plus totals, plain text with aligned columns."""
        header = ("layer", "kind", "weight shape", "params", "MACs", "W", "A", "BitOPs", "size [bit]")
        rows = [
            (
                lc.name or "(model)",
                lc.kind,
                "x".join(str(s) for s in lc.weight_shape),
                f"{lc.params:,}",
                f"{lc.macs:,}",
                str(lc.w_bits),
                str(lc.a_bits),
                f"{lc.bitops:,}",
                f"{lc.size_bits:,}",
            )
            for lc in self.layers
        ]
        total = (
            "total (all params)",
            "",
            "",
            f"{self.params:,}",
            f"{self.macs:,}",
            "",
            "",
            f"{self.bitops:,}",
            f"{self.size_bits:,}",
        )
        body = [header, *rows, total]
        widths = [max(len(r[i]) for r in body) for i in range(len(header))]
        left = {0, 1, 2}

        def fmt(r: tuple[str, ...]) -> str:
            cells = (c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            return "  ".join(cells).rstrip()

        rule = "  ".join("-" * w for w in widths)
        lines = [fmt(header), rule, *(fmt(r) for r in rows), rule, fmt(total)]
        lines += [
            f"size: {self.size_bytes / 1e6:.4f} MB (fp32 {self.fp32_size_bytes / 1e6:.4f} MB, "
            f"compression x{self.compression:.2f})",
            f"largest activation N_a: {self.max_act_elems:,} elements/sample; "
            f"inference memory (seed 002): {self.mem_bits / 8e6:.4f} MB",
        ]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# model walk
# ---------------------------------------------------------------------------------------------
def _is_quantizer(module: nn.Module) -> bool:
    return getattr(module, "is_quantizer", False) is True


def _holds_layer(module: nn.Module) -> bool:
    """Whether a Conv/Linear layer sits somewhere below ``module`` (not inside a quantizer)."""
    return any(
        isinstance(c, _LAYER_TYPES) or (not _is_quantizer(c) and _holds_layer(c)) for c in module.children()
    )


def _visible_children(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Children the cost model looks at: no quantizers, no parametrize containers."""
    if isinstance(module, _LAYER_TYPES):  # a layer's own children are quantizer state, except layers it calls
        for cname, child in module.named_children():  # (a LoRA-style subclass; peft keeps them in ModuleDicts)
            if isinstance(child, _LAYER_TYPES) or (
                cname != "parametrizations" and not _is_quantizer(child) and _holds_layer(child)
            ):
                yield cname, child
        return
    skip_param = parametrize.is_parametrized(module)
    for cname, child in module.named_children():
        if skip_param and cname == "parametrizations":
            continue
        if _is_quantizer(child):
            continue
        yield cname, child


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module, bool]]:
    """Yield ``(name, module, hooked)`` for every visited module, each module object once."""
    memo: set[int] = set()

    def rec(prefix: str, module: nn.Module):
        if id(module) in memo:
            return
        memo.add(id(module))
        children = list(_visible_children(module))
        hooked = isinstance(module, _LAYER_TYPES) or not children
        yield prefix, module, hooked
        for cname, child in children:
            yield from rec(f"{prefix}.{cname}" if prefix else cname, child)

    if not _is_quantizer(model):
        yield from rec("", model)


def _own_tensors(module: nn.Module) -> Iterator[tuple[object, int]]:
    """``(identity key, numel)`` of the module-level parameter tensors of one module."""
    if isinstance(module, _LAYER_TYPES):
        names = ["weight", "bias"]
    else:
        names = [n for n, _ in module.named_parameters(recurse=False)]
        if parametrize.is_parametrized(module):
            names += [n for n in module.parametrizations.keys() if n not in names]
    for n in names:
        if parametrize.is_parametrized(module, n):
            orig = getattr(module.parametrizations, n).original
            yield ("p", id(orig)), getattr(module, n).numel()
        else:
            t = getattr(module, n, None)
            if isinstance(t, torch.Tensor):
                yield ("t", id(t)), t.numel()


def count_params(model: nn.Module) -> int:
    """``N_p`` of ``model`` by the rule of the module docstring (quantizer state excluded)."""
    with torch.no_grad():
        seen: set[object] = set()
        total = 0
        for _, module, _ in _walk(model):
            for key, n in _own_tensors(module):
                if key not in seen:
                    seen.add(key)
                    total += n
        return total


def _check_bits_map(model: nn.Module, bits: Mapping[str, LayerBits] | None) -> dict[str, LayerBits]:
    if bits is None:
        return {}
    if not isinstance(bits, Mapping):
        raise ConfigError(f"bits must be a mapping from layer name to LayerBits, got {type(bits).__name__}")
    layers = {name for name, m, _ in _walk(model) if isinstance(m, _LAYER_TYPES)}
    unknown = sorted(k for k in bits if k not in layers)
    if unknown:
        all_names = {name for name, _ in model.named_modules()}
        missing = [k for k in unknown if k not in all_names]
        if missing:
            raise ConfigError(f"bits names layers that are not in the model: {', '.join(map(str, missing))}")
        raise ConfigError(
            f"bits names modules that are not Conv/Linear layers: {', '.join(map(str, unknown))}"
        )
    for k, v in bits.items():
        if not isinstance(v, LayerBits):
            raise ConfigError(f"bits['{k}'] must be a LayerBits, got {type(v).__name__}")
        # a LayerBits validates itself, but re-check in case it was built around __post_init__
        _check_bit_width(f"bits['{k}'].weight", v.weight)
        _check_bit_width(f"bits['{k}'].act", v.act)
    return dict(bits)


# ---------------------------------------------------------------------------------------------
# the forward pass
# ---------------------------------------------------------------------------------------------
def _tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _key(t: torch.Tensor) -> tuple[int, int]:
    # two tensors starting at the same address with the same number of elements are the same
    # memory (in-place ops, views such as flatten, Identity / Dropout in eval)
    return (t.data_ptr(), t.numel())


@dataclass
class _Stored:
    elems: int  # per sample
    bits: int | None = None  # largest a_bits of the Conv/Linear layers consuming it, None if none


@dataclass
class _Trace:
    layers: dict[str, dict] = field(default_factory=dict)
    stored: dict[tuple[int, int], _Stored] = field(default_factory=dict)
    max_act: int = 0


def _run(model: nn.Module, x: torch.Tensor, bits: dict[str, LayerBits]) -> _Trace:
    from .fit import check_model, match_dtype

    check_model(model)
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] < 1:
        raise ConfigError("example_input must be a tensor with a batch dimension (shape[0] >= 1)")
    # only the shapes count: a float64 model took a float32 input with torch's "Input type (float) and bias type
    # (double)"
    (x,) = match_dtype((x,), model)
    batch = x.shape[0]
    trace = _Trace()
    keep: list[torch.Tensor] = []  # hold every activation so data pointers are not reused

    def per_sample(t: torch.Tensor) -> int:
        return t.numel() // batch

    def store(t: torch.Tensor) -> _Stored | None:
        if t.numel() == 0:
            return None
        k = _key(t)
        if k not in trace.stored:
            keep.append(t)
            trace.stored[k] = _Stored(per_sample(t))
        return trace.stored[k]

    def pre_hook(name: str):
        a_bits = bits.get(name, _FP).a_bits

        def hook(module, args):
            ts = list(_tensors(args[:1]))
            if ts:
                # a layer's input counts toward N_a even when no module made it (torch.cat, a functional op):
                # before session 25 only module outputs and the model input did
                trace.max_act = max(trace.max_act, per_sample(ts[0]))
                s = store(ts[0])
                if s is not None:
                    s.bits = a_bits if s.bits is None else max(s.bits, a_bits)

        return hook

    def leaf_pre_hook(module, args):
        # the input of a pool / BN / activation made by a functional op (torch.cat, F.interpolate) is an
        # activation too: only Conv/Linear inputs counted before, so a cat read by a MaxPool was missed
        ts = list(_tensors(args[:1]))
        if ts:
            trace.max_act = max(trace.max_act, per_sample(ts[0]))

    def post_hook(name: str):
        def hook(module, args, output):
            outs = list(_tensors(output))
            for t in outs:
                store(t)
                trace.max_act = max(trace.max_act, per_sample(t))
            if not isinstance(module, _LAYER_TYPES):
                return
            ins = list(_tensors(args[:1]))
            in_el = per_sample(ins[0]) if ins else 0
            out_el = sum(per_sample(t) for t in outs)
            # MACs = (elements that each take prod(weight.shape[1:]) products) * that product,
            # finished in _profile from the weight the layer actually uses (parametrized or not):
            # conv/linear: every output element sums (C_in/groups)*prod(k) (resp. in_features)
            # products; transposed conv: every input element feeds (C_out/groups)*prod(k) outputs
            transposed = isinstance(module, _ConvNd) and module.transposed
            rec = trace.layers.setdefault(name, {"mac_elems": 0, "in": 0, "out": 0})
            rec["mac_elems"] += in_el if transposed else out_el
            rec["in"] = max(rec["in"], in_el)
            rec["out"] = max(rec["out"], out_el)

        return hook

    modes = [(m, m.training) for m in model.modules()]
    handles = []
    try:
        for name, module, hooked in _walk(model):
            if isinstance(module, _LAYER_TYPES):
                # ahead of lowbit.quantize's input-quantizer pre-hook: the input is the tensor that was made, not
                # its fake-quantized copy (session 26: counted once at 32 bits and once per quantized layer)
                handles.append(module.register_forward_pre_hook(pre_hook(name), prepend=True))
            elif hooked:
                handles.append(module.register_forward_pre_hook(leaf_pre_hook))
            if hooked:
                handles.append(module.register_forward_hook(post_hook(name)))
        model.eval()
        with torch.no_grad():
            store(x)
            trace.max_act = max(trace.max_act, per_sample(x))
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return trace


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------
def mem_002(n_params: int, n_act: int, b_p: int) -> int:
    """Seed 002's inference memory in bits: ``Mem = N_p * b_p + N_a * max(b_p, 4)``."""
    _check_bit_width("b_p", b_p)
    if b_p is None:
        raise ConfigError("b_p must be an integer in 1..32")
    if n_params < 0 or n_act < 0:
        raise ConfigError(f"n_params and n_act must be >= 0, got {n_params} and {n_act}")
    return n_params * b_p + n_act * max(b_p, MIN_ACT_BITS)


def _profile(model: nn.Module, example_input: torch.Tensor, bits) -> tuple[CostSummary, _Trace]:
    bits = _check_bits_map(model, bits)
    trace = _run(model, example_input, bits)
    with torch.no_grad():
        seen: set[object] = set()
        layers: list[LayerCost] = []
        n_params = size_bits = n_scales = 0
        for name, module, _ in _walk(model):
            if isinstance(module, _LAYER_TYPES):
                lb = bits.get(name, _FP)
                weight = module.weight
                w_key, w_n = next(_own_tensors(module))
                b_n = module.bias.numel() if module.bias is not None else 0
                rec = trace.layers.get(name, {"mac_elems": 0, "in": 0, "out": 0})
                macs = rec["mac_elems"] * math.prod(weight.shape[1:])
                lc = LayerCost(
                    name=name,
                    kind="conv" if isinstance(module, _ConvNd) else "linear",
                    weight_shape=tuple(weight.shape),
                    params=w_n + b_n,
                    macs=macs,
                    w_bits=lb.w_bits,
                    a_bits=lb.a_bits,
                    bitops=macs * lb.w_bits * lb.a_bits,
                    size_bits=w_n * lb.w_bits + b_n * FP_BITS + lb.n_scales * FP_BITS,
                    out_elems=rec["out"],
                    in_elems=rec["in"],
                    n_scales=lb.n_scales,
                )
                layers.append(lc)
                n_scales += lb.n_scales
                size_bits += lb.n_scales * FP_BITS
                for i, (key, n) in enumerate(_own_tensors(module)):
                    if key not in seen:
                        seen.add(key)
                        n_params += n
                        size_bits += n * (lb.w_bits if i == 0 and key == w_key else FP_BITS)
            else:
                for key, n in _own_tensors(module):
                    if key not in seen:
                        seen.add(key)
                        n_params += n
                        size_bits += n * FP_BITS
    act_bits = max((lb.a_bits for lb in bits.values()), default=FP_BITS)
    param_bits = size_bits - n_scales * FP_BITS
    summary = CostSummary(
        layers=layers,
        params=n_params,
        macs=sum(lc.macs for lc in layers),
        bitops=sum(lc.bitops for lc in layers),
        size_bits=size_bits,
        fp32_size_bits=n_params * FP_BITS,
        max_act_elems=trace.max_act,
        mem_bits=param_bits + trace.max_act * max(act_bits, MIN_ACT_BITS),
        act_bits=act_bits,
        n_scales=n_scales,
    )
    return summary, trace


def profile(
    model: nn.Module, example_input: torch.Tensor, bits: Mapping[str, LayerBits] | None = None
) -> CostSummary:
    """Measure parameters, MACs, BitOPs, size and inference memory of ``model``.

    Runs ONE forward pass on ``example_input`` (any batch size; numbers are per sample) under
    ``torch.no_grad`` with the model in ``eval()`` mode and forward hooks on the Conv/Linear
    layers and leaf modules. The hooks are removed and every module's training flag is restored
    afterwards, also when the forward pass raises.

    ``bits`` maps Conv/Linear module names to :class:`LayerBits`; missing layers are full
    precision. A name that is not a Conv/Linear layer of ``model`` raises :class:`ConfigError`.

    ``mem_bits`` generalizes seed 002's ``Mem = N_p*b_p + N_a*max(b_p, 4)`` to mixed bits:
    ``param_bits + N_a * max(b_a, 4)``, where ``param_bits`` is every parameter at its own bits
    (``size_bits`` without the quantizer scales) and ``b_a`` is the largest input-activation bit
    width among the layers listed in ``bits`` (32 if ``bits`` is empty). A float model gives
    ``N_p*32 + N_a*32``; a model whose parameters are all Conv/Linear weights at ``b`` bits with
    ``b``-bit inputs gives exactly ``mem_002(N_p, N_a, b)``.
    """
    return _profile(model, example_input, bits)[0]


def training_memory(
    model: nn.Module,
    example_input: torch.Tensor,
    bits: Mapping[str, LayerBits] | None = None,
    batch_size: int = 1,
    optimizer_slots: int = 1,
    stored: str = "all",
) -> dict:
    """Seed 002's on-device training memory table, for any model (bits and MB; MB = 1e6 bytes).

    Training keeps

    * ``latent_params``: the full-precision latent copy of every trainable number, 32 bit each:
      ``32 * (N_p + n_scales)`` (quantizer scales are trained too);
    * ``optimizer``: ``optimizer_slots`` 32-bit numbers per trainable number (1 for SGD with
      momentum, 2 for Adam, 0 for plain SGD);
    * ``activations``: every activation stored for the backward pass, ``batch_size`` times the
      per-sample bits. With ``stored="all"`` these are the network input and every hooked module's
      output (a tensor written in place or viewed, e.g. by ``ReLU(inplace=True)`` or ``Flatten``,
      counts once), each at the largest ``a_bits`` of the Conv/Linear layers that consume it, or at
      32 bits if no Conv/Linear consumes it. ``stored="layer_inputs"`` keeps only the inputs of
      the Conv/Linear layers at their ``a_bits`` (the count behind seed 002's table: one tensor
      per layer, e.g. ~0.77 MB x B for a float ResNet-20).

    The inference side of the table is :attr:`CostSummary.mem_bits`, split into
    ``inference_params`` (parameters at their trained bits, scales excluded) and
    ``inference_activation`` (``N_a * max(b_a, 4)``).

    Returns a flat dict: ``<part>_bits`` and ``<part>_mb`` for ``latent_params``, ``optimizer``,
    ``activations``, ``total`` (the training sum), ``inference_params``,
    ``inference_activation``, ``inference_total``; plus ``batch_size``, ``optimizer_slots``,
    ``stored`` and ``activation_bits_per_sample``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(optimizer_slots, bool) or not isinstance(optimizer_slots, int) or optimizer_slots < 0:
        raise ConfigError(f"optimizer_slots must be an integer >= 0, got {optimizer_slots!r}")
    if stored not in _STORED_RULES:
        raise ConfigError(f"stored must be one of {', '.join(_STORED_RULES)}, got {stored!r}")
    summary, trace = _profile(model, example_input, bits)
    # what the optimizer really holds: at least the visible weights + scales, more when a method keeps a
    # larger latent state than the weight it produces (RDHS/SGT: m logits per weight)
    trainable = max(summary.params + summary.n_scales,
                    sum(p.numel() for p in model.parameters() if p.requires_grad))
    per_sample = sum(
        s.elems * (FP_BITS if s.bits is None else s.bits)
        for s in trace.stored.values()
        if stored == "all" or s.bits is not None
    )
    parts = {
        "latent_params": FP_BITS * trainable,
        "optimizer": optimizer_slots * FP_BITS * trainable,
        "activations": per_sample * batch_size,
    }
    parts["total"] = parts["latent_params"] + parts["optimizer"] + parts["activations"]
    parts["inference_params"] = summary.param_bits
    parts["inference_activation"] = summary.max_act_elems * max(summary.act_bits, MIN_ACT_BITS)
    parts["inference_total"] = parts["inference_params"] + parts["inference_activation"]
    out: dict = {
        "batch_size": batch_size,
        "optimizer_slots": optimizer_slots,
        "stored": stored,
        "activation_bits_per_sample": per_sample,
    }
    for k, v in parts.items():
        out[f"{k}_bits"] = v
        out[f"{k}_mb"] = v / 8e6
    return out
