"""lowbit: training low-bit quantized CNNs for edge devices."""

__version__ = "0.1.0"
