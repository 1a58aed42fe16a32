"""Name -> builder registry of the model zoo (timm-style).

A model module registers a *builder* with :func:`register_model`. A builder is a function whose first
three parameters are ``in_channels``, ``num_classes`` and ``image_size``; every further parameter is a
model-specific keyword (``width``, ``batch_norm``, ...) with a default. :func:`create_model` checks the
name, the keywords (against the builder's signature) and the common arguments, then calls the builder.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable

from torch import nn

from lowbit.errors import ConfigError
from lowbit.models._common import check_image_size_arg, check_int_arg
from lowbit.registry import Registry

COMMON_PARAMETERS = ("in_channels", "num_classes", "image_size")



def _natural_key(name: str) -> list[tuple[int, int | str]]:
    return [(1, int(part)) if part.isdigit() else (0, part) for part in re.split(r"(\d+)", name) if part]


MODELS = Registry("model", fixed=COMMON_PARAMETERS, sort_key=_natural_key)


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers a model builder under ``name`` and returns the builder unchanged."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        params = list(inspect.signature(builder).parameters)
        if tuple(params[:3]) != COMMON_PARAMETERS:
            raise TypeError(
                f"builder of model {name!r} must start with parameters {', '.join(COMMON_PARAMETERS)}; "
                f"got {', '.join(params) or 'none'}"
            )
        return MODELS.register(name)(builder)

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted with numbers in numeric order (resnet8 before resnet18)."""
    return MODELS.names()


def model_keywords(name: str) -> list[str]:
    """Model-specific keywords that ``create_model(name, ...)`` accepts (beyond the common ones)."""
    return MODELS.options(name)


def create_model(
    name: str,
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: int | tuple[int, int] = 32,
    **kwargs: Any,
) -> nn.Module:
    """Build the registered model ``name``.

    Args:
        name: a name from :func:`list_models`.
        in_channels: input image channels (1 for grayscale such as Fashion-MNIST, 3 for CIFAR).
        num_classes: number of output logits (>= 2).
        image_size: input height/width as an int (square) or an ``(height, width)`` pair; it only
            sets the minimum the network's downsampling needs (and LeNet-5's flattened size).
        **kwargs: model-specific keywords, e.g. ``width`` (channel multiplier) or ``batch_norm``.

    Raises:
        ConfigError: unknown name or keyword, or an invalid value.
    """
    builder = MODELS.get(name)
    MODELS.check_options(name, kwargs)
    in_channels = check_int_arg(name, "in_channels", in_channels, minimum=1)
    num_classes = check_int_arg(name, "num_classes", num_classes, minimum=2)
    size = check_image_size_arg(name, image_size)
    try:
        return builder(in_channels, num_classes, size, **kwargs)
    except (MemoryError, RuntimeError) as e:  # torch's allocator raises RuntimeError("... can't allocate memory ...")
        if not isinstance(e, MemoryError) and "allocate memory" not in str(e):
            raise
        opts = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        tried = re.search(r"allocate (\d+) bytes", str(e))
        raise ConfigError(f"model {name}{f' ({opts})' if opts else ''}: not enough memory to build it"
                          + (f" (one tensor of {int(tried[1]):,} bytes)" if tried else "")) from None
