"""VGG-Small, the 6-conv VGG used as a CIFAR benchmark by quantization papers."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.models._common import check_bool, check_min_image_size, check_width, init_weights, scale_channels
from lowbit.models.channels import LayerChannels
from lowbit.models.registry import register_model

# Conv output channels; "M" is a 2x2 max-pool.
VGG_SMALL_CONFIG: tuple[int | str, ...] = (128, 128, "M", 256, 256, "M", 512, 512, "M")


class VGGSmall(nn.Module):
    """VGG-Small of Zhang et al., "LQ-Nets: Learned Quantization for Highly Accurate and Compact
    Deep Neural Networks", ECCV 2018 (after Simonyan & Zisserman, "Very Deep Convolutional Networks
    for Large-Scale Image Recognition", ICLR 2015).

    Architecture: conv 128-128-M-256-256-M-512-512-M, each conv 3x3 (padding 1, no bias) -> BN ->
    ReLU and each M a 2x2 max-pool; channel counts scaled by ``width``. Then global average pooling
    and one linear layer to the classes. (LQ-Net flattens the 4x4x512 map of a 32x32 input instead;
    pooling keeps the classifier independent of the image size.) ``channels`` may set each conv's
    out channels (``features.0``, ``features.3``, ...; see :mod:`lowbit.models.channels`).
    ``batch_norm=False`` puts an identity where each BN was and ``bias=False`` drops the classifier's
    bias (NITI's integer-only networks have neither).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0,
                 channels: LayerChannels | None = None, batch_norm: bool = True, bias: bool = True) -> None:
        super().__init__()
        plan = channels if channels is not None else LayerChannels(type(self).__name__, width=width)
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG_SMALL_CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                out_channels = plan.out(f"features.{len(layers)}", scale_channels(int(item), width))
                layers += [
                    nn.Conv2d(channels, out_channels, 3, padding=1, bias=False),
                    nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity(),
                    nn.ReLU(inplace=False),
                ]
                channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(channels, num_classes, bias=bias)
        init_weights(self)
        plan.check(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


@register_model("vgg_small")
def vgg_small(in_channels: int = 3, num_classes: int = 10, image_size: int | tuple[int, int] = 32,
              width: float = 1.0, channels: dict[str, int] | None = None, batch_norm: bool = True,
              bias: bool = True) -> VGGSmall:
    """VGG-Small (LQ-Nets), channels scaled by ``width``, or per-layer ``channels``; optionally
    without BN / classifier bias."""
    width = check_width("vgg_small", width)
    batch_norm = check_bool("vgg_small", "batch_norm", batch_norm)
    bias = check_bool("vgg_small", "bias", bias)
    check_min_image_size("vgg_small", image_size, 8, "three 2x2 max-pools")
    return VGGSmall(in_channels, num_classes, width, LayerChannels("vgg_small", channels, width), batch_norm, bias)
