"""The open training core: fit/evaluate without files, method hooks, resume, set_bits,
unquantize, pretrained starts and devices."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

import lowbit
from lowbit.data import BatchLoader
from lowbit.errors import ConfigError, TrainingDiverged
from lowbit.fit import FitState, StepResult, default_optimizer, evaluate, fit, resolve_device
from lowbit.methods import STE
from lowbit.quantize import quant_state, weight_param

W2 = {"weight": {"name": "sawb", "bits": 2}}
W2A4 = {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 4, "init": 4.0}}


def tiny(plan=None, seed=0):
    torch.manual_seed(seed)
    m = lowbit.create_model("resnet8", in_channels=1, num_classes=10, image_size=28, width=0.25)
    return lowbit.quantize(m, plan) if plan is not None else m


@pytest.fixture(scope="module")
def loaders(fmnist_small):
    d = fmnist_small
    train = BatchLoader(d.train, d.info, 64, shuffle=True, seed=0)
    test = BatchLoader(d.test, d.info, 300)
    return train, test


def _dataloader(fmnist_small, n=512, batch=32):
    x, y = next(iter(BatchLoader(fmnist_small.train, fmnist_small.info, n)))
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))


# -- fit / evaluate ---------------------------------------------------------------------------
def test_fit_with_a_torch_dataloader_lowers_the_loss_and_writes_no_file(tmp_path, fmnist_small, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny(W2A4)
    dl = _dataloader(fmnist_small)
    before = evaluate(model, dl)
    hist = fit(model, dl, epochs=3, optimizer=torch.optim.Adam(model.parameters(), lr=0.01))
    after = evaluate(model, dl)
    assert [r["epoch"] for r in hist] == [1, 2, 3]
    assert hist[-1]["train_loss"] < 0.8 * hist[0]["train_loss"]
    assert after["loss"] < before["loss"] and after["n"] == 512
    assert os.listdir(tmp_path) == []  # no run folder, no checkpoint, nothing


def test_evaluate_quantizes_the_weights_once_per_pass(loaders):
    model = tiny(W2)
    calls = []
    for name, m in model.named_modules():
        wp = weight_param(m)
        if wp is not None:
            wp.register_forward_hook(lambda *a, n=name: calls.append(n))
    _, test = loaders
    res = evaluate(model, test)
    n_layers = len({c for c in calls})
    assert len(test) == 4 and res["n"] == 1200
    assert len(calls) == n_layers  # once per layer, not once per batch
    model.train()
    evaluate(model, test)
    assert model.training  # the mode is restored


def test_evaluate_matches_a_plain_loop(loaders):
    model = tiny(W2A4)
    _, test = loaders
    loss, correct = 0.0, 0
    model.eval()
    with torch.no_grad():
        for x, y in test:
            out = model(x)
            loss += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
    res = evaluate(model, test)
    assert res["acc"] == correct / 1200 and res["loss"] == pytest.approx(loss / 1200, rel=1e-12)
    assert evaluate(model, [])["n"] == 0


def test_fit_refuses_bad_batches_and_epochs():
    model = tiny(W2)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    with pytest.raises(ConfigError, match="one-shot iterator"):
        fit(model, iter([(x, y)]), epochs=2)
    with pytest.raises(ConfigError, match="has no len"):
        fit(model, ((x, y) for _ in range(1)), epochs=1)
    with pytest.raises(ConfigError, match="empty"):
        fit(model, [], epochs=1)
    with pytest.raises(ConfigError, match="epochs must be an integer >= 1"):
        fit(model, [(x, y)], epochs=0)


def test_progress_without_a_stderr_trains(monkeypatch):
    """stderr closed (`lowbit train CONFIG 2>&-`, pythonw, a daemon) makes sys.stderr None: the progress bar (on by
    default) failed on the first batch with AttributeError ('NoneType' object has no attribute 'write'), unseen, and
    the run ended with status 1; now the bar is off and the epoch trains as with progress=False."""
    import sys

    x, y = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 10
    quiet = tiny(W2)
    fit(quiet, [(x, y)], epochs=1, progress=False)
    model = tiny(W2)
    monkeypatch.setattr(sys, "stderr", None)
    hist = fit(model, [(x, y)], epochs=1, progress=True)
    assert [r["epoch"] for r in hist] == [1]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), quiet.state_dict().values()))
    from lowbit.fit import progress_bar  # DCQ's section bar and ReLeQ's episode bar are the same bar

    bar = progress_bar(total=3, desc="DCQ 3 sections")
    bar.n = 2
    bar.set_postfix_str("s1 done", refresh=True)
    bar.close()
    assert bar.disable
    import io

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file: no bar (~10 updates a second), the epoch lines stay
    assert progress_bar(range(3), desc="epoch 1/1").disable


def test_releq_and_dcq_bars_reach_a_log(monkeypatch, tmp_path):
    """ReLeQ's episode bar and DCQ's section bar are all the progress those commands show (DCQ's sections train with
    progress=False; ReLeQ prints no per-episode line): in a log (stderr a file, a batch job) they are written, once per
    episode / section epoch, not left out as fit's ~10-a-second batch bar is (the log showed nothing until the end)."""
    import io
    import json
    import sys

    from lowbit.fit import progress_bar
    from lowbit.schedules.dcq import _Progress

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    bar = progress_bar(total=3, desc="releq episodes", enabled=True, logs=True)  # releq.search's bar
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert "releq episodes" in log.getvalue() and "3/3" in log.getvalue()
    log.seek(0)
    log.truncate()
    with _Progress(tmp_path, 1, 2, enabled=True) as p:
        (tmp_path / "section_0.jsonl").write_text(json.dumps({"train_loss": 1.5}) + "\n" +
                                                  json.dumps({"train_loss": 1.25}) + "\n")
        p._update()
        shown = log.getvalue()
        p._update()  # nothing new: no second line in the log
        assert log.getvalue() == shown
    assert "DCQ 1 sections" in shown and "2/2" in shown and "s0 2/2 1.25" in shown
    assert progress_bar(range(3), desc="epoch 1/1").disable  # fit's batch bar: still off in a log


