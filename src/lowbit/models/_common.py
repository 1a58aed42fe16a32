"""Helpers shared by the model zoo: argument checks, channel scaling and weight init."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from lowbit.errors import ConfigError


def check_int_arg(model: str, arg: str, value: Any, minimum: int) -> int:
    """Return ``value`` if it is an int >= ``minimum``; otherwise raise a one-line ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"model {model!r}: {arg} must be an integer >= {minimum}, got {value!r}")
    return value


def check_image_size_arg(model: str, value: Any) -> tuple[int, int]:
    """Normalise ``image_size`` (int or (height, width)) to a tuple of two positive ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        size: tuple[Any, ...] = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        size = tuple(value)
    else:
        size = ()
    if len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size):
        raise ConfigError(
            f"model {model!r}: image_size must be a positive integer or a (height, width) pair "
            f"of positive integers, got {value!r}"
        )
    return size[0], size[1]


def check_min_image_size(model: str, image_size: Any, minimum: int, reason: str) -> tuple[int, int]:
    """Normalise ``image_size`` and raise ConfigError if a side is below ``minimum``."""
    h, w = check_image_size_arg(model, image_size)
    if h < minimum or w < minimum:
        raise ConfigError(
            f"model {model!r}: image_size {h}x{w} is too small; minimum is {minimum}x{minimum} ({reason})"
        )
    return h, w


def check_width(model: str, width: Any) -> float:
    """Return ``width`` as a float if it is a finite number > 0; otherwise raise ConfigError."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width <= 0:
        raise ConfigError(f"model {model!r}: width must be a finite number > 0, got {width!r}")
    return float(width)


def check_bool(model: str, arg: str, value: Any) -> bool:
    """Return ``value`` if it is a bool; otherwise raise ConfigError."""
    if not isinstance(value, bool):
        raise ConfigError(f"model {model!r}: {arg} must be true or false, got {value!r}")
    return value


def scale_channels(channels: int, width: float) -> int:
    """``channels * width`` rounded half up to an int, at least 1."""
    return max(1, int(math.floor(channels * width + 0.5)))


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without going 10% below it.

    The channel rounding of MobileNetV2 (Sandler et al. 2018, reference implementation).
    """
    if min_value is None:
        min_value = divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, relu) convs with zero bias, BN weight 1 / bias 0; Linear left at default."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
