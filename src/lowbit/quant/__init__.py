"""Quantizers: finite value sets with straight-through gradients, built by name.

>>> from lowbit.quant import build_quantizer
>>> q = build_quantizer("sawb", bits=2)
"""

from .base import (
    Quantizer,
    build_quantizer,
    get_quantizer_class,
    grad_scale,
    list_quantizers,
    quantizer_options,
    register_quantizer,
    round_ste,
    ste,
)
from .binary import BWNQuantizer, FullPrecision, TWNQuantizer
from .bnn import BNNQuantizer
from .centroids import CentroidsQuantizer
from .lqnet import LQNetQuantizer
from .pow2int import Pow2IntQuantizer
from .qnn import QNNQuantizer
from .sat import SATQuantizer
from .uniform import (
    DoReFaQuantizer,
    LSQQuantizer,
    MinMaxQuantizer,
    PACTQuantizer,
    SAWBQuantizer,
    UniformActQuantizer,
    mse_optimal_alpha,
)
from .valueset import VALUE_SETS, PowerOfTwoQuantizer, ValueSetQuantizer, po2_values
from .wrpn import WRPNQuantizer

__all__ = [
    "Quantizer", "build_quantizer", "get_quantizer_class", "grad_scale", "list_quantizers",
    "quantizer_options", "register_quantizer", "round_ste", "ste",
    "BWNQuantizer", "TWNQuantizer", "FullPrecision", "MinMaxQuantizer", "UniformActQuantizer",
    "SAWBQuantizer", "LSQQuantizer", "PACTQuantizer", "DoReFaQuantizer", "mse_optimal_alpha",
    "ValueSetQuantizer", "PowerOfTwoQuantizer", "VALUE_SETS", "po2_values",
    "BNNQuantizer", "QNNQuantizer", "SATQuantizer", "LQNetQuantizer", "CentroidsQuantizer",
    "WRPNQuantizer",
]
