"""DCQ: each section's loss over its training epochs (from a DCQ run folder's ``sections/*.jsonl``).

Feature sections show their feature MSE (training, solid; validation, dashed); the last section its
task loss (cross-entropy, with KD if configured). Log scale: the sections' losses differ by orders
of magnitude.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError


def section_rows(run_dir: str | Path) -> dict[int, list[dict]]:
    """Per-epoch rows of every section of a DCQ run folder (finished or running)."""
    sdir = Path(run_dir) / "sections"
    if not sdir.is_dir():
        raise ConfigError(f"{run_dir} is not a DCQ run folder (no sections/)")
    out = {}
    for p in sorted(sdir.glob("section_*.jsonl"), key=lambda p: int(p.stem.split("_")[1])):
        rows = []
        for ln in p.read_text().splitlines():
            try:
                rows.append(json.loads(ln))
            except ValueError:  # a line being written
                break
        out[int(p.stem.split("_")[1])] = rows
    return out


def plot_dcq(run_dir: str | Path, out_png: str | Path | None = None) -> Path:
    """Draw each section's training (and validation) loss per epoch; returns the PNG path
    (default ``RUN_DIR/dcq_loss.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    data = section_rows(run_dir)
    if not data:
        raise ConfigError(f"{run_dir}: no section has finished an epoch yet")
    meta_path = run_dir / "sections.json"
    meta = json.loads(meta_path.read_text())["sections"] if meta_path.is_file() else []
    last = max(data)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, rows in data.items():
        if not rows:
            continue
        ep = [r["epoch"] for r in rows]
        blocks = meta[i]["blocks"] if i < len(meta) else []
        span = f" ({blocks[0]} .. {blocks[-1]})" if blocks else ""
        what = "task loss" if i == last else "feature MSE"
        line, = ax.plot(ep, [r["train_loss"] for r in rows], marker="o", label=f"section {i}{span}: {what}")
        val = [r.get("val_loss") for r in rows]
        if all(v is not None and v == v for v in val):
            ax.plot(ep, val, ls="--", color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (solid: training, dashed: validation)")
    ax.set_title(f"DCQ sections: {run_dir.parent.name}/{run_dir.name}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out_png) if out_png else run_dir / "dcq_loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
