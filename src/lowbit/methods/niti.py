"""NITI: integer-only training (Wang et al., "NITI: Training Integer Neural Networks Using Integer-only
Arithmetic", TPDS 2022; code wangmaolin/niti), seed 002 part 3 "All-integer training".

Every weight, activation and error is an int8 tensor with one power-of-two exponent
(:mod:`lowbit.ondevice.intops`). A step, in integers only:

1. forward: int8 x int8 -> int32 per conv/linear, back to int8 by a round-to-nearest right shift
   (the shift goes into the exponent); ReLU, max-pool, flatten, average-pool and residual adds on
   integers;
2. the integer softmax cross-entropy error (:func:`~lowbit.ondevice.intops.ce_error`);
3. backward through the same units: each layer's input error (int32 -> int8, round to nearest), then
   its weight gradient ``errᵀ·act`` in int32, shifted to ``μ`` magnitude bits with pseudo-stochastic
   rounding (NITI's ``PstoShift``), and the update ``w <- clip(w - g, -127, 127)``: no learning rate,
   momentum or weight decay. ``μ`` (5, 4, 3 over the run, NITI's regime at epochs 0/100/150 of 200
   scaled to the run: ``milestones`` 0.5, 0.75) is the learning rate.

Below 8 bits (002: "How to go down to 4 bits? keep gradients in 8 bits, random jumps from state to
others"): ``b``-bit weights keep codes in ``[-(2^(b-1)-1), 2^(b-1)-1]``; activations and errors stay
int8; the gradient is shifted to ``μ - (8 - b)`` bits (the same step relative to the weight range as
at 8 bits; ``μ - 4 <= 1`` at 4 bits) with true stochastic rounding, so a weight jumps to a
neighbouring level with a probability proportional to its gradient.

The model is any zoo model without BatchNorm and without biases (``batch_norm: false, bias: false``),
every conv/linear quantized by the plan with ``weight: {name: pow2int, bits: 8 | 4}``, no activation
quantizer and ``keep_first/keep_last: false``. ``layer.weight`` (the float twin that ``evaluate``,
cost and export see) is ``code · 2^e`` exactly; :func:`integer_evaluate` runs the integer forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, TrainingDiverged
from ..ondevice import intops
from ..ondevice.intops import IntT
from ..ondevice.units import check_replayable, is_residual, units
from ..plan import QuantSpec
from ..quant.pow2int import Pow2IntQuantizer, pow2_exponent
from .base import Method, QuantizedWeight, register_method

ELEMENTWISE = (nn.Identity, nn.Dropout, nn.Flatten, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d)


class IntegerWeight(QuantizedWeight):
    """NITI's weight: int8 ``code`` (a buffer, what training updates) and the exponent ``exp``.
    ``forward`` returns ``code · 2^exp`` (the float twin; the latent tensor is not used)."""

    def __init__(self, quantizer: Pow2IntQuantizer, w: Tensor):
        super().__init__(quantizer)
        qmax = quantizer.qmax
        e = pow2_exponent(float(w.detach().abs().max()), quantizer.bits)
        code = torch.clamp(torch.round(w.detach() * 2.0**-e), -qmax, qmax).to(torch.int8)
        self.register_buffer("code", code)
        self.register_buffer("exp", torch.tensor(e, dtype=torch.int64))
        quantizer.set_exponent(e)

    def forward(self, w: Tensor) -> Tensor:
        e = int(self.exp)
        self.quantizer.set_exponent(e)
        self.quantizer._record(e, w.dtype, w.device)
        return torch.ldexp(self.code.to(w.dtype), torch.tensor(e, dtype=w.dtype, device=w.device))

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.quantizer.set_exponent(int(self.exp))


def _pair(v) -> int:
    v = v if isinstance(v, int) else v[0]
    return int(v)


@register_method("niti")
class NITI(Method):
    """Integer-only training (module docstring). Options: ``mu`` (gradient bits per phase),
    ``milestones`` (fractions of the run where the next ``mu`` starts), ``grad_rounding``
    (``pseudo`` | ``stochastic`` | ``auto``: pseudo at 8-bit weights, stochastic below), ``seed``."""

    loss_based = False  # the integer error signal of the logits, no loss to distill into
    ddp = False  # the integer update bypasses autograd: DDP's gradient averaging never sees it
    integer_refusal = ("NITI trains its own integer network (int8 weights, activations and errors with power-of-two "
                       "scales, docs/ondevice.md), which it also exports; leave plan.integer out")

    def __init__(self, mu: list[int] | tuple[int, ...] = (5, 4, 3), milestones: list[float] | tuple[float, ...] = (0.5, 0.75),
                 grad_rounding: str = "auto", seed: int = 0):
        super().__init__()
        mu, milestones = list(mu), list(milestones)
        if not mu or any(not isinstance(m, int) or isinstance(m, bool) or not 1 <= m <= 7 for m in mu):
            raise ConfigError(f"niti: mu must be a non-empty list of integers in 1..7, got {mu!r}")
        if len(milestones) != len(mu) - 1 or any(not 0 < f < 1 for f in milestones) or milestones != sorted(milestones):
            raise ConfigError(f"niti: milestones must be {len(mu) - 1} increasing fractions in (0, 1), got {milestones!r}")
        if grad_rounding not in ("auto", "pseudo", "stochastic"):
            raise ConfigError(f"niti: grad_rounding must be auto, pseudo or stochastic, got {grad_rounding!r}")
        self.mu_schedule, self.milestones, self.grad_rounding = mu, milestones, grad_rounding
        self.mu = mu[0]
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self._units: list[tuple[str, nn.Module]] | None = None

    # -- what a layer is made of -------------------------------------------------------------------
    def weight_parametrization(self, layer: str, module: nn.Module, spec: QuantSpec) -> nn.Module:
        if spec.name != "pow2int":
            raise ConfigError(f"method niti: plan.weight must be {{name: pow2int, bits: 8}} (int codes x 2^e), "
                              f"got '{spec.name}' for layer '{layer}'")
        if getattr(module, "bias", None) is not None:
            raise ConfigError(f"method niti: layer '{layer}' has a bias; NITI layers have none (model option bias: false)")
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or _pair(module.dilation) != 1
                                              or isinstance(module.padding, str)):
            raise ConfigError(f"method niti: layer '{layer}': only groups=1, dilation=1 convs are supported")
        return IntegerWeight(Pow2IntQuantizer(spec.bits if spec.bits is not None else 8), module.weight)

    def act_quantizer(self, layer: str, module: nn.Module, spec: QuantSpec) -> nn.Module:
        raise ConfigError("method niti: activations are int8 with a per-tensor exponent by construction; "
                          "leave plan.act out")

    def param_groups(self, model: nn.Module) -> list[dict]:
        # NITI has no optimizer: the integer codes are buffers updated by train_step. fit still builds
        # one; it gets the unused latent float tensors at lr 0 and never sees a gradient.
        latent = [p for n, p in model.named_parameters() if n.endswith("original")]
        return [{"params": latent or list(model.parameters())[:1], "lr": 0.0, "weight_decay": 0.0, "momentum": 0.0}]

    # -- schedule ------------------------------------------------------------------------------------
    def setup(self, model: nn.Module, total_steps: int, steps_per_epoch: int) -> None:
        super().setup(model, total_steps, steps_per_epoch)
        self._units = program(model)

    def on_step(self, model: nn.Module, step: int) -> None:
        frac = step / max(self.total_steps, 1)
        self.mu = self.mu_schedule[sum(frac >= m for m in self.milestones)]

    def log(self) -> dict[str, float]:
        return {"mu": float(self.mu)}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])

    # -- the step -------------------------------------------------------------------------------------
    def train_step(self, model: nn.Module, batch: Any, optimizer, step: int):
        from ..fit import StepResult

        x, y = batch[0], batch[1]
        xi = x if isinstance(x, IntT) else intops.from_float(x)  # the data arriving: not training
        logits = self.integer_step(model, xi, y)
        # reported loss: cross-entropy of the dequantized logits (a metric; nothing flows back)
        loss = F.cross_entropy(torch.ldexp(logits.q.float(), torch.tensor(float(logits.e))), y)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss.item()}")
        if optimizer is not None:  # its lr-0 group, no gradients: changes nothing, and the schedule sees a step
            optimizer.step()  # (without it every NITI run printed torch's "lr_scheduler.step() before" warning)
        return StepResult(loss.detach(), logits.q, len(y))

    def integer_step(self, model: nn.Module, x: IntT, y: Tensor) -> IntT:
        """Forward, integer CE error, backward and update; every tensor is an integer tensor.
        Returns the int8 logits of the forward pass."""
        us = self._units if self._units is not None else program(model)
        tape: list = []
        h = x
        for _, m in us:
            h = _forward(m, h, tape)
        err = intops.ce_error(h, y, self.generator)
        for i in range(len(us) - 1, -1, -1):
            err = _backward(us[i][1], err, tape.pop(), self, first=i == 0)
        return h

    def update(self, wp: IntegerWeight, grad: Tensor) -> None:
        """``w <- clip(w - g, ±qmax)`` with ``g`` the gradient shifted to ``μ - (8 - b)`` bits."""
        b = wp.quantizer.bits
        rounding = self.grad_rounding if self.grad_rounding != "auto" else ("pseudo" if b >= 8 else "stochastic")
        qmax = wp.quantizer.qmax
        g, _ = intops.to_bits(grad, self.mu - (8 - b), rounding, qmax=127, generator=self.generator)
        wp.code.copy_((wp.code.to(torch.int16) - g.to(torch.int16)).clamp_(-qmax, qmax).to(torch.int8))


# ---------------------------------------------------------------------------------------------------
# the integer program: the model's units replayed on IntT
# ---------------------------------------------------------------------------------------------------
def program(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's units, checked: every conv/linear NITI-quantized, no BatchNorm, no bias."""
    us = units(model)
    check_replayable(model, us, "method niti")
    for name, m in us:
        for sub_name, sub in ([(name, m)] if not is_residual(m) else
                              [(f"{name}.{n}", s) for n, s in m.named_modules() if n and not list(s.children())
                               or isinstance(s, (nn.Conv2d, nn.Linear))]):
            if isinstance(sub, (nn.Conv2d, nn.Linear)):
                if not isinstance(getattr(getattr(sub, "parametrizations", None), "weight", [None])[0], IntegerWeight):
                    raise ConfigError(f"method niti: layer '{sub_name}' is not NITI-quantized; every conv/linear must "
                                      "be (plan: weight {name: pow2int, bits: 8}, keep_first: false, keep_last: false)")
            elif isinstance(sub, nn.modules.batchnorm._BatchNorm):
                raise ConfigError(f"method niti: '{sub_name}' is a BatchNorm; NITI trains models without BN "
                                  "(model option batch_norm: false)")
            elif not isinstance(sub, ELEMENTWISE) and not is_residual(sub):
                if "parametrizations" in sub_name or "quantizer" in sub_name:
                    continue
                raise ConfigError(f"method niti: '{sub_name}' ({type(sub).__name__}) has no integer version; "
                                  "supported: Conv2d, Linear, ReLU, MaxPool2d, AdaptiveAvgPool2d(1), Flatten, "
                                  "Identity, Dropout, residual blocks")
            if isinstance(sub, nn.AdaptiveAvgPool2d) and sub.output_size not in (1, (1, 1)):
                raise ConfigError(f"method niti: '{sub_name}': only AdaptiveAvgPool2d(1) is supported")
    return us


