"""BatchNorm folding.

In eval mode a BatchNorm is the per-channel affine map

    BN(y) = γ (y - μ) / sqrt(σ² + ε) + β = g·y + h,   g = γ / sqrt(σ² + ε),   h = β - g·μ

(Ioffe & Szegedy 2015, Alg. 2). After a convolution ``y = W * x + b`` it can be folded into the
convolution, ``W' = g·W`` (row ``o`` scaled by ``g[o]``) and ``b' = g·b + h``, which removes the
BN at no cost. That is only allowed when the weight may change value: for a full-precision layer
it may. For a quantized layer ``g·W`` leaves the value set (a 2-bit SAWB filter scaled by ``g[o]``
is no longer on the layer's 4 levels, and different filters would need different level sets), so
there the BN stays as the per-channel affine ``g, h`` applied to the integer accumulator result:
it merges into the per-channel float rescale the integer path needs anyway (see
:mod:`lowbit.export.numpy_ref`).

Folding is computed in float64 and rounded to float32 once.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from ..errors import ConfigError


def bn_affine(bn: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """``(g, h)`` of an eval-mode BatchNorm (float64): ``BN(y) = g·y + h`` per channel."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise ConfigError(f"expected a BatchNorm module, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ConfigError("BatchNorm without running statistics (track_running_stats=False) cannot be exported")
    mean = bn.running_mean.detach().double().cpu().numpy()
    var = bn.running_var.detach().double().cpu().numpy()
    gamma = bn.weight.detach().double().cpu().numpy() if bn.weight is not None else np.ones_like(mean)
    beta = bn.bias.detach().double().cpu().numpy() if bn.bias is not None else np.zeros_like(mean)
    g = gamma / np.sqrt(var + bn.eps)
    return g, beta - g * mean


def fold_bn(weight: np.ndarray, bias: np.ndarray | None, bn: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``bn`` into a full-precision conv/linear: ``(W', b') = (g·W, g·b + h)``, float32."""
    g, h = bn_affine(bn)
    w = np.asarray(weight, dtype=np.float64)
    if w.shape[0] != g.shape[0]:
        raise ConfigError(f"BatchNorm of {g.shape[0]} channels after a layer with {w.shape[0]} outputs")
    b = np.zeros_like(g) if bias is None else np.asarray(bias, dtype=np.float64)
    w_f = w * g.reshape((-1,) + (1,) * (w.ndim - 1))
    return w_f.astype(np.float32), (g * b + h).astype(np.float32)
