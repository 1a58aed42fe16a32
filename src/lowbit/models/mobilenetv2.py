"""MobileNetV2 adapted to small (CIFAR-sized) images."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.models._common import check_min_image_size, check_width, init_weights, make_divisible
from lowbit.models.registry import register_model

# [expansion t, output channels c, repeats n, first stride s]; strides of the CIFAR variant
# (the ImageNet config has s=2 in the second row and a stride-2 stem).
MOBILENETV2_CIFAR_CONFIG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted-residual block: [1x1 expand -> BN -> ReLU] -> 3x3 depthwise (stride)
    -> BN -> ReLU -> 1x1 linear projection -> BN, plus the input when stride is 1 and the channel
    count is unchanged. The expand conv is omitted when the expansion ratio is 1."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [
                nn.Conv2d(in_channels, hidden, 1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=False),
            ]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=False),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 of Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
    CVPR 2018, in the usual CIFAR variant.

    Architecture: 3x3 stem conv with stride 1 (32 channels) -> BN -> ReLU; inverted-residual stages
    [t, c, n, s] = [1,16,1,1], [6,24,2,1], [6,32,3,2], [6,64,4,2], [6,96,3,1], [6,160,3,2],
    [6,320,1,1]; 1x1 conv to 1280 -> BN -> ReLU; global average pooling; linear classifier. Channel
    counts are multiplied by ``width`` and rounded to multiples of 8 (``make_divisible``) as in the
    paper; the last conv keeps 1280 channels for ``width`` < 1. Differences from the ImageNet
    network: stride-1 stem and second stage (total downsampling 8), ReLU instead of ReLU6 (the
    activation quantizer does the clipping), no dropout.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        channels = make_divisible(32 * width)
        last_channels = make_divisible(1280 * max(1.0, width))
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=False),
        ]
        for t, c, n, s in MOBILENETV2_CIFAR_CONFIG:
            out_channels = make_divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(channels, out_channels, s if i == 0 else 1, t))
                channels = out_channels
        layers += [
            nn.Conv2d(channels, last_channels, 1, bias=False),
            nn.BatchNorm2d(last_channels),
            nn.ReLU(inplace=False),
        ]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(last_channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


@register_model("mobilenetv2")
def mobilenetv2(in_channels: int = 3, num_classes: int = 10, image_size: int | tuple[int, int] = 32,
                width: float = 1.0) -> MobileNetV2:
    """CIFAR MobileNetV2 (stride-1 stem), channels scaled by ``width`` in multiples of 8."""
    width = check_width("mobilenetv2", width)
    check_min_image_size("mobilenetv2", image_size, 8, "three stride-2 stages")
    return MobileNetV2(in_channels, num_classes, width)
