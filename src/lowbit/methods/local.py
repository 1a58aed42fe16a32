"""Local-loss block training (Nøkland & Eidnes, "Training Neural Networks with Local Error Signals",
ICML 2019; code anokland/local-loss), seed 002 part 3: blocks trained one by one, "QAT on the block
being trained".

The model is cut into blocks (:func:`lowbit.ondevice.units.blocks`: a conv/linear layer with the BN/ReLU/pooling
after it; each conv of a residual block of the zoo is a block, the shortcut training with the second, as in the
reference code's ``BasicBlock``); the last layer is the output layer, trained by the task loss scaled by (1 − β)
(:attr:`LocalLoss.output_scale`). Each block ``i`` gets two training-only heads, which read its output before any
pooling (the reference computes a block's loss before the network's pooling layers), and its own loss, *predsim*::

    loss_i = (1 - β)·CE(pred_i(h_i), y) + β·MSE(R(sim_i(h_i)), R(onehot(y))),   β = 0.99

* ``pred_i``: average-pool to at most ``dim_in_decoder`` features, then a linear layer with zero weights;
* ``sim_i``: a 3x3 conv, then the per-channel spatial standard deviation (as the reference code does
  for maps with more than 3 channels); for a flat output a bias-free linear layer (``LocalLossBlockLinear``'s
  ``linear_loss``);
* ``R(x)``: rows centred and L2-normalised, ``R = x·xᵀ`` clamped to [-1, 1] (an N x N similarity).

A forward hook on the unit whose output the block's heads read (``Block.out``) computes ``loss_i``, runs its backward at once (the block's
graph is freed before the next block runs, as in the reference code) and hands the next block the
*detached* output: no gradient crosses a block boundary. The optimizer steps once per batch over all
parameters (the blocks' gradients are disjoint). Quantized layers inside a block train by their
method's straight-through estimator as in backprop QAT (the plan decides the bits).

``greedy=True`` trains one block at a time, as greedy layer-wise training does (Belilovsky et al. 2019):
the run's steps are split evenly over the blocks, and each block's share is a training of its own: the
optimizer state (momentum, Adam's moments and step count) is cleared at the block's first step and the
learning-rate schedule restarts there (:meth:`stage_starts`, which :func:`lowbit.train.build_scheduler`
reads: every block starts at ``train.lr``). During block k's share the earlier blocks are frozen (no
graph, BN in eval mode), the forward stops after block k, and the output layer is trained (by the task
loss) during the last block's share.

The heads live on the method, not in the model: cost, export and ``lowbit info`` never see them.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, TrainingDiverged
from ..ondevice.units import Block, blocks
from .base import STE, register_method


class _Stop(Exception):
    """Raised by the hook of the block being trained (greedy): nothing after it needs to run."""


def similarity_matrix(x: Tensor) -> Tensor:
    """Nøkland & Eidnes' adjusted cosine similarity of the rows of ``x`` ((N, C, H, W) maps with more
    than 3 channels and more than one pixel are first reduced to their per-channel spatial std)."""
    if x.dim() == 4:
        x = x.flatten(2).std(dim=2) if x.shape[1] > 3 and x.shape[2] > 1 else x.flatten(1)
    xc = x - x.mean(dim=1, keepdim=True)
    xn = xc / (1e-8 + torch.linalg.vector_norm(xc, dim=1, keepdim=True))  # gradient 0, not NaN, at a constant row
    return (xn @ xn.t()).clamp(-1, 1)


class LocalHead(nn.Module):
    """The training-only heads of one block: ``pred`` (pooled linear classifier, zero weights)
    and ``sim`` (3x3 conv before the similarity matrix; a bias-free linear layer for a flat output)."""

    def __init__(self, width: int, spatial: bool, num_classes: int, dim_in_decoder: int):
        super().__init__()
        if spatial:
            side = max(1, int(math.sqrt(dim_in_decoder / width)))
            self.sim: nn.Module = nn.Conv2d(width, width, 3, padding=1, bias=False)
            self.pred = nn.Sequential(nn.AdaptiveAvgPool2d(side), nn.Flatten(1), nn.Linear(width * side * side, num_classes))
        else:
            self.sim = nn.Linear(width, width, bias=False)
            self.pred = nn.Sequential(nn.Flatten(1), nn.Linear(width, num_classes))
        nn.init.zeros_(self.pred[-1].weight)  # the bias keeps nn.Linear's initialisation, as in the reference code

    def forward(self, h: Tensor, y: Tensor, beta: float) -> Tensor:
        num_classes = self.pred[-1].out_features
        ry = similarity_matrix(F.one_hot(y, num_classes).to(h.dtype))
        rh = similarity_matrix(self.sim(h))
        return (1 - beta) * F.cross_entropy(self.pred(h), y) + beta * F.mse_loss(rh, ry)


@register_method("local")
class LocalLoss(STE):
    """Local-loss block training (module docstring). Options: ``beta`` (predsim weight of the
    similarity term, 0.99), ``greedy`` (one block at a time), ``dim_in_decoder`` (features the
    pred head pools to, at most; the reference code's default 2048 is its smaller setting);
    ``split_residual`` (each conv of a residual block a block, as the reference; false: the residual block is one
    block) and ``heads_before_pool`` (heads read a block's output before its pooling, as the reference; false: after
    it), the two false settings being lowbit's before session 30 (docs/ondevice.md measures them)."""

    ddp = False  # its heads' parameters get no gradient in some steps (greedy, early stop): DDP's reducer fails
    # each block learns from its own head's loss; train.distill would change only the classifier's (session 25: it was
    # accepted, and only fc differed from a run without it)
    loss_based = False
    integer_refusal = ("its heads hook block modules that integer mode's traced graph does not call (half of "
                       "ResNet-8's local losses never fired)")

    def __init__(self, beta: float = 0.99, greedy: bool = False, dim_in_decoder: int = 2048,
                 split_residual: bool = True, heads_before_pool: bool = True):
        super().__init__()
        if not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
            raise ConfigError(f"local: beta must be in [0, 1], got {beta!r}")
        for k, v in (("greedy", greedy), ("split_residual", split_residual), ("heads_before_pool", heads_before_pool)):
            if not isinstance(v, bool):
                raise ConfigError(f"local: {k} must be true or false, got {v!r}")
        if isinstance(dim_in_decoder, bool) or not isinstance(dim_in_decoder, int) or dim_in_decoder < 1:
            raise ConfigError(f"local: dim_in_decoder must be an integer >= 1, got {dim_in_decoder!r}")
        self.beta, self.greedy, self.dim_in_decoder = float(beta), greedy, dim_in_decoder
        self.split_residual, self.heads_before_pool = split_residual, heads_before_pool
        self.heads: nn.ModuleList | None = None
        self.blocks: list[Block] = []
        self.output_units: list[nn.Module] = []
        self._hooks: list = []
        self._active = False
        self._y: Tensor | None = None
        self._stage: int | None = None
        self._starts: list[int] = []
        self._losses: list[Tensor] = []

    # -- the blocks and their heads ------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Cut ``model`` into blocks, build the heads (on the model's device) and hook the unit whose
        output each block's heads read (``Block.out``). Idempotent for the same model."""
        if self.heads is not None and self._model_id == id(model):
            return
        for h in self._hooks:
            h.remove()
        bl, out_units = blocks(model, self.split_residual, self.heads_before_pool)
        last = [m for _, m in out_units if isinstance(m, nn.Linear)]
        if not last:
            raise ConfigError("local-loss training: the model's last layer must be a Linear classifier")
        num_classes = last[-1].out_features
        dev = next(model.parameters()).device
        self.heads = nn.ModuleList(
            LocalHead(b.width, b.spatial, num_classes, self.dim_in_decoder) for b in bl).to(dev)
        self.blocks, self.output_units = bl, [m for _, m in out_units]
        self._hooks = [b.out.register_forward_hook(self._hook(b.index)) for b in bl]
        self._model_id = id(model)

    def _hook(self, i: int):
        def hook(module: nn.Module, args, output: Tensor):
            if not self._active:
                return None
            if self._stage is not None and i < self._stage:
                return output.detach()  # a frozen block: its output carries no graph
            loss = self.heads[i](output, self._y, self.beta)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"local loss of block {i} became {loss.item()}")
            if torch.is_grad_enabled():
                loss.backward()  # this block's graph is freed here
            self._losses.append(loss.detach())
            if self._stage is not None and i == self._stage and i < len(self.blocks) - 1:
                raise _Stop
            return output.detach()

        return hook

    def param_groups(self, model: nn.Module) -> list[dict]:
        self.attach(model)
        params = [p for p in model.parameters() if p.requires_grad] + list(self.heads.parameters())
        return [{"params": params}]

    def setup(self, model: nn.Module, total_steps: int, steps_per_epoch: int) -> None:
        super().setup(model, total_steps, steps_per_epoch)
        self.attach(model)
        self._starts = self.stage_starts(model, total_steps)
        self.heads.to(next(model.parameters()).device)

    # -- greedy schedule ---------------------------------------------------------------------------------
    def stage_starts(self, model: nn.Module, total_steps: int) -> list[int]:
        """Greedy: the first step of blocks 1..n-1 (block k starts at ceil(k·total/n)); else none."""
        if not self.greedy:
            return []
        self.attach(model)
        n = len(self.blocks)
        return [-(-k * total_steps // n) for k in range(1, n)]

    def stage_of(self, step: int) -> int | None:
        if not self.greedy:
            return None
        return bisect.bisect_right(self._starts, step)

    def on_step(self, model: nn.Module, step: int) -> None:
        stage = self.stage_of(step)
        if stage != self._stage or step == 0:
            self._stage = stage
            if stage is not None:
                for b in self.blocks:
                    for m in b.modules:
                        m.requires_grad_(b.index == stage)
                for m in self.output_units:
                    m.requires_grad_(stage == len(self.blocks) - 1)

    def log(self) -> dict[str, float]:
        return {"block": float(self._stage)} if self._stage is not None else {}

    # -- the step -----------------------------------------------------------------------------------------
    def train_step(self, model: nn.Module, batch: Any, optimizer: torch.optim.Optimizer | None, step: int):
        from ..fit import StepResult

        x, y = batch[0], batch[1]
        if self._stage is not None:
            for b in self.blocks[: self._stage]:
                for m in b.modules:
                    m.eval()  # frozen blocks keep their BN statistics
        if step in self._starts:  # a new block: a fresh optimizer (the schedule restarts in build_scheduler)
            optimizer.state.clear()
        optimizer.zero_grad(set_to_none=True)
        self._y, self._losses, self._active = y, [], True
        out = None
        try:
            out = model(x)
        except _Stop:
            pass
        finally:
            self._active = False
        if out is not None:
            loss = self.loss(model, batch, out)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"loss became {loss.item()}")
            if loss.requires_grad:
                (self.output_scale * loss).backward()
        else:
            loss = self._losses[-1]
        optimizer.step()
        return StepResult(loss.detach(), None if out is None else out.detach(), len(x))

    @property
    def output_scale(self) -> float:
        """The weight of the output layer's task loss: (1 − β) as in the reference code's predsim (train.py scales the
        output layer's cross-entropy by it); 1 at β = 1, where predsim is the reference's ``sim`` loss, which does not
        scale it (and (1 − β) = 0 would leave the output layer untrained). The loss reported stays unscaled."""
        return 1.0 - self.beta if self.beta < 1 else 1.0

    def state_dict(self) -> dict:
        # "reads": the units the heads read; heads of the same shapes can read another unit (LeNet-5 under
        # heads_before_pool true and false), which the shapes alone would not tell on a resume
        return {"heads": self.heads.state_dict() if self.heads is not None else None,
                "reads": [b.out_name for b in self.blocks]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("heads") is not None and self.heads is not None:
            now = [b.out_name for b in self.blocks]
            if state.get("reads") != now:
                saved = state.get("reads") or "units not recorded (saved before session 31)"
                raise ConfigError(f"local loss: the saved heads read {saved}, this run's blocks read {now} (another "
                                  "split_residual, heads_before_pool or lowbit version): they cannot resume this run; "
                                  "train it again or set the options it was trained with")
            try:
                self.heads.load_state_dict(state["heads"])
            except RuntimeError:  # torch's multi-line "Missing key(s) ..."
                raise ConfigError("local loss: the saved heads do not fit this version's (session 27 gave a flat "
                                  "block's sim head a linear layer; session 30 made each conv of a residual block a "
                                  "block): a run interrupted before them cannot resume; train it again") from None

    def summary(self, model: nn.Module) -> dict:
        return {"local_blocks": len(self.blocks), "greedy": self.greedy, "beta": self.beta,
                "split_residual": self.split_residual, "heads_before_pool": self.heads_before_pool,
                "head_params (training only)": sum(p.numel() for p in self.heads.parameters()) if self.heads else 0}
