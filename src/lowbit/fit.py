"""The training core: ``fit`` and ``evaluate``, with no files, configs or run folders.

::

    model = lowbit.create_model("resnet8", in_channels=1, num_classes=10, image_size=28)
    lowbit.load_weights(model, "fp32.pt")                     # optional pretrained start
    lowbit.quantize(model, {"weight": {"name": "sawb", "bits": 2}})
    history = lowbit.fit(model, train_loader, epochs=3, val_batches=val_loader)
    print(lowbit.evaluate(model, test_loader))

``batches`` is any re-iterable of ``(x, y)`` pairs with a ``len()`` (a list, a
:class:`lowbit.data.BatchLoader`, a ``torch.utils.data.DataLoader``): the number of batches every epoch gives,
which the steps are counted with (an epoch that gives another number is refused in one line). Every epoch calls
``batches.set_epoch(epoch)`` (or its sampler's, as ``DistributedSampler`` wants) when it exists.

What a step does belongs to the *method* (:class:`lowbit.methods.Method`): ``loss`` (task loss,
cross-entropy by default), ``extra_loss`` (regularisers), ``param_groups`` (what the default
optimizer trains, with per-group settings) and ``train_step`` (forward, loss, backward, optimizer
step; overridden by methods that step differently). ``fit`` only runs the schedule around it::

    method.setup -> per epoch: [per batch: method.on_step, method.train_step, scheduler.step]
                             -> method.on_epoch_end -> evaluate(val) -> callbacks -> ...

Per-batch statistics stay on the device (no host synchronisation per step except the finite-loss
check on CPU); they are read every ``log_every`` steps for the progress bar and at the epoch end.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from .errors import ConfigError, TrainingDiverged

DEVICES = ("auto", "cpu", "cuda")


# ---------------------------------------------------------------------------------------------
# devices and batches
# ---------------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is a one-line error."""
    if isinstance(device, torch.device):
        return device
    if isinstance(device, int) and not isinstance(device, bool):  # torch's index of a GPU (before session 27: 0 was
        device = f"cuda:{device}"  # "auto", silently the CPU on a machine without one; 1 an AttributeError)
    name = device or "auto"
    if not isinstance(name, str):
        raise ConfigError(f"device must be one of {', '.join(DEVICES)} (or a torch.device), got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got '{name}'")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available (use auto or cpu)")
    return torch.device(name)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a batch (tuple/list/dict) to ``device``; no copy when already there."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def _xy(batch: Any) -> tuple[Tensor, Tensor]:
    """A batch's input and labels: ``(x, y, ...)`` (further items, e.g. an index, are left to the method). A dict, a
    lone tensor or labels of a shape that is neither ``(N,)`` class indices nor ``(N, classes)`` targets is one
    line (session 24: a dict batch failed with ``KeyError: 0``, ``(N, 1)`` labels with torch's broadcasting)."""
    check_batch(batch)
    if len(batch) < 2:
        raise ConfigError(f"a batch must be a tuple (x, y, ...) of inputs and labels, got {type(batch).__name__}")
    x, y = batch[0], batch[1]
    if not isinstance(y, Tensor):
        raise ConfigError(f"labels must be a tensor of class indices (N,), got {type(y).__name__}")
    if y.dim() == 2 and y.shape[1] == 1:
        raise ConfigError(f"labels of shape {tuple(y.shape)}: give class indices of shape (N,), e.g. y.squeeze(1)")
    if y.dim() not in (1, 2):
        raise ConfigError(f"labels of shape {tuple(y.shape)}: give class indices (N,) or targets (N, classes)")
    if y.dim() == 1 and (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool):
        raise ConfigError(f"labels of dtype {y.dtype}: class indices (N,) must be integers, e.g. y.long()")
    return x, y


