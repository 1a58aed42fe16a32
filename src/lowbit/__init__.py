"""lowbit: training low-bit (1-8 bit) quantized CNNs for edge devices.

    >>> import lowbit
    >>> model = lowbit.create_model("resnet8", in_channels=1, num_classes=10, image_size=28)
    >>> lowbit.quantize(model, {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}})

Then ``lowbit.fit(model, batches, epochs=3)`` and ``lowbit.evaluate(model, batches)`` from Python
(no files), or ``lowbit.run(config, run_dir)`` for a run folder.

The names below are imported on first use (PEP 562), so that ``import lowbit.cli`` (``lowbit --help``,
argument errors) answers without importing torch.
"""

import sys
from importlib import import_module
from types import ModuleType

from .errors import ConfigError, DataError, LowbitError, TrainingDiverged

__version__ = "0.1.0"

_LAZY = {
    "Config": ".config", "FreezeBatchNorm": ".fit", "load_config": ".config", "load_dataset": ".data",
    "evaluate": ".fit", "fit": ".fit", "create_model": ".models", "register_model": ".models", "Plan": ".plan",
    "load_weights": ".pretrained",
    "build_quantizer": ".quant", "layer_bits": ".quantize", "quant_state": ".quantize", "quantize": ".quantize",
    "set_bits": ".quantize", "unquantize": ".quantize", "run": ".train",
}

__all__ = [
    "Config", "ConfigError", "DataError", "FreezeBatchNorm", "LowbitError", "Plan", "TrainingDiverged",
    "build_quantizer", "create_model", "evaluate", "fit", "layer_bits", "load_config", "load_dataset",
    "load_weights", "quant_state", "quantize", "register_model", "run", "set_bits", "unquantize",
]


class _Lowbit(ModuleType):
    """``lowbit.fit`` and ``lowbit.quantize`` are the functions, as before, even after their
    submodules were imported (the import system would otherwise set the attributes to the modules)."""

    @property
    def fit(self):
        return import_module(".fit", __name__).fit

    @fit.setter
    def fit(self, value):
        pass

    @property
    def quantize(self):
        return import_module(".quantize", __name__).quantize

    @quantize.setter
    def quantize(self, value):
        pass


sys.modules[__name__].__class__ = _Lowbit


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
