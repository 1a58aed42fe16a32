"""lowbit.viz: 003 Figure 3 (attention over training) and Figure 4 (loss surfaces)."""

import json

import pytest
import torch
import torch.nn.functional as F

from lowbit.config import load_config
from lowbit.data import BatchLoader, load_dataset
from lowbit.errors import ConfigError
from lowbit.models import create_model
from lowbit.train import run
from lowbit.viz import filter_normalized_direction, loss_surface, plot_attention, roughness
from lowbit.viz.attention import pick_epochs

PNG = b"\x89PNG\r\n\x1a\n"
DQA = ["plan.weight={name: minmax, bits: 2}",
       "plan.method={name: dqa, mixture: [{name: minmax, bits: 4}, {name: minmax, bits: 8}]}"]


def write_metrics(run_dir, rows):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def fake_rows():
    """Three epochs of a DQA run with one weight mixture (conv) and one activation mixture (act)."""
    rows = []
    for e, a in enumerate(([0.4, 0.35, 0.25], [0.8, 0.15, 0.05], [1.0, 0.0, 0.0]), 1):
        rows.append({"epoch": e, "temperature": 100 * 0.1**e, "attention": {"conv": a},
                     "act_attention": {"act": a[::-1]},
                     "mixture": {"conv": ["minmax2", "minmax4", "minmax8"], "act:act": ["pact2", "pact4", "pact8"]},
                     "qfunc": {"conv": [[-1.0, 0.0, 1.0], [-0.9, 0.1, 0.9]]}})
    return rows


def test_plot_attention_from_metrics(tmp_path):
    run_dir = tmp_path / "run"
    write_metrics(run_dir, fake_rows())
    out = plot_attention(run_dir)
    assert out == run_dir / "attention_conv.png" and out.read_bytes()[:8] == PNG
    out = plot_attention(run_dir, layer="act", out_png=tmp_path / "figs" / "a.png")  # activation attention
    assert out == tmp_path / "figs" / "a.png" and out.read_bytes()[:8] == PNG
    with pytest.raises(ConfigError, match="layer 'nope' has no mixture .*layers: conv, act"):
        plot_attention(run_dir, layer="nope")
    write_metrics(tmp_path / "plain", [{"epoch": 1, "val_acc": 0.5}])
    with pytest.raises(ConfigError, match="no attention records"):
        plot_attention(tmp_path / "plain")
    with pytest.raises(ConfigError, match="not a run folder"):
        plot_attention(tmp_path / "missing")


def test_pick_epochs():
    assert pick_epochs(3) == [0, 1, 2]
    assert pick_epochs(9) == [0, 2, 4, 6, 8]
    assert pick_epochs(30, 3) == [0, 14, 29]  # round(14.5) = 14 (banker's rounding), ends kept


def test_plot_attention_of_a_real_dqa_run(tmp_path, fmnist_small):
    cfg = load_config(None, ["model.name=resnet8", "model.width=0.25", "train.epochs=1", "train.batch_size=128",
                             "train.progress=false", "train.threads=1", *DQA])
    run(cfg, tmp_path / "r", data=fmnist_small)
    out = plot_attention(tmp_path / "r", layer="layers.1.0.conv1")
    assert out.read_bytes()[:8] == PNG


def test_filter_normalised_direction_has_the_filter_norms_of_the_weights():
    w = {"a": torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 0.0]]), "b": torch.ones(2, 1, 3, 3)}
    d = filter_normalized_direction(w, torch.Generator().manual_seed(0))
    assert d["a"].norm(dim=1).tolist() == pytest.approx([5.0, 1.0, 0.0], abs=1e-6)
    assert d["b"].flatten(1).norm(dim=1).tolist() == pytest.approx([3.0, 3.0])
    assert not torch.allclose(d["b"][0], d["b"][1])  # random, not the weights themselves


def test_roughness_of_hand_grids():
    x = torch.arange(4.0)
    assert roughness(2 * x[:, None] - 3 * x[None, :] + 1) == pytest.approx(0.0)  # a plane
    bump = torch.zeros(3, 3)
    bump[1, 1] = 1.0
    assert roughness(bump) == pytest.approx(4 / 6)  # |0-2+0| once along each axis, 6 terms


def test_loss_surface_centre_is_the_loss_of_each_network(tmp_path):
    base = ["model.name=resnet8", "model.width=0.25", "train.seed=3", *DQA]
    out = loss_surface(load_config(None, base), tmp_path / "s.png", steps=3, span=0.5, batch_size=16)
    assert out.read_bytes()[:8] == PNG
    rec = json.loads((tmp_path / "s.json").read_text())
    assert rec["alphas"] == pytest.approx([-0.5, 0.0, 0.5]) and rec["temperature"] == 100
    g = {k: torch.tensor(v) for k, v in rec["grids"].items()}
    assert all(v.shape == (3, 3) for v in g.values())
    # independently: the FP32 network with the same seed, train-mode BatchNorm, the same first batch
    data = load_dataset("fashion-mnist", val_fraction=0.05, seed=3, limit=18)
    x, y = next(iter(BatchLoader(data.train, data.info, 16)))
    torch.manual_seed(3)
    fp = create_model("resnet8", in_channels=1, num_classes=10, image_size=28, width=0.25).train()
    with torch.no_grad():
        assert g["FP32"][1, 1].item() == pytest.approx(F.cross_entropy(fp(x), y).item(), rel=1e-5)
    assert g["single"][1, 1] != g["FP32"][1, 1] and g["DQA"][1, 1] != g["single"][1, 1]
    assert len({round(v, 6) for v in g["FP32"].flatten().tolist()}) > 1  # the directions move the loss
    with pytest.raises(ConfigError, match="needs a DQA config"):
        loss_surface(load_config(None, ["plan.weight={name: minmax, bits: 2}"]), tmp_path / "x.png")
