"""Lower a (quantized) PyTorch model to the exporter's graph: a list of small deployable ops.

The model is traced with ``torch.fx`` (every Conv/Linear/BatchNorm/ReLU/pool/flatten module is a
leaf; containers such as a ResNet ``BasicBlock`` are traced through, so the residual ``+`` becomes
an ``add`` op). Each op reads float32 tensors and writes one:

===========  =====================================================================================
``conv``     Conv2d or Linear (``kind`` "conv"/"linear") with, optionally, its input quantizer
             (``act``), a quantized weight (``weight`` is a :class:`WeightQ`: codes + level set) or a
             float32 weight, and the BatchNorm that follows it: folded into a float weight
             (``bn = "folded"``), or kept as the per-channel affine ``scale, shift`` applied after
             the accumulation of a quantized weight (``bn = "affine"``; :mod:`lowbit.export.fold`)
``affine``   a BatchNorm with no conv before it (``y = scale·x + shift`` per channel)
``relu``     ``max(x, 0)``
``add``      elementwise sum of two tensors (residual connections)
``gap``      global average pooling (``AdaptiveAvgPool2d(1)``)
``maxpool``  ``MaxPool2d``
``flatten``  ``Flatten`` (a reshape; no data moves)
===========  =====================================================================================

Identity and Dropout disappear. Anything else raises a one-line :class:`ConfigError` naming the
layer. With an example input the shapes (per sample, no batch dimension) are recorded and every
quantizer runs once in eval mode, so their level sets are current.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import ConfigError
from ..quantize import weight_param
from .fold import bn_affine, fold_bn
from .levels import ActQuant, LevelSpec, act_quant, describe_levels, weight_codes

SUPPORTED = ("Conv2d (any groups, dilation=1, zero padding), Linear, BatchNorm1d/2d, ReLU, MaxPool2d, "
             "AdaptiveAvgPool2d(1), Flatten, Identity, Dropout, +")
_LEAVES = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.MaxPool2d,
           nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity, nn.Dropout)


@dataclass
class WeightQ:
    """A quantized weight: integer codes (index into its level set) plus the level set."""

    quantizer: str  # label, e.g. "sawb2"
    bits: int
    codes: np.ndarray  # uint8, the weight's shape
    levels: LevelSpec

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    def row_index(self) -> np.ndarray:
        """Level-set row of each output channel."""
        o = self.codes.shape[0]
        return np.arange(o) if self.levels.rows > 1 else np.zeros(o, dtype=np.int64)

    def dequantize(self) -> np.ndarray:
        """The float32 weight ``levels[row, code]``."""
        lv = self.levels.levels32()
        flat = self.codes.reshape(self.codes.shape[0], -1).astype(np.int64)
        return lv[self.row_index()[:, None], flat].reshape(self.codes.shape)


@dataclass
class Op:
    """One deployable op of the graph (module docstring)."""

    kind: str
    name: str
    inputs: list[str]
    output: str
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    attrs: dict = field(default_factory=dict)  # conv: kernel, stride, padding; maxpool: same
    weight: np.ndarray | WeightQ | None = None
    bias: np.ndarray | None = None  # float32 (folded) bias of a float-weight conv
    scale: np.ndarray | None = None  # per-channel affine after accumulation (quantized conv, affine op)
    shift: np.ndarray | None = None
    act: ActQuant | None = None
    bn: str = ""  # "", "folded" or "affine"

    @property
    def quantized(self) -> bool:
        return isinstance(self.weight, WeightQ)


@dataclass
class Graph:
    """The lowered model: ops in execution order, one float32 input, one output."""

    ops: list[Op]
    input: str
    output: str
    input_shape: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()
    meta: dict = field(default_factory=dict)

    def conv_ops(self) -> list[Op]:
        return [op for op in self.ops if op.kind == "conv"]


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


class _ShapeRecorder(fx.Interpreter):
    """Runs the traced model once and records every node's per-sample output shape."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[str, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n.name] = tuple(int(d) for d in out.shape[1:])
        return out


def trace(model: nn.Module, who: str = "export") -> fx.GraphModule:
    """``model`` traced with the supported layers as leaves; ``who`` (``export``, ``integer mode``) begins the
    one-line error of a model torch.fx cannot trace."""
    try:
        g = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure is a user-facing "cannot export"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{who}: cannot trace {type(model).__name__} with torch.fx ({msg})") from None
    flatten_idioms(g)
    return fx.GraphModule(model, g)