def class_targets(out: Tensor, y: Tensor) -> Tensor:
    """``y`` checked against the outputs ``out`` (N, classes) for the cross-entropy: class indices (N,) in
    0..classes-1 or targets of out's shape; else one line (before session 25 a label of 11 for 10 classes was
    torch's "IndexError: Target 11 is out of bounds", and -100 was silently skipped by the loss but counted wrong
    by the accuracy)."""
    if not isinstance(y, Tensor):
        raise ConfigError(f"labels must be a tensor of class indices (N,), got {type(y).__name__}")
    check_output(out)
    dense = out.dim() > 2 and y.dim() == out.dim() - 1 and tuple(y.shape) == (out.shape[0], *out.shape[2:])
    if y.dim() == 1 or dense:  # class indices: (N,), or (N, d1, ...) for outputs (N, classes, d1, ...)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ConfigError(f"labels of dtype {y.dtype}: class indices (N,) must be integers, e.g. y.long()")
        if y.numel() and out.dim() >= 2 and bool(((y < 0) | (y >= out.shape[1])).any()):
            lo = int(y.min())
            raise ConfigError(f"labels must be class indices 0..{out.shape[1] - 1} for a model with {out.shape[1]} "
                              f"outputs, got {lo}..{int(y.max())}"
                              + (" (-100, PyTorch's ignore index, is not supported: drop those samples, whose "
                                 "accuracy would count as wrong)" if lo == -100 else ""))
        if y.dim() == 1 and out.dim() != 2:  # (N, classes, 1, 1): torch's "only batches of spatial targets"
            raise ConfigError(f"outputs of shape {tuple(out.shape)} for class indices of shape {tuple(y.shape)}: the "
                              "model must return logits (N, classes), e.g. flatten after the last pooling")
        return y.long()
    if y.shape != out.shape:
        raise ConfigError(f"labels of shape {tuple(y.shape)} for outputs of shape {tuple(out.shape)}: give class "
                          "indices (N,) or targets (N, classes)")
    return y.to(out.dtype) if not y.is_floating_point() else y


def check_model(model: Any) -> None:
    """The model is an ``nn.Module`` (a string or the class itself failed with "'str' object has no attribute
    'parameters'")."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module instance, got {type(model).__name__}"
                          + (" (a class or builder: call it)" if callable(model) else ""))


def check_output(out: Any) -> None:
    """The model's output is one tensor of logits: a tuple or dict (logits and features, auxiliary heads) failed with
    "'tuple' object has no attribute 'dim'" (session 27)."""
    if not isinstance(out, Tensor):
        raise ConfigError(f"the model returned a {type(out).__name__}, not a tensor of logits (N, classes): fit's "
                          "step, loss and accuracy and evaluate need one; return the logits alone (keep features in "
                          "an attribute or a forward hook)")


def check_batch(batch: Any) -> None:
    """A training batch is a tuple or list ``(x, ...)`` (a dict failed with ``KeyError: 0``)."""
    if not isinstance(batch, (tuple, list)) or not batch:
        what = f"a dict with keys {sorted(batch)}" if isinstance(batch, dict) else type(batch).__name__
        raise ConfigError(f"a batch must be a tuple (x, y, ...) of inputs and labels, got {what}")


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The model's floating type (its first floating parameter's), or None where it has none."""
    return next((t.dtype for t in model.parameters() if t.is_floating_point()), None)


def match_dtype(batch: Any, model: nn.Module) -> Any:
    """Floating inputs in the model's floating type (float64 or float16 images failed with torch's "expected
    scalar type Double but found Float"); integer images are left alone (they are not normalised)."""
    dt = model_dtype(model)
    if dt is None or not isinstance(batch, (tuple, list)) or not batch or not isinstance(batch[0], Tensor):
        return batch
    x = batch[0]
    if x.is_floating_point() and x.dtype != dt:
        return type(batch)([x.to(dt), *batch[1:]])
    return batch


def finite_state(model: nn.Module) -> str | None:
    """The first parameter, BatchNorm statistic or quantizer state of ``model`` that is not finite, or None. Other
    buffers are the model's own business (a mask may hold -inf on purpose)."""
    def own_buffers():
        for mname, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) or getattr(m, "is_quantizer", False):
                for bname, b in m.named_buffers(recurse=False):
                    yield f"{mname}.{bname}" if mname else bname, b

    with torch.no_grad():
        for kind, items in (("parameter", model.named_parameters()), ("buffer", own_buffers())):
            for name, t in items:
                if t is not None and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                    return f"{kind} {name}"
    return None


