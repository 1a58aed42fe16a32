"""A model as the sequence of *units* it runs, and its split into locally trained blocks.

The zoo registers modules in execution order (``models/resnet.py`` says so for ``BasicBlock``), so
walking the module tree in registration order gives the forward pass of a feed-forward model:
Conv/Linear layers (with whatever ``quantize`` attached to them), elementwise modules (ReLU,
pooling, flatten, BN, identity, dropout) and residual blocks (a module with a ``shortcut``), each
one unit. NITI replays these units in integers; local-loss training cuts them into blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError

COMPUTE = (nn.Conv2d, nn.Linear)


def is_residual(m: nn.Module) -> bool:
    """A residual block of the zoo (``BasicBlock``: conv1, bn1, relu1, conv2, bn2, shortcut, relu2)."""
    return hasattr(m, "shortcut") and hasattr(m, "conv1") and hasattr(m, "conv2")


def units(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every unit in registration (= execution) order."""
    out = []
    for name, m in model.named_children():
        full = f"{prefix}{name}"
        if isinstance(m, COMPUTE) or is_residual(m) or not any(True for _ in m.children()):
            out.append((full, m))
        else:
            out.extend(units(m, full + "."))
    return out


#: what a forward may compute between its units: reshapes (their units replay modules only)
_SHAPE_OPS = ("flatten", "view", "reshape", "size", "contiguous", "squeeze", "unsqueeze")


