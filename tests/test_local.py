"""Local-loss block training (lowbit.methods.local, lowbit.ondevice.units)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit.cost import profile
from lowbit.errors import ConfigError
from lowbit.ondevice.units import blocks

pytestmark = pytest.mark.usefixtures("one_torch_thread")

W3A3 = {"weight": {"name": "sawb", "bits": 3}, "act": {"name": "pact", "bits": 3}}


def local_model(greedy=False, name="resnet8", method="local"):
    torch.manual_seed(0)
    m = lowbit.create_model(name, in_channels=1, num_classes=10, image_size=8, width=0.25)
    opts = {"greedy": greedy} if method == "local" else {}
    lowbit.quantize(m, {**W3A3, "method": {"name": method, **opts}})
    meth = lowbit.quant_state(m).method
    opt = torch.optim.SGD([p for g in meth.param_groups(m) for p in g["params"]], lr=0.05, momentum=0.9)
    return m, meth, opt


def batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_blocks_of_the_zoo():
    m = lowbit.create_model("resnet8", in_channels=1, image_size=8)
    bl, out = blocks(m)
    # each conv of a residual block is a block of its own, as in the reference code (its BasicBlock has two
    # LocalLossBlockConv); the shortcut trains with conv2's (before session 30 a residual block was one block)
    r = lambda i: [f"layers.{i}.0.{n}" for n in ("conv1", "bn1", "relu1")]  # noqa: E731
    t = lambda i: [f"layers.{i}.0.{n}" for n in ("conv2", "bn2", "shortcut", "relu2")]  # noqa: E731
    assert [b.names for b in bl] == [["conv1", "bn1", "relu"], r(0), t(0), r(1), t(1), r(2), t(2) + ["pool", "flatten"]]
    assert [b.residual for b in bl] == [None, None, m.layers[0][0], None, m.layers[1][0], None, m.layers[2][0]]
    # the heads read a block's output before its pooling, as the reference computes a block's loss before the
    # network's pooling layers: ResNet's last block before the global pool (a 64-channel map, not 64 features)
    assert [b.out_name for b in bl][-1] == "layers.2.0.relu2" and bl[-1].out is m.layers[2][0].relu2
    assert [b.width for b in bl] == [16, 16, 16, 32, 32, 64, 64] and all(b.spatial for b in bl)
    assert [n for n, _ in out] == ["fc"]
    v = lowbit.create_model("vgg_small", in_channels=1, image_size=8, width=0.25)
    vb = blocks(v)[0]
    assert len(vb) == 6 and vb[1].names[-1] == "features.6" and vb[1].out_name == "features.5"  # conv bn relu | maxpool
    # LeNet-5: its conv blocks' heads read the ReLU's map before the max-pool (and the flatten)
    le = lowbit.create_model("lenet5", in_channels=1, image_size=28)
    b = blocks(le)[0][1]
    assert b.names[-1] == "flatten" and b.out_name == "features.4" and (b.width, b.spatial) == (16, True)


def test_blocks_as_before_session_30():
    # split_residual: false, heads_before_pool: false: lowbit's blocks before session 30 (for comparison)
    m = lowbit.create_model("resnet8", in_channels=1, image_size=8)
    bl, _ = blocks(m, split_residual=False, heads_before_pool=False)
    assert [b.names for b in bl] == [["conv1", "bn1", "relu"], ["layers.0.0"], ["layers.1.0"],
                                     ["layers.2.0", "pool", "flatten"]]
    assert [b.width for b in bl] == [16, 16, 32, 64] and [b.spatial for b in bl] == [True, True, True, False]
    le = lowbit.create_model("lenet5", in_channels=1, image_size=28)
    b = blocks(le, heads_before_pool=False)[0][1]
    assert b.out_name == "features.5" and (b.width, b.spatial) == (16, True)  # the pooled map before the flatten
    from lowbit.methods import build_method

    meth = build_method("local", split_residual=False, heads_before_pool=False)
    meth.attach(m)
    assert [b.out_name for b in meth.blocks] == ["relu", "layers.0.0", "layers.1.0", "flatten"]


def test_a_residual_block_of_another_layout_stays_one_block():
    class Res(nn.Module):  # conv1 conv2 shortcut, ReLUs in forward: not the zoo's layout
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.shortcut = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Identity()

        def forward(self, x):
            return self.conv2(self.conv1(x)) + self.shortcut(x)

    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), Res(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    bl, _ = blocks(m)
    assert [b.names for b in bl] == [["0"], ["1", "2"]] and bl[1].out_name == "1" and bl[1].residual is None


def test_no_gradient_reaches_an_earlier_block():
    m, meth, opt = local_model()
    bl = meth.blocks
    # block 0's own loss contributes nothing: any gradient in block 0 would have come from a later block
    real = meth.heads[0].forward
    meth.heads[0].forward = lambda h, y, beta: 0.0 * real(h, y, beta)
    seen = []
    # prepended: before the conv's own input quantizer, whose learned clip makes its output require grad
    hook = bl[1].modules[0].register_forward_pre_hook(lambda mod, a: seen.append(a[0].requires_grad), prepend=True)
    meth.setup(m, 10, 10)
    meth.train_step(m, batch(), opt, 0)
    hook.remove()
    assert seen == [False]  # block 1 receives a detached input
    g0 = [p.grad for b in bl[:1] for mod in b.modules for p in mod.parameters()]
    g1 = [p.grad for b in bl[1:2] for mod in b.modules for p in mod.parameters()]
    assert all(g is None or not g.any() for g in g0)
    assert any(g is not None and g.abs().sum() > 0 for g in g1)
    # the same model trained by backprop (STE) does get gradients in block 0
    m2, meth2, opt2 = local_model(method="ste")
    meth2.train_step(m2, batch(), opt2, 0)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m2.conv1.parameters())


def test_heads_are_training_only_not_in_cost_or_export(tmp_path):
    from lowbit.export import export_model

    m, meth, opt = local_model()
    ref, _, _ = local_model(method="ste")
    lowbit.fit(m, [batch(16, s) for s in range(3)], method=meth, optimizer=opt, epochs=1)
    n_heads = sum(p.numel() for p in meth.heads.parameters())
    assert n_heads > 0
    x = torch.randn(2, 1, 8, 8)
    assert profile(m, x, lowbit.layer_bits(m)).params == profile(ref, x, lowbit.layer_bits(ref)).params
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in ref.parameters())
    assert "head" not in lowbit.quant_state(m).table()
    rep = export_model(m, torch.randn(8, 1, 8, 8), tmp_path, formats=("packed",))
    assert rep["numpy"]["agreement"] == 1.0
    assert len(rep["layers"]) == sum(isinstance(mod, (nn.Conv2d, nn.Linear)) for mod in m.modules())


def test_greedy_trains_one_block_at_a_time():
    m, meth, opt = local_model(greedy=True)
    n = len(meth.blocks)
    meth.setup(m, 4 * n, 4)
    meth.on_step(m, 4)  # stage 1
    before = {k: v.clone() for k, v in m.state_dict().items()}
    res = meth.train_step(m, batch(), opt, 4)
    assert res.output is None  # the forward stopped after block 1
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("layers.0.0.") for k in changed), sorted(changed)[:5]
    meth.on_step(m, 4 * n - 1)  # last stage: the last block and the output layer
    res = meth.train_step(m, batch(), opt, 4 * n - 1)
    assert res.output is not None and m.fc.weight.grad is not None


def test_local_loss_learns_digits():
    from lowbit.data import BatchLoader, load_dataset

    d = load_dataset("digits")
    train = [b for _, b in zip(range(12), BatchLoader(d.train, d.info, 64, shuffle=True, seed=0))]
    m, meth, _ = local_model()
    opt = torch.optim.Adam([p for g in meth.param_groups(m) for p in g["params"]], lr=0.01)
    hist = lowbit.fit(m, train, method=meth, optimizer=opt, epochs=3,
                      val_batches=BatchLoader(d.test, d.info, 400))
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert hist[-1]["val_acc"] > 0.35  # chance is 0.1


def test_local_options_are_checked():
    with pytest.raises(ConfigError, match="beta"):
        lowbit.methods.build_method("local", beta=1.5)
    with pytest.raises(ConfigError, match="greedy"):
        lowbit.methods.build_method("local", greedy="yes")
    for k in ("split_residual", "heads_before_pool"):
        with pytest.raises(ConfigError, match=k):
            lowbit.methods.build_method("local", **{k: 1})


def test_greedy_blocks_each_get_a_fresh_schedule_and_optimizer(tmp_path, fmnist_small, monkeypatch):
    """Greedy training through lowbit.run: every block's first step runs at train.lr with an empty
    optimizer state, and its share anneals (one cosine over the whole run left the last block at
    lr <= 0.15·train.lr, and greedy training failed)."""
    from lowbit.config import load_config
    from lowbit.methods.local import LocalLoss
    from lowbit.train import run

    seen = {}
    real = LocalLoss.train_step

    def recording(self, model, batch, optimizer, step):
        res = real(self, model, batch, optimizer, step)
        trainable = [p for p in model.parameters() if p.requires_grad] + list(self.heads[self._stage].parameters())
        seen[step] = (optimizer.param_groups[0]["lr"], self._stage, {id(p) for p in optimizer.state},
                      {id(p) for p in trainable})
        return res

    monkeypatch.setattr(LocalLoss, "train_step", recording)
    base = ["model.name=resnet8", "model.width=0.25", "train.batch_size=256", "train.lr=0.01",
            "train.optimizer=adam", "train.weight_decay=0", "train.progress=false", "train.threads=1",
            "plan.weight={name: sawb, bits: 3}", "plan.act={name: pact, bits: 3}",
            "plan.method={name: local, greedy: true}", "train.epochs=7"]
    run(load_config(None, base), tmp_path / "r", data=fmnist_small)
    steps = len(seen)  # 5 batches per epoch, 7 epochs, 7 blocks: block k starts at step 5k
    assert steps == 35
    starts = [s for s in range(steps) if s == 0 or seen[s][1] != seen[s - 1][1]]
    assert starts == list(range(0, 35, 5)) and [seen[s][1] for s in starts] == list(range(7))
    for s in starts:
        assert seen[s][0] == pytest.approx(0.01)  # the lr the step ran at (the scheduler steps after it)
        assert seen[s + 4][0] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 4 / 5)))  # the block's cosine
        lr, _, state, trainable = seen[s]
        assert state and state <= trainable  # Adam's state: only this block's (and its head's) parameters


def test_greedy_schedule_that_cannot_restart_is_refused(tmp_path, fmnist_small):
    from lowbit.config import load_config
    from lowbit.train import run

    cfg = load_config(None, ["model.name=resnet8", "model.width=0.25", "train.epochs=2", "train.schedule=onecycle",
                             "train.progress=false", "plan.method={name: local, greedy: true}"])
    with pytest.raises(ConfigError, match="restart") as e:
        run(cfg, tmp_path / "r", data=fmnist_small)
    assert "\n" not in str(e.value)


def test_flat_block_sim_head_projects_as_the_reference():
    # anokland/local-loss train.py LocalLossBlockLinear: Rh = similarity_matrix(linear_loss(h)), linear_loss =
    # Linear(num_out, num_out, bias=False) (train.py:502-503, 572-574); the flat blocks used h itself
    from lowbit.methods.local import LocalHead, similarity_matrix

    torch.manual_seed(0)
    head = LocalHead(84, spatial=False, num_classes=10, dim_in_decoder=2048)
    assert isinstance(head.sim, nn.Linear) and head.sim.bias is None and head.sim.weight.shape == (84, 84)
    h = torch.relu(torch.randn(16, 84))
    h[0] = 0  # an image whose block output is all zero: the norm's gradient must not be NaN
    y = torch.randint(0, 10, (16,))
    ry = similarity_matrix(nn.functional.one_hot(y, 10).float())
    want = 0.01 * nn.functional.cross_entropy(head.pred(h), y) + 0.99 * nn.functional.mse_loss(similarity_matrix(head.sim(h)), ry)
    loss = head(h, y, 0.99)
    assert torch.allclose(loss, want)
    loss.backward()
    assert torch.isfinite(head.sim.weight.grad).all()


def test_heads_saved_by_an_older_version_are_one_line():
    """Heads saved before session 27 (flat blocks' sim heads without weights) or before session 30 (a residual block
    one block, four heads for ResNet-8 where there are seven now): the resume was torch's multi-line "Missing key(s)
    in state_dict"."""
    m, meth, _ = local_model()
    assert meth.heads is not None and len(meth.heads) == 7
    state = meth.state_dict()
    state["heads"] = {k: v for k, v in state["heads"].items() if int(k.split(".")[0]) < 4}
    with pytest.raises(ConfigError, match="the saved heads do not fit") as e:
        meth.load_state_dict(state)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("beta", [0.99, 1.0])
