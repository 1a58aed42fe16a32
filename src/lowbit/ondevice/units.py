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


@dataclass
class Block:
    """Units trained together by one local loss: a compute unit and the elementwise units after it.
    ``out`` is the last unit (its output is the block's output); ``width`` the channels/features
    of that output."""

    index: int
    names: list[str]
    modules: list[nn.Module]

    @property
    def out(self) -> nn.Module:
        return self.modules[-1]

    @property
    def out_name(self) -> str:
        return self.names[-1]

    @property
    def width(self) -> int:
        for m in reversed(self.modules):
            m = m.conv2 if is_residual(m) else m
            if isinstance(m, nn.Conv2d):
                return m.out_channels
            if isinstance(m, nn.Linear):
                return m.out_features
        raise ConfigError(f"block {self.index} has no conv/linear layer")

    @property
    def spatial(self) -> bool:
        """Whether the block's output is a (N, C, H, W) map (False after a flatten or a linear)."""
        for m in reversed(self.modules):
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