def test_non_finite_loss_stops_before_the_step():
    model = tiny(W2)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.full((4, 1, 28, 28), float("nan")), torch.zeros(4, dtype=torch.long)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 1, step 1"):
        fit(model, [(x, y)], epochs=1)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in w0.items() if "running" not in k and "num_batches" not in k)


def test_set_epoch_reaches_the_sampler_of_a_dataloader():
    seen = []

    class Sampler(torch.utils.data.Sampler):
        def __init__(self):
            self.n = 8

        def set_epoch(self, e):
            seen.append(e)

        def __iter__(self):
            return iter(range(self.n))

        def __len__(self):
            return self.n

    ds = TensorDataset(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    fit(tiny(W2), DataLoader(ds, batch_size=4, sampler=Sampler()), epochs=2)
    assert seen == [0, 1]


def test_resume_from_a_checkpoint_gives_the_uninterrupted_history(loaders):
    train, test = loaders

    def setup():
        model = tiny(W2A4)
        opt = default_optimizer(model, quant_state(model).method, lr=0.05)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3 * len(train))
        return model, opt, sched

    model, opt, sched = setup()
    full = fit(model, train, optimizer=opt, scheduler=sched, epochs=3, val_batches=test)

    saved = {}

    class StopAfterTwo:
        def on_epoch_end(self, state: FitState, row):
            if state.epoch == 1:
                saved.update(state.checkpoint())
                state.stop = True

    model, opt, sched = setup()
    part = fit(model, train, optimizer=opt, scheduler=sched, epochs=3, val_batches=test, callbacks=[StopAfterTwo()])
    assert len(part) == 2
    model, opt, sched = setup()
    rest = fit(model, train, optimizer=opt, scheduler=sched, epochs=3, val_batches=test, resume=saved)
    for a, b in zip(full, part + rest):
        a, b = dict(a), dict(b)
        a.pop("epoch_time"), b.pop("epoch_time")
        assert a == b


# -- method hooks -----------------------------------------------------------------------------
class MSEToOneHot(STE):
    """A method with its own loss, its own parameter groups and a counting step."""

    def __init__(self):
        super().__init__()
        self.steps = 0

    def loss(self, model, batch, output):
        return F.mse_loss(output.softmax(1), F.one_hot(batch[1], 10).float())

    def param_groups(self, model):
        bn = [p for n, p in model.named_parameters() if "bn" in n]
        rest = [p for n, p in model.named_parameters() if "bn" not in n]
        return [{"params": rest}, {"params": bn, "lr": 0.0, "weight_decay": 0.0}]

    def train_step(self, model, batch, optimizer, step):
        self.steps += 1
        return super().train_step(model, batch, optimizer, step)


def test_method_loss_param_groups_and_step_hooks(fmnist_small):
    model = tiny()
    method = MSEToOneHot()
    lowbit.quantize(model, W2, method=method)
    assert quant_state(model).method is method
    bn0 = {n: p.clone() for n, p in model.named_parameters() if "bn" in n}
    dl = _dataloader(fmnist_small, n=256)
    hist = fit(model, dl, epochs=2)
    assert method.steps == 2 * len(dl)
    opt_groups = default_optimizer(model, method).param_groups
    assert [g["lr"] for g in opt_groups] == [0.1, 0.0] and opt_groups[1]["weight_decay"] == 0.0
    # the frozen group did not move; the reported loss is the method's (MSE of softmax: < 0.1)
    assert all(torch.equal(p, bn0[n]) for n, p in model.named_parameters() if "bn" in n)
    assert hist[0]["train_loss"] < 0.1


def test_a_step_without_an_optimizer_is_the_methods_business():
    class SignStep(STE):  # an update rule of its own (as integer training will have)
        def train_step(self, model, batch, optimizer, step):
            assert optimizer is not None  # fit built the default one; this method ignores it
            with torch.no_grad():
                for p in model.parameters():
                    p.sub_(1e-3 * torch.sign(p))
            return StepResult(torch.tensor(1.0), None, len(batch[0]))

    model = tiny(W2)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    hist = fit(model, [(x, y)], method=SignStep(), epochs=1)
    assert hist[0]["train_loss"] == 1.0 and hist[0]["train_acc"] != hist[0]["train_acc"]  # NaN: no output


# -- quantize / set_bits / unquantize ---------------------------------------------------------
def test_set_bits_changes_a_layer_in_place_and_keeps_the_optimizer():
    model = tiny({"weight": {"name": "lsq", "bits": 4}, "act": {"name": "lsq", "bits": 4}})
    x = torch.randn(2, 1, 28, 28)
    model(x)
    layer = "layers.0.0.conv1"
    m = model.get_submodule(layer)
    params = [id(p) for p in model.parameters()]
    step = weight_param(m).quantizer.step.detach().clone()
    lowbit.set_bits(model, {layer: 2})
    assert weight_param(m).bits == 2 and m.input_quantizer.bits == 4
    assert len(torch.unique(m.weight)) <= 4 and set(torch.unique(m.weight).tolist()) <= set(
        weight_param(m).quantizer.levels().reshape(-1).tolist())
    assert torch.equal(weight_param(m).quantizer.step.detach(), step)  # learned state kept
    assert [id(p) for p in model.parameters()] == params  # nothing rebuilt
    lowbit.set_bits(model, {"layers.1.*": {"weight": 3, "act": 3}})
    bits = lowbit.layer_bits(model)
    assert all(b.weight == 3 and b.act == 3 for n, b in bits.items() if n.startswith("layers.1."))
    assert "lsq2" in quant_state(model).table() and "lsq3" in quant_state(model).table()


