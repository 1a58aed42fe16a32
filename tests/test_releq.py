"""ReLeQ (seed 001): environment, reward, budget wall, evaluation cache, and a tiny search end to end."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

gym = pytest.importorskip("gymnasium", reason="the 'search' extra (gymnasium, stable-baselines3) is not installed")
pytest.importorskip("stable_baselines3", reason="the 'search' extra is not installed")

import lowbit  # noqa: E402
from lowbit.cost import profile  # noqa: E402
from lowbit.errors import ConfigError  # noqa: E402
from lowbit.quantize import layer_bits  # noqa: E402
from lowbit.search.bitcost import BitCost, budget_wall  # noqa: E402
from lowbit.search.env import ReleqEnv, releq_reward  # noqa: E402
from lowbit.search.evaluator import BitEvaluator, EvalSpec  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = {"name": "tiny", "model": {"name": "resnet8", "width": 0.25},
        "data": {"name": "digits", "val_fraction": 0.2, "limit": 300, "augment": False},
        "plan": {"weight": {"name": "dorefa", "bits": 8}},
        "train": {"batch_size": 32, "lr": 0.05, "progress": False}}
LAYERS = ["layers.0.0.conv1", "layers.1.0.conv2", "layers.2.0.conv1"]


def fake_acc(bits):
    return 0.5 + 0.05 * sum(bits) / len(bits)  # deterministic, rises with the bits


def test_env_passes_gymnasium_checker():
    from gymnasium.utils.env_checker import check_env

    env = ReleqEnv(fake_acc, 0.9, np.random.default_rng(0).random((4, 4)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, skip_render_check=True)
    assert not [w for w in caught if "gymnasium" in str(w.filename)], [str(w.message) for w in caught]
    obs, _ = env.reset(seed=0)
    assert obs.shape == (8,) and env.observation_space.contains(obs)
    total, done, steps = 0.0, False, 0
    while not done:
        obs, r, done, trunc, info = env.step(0)  # always 2 bits
        steps += 1
    assert steps == 4 and info["bits"] == (2, 2, 2, 2) and info["avg_bits"] == 2
    assert r == pytest.approx(releq_reward(fake_acc((2,) * 4), 0.9, (2,) * 4))
    with pytest.raises(ConfigError, match="action"):
        env.reset()
        env.step(7)


def test_reward_hand_computed():
    # x = sum(b)/(8L) - 2/8, y = acc/acc_fp, R = 2((1 - x^0.8) y^(1/y) - 0.5), -1 if y < 0.1
    assert releq_reward(0.9, 1.0, [2, 2]) == pytest.approx(2 * (0.889523 - 0.5), abs=1e-5)  # x = 0
    assert releq_reward(1.0, 1.0, [8, 8]) == pytest.approx(2 * (1 - 0.794418 - 0.5), abs=1e-5)  # x = 0.75
    assert releq_reward(0.5, 0.5, [4, 4]) == pytest.approx(2 * (1 - 0.329877 - 0.5), abs=1e-5)  # x = 0.25
    assert releq_reward(0.09, 1.0, [2, 2]) == -1.0
    assert releq_reward(0.1, 1.0, [2, 2]) > -1.0
    # lower bits at equal accuracy, and higher accuracy at equal bits, are both better
    assert releq_reward(0.9, 1.0, [3, 3]) > releq_reward(0.9, 1.0, [5, 3])
    assert releq_reward(0.95, 1.0, [3, 3]) > releq_reward(0.9, 1.0, [3, 3])


@pytest.fixture(scope="module")
def tiny_model():
    data = lowbit.load_dataset("digits", limit=300, val_fraction=0.2)
    model = lowbit.create_model("resnet8", in_channels=1, num_classes=10, image_size=(8, 8), width=0.25)
    lowbit.quantize(model, {"weight": {"name": "dorefa", "bits": 8}, "keep_first": False, "keep_last": False})
    return model, data


def test_budget_wall_always_within_budget(tiny_model):
    model, _ = tiny_model
    names = [lp.name for lp in lowbit.quant_state(model).layers]
    cost = BitCost(model, names, torch.zeros(1, 1, 8, 8))
    choices = [2, 3, 4, 5, 8]
    rng = np.random.default_rng(0)
    for _ in range(3):  # the linear cost model equals lowbit.cost.profile
        bits = rng.choice(choices, len(names))
        assert cost.costs(bits) == pytest.approx(cost.measured(bits), rel=1e-12)
    for metric in ("size", "memory", "bitops"):
        lo = cost.cost([2] * len(names), metric) / cost.cost([8] * len(names), metric)
        for _ in range(40):
            budget = cost.budget(metric, choices, fraction=float(rng.uniform(lo, 1.0)))
            bits = tuple(int(b) for b in rng.choice(choices, len(names)))
            out = budget_wall(bits, choices, cost, budget)
            assert cost.cost(out, metric) <= budget.limit
            assert all(o in choices and o <= b for o, b in zip(out, bits))
            if cost.cost(bits, metric) <= budget.limit:
                assert out == bits
            else:
                assert out != bits
    with pytest.raises(ConfigError, match="below the cost"):
        cost.budget("size", choices, fraction=0.1)


def test_cache_returns_same_accuracy_without_training(tmp_path):
    spec = EvalSpec(BASE, LAYERS, finetune_steps=2, finetune_lr=0.01)
    ev = BitEvaluator(spec, tmp_path / "cache.jsonl")
    a = ev.accuracy((2, 4, 8))
    assert ev.fits == 1 and 0 <= a <= 1
    assert ev.accuracy([2, 4, 8]) == a and ev.fits == 1
    b = ev.accuracy((8, 8, 2))
    assert ev.fits == 2
    again = BitEvaluator(spec, tmp_path / "cache.jsonl")  # a new process: the cache is on disk
    assert again.accuracies([(2, 4, 8), (8, 8, 2)]) == [a, b] and again.fits == 0
    rng = torch.random.get_rng_state()
    assert ev.compute((2, 4, 8))["acc"] == a  # deterministic: the same bits give the same accuracy
    assert torch.equal(torch.random.get_rng_state(), rng)  # the agent's generator is left alone
    with pytest.raises(ConfigError, match="expected 3 bit widths"):
        ev.accuracy((2, 4))


def test_tiny_search_end_to_end(tmp_path, monkeypatch):
    import tempfile

    from lowbit.cli import main

    scratch = tmp_path / "tmp"  # the system's temporary directory, as the search sees it
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    cfg = {**BASE, "releq": {"layers": LAYERS, "episodes": 2, "finetune_steps": 1, "pretrain_epochs": 1,
                             "final_epochs": 1, "progress": False, "ppo": {"episodes_per_update": 1},
                             "budget": {"metric": "memory", "fraction": 0.97}}}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "s"
    assert main(["search", "releq", str(path), "--out", str(out)]) == 0
    res = json.loads((out / "result.json").read_text())
    assert set(res["methods"]) == {"releq", "uniform", "random", "sensitivity"}
    st = json.loads((out / "state.json").read_text())
    assert st["episodes_done"] == 2 and len(st["history"]) == 2
    n = res["methods"]["releq"]["evaluations"]
    assert res["methods"]["random"]["evaluations"] == n
    for name, m in res["methods"].items():
        assert m["within_budget"] and m["costs"]["memory"] <= res["budget"]["limit"]
        assert all(b in (2, 3, 4, 5, 8) for b in m["bits"])
        plan_cfg = lowbit.load_config(m["plan"])  # what `lowbit train` reads
        model = lowbit.train.build_model(plan_cfg, lowbit.load_dataset("digits", limit=300, val_fraction=0.2))
        got = {k: v.weight for k, v in lowbit.layer_bits(model).items() if k in LAYERS}
        assert got == dict(zip(LAYERS, m["bits"])), name
    assert (out / "releq_history.png").is_file() and (out / "releq_bits.png").is_file()
    # resume: two more episodes from the saved agent; the cached evaluations are not redone
    lines = len((out / "cache.jsonl").read_text().splitlines())
    assert main(["search", "releq", str(path), "releq.episodes=4", "--out", str(out), "--resume"]) == 0
    st = json.loads((out / "state.json").read_text())
    assert st["episodes_done"] == 4 and [h["episode"] for h in st["history"]] == [1, 2, 3, 4]
    assert len((out / "cache.jsonl").read_text().splitlines()) >= lines
    assert main(["search", "releq", str(path), "--out", str(out)]) == 2  # refuses to overwrite
    # the resumed episodes continue the agent's random stream (before session 23 PPO.load seeded it anew and the
    # episodes after a resume repeated the first ones action for action)
    bits = [tuple(h["bits"]) for h in st["history"]]
    assert bits[2:4] != bits[0:2]
    # a resume with settings its cached evaluations were not made with is refused (before: mixed in silently)
    assert main(["search", "releq", str(path), "releq.episodes=5", "releq.finetune_steps=3", "--out", str(out),
                 "--resume"]) == 2
    assert json.loads((out / "state.json").read_text())["episodes_done"] == 4
    # nothing left behind in the temporary directory (PPO's default logger made an empty SB3-<date> folder there
    # on every search and resume)
    assert [p.name for p in scratch.iterdir() if p.name.startswith("SB3")] == []


SEARCH_CONFIGS = sorted((Path(__file__).parent.parent / "configs" / "search").glob("releq_*.yaml"))


@pytest.mark.parametrize("path", SEARCH_CONFIGS, ids=[p.stem for p in SEARCH_CONFIGS])
def test_shipped_search_configs_are_valid(path):
    from lowbit.search.releq import load_search_config

    cfg, opts = load_search_config(path)
    assert cfg.name == path.stem and opts.episodes >= 1 and cfg.plan.weight is not None


def test_bad_search_config_is_one_line(tmp_path):
    from lowbit.search.releq import parse_search_config

    with pytest.raises(ConfigError, match=r"releq.episode: unknown field"):
        parse_search_config({**BASE, "releq": {"episode": 3}})
    with pytest.raises(ConfigError, match="exactly one of fraction or value"):
        parse_search_config({**BASE, "releq": {"budget": {"metric": "size"}}})
    with pytest.raises(ConfigError, match="weight quantizer"):
        parse_search_config({**BASE, "plan": {}})


def test_written_plan_keeps_a_searched_layers_own_override(tmp_path):
    """A searched layer with its own plan.layers entry (another quantizer, an act) is fine-tuned as it was
    searched; before, the written plan replaced the entry with {weight: {bits}}: DoReFa and no act quantizer."""
    from lowbit.cli import main
    from lowbit.quantize import quant_state

    plan = {**BASE["plan"], "layers": {"layers.1.0.conv2": {"weight": {"name": "minmax", "bits": 8},
                                                            "act": {"name": "uniform", "bits": 8}}}}
    cfg = {**BASE, "plan": plan, "releq": {"layers": LAYERS, "episodes": 1, "finetune_steps": 1,
                                           "pretrain_epochs": 1, "progress": False, "baselines": ["uniform"],
                                           "ppo": {"episodes_per_update": 1}}}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "s"
    assert main(["search", "releq", str(path), "--out", str(out)]) == 0
    res = json.loads((out / "result.json").read_text())
    data = lowbit.load_dataset("digits", limit=300, val_fraction=0.2)
    for name, m in res["methods"].items():
        model = lowbit.train.build_model(lowbit.load_config(m["plan"]), data)
        lp = {x.name: x for x in quant_state(model).layers}["layers.1.0.conv2"]
        assert (lp.weight.name, lp.weight.bits) == ("minmax", m["bits"][1]), name
        assert lp.act is not None and (lp.act.name, lp.act.bits) == ("uniform", 8), name


def test_search_with_learned_bits_method_is_refused():
    """SINAREQ sets every layer to ceil(beta) when fit starts: each assignment the evaluator set_bits'd was
    fine-tuned and evaluated at beta's 8 bits (all assignments the same accuracy), and the written plans
    learned their own bits; refused when the search config is read."""
    from lowbit.search.releq import parse_search_config

    cfg = {**BASE, "plan": {**BASE["plan"], "method": {"name": "sinareq"}}, "releq": {"episodes": 1}}
    with pytest.raises(ConfigError, match="sinareq"):
        parse_search_config(cfg)


def test_search_config_refuses_what_a_training_config_refuses(tmp_path):
    """session 26: load_search_config skipped check_finite and read `releq: []` as the defaults."""
    from lowbit.errors import ConfigError
    from lowbit.search.releq import load_search_config

    base = "model: {name: resnet8}\ndata: {name: digits}\nplan: {weight: {name: dorefa, bits: 8}}\n"
    for text, msg in ((base + "train: {lr: .inf}\n", "train.lr: inf is not a finite number"),
                      (base + "releq: {finetune_lr: .inf}\n", "releq.finetune_lr: inf is not a finite number"),
                      (base + "releq: []\n", "releq"),
                      (base + "releq: {episodes: true}\n", "episodes: a number, got true")):
        (tmp_path / "s.yaml").write_text(text)
        with pytest.raises(ConfigError, match=msg):
            load_search_config(tmp_path / "s.yaml")


def _stop_after_the_settings_check(releq, monkeypatch) -> type:
    """Make a resumed search raise the returned exception at its first step after the settings check."""

    class Reached(Exception):
        pass

    def stop(*a, **k):
        raise Reached

    monkeypatch.setattr(releq, "fp32_start", stop)
    return Reached


def test_a_search_whose_search_yaml_recorded_integer_residual_resumes(tmp_path, monkeypatch):
    """Session 26: a plan not in integer mode no longer records integer_residual(_bits); a search started before
    (its search.yaml holds integer_residual: accumulator, integer_residual_bits: null) was refused on --resume
    ('its evaluations were made with other settings'). Another setting still refuses it."""
    import lowbit.search.releq as releq

    cfg, opts = releq.load_search_config(Path(__file__).parent.parent / "configs" / "search" / "releq_digits.yaml")
    old = {**cfg.to_dict(), "releq": opts.model_dump(mode="json")}
    old["plan"] = {**old["plan"], "integer_residual": "accumulator", "integer_residual_bits": None}
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    (tmp_path / "state.json").write_text("{}")
    Reached = _stop_after_the_settings_check(releq, monkeypatch)
    with pytest.raises(Reached):  # past the settings check
        releq.search(cfg, opts, tmp_path, resume=True)
    old["train"] = {**old["train"], "lr": old["train"]["lr"] * 2}
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    with pytest.raises(ConfigError, match="other settings .*train.lr"):
        releq.search(cfg, opts, tmp_path, resume=True)


def test_a_search_resumes_with_the_data_elsewhere(tmp_path, monkeypatch):
    """data.root and train.threads change no evaluation (runfolder.VOLATILE, as a run folder's --resume): a search
    folder moved to a machine with the data elsewhere was refused ('its evaluations were made with other settings
    (data.root: ...)')."""
    import lowbit.search.releq as releq

    path = Path(__file__).parent.parent / "configs" / "search" / "releq_digits.yaml"
    cfg, opts = releq.load_search_config(path, ["data.root=/machine_a/data"])
    (tmp_path / "search.yaml").write_text(yaml.safe_dump({**cfg.to_dict(), "releq": opts.model_dump(mode="json")},
                                                         sort_keys=False))
    (tmp_path / "state.json").write_text("{}")
    Reached = _stop_after_the_settings_check(releq, monkeypatch)
    moved, opts = releq.load_search_config(path, ["data.root=/machine_b/data", "train.threads=2"])
    with pytest.raises(Reached):  # past the settings check
        releq.search(moved, opts, tmp_path, resume=True)
    other, opts = releq.load_search_config(path, ["data.root=/machine_b/data", "data.name=fashion-mnist"])
    with pytest.raises(ConfigError, match="other settings .*data.name"):
        releq.search(other, opts, tmp_path, resume=True)


@pytest.mark.parametrize("weight", [{"name": "lqnet", "bits": 4}, {"name": "po2", "bits": 4},
                                    {"name": "dorefa", "bits": 4}])
def test_bit_cost_size_counts_the_scales_stored_at_the_assigned_bits(weight):
    """LQ-Net stores b basis numbers per row, po2 2^b values, 1-bit DoReFa one E|w|: the size the budget is held to
    is the model's after set_bits, not one with the scales of the bits the model had when the cost was measured."""
    model = lowbit.create_model("lenet5", in_channels=1, num_classes=10, image_size=28, width=0.5)
    lowbit.quantize(model, {"weight": weight, "keep_first": False, "keep_last": False})
    x = torch.zeros(1, 1, 28, 28)
    with torch.no_grad():
        model(x)
    names = [lp.name for lp in lowbit.quant_state(model).layers]
    cost = BitCost(model, names, x)
    bits = [1 if weight["name"] != "lqnet" else 2, 2, 8, 3][:len(names)] + [2] * max(0, len(names) - 4)
    lowbit.set_bits(model, dict(zip(names, bits)))
    with torch.no_grad():
        model(x)
    assert cost.cost(bits, "size") == profile(model, x, layer_bits(model)).size_bits


def test_a_ray_search_without_ray_is_refused_before_it_runs(tmp_path, monkeypatch):
    """releq.backend: ray uses the pool only for the baselines' evaluations, after the pre-training and every
    episode: without Ray installed the whole search ran, then ended in "the ray backend needs Ray"."""
    import sys

    import lowbit.search.releq as releq

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    cfg, opts = releq.load_search_config(Path(__file__).parent.parent / "configs" / "search" / "releq_digits.yaml",
                                         ["releq.backend=ray", "model.width=0.25", "data.limit=300",
                                          "train.threads=1", "releq.episodes=1", "releq.pretrain_epochs=1",
                                          "releq.final_epochs=1", "releq.finetune_steps=1"])
    with pytest.raises(ConfigError, match="the ray backend needs Ray"):
        releq.search(cfg, opts, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_with_workers_an_accuracy_does_not_depend_on_where_it_was_computed():
    """workers=2 evaluated a batch of assignments in workers at half the parent's threads and single ones (ReLeQ's
    episodes) here at all of them: torch's threads change the fine-tune's numbers (16.67 % vs 20.00 % for one
    assignment, session 27). Now every evaluation runs at the workers' thread count."""
    spec = EvalSpec(BASE, LAYERS, finetune_steps=8, finetune_lr=0.05, threads=2)
    pooled = BitEvaluator(spec, workers=2)
    cands = [(3, 3, 3), (2, 3, 4)]
    pooled.accuracies(cands)  # in two worker processes
    assert pooled.fits == 0
    here = BitEvaluator(EvalSpec(BASE, LAYERS, finetune_steps=8, finetune_lr=0.05, threads=2), workers=2)
    for bits in cands:
        assert here.compute(bits)["loss"] == pooled.cached(bits)["loss"], bits  # in this process: the same numbers
    assert torch.get_num_threads() == 2  # the caller's threads are left as they were


def test_a_kill_while_the_fp32_start_is_saved_leaves_no_truncated_file(tmp_path, monkeypatch):
    """Ctrl-C (or a kill) inside torch.save of fp32.pt left half a file: --resume said "no state.json" and a new
    start failed on the truncated file ("not a readable PyTorch weights file") until the user deleted it."""
    import io

    import lowbit.search.releq as releq

    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({**BASE, "releq": {"layers": LAYERS, "episodes": 1, "pretrain_epochs": 1}}))
    cfg, opts = releq.load_search_config(path)
    real = torch.save

    def interrupted(obj, f, *a, **k):
        buf = io.BytesIO()
        real(obj, buf)
        Path(f).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        releq.fp32_start(cfg, opts, tmp_path)
    monkeypatch.setattr(torch, "save", real)
    start, acc = releq.fp32_start(cfg, opts, tmp_path)  # started again: the FP32 start is trained and read
    assert acc > 0 and Path(start.model.init_from).is_file()


def test_gamma_zero_the_authors_one_step_credit_is_accepted():
    # he-actlab/releq's quantize_layer updates on one transition with next value 0: advantage r_t - V(s_t), which
    # is SB3's with gamma 0, which the options refused (gamma > 0)
    from lowbit.search.releq import parse_search_config

    _, opts = parse_search_config({**BASE, "releq": {"ppo": {"gamma": 0}}})
    assert opts.ppo.gamma == 0


def test_a_kill_while_the_agent_is_saved_leaves_a_search_that_resumes(tmp_path, monkeypatch):
    """fp32.pt, rng.pt and state.json are written whole or not at all (session 27), agent.zip was not: a kill inside
    PPO.save left half a zip, and --resume failed with zipfile.BadZipFile."""
    from stable_baselines3.common.base_class import BaseAlgorithm

    import lowbit.search.releq as releq

    cfg = {**BASE, "train": {**BASE["train"], "threads": 1},
           "releq": {"layers": LAYERS, "episodes": 2, "finetune_steps": 1, "pretrain_epochs": 1, "final_epochs": 1,
                     "progress": False, "ppo": {"episodes_per_update": 1}}}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg))
    c, opts = releq.load_search_config(path)
    real, calls = BaseAlgorithm.save, []

    def save(self, p, *a, **k):
        calls.append(p)
        real(self, p, *a, **k)
        if len(calls) == 2:  # the second save (state.json holds the first): killed halfway through the zip
            data = Path(p).read_bytes() if Path(p).is_file() else Path(str(p) + ".zip").read_bytes()
            Path(p).write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt

    monkeypatch.setattr(BaseAlgorithm, "save", save)
    with pytest.raises(KeyboardInterrupt):
        releq.search(c, opts, tmp_path / "s")
    monkeypatch.setattr(BaseAlgorithm, "save", real)
    res = releq.search(c, opts, tmp_path / "s", resume=True)
    assert "releq" in res["methods"]