#: how a supported reshape is written (the error for any other reshape says it)
RESHAPE_HINT = ("a reshape is supported as a flatten from dim 1: torch.flatten(x, 1), nn.Flatten(), x.flatten(1), "
                "x.view(x.size(0), -1), x.reshape(x.shape[0], -1) or x.view(-1, N) with N the features per sample")


def flatten_to(x: torch.Tensor, features: int) -> torch.Tensor:
    """A model's ``x.view(-1, features)`` (or ``reshape``) as traced graphs compute it: ``torch.flatten(x, 1)``, which
    it equals when every sample holds ``features`` elements. Any other split of the batch is refused."""
    y = torch.flatten(x, 1)
    if y.shape[1] != features:
        raise ConfigError(f"export: view(-1, {features}) of a tensor of {tuple(x.shape[1:])} per sample "
                          f"({y.shape[1]} elements) is not a flatten from dim 1; {RESHAPE_HINT}")
    return y


def relu_call(n: fx.Node) -> bool:
    """Whether ``n`` is a functional ReLU: ``F.relu(x)``, ``torch.relu(x)``, ``x.relu()``, or in place
    (``F.relu(x, inplace=True)``, ``torch.relu_(x)``, ``x.relu_()``) on a tensor nothing else reads (an in-place
    ReLU would change what the others read: refused with that reason)."""
    if n.op == "call_function" and n.target in (F.relu, torch.relu, torch.relu_):
        inplace = n.target is torch.relu_ or bool(n.kwargs.get("inplace", n.args[1] if len(n.args) > 1 else False))
    elif n.op == "call_method" and n.target in ("relu", "relu_"):
        inplace = n.target == "relu_"
    else:
        return False
    if inplace and isinstance(n.args[0], fx.Node) and len(n.args[0].users) > 1:
        raise _unsupported(n.name, "an in-place ReLU on a tensor that other layers also read; use F.relu(x) or "
                                   "inplace=False")
    return True


def own_forward(m: nn.Module) -> tuple[str, str] | None:
    """Where ``m`` is a user's subclass of a torch layer with a ``forward`` of its own (a LoRA-style ``nn.Linear``,
    timm's ``Conv2dSame``), or a conv with a ``_conv_forward`` of its own (the method torch's ``Conv2d.forward`` calls:
    a weight-standardised conv): (what it is, that method), for an error: the lowering computes the torch layer from
    its attributes, not that method. None where the methods ``m`` runs are torch's."""
    for attr in ("forward", "_conv_forward"):
        owner = next((c for c in type(m).__mro__ if attr in vars(c)), None)
        if owner is None or owner.__module__.startswith("torch."):
            continue
        base = next(c for c in type(m).__mro__ if c.__module__.startswith("torch.nn.modules"))
        return f"{owner.__name__}, an nn.{base.__name__} subclass with a {attr} of its own", attr
    return None


def check_leaves(gm: fx.GraphModule, who: str) -> None:
    """A one-line error, naming it, for the first layer of ``gm`` (traced with the torch layers as leaves) that ``who``
    cannot compute: a subclass of a torch layer with a forward of its own (:func:`own_forward`), which it would not
    run, or a BatchNorm without running statistics, which it folds (before session 28 integer mode refused the latter
    at the first training batch, without the layer's name)."""
    mods = dict(gm.named_modules())
    for n in gm.graph.nodes:
        m = mods.get(n.target) if n.op == "call_module" else None
        own = own_forward(m) if isinstance(m, _LEAVES) else None
        if own is not None:
            raise ConfigError(f"{who}: layer '{n.target}' ({own[0]}) is not supported: {who} computes the torch layer, "
                              f"not that {own[1]}")
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.running_mean is None or m.running_var is None):
            raise ConfigError(f"{who}: layer '{n.target}' ({type(m).__name__} with track_running_stats=False) has no "
                              f"running statistics, which {who} folds into the layer before it")


def flatten_node(n: fx.Node) -> bool | None:
    """For a call of ``torch.flatten`` or :func:`flatten_to`: whether it flattens from dim 1 (the one form the
    lowering and integer mode read); ``None`` for any other node."""
    if n.op != "call_function" or n.target not in (torch.flatten, flatten_to):
        return None
    return n.target is flatten_to or (tuple(n.args[1:]) in ((1,), (1, -1)) and not n.kwargs)


def describe_node(n: fx.Node) -> str:
    """``"call_method view"`` for an error about a node no layer stands for; a reshape says how to write one."""
    what = getattr(n.target, "__name__", str(n.target))
    if what in ("view", "reshape", "flatten", "size", "getattr", "getitem"):
        what += f"; {RESHAPE_HINT}"
    return f"{n.op} {what}"


