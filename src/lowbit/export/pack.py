"""Bit-packing of integer weight codes: ``bits`` bits per code, no padding between codes.

Layout (the one the packed file, the NumPy loader and the generated C code share): the codes of a
tensor, flattened in C order (for a conv weight ``(O, I, kh, kw)`` the codes of output channel
``o`` are the contiguous run ``o*I*kh*kw ...``), form one little-endian bit stream: code ``j``
occupies stream bits ``j*bits ... j*bits + bits - 1``, least significant bit first, and stream bit
``t`` is bit ``t % 8`` of byte ``t // 8``. A code of 3, 5, 6 or 7 bits may straddle two bytes.
The stream of ``n`` codes takes ``ceil(n * bits / 8)`` bytes, so a tensor wastes less than one
byte: that is the "physical limit" ``n * bits / 8`` up to rounding.

Hand case, 2 bits: codes ``[3, 1, 2, 0]`` -> one byte ``0b00_10_01_11 = 0x27``.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError

#: bit widths a packed layer may use (1..8; the quantizer zoo's range)
PACK_BITS = tuple(range(1, 9))


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes of ``n`` codes at ``bits`` bits: ``ceil(n * bits / 8)``."""
    return (int(n) * int(bits) + 7) // 8


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or int(bits) != bits or bits not in PACK_BITS:
        raise ConfigError(f"packed codes support bits 1..8, got {bits!r}")
    return int(bits)


def pack_codes(codes, bits: int) -> np.ndarray:
    """Pack non-negative integer codes (< 2**bits) into a ``uint8`` bit stream (module docstring)."""
    bits = _check_bits(bits)
    c = np.asarray(codes).reshape(-1)
    if c.size and (c.min() < 0 or c.max() >= 2**bits):
        raise ConfigError(f"codes must lie in 0..{2**bits - 1} to pack at {bits} bits, got {c.min()}..{c.max()}")
    # one row of `bits` bits per code, LSB first; packbits(little) puts stream bit t at bit t%8
    stream = ((c.astype(np.uint16)[:, None] >> np.arange(bits, dtype=np.uint16)) & 1).astype(np.uint8)
    return np.packbits(stream.reshape(-1), bitorder="little")


def unpack_codes(buf, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: the first ``n`` codes of the stream, as ``int64``."""
    bits = _check_bits(bits)
    b = np.asarray(buf, dtype=np.uint8).reshape(-1)
    if b.size < packed_nbytes(n, bits):
        raise ConfigError(f"packed buffer of {b.size} bytes is too short for {n} codes at {bits} bits")
    stream = np.unpackbits(b, bitorder="little")[: n * bits].reshape(n, bits).astype(np.int64)
    return stream @ (np.int64(1) << np.arange(bits, dtype=np.int64))


def read_codes(buf, bits: int, n: int, levels: int, where: str) -> np.ndarray:
    """The ``n`` codes of one layer from a package's run ``buf``, checked as a reader must: the run is exactly
    :func:`packed_nbytes` long and every code names one of the layer's ``levels`` values. ``where`` (the file and
    layer) starts each one-line error. Before session 25 a longer run (a manifest whose bits had been edited) was
    read silently, and a code past the levels failed later with an IndexError."""
    b = np.asarray(buf, dtype=np.uint8).reshape(-1)
    want = packed_nbytes(n, _check_bits(bits))
    if b.size != want:
        raise ConfigError(f"{where}: {b.size} bytes of codes where {n} codes at {bits} bits take {want}: the package "
                          "is inconsistent")
    c = unpack_codes(b, bits, n)
    if c.size and int(c.max()) >= levels:
        raise ConfigError(f"{where}: code {int(c.max())} where the layer has {levels} levels: the package is "
                          "inconsistent")
    return c