def test_set_bits_errors_are_one_line_and_change_nothing():
    model = tiny({"weight": {"name": "lsq", "bits": 4}})
    with pytest.raises(ConfigError, match="matches no layer"):
        lowbit.set_bits(model, {"nope": 2})
    with pytest.raises(ConfigError, match="full-precision weight"):
        lowbit.set_bits(model, {"conv1": 2})
    with pytest.raises(ConfigError, match="full-precision act"):
        lowbit.set_bits(model, {"layers.0.0.conv1": {"act": 2}})
    with pytest.raises(ConfigError, match="bits"):
        lowbit.set_bits(model, {"layers.0.0.conv1": 2, "layers.0.0.conv2": 9})
    assert {b.weight for b in lowbit.layer_bits(model).values()} == {4}  # rolled back
    with pytest.raises(ConfigError, match="not quantized"):
        lowbit.set_bits(tiny(), {"conv1": 2})
    # a glob sets the layers it matches that quantize the role: "*" no longer hits the FP32 ends (session 24)
    lowbit.set_bits(model, {"*": 3})
    assert {b.weight for b in lowbit.layer_bits(model).values()} == {3}
    with pytest.raises(ConfigError, match="full-precision act"):  # no layer quantizes its input: still an error
        lowbit.set_bits(model, {"layers.*": {"act": 2}})


def test_unquantize_keeps_the_quantized_or_the_latent_weights():
    model = tiny(W2)
    model.eval()
    x = torch.randn(3, 1, 28, 28)
    y_q = model(x)
    latent = model.get_submodule("layers.0.0.conv1").parametrizations.weight.original.detach().clone()
    plain = lowbit.unquantize(model)
    assert quant_state(plain) is None and not parametrize.is_parametrized(plain.get_submodule("layers.0.0.conv1"))
    assert torch.equal(plain(x), y_q)
    model = tiny(W2)
    lowbit.unquantize(model, keep="latent")
    assert torch.equal(model.get_submodule("layers.0.0.conv1").weight, latent)
    assert not any(hasattr(m, "input_quantizer") for m in model.modules())
    with pytest.raises(ConfigError, match="not quantized"):
        lowbit.unquantize(model)


def test_unquantize_latent_refuses_a_value_search():
    model = tiny({"weight": {"name": "valueset", "values": [-1, 1]}, "method": {"name": "sgt"}})
    with pytest.raises(ConfigError, match="not a weight; use keep='quantized'"):
        lowbit.unquantize(model, keep="latent")
    lowbit.unquantize(model, keep="quantized")
    w = model.get_submodule("layers.0.0.conv1").weight
    assert len(torch.unique(w)) <= 2


def test_quantize_twice_needs_replace():
    model = tiny(W2)
    with pytest.raises(ConfigError, match="already quantized; pass replace=True"):
        lowbit.quantize(model, W2)
    latent = model.get_submodule("layers.0.0.conv1").parametrizations.weight.original.detach().clone()
    lowbit.quantize(model, {"weight": {"name": "minmax", "bits": 3}}, replace=True)
    m = model.get_submodule("layers.0.0.conv1")
    assert torch.equal(m.parametrizations.weight.original, latent) and weight_param(m).bits == 3
    assert len(quant_state(model).hooks) == 0


# -- pretrained starts ------------------------------------------------------------------------
def test_load_weights_from_files_state_dicts_and_quantized_models(tmp_path):
    fp = tiny(seed=1)
    torch.save(fp.state_dict(), tmp_path / "fp.pt")
    torch.save({"model": fp.state_dict(), "epoch": 3}, tmp_path / "ck.pt")
    for src in (tmp_path / "fp.pt", tmp_path / "ck.pt", fp.state_dict()):
        m = lowbit.load_weights(tiny(seed=2), src)
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), fp.state_dict().values()))
    # a quantized model's state dict: its latent weights load into a plain model
    q = tiny(W2A4, seed=3)
    q(torch.randn(2, 1, 28, 28))
    m = lowbit.load_weights(tiny(seed=2), q.state_dict())
    assert torch.equal(m.get_submodule("layers.0.0.conv1").weight,
                       q.get_submodule("layers.0.0.conv1").parametrizations.weight.original)


def test_load_weights_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        lowbit.load_weights(tiny(), tmp_path / "none.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a zip file")
    with pytest.raises(ConfigError, match="not a readable PyTorch weights file"):
        lowbit.load_weights(tiny(), tmp_path / "bad.pt")
    other = lowbit.create_model("resnet8", in_channels=1, num_classes=10, image_size=28, width=0.5)
    with pytest.raises(ConfigError, match=r"do not fit the model \(other shape"):
        lowbit.load_weights(tiny(), other.state_dict())
    with pytest.raises(ConfigError, match="load weights before quantize"):
        lowbit.load_weights(tiny(W2), other.state_dict())
    (tmp_path / "dir").mkdir()
    with pytest.raises(ConfigError, match="not a run folder"):
        lowbit.load_weights(tiny(), tmp_path / "dir")
    for e in ("x",):
        with pytest.raises(ConfigError) as ei:
            lowbit.load_weights(tiny(), {"conv1.weight": torch.zeros(1)})
        assert "\n" not in str(ei.value)


