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


@dataclass
class Block:
    """Units trained together by one local loss: a compute unit and the elementwise units after it.
    ``out`` is the last unit (its output is the block's output); ``width`` the channels/features
    of that output."""

    index: int
    names: list[str]
    modules: list[nn.Module]

    @property
    def _end(self) -> int:
        """The index of the unit whose output the block's heads read: the last, or, where the block ends by
        flattening a map that is not globally pooled (LeNet-5's conv features for its classifier), the map: its
        channels are known, the flat width C·H·W is not before data (before session 23 the channels were taken as
        that width: a crash). A globally pooled map (ResNet's) is flat with its channels as width, as before."""
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
        """Whether the block's output is a (N, C, H, W) map (False after a flatten or a linear)."""
        for m in reversed(self.modules[: self._end + 1]):
            if isinstance(m, (nn.Flatten, nn.Linear)):
                return False
            if isinstance(m, nn.Conv2d) or is_residual(m):
                return True
        return True


def blocks(model: nn.Module) -> tuple[list[Block], list[tuple[str, nn.Module]]]:
    """Split ``model`` into local-loss blocks: each compute unit (conv, linear, residual block) with
    the elementwise units that follow it. The last compute unit and what follows it are the output
    layer (returned separately; it is trained by the task loss on the model's output)."""
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
        e = starts[j + 1]
        part = us[s:e] if j else us[:e]  # units before the first conv (none in the zoo) go with block 0
        out.append(Block(j, [n for n, _ in part], [m for _, m in part]))
    return out, us[starts[-1]:]
