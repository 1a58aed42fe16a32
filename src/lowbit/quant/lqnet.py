"""LQ-Nets: learned quantization levels ``Bᵀv`` on a K-bit basis (002 ref. [10])."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Quantizer, register_quantizer
from .centroids import cluster_stats
from .functional import clipped_ste, keep_nan, nearest_index, ste, take_levels

_EPS = 1e-8
#: proximal weight of the least-squares step, relative to the mean diagonal of BᵀB (see ``qem_step``)
_PROX = 1e-9


def code_table(bits: int, signed: bool) -> Tensor:
    """All 2^K codes as rows: row j holds the binary digits of j (digit k = bit k), as {0, 1} or,
    signed, {-1, +1}. With the basis v_k = 2^k·s, row j's level is j·s (unsigned) or
    (2j - 2^K + 1)·s (signed), so the table is already in increasing order for that basis."""
    j = torch.arange(2**bits).unsqueeze(1)
    b = ((j >> torch.arange(bits)) & 1).float()
    return 2 * b - 1 if signed else b


@register_quantizer("lqnet")
class LQNetQuantizer(Quantizer):
    """LQ-Nets (Zhang, Yang, Ye, Hua, ECCV 2018; 002 ref. [10], the "LQ-Net" row of 002's W3A3
    table; METHODS.md "Learned centroids / LQ-Net").

    Levels ``q_j = b_jᵀ v`` for every code b_j ∈ {-1, 1}^K (weights) or {0, 1}^K (activations),
    K = bits; each entry maps to its nearest level (one batched ``searchsorted`` per call).

    * basis v: a buffer of shape (C, K), one row per output channel for weights
      (``per_channel``, the paper's choice and the default for weights), (1, K) per tensor for
      activations.
    * init (weights: first call, any mode; activations: first training-mode batch that is not all zeros,
      :meth:`~lowbit.quant.Quantizer.starts_on`): ``v_k = 2^k·s``, giving the uniform grid s·{±1, ±3, ...,
      ±(2^K - 1)} (weights) or s·{0, 1, ..., 2^K - 1} (activations), with
      s = E|w|/2^(K-1) per channel (K = 1: BWN's β = E|w|) or s = E[x | x > 0]/2^(K-1) per
      tensor (activations: negatives clip to the 0 level anyway). The top level is then about
      2·E|x|.
    * QEM update (training mode, every call; the paper's Algorithm 1): with the codes B (N×K) of
      the current nearest levels, ``v* = (BᵀB)⁻¹Bᵀx`` (least squares), then
      ``v <- (1 - m)·v + m·v*`` with m = ``momentum`` (0.1: the paper's moving average 0.9).
      ``qem_iters`` > 1 alternates codes and least squares that many times before the average.
      BᵀB and Bᵀx come from per-level counts and sums (one ``bincount``), and all channels are
      solved at once as a (C, K, K) batch. Guard: BᵀB is singular when the used codes do not span
      R^K (e.g. only the outermost levels are used); the step solves the proximal problem
      ``min ||Bv - x||² + λ||v - v_old||²`` with λ = 1e-9·mean diag(BᵀB), which equals least
      squares where BᵀB is invertible and keeps the old v along the directions the data does
      not determine.
    * the output of a call uses the basis from before that call's update.
    * backward: straight-through, identity for weights; clipped to [min level, max level]
      (= [0, max level] while v >= 0) for activations.
    """

    roles = ("weight", "act")
    supports_per_channel = True

    def __init__(self, bits: int, role: str = "weight", per_channel: bool | None = None,
                 momentum: float = 0.1, qem_iters: int = 1):
        per_channel = (role == "weight") if per_channel is None else bool(per_channel)
        if per_channel and role == "act":
            raise ConfigError("quantizer 'lqnet' has per_channel only for weights")
        super().__init__(bits, role, per_channel)
        if not 0.0 < momentum <= 1.0:
            raise ConfigError(f"lqnet option momentum must be in (0, 1], got {momentum}")
        if isinstance(qem_iters, bool) or not isinstance(qem_iters, int) or qem_iters < 1:
            raise ConfigError(f"lqnet option qem_iters must be an integer >= 1, got {qem_iters!r}")
        self.momentum = float(momentum)
        self.qem_iters = qem_iters
        self.register_buffer("table", None, persistent=False)
        self.register_buffer("basis", None)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._bits_changed()

    def _bits_changed(self) -> None:
        """A K-bit code table and an empty basis: the basis has K entries, so it is initialised
        again from the data on the next call (``set_bits``)."""
        dev = self.initialized.device
        self.scales_per_row = self.bits  # the K basis numbers of each row; the codes are the K bits
        self.table = code_table(self.bits, signed=self.role == "weight").to(dev)
        self.basis = torch.zeros(1, self.bits, device=dev)  # (rows, K); rows = C once initialised
        self.initialized.fill_(False)
        self._init_seen = False

    # -- state -------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the per-channel basis has one row per output channel: adopt its shape before the copy
        key = prefix + "basis"
        if key in state_dict and state_dict[key].shape != self.basis.shape:
            if state_dict[key].shape[-1] != self.basis.shape[-1]:  # K basis values = the bits it was saved at
                raise ConfigError(f"{prefix or 'lqnet '}basis: saved at {state_dict[key].shape[-1]} bits, this "
                                  f"quantizer has {self.basis.shape[-1]}: set_bits({state_dict[key].shape[-1]}) "
                                  "before loading")
            self.basis = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _rows(self, x: Tensor) -> Tensor:
        d = x.detach()
        return d.flatten(1) if self.per_channel else d.reshape(1, -1)

    @torch.no_grad()
    def init_basis(self, rows: Tensor) -> None:
        if self.role == "weight":
            m = rows.abs().mean(1)
        else:
            pos = rows.clamp_min(0)
            m = pos.sum(1) / (pos > 0).sum(1).clamp_min(1)
        s = m.clamp_min(_EPS) / 2 ** (self.bits - 1)
        self.basis = s.unsqueeze(1) * 2.0 ** torch.arange(self.bits, dtype=s.dtype, device=s.device)
        self.initialized.fill_(True)

    def sorted_levels(self, basis: Tensor) -> tuple[Tensor, Tensor]:
        """(levels, perm): the levels Bᵀv of each row in increasing order, (R, 2^K), and the code
        index behind each, so ``table[perm]`` are the codes in that order."""
        return (basis @ self.table.to(basis.dtype).T).sort(dim=1)

    # -- QEM ---------------------------------------------------------------------------------
    @torch.no_grad()
    def qem_step(self, rows: Tensor, idx: Tensor, perm: Tensor) -> None:
        """Least-squares basis for the assignment ``idx`` (into levels ordered by ``perm``),
        ``qem_iters`` times, then the moving average into ``self.basis``."""
        n_levels = self.table.shape[0]
        old = self.basis.double()
        v = old
        eye = torch.eye(self.bits, dtype=torch.float64, device=old.device)
        for it in range(self.qem_iters):
            if it > 0:  # re-assign the codes with the basis of the previous iteration
                lv, perm = self.sorted_levels(v)
                idx = nearest_index(rows, lv.to(rows.dtype))
            count, total = cluster_stats(rows, idx, n_levels)
            codes = self.table.double()[perm]  # (R, L, K): the code of each sorted level
            btb = torch.einsum("rl,rlk,rlm->rkm", count, codes, codes)
            btx = torch.einsum("rl,rlk->rk", total, codes)
            lam = _PROX * btb.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1.0)
            a = btb + lam[:, None, None] * eye
            v = torch.linalg.solve(a, (btx + lam[:, None] * v).unsqueeze(-1)).squeeze(-1)
        self.basis.copy_(old.lerp(v, self.momentum))

    # -- forward -----------------------------------------------------------------------------
    def quantize(self, x: Tensor) -> Tensor:
        rows = self._rows(x)
        if not self.is_initialized() and self.starts_on(x):
            self.init_basis(rows)
        lv, perm = self.sorted_levels(self.basis.to(x.dtype))
        self.record_levels(lv if self.per_channel else lv[0])
        idx = nearest_index(rows, lv)
        q = keep_nan(take_levels(lv, idx).reshape(x.shape), x)
        if self.training:
            self.qem_step(rows, idx, perm)
        if self.role == "weight":
            return ste(x, q)
        return clipped_ste(x, q, lv[0, 0], lv[0, -1])
