"""Pretrained starts: load FP32 weights (a file, a run folder's best network) into a fresh model.

The order is torchao's prepare/convert and NNCF's: build the model, load its weights, *then*
quantize::

    model = create_model("resnet8", in_channels=1, num_classes=10, image_size=28)
    load_weights(model, "runs/fp32")          # or "fp32.pt", or a state dict
    quantize(model, plan)

Sources:

* a **run folder** (``config.yaml`` + ``best.pt``): the network the run reported (best epoch,
  finalized, re-estimated BatchNorm if recorded). If that run was quantized, ``keep`` says which
  weights to take: ``"latent"`` (the trainable FP32 weights, to fine-tune further) or
  ``"quantized"`` (the values it deployed);
* a **.pt file**: a state dict, or a checkpoint holding one under ``"model"`` / ``"state_dict"`` /
  ``"model_state_dict"`` (lowbit's best.pt and last.pt, most training scripts, PyTorch's tutorial; under
  another name it is refused, naming it). Keys of a quantized lowbit model
  (``conv.parametrizations.weight.original``) are mapped to plain ones and quantizer state is
  dropped, so its latent weights load;
* a **mapping** of tensors (a state dict in memory).

Every mismatch is one line: which keys are missing, unexpected, or of another shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from .errors import ConfigError

_LATENT = ".parametrizations.weight.original"
#: quantizer state a plain model has no place for: weight and input quantizers, and integer mode's output
#: quantizers and residual mid rounding (an integer run's best.pt loads into any model; session 24)
_QUANT_STATE = (".parametrizations.weight.0.", ".input_quantizer.", ".output_quantizer.", ".mid_round.")
#: where a checkpoint file keeps its state dict: lowbit's best.pt / last.pt, most training scripts, and PyTorch's
#: own tutorial ("Saving and loading a general checkpoint": model_state_dict, optimizer_state_dict, epoch, loss)
_CHECKPOINT_KEYS = ("model", "state_dict", "model_state_dict")


def plain_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A quantized model's state dict as an unquantized model's: latent weights under ``weight``,
    quantizer state (:data:`_QUANT_STATE`) dropped. Plain keys pass through."""
    out = {}
    for k, v in sd.items():
        if k.endswith(_LATENT):
            out[k[: -len(_LATENT)] + ".weight"] = v
        elif not any(t in k for t in _QUANT_STATE):
            out[k] = v
    return out


def _read_file(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as e:  # not readable by this user: not a corrupt file, as it said before session 29
        raise ConfigError(f"{path}: the weights file could not be read ({e.strerror or e})") from None
    except Exception as e:  # a corrupt or foreign file: say which, in one line
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "weights_only" in msg or "Weights only load failed" in msg:  # torch's advice about its 2.6 default
            msg = "torch.load with weights_only=True could not read it"
        raise ConfigError(f"{path}: not a readable PyTorch weights file ({msg[:160]}); the file is truncated or "
                          "corrupt, or holds objects other than tensors") from None
    if isinstance(obj, Mapping):
        cfg = obj.get("config")
        method = ((cfg.get("plan") or {}).get("method") or {}) if isinstance(cfg, Mapping) else {}
        if isinstance(method, Mapping) and method.get("name") == "niti":  # its latents were never trained
            raise ConfigError(f"{path}: a NITI run's checkpoint, whose latent weights were never trained (NITI trains "
                              "integer weights): give its run folder with model.init_weights: quantized")
        for key in _CHECKPOINT_KEYS:
            if isinstance(obj.get(key), Mapping):
                sd = dict(obj[key])
                if isinstance(obj.get("final_bn"), Mapping):  # lowbit's re-estimated BatchNorm
                    sd.update(obj["final_bn"])
                return sd
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj)
        # a checkpoint whose state dict is under another name ('net', 'ema', ...): name them, do not guess
        held = [str(k) for k, v in obj.items() if isinstance(v, Mapping) and v and
                all(isinstance(t, Tensor) for t in v.values())]
        if held:
            under = ", ".join(repr(k) for k in held[:4])
            raise ConfigError(f"{path}: a checkpoint whose state dicts are under {under}, "
                              f"not {' / '.join(repr(k) for k in _CHECKPOINT_KEYS)}: save the one you mean on its "
                              f"own (torch.save(checkpoint[{held[0]!r}], 'weights.pt')) and give that file")
    raise ConfigError(f"{path}: holds no state dict (expected a mapping of tensors, or one under "
                      f"{' / '.join(repr(k) for k in _CHECKPOINT_KEYS)})")


def _from_run(run_dir: Path, keep: str) -> dict[str, Tensor]:
    from .quantize import quant_state, unquantize
    from .train import load_run

    cfg, _, model, _ = load_run(run_dir)
    if keep == "latent" and cfg.plan.method.name == "niti":  # session 25: loaded untrained latents (9.0 for 49.5 %)
        raise ConfigError(f"{run_dir}: a NITI run trains its integer weights, not the latent ones (which stay as "
                          "initialised): use model.init_weights: quantized (in Python: keep='quantized')")
    if quant_state(model) is not None:
        try:
            unquantize(model, keep=keep)
        except ConfigError as e:  # name the config key too, not only the Python argument
            raise ConfigError(str(e).replace("use keep='quantized'", "use model.init_weights: quantized (in Python: "
                                             "keep='quantized')")) from None
    return model.state_dict()


def read_weights(source: str | Path | Mapping[str, Tensor], keep: str = "latent") -> dict[str, Tensor]:
    """The plain (unquantized) state dict of ``source`` (module docstring)."""
    if keep not in ("latent", "quantized"):
        raise ConfigError(f"keep must be 'latent' or 'quantized', got '{keep}'")
    if isinstance(source, Mapping):
        if keep == "quantized":  # before session 27: the latent weights, silently
            raise ConfigError("keep='quantized' needs a run folder (a state dict holds no quantizer to apply; a "
                              "quantized model's own: lowbit.unquantize(model, keep='quantized'), then its state_dict())")
        return plain_state_dict(source)
    p = Path(source)
    if p.is_dir():
        if not (p / "config.yaml").is_file():
            raise ConfigError(f"{p} is a folder but not a run folder (no config.yaml)")
        return _from_run(p, keep)
    if not p.is_file():
        raise ConfigError(f"pretrained weights not found: {p}")
    if keep == "quantized":
        raise ConfigError(f"{p}: keep='quantized' (model.init_weights: quantized) needs a run folder (a file holds "
                          "no quantizer to apply)")
    return plain_state_dict(_read_file(p))


def load_weights(model: nn.Module, source: str | Path | Mapping[str, Tensor], keep: str = "latent") -> nn.Module:
    """Load ``source``'s weights into the unquantized ``model`` in place (strict: every key must
    match in name and shape). Returns ``model``."""
    from .quantize import quant_state

    if quant_state(model) is not None:
        raise ConfigError("load_weights: the model is already quantized; load weights before quantize()")
    sd = read_weights(source, keep)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("other shape (file vs model)", shapes)):
            if items:
                parts.append(f"{label}: {', '.join(items[:4])}{', ...' if len(items) > 4 else ''} ({len(items)})")
        raise ConfigError(f"pretrained weights do not fit the model ({'; '.join(parts)})")
    model.load_state_dict(sd)
    return model
