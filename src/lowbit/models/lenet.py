"""LeNet-5 for small grayscale or color images."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.models._common import (
    check_bool,
    check_min_image_size,
    check_width,
    init_weights,
    scale_channels,
)
from lowbit.models.channels import LayerChannels
from lowbit.models.registry import register_model

# With padding 2 on conv1 (images up to 28x28): side s -> s -> s//2 -> s//2-4 -> (s//2-4)//2 >= 1.
LENET_MIN_IMAGE_SIZE = 12


def _lenet_feature_side(side: int, padding: int) -> int:
    side = (side + 2 * padding - 4) // 2  # conv1 5x5, pool 2x2
    return (side - 4) // 2  # conv2 5x5, pool 2x2


class LeNet5(nn.Module):
    """LeNet-5 of LeCun et al., "Gradient-Based Learning Applied to Document Recognition", Proc.
    IEEE 1998, in its common modern form (ReLU activations, 2x2 max-pooling, full C3 connections).

    Architecture: conv 5x5 6w -> [BN] -> ReLU -> max-pool 2 -> conv 5x5 16w -> [BN] -> ReLU ->
    max-pool 2 -> flatten -> fc 120w -> ReLU -> fc 84w -> ReLU -> fc num_classes, where ``w`` is
    ``width``. conv1 has padding 2 when the image is at most 28x28 (so 28x28 and 32x32 inputs both
    give 5x5 maps before the flatten, as in the paper), else no padding. ``batch_norm`` adds BN
    after each conv (which then has no bias); ``bias=False`` drops every bias (NITI). The first fc layer's input size follows from
    ``image_size``, so the model only accepts inputs of that size. ``channels`` may set the out
    channels of both convs and of the two hidden fc layers (``features.0``, ``features.3`` or
    ``features.4`` with BN, ``classifier.0``, ``classifier.2``; see :mod:`lowbit.models.channels`).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: tuple[int, int] = (32, 32),
        width: float = 1.0,
        batch_norm: bool = False,
        channels: LayerChannels | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        plan = channels if channels is not None else LayerChannels(type(self).__name__, width=width)
        height, wide = image_size
        padding = 2 if max(height, wide) <= 28 else 0
        block_len = 4 if batch_norm else 3  # conv [BN] ReLU pool
        c1 = plan.out("features.0", scale_channels(6, width))
        c2 = plan.out(f"features.{block_len}", scale_channels(16, width))
        f1 = plan.out("classifier.0", scale_channels(120, width))
        f2 = plan.out("classifier.2", scale_channels(84, width))

        def conv_block(cin: int, cout: int, pad: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 5, padding=pad, bias=bias and not batch_norm)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            return layers + [nn.ReLU(inplace=False), nn.MaxPool2d(2, 2)]

        self.features = nn.Sequential(*conv_block(in_channels, c1, padding), *conv_block(c1, c2, 0))
        self.flatten = nn.Flatten(1)
        flat = c2 * _lenet_feature_side(height, padding) * _lenet_feature_side(wide, padding)
        self.classifier = nn.Sequential(
            nn.Linear(flat, f1, bias=bias),
            nn.ReLU(inplace=False),
            nn.Linear(f1, f2, bias=bias),
            nn.ReLU(inplace=False),
            nn.Linear(f2, num_classes, bias=bias),
        )
        init_weights(self)
        plan.check(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


@register_model("lenet5")
def lenet5(in_channels: int = 3, num_classes: int = 10, image_size: int | tuple[int, int] = 32,
           width: float = 1.0, batch_norm: bool = False, channels: dict[str, int] | None = None,
           bias: bool = True) -> LeNet5:
    """LeNet-5 (ReLU, max-pool), optional BN after the convs, channels scaled by ``width``, or
    per-layer ``channels``."""
    width = check_width("lenet5", width)
    batch_norm = check_bool("lenet5", "batch_norm", batch_norm)
    bias = check_bool("lenet5", "bias", bias)
    size = check_min_image_size(
        "lenet5", image_size, LENET_MIN_IMAGE_SIZE, "two 5x5 convs and two 2x2 max-pools"
    )
    return LeNet5(in_channels, num_classes, size, width, batch_norm, LayerChannels("lenet5", channels, width), bias)
