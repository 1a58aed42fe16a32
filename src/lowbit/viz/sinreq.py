"""Pictures of a SinReQ / SINAREQ run (seed 001) and the quantization error it ends with.

* :func:`plot_bits`: per-layer learned bits over training (β, a line per layer, dashed: ceil(β), the
  bits in use) and the final bits as bars: from ``metrics.jsonl`` (SINAREQ runs record ``beta`` and
  ``bits`` every epoch).
* :func:`plot_weight_histogram`: one layer's latent weights in the quantizer's own domain before
  training (the run's initial weights: the model rebuilt from its config and seed) and after (the
  reported network, ``best.pt`` through ``finalize``), with the levels marked. 001's claim is that
  SinReQ gathers the weights at the levels.
* :func:`sinreq_report`: both figures and the quantization error mean |u - Q(u)|/Δ per layer
  (:func:`lowbit.methods.sinreq.quantization_error`) before and after; ``lowbit report sinreq RUN_DIR``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import ConfigError
from ..methods.sinreq import latent_weight, quantization_error, quantized_layers, sin_grid


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no metrics.jsonl)")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def plot_bits(run_dir: str | Path, out_png: str | Path | None = None) -> Path:
    """Per-layer β over the epochs (solid; dashed: the integer bits in use) and the final bits
    (bars). Default PNG: ``RUN_DIR/sinareq_bits.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = [r for r in _metrics(run_dir) if r.get("beta")]
    if not rows:
        raise ConfigError(f"{run_dir}: metrics.jsonl has no learned bits (train with method sinareq)")
    layers = list(rows[-1]["beta"])
    epochs = [r["epoch"] for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    cmap = plt.get_cmap("tab10" if len(layers) <= 10 else "viridis")
    for i, name in enumerate(layers):
        col = cmap(i / max(len(layers) - 1, 1)) if len(layers) > 10 else cmap(i)
        ax.plot(epochs, [r["beta"][name] for r in rows], color=col, marker="o", ms=3, label=name)
        ax.plot(epochs, [r["bits"][name] for r in rows], color=col, ls="--", lw=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("bits (β solid, ceil β dashed)")
    ax.set_title("learned bits per layer")
    ax.legend(fontsize=6, ncol=2)
    final = [rows[-1]["bits"][n] for n in layers]
    bx.bar(range(len(layers)), final, color="tab:blue")
    bx.set_xticks(range(len(layers)))
    bx.set_xticklabels(layers, rotation=70, fontsize=6)
    bx.set_ylabel("final weight bits")
    bx.set_title(f"final bits (mean {sum(final) / len(final):.2f} per layer)")
    fig.tight_layout()
    out = Path(out_png) if out_png else run_dir / "sinareq_bits.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _domain_and_levels(module, wp) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's latent weight in its quantizer's domain and the levels there (first row per channel)."""
    with torch.no_grad():
        module.weight  # noqa: B018 (a forward of the parametrization records the current grid)
        u, c, step, h = sin_grid(wp.quantizer, latent_weight(module))
        d = wp.quantizer.describe()
        k = torch.arange(d.qmin, d.qmax + 1, dtype=u.dtype)
        low, st = d.low.reshape(-1)[0].to(u.dtype), d.step.reshape(-1)[0].to(u.dtype)
        return u.flatten(), low + k * st


def plot_weight_histogram(run_dir: str | Path, layer: str | None = None, out_png: str | Path | None = None) -> Path:
    """Histogram of ``layer``'s weights (default: the first quantized layer) in the quantizer's
    domain, at initialisation and at the end of the run, levels as vertical lines. Default PNG:
    ``RUN_DIR/sinreq_hist_<layer>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before, after = _models(Path(run_dir))
    layers = {n: (m, wp) for n, m, wp in quantized_layers(after)}
    layer = layer or next(iter(layers))
    if layer not in layers:
        raise ConfigError(f"layer '{layer}' is not quantized in {run_dir}; layers: {', '.join(layers)}")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, (title, model) in zip(axes, (("before training", before), ("after training", after))):
        mod, wp = {n: (m, p) for n, m, p in quantized_layers(model)}[layer]
        u, levels = _domain_and_levels(mod, wp)
        ax.hist(u.numpy(), bins=min(200, max(40, u.numel() // 20)), color="tab:blue", alpha=0.8)
        for v in levels.tolist():
            ax.axvline(v, color="tab:red", lw=0.7, ls="--")
        err = quantization_error(model).get(layer, float("nan"))
        ax.set_title(f"{layer}, {title}: {wp.bits} bits, |u-Q(u)|/step {err:.3f}", fontsize=9)
        ax.set_xlabel(f"weight in the domain of '{wp.quantizer.alias}' (levels dashed)")
    axes[0].set_ylabel("count")
    fig.tight_layout()
    out = Path(out_png) if out_png else Path(run_dir) / f"sinreq_hist_{_safe(layer)}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _models(run_dir: Path):
    """(the run's initial network, the network it reports), both in eval mode, quantizers called once."""
    from ..train import build_model, load_run

    cfg, data, after, _ = load_run(run_dir)
    before = build_model(cfg, data)  # the same seed: the initial weights of the run
    before.eval()
    x = (data.test.images[:2].float() / 255.0)
    with torch.no_grad():
        before(x)
        after(x)
    return before, after


def sinreq_report(run_dir: str | Path, layer: str | None = None, out_dir: str | Path | None = None) -> dict:
    """The figures of a SinReQ / SINAREQ run (histogram; bits when learned) and its quantization
    error before and after training: ``{"files", "error" (per layer, after), "error_before",
    "error_after" (means)}``."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir
    before, after = _models(run_dir)
    e0, e1 = quantization_error(before), quantization_error(after)
    name = layer or next(iter(e1), None)
    if name is None:
        raise ConfigError(f"{run_dir}: no quantized layer with a uniform grid")
    files = [plot_weight_histogram(run_dir, name, out_dir / f"sinreq_hist_{_safe(name)}.png")]
    if any(r.get("beta") for r in _metrics(run_dir)):
        files.append(plot_bits(run_dir, out_dir / "sinareq_bits.png"))
    mean = lambda d: sum(d.values()) / len(d) if d else float("nan")  # noqa: E731
    return {"files": files, "error": e1, "error_before": mean(e0), "error_after": mean(e1), "layer": name}


def format_error(res: dict) -> str:
    lines = ["quantization error mean |u - Q(u)| / step (0 = on the levels, 0.25 = evenly spread):",
             f"  mean over layers: {res['error_before']:.4f} at initialisation -> {res['error_after']:.4f} at the end"]
    lines += [f"  {k:<28s} {v:.4f}" for k, v in res["error"].items()]
    return "\n".join(lines)