def test_output_layer_loss_is_scaled_as_the_reference(beta):
    # anokland/local-loss train.py:1531-1533: the output layer's cross-entropy is multiplied by (1 - beta) under
    # predsim; at beta = 1 (its "sim" loss) it is not (before session 30 lowbit never scaled it)
    torch.manual_seed(0)
    m = lowbit.create_model("resnet8", in_channels=1, num_classes=10, image_size=8, width=0.25)
    lowbit.quantize(m, {**W3A3, "method": {"name": "local", "beta": beta}})
    meth = lowbit.quant_state(m).method
    opt = torch.optim.SGD([p for g in meth.param_groups(m) for p in g["params"]], lr=0.0)
    meth.setup(m, 10, 10)
    x, y = batch()
    m.train()
    res = meth.train_step(m, (x, y), opt, 0)
    want = torch.autograd.grad(nn.functional.cross_entropy(m(x), y), m.fc.weight)[0]
    scale = 0.01 if beta < 1 else 1.0
    assert torch.allclose(m.fc.weight.grad, scale * want, rtol=1e-4, atol=1e-7)
    assert res.loss == pytest.approx(nn.functional.cross_entropy(m(x), y).item(), rel=1e-5)  # reported unscaled


def test_pred_head_zeroes_only_its_weight_as_the_reference():
    from lowbit.methods.local import LocalHead

    torch.manual_seed(0)
    head = LocalHead(16, spatial=True, num_classes=10, dim_in_decoder=2048)
    assert not head.pred[-1].weight.any() and head.pred[-1].bias.abs().sum() > 0  # train.py:499/706: weight only