def _correct(out: Tensor, y: Tensor) -> Tensor:
    """Correct predictions: against class indices, or against the largest entry of one-hot / soft targets (N,
    classes) (before session 24 those were compared elementwise: accuracies above 100 %)."""
    check_output(out)
    if y.dim() == 2:
        if y.shape != out.shape:
            raise ConfigError(f"targets of shape {tuple(y.shape)} for outputs of shape {tuple(out.shape)}")
        y = y.argmax(1)
    return (out.argmax(1) == y).sum()


def _warn_untrained(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Warn about trainable parameters the optimizer does not hold: an optimizer built before ``lowbit.quantize``
    misses the quantizers' learned ranges (PACT's alpha, LSQ's step), which then never train (session 24)."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        import warnings

        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        warnings.warn(f"fit: {len(missing)} trainable parameter(s) are not in the optimizer and will not train "
                      f"({shown}); build the optimizer after lowbit.quantize (or pass optimizer=None)",
                      RuntimeWarning, stacklevel=3)


def _set_epoch(batches: Any, epoch: int) -> None:
    for obj in (batches, getattr(batches, "sampler", None), getattr(batches, "batch_sampler", None)):
        if obj is not None and callable(getattr(obj, "set_epoch", None)):
            obj.set_epoch(epoch)
            return


def _steps_per_epoch(batches: Any, epochs: int) -> int:
    if iter(batches) is batches and epochs > 1:
        raise ConfigError("batches is a one-shot iterator; pass a list, a BatchLoader or a DataLoader "
                          "so that every epoch can iterate it again")
    try:
        n = len(batches)
    except TypeError:
        ds = getattr(batches, "dataset", None)
        if isinstance(ds, torch.utils.data.IterableDataset):  # "pass ... a DataLoader" misled about a DataLoader
            raise ConfigError(f"batches is a DataLoader over an IterableDataset ({type(ds).__name__}) without "
                              "__len__: give the dataset a __len__ (its number of samples per epoch; the schedules "
                              "need the number of steps), or use a map-style Dataset") from None
        raise ConfigError(f"batches ({type(batches).__name__}) has no len(); pass a list, a BatchLoader "
                          "or a DataLoader (the method's schedules need the number of steps)") from None
    if n == 0:
        raise ConfigError("batches is empty: the training split has no batch")
    return n


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def kept_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every module's own train/eval mode on leaving (``model.train(was)`` would reset a BatchNorm the
    caller froze to the root's mode): for work that switches a model to eval mode, evaluation and export."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield model
    finally:
        for m, t in modes.items():
            m.training = t


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, device: str | torch.device | None = None,
             loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` over ``batches`` (eval mode, restored afterwards).

    The quantized weights are computed once for the whole pass (``parametrize.cached()``), not
    once per batch. ``device`` defaults to the model's. ``loss_fn(output, y)`` returns a batch's mean loss
    (it is weighted by the batch size); cross-entropy by default. Labels are class indices ``(N,)`` or one-hot /
    soft targets ``(N, classes)`` (accuracy against their largest entry). An empty iterable gives NaN loss and
    accuracy. Every module's train/eval mode is restored afterwards.
    """
    check_model(model)
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError(f"loss_fn must be a function (output, y) -> mean loss, got {type(loss_fn).__name__}")
    dev = resolve_device(device) if device is not None else model_device(model)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    n = 0
    with kept_modes(model):
        model.eval()
        with parametrize.cached():
            for batch in batches:
                x, y = _xy(match_dtype(to_device(batch, dev), model))
                try:
                    out = model(x)
                except RuntimeError as e:
                    if not _integer_input(x):
                        raise
                    raise ConfigError(_integer_input_message(x, e)) from None
                if loss_fn is None:
                    loss_sum += F.cross_entropy(out, class_targets(out, y), reduction="sum").double()
                else:
                    loss_sum += loss_fn(out, y).double() * len(y)
                correct += _correct(out, y)
                n += len(y)
    if n == 0:
        return {"loss": float("nan"), "acc": float("nan"), "n": 0}
    return {"loss": loss_sum.item() / n, "acc": correct.item() / n, "n": n}


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    """What one ``train_step`` reports: the task loss (for the epoch mean) and the batch output
    (for accuracy; None when a step has no single output) and the batch size."""

    loss: Tensor
    output: Tensor | None
    n: int


class Callback(Protocol):
    """Anything with some of these methods; a plain callable is ``on_epoch_end(row)``."""

    def on_fit_start(self, state: FitState) -> None: ...
    def on_epoch_start(self, state: FitState) -> None: ...  # after model.train(), before the first step
    def on_step(self, state: FitState, step: int) -> None: ...  # before each training step (over all epochs)
    def on_epoch_end(self, state: FitState, row: dict) -> None: ...
    def on_fit_end(self, state: FitState) -> None: ...


@dataclass
class FitState:
    """The live objects of a ``fit`` call, handed to callbacks (e.g. to save checkpoints)."""

    model: nn.Module
    method: Any
    optimizer: torch.optim.Optimizer | None
    scheduler: Any
    epochs: int
    steps_per_epoch: int
    device: torch.device
    epoch: int = 0  # 0-based, the epoch running or just finished
    history: list[dict] = field(default_factory=list)
    stop: bool = False  # a callback sets it to end training after this epoch

    def checkpoint(self) -> dict:
        """Everything ``fit(..., resume=...)`` needs to continue after the current epoch: a snapshot (copies of
        the tensors), so that a checkpoint kept in memory does not change as training goes on (before session 24
        it shared the live tensors: resuming from one kept by a callback gave another run)."""
        import copy

        return copy.deepcopy({"model": self.model.state_dict(),
                              "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                              "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                              "method": self.method.state_dict(), "epoch": self.epoch})


def _call(cb: Any, hook: str, state: FitState, *args) -> None:
    if hasattr(cb, hook):
        getattr(cb, hook)(state, *args)
    elif hook == "on_epoch_end" and callable(cb) and not any(hasattr(cb, h) for h in ("on_fit_start", "on_fit_end")):
        cb(*args)


class FreezeBatchNorm:
    """Callback: after ``after`` epochs (a fraction counts: 1.5 freezes half-way through the second
    epoch, at step ``round(after * steps_per_epoch)``), every BatchNorm of the model computes its output
    from its running statistics, which stop changing (its affine weight and bias still train). Training
    then computes what evaluation computes, which is what the network is deployed with: the "batch
    normalization freezing" of Jacob et al. 2018 (sec. 3.2) and Krishnamoorthi 2018 (sec. 3.2), done
    late in training, when the learning rate is small.

    ``gradient`` is what the backward pass sees. ``"running"`` (the default): the frozen affine map's own
    gradient (BatchNorm in eval mode, PyTorch's ``freeze_bn_stats``): training descends the loss of the
    network it deploys. Frozen at half the peak learning rate this diverged in one of 27 ResNet-8
    fine-tunes (an 8-bit first conv's steps grew 10x and the loss went from 0.6 to 4 in three steps);
    frozen later (1.5 of 2 epochs) the same run trained on. ``"batch"``: batch normalisation's gradient
    with the batch's own statistics, straight through the frozen forward
    (``y_frozen.detach() + (y_batch - y_batch.detach())``, in the spirit of Krishnamoorthi's folded
    BatchNorm whose forward is corrected to the running statistics while its gradient keeps the
    batch's): stable, but it optimises another function than it computes, and measured 0.9-1.5 points
    lower at W2A2 (docs/integer-log.md, "Session 13"). ``train.freeze_bn_after`` / ``train.freeze_bn_gradient``.

    A later ``model.train()`` (BatchNorm in train mode) undoes the freeze until the next step."""

    GRADIENTS = ("running", "batch")

    def __init__(self, after: float, gradient: str = "running"):
        if isinstance(after, bool) or not isinstance(after, (int, float)) or not 0 <= after < float("inf"):
            raise ConfigError(f"freeze_bn_after must be a number of epochs >= 0, got {after!r}")
        if gradient not in self.GRADIENTS:
            raise ConfigError(f"freeze_bn_gradient must be one of {', '.join(self.GRADIENTS)}, got {gradient!r}")
        self.after, self.gradient = after, gradient

    def on_step(self, state: FitState, step: int) -> None:
        """Before training step ``step`` (counted over all epochs)."""
        if step < round(self.after * state.steps_per_epoch):
            return
        for m in state.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                m.eval()
                if self.gradient == "batch" and not isinstance(m.__dict__.get("forward"), _FrozenBatchNorm):
                    m.forward = _FrozenBatchNorm(m, state.model)


class _FrozenBatchNorm:
    """A BatchNorm's forward under ``FreezeBatchNorm(gradient="batch")`` (an instance attribute, not a
    hook: integer mode evaluates through the float graph whenever a module has forward hooks). While
    the BatchNorm is in eval mode and the model it belongs to trains: the running statistics' output,
    with batch normalisation's gradient. Otherwise (evaluation; BatchNorm back in train mode) the
    BatchNorm's own forward."""

    def __init__(self, bn: nn.Module, root: nn.Module):
        self.bn, self.root = bn, root

    def __call__(self, x: Tensor) -> Tensor:
        bn = self.bn
        y = type(bn).forward(bn, x)
        if bn.training or not self.root.training or not torch.is_grad_enabled() or x.numel() <= x.shape[1]:
            return y
        y_batch = F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        return y.detach() + (y_batch - y_batch.detach())  # the value is y's bit for bit (y + 0)


def default_optimizer(model: nn.Module, method: Any, name: str = "sgd", lr: float = 0.1, momentum: float = 0.9,
                      nesterov: bool = False, weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    """SGD (momentum) or Adam over ``method.param_groups(model)``; a group's own keys (lr,
    weight_decay, ...) override these defaults (e.g. SINAREQ's bits without weight decay)."""
    groups = method.param_groups(model)
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise ConfigError("the model has no trainable parameters")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"optimizer must be sgd or adam, got '{name}'")


def progress_bar(iterable=None, *, enabled: bool = True, logs: bool = False, **kw):
    """lowbit's progress bars (epochs, DCQ's sections, ReLeQ's episodes): tqdm, off where not ``enabled``, where there
    is no stderr (`2>&-`, pythonw, a daemon: ``sys.stderr`` is None; tqdm's first write failed with an AttributeError
    nobody saw, ending the run with status 1, before session 29) and where stderr is not a terminal (tqdm's
    ``disable=None``: a log file got ~10 updates a second joined by carriage returns, one line of ~60 KB per
    quickstart epoch; the per-epoch lines ``fit`` prints with ``progress`` stay). ``logs``: a bar that updates once per
    unit of work and is the only progress its command shows (ReLeQ's episodes, DCQ's section epochs) is written to a log
    too: off there, a search in a batch job showed nothing until it ended."""
    if not enabled or sys.stderr is None:
        return tqdm(iterable, disable=True, **kw)
    return tqdm(iterable, disable=False if logs else None, dynamic_ncols=True, **kw)


def fit(model: nn.Module, batches: Iterable, method: Any = None, optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None, epochs: int = 1, device: str | torch.device | None = None,
        callbacks: Iterable[Any] = (), val_batches: Iterable | None = None, resume: dict | None = None,
        progress: bool = False, log_every: int = 10) -> list[dict]:
    """Train ``model`` for ``epochs`` epochs over ``batches``; returns one metrics row per epoch.

    ``method`` defaults to the one ``quantize`` attached (plain STE for an unquantized model);
    ``optimizer`` to :func:`default_optimizer`; ``scheduler`` (optional) is stepped once per batch.
    ``val_batches`` is evaluated after every epoch (``val_loss``/``val_acc`` in the row, NaN without).
    ``device`` (auto | cpu | cuda) moves the model there; None keeps it where it is.
    ``resume`` is a :meth:`FitState.checkpoint` (e.g. saved by a callback): model, optimizer,
    scheduler and method state are restored after the method's ``setup`` and training continues
    with the next epoch, giving the same result as an uninterrupted call (when the batches of an
    epoch are a function of the epoch, as :class:`lowbit.data.BatchLoader`'s are).
    Callbacks (:class:`Callback`) get the row after each epoch; setting ``state.stop`` ends training
    (``on_epoch_start`` after ``model.train()``, ``on_step`` before each step: e.g. :class:`FreezeBatchNorm`).
    """
    from .methods import STE
    from .quantize import quant_state

    check_model(model)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be an integer >= 1, got {epochs!r}")
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ConfigError(f"log_every must be an integer >= 1, got {log_every!r}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer must be a torch.optim.Optimizer (or None for the default), got "
                          f"{type(optimizer).__name__}")
    if scheduler is not None and isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ConfigError("scheduler: ReduceLROnPlateau needs a metric; fit steps its scheduler once per batch "
                          "without one: step it from a callback's on_epoch_end(state, row) with row['val_loss']")
    if scheduler is not None and not callable(getattr(scheduler, "step", None)):  # failed after the first step
        raise ConfigError(f"scheduler must be a torch lr scheduler (stepped once per batch), got "
                          f"{type(scheduler).__name__}")
    if callbacks is not None and not isinstance(callbacks, Iterable):
        raise ConfigError(f"callbacks must be a list, got {type(callbacks).__name__} (callbacks=[it])")
    if scheduler is not None and getattr(scheduler, "optimizer", optimizer) is not optimizer:
        # before session 27 a scheduler built on the user's optimizer, with optimizer=None, stepped that unused
        # optimizer while fit trained with its own at a constant lr 0.1, without a word
        raise ConfigError("scheduler: it schedules another optimizer than the one fit steps"
                          + (" (optimizer=None: fit builds its own)" if optimizer is None else "")
                          + "; pass optimizer=<the optimizer the scheduler was built on> with it")
    if val_batches is not None and iter(val_batches) is val_batches and epochs > 1:
        raise ConfigError("val_batches is a one-shot iterator (it would be empty after the first epoch); pass a "
                          "list, a BatchLoader or a DataLoader")
    if resume is not None and (not isinstance(resume, dict) or "model" not in resume or "epoch" not in resume):
        raise ConfigError("resume must be a FitState.checkpoint() dict (with 'model' and 'epoch')")
    dev = resolve_device(device) if device is not None else model_device(model)
    model.to(dev)
    if method is None:
        qs = quant_state(model)
        method = qs.method if qs is not None else STE()
    elif not hasattr(method, "train_step"):
        raise ConfigError(f"method must be a lowbit Method instance (or None for the model's), got "
                          f"{type(method).__name__}")
    else:
        _check_own_method(model, method)
    steps = _steps_per_epoch(batches, epochs)
    own_optimizer = optimizer is not None
    if optimizer is None:
        optimizer = default_optimizer(model, method)
    callbacks = list(callbacks or ())  # None: none (the type check above lets it through)
    method.setup(model, epochs * steps, steps)  # first: a method that refuses the model says so alone
    if own_optimizer:
        _warn_untrained(model, optimizer)
    start_epoch = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        for obj, key in ((optimizer, "optimizer"), (scheduler, "scheduler")):
            if obj is not None and resume.get(key) is not None:
                obj.load_state_dict(resume[key])
        method.load_state_dict(resume.get("method", {}))
        start_epoch = int(resume["epoch"]) + 1
    state = FitState(model, method, optimizer, scheduler, epochs, steps, dev, epoch=start_epoch)
    for cb in callbacks:
        _call(cb, "on_fit_start", state)
    stepping = [cb for cb in callbacks if hasattr(cb, "on_step")]
    for epoch in range(start_epoch, epochs):
        state.epoch = epoch
        model.train()
        for cb in callbacks:
            _call(cb, "on_epoch_start", state)
        row = _train_epoch(state, batches, epoch, progress, log_every, stepping)
        method.on_epoch_end(model, epoch)
        bad = finite_state(model)
        if bad is not None:  # before session 25 such a network was checkpointed, evaluated and exported
            raise TrainingDiverged(f"the {bad} became non-finite during epoch {epoch + 1} (the loss of each step "
                                   "was finite); lower train.lr or check the data" + _kept(epoch))
        val = evaluate(model, val_batches, dev) if val_batches is not None else {"loss": float("nan"),
                                                                                 "acc": float("nan")}
        if val_batches is not None and val.get("n") == 0 and _has_batches(val_batches):
            raise ConfigError(f"val_batches gave no batch in epoch {epoch + 1}: give batches that can be iterated "
                              "once per epoch (a DataLoader, a list)")
        row = {"epoch": epoch + 1, "train_loss": row["train_loss"], "train_acc": row["train_acc"],
               "val_loss": val["loss"], "val_acc": val["acc"],
               "lr": optimizer.param_groups[0]["lr"] if optimizer is not None else float("nan"),
               "epoch_time": row["epoch_time"], **method.log(), **method.epoch_record(model)}
        state.history.append(row)
        for cb in callbacks:
            _call(cb, "on_epoch_end", state, row)
        if progress:
            tqdm.write(f"epoch {epoch + 1}/{epochs}  loss {row['train_loss']:.4f}  train {row['train_acc']:.4f}  "
                       f"val {row['val_acc']:.4f}  {row['epoch_time']:.1f}s")
        if state.stop:
            break
    for cb in callbacks:
        _call(cb, "on_fit_end", state)
    return state.history


def _check_own_method(model: nn.Module, method: Any) -> None:
    """A method that did not build the model's layers cannot train those its quantize method made its own (mixtures,
    learned bits, value search, integer codes: their schedule lives in that method): before session 27
    ``fit(dqa_model, ..., method=STE())`` trained DQA's mixtures at their first temperature, without a word."""
    from .methods import Method
    from .quantize import quant_state

    qs = quant_state(model)
    own = qs.method if qs is not None else None
    if own is None or method is own or isinstance(method, type(own)):
        return
    cls = type(own)
    if cls.weight_parametrization is Method.weight_parametrization and cls.act_quantizer is Method.act_quantizer:
        return  # plain quantizers (STE and its regularisers): any method can train them
    raise ConfigError(f"method: the model was quantized with method '{own.name}', whose layers only it trains "
                      f"(its schedule drives them), not {type(method).__name__}; pass method=None (the model's "
                      "own), or quantize again with replace=True and the method you want")


def _has_batches(batches: Any) -> bool:
    """Whether ``batches`` should give one: an empty split (``len`` 0, ``data.val_fraction: 0``) gives none."""
    try:
        return len(batches) > 0
    except TypeError:
        return True


def _kept(epoch: int) -> str:
    """What a diverged run still holds (the checkpoints of the epochs before; a run folder's on_epoch_end)."""
    if epoch == 0:
        return ""
    return (f"; epochs 1-{epoch} finished: a run folder keeps them (best.pt, last.pt), and a new run can start "
            "from them with model.init_from: RUN_DIR")


def _train_epoch(state: FitState, batches: Iterable, epoch: int, progress: bool, log_every: int,
                 stepping: list = ()) -> dict:
    model, method, opt, sched, dev = state.model, state.method, state.optimizer, state.scheduler, state.device
    _set_epoch(batches, epoch)
    t0 = time.perf_counter()
    # float64 sums of (loss * batch size): the same numbers as Python floats of loss.item()
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    seen = with_output = 0
    bar = progress_bar(batches, enabled=progress, desc=f"epoch {epoch + 1}/{state.epochs}", leave=False)
    given = 0
    for i, batch in enumerate(bar):
        if i == state.steps_per_epoch:  # the step counter would run into the next epoch's steps
            raise ConfigError(_steps_mismatch(epoch, f"more than {i}", state.steps_per_epoch))
        given = i + 1
        check_batch(batch)
        batch = match_dtype(to_device(batch, dev), model)
        # the method reads its batch (DCQ's sections train on (x, feature maps)); class indices of a narrower
        # integer type (int32, uint8) become int64, which the cross-entropy takes
        y = batch[1] if len(batch) > 1 else None  # check_batch: a tuple or list
        if isinstance(y, Tensor) and y.dim() == 1 and y.dtype not in (torch.int64, torch.bool) \
                and not y.is_floating_point() and not y.is_complex():
            batch = type(batch)([batch[0], y.long(), *batch[2:]])
        step = epoch * state.steps_per_epoch + i
        for cb in stepping:
            cb.on_step(state, step)
        method.on_step(model, step)
        try:
            res = method.train_step(model, batch, opt, step)
        except TrainingDiverged as e:
            lr = opt.param_groups[0]["lr"] if opt is not None else float("nan")
            raise TrainingDiverged(f"{e} at epoch {epoch + 1}, step {i + 1}; lower train.lr (now {lr:.3g}) "
                                   "or check the data" + _kept(epoch)) from None
        except RuntimeError as e:
            if not _integer_input(batch[0]):
                raise
            raise ConfigError(_integer_input_message(batch[0], e, f"epoch {epoch + 1}, step {i + 1}: ")) from None
        except ValueError as e:
            if "Expected more than 1 value per channel when training" not in str(e):
                raise
            raise ConfigError(f"epoch {epoch + 1}, step {i + 1}: a training batch of one sample, on which BatchNorm "
                              "cannot train: change the batch size (train.batch_size) or the number of training "
                              "images so that no batch holds one, or drop it (DataLoader(..., drop_last=True))") \
                from None
        if sched is not None:
            sched.step()
        loss_sum += res.loss.detach().double() * res.n
        seen += res.n
        if res.output is not None and isinstance(y, Tensor) and (y.dim() == 1 or y.shape == res.output.shape):
            correct += _correct(res.output, batch[1])
            with_output += res.n
        if progress and i % log_every == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / max(with_output, 1):.3f}",
                            **{k: f"{v:.3g}" for k, v in method.log().items()})
    if seen == 0:  # before session 25: loss 0.0 and accuracy NaN, without a word
        raise ConfigError(f"epoch {epoch + 1} had no training batch: give batches that can be iterated once per "
                          "epoch (a DataLoader, a list), not an iterator the first epoch used up")
    if given != state.steps_per_epoch:  # before session 28: the schedules silently counted steps with the wrong len()
        raise ConfigError(_steps_mismatch(epoch, str(given), state.steps_per_epoch))
    return {"train_loss": loss_sum.item() / max(seen, 1),
            "train_acc": correct.item() / with_output if with_output else float("nan"),
            "epoch_time": time.perf_counter() - t0}


def _steps_mismatch(epoch: int, given: str, steps: int) -> str:
    """One line for an epoch whose number of batches is not ``len(batches)``, with which ``fit`` counts its steps: an
    IterableDataset whose ``__len__`` counts something else, or one read by several workers that each yield all of
    it (before session 28 FreezeBatchNorm(0.5) then froze an epoch late, or a OneCycleLR failed in torch)."""
    return (f"epoch {epoch + 1} gave {given} batches but len(batches) is {steps}: fit counts its steps with len() "
            "(the scheduler, FreezeBatchNorm, the method's schedule); make len() the number of batches one epoch "
            "gives (an IterableDataset's __len__ is its number of samples, or of batches with batch_size=None; with "
            "num_workers > 1 each worker must yield its own share: torch.utils.data.get_worker_info())")


def _integer_input(x: Any) -> bool:
    return isinstance(x, Tensor) and not x.is_floating_point() and not x.is_complex()


def _integer_input_message(x: Tensor, e: Exception, where: str = "") -> str:
    """Integer images (uint8, as decoded) in a float model failed in torch ("Input type (unsigned char) and bias
    type (float) should be the same") or in a quantizer ("result type Float can't be cast to the desired output
    type Byte"); fit and evaluate do not convert them, which would feed 0..255 unnormalised (session 28)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return (f"{where}inputs of dtype {x.dtype} failed in the model ({first}): convert images to floating point and "
            "normalise them (e.g. x.float() / 255, then the dataset's mean and std, as lowbit.data.BatchLoader does)")
