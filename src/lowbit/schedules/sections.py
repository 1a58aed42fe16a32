"""Cutting a network into sections at block boundaries (DCQ).

**Blocks** are the model's top-level children in registration order, with every plain
``nn.Sequential`` among them expanded into its own children (recursively): for the zoo's ResNets
``conv1, bn1, relu, layers.0.0, ..., layers.2.0, pool, flatten, fc``; for VGG-small, LeNet-5 and
MobileNetV2 the layers of ``features`` (MobileNetV2: its inverted-residual blocks), then pool,
flatten and the classifier. A model qualifies when running its blocks one after the other computes
exactly its forward; :func:`blocks` checks this on a probe input (``torch.equal``), so a model whose
forward does something else (a skip around children, a functional op between them) is a one-line
error instead of a silently different network. The flatten/pool before a classifier are modules
of the zoo models, so they are blocks too.

**Sections** are runs of consecutive blocks. ``sections=N`` cuts only in front of blocks that
hold a conv/linear layer (BatchNorm, activation, pooling and flatten stay with the layer before
them) and picks the N-1 cuts that minimise the largest section's multiply-accumulates (balanced
sections take similar time in parallel); a list of names cuts in front of each named block (a
block name, or a module holding blocks such as ``layers.1``, meaning its first block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..plan import QUANTIZABLE


def _expandable(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def block_list(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every block of ``model`` in execution order (no check)."""
    out: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, m: nn.Module) -> None:
        for name, child in m.named_children():
            if _expandable(child):
                walk(f"{prefix}{name}.", child)
            else:
                out.append((f"{prefix}{name}", child))

    walk("", model)
    return out


@torch.no_grad()
def blocks(model: nn.Module, example: Tensor) -> list[tuple[str, nn.Module]]:
    """The blocks of ``model``, checked to compute its forward exactly on ``example`` (eval mode)."""
    bl = block_list(model)
    what = type(model).__name__
    if not bl:
        raise ConfigError(f"{what} has no child modules to cut into sections")
    was = model.training
    model.eval()
    try:
        want = model(example)
        got = example
        for _, m in bl:
            got = m(got)
    except Exception as e:  # a child that cannot be called on the previous one's output
        raise ConfigError(f"{what}: its children do not chain ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:100]}); DCQ needs a model whose forward runs its "
                          "children one after the other (an nn.Sequential-like model)") from None
    finally:
        model.train(was)
    if not isinstance(want, Tensor) or want.shape != got.shape or not torch.equal(want, got):
        raise ConfigError(f"{what}: running its children one after the other does not compute its forward; DCQ "
                          "needs a model whose forward runs its children in order (an nn.Sequential-like model)")
    return bl


