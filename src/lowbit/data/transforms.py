"""Batched, vectorised image transforms on ``(B, C, H, W)`` tensors.

Augmentation works on the uint8 batch before it is converted to float: zero padding there is
pixel value 0, which after normalisation becomes ``-mean / std`` for each channel. Random crop and
horizontal flip are done together by one gather with per-sample row and column indices, so there
is no Python loop over images.
"""

from __future__ import annotations

import torch


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(images / 255 - mean) / std`` as float32; ``mean`` and ``std`` have shape ``(C,)``."""
    scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
    shift = (mean / std).view(1, -1, 1, 1)
    return images.to(torch.float32).mul_(scale).sub_(shift)


def pixels_of(x: torch.Tensor, mean, std) -> torch.Tensor | None:
    """The uint8 images whose :func:`normalize` is ``x`` bit for bit, or None when ``x`` is not such an image
    (e.g. augmented or resized in float): the raw pixels a device would see, recovered from a loader's batch."""
    mean = torch.as_tensor(mean, dtype=torch.float32)
    std = torch.as_tensor(std, dtype=torch.float32)
    x = torch.as_tensor(x, dtype=torch.float32)
    if x.dim() != 4 or x.shape[1] != mean.numel():
        return None
    p = torch.round((x * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)) * 255.0).clamp_(0, 255).to(torch.uint8)
    return p if torch.equal(normalize(p, mean, std).view(torch.int32), x.view(torch.int32)) else None


def crop_flip(
    images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Random crop of each image from its zero-padded version, plus a random horizontal flip.

    Each image is padded by ``padding`` on every side and a window of the original size is taken
    at a uniformly random offset in ``[0, 2 * padding]`` per axis. With ``flip``, each image is
    mirrored left-right with probability 0.5. The random draws, in this order, are: row offsets,
    column offsets, flip coins (each of length ``B``), all from ``generator``.
    """
    b, c, h, w = images.shape
    if b == 0 or (padding <= 0 and not flip):
        return images
    if padding > 0:
        padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    else:
        padded = images
        dy = torch.zeros(b, dtype=torch.int64)
        dx = torch.zeros(b, dtype=torch.int64)
    cols = torch.arange(w).expand(b, w)
    if flip:
        flipped = torch.rand(b, generator=generator) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    rows = dy[:, None] + torch.arange(h)  # (B, H)
    cols = dx[:, None] + cols  # (B, W)
    batch = torch.arange(b)[:, None, None, None]
    channel = torch.arange(c)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
