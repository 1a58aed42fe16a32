"""One digest of tensors and plain values, for the places that must notice a changed number: checkpoints (a
corrupt ``best.pt`` is refused; ``torch.load`` does not check the file's CRCs) and integer mode's cached network (an
edit through ``.data`` changes no version counter)."""

from __future__ import annotations

import hashlib

import torch


def digest(obj, h=None) -> str | None:
    """SHA-256 (hex) of ``obj``: nested dicts, lists and tuples of tensors (dtype, shape and bytes; copied to the
    CPU where needed) and plain values (None, bool, int, float, str), in a fixed order; other objects are left out.
    With ``h`` (a hashlib object) it feeds ``h`` and returns None."""
    top = h is None
    h = h or hashlib.sha256()
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(f"<{k}>".encode())
            digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"[{len(obj)}".encode())
        for v in obj:
            digest(v, h)
    elif isinstance(obj, torch.Tensor):
        t = obj.detach()
        t = (t.cpu() if t.device.type != "cpu" else t).contiguous().reshape(-1)
        h.update(f"{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy())
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(repr(obj).encode())
    return h.hexdigest() if top else None
