"""MobileNetV2 adapted to small (CIFAR-sized) images."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.models._common import check_min_image_size, check_width, init_weights, make_divisible
from lowbit.models.channels import LayerChannels
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
    count is unchanged. The expand conv is omitted when the expansion ratio is 1.

    Per-layer widths: ``hidden_channels`` (default ``in_channels * expand_ratio``; the input when the
    ratio is 1) sets the expansion conv, which the depthwise conv follows. ``shortcut`` forces the
    residual on or off; a residual whose input and output channels differ adds the input through a
    1x1 conv + BN projection (``shortcut.0``, ``shortcut.1``).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int,
                 hidden_channels: int | None = None, shortcut: bool | None = None) -> None:
        super().__init__()
        hidden = in_channels if expand_ratio == 1 else (hidden_channels or int(round(in_channels * expand_ratio)))
        self.use_residual = (stride == 1 and in_channels == out_channels) if shortcut is None else shortcut
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
        self.shortcut = None
        if self.use_residual and (stride != 1 or in_channels != out_channels):
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    @staticmethod
    def conv_names(expand_ratio: int) -> tuple[str | None, str, str]:
        """Names inside the block of its expansion (None at ratio 1), depthwise and projection convs."""
        return ("conv.0", "conv.3", "conv.6") if expand_ratio != 1 else (None, "conv.0", "conv.3")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if not self.use_residual:
            return out
        return out + (x if self.shortcut is None else self.shortcut(x))


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

    ``channels`` may set the out channels of the stem (``features.0``), of each block's expansion
    and projection convs (``features.B.conv.0`` / ``conv.6``; ``conv.3`` in the first block, which has
    no expansion) and of the last conv; the depthwise convs follow their expansion conv. A block
    keeps the residual it has in the uniform network, through a projection when its input and output
    then differ (see :mod:`lowbit.models.channels`).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0,
                 channels: LayerChannels | None = None) -> None:
        super().__init__()
        plan = channels if channels is not None else LayerChannels(type(self).__name__, width=width)
        base = make_divisible(32 * width)  # the uniform network's count at this width
        c_in = plan.out("features.0", base)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, c_in, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(c_in),
            nn.ReLU(inplace=False),
        ]
        for t, c, n, s in MOBILENETV2_CIFAR_CONFIG:
            base_out = make_divisible(c * width)
            for i in range(n):
                stride = s if i == 0 else 1
                expand, _, project = InvertedResidual.conv_names(t)
                block = f"features.{len(layers)}"
                hidden = plan.out(f"{block}.{expand}", int(round(base * t))) if expand else None
                out = plan.out(f"{block}.{project}", base_out)
                residual = stride == 1 and base == base_out
                layers.append(InvertedResidual(c_in, out, stride, t, hidden, shortcut=residual))
                c_in, base = out, base_out
        last_channels = plan.out(f"features.{len(layers)}", make_divisible(1280 * max(1.0, width)))
        layers += [
            nn.Conv2d(c_in, last_channels, 1, bias=False),
            nn.BatchNorm2d(last_channels),
            nn.ReLU(inplace=False),
        ]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(last_channels, num_classes)
        init_weights(self)
        plan.check(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


@register_model("mobilenetv2")
def mobilenetv2(in_channels: int = 3, num_classes: int = 10, image_size: int | tuple[int, int] = 32,
                width: float = 1.0, channels: dict[str, int] | None = None) -> MobileNetV2:
    """CIFAR MobileNetV2 (stride-1 stem), channels scaled by ``width`` in multiples of 8, or per-layer
    ``channels``."""
    width = check_width("mobilenetv2", width)
    check_min_image_size("mobilenetv2", image_size, 8, "three stride-2 stages")
    return MobileNetV2(in_channels, num_classes, width, LayerChannels("mobilenetv2", channels, width))
