"""Integer-deployable QAT (``plan.integer: true``): what is trained is exactly the integer model.

``quantize(model, plan)`` with ``integer: true`` does what it always does (weight parametrizations,
input quantizers) and then:

1. **every layer is quantized**: a layer the plan keeps in full precision (the first conv and
   the last linear by default) gets 8-bit weights (LSQ per channel) and an 8-bit input (the
   network input: signed LSQ; elsewhere the plan's activation quantizer at 8 bits), because an
   integer-only network has no float layer;
2. **every tensor between layers is quantized once, at its producer**: the model is traced with
   ``torch.fx`` into units ``conv/linear (+ BatchNorm) (+ residual add) (+ ReLU)``, global average
   pooling, max-pooling and flatten (pass-through). A tensor's quantizer is the input quantizer of
   the first conv that reads it; the other convs that read it share that quantizer (a ResNet block
   input feeds conv1 and the shortcut: one set of codes). A tensor no conv reads (a residual
   operand, the input of a global pooling) gets an ``output_quantizer`` on its producer: the
   plan's activation quantizer after a ReLU, signed 8-bit LSQ otherwise (projection shortcuts,
   linear bottlenecks). The residual operand of an add is therefore a quantized tensor;
   with ``plan.integer_residual_bits: N`` (default 8 with the default output add) a tensor that is added as a residual or pooled is
   stored at N bits instead (the plan's activation quantizer at N bits after a ReLU, signed N-bit
   LSQ otherwise: a linear bottleneck's residual stream keeps its sign), and the convs that read it
   get it through their own input quantizer: in the integer graph one requantization per such
   tensor (a depthwise 1x1 conv with unit weights, ``attrs["role"] == "requant"``);
3. **training** (``model.train()``) runs the traced graph with those quantizers (straight-through
   gradients, BatchNorm on batch statistics: ordinary QAT);
4. **evaluation** (``model.eval()``) runs the integer network itself
   (:class:`lowbit.export.intgraph.IntReference`): BatchNorm (running statistics) becomes the
   per-channel requantization (int32 multiplier + shift, :mod:`lowbit.export.requant`), residual
   adds and pooling happen on codes (``plan.integer_residual``: ``output`` (the default), the
   conv requantized to an 8-bit intermediate and added to the residual at the output, which
   onnxruntime's QLinearConv + QLinearAdd compute bit for bit, or ``accumulator`` (the first form),
   the residual rounded into the conv's int32 accumulator before its one requantization), and the
   classifier's int32 accumulator is scaled to float32
   logits. The validation accuracy that picks the best epoch, and the test accuracy, are those
   of the integer model; the export writes the same integers (:func:`int_graph`). (With forward
   hooks on its modules, e.g. during cost profiling, eval runs the fake-quantized float graph
   instead, so that the hooks see every layer; so does a model with any module in train mode, e.g. BatchNorm
   during :func:`lowbit.train.recalibrate_bn`.)
"""

from __future__ import annotations

import operator
import types
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn

from .errors import ConfigError

#: weights of layers the plan keeps in full precision, in integer mode (+ init: plan.integer_init)
FP_LAYER_WEIGHT = {"name": "lsq", "bits": 8, "per_channel": True}
#: the network input, and tensors that are not post-ReLU (residual operands, linear bottlenecks)
#: (+ init: plan.integer_init)
SIGNED_ACT = {"name": "lsq", "bits": 8, "signed": True}
SUPPORTED = ("Conv2d (any groups, dilation 1, zero padding) / Linear, each optionally followed by BatchNorm, "
             "a residual + and ReLU; AdaptiveAvgPool2d(1), MaxPool2d, Flatten, Identity, Dropout")


def integer_layers(plan, layers, first: str | None = None) -> None:
    """Give every layer the plan keeps in full precision 8-bit quantizers (in place). ``first``: the layer that reads
    the network input (:func:`lowbit.plan.traced_ends`; default the first in registration order)."""
    from .plan import QuantSpec

    if plan.weight is None or plan.act is None:
        raise ConfigError("plan.integer: true needs a weight and an act quantizer (an integer network quantizes both)")
    init = {"init": plan.integer_init}
    first = layers[0].name if first is None else first
    for lp in layers:
        if lp.weight is None:
            lp.weight = QuantSpec(**FP_LAYER_WEIGHT, **init)
            lp.integer_roles += ("weight",)
        if lp.act is None:
            lp.act = QuantSpec(**SIGNED_ACT, **init) if lp.name == first else plan.act.merged({"bits": 8})
            lp.integer_roles += ("act",)


# ---------------------------------------------------------------------------------------------
# units of the traced graph
# ---------------------------------------------------------------------------------------------
@dataclass
class Unit:
    kind: str  # conv | gap | maxpool | flatten
    node: fx.Node  # the unit's output
    inp: fx.Node  # its input tensor
    name: str = ""  # module path
    module: nn.Module | None = None
    bn: nn.Module | None = None
    relu: bool = False
    res: fx.Node | None = None
    nodes: list = field(default_factory=list)