def test_load_weights_from_a_model_state_dict_checkpoint_and_other_names(tmp_path):
    """PyTorch's tutorial checkpoint ({'model_state_dict': ..., 'optimizer_state_dict': ..., 'epoch': ...}) was
    refused as "holds no state dict"; a checkpoint under another name ('net', 'ema') is named, not guessed."""
    fp = tiny(seed=1)
    opt = torch.optim.SGD(fp.parameters(), lr=0.1, momentum=0.9)
    torch.save({"model_state_dict": fp.state_dict(), "optimizer_state_dict": opt.state_dict(), "epoch": 3,
                "loss": 0.5}, tmp_path / "tutorial.pt")
    m = lowbit.load_weights(tiny(seed=2), tmp_path / "tutorial.pt")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), fp.state_dict().values()))
    torch.save({"net": fp.state_dict(), "ema": fp.state_dict(), "epoch": 3}, tmp_path / "net.pt")
    with pytest.raises(ConfigError, match=r"state dicts are under 'net', 'ema', not 'model' / 'state_dict' / "
                                          r"'model_state_dict': save the one you mean"):
        lowbit.load_weights(tiny(), tmp_path / "net.pt")
    with pytest.raises(ConfigError, match=r"keep='quantized' \(model.init_weights: quantized\) needs a run folder"):
        lowbit.load_weights(tiny(), tmp_path / "tutorial.pt", keep="quantized")


def test_init_from_an_integer_runs_best_pt_file(tmp_path, fmnist_small):
    """Session 24: an integer run's best.pt given as a file (not its folder) was refused: its output quantizers'
    state (conv1.output_quantizer.alpha, ...) had no place in a plain model."""
    from lowbit.config import load_config
    from lowbit.train import build_model

    base = ["model.name=resnet8", "model.width=0.25", "data.limit=1200", "train.epochs=1", "train.batch_size=64",
            "train.progress=false"]
    lowbit.run(load_config(None, base + ["plan.weight={name: sawb, bits: 2}", "plan.act={name: pact, bits: 2}",
                                          "plan.integer=true"]), tmp_path / "int", data=fmnist_small)
    sd = torch.load(tmp_path / "int" / "best.pt", weights_only=False)["model"]
    assert any(".output_quantizer." in k for k in sd)
    m = build_model(load_config(None, base + [f"model.init_from={tmp_path / 'int' / 'best.pt'}"]), fmnist_small)
    assert torch.equal(m.get_submodule("layers.0.0.conv1").weight, sd["layers.0.0.conv1.parametrizations.weight.original"])


def test_init_from_a_run_folder_starts_from_its_best_network(tmp_path, fmnist_small):
    from lowbit.config import load_config
    from lowbit.train import build_model, load_run

    base = ["model.name=resnet8", "model.width=0.25", "data.limit=1200", "train.epochs=1", "train.batch_size=64",
            "train.progress=false"]
    lowbit.run(load_config(None, base), tmp_path / "fp", data=fmnist_small)
    _, _, fp_model, _ = load_run(tmp_path / "fp")
    cfg = load_config(None, base + [f"model.init_from={tmp_path / 'fp'}", "plan.weight={name: sawb, bits: 2}"])
    q = build_model(cfg, fmnist_small)
    fp_sd = fp_model.state_dict()
    assert torch.equal(q.get_submodule("layers.0.0.conv1").parametrizations.weight.original,
                       fp_sd["layers.0.0.conv1.weight"])
    assert torch.equal(q.state_dict()["bn1.running_mean"], fp_sd["bn1.running_mean"])
    # and from that quantized run, its quantized weights (keep = quantized) for a further start
    res = lowbit.run(cfg, tmp_path / "q", data=fmnist_small)
    assert res.summary["test_acc"] > 0.3
    cfg2 = load_config(None, base + [f"model.init_from={tmp_path / 'q'}", "model.init_weights=quantized"])
    m2 = build_model(cfg2, fmnist_small)
    assert len(torch.unique(m2.get_submodule("layers.0.0.conv1").weight)) <= 4
    with pytest.raises(ConfigError, match="model.init_from: pretrained weights not found"):
        build_model(load_config(None, base + [f"model.init_from={tmp_path / 'none.pt'}"]), fmnist_small)
    import yaml

    assert yaml.safe_load((tmp_path / "q" / "config.yaml").read_text())["model"]["init_from"] == str(tmp_path / "fp")
    # the finished run loads without its start (moved away): its checkpoint holds every weight
    (tmp_path / "fp").rename(tmp_path / "fp_moved")
    _, _, q_loaded, _ = load_run(tmp_path / "q")
    assert torch.equal(q_loaded.get_submodule("layers.0.0.conv1").weight, res.model.get_submodule("layers.0.0.conv1").weight)


# -- devices ----------------------------------------------------------------------------------
def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="device must be one of auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fit_and_evaluate_on_a_gpu(fmnist_small):
    model = tiny(W2A4)
    dl = _dataloader(fmnist_small, n=256)
    hist = fit(model, dl, epochs=2, device="cuda")
    assert next(model.parameters()).device.type == "cuda"
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    res = evaluate(model, dl)
    assert res["n"] == 256
    m = model.get_submodule("layers.0.0.conv1")
    assert m.weight.device.type == "cuda" and weight_param(m).quantizer.levels().device.type == "cuda"


