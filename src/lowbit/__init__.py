"""lowbit: training low-bit (1-8 bit) quantized CNNs for edge devices.

    >>> import lowbit
    >>> model = lowbit.create_model("resnet8", in_channels=1, num_classes=10, image_size=28)
    >>> lowbit.quantize(model, {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}})

Then ``lowbit.fit(model, batches, epochs=3)`` and ``lowbit.evaluate(model, batches)`` from Python
(no files), or ``lowbit.run(config, run_dir)`` for a run folder.
"""

__version__ = "0.1.0"

from .config import Config, load_config
from .data import load_dataset
from .errors import ConfigError, DataError, LowbitError, TrainingDiverged
from .fit import evaluate, fit
from .models import create_model
from .plan import Plan
from .pretrained import load_weights
from .quant import build_quantizer
from .quantize import layer_bits, quant_state, quantize, set_bits, unquantize
from .train import run

__all__ = [
    "Config", "ConfigError", "DataError", "LowbitError", "Plan", "TrainingDiverged", "build_quantizer",
    "create_model", "evaluate", "fit", "layer_bits", "load_config", "load_dataset", "load_weights", "quant_state",
    "quantize", "run", "set_bits", "unquantize",
]
