"""Pictures of a ReLeQ search (seed 001): the learning curve and the chosen bits per layer.

* :func:`plot_history`: the reward of each episode's final assignment and its average bits over
  the episodes (thin: per episode; thick: running mean over 10 episodes).
* :func:`plot_bits`: the chosen bits per layer as bars, beside each layer's sensitivity (the
  validation-accuracy drop with that layer alone at the smallest width, from the sensitivity
  baseline) on a second axis.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _running(v, k=10):
    v = np.asarray(v, dtype=float)
    return np.array([v[max(0, i - k + 1): i + 1].mean() for i in range(len(v))])


def plot_history(history: list[dict], out_png: str | Path) -> Path:
    plt = _plt()
    ep = [h["episode"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    r = [h["final_reward"] for h in history]
    ax.plot(ep, r, color="tab:blue", alpha=0.3, lw=0.8)
    ax.plot(ep, _running(r), color="tab:blue", lw=2, label="reward")
    ax.set_xlabel("episode")
    ax.set_ylabel("reward (final assignment)", color="tab:blue")
    ax2 = ax.twinx()
    b = [h["avg_bits"] for h in history]
    ax2.plot(ep, b, color="tab:orange", alpha=0.3, lw=0.8)
    ax2.plot(ep, _running(b), color="tab:orange", lw=2, label="average bits")
    ax2.set_ylabel("average bits", color="tab:orange")
    ax.set_title("ReLeQ: reward and average bits over episodes")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def plot_bits(layers: list[str], bits, drop: dict | None, choices, out_png: str | Path) -> Path:
    """``drop``: {(layer index, bits): accuracy drop} from the sensitivity table (or None)."""
    plt = _plt()
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(layers) + 2), 3.6))
    w = 0.38 if drop else 0.6
    ax.bar(x - (w / 2 if drop else 0), bits, w, color="tab:blue", label="chosen bits")
    ax.set_ylabel("bits", color="tab:blue")
    ax.set_ylim(0, max(choices) + 0.5)
    ax.set_xticks(x, layers, rotation=30, ha="right")
    if drop:
        ax2 = ax.twinx()
        lo = min(choices)
        d = [100 * drop[(i, lo)] for i in range(len(layers))]
        ax2.bar(x + w / 2, d, w, color="tab:red", label=f"sensitivity (acc drop at {lo} bits alone)")
        ax2.set_ylabel(f"val acc drop at {lo} bits alone (pt)", color="tab:red")
        ax2.axhline(0, color="grey", lw=0.5)
    ax.set_title("ReLeQ's bits per layer beside per-layer sensitivity")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
