"""The Python API used as a researcher would, on their own model and data, without a run folder (session 27 audit)."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import ConfigError


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def _batches(n=4):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def test_a_scheduler_of_another_optimizer_is_refused():
    """A scheduler built on the user's optimizer, given without that optimizer: fit trained with its own default
    optimizer at a constant lr 0.1 and stepped the unused one (an lr of 0 still changed every weight)."""
    m = lowbit.quantize(_net(), {"weight": {"name": "sawb", "bits": 2}, "keep_first": False})
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ConfigError, match="scheduler: it schedules another optimizer than the one fit steps"):
        lowbit.fit(m, _batches(), scheduler=sched)
    other = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="scheduler: it schedules another optimizer"):
        lowbit.fit(m, _batches(), optimizer=other, scheduler=sched)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # refused before any step
    h = lowbit.fit(m, _batches(), optimizer=opt, scheduler=sched)  # the pair: lr 0, nothing moves
    assert h[0]["lr"] == 0.0
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_fit_refuses_a_method_that_cannot_train_the_models_layers():
    """fit(dqa_model, ..., method=STE()) trained DQA's mixtures at their first temperature (100) for the whole run,
    and an RDHS model's value-set logits without RDHS's schedule, without a word. Another instance of the model's
    own method, or any method for plain quantizers, still trains."""
    from lowbit.methods import STE, build_method

    dqa = {"weight": {"name": "sawb", "bits": 2}, "keep_first": False,
           "method": {"name": "dqa", "mixture": [{"name": "sawb", "bits": 4}], "lam": 1}}
    m = lowbit.quantize(_net(), dqa)
    with pytest.raises(ConfigError, match="quantized with method 'dqa', whose layers only it trains"):
        lowbit.fit(m, _batches(), method=STE())
    h = lowbit.fit(m, _batches(), method=build_method("dqa", mixture=[{"name": "sawb", "bits": 4}], lam=1))
    assert h[0]["temperature"] < 100
    lowbit.fit(m, _batches())  # its own
    plain = lowbit.quantize(_net(), {"weight": {"name": "sawb", "bits": 2}, "keep_first": False})
    lowbit.fit(plain, _batches(), method=STE())  # a new STE on plain quantizers: fine


class Pair(nn.Module):
    """Returns (logits, features)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(h), h


def test_a_model_output_that_is_not_logits_is_one_line():
    """A forward returning (logits, features) or a dict failed in fit and evaluate with "'tuple' object has no
    attribute 'dim'"; logits (N, classes, 1, 1) (no flatten) with torch's "only batches of spatial targets"."""
    class NoFlatten(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head, self.pool = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 3, 1), nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.head(self.pool(torch.relu(self.conv(x))))

    for model, msg in ((Pair(), "the model returned a tuple, not a tensor of logits"),
                       (NoFlatten(), r"outputs of shape \(8, 3, 1, 1\) for class indices of shape \(8,\)")):
        for call in (lambda: lowbit.fit(model, _batches(1)), lambda: lowbit.evaluate(model, _batches(1))):
            with pytest.raises(ConfigError, match=msg):
                call()


def test_a_float64_model_exports_refused_in_one_line_and_profiles(tmp_path):
    """A model trained in float64 (fit takes it): export said "the model cannot run inputs of shape (N, 1, 6, 6):
    Input type (float) and bias type (double)" (the shape is fine; it casts every input to float32), and
    cost.profile failed with torch's dtype error on a float32 example input."""
    from lowbit.cost import profile
    from lowbit.export import export_model

    m = lowbit.quantize(_net().double(), {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}})
    lowbit.fit(m, _batches(2))
    x = torch.randn(4, 1, 6, 6)
    with pytest.raises(ConfigError, match=r"export: the model is in torch.float64; .* call model.float\(\)"):
        export_model(m, x.double(), tmp_path / "e", formats=("packed",))
    assert profile(m, x, lowbit.layer_bits(m)).bitops == profile(m.float(), x, lowbit.layer_bits(m)).bitops


