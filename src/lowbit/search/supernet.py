"""A channel super-network over a zoo model (TAS, Dong & Yang 2019; NCE, seed 004).

The zoo model is built once at the largest allowed width of every layer (the *cap*), through the
ordinary per-layer widths mechanism (``create_model(channels=...)``, :mod:`lowbit.models.channels`),
so ``lowbit.quantize`` applies the plan to it unchanged. Every conv is computed at the cap width; a
candidate width ``c`` of a layer is the first ``c`` output channels. A forward hook multiplies the
layer's output (after its BatchNorm; in a residual block conv2's and the projection shortcut's BatchNorm,
before the add) by a channel mask:

* one candidate: ``mask[j] = 1[j < c]``: the network then computes exactly what a network built
  with those widths and the sliced weights computes (tests/test_nce.py checks it);
* a mixture (TAS's two sampled candidates weighted by their renormalised Gumbel-softmax
  probabilities, or any probability vector): ``mask = sum_k w_k 1[j < c_k]``, which equals the
  ``w``-weighted sum of the masked outputs (zero-padded slices), so the task loss is
  differentiable in the architecture logits.

Layers whose widths must agree across a residual add (a block with an identity shortcut: its
conv2 and whatever produced its input) form one **group** with one set of logits. Candidate widths
per group: ``int(base * r)`` for ``r`` in ``ratios`` (0.3..1.0 by default), then the expansion
candidates ``int(base * r)`` for ``r`` in ``expand`` (above 1.0, up to the cap); a group starts
with the first set active, and NCE's expansion rule appends the next expansion candidate.

:meth:`SuperNet.cost` gives params, MACs ("FLOPs" in 004's tables count multiply-accumulates) and
seed 002's memory of the network at any (expected) widths, differentiable in the widths, counted by
the rules of :func:`lowbit.cost.profile` so that for one-hot choices it is exactly the cost model's
number for the derived network (tested).

Supported: the ResNets of the zoo (BasicBlocks) and plain chains of convs/linears (``vgg_small``,
``lenet5``). Other models are a one-line ConfigError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from ..cost import FP_BITS, MIN_ACT_BITS, LayerBits, _walk, profile
from ..errors import ConfigError
from ..models import create_model, model_channels
from ..models.resnet import BasicBlock, ResNet

#: default candidate fractions of the original width (TAS: 0.3 .. 1.0)
RATIOS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
#: default expansion fractions (above 1.0), appended one at a time by NCE's rule, up to ``cap``
EXPAND_STEP = 0.1


def candidate_widths(base: int, ratios, expand) -> tuple[list[int], list[int]]:
    """(initial widths, expansion widths), ascending and distinct, each >= 1."""
    first = sorted({max(1, int(base * r)) for r in ratios})
    more = sorted({max(1, int(round(base * r))) for r in expand} - set(first))
    more = [w for w in more if w > first[-1]]
    return first, more


@dataclass
class Group:
    """Free layers sharing one output width (a residual chain), with its candidate widths."""

    layers: list[str]
    base: int  # the original width
    widths: list[int]  # every candidate, ascending: initial ones then expansion ones
    active: int  # how many of ``widths`` are in the search space now

    @property
    def name(self) -> str:
        return self.layers[0]

    @property
    def cap(self) -> int:
        return self.widths[-1]


@dataclass
class _Layer:
    """One conv/linear of the network, for the cost formula."""

    name: str
    kprod: int  # prod(kernel) (1 for a linear)
    in_group: int | None
    in_fixed: int  # in channels when in_group is None
    in_factor: int  # in features per input channel (a flatten before a linear), else 1
    out_group: int | None
    out_fixed: int
    out_spatial: int  # output elements per channel, per sample
    bias: bool
    w_bits: int  # 32 for a full-precision layer


@dataclass
class Structure:
    """Groups, per-layer in/out groups and mask points of a zoo model (from its build at the cap)."""

    groups: list[Group]
    layers: list[_Layer] = field(default_factory=list)
    bn_groups: list[int | None] = field(default_factory=list)  # group of each BatchNorm (2C params)
    bn_fixed: list[int] = field(default_factory=list)
    mask_points: dict[str, int] = field(default_factory=dict)  # module name -> group
    input_elems: int = 0
    act_bits: int = FP_BITS
    weight_bits: int = FP_BITS  # b_p of 002's uniform formula: the quantized layers' weight bits (max)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def _walk_resnet(model: ResNet) -> tuple[dict, list[tuple[str, str]], dict[str, str]]:
    """io: layer -> (producer of its input | None, producer whose width is its output | None);
    unions (identity shortcuts); mask points: module -> producer layer."""
    io: dict[str, tuple[str | None, str | None]] = {"conv1": (None, "conv1")}
    unions: list[tuple[str, str]] = []
    masks = {"bn1": "conv1"}
    prod = "conv1"
    for s, stage in enumerate(model.layers):
        for b, block in enumerate(stage):
            if not isinstance(block, BasicBlock):
                raise ConfigError(f"NCE: ResNet block layers.{s}.{b} is a {type(block).__name__}, not a BasicBlock")
            p = f"layers.{s}.{b}"
            io[f"{p}.conv1"] = (prod, f"{p}.conv1")
            io[f"{p}.conv2"] = (f"{p}.conv1", f"{p}.conv2")
            masks[f"{p}.bn1"] = f"{p}.conv1"
            # conv2's branch before the add (TAS mixes conv_b there): a mask after the add scaled the identity
            # shortcut, already masked upstream, once more per block (w^(B+1) over B blocks of a mixture)
            masks[f"{p}.bn2"] = f"{p}.conv2"
            if isinstance(block.shortcut, nn.Identity):
                unions.append((f"{p}.conv2", prod))
            else:
                io[f"{p}.shortcut.0"] = (prod, f"{p}.conv2")
                masks[f"{p}.shortcut.1"] = f"{p}.conv2"  # the projection's output (its BatchNorm)
            prod = f"{p}.conv2"
    io["fc"] = (prod, None)
    return io, unions, masks


def _walk_chain(model: nn.Module) -> tuple[dict, list, dict[str, str]]:
    """A plain chain: each conv/linear reads the previous one's output (vgg_small, lenet5)."""
    free = list(model.channel_layers)
    modules = list(model.named_modules())
    io: dict[str, tuple[str | None, str | None]] = {}
    masks: dict[str, str] = {}
    prev = None
    for i, (name, m) in enumerate(modules):
        if not isinstance(m, (_ConvNd, nn.Linear)):
            continue
        if isinstance(m, _ConvNd) and m.groups != 1:
            raise ConfigError(f"NCE: layer {name} is a grouped/depthwise conv; supported are plain chains and ResNets")
        if name in free:
            io[name] = (prev, name)
            nxt = modules[i + 1] if i + 1 < len(modules) else None
            bn = nxt is not None and isinstance(nxt[1], nn.modules.batchnorm._BatchNorm)
            masks[nxt[0] if bn else name] = name
            prev = name
        else:
            io[name] = (prev, None)
    return io, [], masks


