"""Deploy what was trained: BatchNorm folding, bit-packed integer export, ONNX, C99, and checks.

>>> from lowbit.export import export_run, format_report
>>> print(format_report(export_run("runs/w2a2", formats=("packed", "onnx", "c"))))

Pieces (each usable alone):

* :func:`lower` (:mod:`.graph`): a quantized PyTorch model -> a graph of deployable ops, BN folded
  (:mod:`.fold`) or kept as a per-channel affine after quantized layers;
* :func:`save_package` / :func:`load_package` (:mod:`.package`): ``model.safetensors`` (codes
  bit-packed at the trained bits, :mod:`.pack`, plus float32 scales) + ``model.json`` manifest;
* :class:`IntegerReference` (:mod:`.numpy_ref`): NumPy inference from the package, integer MACs
  where weights and inputs are quantized;
* :func:`to_onnx` (:mod:`.onnx_export`): QuantizeLinear/DequantizeLinear ONNX for onnxruntime;
* :func:`write_c` (:mod:`.c_export`): C99 for a microcontroller, bit-exact with the NumPy reference.
"""

from .api import FORMATS, export_model, export_run, format_report, load_run, packed_size_table
from .c_export import compile_c, run_c, write_c
from .fold import bn_affine, fold_bn
from .graph import Graph, Op, WeightQ, lower
from .numpy_ref import IntegerReference
from .onnx_export import to_onnx
from .pack import pack_codes, packed_nbytes, unpack_codes
from .package import load_package, save_package

__all__ = [
    "FORMATS", "Graph", "IntegerReference", "Op", "WeightQ", "bn_affine", "compile_c", "export_model", "export_run",
    "fold_bn", "format_report", "load_package", "load_run", "lower", "pack_codes", "packed_nbytes",
    "packed_size_table", "run_c", "save_package", "to_onnx", "unpack_codes", "write_c",
]