def check_replayable(model: nn.Module, us: list[tuple[str, nn.Module]], who: str, replayed: bool = True) -> None:
    """That ``model``'s forward calls its units in registration order and, where they are ``replayed`` (NITI),
    computes nothing between them but reshapes (``torch.fx``). NITI replays the units and local loss cuts them
    into blocks: a forward that calls them in another order, or applies ``F.relu`` itself, trained another
    network than the model evaluates (a user audit, session 23: 49 % by the model's forward against 71 % by the
    replayed program). A model ``torch.fx`` cannot trace is not checked."""
    import torch
    from torch import fx

    leaves = {id(m) for _, m in us}

    class _Units(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return id(m) in leaves or super().is_leaf_module(m, qualname)

    try:
        graph = _Units().trace(model)
    except Exception:  # noqa: BLE001 - not traceable: unchecked, as before
        return
    called = [n.target for n in graph.nodes if n.op == "call_module"]
    want = [name for name, _ in us]
    if called != want:
        at = next((i for i, (a, b) in enumerate(zip(called, want)) if a != b), min(len(called), len(want)))
        got = called[at] if at < len(called) else "nothing"
        raise ConfigError(f"{who}: the model's forward calls '{got}' where its registration order has "
                          f"'{want[at] if at < len(want) else 'nothing'}'; {who} runs the layers in registration "
                          "order: register them in the order forward calls them")
    if not replayed:
        return
    shape = {getattr(torch, k, None) for k in _SHAPE_OPS} | set(_SHAPE_OPS)
    for n in graph.nodes:
        if n.op in ("call_function", "call_method") and n.target not in shape:
            what = getattr(n.target, "__name__", str(n.target))
            raise ConfigError(f"{who}: the model's forward computes '{what}' itself, outside its modules; {who} runs "
                              "the modules alone: make it a module (e.g. nn.ReLU(), nn.Flatten())")


def _global_pool(m: nn.Module) -> bool:
    return isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and m.output_size in (1, (1, 1))


_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def splits(m: nn.Module) -> bool:
    """Whether local loss trains the two convs of residual block ``m`` as two blocks, as the reference code does
    (anokland/local-loss ``BasicBlock``: ``conv1`` and ``conv2`` are each a ``LocalLossBlockConv``; the shortcut trains
    with ``conv2``). It needs the zoo's layout: children registered in execution order ``conv1 .. relu1, conv2 ..
    shortcut, relu2``, with ``relu2`` applied last to the sum (its output is the block's). Another residual module
    stays one block. (Registration order is what the zoo promises, not what ``forward`` is checked to do.)"""
    names = [n for n, _ in m.named_children()]
    return (is_residual(m) and {"relu1", "relu2"} <= set(names) and names[-2:] == ["shortcut", "relu2"]
            and names.index("conv1") < names.index("relu1") < names.index("conv2"))


@dataclass
class Block:
    """Units trained together by one local loss: a compute unit and the elementwise units after it (for a residual
    block of the zoo, its ``conv1 .. relu1`` and its ``conv2 .. relu2`` with the units after it are two blocks).
    ``out`` is the unit whose output the block's heads read (:attr:`_end`); ``width`` the channels/features of
    that output; ``residual`` the residual block whose second half this block is (it also reads the block's input,
    through the shortcut), else None."""

    index: int
    names: list[str]
    modules: list[nn.Module]
    residual: nn.Module | None = None
    before_pool: bool = True

    @property
    def _end(self) -> int:
        """The index of the unit whose output the block's heads read: the last one before the block's first pooling
        or flatten (as in the reference code, whose pooling layers come after its blocks, so a block's loss is
        computed before them: ResNet's before its global pool, VGG's before its max-pool; before session 30 the
        heads read the pooled output), else the last. A block whose compute unit is followed at once by a pooling
        reads the compute unit's output. Where a unit with parameters follows that pooling (conv -> pool -> BN, not in the
        zoo), the heads read as with ``before_pool=False``: read before the pool, the BN's output would reach only the
        next block's loss (session 31; a review found it). With ``before_pool=False`` (the ``local`` option ``heads_before_pool:
        false``, lowbit's rule before session 30): the last unit, or, where the block ends by flattening a map that
        is not globally pooled (LeNet-5's last conv block), the map (its channels are known before data, its flat
        width is not)."""
        if self.before_pool:
            for i, m in enumerate(self.modules[1:], 1):
                if isinstance(m, _POOLS + (nn.Flatten,)):
                    if any(True for k in self.modules[i:] for _ in k.parameters()):
                        break  # conv -> pool -> BN: read before the pool, the BN would train by the next block's loss
                    return i - 1
        i = len(self.modules) - 1
        while i > 0 and isinstance(self.modules[i], nn.Flatten) and not _global_pool(self.modules[i - 1]):
            i -= 1
        return i

    @property
    def out(self) -> nn.Module:
        return self.modules[self._end]

    @property
    def out_name(self) -> str:
        return self.names[self._end]

    @property
    def width(self) -> int:
        for m in reversed(self.modules[: self._end + 1]):
            m = m.conv2 if is_residual(m) else m
            if isinstance(m, nn.Conv2d):
                return m.out_channels
            if isinstance(m, nn.Linear):
                return m.out_features
        raise ConfigError(f"block {self.index} has no conv/linear layer")

    @property
    def spatial(self) -> bool:
        """Whether the heads read a (N, C, H, W) map (False after a linear or a flatten)."""
        for m in reversed(self.modules[: self._end + 1]):
            if isinstance(m, (nn.Flatten, nn.Linear)):
                return False
            if isinstance(m, nn.Conv2d) or is_residual(m):
                return True
        return True


def blocks(model: nn.Module, split_residual: bool = True,
           heads_before_pool: bool = True) -> tuple[list[Block], list[tuple[str, nn.Module]]]:
    """Split ``model`` into local-loss blocks: each compute unit (conv, linear, residual block) with the elementwise
    units that follow it; a residual block of the zoo (:func:`splits`) is two blocks, one per conv, unless
    ``split_residual`` is False. ``heads_before_pool``: see :attr:`Block._end`. The last compute
    unit and what follows it are the output layer (returned separately; it is trained by the task loss on the
    model's output)."""
    us = units(model)
    check_replayable(model, us, "local-loss training", replayed=False)  # it runs the model's own forward
    starts = [i for i, (_, m) in enumerate(us) if isinstance(m, COMPUTE) or is_residual(m)]
    if len(starts) < 2:
        raise ConfigError("local-loss training needs at least two conv/linear layers or residual blocks")
    if any(not isinstance(m, COMPUTE) and not is_residual(m) and any(p.requires_grad for p in m.parameters())
           for _, m in us[:starts[0]]):
        raise ConfigError("local-loss training: a trainable module comes before the first conv/linear layer")
    out: list[Block] = []
    for j, s in enumerate(starts[:-1]):
        part = us[s:starts[j + 1]] if j else us[:starts[j + 1]]  # units before the first conv (none in the zoo) go with block 0
        names, mods = [n for n, _ in part], [m for _, m in part]
        res = mods[0]
        if split_residual and (j or s == 0) and splits(res):
            kids = list(res.named_children())
            cut = [n for n, _ in kids].index("conv2")
            out.append(Block(len(out), [f"{names[0]}.{n}" for n, _ in kids[:cut]], [k for _, k in kids[:cut]],
                             before_pool=heads_before_pool))
            out.append(Block(len(out), [f"{names[0]}.{n}" for n, _ in kids[cut:]] + names[1:],
                             [k for _, k in kids[cut:]] + mods[1:], residual=res, before_pool=heads_before_pool))
        else:
            out.append(Block(len(out), names, mods, before_pool=heads_before_pool))
    return out, us[starts[-1]:]