def build_structure(model: nn.Module, base: dict[str, int], ratios, expand, example: Tensor,
                    bits: dict[str, LayerBits], groups_only: bool = False) -> Structure:
    """Groups and the cost table of ``model`` (built at the cap), ``base``: the original widths
    (``groups_only``: just the groups, for a model not built at the cap)."""
    if isinstance(model, ResNet):
        io, unions, masks = _walk_resnet(model)
    elif type(model).__name__ in ("VGGSmall", "LeNet5"):
        io, unions, masks = _walk_chain(model)
    else:
        raise ConfigError(f"NCE supports the ResNets, vgg_small and lenet5 of the zoo, got {type(model).__name__}")
    uf = _UnionFind()
    free = [n for n in model.channel_layers]
    for n in free:
        uf.find(n)
    for a, b in unions:
        uf.union(a, b)
    roots: dict[str, int] = {}
    groups: list[Group] = []
    for n in free:  # groups in registration order of their first layer
        r = uf.find(n)
        if r not in roots:
            roots[r] = len(groups)
            groups.append(Group([], base[n], [], 0))
        groups[roots[r]].layers.append(n)
    for g in groups:
        bases = {base[n] for n in g.layers}
        if len(bases) != 1:
            raise ConfigError(f"NCE: layers {', '.join(g.layers)} share a residual add but have widths {sorted(bases)}")
        first, more = candidate_widths(g.base, ratios, expand)
        g.widths, g.active = first + more, len(first)
    gid = {n: roots[uf.find(n)] for n in free}
    st = Structure(groups)
    if groups_only:
        return st
    cost = profile(model, example, bits)
    by_name = {lc.name: lc for lc in cost.layers}
    mods = dict(model.named_modules())
    for name, (src, dst) in io.items():
        m = mods[name]
        lc = by_name[name]
        c_out, c_in = lc.weight_shape[0], lc.weight_shape[1]
        in_group = gid[src] if src is not None else None
        in_factor = 1
        if in_group is not None:
            cap_in = groups[in_group].cap
            if c_in % cap_in:
                raise ConfigError(f"NCE: layer {name} has {c_in} inputs, not a multiple of its input width {cap_in}")
            in_factor = c_in // cap_in
        lb = bits.get(name)
        st.layers.append(_Layer(
            name=name, kprod=math.prod(lc.weight_shape[2:]), in_group=in_group, in_fixed=c_in, in_factor=in_factor,
            out_group=gid[dst] if dst is not None else None, out_fixed=c_out,
            out_spatial=lc.out_elems // c_out, bias=getattr(m, "bias", None) is not None,
            w_bits=lb.w_bits if lb is not None else FP_BITS))
    last = None  # a BatchNorm normalises the output of the conv/linear registered before it
    for name, m, _ in _walk(model):  # the modules the cost model counts (no quantizers)
        if name in io:
            last = io[name][1]
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            st.bn_groups.append(gid[last] if last is not None else None)
            st.bn_fixed.append(m.num_features)
        elif isinstance(m, (_ConvNd, nn.Linear)) or any(True for _ in m.parameters(recurse=False)):
            raise ConfigError(f"NCE: module {name} ({type(m).__name__}) has parameters the cost formula does not know")
    st.mask_points = {mod: gid[layer] for mod, layer in masks.items()}
    st.input_elems = example[0].numel()
    st.act_bits = cost.act_bits
    st.weight_bits = max((lb.w_bits for lb in bits.values() if lb.w_bits < FP_BITS), default=FP_BITS)
    return st


