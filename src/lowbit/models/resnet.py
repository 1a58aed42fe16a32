"""ResNets for small images: the CIFAR family (ResNet-8/20/32/56) and the CIFAR variant of ResNet-18."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.models._common import check_bool, check_min_image_size, check_width, init_weights, scale_channels
from lowbit.models.channels import LayerChannels
from lowbit.models.registry import register_model

#: the activation after each BN: "relu" (He et al.) or "hardtanh" (BinaryNet-style networks whose
#: activation quantizer is sign(x), which needs signed inputs)
ACTIVATIONS = {"relu": nn.ReLU, "hardtanh": nn.Hardtanh}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ConfigError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


class BasicBlock(nn.Module):
    """Two-conv residual block of He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.

    ``conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN``, plus the shortcut, then ReLU. The shortcut is
    the identity when the shape is unchanged; otherwise it is a 1x1 convolution (with the block's
    stride) followed by BN, i.e. the projection shortcut "option B" of the paper. ``mid_channels``
    (conv1's out channels, default ``out_channels``) can differ from the block output: it has no
    shortcut to agree with.

    Modules are registered in execution order (conv1, bn1, relu1, conv2, bn2, shortcut, relu2) and
    each ReLU is its own module, so forward hooks see every activation once.
    """

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, activation: str = "relu",
                 mid_channels: int | None = None, batch_norm: bool = True) -> None:
        super().__init__()
        mid = out_channels if mid_channels is None else mid_channels
        self.conv1 = nn.Conv2d(in_channels, mid, 3, stride=stride, padding=1, bias=False)
        norm = nn.BatchNorm2d if batch_norm else (lambda c: nn.Identity())
        self.bn1 = norm(mid)
        self.relu1 = make_activation(activation)
        self.conv2 = nn.Conv2d(mid, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                norm(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet of BasicBlocks for small images (He et al., "Deep Residual Learning for Image
    Recognition", CVPR 2016), shared by the CIFAR ResNet-6n+2 family and the CIFAR ResNet-18.

    Architecture: 3x3 stem conv (stride 1, ``stage_channels[0]`` channels) -> BN -> ReLU; then one
    stage per entry of ``stage_channels``, each ``blocks_per_stage[i]`` :class:`BasicBlock` s whose
    first block has stride ``stage_strides[i]``; then global average pooling and a linear classifier.
    There is no max-pool. Shortcuts are identity, or 1x1 conv + BN projections ("option B") where
    the shape changes.

    * CIFAR ResNet-(6n+2) (paper section 4.2): stages 16/32/64, n blocks each, strides 1/2/2.
      (The paper uses parameter-free "option A" shortcuts on CIFAR; this zoo uses option B.)
    * CIFAR ResNet-18 (the common CIFAR adaptation of the ImageNet ResNet-18): stages
      64/128/256/512, [2, 2, 2, 2] blocks, strides 1/2/2/2.

    ``channels`` (:class:`~lowbit.models.channels.LayerChannels`) may set each conv's out channels
    (``conv1``, ``layers.S.B.conv1``, ``layers.S.B.conv2``); a block whose input and output then
    differ gets a projection shortcut. ``batch_norm=False`` puts an identity where each BN was and
    ``bias=False`` drops the classifier's bias (NITI's integer-only networks have neither).
    """

    def __init__(
        self,
        stage_channels: Sequence[int],
        blocks_per_stage: Sequence[int],
        stage_strides: Sequence[int],
        in_channels: int = 3,
        num_classes: int = 10,
        activation: str = "relu",
        channels: LayerChannels | None = None,
        batch_norm: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__()
        plan = channels if channels is not None else LayerChannels(type(self).__name__)
        if not (len(stage_channels) == len(blocks_per_stage) == len(stage_strides)):
            raise ValueError("stage_channels, blocks_per_stage and stage_strides must have the same length")
        stem_channels = plan.out("conv1", stage_channels[0])
        self.conv1 = nn.Conv2d(in_channels, stem_channels, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels) if batch_norm else nn.Identity()
        self.relu = make_activation(activation)
        stages = []
        channels = stem_channels
        for s, (stage_out, blocks, stride) in enumerate(zip(stage_channels, blocks_per_stage, stage_strides)):
            layers = []
            for i in range(blocks):
                mid = plan.out(f"layers.{s}.{i}.conv1", stage_out)
                out_channels = plan.out(f"layers.{s}.{i}.conv2", stage_out)
                layers.append(BasicBlock(channels, out_channels, stride if i == 0 else 1, activation, mid, batch_norm))
                channels = out_channels
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(channels, num_classes, bias=bias)
        init_weights(self)
        plan.check(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(self.flatten(self.pool(x)))


def cifar_resnet(
    depth: int,
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: int | tuple[int, int] = 32,
    width: float = 1.0,
    activation: str = "relu",
    channels: dict[str, int] | None = None,
    batch_norm: bool = True,
    bias: bool = True,
) -> ResNet:
    """CIFAR ResNet of the given ``depth`` = 6n + 2: stages of n BasicBlocks with 16w/32w/64w channels,
    or per-layer ``channels`` (see :mod:`lowbit.models.channels`)."""
    name = f"resnet{depth}"
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ConfigError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 56, ...), got {depth!r}")
    width = check_width(name, width)
    check_min_image_size(name, image_size, 4, "two stride-2 stages")
    n = (depth - 2) // 6
    return ResNet(
        stage_channels=[scale_channels(c, width) for c in (16, 32, 64)],
        blocks_per_stage=[n, n, n],
        stage_strides=[1, 2, 2],
        in_channels=in_channels,
        num_classes=num_classes,
        activation=activation,
        channels=LayerChannels(name, channels, width),
        batch_norm=check_bool(name, "batch_norm", batch_norm),
        bias=check_bool(name, "bias", bias),
    )


@register_model("resnet8")
def resnet8(in_channels: int = 3, num_classes: int = 10, image_size: int | tuple[int, int] = 32,
            width: float = 1.0, activation: str = "relu", channels: dict[str, int] | None = None,
             batch_norm: bool = True, bias: bool = True) -> ResNet:
    """CIFAR ResNet-8 (n=1), option-B shortcuts."""
    return cifar_resnet(8, in_channels, num_classes, image_size, width, activation, channels, batch_norm, bias)


@register_model("resnet20")
def resnet20(in_channels: int = 3, num_classes: int = 10, image_size: int | tuple[int, int] = 32,
             width: float = 1.0, activation: str = "relu", channels: dict[str, int] | None = None,
             batch_norm: bool = True, bias: bool = True) -> ResNet:
    """CIFAR ResNet-20 (n=3), option-B shortcuts."""
    return cifar_resnet(20, in_channels, num_classes, image_size, width, activation, channels, batch_norm, bias)


@register_model("resnet32")
def resnet32(in_channels: int = 3, num_classes: int = 10, image_size: int | tuple[int, int] = 32,
             width: float = 1.0, activation: str = "relu", channels: dict[str, int] | None = None,
             batch_norm: bool = True, bias: bool = True) -> ResNet:
    """CIFAR ResNet-32 (n=5), option-B shortcuts."""
    return cifar_resnet(32, in_channels, num_classes, image_size, width, activation, channels, batch_norm, bias)


@register_model("resnet56")
def resnet56(in_channels: int = 3, num_classes: int = 10, image_size: int | tuple[int, int] = 32,
             width: float = 1.0, activation: str = "relu", channels: dict[str, int] | None = None,
             batch_norm: bool = True, bias: bool = True) -> ResNet:
    """CIFAR ResNet-56 (n=9), option-B shortcuts."""
    return cifar_resnet(56, in_channels, num_classes, image_size, width, activation, channels, batch_norm, bias)


@register_model("resnet18")
def resnet18(in_channels: int = 3, num_classes: int = 10, image_size: int | tuple[int, int] = 32,
             width: float = 1.0, activation: str = "relu", channels: dict[str, int] | None = None) -> ResNet:
    """CIFAR ResNet-18: 3x3 stride-1 stem, no max-pool, stages 64w..512w of [2, 2, 2, 2] BasicBlocks."""
    width = check_width("resnet18", width)
    check_min_image_size("resnet18", image_size, 8, "three stride-2 stages")
    return ResNet(
        stage_channels=[scale_channels(c, width) for c in (64, 128, 256, 512)],
        blocks_per_stage=[2, 2, 2, 2],
        stage_strides=[1, 2, 2, 2],
        in_channels=in_channels,
        num_classes=num_classes,
        activation=activation,
        channels=LayerChannels("resnet18", channels, width),
    )