def _is_batch_size(n, x: fx.Node) -> bool:
    """Whether ``n`` is ``x.size(0)``, ``x.shape[0]`` or ``x.size()[0]`` in the traced graph."""
    if not isinstance(n, fx.Node):
        return False
    if n.op == "call_method" and n.target == "size" and n.args[:1] == (x,):
        return n.args[1:] == (0,) or (len(n.args) == 1 and n.kwargs == {"dim": 0})
    if n.op == "call_function" and n.target is operator.getitem and n.args[1:] == (0,):
        s = n.args[0]
        return isinstance(s, fx.Node) and s.args[:1] == (x,) and (
            (s.op == "call_function" and s.target is getattr and s.args[1:] == ("shape",))
            or (s.op == "call_method" and s.target == "size" and len(s.args) == 1 and not s.kwargs))
    return False


def flatten_idioms(g: fx.Graph) -> None:
    """Rewrite, in place, the ways hand-written CNNs flatten their features into ``torch.flatten(x, 1)``, the one
    form the lowering and integer mode read: ``x.flatten(1)``, ``torch.flatten(x, start_dim=1)``,
    ``x.view(x.size(0), -1)`` and ``x.reshape(...)`` with ``x.size(0)``, ``x.shape[0]`` or ``x.size()[0]`` (also as
    one tuple); ``x.view(-1, N)`` with a constant N becomes :func:`flatten_to`, which checks N at run time. The size
    nodes they leave unused are removed. Other reshapes stay (and are refused)."""
    for n in list(g.nodes):
        x = n.args[0] if n.args else None
        flat = False
        if n.op == "call_method" and n.target in ("view", "reshape"):
            dims = n.args[1:]
            if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                dims = tuple(dims[0])
            if len(dims) == 2 and dims[0] == -1 and isinstance(dims[1], int) and not isinstance(dims[1], bool) \
                    and dims[1] > 0:
                with g.inserting_before(n):
                    new = g.call_function(flatten_to, (x, dims[1]))
                n.replace_all_uses_with(new)
                g.erase_node(n)
                continue
        if (n.op == "call_method" and n.target == "flatten") or (n.op == "call_function" and n.target is torch.flatten):
            start = n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)
            end = n.args[2] if len(n.args) > 2 else n.kwargs.get("end_dim", -1)
            flat = start == 1 and end == -1
        elif n.op == "call_method" and n.target in ("view", "reshape"):
            dims = n.args[1:]
            if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                dims = tuple(dims[0])
            flat = len(dims) == 2 and dims[1] == -1 and _is_batch_size(dims[0], x)
        if not flat or (n.op == "call_function" and n.args[1:] == (1,) and not n.kwargs):
            continue
        with g.inserting_before(n):
            new = g.call_function(torch.flatten, (x, 1))
        n.replace_all_uses_with(new)
        g.erase_node(n)
    for n in reversed(list(g.nodes)):  # the size / shape nodes no longer read
        if not n.users and ((n.op == "call_method" and n.target == "size")
                            or (n.op == "call_function" and n.target in (operator.getitem, getattr))):
            g.erase_node(n)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _unsupported(where: str, what: str) -> ConfigError:
    return ConfigError(f"export: layer '{where}' ({what}) is not supported; supported: {SUPPORTED}")


def _weight(name: str, module: nn.Module) -> tuple[np.ndarray | WeightQ, bool]:
    """(weight, quantized?) of a conv/linear: codes + levels for a quantized one."""
    wp = weight_param(module)
    with torch.no_grad():
        w = module.weight.detach()  # runs the parametrization: the quantizer records its levels
    if wp is None:
        return w.cpu().numpy().astype(np.float32), False
    q = getattr(wp, "quantizer", None)
    bits = getattr(wp, "bits", getattr(q, "bits", None))
    if bits is None:
        raise ConfigError(
            f"export: layer '{name}': weight parametrization {type(wp).__name__} exposes no .quantizer or .bits; "
            "the exporter needs weight_param(layer).quantizer with levels()"
        )
    if bits >= 32:  # full precision
        return w.cpu().numpy().astype(np.float32), False
    try:
        levels = q.levels()
    except (AttributeError, RuntimeError, ValueError):
        # a parametrization that never calls its quantizer (SGT/RDHS pick values directly):
        # the level set is the weight's own distinct values
        levels = observed_levels(w, int(bits), name)
    codes = weight_codes(w, levels, name)
    label = getattr(q, "alias", type(wp).__name__) + str(bits)
    if getattr(q, "per_channel", False):
        label += "/ch"
    lv = levels.detach().float().cpu().numpy()
    if lv.ndim == 2 and lv.shape[0] == 1:
        lv = lv[0]
    return WeightQ(label, int(bits), codes, describe_levels(lv)), True