def structure_cost(st: Structure, widths: list[Tensor | float]) -> dict[str, Tensor]:
    """params, macs, mem_bits (002) of the network whose group ``g`` has width ``widths[g]``
    (a number or a differentiable expected width), by :func:`lowbit.cost.profile`'s rules."""
    def w(group: int | None, fixed: int) -> Tensor | float:
        return float(fixed) if group is None else widths[group]

    dev = next((x.device for x in widths if isinstance(x, Tensor)), torch.device("cpu"))
    # float64: float32 sums are not exact above 2^24 (MACs, Mem bits of larger networks)
    widths = [x.double() if isinstance(x, Tensor) else float(x) for x in widths]
    params = torch.zeros((), device=dev, dtype=torch.float64)
    macs = torch.zeros((), device=dev, dtype=torch.float64)
    param_bits = torch.zeros((), device=dev, dtype=torch.float64)
    acts = [torch.tensor(float(st.input_elems), device=dev, dtype=torch.float64)]
    for ly in st.layers:
        c_in = w(ly.in_group, ly.in_fixed) * ly.in_factor
        c_out = w(ly.out_group, ly.out_fixed)
        wn = c_out * c_in * ly.kprod
        bn = c_out if ly.bias else 0.0
        params = params + wn + bn
        macs = macs + ly.out_spatial * wn
        param_bits = param_bits + wn * ly.w_bits + bn * FP_BITS
        acts.append(torch.as_tensor(c_out * ly.out_spatial, dtype=torch.float64, device=dev))
    for g, fixed in zip(st.bn_groups, st.bn_fixed):
        n = 2 * w(g, fixed)
        params = params + n
        param_bits = param_bits + n * FP_BITS
    n_a = torch.stack([a.reshape(()) for a in acts]).max()
    mem = param_bits + n_a * max(st.act_bits, MIN_ACT_BITS)
    # `lowbit budget`'s accounting (search/budget.py): every parameter at b_p, Mem = N_p·b_p + N_a·max(b_p, 4)
    mem_uniform = params * st.weight_bits + n_a * max(st.weight_bits, MIN_ACT_BITS)
    return {"params": params, "macs": macs, "mem_bits": mem, "mem_uniform": mem_uniform, "max_act": n_a}


