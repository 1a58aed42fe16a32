"""Model zoo: CNNs for small images, built by name.

>>> from lowbit.models import create_model, list_models
>>> model = create_model("resnet20", in_channels=3, num_classes=10, image_size=32, width=1.0)
>>> narrow = create_model("resnet20", channels={"layers.0.0.conv1": 8})  # per-layer out channels
>>> model_channels(narrow)["layers.0.0.conv1"]
8

Every model registers its modules in execution order (the first ``nn.Conv2d`` is the stem, the last
``nn.Linear`` the classifier), uses a separate ``nn.ReLU(inplace=False)`` module for each activation,
and has ``bias=False`` on convolutions followed by BatchNorm. Convolutions get Kaiming-normal
(fan_out, relu) init, BatchNorm weight 1 / bias 0, Linear layers the PyTorch default.

Every builder takes ``width`` (a channel multiplier) and ``channels`` (per-layer out channels by
layer name, scaled by ``width``); :mod:`lowbit.models.channels` has the rules.
"""

from lowbit.models.channels import LayerChannels, model_channels
from lowbit.models.registry import MODELS, create_model, list_models, model_keywords, register_model

# Importing the model modules registers their builders.
from lowbit.models.lenet import LeNet5, lenet5
from lowbit.models.mobilenetv2 import InvertedResidual, MobileNetV2, mobilenetv2
from lowbit.models.resnet import (
    BasicBlock,
    ResNet,
    cifar_resnet,
    resnet8,
    resnet18,
    resnet20,
    resnet32,
    resnet56,
)
from lowbit.models.vgg import VGGSmall, vgg_small

__all__ = [
    "BasicBlock",
    "InvertedResidual",
    "LayerChannels",
    "LeNet5",
    "MobileNetV2",
    "ResNet",
    "VGGSmall",
    "cifar_resnet",
    "create_model",
    "lenet5",
    "MODELS",
    "list_models",
    "mobilenetv2",
    "model_channels",
    "model_keywords",
    "register_model",
    "resnet8",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet56",
    "vgg_small",
]
