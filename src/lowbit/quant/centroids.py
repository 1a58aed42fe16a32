"""Learned scalar codebooks: 002's "Scalar centroids" (k-means levels per layer), and the cluster
statistics it shares with LQ-Net (``lqnet.py``); the nearest-level search is
:func:`lowbit.quant.functional.nearest_index`."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Quantizer, register_quantizer
from .functional import clipped_ste, keep_nan, nearest_index, ste, take_levels

#: torch.quantile's input limit; larger tensors are subsampled with a stride for the init
_QUANTILE_MAX = 2**24 - 1


# ---------------------------------------------------------------------------------------------
# cluster statistics, shared with LQ-Net (run on every activation of every step: a few passes)
# ---------------------------------------------------------------------------------------------
def cluster_stats(rows: Tensor, idx: Tensor, n_levels: int) -> tuple[Tensor, Tensor]:
    """(count, sum) of the entries of each row assigned to each level: two (R, L) float64 tensors.

    Two ``bincount`` s over ``row·L + idx`` (linear in the entries, no (N, L) one-hot); the sums
    accumulate in the dtype of ``rows`` (float32: relative error ~1e-5 on 10^6 entries, far
    below what a moving average notices)."""
    r = rows.shape[0]
    flat = idx.reshape(-1) if r == 1 else (idx.long() + torch.arange(r, device=idx.device)[:, None] * n_levels).reshape(-1)
    count = torch.bincount(flat, minlength=r * n_levels).reshape(r, n_levels).double()
    total = torch.bincount(flat, weights=rows.reshape(-1), minlength=r * n_levels)
    return count, total.reshape(r, n_levels).double()


# ---------------------------------------------------------------------------------------------
# scalar centroids
# ---------------------------------------------------------------------------------------------
@register_quantizer("centroids")
class CentroidsQuantizer(Quantizer):
    """Learned scalar codebook per layer (002's "Scalar centroids": "any centroids" /
    "learnt discretization set" in its list of QAT approaches; the "Scalar centroids" row of the
    W3A3 table; METHODS.md "Learned centroids").

    ``Q(x) = c_j`` with ``j = argmin_i |x - c_i|`` over 2^k centroids c (one codebook per tensor).

    * init (weights: first call, any mode; activations: first training-mode batch that is not all zeros,
      :meth:`~lowbit.quant.Quantizer.starts_on`): ``c_i`` = the ((i + 1/2)/2^k)-quantile (linear interpolation,
      numpy's default) of the tensor's *distinct* values, i = 0..2^k-1. Distinct values rather than
      all entries so that a point mass (the zeros after a ReLU) cannot give duplicate centroids;
      for continuous weights the two are the same.
    * update (training mode, every call): one k-means (Lloyd) step as a moving average,
      ``c_i <- (1 - m)·c_i + m·mean{x : x assigned to c_i}`` with m = ``momentum`` (0.1), an
      empty cluster keeps its value. The output of a call uses the codebook from before that
      call's update; the update shows from the next call (so one nearest search serves both).
    * backward: straight-through, identity for weights; clipped to [min c, max c] for activations.

    The codebook is a buffer (``centroids``), so ``state_dict`` round-trips it; it is stored next to
    the k-bit codes (``scales_per_row = 2^k``).
    """

    roles = ("weight", "act")

    def __init__(self, bits: int, role: str = "weight", momentum: float = 0.1):
        super().__init__(bits, role)
        if not 0.0 < momentum <= 1.0:
            raise ConfigError(f"centroids option momentum must be in (0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.register_buffer("centroids", None)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._bits_changed()

    def _bits_changed(self) -> None:
        """An empty codebook of 2^bits entries, initialised again from the data on the next call."""
        self.scales_per_row = 2**self.bits  # the codebook is stored next to the k-bit codes
        self.centroids = torch.zeros(2**self.bits, device=self.initialized.device)
        self.initialized.fill_(False)
        self._init_seen = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # 2^bits centroids: a codebook saved at other bits is a one-line error, as LQ-Net's basis (it was torch's
        # multi-line "size mismatch" RuntimeError)
        key = prefix + "centroids"
        if key in state_dict and state_dict[key].shape != self.centroids.shape:
            n = state_dict[key].numel()
            saved = f"{n.bit_length() - 1} bits" if n & (n - 1) == 0 else f"{n} entries"
            raise ConfigError(f"{prefix}centroids: saved at {saved}, this quantizer has {self.bits}: "
                              f"set_bits({n.bit_length() - 1}) before loading")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def init_centroids(self, x: Tensor) -> None:
        flat = x.detach().reshape(-1)
        if flat.numel() > _QUANTILE_MAX:
            flat = flat[:: flat.numel() // _QUANTILE_MAX + 1]
        vals = torch.unique(flat).double()  # sorted distinct values
        p = (torch.arange(2**self.bits, dtype=torch.float64, device=vals.device) + 0.5) / 2**self.bits
        self.centroids.copy_(torch.quantile(vals, p))
        self.initialized.fill_(True)

    @torch.no_grad()
    def kmeans_step(self, rows: Tensor, idx: Tensor) -> None:
        """The moving-average Lloyd step on the assignment ``idx`` of ``rows`` (1, N)."""
        count, total = cluster_stats(rows, idx, 2**self.bits)
        count, total = count[0], total[0]
        used = count > 0
        mean = torch.where(used, total / count.clamp_min(1), self.centroids.double())
        new = self.centroids.double().lerp(mean, self.momentum)
        # a Lloyd step keeps the order (each centroid stays inside its own cell); sort for safety
        self.centroids.copy_(new.sort().values)

    def quantize(self, x: Tensor) -> Tensor:
        if not self.is_initialized() and self.starts_on(x):
            self.init_centroids(x)
        c = self.centroids.to(x.dtype, copy=True)  # a copy: the update below is in place
        self.record_levels(c)
        rows = x.detach().reshape(1, -1)
        idx = nearest_index(rows, c.reshape(1, -1))
        q = keep_nan(take_levels(c.reshape(1, -1), idx).reshape(x.shape), x)
        if self.training:
            self.kmeans_step(rows, idx)
        if self.role == "weight":
            return ste(x, q)
        return clipped_ste(x, q, c[0], c[-1])
