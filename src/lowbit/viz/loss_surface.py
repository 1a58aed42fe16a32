"""003 Figure 4: the loss along two random filter-normalised directions (Li et al. 2018).

For one batch of training data and one random initialisation (003 uses a randomly initialised
ResNet-18), three networks with the *same* latent weights are compared:

* FP32 (no quantization),
* the single low-bit quantizer Q_1 (the config's plan with plain STE),
* the DQA mixture Σ a_k Q_k (the config's plan; attention at the start of training: eq. 7
  initialisation, normalised, temperature T(0), unless ``temperature`` is given).

Directions (Li et al. 2018, "Visualizing the loss landscape of neural nets", filter
normalisation): d ~ N(0, I) per conv/linear weight, then every filter (output row) is rescaled to
the norm of the corresponding filter of the weights, ``d_i <- d_i·||θ_i||/||d_i||``; biases and
BatchNorm parameters get no perturbation. The loss is f(x, y) = L(θ + x·d1 + y·d2) on a
``steps`` × ``steps`` grid over [-span, span]². BatchNorm uses the batch's statistics (train mode,
as the training loss does); every quantizer state is restored before each point.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..plan import QUANTIZABLE


def latent_weight(module: nn.Module) -> Tensor:
    """The trainable weight of a conv/linear layer (the latent one when it is parametrized)."""
    p = getattr(module, "parametrizations", None)
    return p.weight.original if p is not None and "weight" in p else module.weight


def weight_layers(model: nn.Module) -> dict[str, Tensor]:
    return {n: latent_weight(m) for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)}


def filter_normalized_direction(weights: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    """Li et al. 2018 filter normalisation: a Gaussian direction whose every filter (dim 0 row)
    has the norm of the same filter of ``weights``."""
    out = {}
    for name, w in weights.items():
        d = torch.randn(w.shape, generator=generator, dtype=w.dtype)
        wn = w.detach().flatten(1).norm(dim=1)
        dn = d.flatten(1).norm(dim=1).clamp_min(1e-12)
        out[name] = d * (wn / dn).reshape((-1,) + (1,) * (w.dim() - 1))
    return out


def roughness(grid: Tensor) -> float:
    """Mean absolute second difference of a 2-D loss grid along both axes (0 for a plane): a number
    for "how smooth" next to the picture."""
    g = torch.as_tensor(grid, dtype=torch.float64)
    d2x = (g[2:, :] - 2 * g[1:-1, :] + g[:-2, :]).abs()
    d2y = (g[:, 2:] - 2 * g[:, 1:-1] + g[:, :-2]).abs()
    return float(torch.cat([d2x.flatten(), d2y.flatten()]).mean())


@torch.no_grad()
def surface(model: nn.Module, x: Tensor, y: Tensor, d1: dict[str, Tensor], d2: dict[str, Tensor],
            alphas: Tensor) -> Tensor:
    """Loss grid L(θ + a_i·d1 + a_j·d2), row i along d1, column j along d2."""
    state = copy.deepcopy(model.state_dict())
    layers = weight_layers(model)
    model.train()
    grid = torch.empty(len(alphas), len(alphas), dtype=torch.float64)
    for i, a in enumerate(alphas.tolist()):
        for j, b in enumerate(alphas.tolist()):
            model.load_state_dict(state)  # weights and every running statistic, as at the centre
            for n, w in layers.items():
                w.add_(d1[n], alpha=a).add_(d2[n], alpha=b)
            grid[i, j] = F.cross_entropy(model(x), y).item()
    model.load_state_dict(state)
    return grid


def _variants(cfg):
    """The three configs of the figure: FP32, Q_1 alone (STE), the DQA mixture."""
    plan = cfg.plan.to_dict()
    fp = {**plan, "weight": None, "act": None, "layers": {}, "method": {"name": "ste"}}
    single = {**plan, "method": {"name": "ste"}}
    return {
        "FP32": cfg.model_copy(update={"plan": type(cfg.plan).from_dict(fp)}),
        "single": cfg.model_copy(update={"plan": type(cfg.plan).from_dict(single)}),
        "DQA": cfg,
    }


def loss_surface(config, out_png: str | Path, steps: int = 21, span: float = 1.0, batch_size: int = 128,
                 seed: int = 0, temperature: float | None = None, overrides: list[str] | None = None) -> Path:
    """Draw 003 Figure 4 for a DQA config (a :class:`~lowbit.config.Config` or a YAML path, with
    ``overrides``): three contour panels (FP32, Q_1 alone, DQA mixture) of the loss on one batch of
    ``batch_size`` training images along two filter-normalised random directions (``seed``), on a
    ``steps`` × ``steps`` grid over [-span, span]². Writes ``out_png`` and, next to it, a JSON file
    with the grids and their :func:`roughness`. Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..config import Config, load_config
    from ..data import BatchLoader, load_dataset
    from ..methods.dqa import DQA
    from ..methods.mixture import AttentionMixture
    from ..quantize import quant_state
    from ..train import build_model

    cfg = config if isinstance(config, Config) else load_config(config, overrides or [])
    if cfg.plan.method.name != "dqa" or cfg.plan.weight is None:
        raise ConfigError("loss_surface needs a DQA config: plan.weight (Q_1) and plan.method.name: dqa")
    if not isinstance(steps, int) or steps < 3:
        raise ConfigError(f"steps must be an integer >= 3, got {steps!r}")
    if not span > 0:
        raise ConfigError(f"span must be > 0, got {span!r}")
    d = cfg.data
    limit = math.ceil(batch_size / (1 - d.val_fraction)) + 1
    data = load_dataset(d.name, root=d.root, val_fraction=d.val_fraction, seed=cfg.train.seed, limit=limit)
    x, y = next(iter(BatchLoader(data.train, data.info, batch_size)))

    models = {k: build_model(c, data) for k, c in _variants(cfg).items()}  # same seed: same latent weights
    method = quant_state(models["DQA"]).method
    assert isinstance(method, DQA)
    t = method.t0 if temperature is None else float(temperature)
    for m in models["DQA"].modules():
        if isinstance(m, AttentionMixture):
            m.temperature = t
            m.normalize_()  # what the first training step sees (Algorithm 1)
    g = torch.Generator().manual_seed(seed)
    ref = weight_layers(models["FP32"])
    d1 = filter_normalized_direction(ref, g)
    d2 = filter_normalized_direction(ref, g)
    alphas = torch.linspace(-span, span, steps)
    grids = {k: surface(m, x, y, d1, d2, alphas) for k, m in models.items()}

    q1 = cfg.plan.weight.label()
    mix = "+".join([q1] + [f"{s['name']}{s.get('bits', '')}" for s in method.mixture])
    titles = {"FP32": "float32", "single": f"{q1} only", "DQA": f"DQA {mix} (T={t:g})"}
    lo = min(float(v.min()) for v in grids.values())
    hi = max(float(v.max()) for v in grids.values())
    levels = torch.linspace(lo, hi, 30).tolist() if hi > lo else 30
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, (k, grid) in zip(axes, grids.items()):
        cs = ax.contour(alphas.numpy(), alphas.numpy(), grid.T.numpy(), levels=levels, cmap="viridis")
        ax.clabel(cs, cs.levels[::4], fontsize=6, fmt="%.2f")
        ax.set_title(f"{titles[k]}\nroughness {roughness(grid):.4f}", fontsize=10)
        ax.set_xlabel("direction 1")
        ax.set_aspect("equal")
    axes[0].set_ylabel("direction 2")
    fig.suptitle(f"loss on one batch of {batch_size} ({cfg.model.name}, random init, {steps}x{steps} grid)",
                 fontsize=10)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    out.with_suffix(".json").write_text(json.dumps({
        "alphas": alphas.tolist(), "temperature": t, "titles": titles,
        "roughness": {k: roughness(v) for k, v in grids.items()},
        "grids": {k: v.tolist() for k, v in grids.items()},
    }) + "\n")
    return out
