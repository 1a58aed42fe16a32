"""003 Figure 3: a layer's attention over training and the quantization function it produces.

Reads only the run folder's ``metrics.jsonl``: every epoch line of a DQA (or BinaryRelax) run holds
``attention`` (per layer, the K coefficients, Q_1 first), ``mixture`` (the member labels) and
``qfunc`` (per layer, points (w, q(w)) of q(w) = Σ_k a_k Q_k(w) on the layer's own weights), written
by :meth:`lowbit.methods.mixture.MixtureMethod.epoch_record`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import ConfigError


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no metrics.jsonl)")
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if r.get("attention") or r.get("act_attention")]
    if not rows:
        raise ConfigError(f"{run_dir}: metrics.jsonl has no attention records (train with method dqa or binaryrelax)")
    return rows


def pick_epochs(n: int, k: int = 5) -> list[int]:
    """Up to ``k`` indices spread evenly over 0..n-1, first and last included."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def plot_attention(run_dir: str | Path, layer: str | None = None, out_png: str | Path | None = None) -> Path:
    """Draw 003 Figure 3 for ``layer`` (default: the first quantized layer) of a finished or running
    DQA / BinaryRelax run: (a) its attention a_k per epoch, with the temperature; (b) its
    quantization function q(w) at up to five epochs. An activation mixture is chosen by its layer
    name when that layer has no weight mixture (panel (b) is then left out). Returns the PNG path
    (default ``RUN_DIR/attention_<layer>.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = _rows(run_dir)
    w_layers = list(rows[-1].get("attention", {}))
    a_layers = list(rows[-1].get("act_attention", {}))
    if layer is None:
        layer = (w_layers or a_layers)[0]
    if layer in w_layers:
        key, lab_key = "attention", layer
    elif layer in a_layers:
        key, lab_key = "act_attention", f"{layer}:act"
    else:
        raise ConfigError(f"layer '{layer}' has no mixture in {run_dir}; layers: {', '.join(w_layers + a_layers)}")
    rows = [r for r in rows if layer in r.get(key, {})]
    epochs = [r["epoch"] for r in rows]
    att = [r[key][layer] for r in rows]
    labels = rows[-1].get("mixture", {}).get(lab_key) or [f"Q{k + 1}" for k in range(len(att[-1]))]
    has_q = key == "attention" and all(layer in r.get("qfunc", {}) for r in rows)

    fig, axes = plt.subplots(1, 2 if has_q else 1, figsize=(11 if has_q else 5.5, 4.2), squeeze=False)
    ax = axes[0][0]
    for k, name in enumerate(labels):
        ax.plot(epochs, [a[k] for a in att], marker="o", ms=3, label=f"a{k + 1} ({name})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("attention a_k")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"(a) attention, {layer}{' (input)' if key == 'act_attention' else ''}")
    sched = next((s for s in ("temperature", "omega", "eta") if s in rows[-1]), None)
    if sched:
        tw = ax.twinx()
        tw.plot(epochs, [r[sched] for r in rows], color="0.5", ls="--", lw=1, label=sched)
        tw.set_yscale("log")
        tw.set_ylabel(f"{sched} (dashed, at epoch end)")
    ax.legend(loc="center left", fontsize=8)

    if has_q:
        ax = axes[0][1]
        picks = pick_epochs(len(rows))
        cmap = plt.get_cmap("viridis")
        for j, i in enumerate(picks):
            w, q = rows[i]["qfunc"][layer]
            a = ", ".join(f"{v:.2f}" for v in att[i])
            ax.plot(w, q, marker=".", ms=3, lw=1.2, color=cmap(j / max(len(picks) - 1, 1)),
                    label=f"epoch {epochs[i]}: a=[{a}]")
        w_all = [v for i in picks for v in rows[i]["qfunc"][layer][0]]
        lo, hi = min(w_all), max(w_all)
        ax.plot([lo, hi], [lo, hi], color="0.7", lw=0.8, ls=":", label="identity")
        ax.set_xlabel("latent weight w")
        ax.set_ylabel("q(w) = Σ a_k Q_k(w)")
        ax.set_title(f"(b) quantization function, {layer}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out_png) if out_png else run_dir / f"attention_{re.sub(r'[^A-Za-z0-9._-]+', '_', layer)}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