@torch.no_grad()
def block_macs(bl: list[tuple[str, nn.Module]], example: Tensor) -> list[int]:
    """Multiply-accumulates per sample of each block on ``example`` (conv and linear layers)."""
    counts = [0] * len(bl)
    hooks = []

    def hook_for(i: int):
        def hook(m, args, out):  # weight.numel() MACs per output position (a conv's pixel, a linear's row)
            if isinstance(m, nn.modules.conv._ConvNd):
                counts[i] += m.weight.numel() * (out[0].numel() // out.shape[1])
            else:
                counts[i] += m.weight.numel() * (out[0].numel() // out.shape[-1])
        return hook

    for i, (_, m) in enumerate(bl):
        for sub in m.modules():
            if isinstance(sub, QUANTIZABLE):
                hooks.append(sub.register_forward_hook(hook_for(i)))
    was = [m.training for _, m in bl]
    try:
        x = example[:1]
        for _, m in bl:
            m.eval()
            x = m(x)
    finally:
        for h in hooks:
            h.remove()
        for (_, m), w in zip(bl, was):
            m.train(w)
    return counts


@dataclass
class Cut:
    """Where sections start: block indices (the first section starts at 0, not listed)."""

    starts: list[int]
    names: list[str]  # all block names

    @property
    def n(self) -> int:
        return len(self.starts) + 1

    def ranges(self) -> list[tuple[int, int]]:
        b = [0, *self.starts, len(self.names)]
        return [(b[i], b[i + 1]) for i in range(self.n)]

    def section_blocks(self, i: int) -> list[str]:
        a, b = self.ranges()[i]
        return self.names[a:b]

    def cut_names(self) -> list[str]:
        return [self.names[s] for s in self.starts]


def _has_weight(m: nn.Module) -> bool:
    return any(isinstance(s, QUANTIZABLE) for s in m.modules())


def plan_cut(bl: list[tuple[str, nn.Module]], sections: int | list[str], macs: list[int],
             where: str = "dcq.sections") -> Cut:
    """The cut for ``sections`` (module docstring)."""
    names = [n for n, _ in bl]
    if isinstance(sections, int) and not isinstance(sections, bool):
        weighted = [i for i, (_, m) in enumerate(bl) if _has_weight(m)]
        candidates = weighted[1:]  # cut in front of a weight block, never before the first one
        if sections < 1:
            raise ConfigError(f"{where}: must be >= 1, got {sections}")
        if sections - 1 > len(candidates):
            raise ConfigError(f"{where}: {sections} sections, but the model has {len(candidates) + 1} blocks with "
                              f"weights to cut between ({', '.join(names[i] for i in weighted)})")
        return Cut(_balanced(candidates, macs, sections), names)
    if not isinstance(sections, (list, tuple)) or not sections:
        raise ConfigError(f"{where}: a number of sections or a list of block names, got {sections!r}")
    starts = []
    for s in sections:
        if s in names:
            idx = names.index(s)
        else:
            idx = next((i for i, n in enumerate(names) if n.startswith(f"{s}.")), None)
        if idx is None:
            shown = ", ".join(names[:16]) + (", ..." if len(names) > 16 else "")
            raise ConfigError(f"{where}: '{s}' is not a block; blocks are: {shown}")
        if idx == 0:
            raise ConfigError(f"{where}: '{s}' is the first block; name the blocks where later sections start")
        starts.append(idx)
    if starts != sorted(set(starts)):
        raise ConfigError(f"{where}: names must be distinct and in execution order, got {list(sections)}")
    return Cut(starts, names)


def _balanced(candidates: list[int], macs: list[int], k: int) -> list[int]:
    """k-1 cut positions among ``candidates`` minimising the largest section's MACs (then the
    sum of squares, so that ties are balanced too); exact dynamic programme over the candidates."""
    if k == 1:
        return []
    n = len(macs)
    prefix = [0]
    for m in macs:
        prefix.append(prefix[-1] + m + 1)  # +1: a zero-MAC block still counts a little
    bounds = [0, *candidates, n]  # section boundaries may only be these
    cost = lambda a, b: prefix[bounds[b]] - prefix[bounds[a]]  # noqa: E731
    m = len(bounds)
    inf = (float("inf"), float("inf"))
    # best[j][c]: (max, sum of squares) for blocks [0, bounds[c]) in j sections; arg for the path
    best = [[inf] * m for _ in range(k + 1)]
    arg = [[-1] * m for _ in range(k + 1)]
    best[0][0] = (0, 0)
    for j in range(1, k + 1):
        for c in range(1, m):
            for a in range(c):
                if best[j - 1][a] == inf:
                    continue
                w = cost(a, c)
                cand = (max(best[j - 1][a][0], w), best[j - 1][a][1] + w * w)
                if cand < best[j][c]:
                    best[j][c], arg[j][c] = cand, a
    cuts, c = [], m - 1
    for j in range(k, 0, -1):
        c = arg[j][c]
        cuts.append(bounds[c])
    cuts = sorted(cuts)[1:]  # drop the leading 0
    return cuts


def section_modules(bl: list[tuple[str, nn.Module]], cut: Cut) -> list[nn.Sequential]:
    """One ``nn.Sequential`` per section sharing the model's modules (a view: training a section
    trains the model)."""
    mods = [m for _, m in bl]
    return [nn.Sequential(*mods[a:b]) for a, b in cut.ranges()]


def section_state(model: nn.Module, cut: Cut, i: int) -> dict[str, Tensor]:
    """The entries of ``model.state_dict()`` that belong to section ``i`` (the model's own keys)."""
    prefixes = tuple(f"{n}." for n in cut.section_blocks(i))
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(prefixes)}


def describe(cut: Cut, macs: list[int], params: list[int]) -> list[dict]:
    """Per section: its blocks, MACs and parameters (for sections.json and the summary)."""
    out = []
    total = max(sum(macs), 1)
    for i, (a, b) in enumerate(cut.ranges()):
        out.append({"section": i, "blocks": cut.names[a:b], "macs": sum(macs[a:b]),
                    "mac_share": sum(macs[a:b]) / total, "params": sum(params[a:b])})
    return out