def _is_add(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in (operator.add, torch.add) and len(n.args) == 2 and not n.kwargs


def _is_relu(n: fx.Node, mods) -> bool:
    if n.op == "call_module":
        return isinstance(mods[n.target], nn.ReLU)
    from .export.graph import relu_call

    return relu_call(n)


def _unsupported(n: fx.Node, what: str) -> ConfigError:
    return ConfigError(f"integer mode: layer '{n.target if n.op == 'call_module' else n.name}' ({what}) is not "
                       f"supported; supported: {SUPPORTED}")


def analyse(gm: fx.GraphModule) -> tuple[fx.Node, list[Unit], fx.Node]:
    """(input node, units in execution order, output node) of a traced model."""
    from .export.graph import _explicit_padding, check_leaves, flatten_node

    check_leaves(gm, "integer mode")
    mods = dict(gm.named_modules())
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    alias: dict[fx.Node, fx.Node] = {}
    claimed: set[fx.Node] = set()
    units: list[Unit] = []
    inp = out = None

    def a(n):
        if not isinstance(n, fx.Node):
            raise ConfigError(f"integer mode: a constant operand ({n!r}) is not supported")
        return alias.get(n, n)

    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if inp is not None:
                raise ConfigError("integer mode: models with more than one input are not supported")
            inp = n
            continue
        if n.op == "output":
            out = a(n.args[0])
            continue
        if n in claimed:
            continue
        m = mods.get(n.target) if n.op == "call_module" else None
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            # padding="valid" / "same" (odd kernels) are the zero padding they are (as in the float export, session
            # 28; refused here as if they were not: "padding 'same' ... not supported; supported: ... zero padding")
            uneven = isinstance(m, nn.Conv2d) and _explicit_padding(m) is None
            if isinstance(m, nn.Conv2d) and (m.dilation not in (1, (1, 1)) or m.padding_mode != "zeros" or uneven):
                raise _unsupported(n, f"Conv2d with dilation {m.dilation}, padding {m.padding!r}"
                                      + (" on an even kernel (padded on one side more than the other)" if uneven else "")
                                      + f", padding_mode {m.padding_mode}")
            u = Unit("conv", n, a(n.args[0]), name=n.target, module=m, nodes=[n])
            cur = n

            def users(node):  # node's users, through Identity/Dropout (the unit absorbs them: eval's identity)
                skipped = []
                nxt = list(node.users)
                while len(nxt) == 1 and nxt[0].op == "call_module" and \
                        isinstance(mods[nxt[0].target], (nn.Identity, nn.Dropout)):
                    skipped.append(nxt[0])
                    nxt = list(nxt[0].users)
                return nxt, skipped

            nxt, skipped = users(cur)
            if len(nxt) == 1 and nxt[0].op == "call_module" and \
                    isinstance(mods[nxt[0].target], nn.modules.batchnorm._BatchNorm):
                u.bn, cur = mods[nxt[0].target], nxt[0]
                u.nodes += [*skipped, cur]
            nxt, skipped = users(cur)
            if len(nxt) == 1 and _is_add(nxt[0]) and nxt[0] not in claimed:
                add, prev = nxt[0], (skipped or [cur])[-1]
                other = add.args[1] if add.args[0] is prev else add.args[0]
                u.res, cur = other, add
                u.nodes += [*skipped, cur]
            nxt, skipped = users(cur)
            if len(nxt) == 1 and _is_relu(nxt[0], mods):
                u.relu, cur = True, nxt[0]
                u.nodes += [*skipped, cur]
            u.node = cur
            claimed.update(u.nodes)
            units.append(u)
        elif isinstance(m, (nn.Identity, nn.Dropout)):
            alias[n] = a(n.args[0])
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            if tuple(np.broadcast_to(m.output_size, 2)) != (1, 1):
                raise _unsupported(n, f"AdaptiveAvgPool2d(output_size={m.output_size})")
            units.append(Unit("gap", n, a(n.args[0]), name=n.target, module=m))
        elif isinstance(m, nn.MaxPool2d):
            if m.ceil_mode or m.dilation not in (1, (1, 1)) or m.return_indices:
                raise _unsupported(n, "MaxPool2d with ceil_mode, dilation or return_indices")
            units.append(Unit("maxpool", n, a(n.args[0]), name=n.target, module=m))
        elif isinstance(m, nn.Flatten) or flatten_node(n) is not None:
            if isinstance(m, nn.Flatten) and (m.start_dim != 1 or m.end_dim != -1) or m is None and not flatten_node(n):
                raise _unsupported(n, "flatten other than from dim 1")
            units.append(Unit("flatten", n, a(n.args[0]), name=str(n.target) if m is not None else n.name, module=m))
        elif m is not None:
            raise _unsupported(n, type(m).__name__)
        elif _is_add(n):
            raise _unsupported(n, "a + whose operands are not a conv(+BN) output and a tensor")
        elif _is_relu(n, mods):
            raise _unsupported(n, "a ReLU that does not follow a conv, BatchNorm or residual +")
        else:
            from .export.graph import describe_node

            raise _unsupported(n, describe_node(n))
    for u in units:  # operands may be aliases defined after the unit's first node (x + shortcut(x))
        u.inp = a(u.inp)
        u.res = a(u.res) if u.res is not None else None
    units.sort(key=lambda u: order[u.node])
    return inp, units, a(out)


# ---------------------------------------------------------------------------------------------
# tensor quantizers
# ---------------------------------------------------------------------------------------------
@dataclass
class IntState:
    """What :func:`integerize` built (kept on the model's quant state as ``state.integer``)."""

    gm: fx.GraphModule  # the training graph (quantizers inserted)
    units: list[Unit]
    input: fx.Node
    output: fx.Node
    group: dict[str, str]  # tensor node name -> root tensor node name (pass-through ops share codes)
    quantizer: dict[str, str]  # root tensor node name -> quantizer module path
    narrow: dict[str, str] = field(default_factory=dict)  # tensor read by convs at fewer bits than it is stored
    #                                                       (integer_residual_bits) -> their input quantizer
    cache: tuple | None = None
    negatives_checked: bool = False  # whether the first training forward looked for dropped negative inputs


def round_to_mid(v: torch.Tensor, s_mid: float, mid_zero: int) -> torch.Tensor:
    """``v`` on the 8-bit grid of an output-form residual add's intermediate ``mid`` (step ``s_mid``,
    zero ``mid_zero``, codes 0..255), with a straight-through gradient."""
    q = torch.clamp(torch.round(v.detach() / s_mid) + mid_zero, 0, 255)
    return v + ((q - mid_zero) * s_mid - v).detach()


class MidRound(nn.Module):
    """Training's model of the integer network's 8-bit intermediate ``mid`` of an output-form residual
    add (:func:`lowbit.export.intgraph.residual_output_constants`; ``plan.integer_train_mid``): the
    conv(+BN) output is rounded to ``mid``'s grid (step ``s_mid``, zero ``mid_zero``, codes 0..255)
    before the add, with a straight-through gradient. ``s_mid`` comes from the output and residual
    tensors' quantizers as they last ran (the output quantizer runs after this add: the previous
    batch's step); before both have run once, no rounding. The two quantizers are referenced, not
    registered: they live at their own paths.

    ``observe`` (``plan.integer_mid_range: observed``): the buffer ``v_range`` keeps a moving average
    (``momentum``) of each training batch's min and max of ``v``, and ``mid`` covers only that part
    of the range the output add could need (a finer grid; the rest is clamped, in training as in
    the integer network, which reads the same buffer: :meth:`observed`)."""

    def __init__(self, out_q: nn.Module, res_q: nn.Module, relu: bool, where: str, observe: bool = False,
                 momentum: float = 0.1):
        super().__init__()
        object.__setattr__(self, "_quantizers", (out_q, res_q))
        self.relu, self.where, self.momentum = bool(relu), where, float(momentum)
        if observe:
            self.register_buffer("v_range", torch.full((2,), float("nan")))

    def observed(self) -> tuple[float, float] | None:
        """The observed (min, max) of ``v`` (None: not observing, or no training batch seen yet)."""
        r = getattr(self, "v_range", None)
        if r is None or bool(torch.isnan(r).any()):
            return None
        return float(r[0]), float(r[1])

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        from .export.intgraph import residual_output_constants, tensor_q
        from .export.levels import act_quant

        if self.training and getattr(self, "v_range", None) is not None:
            with torch.no_grad():
                cur = torch.stack([v.min(), v.max()]).to(self.v_range)
                self.v_range.copy_(cur if bool(torch.isnan(self.v_range).any())
                                   else torch.lerp(self.v_range, cur, self.momentum))
        out_q, res_q = self._quantizers
        try:
            out_q.describe(), res_q.describe()
        except RuntimeError:  # a quantizer that has not run yet
            return v
        t_out = tensor_q(act_quant(out_q, self.where), self.where)
        t_res = tensor_q(act_quant(res_q, self.where), self.where)
        r = residual_output_constants(t_out, self.relu, t_res, self.where, self.observed())
        return round_to_mid(v, float(r["s_mid"]), int(r["attrs"]["mid_zero"]))


def residual_stream(state, q: nn.Module) -> str | None:
    """The tensor that :func:`integerize` stores through the conv input quantizer ``q`` although it is also added
    as a residual or pooled (it shares its readers' quantizer only because their bits were at least
    ``integer_residual_bits``), or None: changing ``q``'s bits below them would store that stream narrower."""
    ist = getattr(state, "integer", None)
    if ist is None or state.plan.integer_residual_bits is None:
        return None
    mods = dict(ist.gm.named_modules())
    for root, path in ist.quantizer.items():
        if mods.get(path) is not q:
            continue
        for u in ist.units:
            t = u.inp if u.kind == "gap" else u.res
            if t is not None and ist.group.get(t.name) == root:
                return root
    return None


def _pass_through(u: Unit) -> bool:
    return u.kind in ("maxpool", "flatten")


def integerize(model: nn.Module, state) -> None:
    """Turn a quantized model into an integer-mode one (module docstring); called by ``quantize``."""
    from .export.graph import trace
    from .quant import build_quantizer
    from .methods.base import build_from_spec

    for h in state.hooks:  # the traced graph quantizes every tensor itself
        h.remove()
    state.hooks.clear()
    gm = trace(model, "integer mode")  # quantize's error, not the export's (before session 28 'export: cannot trace')
    inp, units, out = analyse(gm)
    if not units or units[-1].node is not out or units[-1].kind != "conv" or units[-1].relu:
        raise ConfigError("integer mode: the model must end with a conv/linear (+ BatchNorm) without ReLU "
                          "(its int32 accumulator becomes the float logits)")
    mods = dict(model.named_modules())
    group: dict[str, str] = {inp.name: inp.name}
    for u in units:
        if _pass_through(u):
            group[u.node.name] = group[u.inp.name]
        elif u.node is not out:
            group[u.node.name] = u.node.name
    readers: dict[str, list[tuple[Unit, str]]] = {}
    for u in units:
        for t, role in ((u.inp, "main"), (u.res, "res")):
            if t is None:
                continue
            if t.name not in group:
                raise ConfigError(f"integer mode: layer '{u.name}' reads '{t.name}', which is not a quantized tensor")
            readers.setdefault(group[t.name], []).append((u, role))
    quantizer: dict[str, str] = {}
    narrow: dict[str, str] = {}
    producer = {u.node.name: u for u in units}
    plan = state.plan
    wide_bits = plan.integer_residual_bits
    for root in dict.fromkeys(group.values()):
        rd = readers.get(root, [])
        convs = [u for u, role in rd if u.kind == "conv" and role == "main"]
        pu = producer.get(root)
        # a tensor that is also added as a residual or pooled is stored at integer_residual_bits;
        # its convs read it requantized to their own input bits (one shared quantizer)
        # (signed when its producer has no ReLU: a linear bottleneck's residual stream keeps its sign)
        wide = wide_bits is not None and pu is not None and any(role == "res" or u.kind == "gap" for u, role in rd)
        if convs:
            q = convs[0].module.input_quantizer
            for u in convs[1:]:
                if _qkind(u.module.input_quantizer) != _qkind(q):
                    raise ConfigError(
                        f"integer mode: layers '{convs[0].name}' and '{u.name}' read the same tensor, which is stored "
                        f"once, but the plan gives them different input quantizers ({_qlabel(q)} and "
                        f"{_qlabel(u.module.input_quantizer)}); give them the same act in plan.layers")
                u.module.input_quantizer = q  # one tensor, one set of codes
            if wide and (not pu.relu or q.bits < wide_bits):
                narrow.update({u.inp.name: f"{convs[0].name}.input_quantizer" for u in convs})
            else:
                quantizer[root] = f"{convs[0].name}.input_quantizer"
                continue
        if pu is None:
            raise ConfigError("integer mode: the network input is not read by a conv/linear")
        if pu.relu:
            q = build_from_spec(plan.act.merged({"bits": wide_bits}) if wide else plan.act, "act")
        else:
            q = build_quantizer(SIGNED_ACT["name"], wide_bits if wide else SIGNED_ACT["bits"], role="act", signed=True,
                                init=plan.integer_init)
        pu.module.output_quantizer = q
        quantizer[root] = f"{pu.name}.output_quantizer"
    # the training graph: one quantizer call after every tensor's producer
    g = gm.graph
    for root, path in quantizer.items():
        node = next(n for n in g.nodes if n.name == root)
        with g.inserting_after(node):
            qn = g.call_module(path, (node,))
        node.replace_all_uses_with(qn, delete_user_cb=lambda user, qn=qn: user is not qn)
    # ... and a wide tensor's convs read it through their (narrower) input quantizer
    nodes = {n.name: n for n in g.nodes}
    narrowed: dict[fx.Node, fx.Node] = {}
    for u in units:
        if u.kind == "conv" and u.inp.name in narrow:
            cn = nodes[u.nodes[0].name]
            src = cn.args[0]
            if src not in narrowed:
                with g.inserting_after(src):
                    narrowed[src] = g.call_module(narrow[u.inp.name], (src,))
            cn.args = (narrowed[src],) + tuple(cn.args[1:])
    # ... and an output-form residual conv's output goes through mid's grid before the add
    if plan.integer_residual == "output" and plan.integer_train_mid:
        for u in units:
            root = group.get(u.node.name)
            if u.kind != "conv" or u.res is None or root not in quantizer:
                continue
            add = next(n for n in u.nodes if _is_add(n))
            pre = nodes[u.nodes[u.nodes.index(add) - 1].name]
            u.module.mid_round = MidRound(model.get_submodule(quantizer[root]),
                                          model.get_submodule(quantizer[group[u.res.name]]), u.relu, u.name,
                                          observe=plan.integer_mid_range == "observed")
            with g.inserting_after(pre):
                mn = g.call_module(f"{u.name}.mid_round", (pre,))
            an = nodes[add.name]
            an.args = tuple(mn if a is pre else a for a in an.args)
    g.lint()
    train_gm = fx.GraphModule(model, g)
    state.integer = IntState(train_gm, units, inp, out, group, quantizer, narrow)
    del mods

    # a method bound to the model (not a closure over it): copy.deepcopy (and AveragedModel, which deep-copies)
    # rebinds it to the copy, so a copy runs its own network (session 24: it ran the original's)
    object.__setattr__(model, "forward", types.MethodType(_integer_mode_forward, model))


def _integer_mode_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # the integer network only stands for the model when every module is in eval mode; else
    # the traced graph runs: in training, and when some module is in train mode (e.g. BatchNorm
    # during recalibrate_bn, which must see the data). Forward hooks on a module (cost
    # profiling, feature capture) also need the modules to run: then eval runs the
    # fake-quantized float graph (same layers, BN on running statistics).
    ist = model._lowbit_state.integer
    from .fit import model_dtype

    dt = model_dtype(model) or torch.float32
    if dt != torch.float32:  # quantize refuses such a model; a cast after it (model.double(), .half()) failed here in
        # fit with torch's "expected scalar type Float but found Double" from inside the traced graph, and in eval
        # with "the model cannot run inputs of shape (...)" (before session 29)
        raise ConfigError(f"integer mode: the model is in {dt}; integer mode trains and evaluates the float32 network "
                          "it deploys: call model.float()")
    if model.training and not ist.negatives_checked:
        return _checking_negatives(model, ist, x)
    if model.training or any(m.training or m._forward_hooks for m in model.modules()):
        return ist.gm(x)
    return _int_forward(model, x)


def _checking_negatives(model: nn.Module, ist: IntState, x: torch.Tensor) -> torch.Tensor:
    """The first training forward, warning where a tensor quantizer without negative levels drops a signed tensor's
    negative half (:func:`lowbit.quantize.warn_if_negatives_dropped`, which float mode's input hooks call), then
    building the integer network once, so that a quantizer it cannot express is an error before training goes on."""
    from .quantize import warn_if_negatives_dropped

    warned: set[str] = set()

    def check(path):
        def hook(_m, inp, out):
            if path not in warned and warn_if_negatives_dropped(inp[0], out, path.rsplit(".", 1)[0]):
                warned.add(path)
        return hook

    paths = dict.fromkeys([*ist.quantizer.values(), *ist.narrow.values()])
    hooks = [ist.gm.get_submodule(p).register_forward_hook(check(p)) for p in paths]
    try:
        out = ist.gm(x)
    finally:
        for h in hooks:
            h.remove()
    # and whether the integer network can be built at all (its quantizers now initialised by this batch): a
    # quantizer without an integer form was found only at the first evaluation, after an epoch (session 24)
    try:
        int_graph(model, x[:1].detach())
    except ConfigError as e:
        raise ConfigError(f"{e} (found on the first training batch)") from None
    ist.negatives_checked = True  # only now: before session 28 a refused first batch marked the model checked, and a
    return out  # retried fit trained a whole epoch of a network it cannot build, to fail at the evaluation


def _qkind(q: nn.Module) -> tuple:
    """What an activation quantizer computes, apart from its learned state: its class, bits and sign."""
    return type(q).__name__, getattr(q, "bits", None), bool(getattr(q, "signed", False))


def _qlabel(q: nn.Module) -> str:
    name, bits, signed = _qkind(q)
    return f"{name} {bits} bits" + (" signed" if signed else "")


def _versions(model: nn.Module) -> tuple:
    """What the integer graph of a model depends on besides the input shape and the plan: the contents of every
    parameter and buffer (a digest of their bytes) and every quantizer's bits (``lowbit.set_bits`` changes them in
    place). Before session 24 the key held the tensors' in-place versions, which an edit through ``.data``
    (``p.data.mul_(-1)``, ``p.data = ...``) does not change: eval kept the old network."""
    from .digest import digest

    return digest([*model.parameters(), *model.buffers()]), tuple(getattr(m, "bits", None) for m in model.modules())


def _int_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from .export.intgraph import IntReference

    ist = model._lowbit_state.integer
    # the integer graph depends on the weights and buffers, the input shape and the residual add
    # (plan.integer_residual and plan.integer_bias can be switched on a trained model: each form of
    # them shares the weights)
    plan = model._lowbit_state.plan
    first = ist.units[0].module if ist.units else None
    if x.dim() == 3 and isinstance(first, nn.Conv2d):
        raise ConfigError(f"integer mode: input shape {tuple(x.shape)} is one image: give a batch "
                          f"(N, {', '.join(map(str, x.shape))}), e.g. x.unsqueeze(0)")
    key = (_versions(model), tuple(x.shape[1:]), plan.integer_residual, plan.integer_bias)
    if ist.cache is None or ist.cache[0] != key:
        try:
            ist.cache = (key, IntReference(int_graph(model, x[:1])))
        except RuntimeError as e:  # a shape the network cannot take: torch's reason, on one line
            raise ConfigError(f"integer mode: the model cannot run inputs of shape {tuple(x.shape)}: "
                              f"{str(e).strip().splitlines()[0]}") from None
    logits = ist.cache[1].run(x.detach().float().cpu().numpy())
    return torch.from_numpy(logits).to(x.device)


# ---------------------------------------------------------------------------------------------
# the integer graph of the model's current state
# ---------------------------------------------------------------------------------------------
def is_integer(model: nn.Module) -> bool:
    """Whether ``model`` is quantized in integer mode (``plan.integer: true``)."""
    return getattr(getattr(model, "_lowbit_state", None), "integer", None) is not None


def int_graph(model: nn.Module, example: torch.Tensor):
    """The :class:`~lowbit.export.intgraph.IntGraph` an integer-mode model computes in eval mode
    (shapes from one example input; quantizers and weights as they are now)."""
    from .export.fold import bn_affine
    from .export.graph import _ShapeRecorder, _weight
    from .export.intgraph import IntGraph, IntOp, check_accumulator, conv_constants, tensor_q
    from .export.levels import act_quant, integer_form
    from .export.requant import quantize_multiplier

    if not is_integer(model):
        raise ConfigError("int_graph: the model is not quantized with plan.integer: true")
    state = model._lowbit_state
    ist = state.integer
    was = model.training
    model.eval()
    try:
        rec = _ShapeRecorder(ist.gm)
        with torch.no_grad():
            rec.run(example[:1].float())
        shapes = rec.shapes
        mods = dict(model.named_modules(remove_duplicate=False))  # a shared quantizer under every reader's name
        tq = {}
        acts = {}
        for root, path in ist.quantizer.items():
            a = act_quant(mods[path], path)
            if a is None:
                raise ConfigError(f"integer mode: tensor quantizer '{path}' is full precision")
            acts[root], tq[root] = a, tensor_q(a, path)
        tensors = {t: tq[r] for t, r in ist.group.items()}
        in_name = ist.input.name
        if acts[in_name].rule not in ("clip_div", "mul_clip"):
            raise ConfigError("integer mode: the input quantizer must follow clip_div or mul_clip")
        ops = [IntOp("quant_in", "input", [in_name], in_name, tuple(shapes[in_name]), tuple(shapes[in_name]),
                     act=acts[in_name])]
        for u in ist.units:
            i_shape, o_shape = tuple(shapes[u.inp.name]), tuple(shapes[u.node.name])
            if u.kind == "flatten":
                ops.append(IntOp("flatten", u.name, [u.inp.name], u.node.name, i_shape, o_shape))
            elif u.kind == "maxpool":
                m = u.module
                pair = lambda v: [int(v), int(v)] if isinstance(v, int) else [int(v[0]), int(v[1])]  # noqa: E731
                ops.append(IntOp("maxpool", u.name, [u.inp.name], u.node.name, i_shape, o_shape, attrs={
                    "kernel": pair(m.kernel_size), "stride": pair(m.stride if m.stride is not None else m.kernel_size),
                    "padding": pair(m.padding)}))
            elif u.kind == "gap":
                ti, to = tensors[u.inp.name], tensors[u.node.name]
                hw = int(np.prod(i_shape[1:]))
                # at most 24 - ceil(log2 hw) significant bits: mult·hw is a float32 too, so onnxruntime's
                # QLinearGlobalAveragePool (scale x_s/(y_s·hw) in float32) gets this multiplier exactly
                mult, shift = quantize_multiplier(np.array([ti.scale / (hw * to.scale)]),
                                                  bits=max(1, 24 - int(np.ceil(np.log2(hw)))))
                ops.append(IntOp("gap", u.name, [u.inp.name], u.node.name, i_shape, o_shape, mult=mult, shift=shift))
            else:
                inp = u.inp.name
                if inp in ist.narrow:  # a wide tensor, read at the conv's own input bits
                    path, inp = ist.narrow[inp], f"{inp}__narrow"
                    if inp not in tensors:
                        tensors[inp] = tensor_q(act_quant(mods[path], path), path)
                        ops.append(_requant_op(path.rsplit(".", 1)[0] + ".input_requant", u.inp.name, inp, i_shape,
                                               tensors, conv_constants, IntOp))
                ops.append(_conv_op(u, i_shape, o_shape, tensors, bn_affine, _weight, integer_form,
                                    conv_constants, check_accumulator, IntOp, state.plan.integer_residual, inp,
                                    state.plan.integer_bias == "fine"))
        calls: dict[str, int] = {}
        for op in ops:  # a module the forward calls again (shared weights): one op per call, each named apart, as
            calls[op.name] = k = calls.get(op.name, 0) + 1  # graph.lower does (every backend keys an op's data by name)
            if k > 1:
                op.name = f"{op.name}.call{k}"
        return IntGraph(ops, tensors, in_name, ist.output.name, tuple(shapes[in_name]),
                        tuple(shapes[ist.output.name]))
    finally:
        model.train(was)


def code_agreement(model: nn.Module, x: torch.Tensor, graph=None) -> dict[str, tuple[int, float, int]]:
    """How closely the integer network computes the fake-quantized float graph it trained (eval:
    BatchNorm on running statistics) on the inputs ``x``: per code tensor, in graph order,
    ``(bits, fraction of codes that differ, largest difference in codes)`` between the float graph's
    quantizer output (``rint(v/scale) + zero``) and the integer network's codes (``graph``: the
    model's :func:`int_graph` by default). A tensor stored wider than a conv reads it appears once,
    at its stored bits."""
    from .export.intgraph import IntReference

    ist = model._lowbit_state.integer
    g = graph if graph is not None else int_graph(model, x[:1])
    got: dict[str, torch.Tensor] = {}
    # each tensor's own quantizer call, node by node: a quantizer module can quantize several tensors (a conv the
    # forward calls twice reads two through its input quantizer), and a hook on the module saw only its last call
    calls = {n: n.args[0].name for n in ist.gm.graph.nodes if n.op == "call_module" and n.args
             and isinstance(n.args[0], fx.Node) and ist.quantizer.get(n.args[0].name) == n.target}

    class _Record(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in calls:
                got[calls[n]] = out.detach()
            return out

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            _Record(ist.gm).run(x)
    finally:
        model.train(was)
    env = IntReference(g).tensors(x.detach().cpu().numpy())
    out = {}
    for op in g.ops:
        root = ist.group.get(op.output, op.output)
        if root not in got or op.output not in g.tensors:
            continue
        t = g.tensors[op.output]
        qf = np.rint(got[root].cpu().numpy().astype(np.float64) / t.scale + t.zero)
        qi = env[op.output].astype(np.float64)
        if qf.shape != qi.shape:
            continue
        d = np.abs(qf - qi)
        out[op.output] = (int(t.bits), float((d > 0).mean()), int(d.max(initial=0)))
    return out


def _symmetric_form(levels: np.ndarray):
    """``(m, s)`` with ``level = s·m``, integers ``m`` (:func:`lowbit.export.levels.integer_form`), or
    for a symmetric grid whose float32 levels miss that test by rounding (8-bit SAWB: ``lo + j·step``
    with ``lo = −hi``), the odd integers ``2j − (n − 1)`` and ``s = step/2``; None when neither fits."""
    from .export.levels import integer_form

    form = integer_form(levels)
    if form is not None and not np.any(form[2] != 0):
        return form[0], form[1]
    lv = np.asarray(levels, dtype=np.float64)
    lo, hi = lv[:, 0], lv[:, -1]
    n = lv.shape[1]
    step = (hi - lo) / (n - 1)
    j = np.arange(n)
    grid = lo[:, None] + j * step[:, None]
    # hi = 0: a row whose levels are all 0 (per-channel steps of an all-zero weight row): step 0, a dead row
    if np.all(hi >= 0) and np.all(np.abs(lo + hi) <= 1e-5 * hi) and np.all(np.abs(grid - lv) <= 1e-5 * hi[:, None]):
        return np.tile(2 * j - (n - 1), (lv.shape[0], 1)).astype(np.int64), step / 2
    return None


def _requant_op(name: str, src: str, dst: str, shape, tensors, conv_constants, IntOp):
    """``dst``'s codes from ``src``'s (the same real tensor on a narrower grid): a depthwise 1x1
    conv with unit weights, so that every backend's conv kernel computes it:
    ``clamp(requantize(q − zero_src, mult, shift) + zero_dst, 0, qmax_dst)`` with
    ``mult·2^−shift ≈ scale_src / scale_dst``."""
    c = int(shape[0])
    k = conv_constants(np.full(c, tensors[src].scale), np.zeros(c), tensors[dst].scale, None, dst)
    return IntOp("conv", name, [src], dst, tuple(shape), tuple(shape),
                 attrs={"layer": "conv", "kernel": [1, 1], "stride": [1, 1], "padding": [0, 0], "groups": c,
                        "relu": False, "role": "requant"},
                 codes=np.zeros((c, 1, 1, 1), np.uint8), wbits=1, wquant="unit", lut=np.array([[1, 1]], np.int16), **k)


def _conv_op(u: Unit, i_shape, o_shape, tensors, bn_affine, _weight, integer_form, conv_constants,
             check_accumulator, IntOp, residual: str = "accumulator", inp: str | None = None,
             fine_bias: bool = False):
    m = u.module
    if isinstance(m, nn.Conv2d):  # dilation, padding modes: refused by analyse
        from .export.graph import _explicit_padding as explicit_padding

        pair = lambda v: [int(v), int(v)] if isinstance(v, int) else [int(v[0]), int(v[1])]  # noqa: E731
        attrs = {"layer": "conv", "kernel": list(m.kernel_size), "stride": pair(m.stride),
                 "padding": list(explicit_padding(m)), "groups": int(m.groups)}
    else:
        attrs = {"layer": "linear", "kernel": [1, 1], "stride": [1, 1], "padding": [0, 0], "groups": 1}
    attrs["relu"] = bool(u.relu)
    w, quantized = _weight(u.name, m)
    if not quantized:
        raise ConfigError(f"integer mode: layer '{u.name}' has a full-precision weight")
    form = _symmetric_form(w.levels.levels64())
    if form is None:
        raise ConfigError(f"integer mode: layer '{u.name}': weight quantizer '{w.quantizer}' has no symmetric integer "
                          "form (level = s·m); use sawb, lsq, dorefa, bwn, twn or po2")
    m_lut, s_w = form
    if np.abs(m_lut).max() > 32767:
        raise ConfigError(f"integer mode: layer '{u.name}': integer weights do not fit int16")
    sw = s_w[w.row_index()]
    o = w.codes.shape[0]
    if u.bn is not None:
        g, h = bn_affine(u.bn)
    else:
        g, h = np.ones(o), np.zeros(o)
    if m.bias is not None:
        h = h + g * m.bias.detach().double().cpu().numpy()
    inp = inp or u.inp.name
    t_in = tensors[inp]
    t_out = tensors.get(u.node.name)
    t_res = tensors[u.res.name] if u.res is not None else None
    eff = g * sw * t_in.scale
    # a row whose integer weights are all 0 has an accumulator that is 0 for every input: its output
    # is the constant BatchNorm shift h alone. Its accumulator unit may be anything, so it is set to
    # the output step (or |h|·2^-20 for a float output): then the bias rint(h/unit) keeps h to half
    # an output code, where the row's own unit (e.g. a huge learned LSQ step) could round it to 0
    dead = ~w.dequantize().reshape(o, -1).any(1)  # level = s_w·m with s_w > 0: a 0 level is m = 0
    latent = getattr(getattr(getattr(m, "parametrizations", None), "weight", None), "original", None)
    if latent is not None:  # an all-zero latent row (a pruned filter) is dead whatever levels its step gives it
        zero_rows = ~latent.detach().reshape(o, -1).any(1).cpu().numpy()
    else:
        zero_rows = np.zeros(o, dtype=bool)
    s_mid = None
    if t_res is not None and t_out is not None and residual == "output":
        from .export.intgraph import residual_output_constants

        mr = getattr(m, "mid_round", None)
        r = residual_output_constants(t_out, bool(u.relu), t_res, u.name, None if mr is None else mr.observed())
        s_mid = r["s_mid"]
    # a row whose latent weights are all 0, or whose weights cannot move its output by 2^-12 of a code (for the
    # logits: of the layer's largest possible output), is dead too, with its integer weights set to 0: an all-zero
    # weight row under per-channel steps gets a step near 0 (SAWB's floor) and nonzero integers, whose bias
    # rint(h/unit) would overflow int32
    step_out = s_mid if s_mid is not None else None if t_out is None else t_out.scale
    reach = np.abs(eff) * np.abs(m_lut[w.row_index()[:, None], w.codes.reshape(o, -1).astype(np.int64)]).sum(1) * \
        max(t_in.zero, t_in.qmax - t_in.zero)
    negligible = ~dead & (zero_rows | (reach < (2.0**-12 * step_out if step_out is not None
                                               else 2.0**-12 * float(np.max(np.abs(h) + reach, initial=0)))))
    if negligible.any():
        m_lut = m_lut[w.row_index()].copy()  # one row per channel, the negligible ones all 0
        m_lut[negligible] = 0
        dead = dead | negligible
    if fine_bias:  # weights m·2^k, unit eff/2^k: the bias keeps h to a fraction of an output code
        from .export.intgraph import weight_prescale

        live = eff[~dead] if (~dead).any() else eff
        step = s_mid if s_mid is not None else None if t_out is None else t_out.scale
        k = weight_prescale(m_lut, live, step, int(w.codes[0].size), max(t_in.zero, t_in.qmax - t_in.zero),
                            t_in.qmax)
        m_lut, eff = m_lut * 2**k, eff / 2**k
    if dead.any():
        unit = (s_mid if s_mid is not None else t_out.scale if t_out is not None
                else np.maximum(np.abs(h), 1e-30) * 2.0**-20)
        eff = np.where(dead, unit, eff)
    factors = {"weight step": sw, "input step": t_in.scale, "BatchNorm scale": g}  # eff's, for conv_constants' errors
    if s_mid is not None:
        c = conv_constants(eff, h, s_mid, None, u.name, factors)
        c["res_mult"], c["res_shift"] = np.full(o, r["res_mult"], np.int32), np.full(o, r["res_shift"], np.int32)
        attrs.update(r["attrs"])
    else:
        c = conv_constants(eff, h, None if t_out is None else t_out.scale, None if t_res is None else t_res.scale,
                           u.name, factors)
    inputs = [inp] + ([u.res.name] if u.res is not None else [])
    if len(m_lut) > 1 and (m_lut == m_lut[:1]).all():  # per-channel steps with one integer grid (8-bit LSQ): one row
        m_lut = m_lut[:1]
    op = IntOp("conv", u.name, inputs, u.node.name, i_shape, o_shape, attrs=attrs, codes=w.codes, wbits=w.bits,
               wquant=w.quantizer, lut=m_lut.astype(np.int16), **c)
    check_accumulator(op, t_in, t_res)
    return op