class SuperNet:
    """The zoo model at the cap widths (``self.net``, an ordinary ``nn.Module`` to quantize and
    fit) plus the architecture logits (``self.logits``, one vector per group; only the first
    ``group.active`` entries are in the search space) and the masks its forward hooks apply."""

    def __init__(self, model_name: str, in_channels: int, num_classes: int, image_size,
                 ratios=RATIOS, cap: float = 2.0, expand_step: float = EXPAND_STEP,
                 model_options: dict | None = None) -> None:
        opts = dict(model_options or {})
        if "channels" in opts:
            raise ConfigError("NCE searches model.channels itself; remove model.channels from the config")
        if not ratios or any(not 0 < r <= 1 for r in ratios):
            raise ConfigError(f"NCE: ratios must be fractions in (0, 1], got {list(ratios)!r}")
        if cap < 1:
            raise ConfigError(f"NCE: cap must be >= 1 (the largest width as a multiple of the original), got {cap}")
        self.model_name, self.options = model_name, opts
        self.shape = (in_channels, num_classes, image_size)
        ref = create_model(model_name, in_channels=in_channels, num_classes=num_classes, image_size=image_size, **opts)
        if not hasattr(ref, "channel_layers"):
            raise ConfigError(f"NCE: model {model_name!r} has no per-layer widths (channel_layers); NCE supports the "
                              "ResNets, vgg_small and lenet5 of the zoo (docs/nce.md)")
        built = model_channels(ref)
        self.base = {n: built[n] for n in ref.channel_layers}  # the original widths
        steps = int(math.floor((cap - 1.0) / expand_step + 1e-9))
        expand = [1.0 + expand_step * (i + 1) for i in range(steps)]
        self.ratios, self.expand, self.cap = tuple(ratios), expand, cap
        # provisional groups (to know the caps), then the network at the caps
        probe = build_structure(ref, self.base, ratios, expand, self.example(), {}, groups_only=True)
        caps = {n: g.cap for g in probe.groups for n in g.layers}
        self.net = create_model(model_name, in_channels=in_channels, num_classes=num_classes,
                                image_size=image_size, channels=caps, **opts)
        self.structure = build_structure(self.net, self.base, ratios, expand, self.example(), {})
        self.groups = self.structure.groups
        self.logits = nn.ParameterList([nn.Parameter(torch.zeros(len(g.widths))) for g in self.groups])
        for g, lg in zip(self.groups, self.logits):
            with torch.no_grad():
                lg[g.active:] = 0.0
        self._cands = [torch.stack([(torch.arange(g.cap) < c).float() for c in g.widths]) for g in self.groups]
        self._mask: list[Tensor] | None = None  # current per-group masks; None: argmax widths
        mods = dict(self.net.named_modules())
        self._hooks = [mods[name].register_forward_hook(self._hook(gi))
                       for name, gi in self.structure.mask_points.items()]

    def example(self) -> Tensor:
        c, _, size = self.shape
        h, w = (size, size) if isinstance(size, int) else size
        return torch.zeros(1, c, h, w)

    def set_bits_table(self, bits: dict[str, LayerBits]) -> None:
        """Count the cost at these per-layer bits (``lowbit.quantize.layer_bits`` of the quantized net).
        No forward pass: a first call would initialise data-dependent quantizers (LSQ's step)."""
        st = self.structure
        for ly in st.layers:
            lb = bits.get(ly.name)
            ly.w_bits = lb.w_bits if lb is not None else FP_BITS
        st.act_bits = max((lb.a_bits for lb in bits.values()), default=FP_BITS)
        # b_p: the quantized layers' weight bits (a layer with FP weights and a quantized input is not one)
        st.weight_bits = max((lb.w_bits for lb in bits.values() if lb.w_bits < FP_BITS), default=FP_BITS)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    # -- masks ----------------------------------------------------------------------------------
    def _hook(self, gi: int):
        def hook(module, args, out):
            if isinstance(out, torch.fx.Proxy):  # torch.fx tracing (quantize finds the first and last layers):
                return out  # the mask scales channels and changes no structure (it made the trace fail: a warning)
            mask = self._mask[gi] if self._mask is not None else self._argmax_mask(gi)
            mask = mask.to(out.device)
            return out * (mask.view(1, -1, *([1] * (out.dim() - 2))))
        return hook

    def _argmax_mask(self, gi: int) -> Tensor:
        return self._cands[gi][self.choice()[gi]]

    def probs(self, gi: int) -> Tensor:
        """Softmax over the active candidates of group ``gi``."""
        return torch.softmax(self.logits[gi][: self.groups[gi].active], 0)

    def choice(self) -> list[int]:
        """Argmax candidate index per group (ties: the first)."""
        return [int(self.logits[gi][: g.active].argmax()) for gi, g in enumerate(self.groups)]

    def widths_of(self, choice: list[int]) -> list[int]:
        return [g.widths[k] for g, k in zip(self.groups, choice)]

    def set_widths(self, widths: list[int] | None) -> None:
        """One width per group (a candidate's hard mask), or None for the argmax widths."""
        if widths is None:
            self._mask = None
            return
        self._mask = [(torch.arange(g.cap) < w).float() for g, w in zip(self.groups, widths)]

    def set_mix(self, weights: list[Tensor]) -> None:
        """Per group, a weight per active candidate (differentiable): mask = sum_k w_k 1[j < c_k]."""
        self._mask = [w @ self._cands[gi][: len(w)].to(w.device) for gi, w in enumerate(weights)]

    def sample_uniform(self, gen: torch.Generator | None = None) -> list[int]:
        """Algorithm 1 line 2 (warm-up): a candidate per group, uniformly among the active ones."""
        return [int(torch.randint(g.active, (1,), generator=gen)) for g in self.groups]

    def sample_gumbel(self, tau: float, num: int = 2) -> list[Tensor]:
        """TAS's select2withP: Gumbel-softmax logits at temperature ``tau``, ``num`` candidates drawn
        (without replacement) from their probabilities, weighted by the softmax of their perturbed
        logits. Returns per group a weight vector over the active candidates (zeros elsewhere),
        differentiable in the logits."""
        out = []
        for gi, g in enumerate(self.groups):
            lg = self.logits[gi][: g.active]
            while True:
                gumbel = -torch.empty_like(lg).exponential_().log()
                new = (lg.log_softmax(0) + gumbel) / tau
                p = torch.softmax(new, 0)
                if torch.isfinite(gumbel).all() and torch.isfinite(p).all():
                    break
            k = min(num, g.active)
            with torch.no_grad():
                idx = torch.multinomial(p.detach() + 1e-7, k, replacement=False)
            wsel = torch.softmax(new[idx], 0)
            out.append(torch.zeros(g.active, device=lg.device).index_put((idx,), wsel))
        return out

    # -- cost -------------------------------------------------------------------------------------
    def expected_widths(self) -> list[Tensor]:
        """E[c_g] = sum_k softmax(logits)_k c_k over the active candidates (differentiable)."""
        return [self.probs(gi) @ torch.tensor(g.widths[: g.active], dtype=torch.float32, device=self.logits[gi].device)
                for gi, g in enumerate(self.groups)]

    def cost(self, widths: list[Tensor | float] | None = None) -> dict[str, Tensor]:
        """Cost at ``widths`` (default: the expected widths, differentiable)."""
        if widths is None:
            widths = [w.cpu() for w in self.expected_widths()]
        return structure_cost(self.structure, widths)

    def channels(self, widths: list[int]) -> dict[str, int]:
        """``model.channels`` of the network with these group widths (every free layer listed, in the
        model's registration order)."""
        of = {n: int(w) for g, w in zip(self.groups, widths) for n in g.layers}
        return {n: of[n] for n in self.base}

    # -- NCE's expansion rule -------------------------------------------------------------------
    @torch.no_grad()
    def expand_step(self, threshold: float) -> list[tuple[int, int]]:
        """004 Algorithm 1 lines 10-16: for each group whose largest active candidate has
        probability >= ``threshold``, append the next wider candidate (if any, up to the cap) with
        the largest one's logit copied. Returns (group, new width) for each expansion."""
        done = []
        for gi, g in enumerate(self.groups):
            if g.active < len(g.widths) and float(self.probs(gi)[-1]) >= threshold:
                self.logits[gi][g.active] = self.logits[gi][g.active - 1]
                g.active += 1
                done.append((gi, g.widths[g.active - 1]))
        return done

    def state(self) -> dict:
        return {"logits": [lg.detach().cpu().clone() for lg in self.logits], "active": [g.active for g in self.groups]}

    def load_state(self, s: dict) -> None:
        with torch.no_grad():
            for lg, v in zip(self.logits, s["logits"]):
                lg.copy_(v)
        for g, a in zip(self.groups, s["active"]):
            g.active = a