def test_a_layer_the_forward_does_not_call_as_a_module_is_warned_about():
    """A conv whose weight the forward uses in F.conv2d: its weight was quantized, its input quantizer never ran, the
    plan table said pact2 and cost.profile counted 0 MACs for it, without a word."""
    import warnings

    import torch.nn.functional as F

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h = F.relu(F.conv2d(F.relu(self.a(x)), self.b.weight, self.b.bias, padding=1))
            return self.fc(F.relu(self.c(h)).mean((2, 3)))

    plan = {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}}
    with pytest.warns(UserWarning, match=r"layer\(s\) b: the forward does not call them as modules"):
        lowbit.quantize(Functional(), plan)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowbit.quantize(Functional(), {**plan, "layers": {"b": "fp"}})  # kept in full precision: nothing to say
        lowbit.quantize(_net(), plan)


def test_a_plan_object_with_a_bad_field_is_one_line():
    """lowbit.Plan(...) (the object form quantize takes) raised pydantic's multi-line ValidationError, not a
    LowbitError, where Plan.from_dict and a dict plan give one line."""
    for kw, msg in (({"weight": {"name": "sawb", "bits": 2.5}}, "plan.weight.bits: Input should be a valid integer"),
                    ({"wieght": {"name": "sawb", "bits": 2}}, "plan.wieght: unknown field")):
        with pytest.raises(ConfigError, match=msg):
            lowbit.Plan(**kw)
    p = lowbit.Plan(weight={"name": "sawb", "bits": 2}, layers={"2": "fp"})
    assert lowbit.quant_state(lowbit.quantize(_net(), p)).layers[1].weight is None


def test_wrong_types_to_the_public_functions_are_one_line(tmp_path):
    """A string or a builder for the model, a list for set_bits, a single callback, a scheduler name: each was an
    AttributeError or TypeError from inside lowbit (the scheduler's after the first training step)."""
    from lowbit.cost import profile
    from lowbit.export import export_model

    m = lowbit.quantize(_net(), {"weight": {"name": "sawb", "bits": 2}})
    x = torch.randn(2, 1, 6, 6)
    for call, msg in ((lambda: lowbit.quantize("net", {}), "model must be a torch.nn.Module instance, got str"),
                      (lambda: lowbit.fit(_net, _batches(1)), r"got function \(a class or builder: call it\)"),
                      (lambda: lowbit.evaluate("net", _batches(1)), "model must be a torch.nn.Module"),
                      (lambda: lowbit.layer_bits("net"), "model must be a torch.nn.Module"),
                      (lambda: profile("net", x), "model must be a torch.nn.Module"),
                      (lambda: export_model("net", x, tmp_path / "e"), "model must be a torch.nn.Module"),
                      (lambda: lowbit.set_bits(m, ["2"]), "set_bits: bits must be a mapping"),
                      (lambda: lowbit.fit(m, _batches(1), callbacks=lowbit.FreezeBatchNorm(0)),
                       r"callbacks must be a list, got FreezeBatchNorm"),
                      (lambda: lowbit.fit(m, _batches(1), scheduler="cosine"), "scheduler must be a torch lr scheduler"),
                      (lambda: lowbit.evaluate(m, _batches(1), loss_fn="ce"), "loss_fn must be a function")):
        with pytest.raises(ConfigError, match=msg):
            call()


def test_load_weights_keep_quantized_from_a_state_dict_is_refused():
    """load_weights(model, state_dict, keep="quantized") loaded the latent weights without a word (a file is
    refused: it holds no quantizer to apply; a state dict holds none either)."""
    m = lowbit.quantize(_net(), {"weight": {"name": "sawb", "bits": 2}, "keep_first": False})
    lowbit.fit(m, _batches(2))
    with pytest.raises(ConfigError, match="keep='quantized' needs a run folder"):
        lowbit.load_weights(_net(1), m.state_dict(), keep="quantized")
    fresh = lowbit.load_weights(_net(1), m.state_dict())  # the latent weights, as asked
    assert torch.equal(fresh[2].weight, m[2].parametrizations.weight.original)