def _wp(m: nn.Module) -> IntegerWeight:
    return m.parametrizations.weight[0]


def _forward(m: nn.Module, x: IntT, tape: list) -> IntT:
    if isinstance(m, nn.Conv2d):
        wp = _wp(m)
        tape.append(x)
        acc = intops.conv_forward(x.q, wp.code, _pair(m.stride), _pair(m.padding))
        return intops.renorm(acc, x.e + int(wp.exp))
    if isinstance(m, nn.Linear):
        wp = _wp(m)
        tape.append(x)
        return intops.renorm(intops.linear_forward(x.q, wp.code), x.e + int(wp.exp))
    if isinstance(m, nn.ReLU):
        mask = x.q > 0
        tape.append(mask)
        return IntT(x.q * mask, x.e)
    if isinstance(m, nn.MaxPool2d):
        q, idx = F.max_pool2d(x.q, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True)
        tape.append((idx, x.q.shape))
        return IntT(q, x.e)
    if isinstance(m, nn.AdaptiveAvgPool2d):
        hw = x.q.shape[-1] * x.q.shape[-2]
        s = x.q.to(torch.int32).sum((2, 3), keepdim=True)
        tape.append(x.q.shape)
        return IntT(torch.div(s + hw // 2, hw, rounding_mode="floor").clamp_(-127, 127).to(torch.int8), x.e)
    if isinstance(m, nn.Flatten):
        tape.append(x.q.shape)
        return IntT(x.q.flatten(m.start_dim, m.end_dim), x.e)
    if is_residual(m):
        sub: list = []
        out = _forward(m.conv1, x, sub)
        out = _forward(m.relu1, out, sub)
        out = _forward(m.conv2, out, sub)
        sc_tape: list = []
        sc = x
        for s_m in (m.shortcut if isinstance(m.shortcut, nn.Sequential) else [m.shortcut]):
            sc = _forward(s_m, sc, sc_tape)
        out = _forward(m.relu2, intops.align_add(out, sc), sub)
        tape.append((sub, sc_tape))
        return out
    tape.append(None)  # Identity, Dropout (NITI's dropout is left out: identity)
    return x


def _backward(m: nn.Module, err: IntT, saved, method: NITI, first: bool = False) -> IntT:
    if isinstance(m, nn.Conv2d):
        wp, x = _wp(m), saved
        s, p, k = _pair(m.stride), _pair(m.padding), m.kernel_size[0]
        out = None
        if not first:  # the first layer needs no input error
            out = intops.renorm(intops.conv_input_error(err.q, wp.code, x.q.shape, s, p), err.e + int(wp.exp))
        method.update(wp, intops.conv_weight_grad(x.q, err.q, k, s, p))
        return out
    if isinstance(m, nn.Linear):
        wp, x = _wp(m), saved
        out = None if first else intops.renorm(intops.linear_input_error(err.q, wp.code), err.e + int(wp.exp))
        method.update(wp, intops.linear_weight_grad(x.q, err.q))
        return out
    if isinstance(m, nn.ReLU):
        return IntT(err.q * saved, err.e)
    if isinstance(m, nn.MaxPool2d):
        idx, shape = saved
        n, c, h, w = shape
        g = torch.zeros((n, c, h * w), dtype=torch.int32, device=err.q.device)
        g.scatter_add_(2, idx.flatten(2), err.q.to(torch.int32).flatten(2))
        return intops.renorm(g.view(shape), err.e)
    if isinstance(m, nn.AdaptiveAvgPool2d):
        # the 1/HW of the mean is left out: a constant factor on every error below the pool, which no
        # update sees (each layer's gradient is renormalised to μ bits; both paths of a residual
        # block are below the pool, so their alignment is unchanged)
        return IntT(err.q.reshape(err.q.shape[0], -1, 1, 1).expand(saved).contiguous(), err.e)
    if isinstance(m, nn.Flatten):
        return IntT(err.q.reshape(saved), err.e)
    if is_residual(m):
        sub, sc_tape = saved
        e = _backward(m.relu2, err, sub.pop(), method)
        sc_err = e
        mods = list(m.shortcut) if isinstance(m.shortcut, nn.Sequential) else [m.shortcut]
        for s_m in reversed(mods):
            sc_err = _backward(s_m, sc_err, sc_tape.pop(), method, first=first)
        e = _backward(m.conv2, e, sub.pop(), method)
        e = _backward(m.relu1, e, sub.pop(), method)
        e = _backward(m.conv1, e, sub.pop(), method, first=first)
        return None if first else intops.align_add(e, sc_err)
    return err


@torch.no_grad()
def integer_forward(model: nn.Module, x: Tensor | IntT) -> IntT:
    """The integer network's logits (int8, exponent) for a float or integer batch."""
    xi = x if isinstance(x, IntT) else intops.from_float(x)
    h = xi
    tape: list = []
    for _, m in program(model):
        h = _forward(m, h, tape)
    return h


@torch.no_grad()
def integer_evaluate(model: nn.Module, batches) -> dict[str, float]:
    """Accuracy of the integer forward pass (what a NITI device runs) over ``batches``."""
    correct = n = 0
    for x, y in batches:
        out = integer_forward(model, x)
        correct += int((out.q.argmax(1) == y).sum())
        n += len(y)
    return {"acc": correct / n if n else float("nan"), "n": n}