# -- BatchNorm freezing -----------------------------------------------------------------------
def _bn_state(m):
    return {n: (b.running_mean.clone(), b.running_var.clone(), b.weight.detach().clone())
            for n, b in m.named_modules() if isinstance(b, nn.BatchNorm2d)}


@pytest.mark.parametrize("after", [1, 1.5])
def test_freeze_batchnorm_trains_on_running_statistics_after_the_given_epochs(fmnist_small, after):
    x, y = next(iter(BatchLoader(fmnist_small.train, fmnist_small.info, 128)))
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]  # 4 steps per epoch
    m = tiny(W2A4)
    init, seen, modes, starts = _bn_state(m), [], [], []

    class Probe:
        def on_epoch_start(self, state):
            starts.append((state.epoch, state.model.training))

        def on_step(self, state, step):
            modes.append((state.model.training, {b.training for b in state.model.modules()
                                                 if isinstance(b, nn.BatchNorm2d)}))

        def on_epoch_end(self, state, row):
            seen.append(_bn_state(state.model))

    freeze = lowbit.FreezeBatchNorm(after)
    fit(m, batches, epochs=3, callbacks=[freeze, Probe()])
    # batch statistics up to step round(after * 4), the running ones after: the model trains, BatchNorm does not
    first = round(after * 4)
    assert starts == [(0, True), (1, True), (2, True)]  # on_epoch_start: after model.train()
    assert modes == [(True, {True})] * first + [(True, {False})] * (12 - first)
    frozen_from = int(after) if after == int(after) else int(after) + 1  # first epoch end after the freeze
    for n, (mean, var, w) in seen[0].items():
        assert not torch.equal(mean, init[n][0]) and not torch.equal(var, init[n][1])
        for later in seen[frozen_from:]:
            assert torch.equal(later[n][0], seen[frozen_from - 1][n][0])
            assert torch.equal(later[n][1], seen[frozen_from - 1][n][1])
        assert not torch.equal(seen[2][n][2], w)  # gamma still trains
    if after == 1.5:  # half of epoch 2 moved the statistics, the other half did not
        assert any(not torch.equal(seen[1][n][0], seen[0][n][0]) for n in seen[0])
    other = tiny(W2A4, seed=1)  # the same callback on another model freezes that model's BatchNorms
    fit(other, batches, epochs=3, callbacks=[freeze])
    assert not any(b.training for b in other.modules() if isinstance(b, nn.BatchNorm2d))
    for bad in (-1, True, "2", float("inf")):
        with pytest.raises(ConfigError, match="freeze_bn_after"):
            lowbit.FreezeBatchNorm(bad)
    with pytest.raises(ConfigError, match="freeze_bn_gradient must be one of running, batch"):
        lowbit.FreezeBatchNorm(1, "frozen")