def test_the_shortcut_trains_with_the_second_conv():
    m, meth, opt = local_model(greedy=True)
    n = len(meth.blocks)
    b = meth.blocks[4]  # layers.1.0's conv2 .. relu2, with the projection shortcut
    assert b.residual is m.layers[1][0] and isinstance(m.layers[1][0].shortcut, nn.Sequential)
    meth.setup(m, n, 1)
    meth.on_step(m, 4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    meth.train_step(m, batch(), opt, 4)
    changed = {k.split(".")[3] for k, v in m.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"conv2", "bn2", "shortcut"} or changed == {"conv2", "bn2", "shortcut", "relu2"}, changed


def test_memory_model_computes_each_block_as_the_network():
    from lowbit.ondevice.memory import _block_modules

    m = lowbit.create_model("resnet8", in_channels=1, image_size=8, width=0.25).eval()
    x = torch.randn(2, 1, 8, 8)
    bl, _ = blocks(m)
    outs = {}
    hooks = [b.out.register_forward_hook(lambda mod, a, o, i=b.index: outs.__setitem__(i, o)) for b in bl]
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for b, (mod, inp) in zip(bl, _block_modules(m, x[:1], bl)):
            got = mod(inp)
            want = outs[b.index][:1]
            if b.index == len(bl) - 1:
                want = want.mean((2, 3))  # the last block's module runs on through the global pool and flatten
            assert torch.allclose(got, want, atol=1e-6), b.index


def _pool_then_bn_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    lowbit.quantize(m, {**W3A3, "method": {"name": "local"}})
    meth = lowbit.quant_state(m).method
    opt = torch.optim.SGD([p for g in meth.param_groups(m) for p in g["params"]], lr=0.05)
    return m, meth, opt


@pytest.mark.parametrize("zeroed", [0, 1])
def test_a_trainable_unit_after_the_pooling_trains_by_its_own_blocks_loss(zeroed):
    """conv -> pool -> BN -> ReLU (not in the zoo): read before the pool, the heads left the BN outside block 0's
    loss and block 1's loss trained it across the boundary (a review, session 30). Its heads read the ReLU now."""
    m, meth, opt = _pool_then_bn_model()
    assert [b.out_name for b in meth.blocks] == ["3", "6"]
    real = meth.heads[zeroed].forward
    meth.heads[zeroed].forward = lambda h, y, beta: 0.0 * real(h, y, beta)
    meth.setup(m, 10, 10)
    meth.train_step(m, batch(), opt, 0)
    g = m[2].weight.grad
    if zeroed == 0:  # block 0's own loss silenced: no gradient may reach its BN from block 1's
        assert g is None or not g.any()
    else:  # block 1's loss silenced: block 0's loss trains its BN
        assert g is not None and g.abs().sum() > 0


def test_resuming_heads_that_read_another_unit_is_refused():
    """LeNet-5's heads have the same shapes whether they read before or after the pooling: a resume under the other
    ``heads_before_pool`` loaded heads trained on other inputs, silently (a review, session 30)."""
    from lowbit.methods import build_method

    le = lowbit.create_model("lenet5", in_channels=1, image_size=28)
    before, after = build_method("local"), build_method("local", heads_before_pool=False)
    before.attach(le)
    after.attach(lowbit.create_model("lenet5", in_channels=1, image_size=28))
    state = before.state_dict()
    after.heads.load_state_dict(state["heads"])  # the shapes fit: only the recorded units tell them apart
    with pytest.raises(ConfigError, match="the saved heads read") as e:
        after.load_state_dict(state)
    assert "\n" not in str(e.value)
    old = {"heads": state["heads"]}  # saved before session 31: no record of the units read
    with pytest.raises(ConfigError, match="not recorded"):
        before.load_state_dict(old)
    before.load_state_dict(state)  # the same cut resumes