def test_a_quantized_layer_called_with_a_keyword_input_is_one_line():
    """conv(input=h) in a forward: the input quantizer's pre-hook failed with IndexError: tuple index out of range."""
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.b(input=torch.relu(self.a(x)))).mean((2, 3)))

    m = lowbit.quantize(Keyword(), {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}})
    with pytest.raises(ConfigError, match=r"layer 'b' was called with its input as a keyword argument"):
        lowbit.fit(m, _batches(1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_a_device_index_is_a_gpu_not_auto():
    """fit(device=0) (torch's index of the first GPU) ran as device="auto" (the CPU here, without a word);
    device=1 failed with "'int' object has no attribute 'split'"."""
    from lowbit.fit import resolve_device

    for d in (0, 1):
        with pytest.raises(ConfigError, match="device 'cuda' requested but no CUDA GPU"):
            lowbit.fit(_net(), _batches(1), device=d)
    with pytest.raises(ConfigError, match="device must be one of auto, cpu, cuda"):
        resolve_device(1.5)


def test_integer_mode_on_a_float64_model_is_refused_at_quantize():
    """plan.integer on a float64 model: quantize accepted it and the first training batch failed inside the traced
    graph with torch's multi-line "Input type (float) and bias type (double) should be the same"."""
    plan = {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}, "integer": True}
    with pytest.raises(ConfigError, match=r"plan.integer: the model is in torch.float64; .* model.float\(\)"):
        lowbit.quantize(_net().double(), plan)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_integer_mode_model_cast_after_quantize_is_refused_in_one_line(dtype):
    """An integer-mode model cast after quantize (model.double(), model.to(torch.bfloat16)): fit failed with torch's
    "expected scalar type Float but found Double" from inside the traced graph (an fx traceback), and evaluate and an
    eval forward blamed the input: "the model cannot run inputs of shape (8, 1, 6, 6)". Now the one line quantize
    gives for a model cast before it."""
    plan = {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}, "integer": True}
    m = lowbit.quantize(_net(), plan).to(dtype)
    want = rf"integer mode: the model is in {dtype}; .* call model.float\(\)"
    with pytest.raises(ConfigError, match=want):
        lowbit.fit(m, _batches(2), epochs=1)
    with pytest.raises(ConfigError, match=want):
        lowbit.evaluate(m, _batches(1))
    m.float()  # back in float32 it trains and evaluates
    lowbit.fit(m, _batches(2), epochs=1)
    assert lowbit.evaluate(m, _batches(1))["n"] == 8


def test_exporting_an_unhardened_activation_mixture_says_how_to_harden_it(tmp_path):
    """export_model on a DQA model with an activation mixture said "harden it first" without saying how from Python
    (the README's Python API never mentions finalize); after finalize it exports."""
    from lowbit.export import export_model

    plan = {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2},
            "method": {"name": "dqa", "mixture": [{"name": "sawb", "bits": 4}], "act_mixture": [{"name": "pact", "bits": 4}]}}
    m = lowbit.quantize(_net(), plan)
    lowbit.fit(m, _batches(2))
    x = torch.randn(4, 1, 6, 6)
    with pytest.raises(ConfigError, match=r"harden it first: lowbit.quant_state\(model\).method.finalize\(model\)"):
        export_model(m, x, tmp_path / "a", formats=("packed",))
    lowbit.quant_state(m).method.finalize(m)
    assert export_model(m, x, tmp_path / "b", formats=("packed",))["numpy"]["agreement"] == 1.0