@pytest.mark.parametrize("gradient", ["batch", "running"])
def test_frozen_batchnorm_forward_is_evaluation_and_its_gradient_is_the_chosen_one(fmnist_small, gradient):
    """Frozen, a training forward is the evaluation forward bit for bit and moves no statistics; a
    BatchNorm's backward is batch normalisation's with the batch's statistics (gradient: batch, what
    training before the freeze saw) or the frozen affine map's (running)."""
    import copy

    def freeze(model):
        model.train()
        lowbit.FreezeBatchNorm(0, gradient).on_step(FitState(model, None, None, None, 1, 1, torch.device("cpu")), 0)

    x, y = next(iter(BatchLoader(fmnist_small.train, fmnist_small.info, 32)))
    m = tiny(W2A4)
    fit(m, [(x, y)], epochs=1)  # running statistics that are not the batch's
    m.eval()
    with torch.no_grad():
        y_eval = m(x)
    freeze(m)
    F.cross_entropy(out := m(x), y).backward()
    assert torch.equal(out.detach(), y_eval)
    assert m.get_submodule("layers.0.0.conv1").parametrizations.weight.original.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), y_eval)
    # one BatchNorm: its input gradient for a given output gradient
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
    v = torch.randn(8, 4, 5, 5) * 2 + 0.5
    g = torch.randn(8, 4, 5, 5)
    ref = copy.deepcopy(bn)
    ref.train(gradient == "batch")  # batch: train-mode BatchNorm's backward; running: eval's
    a, b = v.clone().requires_grad_(), v.clone().requires_grad_()
    ref(a).backward(g)
    root = nn.Sequential(bn)
    freeze(root)
    out = root(b)
    out.backward(g)
    assert torch.allclose(b.grad, a.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(bn.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    bn.eval()
    with torch.no_grad():
        assert torch.equal(out.detach(), nn.Sequential(bn)(v))  # the frozen forward
    # and the two gradients differ (else the test could not tell them apart)
    ref2 = copy.deepcopy(ref).train(gradient != "batch")  # (bn itself now carries the frozen forward)
    c = v.clone().requires_grad_()
    ref2(c).backward(g)
    assert not torch.allclose(c.grad, a.grad, rtol=1e-2, atol=1e-3)


def test_run_freezes_batchnorm_from_the_config(tmp_path, fmnist_small):
    from lowbit.config import Config
    from lowbit.train import run

    cfg = Config.model_validate({"model": {"name": "resnet8", "width": 0.25},
                                 "data": {"name": "fashion-mnist", "limit": 256, "val_fraction": 0.25},
                                 "plan": W2A4, "train": {"epochs": 1, "batch_size": 64, "freeze_bn_after": 0,
                                                         "progress": False, "threads": 1}})
    res = run(cfg, tmp_path / "r", data=fmnist_small)
    ck = torch.load(tmp_path / "r" / "best.pt", weights_only=False)
    means = {k: v for k, v in ck["model"].items() if k.endswith("running_mean")}
    # frozen from the first epoch: the statistics never left their initial values
    assert means and all(torch.equal(v, torch.zeros_like(v)) for v in means.values())
    assert res.summary["test_acc"] >= 0
    assert res.summary["first_last_fp"] == [True, True]  # today's mode keeps the ends in FP32
    with pytest.raises(ConfigError, match=r"freeze_bn_after \(2\) must be less than epochs \(2\)"):
        lowbit.load_config(None, ["train.epochs=2", "train.freeze_bn_after=2"])


def test_summary_says_the_ends_are_quantized_in_integer_mode(tmp_path, fmnist_small):
    """Integer mode quantizes the first conv and the classifier at 8 bits whatever plan.keep_first says:
    the summary must not call them FP32."""
    from lowbit.config import Config
    from lowbit.train import format_summary, run

    cfg = Config.model_validate({"model": {"name": "resnet8", "width": 0.25},
                                 "data": {"name": "fashion-mnist", "limit": 128, "val_fraction": 0.25},
                                 "plan": {**W2A4, "integer": True},
                                 "train": {"epochs": 1, "batch_size": 64, "progress": False, "threads": 1}})
    res = run(cfg, tmp_path / "r", data=fmnist_small)
    assert cfg.plan.keep_first and cfg.plan.keep_last
    assert res.summary["first_last_fp"] == [False, False]
    assert "FP32" not in format_summary(res.summary).splitlines()[1]
    # and it names the 8-bit quantizers of the ends beside the plan's own (session 24: it printed the plan's alone)
    assert res.summary["weight"] == "sawb2 (lsq8 on conv1, fc)"
    assert res.summary["act"] == "pact4,init=4.0 (lsq8 on conv1; pact8 on fc)"


def test_summary_names_every_quantizer_a_per_layer_plan_uses():
    """plan.layers may give some layers other bits or quantizers: the summary's weight/act labels list them
    with their layers (before session 24 they gave the plan's defaults beside the per-layer bits)."""
    from lowbit.models import create_model
    from lowbit.plan import Plan
    from lowbit.train import quantizer_label

    plan = {"weight": {"name": "minmax", "bits": 4}, "act": {"name": "uniform", "bits": 4},
            "layers": {"layers.2.0.conv*": {"weight": {"name": "sawb", "bits": 2}}, "layers.1.*": {"act": {"bits": 8}}}}
    m = lowbit.quantize(create_model("resnet8", in_channels=1, num_classes=10), plan)
    p = Plan(**plan)
    assert quantizer_label(m, "weight", p.weight) == "minmax4 (sawb2 on layers.2.0.conv1, layers.2.0.conv2)"
    assert quantizer_label(m, "act", p.act) == \
        "uniform4 (uniform8 on layers.1.0.conv1, layers.1.0.conv2, layers.1.0.shortcut.0)"
    full = lowbit.quantize(create_model("resnet8", in_channels=1, num_classes=10),
                           {**plan, "layers": {"layers.*": {"act": {"bits": 8}}}})
    assert quantizer_label(full, "act", p.act) == "uniform8 on 8 layers"  # no layer left at the default
    assert quantizer_label(create_model("resnet8", in_channels=1, num_classes=10), "weight", None) == "fp32"


# -- a researcher's own data pipeline (session 24's audit): each of these was silently wrong or a raw error ------
def _xy_batches(fmnist_small, n=96, batch=32):
    x, y = next(iter(BatchLoader(fmnist_small.train, fmnist_small.info, n)))
    return [(x[i: i + batch], y[i: i + batch]) for i in range(0, n, batch)]


def test_labels_one_hot_int32_and_extra_items_are_handled_or_refused_in_one_line(fmnist_small):
    m = tiny(W2A4)
    b = _xy_batches(fmnist_small, n=60, batch=10)  # batch size == classes: one-hot compared elementwise before
    want = evaluate(m, b)
    onehot = [(x, F.one_hot(y, 10).float()) for x, y in b]
    assert evaluate(m, onehot)["acc"] == want["acc"] <= 1.0
    assert evaluate(m, [(x, y.int(), torch.arange(len(y))) for x, y in b])["acc"] == want["acc"]  # (x, y, index)
    rows = fit(tiny(W2A4), onehot, epochs=1)
    assert 0.0 <= rows[0]["train_acc"] <= 1.0
    fit(tiny(W2A4), [(x, y.to(torch.uint8)) for x, y in b], epochs=1)  # integer labels of any width train
    for bad, msg in (([{"x": x, "y": y} for x, y in b], "a batch must be a tuple .* a dict with keys"),
                     ([(x, y[:, None]) for x, y in b], r"labels of shape \(10, 1\): give class indices"),
                     ([(x, y.float()) for x, y in b], "labels of dtype torch.float32")):
        with pytest.raises(ConfigError, match=msg):
            evaluate(m, bad)


def test_fit_checkpoints_are_snapshots_and_bad_arguments_are_one_line(fmnist_small):
    b = _xy_batches(fmnist_small)
    kept = []
    m = tiny(W2A4)
    fit(m, b, epochs=3, callbacks=[lambda row: None, type("Keep", (), {
        "on_epoch_end": lambda self, state, row: kept.append(state.checkpoint())})()])
    assert kept[0]["epoch"] == 0 and not torch.equal(kept[0]["model"]["conv1.weight"], m.state_dict()["conv1.weight"])
    full = fit(tiny(W2A4), b, epochs=3)
    resumed = fit(tiny(W2A4), b, epochs=3, resume=kept[0])  # from the in-memory snapshot of epoch 1
    assert resumed[-1]["train_loss"] == full[-1]["train_loss"]
    for kw, msg in (({"log_every": 0}, "log_every must be an integer >= 1"),
                    ({"optimizer": "adam"}, "optimizer must be a torch.optim.Optimizer"),
                    ({"method": "ste"}, "method must be a lowbit Method instance"),
                    ({"resume": {}}, "resume must be a FitState.checkpoint"),
                    ({"val_batches": iter(b), "epochs": 2}, "val_batches is a one-shot iterator")):
        with pytest.raises(ConfigError, match=msg):
            fit(tiny(W2A4), b, **{"epochs": 1, **kw})
    m = tiny(W2A4)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="ReduceLROnPlateau needs a metric"):
        fit(m, b, optimizer=opt, scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(opt))


def test_an_optimizer_built_before_quantize_warns_and_evaluate_restores_every_modules_mode(fmnist_small):
    b = _xy_batches(fmnist_small)
    m = tiny()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    lowbit.quantize(m, W2A4)  # the PACT alphas are new parameters the optimizer does not hold
    with pytest.warns(RuntimeWarning, match="trainable parameter.* not in the optimizer.*alpha"):
        fit(m, b, optimizer=opt, epochs=1)
    m.train()
    m.bn1.eval()  # a BatchNorm the caller froze
    evaluate(m, b)
    assert m.training and not m.bn1.training


def test_training_failures_are_loud_session25(monkeypatch, capsys):
    """Session 25 (training gone wrong): a network whose weights or BatchNorm statistics became inf in an epoch's
    last step (every step's loss finite) was checkpointed, reported and exported as a success; labels out of range,
    a dict batch and float64 images were torch errors inside fit's training step; an iterable used up by the first
    epoch trained the later ones on no step (loss 0.0); nesterov without momentum and multistep without milestones
    were a torch error and a constant lr; SIGTERM ended `lowbit train` without a word."""
    import os
    import signal

    import lowbit
    from lowbit.cli import main
    from lowbit.errors import ConfigError, TrainingDiverged

    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))

    def model():
        torch.manual_seed(0)
        return lowbit.quantize(lowbit.create_model("resnet8", in_channels=1, num_classes=10, image_size=8, width=0.25),
                               {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}})

    class Blowup(torch.optim.SGD):  # the step leaves a BatchNorm statistic at inf, as lr 1e6 did
        def step(self, closure=None):
            super().step(closure)
            m.layers[0][0].bn1.running_var.fill_(float("inf"))

    m = model()
    with pytest.raises(TrainingDiverged, match=r"the buffer layers.0.0.bn1.running_var became non-finite during "
                                               r"epoch 1 \(the loss of each step was finite\)"):
        lowbit.fit(m, [(x, y)], optimizer=Blowup(m.parameters(), lr=0.01), epochs=2)
    with pytest.raises(ConfigError, match=r"labels must be class indices 0..9 for a model with 10 outputs, got 0..11"):
        lowbit.fit(model(), [(x, torch.where(y > 5, 11, y))], epochs=1)
    with pytest.raises(ConfigError, match="a batch must be a tuple"):
        lowbit.fit(model(), [{"x": x, "y": y}], epochs=1)
    lowbit.fit(model(), [(x.double(), y.int())], epochs=1)  # float64 images, int32 labels: converted

    class UsedUp:
        def __init__(self):
            self.it = iter([(x, y)])

        def __len__(self):
            return 1

        def __iter__(self):
            return self.it

    with pytest.raises(ConfigError, match="epoch 2 had no training batch"):
        lowbit.fit(model(), UsedUp(), epochs=2)
    with pytest.raises(ConfigError, match="val_batches gave no batch in epoch 2"):
        lowbit.fit(model(), [(x, y)], epochs=2, val_batches=UsedUp())
    lowbit.fit(model(), [(x, y)], epochs=2, val_batches=[])  # an empty validation split: none expected
    for over, msg in ((["train.schedule=multistep"], "multistep needs train.milestones"),
                      (["train.nesterov=true", "train.momentum=0"], "nesterov needs optimizer sgd with momentum > 0"),
                      # adam ignored it silently before session 29
                      (["train.optimizer=adam", "train.momentum=0.5"], r"train.momentum is SGD's \(got 0.5 with "
                                                                        r"optimizer adam")):
        with pytest.raises(ConfigError, match=msg):
            lowbit.load_config("configs/quickstart.yaml", overrides=over)

    import argparse

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda self, argv=None: argparse.Namespace(
        func=lambda args: os.kill(os.getpid(), signal.SIGTERM) or 0))
    before = signal.getsignal(signal.SIGTERM)
    assert main(["train", "x.yaml"]) == 143
    assert "lowbit: terminated (SIGTERM)" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # restored