def observed_levels(w: torch.Tensor, bits: int, name: str) -> torch.Tensor:
    """The sorted distinct values of ``w`` ((L,)), or of each output channel ((C, L), short rows
    padded with their largest value), when there are at most ``2**bits`` of them."""
    u = torch.unique(w)
    if u.numel() <= 2**bits:
        return u
    rows = [torch.unique(r) for r in w.reshape(w.shape[0], -1)]
    most = max(r.numel() for r in rows)
    if most > 2**bits:
        raise ConfigError(f"export: layer '{name}': its weight takes {u.numel()} distinct values, more than "
                          f"2^{bits}, and its quantizer has no level set: it is not a {bits}-bit weight")
    return torch.stack([torch.cat([r, r[-1:].expand(most - r.numel())]) for r in rows])


def _explicit_padding(module: nn.Conv2d) -> tuple[int, int] | None:
    """The conv's zero padding as (rows, columns) a side: torch's ``padding="valid"`` is 0, ``"same"`` (stride 1) is
    half the kernel's reach where that is whole (odd kernels; before session 28 both strings were refused as if not
    zero padding); None: "same" on an even kernel, which pads one side more than the other."""
    if not isinstance(module.padding, str):
        return _pair(module.padding)
    if module.padding == "valid":
        return (0, 0)
    reach = [d * (k - 1) for d, k in zip(_pair(module.dilation), module.kernel_size)]
    return None if any(r % 2 for r in reach) else tuple(r // 2 for r in reach)


def _conv_op(name: str, module: nn.Module, bn: nn.Module | None, inp: str, out: str, acts: bool = True) -> Op:
    if isinstance(module, nn.Conv2d):
        padding = _explicit_padding(module)
        if _pair(module.dilation) != (1, 1) or module.padding_mode != "zeros" or padding is None:
            raise _unsupported(name, f"Conv2d with dilation={module.dilation}, "
                                     f"padding={module.padding!r}" + (" on an even kernel (padded on one side more "
                                                                      "than the other)" if padding is None else "")
                                     + f", padding_mode={module.padding_mode}")
        attrs = {"kernel": list(module.kernel_size), "stride": list(_pair(module.stride)),
                 "padding": list(padding)}
        if module.groups != 1:  # grouped / depthwise: the float kernel (numpy_ref.prepare_conv)
            attrs["groups"] = int(module.groups)
        kind = "conv"
    else:
        attrs = {"kernel": [1, 1], "stride": [1, 1], "padding": [0, 0]}
        kind = "linear"
    weight, quantized = _weight(name, module)
    bias = None if module.bias is None else module.bias.detach().cpu().numpy().astype(np.float64)
    op = Op("conv", name, [inp], out, attrs={"layer": kind, **attrs},
            act=act_quant(getattr(module, "input_quantizer", None), name) if acts else None)
    if not quantized:
        if bn is not None:
            op.weight, op.bias = fold_bn(weight, bias, bn)
            op.bn = "folded"
        else:
            op.weight = weight
            op.bias = None if bias is None else bias.astype(np.float32)
        return op
    op.weight = weight
    if bn is not None:
        g, h = bn_affine(bn)
        if bias is not None:
            h = h + g * bias
        op.scale, op.shift, op.bn = g.astype(np.float32), h.astype(np.float32), "affine"
    elif bias is not None:
        op.shift = bias.astype(np.float32)
    return op


def lower(model: nn.Module, example_input: torch.Tensor | None = None, acts: bool = True) -> Graph:
    """Trace and lower ``model`` (put in eval mode) to a :class:`Graph`.

    ``example_input`` (a batch) records per-sample shapes and runs every quantizer once; without
    it, shapes are left empty and input quantizers must already have run. ``acts=False`` leaves
    the input quantizers out (enough for weight size accounting, :func:`packed_size_table`).
    """
    model.eval()
    gm = trace(model)
    check_leaves(gm, "export")
    shapes: dict[str, tuple[int, ...]] = {}
    if example_input is not None:
        rec = _ShapeRecorder(gm)
        with torch.no_grad():
            try:
                rec.run(example_input)
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001
                msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise ConfigError(f"export: the model does not run on the example input ({msg})") from None
        shapes = rec.shapes
    modules = dict(gm.named_modules())
    users = {node.name: list(node.users) for node in gm.graph.nodes}
    alias: dict[str, str] = {}
    absorbed: set[str] = set()
    ops: list[Op] = []
    inp = out = None

    def t(node) -> str:
        if not isinstance(node, fx.Node):
            raise ConfigError(f"export: a constant operand ({node!r}) in the graph is not supported")
        return alias.get(node.name, node.name)

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if inp is not None:
                raise ConfigError("export: models with more than one input are not supported")
            inp = node.name
            continue
        if node.op == "output":
            out = t(node.args[0])
            continue
        if node.name in absorbed:
            continue
        if node.op == "call_module":
            m = modules[node.target]
            src = node.target
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nxt = users[node.name]
                bn = None
                if len(nxt) == 1 and nxt[0].op == "call_module" and \
                        isinstance(modules[nxt[0].target], nn.modules.batchnorm._BatchNorm):
                    bn = modules[nxt[0].target]
                    absorbed.add(nxt[0].name)
                    alias[nxt[0].name] = node.name
                op = _conv_op(src, m, bn, t(node.args[0]), node.name, acts)
                calls = sum(o.kind == "conv" and o.attrs.get("module", o.name) == src for o in ops)
                if calls:  # a module the forward calls again (shared weights): one op per call, each named apart,
                    op.name = f"{src}.call{calls + 1}"  # so the C defines no identifier twice (session 24)
                op.attrs["module"] = src
                ops.append(op)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                g, h = bn_affine(m)
                ops.append(Op("affine", src, [t(node.args[0])], node.name,
                              scale=g.astype(np.float32), shift=h.astype(np.float32)))
            elif isinstance(m, nn.ReLU):
                if m.inplace and len(users[node.args[0].name]) > 1:  # others would read the ReLU output
                    raise _unsupported(src, "ReLU(inplace=True) on a tensor that other layers also read")
                ops.append(Op("relu", src, [t(node.args[0])], node.name))
            elif isinstance(m, (nn.Identity, nn.Dropout)):
                alias[node.name] = t(node.args[0])
            elif isinstance(m, nn.Flatten):
                if m.start_dim != 1 or m.end_dim != -1:
                    raise _unsupported(src, f"Flatten(start_dim={m.start_dim}, end_dim={m.end_dim})")
                ops.append(Op("flatten", src, [t(node.args[0])], node.name))
            elif isinstance(m, nn.AdaptiveAvgPool2d):
                if _pair(m.output_size) != (1, 1):
                    raise _unsupported(src, f"AdaptiveAvgPool2d(output_size={m.output_size})")
                ops.append(Op("gap", src, [t(node.args[0])], node.name))
            elif isinstance(m, nn.MaxPool2d):
                if m.ceil_mode or _pair(m.dilation) != (1, 1) or m.return_indices:
                    raise _unsupported(src, "MaxPool2d with ceil_mode, dilation or return_indices")
                ops.append(Op("maxpool", src, [t(node.args[0])], node.name, attrs={
                    "kernel": list(_pair(m.kernel_size)),
                    "stride": list(_pair(m.stride if m.stride is not None else m.kernel_size)),
                    "padding": list(_pair(m.padding))}))
            else:
                raise _unsupported(src, type(m).__name__)
        elif node.op == "call_function" and node.target in (operator.add, torch.add) and len(node.args) == 2 \
                and not node.kwargs:
            ops.append(Op("add", node.name, [t(node.args[0]), t(node.args[1])], node.name))
        elif relu_call(node):
            ops.append(Op("relu", node.name, [t(node.args[0])], node.name))
        elif flatten_node(node):
            ops.append(Op("flatten", node.name, [t(node.args[0])], node.name))
        else:
            raise _unsupported(node.name, describe_node(node))
    g = Graph(ops, inp, out)
    if example_input is not None:
        g.input_shape = tuple(int(d) for d in example_input.shape[1:])
        for op in ops:
            op.out_shape = shapes.get(op.output, ())
        g.output_shape = shapes.get(out, g.input_shape if out == inp else ())
        _check_shapes(g)
    return g


def _check_shapes(g: Graph) -> None:
    shape = {g.input: g.input_shape}
    for op in g.ops:
        op.in_shape = shape[op.inputs[0]]
        shape[op.output] = op.out_shape
        if op.kind == "conv" and op.attrs["layer"] == "linear" and len(op.in_shape) != 1:
            raise ConfigError(f"export: Linear '{op.name}' on a {len(op.in_shape) + 1}-d input is not supported")
        if op.kind in ("conv", "maxpool", "gap") and op.attrs.get("layer") != "linear" and len(op.in_shape) != 3:
            raise ConfigError(f"export: layer '{op.name}' needs a (C, H, W) input, got {op.in_shape}")