def test_exporting_into_a_folder_with_an_earlier_export_warns_about_what_it_leaves(tmp_path):
    """export_model(model_b, x, DIR, formats=("packed",)) into the DIR of model A's full export left A's onnx/ and c/
    beside B's packed/ without a word."""
    import warnings

    from lowbit.export import export_model

    x = torch.randn(4, 1, 6, 6)
    a = lowbit.quantize(_net(0), {"weight": {"name": "sawb", "bits": 2}, "keep_first": False})
    b = lowbit.quantize(_net(1), {"weight": {"name": "sawb", "bits": 4}, "keep_first": False})
    export_model(a, x, tmp_path, formats=("packed", "onnx"), latency_repeats=0)
    with pytest.warns(UserWarning, match=r"holds onnx/ from an earlier export, which this one \(formats packed\)"):
        export_model(b, x, tmp_path, formats=("packed",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_model(b, x, tmp_path / "new", formats=("packed",))


def test_a_users_conv_subclass_is_a_layer_the_forward_calls():
    """A user's nn.Conv2d subclass (defined outside torch.nn), called as a module: torch.fx traced into its forward,
    so the trace saw F.conv2d, not the layer: quantize warned "the forward does not call them as modules" (its input
    quantizer runs, profile counts its MACs), and keep_first kept the *second* conv in full precision while the one on
    the image got an unsigned 2-bit input (its negative half clipped)."""
    import warnings

    class MyConv(nn.Conv2d):
        pass

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.fc = MyConv(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = lowbit.quantize(Net(), {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}})
    layers = {lp.name: lp for lp in lowbit.quant_state(m).layers}
    assert layers["c1"].weight is None and layers["c1"].act is None  # keep_first: the conv on the image
    assert layers["c2"].weight is not None


def test_a_tuple_output_is_one_line_with_a_loss_of_the_methods_own():
    """The refusal of a (logits, features) output advised "give the method a loss of its own (Method.loss)"; with one,
    fit failed with AttributeError: 'tuple' object has no attribute 'detach' (the step returns the output for the
    accuracy)."""
    import torch.nn.functional as F

    from lowbit.methods import STE

    class OwnLoss(STE):
        def loss(self, model, batch, output):
            return F.cross_entropy(output[0], batch[1])

    with pytest.raises(ConfigError, match="the model returned a tuple, not a tensor of logits") as e:
        lowbit.fit(Pair(), _batches(1), method=OwnLoss())
    assert "Method.loss" not in str(e.value)


def test_fit_takes_callbacks_none():
    """callbacks=None passed the new type check ("callbacks is not None and ...") and failed in list(None) with
    TypeError: 'NoneType' object is not iterable."""
    assert len(lowbit.fit(_net(), _batches(1), callbacks=None)) == 1


def test_plan_signed_act_sees_a_users_conv_subclass():
    """plan.signed_act's trace missed a conv subclass as well: its signed input (a conv without ReLU before it) got
    an unsigned quantizer, which clips the negative half."""
    from lowbit.plan import signed_input_layers

    class MyConv(nn.Conv2d):
        pass

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.c3, self.fc = nn.Conv2d(1, 4, 3), MyConv(4, 4, 3), nn.Conv2d(4, 4, 1), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.c3(torch.relu(self.c2(self.c1(x))))).mean((2, 3)))

    assert signed_input_layers(Net()) == ["c1", "c2"]


def test_layers_inside_a_users_linear_subclass_are_called():
    """A LoRA-style nn.Linear subclass whose forward calls two nn.Linear children: with every conv/linear a leaf of
    the trace (session 27), the children never appear in it, and quantize warned that "the forward does not call
    them as modules ... the cost model counts no MACs for them", while their input quantizers run and profile counts
    their MACs."""
    import warnings

    from lowbit.cost import profile
    from quant_helpers import LoRALinear

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), LoRALinear(4, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = lowbit.quantize(Net(), {"weight": {"name": "sawb", "bits": 2}, "act": {"name": "pact", "bits": 2}})
    macs = {lc.name: lc.macs for lc in profile(m, torch.randn(1, 1, 8, 8)).layers}
    assert macs["fc.lora_a"] > 0 and macs["fc.lora_b"] > 0
    assert not [x for x in w if "does not call them as modules" in str(x.message)]