def test_a_buffer_of_ones_own_holding_inf_does_not_stop_training():
    """The end-of-epoch finite check (session 25) reads parameters, BatchNorm statistics and quantizer state only: a
    model's own buffer may hold -inf on purpose (a mask)."""
    import lowbit

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4, 10)
            self.register_buffer("mask", torch.tensor([0.0, float("-inf")]))

        def forward(self, x):
            h = torch.relu(self.conv(x)).mean((2, 3))
            return self.fc(h) + torch.softmax(self.mask, 0)[0]

    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    lowbit.fit(Masked(), [(x, y)], epochs=2)


def test_dense_class_labels_train_with_the_default_loss():
    """Session 25's label check kept (N, d1, ...) class indices for (N, classes, d1, ...) outputs (a segmentation-like
    model trained before it, and was refused by its first version); their range is checked too."""
    import lowbit

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8, 8, 8))
    h = lowbit.fit(m, [(x, y)] * 4, epochs=2)
    assert h[1]["train_loss"] < h[0]["train_loss"]
    with pytest.raises(ConfigError, match=r"class indices 0..2 for a model with 3 outputs, got -100..2 \(-100"):
        lowbit.fit(m, [(x, torch.where(y == 1, -100, y))], epochs=1)


def test_a_method_refusing_the_model_is_one_line_without_the_optimizer_warning_first(tmp_path):
    """NITI on a model with BatchNorm: its optimizer holds only the latent weights, so fit warned "18 trainable
    parameter(s) are not in the optimizer ... build the optimizer after lowbit.quantize" before NITI's refusal."""
    import warnings

    from lowbit.config import load_config
    from lowbit.train import run

    cfg = load_config("configs/niti_lenet5.yaml", ["model.name=resnet8", "model.batch_norm=true", "data.name=digits",
                                                  "data.limit=200", "train.epochs=1", "train.progress=false",
                                                  "train.threads=1"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ConfigError, match="is a BatchNorm; NITI trains models without BN"):
            run(cfg, tmp_path / "run")
    assert not [w for w in caught if "not in the optimizer" in str(w.message)]


def _small_bn_net():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                      nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    return lowbit.quantize(m, {"weight": {"name": "sawb", "bits": 4}, "act": {"name": "pact", "bits": 4}})


def test_an_epoch_of_another_number_of_batches_than_len_is_one_line():
    """fit counts its steps with len(batches): before session 28 an IterableDataset whose __len__ counted samples
    while it yielded batches (DataLoader(batch_size=None)) trained with FreezeBatchNorm(0.5) freezing an epoch late,
    without a word, and one yielding more batches than its len() (num_workers=2, unsharded) ran its steps into the
    next epoch's (a OneCycleLR failed in torch's "Tried to step 17 times")."""
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 2, (16,))

    class Batches(torch.utils.data.IterableDataset):
        def __iter__(self):
            for i in range(0, 16, 4):
                yield x[i:i + 4], y[i:i + 4]

        def __len__(self):
            return 16  # the samples, not the 4 batches

    with pytest.raises(ConfigError, match=r"^epoch 1 gave 4 batches but len\(batches\) is 16: fit counts its steps"):
        fit(_small_bn_net(), DataLoader(Batches(), batch_size=None), epochs=2, callbacks=[lowbit.FreezeBatchNorm(0.5)])

    class Short:
        def __len__(self):
            return 2

        def __iter__(self):
            return iter([(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)])

    model = _small_bn_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"^epoch 1 gave more than 2 batches but len\(batches\) is 2"):
        fit(model, Short(), epochs=2)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # the two counted steps ran, the third was refused before it stepped
    frozen = []

    class Spy:
        def on_step(self, state, step):
            if not frozen and not state.model[1].training:
                frozen.append((state.epoch, step))

    fit(_small_bn_net(), DataLoader(TensorDataset(x, y), batch_size=4), epochs=2,
        callbacks=[lowbit.FreezeBatchNorm(0.5), Spy()])
    assert frozen == [(0, 2)]  # a DataLoader of a map-style dataset: len() is exact, the freeze half-way


