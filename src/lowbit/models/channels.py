"""Per-layer channel counts: one mechanism shared by every builder of the zoo.

Every builder takes ``channels``: a mapping ``{layer name: out channels}`` whose names are those of
``model.named_modules()`` (``"conv1"``, ``"layers.1.0.conv2"``, ``"features.3"``), so a channel search
(NCE, TAS) can return exactly what it measured, and :func:`model_channels` gives the mapping of a
built model::

    m = create_model("resnet20", channels={"layers.0.0.conv1": 12})
    same = create_model("resnet20", channels=model_channels(m))

Rules (the same for every model):

* **free layers** are the convs/linears whose out channels a builder asks :meth:`LayerChannels.out`
  for: every conv of the ResNets, VGG-Small and LeNet-5 (and its hidden linears), MobileNetV2's stem,
  expansion, projection and last convs; a built model names them in ``model.channel_layers``. An
  unlisted layer keeps the model's own count at ``width``.
* **width composes by multiplication**: a listed count ``c`` becomes ``scale_channels(c, width)``
  (``c * width`` rounded half up, at least 1; MobileNetV2's multiple-of-8 rounding applies only to its
  default counts). So ``width=2`` widens a searched network x2 as WRPN does, and ``width=1`` takes
  ``c`` exactly.
* **following layers** (MobileNetV2's depthwise convs follow their expansion conv, a projection
  shortcut follows its block's output, the classifier has ``num_classes`` outputs) cannot be set;
  a listed count for one is only checked: it must equal the built count, before or after the width
  scaling (so a :func:`model_channels` dict can be passed back at any width).
* **shortcuts**: a residual block keeps the shortcut it has in the uniform network; when per-layer
  counts make its input and output differ, the shortcut is a 1x1 conv + BN projection (He et al.'s
  option B, as TAS does), so any per-layer counts give a valid network.

Bad input (not a mapping, a non-positive or non-integer count, a name that is no conv/linear layer,
a following layer set to another count) is a one-line :class:`~lowbit.errors.ConfigError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from lowbit.errors import ConfigError
from lowbit.models._common import scale_channels

#: how many layer names an "unknown layer" error lists before it says how many there are
_NAMES_SHOWN = 8


def out_channels(module: nn.Module) -> int | None:
    """Output channels of a conv (any ``_ConvNd``) or features of a linear layer; None for other modules."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    return None


def model_channels(model: nn.Module) -> dict[str, int]:
    """``{layer name: out channels}`` of every conv/linear layer of ``model``, in registration order.

    ``create_model(name, ..., channels=model_channels(m))`` rebuilds ``m``'s architecture (same
    name, common arguments and other keywords; ``width`` 1). Quantized models work too: quantization
    keeps the layer names.
    """
    found = ((name, out_channels(m)) for name, m in model.named_modules())
    return {name: n for name, n in found if n is not None}


def _flatten(model: str, channels: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"layers": {0: {0: {"conv1": 8}}}}`` -> ``{"layers.0.0.conv1": 8}`` (dotted CLI overrides nest)."""
    flat: dict[str, Any] = {}
    for key, value in channels.items():
        if isinstance(key, bool) or not isinstance(key, (str, int)) or key == "":
            raise ConfigError(f"model {model!r}: channels keys must be layer names, got {key!r}")
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(model, value, name + "."))
        else:
            flat[name] = value
    return flat


def check_channels(model: str, channels: Any) -> dict[str, int]:
    """Validate ``channels`` (None or a possibly nested mapping of layer names to ints >= 1) and flatten it."""
    if channels is None:
        return {}
    if not isinstance(channels, Mapping):
        raise ConfigError(
            f"model {model!r}: channels must be a mapping {{layer name: out channels}}, got {channels!r}"
        )
    flat = _flatten(model, channels)
    for name, n in flat.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"model {model!r}: channels[{name!r}] must be an integer >= 1, got {n!r}")
    return flat


class LayerChannels:
    """The out channels a builder gives each layer: listed counts scaled by ``width``, else its defaults.

    A model asks :meth:`out` for each free layer while it builds, then calls :meth:`check` on
    itself, which rejects listed names that are no free layer (unknown, or following another layer
    at a different count) and verifies that each free layer was built with the count it was given.
    """

    def __init__(self, model: str, channels: Any = None, width: float = 1.0) -> None:
        self.model = model
        self.width = width
        self.listed = check_channels(model, channels)
        self.resolved: dict[str, int] = {}

    def out(self, name: str, default: int) -> int:
        """Out channels of the free layer ``name``: its listed count times ``width``, else ``default``."""
        n = scale_channels(self.listed[name], self.width) if name in self.listed else default
        self.resolved[name] = n
        return n

    def check(self, model: nn.Module) -> None:
        """Raise ConfigError for listed names that ``model`` does not let one set (see the module doc),
        and record the free layers' names as ``model.channel_layers`` (what a channel search may set)."""
        model.channel_layers = tuple(self.resolved)
        built = model_channels(model)
        for name, n in self.resolved.items():  # the builder named its layers right
            if built.get(name) != n:
                raise RuntimeError(f"{self.model}: layer {name!r} was built with {built.get(name)} channels, not {n}")
        unknown = [name for name in self.listed if name not in built]
        if unknown:
            free = list(self.resolved)
            shown = ", ".join(free[:_NAMES_SHOWN]) + (f", ... ({len(free)} in all)" if len(free) > _NAMES_SHOWN else "")
            raise ConfigError(
                f"model {self.model!r}: channels names no conv/linear layer: {', '.join(unknown)}; "
                f"its layers: {shown}"
            )
        for name, c in self.listed.items():
            if name not in self.resolved and built[name] not in (c, scale_channels(c, self.width)):
                raise ConfigError(
                    f"model {self.model!r}: channels[{name!r}] = {c}, but {name} follows another layer "
                    f"or num_classes and has {built[name]} out channels; leave it out"
                )


def describe_channels(model: nn.Module, channels: Any) -> str:
    """One line for ``lowbit info``: the built out channels of the layers that ``channels`` lists."""
    built = model_channels(model)
    listed = ", ".join(f"{name} {built.get(name, '?')}" for name in check_channels("model", channels))
    return f"per-layer out channels (model.channels; every layer's shape is in the table): {listed}"
