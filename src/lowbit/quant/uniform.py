"""Uniform-grid quantizers: min-max, SAWB, LSQ, PACT, DoReFa and the running-range activation one.

Every quantizer here maps onto ``2**bits`` evenly spaced levels ``low + i*step``. They differ in
how ``low`` and ``step`` are chosen (tensor statistics, a fitted closed form, a learned step or
clip) and in the gradient they define for those choices.

The activation path runs on every training step over large tensors, so its forward and backward
are written as single ``autograd.Function`` s (:mod:`lowbit.quant.functional`) instead of
chains of small ops; their gradients are tested against the formulas in the docstrings.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from . import native
from .base import Quantizer, register_quantizer
from .functional import (  # noqa: F401 (re-exported: lowbit.quant.uniform.clip_round etc.)
    _EPS,
    _bounds,
    _ClipRound,
    _codes_to_values,
    _LSQFn,
    batch_aminmax,
    channel_view,
    clip_round,
    clip_round_levels,
    grid_levels,
    lsq_quantize,
    round_ste,
    ste,
)


# ---------------------------------------------------------------------------------------------
# min-max (003 A.1 eq. 10, 13)
# ---------------------------------------------------------------------------------------------
@register_quantizer("minmax")
class MinMaxQuantizer(Quantizer):
    """Min-max quantization (003 appendix A.1, eq. 10 and 13; Nikolić et al. 2020).

    ``q_i = x_min + (i-1)(x_max - x_min)/(2^n - 1)``, i = 1..2^n, and x maps to the nearest q_i.

    * weights: x_min, x_max are the tensor's (or each output channel's) min and max, recomputed
      on every call; the gradient is straight-through (the range is treated as a constant).
    * activations: x_min, x_max are running averages (``momentum``) of the batch min/max,
      updated in training mode and frozen in eval mode; values outside are clipped and get no
      gradient (clipped STE).
    """

    roles = ("weight", "act")
    supports_per_channel = True

    def __init__(self, bits: int, role: str = "weight", per_channel: bool = False, momentum: float = 0.1):
        super().__init__(bits, role, per_channel and role == "weight")
        if per_channel and role == "act":
            raise ConfigError("quantizer 'minmax' has per_channel only for weights")
        self.momentum = float(momentum)
        if not 0.0 < self.momentum <= 1.0:  # NaN too; outside (0, 1] the running range left the data (-0.5: below it)
            raise ConfigError(f"{self.alias} option momentum must be in (0, 1], got {momentum}")
        if role == "act":
            self.register_buffer("running_min", torch.zeros(()))
            self.register_buffer("running_max", torch.zeros(()))
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def _range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.role == "weight":
            d = x.detach()
            if self.per_channel:
                f = d.flatten(1)
                return channel_view(f.min(1).values, x), channel_view(f.max(1).values, x)
            return d.min(), d.max()
        if self.training:
            lo, hi = batch_aminmax(x, self.running_min.dtype)  # computed once per mixture of min-max members
            if not self.is_initialized():
                if self.starts_on(x):
                    self.running_min.copy_(lo)
                    self.running_max.copy_(hi)
                    self.initialized.fill_(True)
            else:
                self.running_min.lerp_(lo, self.momentum)
                self.running_max.lerp_(hi, self.momentum)
        return self.running_min, self.running_max

    def quantize(self, x: Tensor) -> Tensor:
        lo, hi = self._range(x)
        if self.role == "weight":  # the range covers the tensor: plain STE, no clipping needed
            self._clip_range = (lo, hi)
            self.record_levels(clip_round_levels(lo, hi, self.bits, self.per_channel))
            lo_, _, step = _bounds(lo, hi, 2**self.bits - 1)
            return ste(x, _codes_to_values(torch.round((x.detach() - lo_) / step), lo_, step))
        return self.clip_round(x, lo, hi)


@register_quantizer("uniform")
class UniformActQuantizer(MinMaxQuantizer):
    """Unsigned uniform activation quantizer on [0, r] (QNN-style, for post-ReLU inputs).

    ``q = round(clip(x, 0, r) / Δ) Δ``, Δ = r/(2^n - 1); r is a running average of the batch
    maximum (``momentum``), frozen in eval mode. Clipped straight-through gradient.
    """

    roles = ("act",)
    supports_per_channel = False
    scales_per_row = 1  # r: the low end is 0

    def __init__(self, bits: int, role: str = "act", momentum: float = 0.1):
        super().__init__(bits, role, False, momentum)

    def starts_on(self, x: Tensor) -> bool:
        """Only on a batch with a positive value: r is a maximum over post-ReLU inputs. Before session 25 an
        all-negative first batch made r negative, and every output, positive inputs included, was r (off the
        level set)."""
        return self.training and bool(x.detach().gt(0).any())

    def _range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _, hi = super()._range(x)
        return torch.zeros_like(hi), hi.clamp_min(0)


# ---------------------------------------------------------------------------------------------
# SAWB (003 eq. 11-12; Choi et al. 2018)
# ---------------------------------------------------------------------------------------------
#: SAWB's fitted constants: alpha = c1*sqrt(E[w^2]) + c2*E|w| (Choi et al. 2018, per bit width)
SAWB_COEFFS = {2: (3.12, -2.064), 3: (7.509, -6.892), 4: (12.68, -12.80), 5: (17.74, -18.64), 8: (31.76, -35.04)}
#: bit widths where ``alpha="auto"`` uses the closed form: on Kaiming-initialised conv weights its
#: MSE is within a few % of eq. 12's minimum at 2-4 bits, but at 5 bits per channel and at 8 bits
#: it is far worse than the minimum (and than min-max), and it is not positive when E|w|/rms(w)
#: exceeds -c1/c2 (0.906 at 8 bits, 0.952 at 5): numbers in docs/issue11_quant_contract.md
SAWB_CLOSED_FORM_BITS = (2, 3, 4)


def _sym_mse(rows: Tensor, a: Tensor, n: int) -> Tensor:
    """E(x - Q(x; alpha))^2 per row of ``rows`` (R, N) on the symmetric grid -a + k*2a/n, a (R, 1)."""
    step = 2 * a / n
    q = torch.clamp(rows, -a, a).add(a).div(step).round().mul(step).sub(a)
    return (q - rows).pow(2).mean(1, keepdim=True)


#: elements (rows x candidates x columns) per batched pass of :func:`_sq_err_sums`: bounds memory
_MSE_CHUNK = 1 << 16


def _sq_err_sums(rows: Tensor, a: Tensor, n: int) -> Tensor:
    """Sum over each row of (x - Q(x; alpha))^2 for C candidate alphas per row at once: (R, C).

    Same grid as :func:`_sym_mse`, computed in the scaled space ``v = x*n/(2a)`` where the levels are
    the half-integers in [-n/2, n/2] (n odd): ``Q = floor(clamp(v, -n/2, n/2)) + 1/2``. Evaluated in
    column chunks of ``_MSE_CHUNK`` elements into two reused buffers.
    """
    R, N = rows.shape
    if a.dtype == rows.dtype and native.active(rows):  # one native pass per candidate (the same float32 ops)
        return native.sq_err_sums(rows, a, n)
    s = (n / 2) / a
    h = n / 2
    out = torch.zeros_like(a)
    m = min(N, max(1, _MSE_CHUNK // max(1, a.numel())))
    v, f = rows.new_empty(R, a.shape[1], m), rows.new_empty(R, a.shape[1], m)
    for j in range(0, N, m):
        k = min(m, N - j)
        vv, ff = (v, f) if k == m else (v[:, :, :k], f[:, :, :k])
        torch.mul(rows[:, None, j:j + k], s[:, :, None], out=vv)
        torch.clamp(vv, -h, h, out=ff).floor_()
        vv.sub_(ff).sub_(0.5)
        out += torch.linalg.vecdot(vv, vv)
    return out / (s * s)


def _mse_alpha_rows(rows: Tensor, bits: int, grid: int = 16, refine: int = 2) -> Tensor:
    """argmin_alpha of the quantization MSE per row, coarse to fine: (R, 1).

    First alpha = max|x|*k/grid, k = 1..grid; then ``refine`` times, with d the current spacing,
    best ± d/4·{1, 2, 3} (kept within (0, max|x|]), so the spacing shrinks 4x per round (default:
    16 + 6 + 6 = 28 candidates, final spacing max|x|/256). Candidates of one round are evaluated
    in one batched pass; ties keep the earlier (smaller, then coarser) alpha. Deterministic.
    """
    with torch.no_grad():
        rows = rows.detach() if rows.is_floating_point() else rows.detach().float()
        n = 2**bits - 1
        if native.active(rows):  # the same steps in one native call (the error sums as _sq_err_sums's)
            return native.mse_alpha_rows(rows, n, grid, refine, _EPS)
        amax = rows.abs().max(1, keepdim=True).values.clamp_min(_EPS)
        cand = amax * (torch.arange(1, grid + 1, dtype=amax.dtype, device=amax.device) / grid)
        err = _sq_err_sums(rows, cand, n)
        i = err.argmin(1, keepdim=True)  # first minimum: the smallest alpha on ties
        best_err, best = err.gather(1, i), cand.gather(1, i)
        off = torch.tensor([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0], dtype=amax.dtype, device=amax.device)
        d = amax / grid
        for _ in range(refine):
            d = d / 4
            cand = best + d * off
            cand = torch.where((cand > 0) & (cand <= amax), cand, best)
            err = _sq_err_sums(rows, cand, n)
            i = err.argmin(1, keepdim=True)
            e = err.gather(1, i)
            better = e < best_err
            best_err = torch.where(better, e, best_err)
            best = torch.where(better, cand.gather(1, i), best)
        return best


def mse_optimal_alpha(x: Tensor, bits: int, per_channel: bool, grid: int = 16, refine: int = 2) -> Tensor:
    """argmin_alpha E||x - Q(x; n, alpha)||^2 for alpha in (0, max|x|] (003 eq. 12), per tensor or row.

    Coarse-to-fine search (:func:`_mse_alpha_rows`): ``grid`` uniform points, then ``refine``
    rounds of 6 points each, 4x finer (default 28 quantize+error evaluations, batched; final
    spacing max|x|/256). It assumes the MSE is near-unimodal around the coarse minimum; on
    Kaiming-initialised weights its MSE is within 0.5 % of (usually below) an exhaustive 64-point
    grid's, per tensor; single short rows can land on another local minimum.
    """
    d = x.detach()
    best = _mse_alpha_rows(d.flatten(1) if per_channel else d.reshape(1, -1), bits, grid, refine)
    return channel_view(best.squeeze(1), d) if per_channel else best.reshape(())


@register_quantizer("sawb")
class SAWBQuantizer(Quantizer):
    """Statistics-Aware Weight Binning (003 appendix A.1 eq. 11-12; Choi et al. 2018).

    Symmetric uniform levels ``q_i = -α + (i-1)·2α/(2^n - 1)``. α minimises the quantization MSE
    (eq. 12). ``alpha="closed_form"`` uses SAWB's fit ``α = c1·sqrt(E[w²]) + c2·E|w|`` (constants
    for 2, 3, 4, 5, 8 bits); ``alpha="mse"`` minimises eq. 12 numerically (:func:`mse_optimal_alpha`, any bits).
    The default, ``"auto"``, uses the closed form at 2-4 bits (:data:`SAWB_CLOSED_FORM_BITS`) and
    the grid otherwise. Where the closed form is not positive (E|w|/rms(w) >= -c1/c2: small rows),
    or, in ``auto``, gives a larger MSE than ``α = max|w|``, that row uses the grid's α instead
    (the closed form is only a fit of eq. 12's minimiser). Values beyond ±α are clipped (their
    gradient is zero: clipped STE).
    """

    supports_per_channel = True
    scales_per_row = 1

    def __init__(self, bits: int, role: str = "weight", per_channel: bool = False, alpha: str = "auto"):
        super().__init__(bits, role, per_channel)
        if alpha not in ("auto", "closed_form", "mse"):
            raise ConfigError(f"sawb option alpha must be auto, closed_form or mse, got '{alpha}'")
        if alpha == "closed_form" and bits not in SAWB_COEFFS:
            raise ConfigError(
                f"sawb closed-form constants exist for bits {sorted(SAWB_COEFFS)}, not {bits}; use alpha=mse"
            )
        self.alpha_mode = alpha

    def alpha(self, x: Tensor) -> Tensor:
        d = x.detach()
        # at least half the steps of one _EPS step: below it clip_round would raise the step to _EPS and its grid
        # would leave [-α, α] (an all-zero weight row, per channel), no longer symmetric
        floor = _EPS * (2**self.bits - 1) / 2
        closed = self.alpha_mode == "closed_form" or (self.alpha_mode == "auto" and self.bits in SAWB_CLOSED_FORM_BITS)
        if not closed:
            return mse_optimal_alpha(x, self.bits, self.per_channel).clamp_min(floor)
        rows = d.flatten(1) if self.per_channel else d.reshape(1, -1)
        c1, c2 = SAWB_COEFFS[self.bits]
        n = 2**self.bits - 1
        if native.active(rows):  # the same steps in two native passes (moments, then the two MSEs)
            a, bad = native.sawb_closed(rows, c1, c2, n, self.alpha_mode == "auto", _EPS)
        else:
            a = c1 * rows.pow(2).mean(1, keepdim=True).sqrt() + c2 * rows.abs().mean(1, keepdim=True)
            bad = a <= 0
            if self.alpha_mode == "auto":
                bad |= _sym_mse(rows, a.clamp_min(_EPS), n) > _sym_mse(rows, rows.abs().max(1, keepdim=True).values, n)
        if bool(bad.any()):  # rare at 2-4 bits: the grid search only when some row needs it
            a = torch.where(bad, _mse_alpha_rows(rows, self.bits), a)
        a = a.clamp_min(floor)
        return channel_view(a.squeeze(1), d) if self.per_channel else a.reshape(())

    def quantize(self, x: Tensor) -> Tensor:
        a = self.alpha(x)
        return self.clip_round(x, -a, a)

    def _bits_changed(self) -> None:
        if self.alpha_mode == "closed_form" and self.bits not in SAWB_COEFFS:
            raise ConfigError(f"sawb closed-form constants exist for bits {sorted(SAWB_COEFFS)}, not {self.bits}")


# ---------------------------------------------------------------------------------------------
# LSQ (Esser et al. 2020)
# ---------------------------------------------------------------------------------------------
@register_quantizer("lsq")
class LSQQuantizer(Quantizer):
    """Learned Step Size Quantization (Esser et al. 2020).

    ``v̂ = round(clamp(v/s, -Qn, Qp))·s`` with a learned step ``s``. Weights are signed
    (Qn = 2^(b-1), Qp = 2^(b-1) - 1, so b >= 2); activations unsigned (Qn = 0, Qp = 2^b - 1)
    unless ``signed=True``. The gradient of ``s`` is scaled by 1/sqrt(N·Qp), N = elements of the
    weight tensor (per channel: of one channel) or features per sample for activations.
    ``s`` is initialised on the first training call: ``init="lsq"`` (the paper's) 2·mean|v|/sqrt(Qp);
    ``init="max"`` max|v|/Qp (the whole first batch, or channel, on the grid). The paper's init
    suits 2-4 bits; at 8 bits it puts the grid's ends at about 18 standard deviations of a normal
    tensor (step 0.14σ, most codes unused), which the step's scaled gradient barely moves in a short
    run; ``max`` uses the codes on the values there are, but its small step moves fast under the
    step's gradient (integer mode's ``plan.integer_init``; docs/export.md).
    """

    roles = ("weight", "act")
    supports_per_channel = True

    def __init__(self, bits: int, role: str = "weight", per_channel: bool = False, signed: bool | None = None,
                 init: str = "lsq"):
        super().__init__(bits, role, per_channel)
        if per_channel and role == "act":
            raise ConfigError("quantizer 'lsq' has per_channel only for weights")
        if init not in ("lsq", "max"):
            raise ConfigError(f"lsq option init must be 'lsq' or 'max', got {init!r}")
        self.init = init
        self.signed = (role == "weight") if signed is None else bool(signed)
        self._bits_changed()
        self.step = nn.Parameter(torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def _bits_changed(self) -> None:
        """Qn, Qp for ``bits`` (the learned step is kept)."""
        if self.signed and self.bits < 2:
            raise ConfigError("quantizer 'lsq' needs bits >= 2 when signed (weights, or signed: true); for 1-bit "
                              "weights use bwn")
        b = self.bits
        self.qn, self.qp = (2 ** (b - 1), 2 ** (b - 1) - 1) if self.signed else (0, 2**b - 1)

    def grid(self):
        s = self._last_levels[..., self.qn + 1].reshape(-1).float().cpu()  # level Qn + 1 is s exactly
        rule = "mul_clip" if self.step.numel() == 1 else None  # per channel: v/s, not v·(1/s)
        return torch.zeros_like(s), s, -self.qn, self.qp, rule

    def _init_step(self, x: Tensor) -> None:
        d = x.detach().abs()
        if self.per_channel:
            a = d.flatten(1)
            s = a.amax(1) / self.qp if self.init == "max" else 2 * a.mean(1) / math.sqrt(self.qp)
            self.step.data = channel_view(s, x.detach()).clamp_min(_EPS).clone()
        else:
            s = d.max() / self.qp if self.init == "max" else 2 * d.mean() / math.sqrt(self.qp)
            self.step.data = s.clamp_min(_EPS).reshape(())
        self.initialized.fill_(True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a per-channel step has the shape of the channels: adopt it before the copy
        key = prefix + "step"
        if key in state_dict and state_dict[key].shape != self.step.shape:
            self.step.data = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def quantize(self, x: Tensor) -> Tensor:
        if not self.is_initialized() and self.starts_on(x):
            self._init_step(x)
        n = x.numel() // x.shape[0] if (self.role == "act" or self.per_channel) else x.numel()
        gscale = 1.0 / math.sqrt(n * self.qp)
        s = self.step.abs() + _EPS  # |s| keeps the step positive whatever the optimizer does
        k = torch.arange(-self.qn, self.qp + 1, dtype=x.dtype, device=s.device)
        sd = s.detach().to(x.dtype)
        self.record_levels(k * sd.reshape(-1, 1) if self.per_channel else k * sd)
        return lsq_quantize(x, s, self.qn, self.qp, gscale)

    @property
    def n_scales(self) -> int:
        return self.step.numel()


# ---------------------------------------------------------------------------------------------
# PACT (Choi et al. 2018)
# ---------------------------------------------------------------------------------------------
@register_quantizer("pact")
class PACTQuantizer(Quantizer):
    """PACT activation quantizer (Choi et al. 2018).

    ``y = clip(x, 0, α)``, quantized on the grid α/(2^k - 1): ``y_q = round(y·(2^k-1)/α)·α/(2^k-1)``.
    α is learned, ∂y_q/∂α = 1[x > α] and ∂y_q/∂x = 1[0 <= x <= α] (straight-through round).
    ``init`` is α's initial value (the PACT paper uses 10; 6-10 is common). Weight decay on α comes
    from the optimizer (PACT's L2 on α).
    """

    roles = ("act",)

    def __init__(self, bits: int, role: str = "act", init: float = 6.0):
        super().__init__(bits, role)
        if not 0 < init < float("inf"):  # NaN and inf too: every output was NaN
            raise ConfigError(f"pact option init must be > 0 and finite, got {init}")
        self.alpha = nn.Parameter(torch.tensor(float(init)))

    def quantize(self, x: Tensor) -> Tensor:
        a = self.alpha.abs() + _EPS
        return self.clip_round(x, torch.zeros((), dtype=x.dtype, device=x.device), a)

    @property
    def n_scales(self) -> int:
        return 1


# ---------------------------------------------------------------------------------------------
# DoReFa (Zhou et al. 2016)
# ---------------------------------------------------------------------------------------------
@register_quantizer("dorefa")
class DoReFaQuantizer(Quantizer):
    """DoReFa-Net quantizers (Zhou et al. 2016).

    Q_k(r) = round((2^k - 1)·r)/(2^k - 1) on r in [0, 1].

    * weights, k >= 2: ``w_q = 2·Q_k(tanh(w)/(2·max|tanh(w)|) + 1/2) - 1`` (levels evenly spaced
      in [-1, 1]); the gradient flows through tanh and the max, straight-through the round.
    * weights, k = 1: ``w_q = E|w|·sign(w)`` (the paper's binary case).
    * activations: ``Q_k(clip(x, 0, 1))`` with a clipped straight-through gradient.
    """

    roles = ("weight", "act")

    def quantize(self, x: Tensor) -> Tensor:
        n = 2**self.bits - 1
        if self.role == "act":
            zero = torch.zeros((), dtype=x.dtype, device=x.device)
            return self.clip_round(x, zero, zero + 1)
        if self.bits == 1:
            beta = x.detach().abs().mean()
            self.record_levels(torch.stack([-beta, beta]))
            return ste(x, torch.where(x.detach() >= 0, beta, -beta))
        t = torch.tanh(x)
        r = t / (2 * t.abs().max().clamp_min(_EPS)) + 0.5
        self.record_levels(2 * (torch.arange(n + 1, dtype=x.dtype, device=x.device) / n) - 1)  # as below: exact
        return 2 * (round_ste(r * n) / n) - 1

    def domain(self, x: Tensor) -> Tensor:
        """The real value this quantizer rounds, in the units of its levels (2r - 1, r the
        tanh-normalised weight in [0, 1]): SinReQ's regulariser reads it (lowbit.methods.sinreq)."""
        t = torch.tanh(x)
        return t / t.abs().max().clamp_min(_EPS)

    @property
    def n_scales(self) -> int:
        # activations: the fixed grid [0, 1] stores nothing; weights: [-1, 1] likewise, 1 bit: E|w|
        return 1 if (self.role == "weight" and self.bits == 1) else 0

    def rule(self) -> str | None:
        return None if self.role == "weight" and self.bits > 1 else "nearest"  # tanh-normalised / sign

    def grid(self):
        if self.role == "weight" and self.bits > 1:  # levels 2k/n - 1
            n = 2**self.bits - 1
            return torch.full((1,), -1.0), torch.full((1,), 2.0 / n), 0, n, None
        return super().grid()