def test_integer_images_are_one_line_in_fit_and_evaluate():
    """uint8 images (as decoded, not normalised) from a user's DataLoader: before session 28 torch's "Input type
    (unsigned char) and bias type (float) should be the same", or a quantizer's "result type Float can't be cast to
    the desired output type Byte" where the first layer is quantized."""
    x, y = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8), torch.randint(0, 2, (8,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    msg = r"inputs of dtype torch.uint8 failed in the model \(.*\): convert images to floating point and normalise"
    with pytest.raises(ConfigError, match=r"^epoch 1, step 1: " + msg):
        fit(_small_bn_net(), loader, epochs=1)
    with pytest.raises(ConfigError, match="^" + msg):
        evaluate(_small_bn_net(), loader)
    torch.manual_seed(0)
    first = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
    lowbit.quantize(first, {"weight": {"name": "sawb", "bits": 4}, "act": {"name": "pact", "bits": 4},
                            "keep_first": False})
    with pytest.raises(ConfigError, match=r"^epoch 1, step 1: inputs of dtype torch.uint8 failed in the model "
                                          r"\(result type Float can't be cast"):
        fit(first, loader, epochs=1)
    fit(_small_bn_net(), DataLoader(TensorDataset(x.float() / 255, y), batch_size=4), epochs=1)  # normalised: trains


def test_a_dataloader_over_an_iterable_dataset_without_len_is_named_in_its_error():
    """The error said "batches (DataLoader) has no len(); pass a list, a BatchLoader or a DataLoader" to a user who
    had passed a DataLoader (session 28)."""
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.randn(1, 8, 8), torch.tensor(0)

    with pytest.raises(ConfigError, match=r"^batches is a DataLoader over an IterableDataset \(Stream\) without "
                                          r"__len__: give the dataset a __len__"):
        fit(_small_bn_net(), DataLoader(Stream(), batch_size=4), epochs=1)
