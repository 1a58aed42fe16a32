"""ReLeQ (seed 001): per-layer weight bits chosen by a PPO agent, plus budgeted baselines.

A search config is a lowbit training config (model, data, plan, train) with a ``releq:`` section::

    model: {name: lenet5}
    data: {name: digits}
    plan: {weight: {name: dorefa, bits: 8}, keep_first: false, keep_last: false}
    train: {batch_size: 64, lr: 0.05, epochs: 10}
    releq:
      bits: [2, 3, 4, 5, 8]           # the action set
      episodes: 100                   # PPO episodes (one step per searched layer)
      finetune_steps: 50              # short fine-tune per evaluated assignment (train split)
      finetune_lr: 0.01               # its learning rate (train.optimizer, constant)
      budget: {metric: memory, fraction: 0.5}   # optional: size | memory (002) | bitops
      baselines: [uniform, random, sensitivity]

``lowbit search releq CONFIG [key=value ...] --out DIR [--resume]`` runs :func:`search`: an FP32
start (``model.init_from``, or ``pretrain_epochs`` of FP32 training saved as ``DIR/fp32.pt``), the
PPO search (stable-baselines3's PPO on :class:`~lowbit.search.env.ReleqEnv`, the authors'
hyperparameters as defaults), then the baselines at the same number of evaluated assignments, all
through one :class:`~lowbit.search.evaluator.BitEvaluator` (validation accuracy after a short
fine-tune, cached in ``DIR/cache.jsonl``). Every method's pick (the highest ReLeQ reward among the
assignments it evaluated, within the budget) becomes a training config ``DIR/plans/METHOD.yaml``
that ``lowbit train`` fine-tunes from the FP32 start and ``lowbit export`` exports with mixed bits.

Search folder: ``search.yaml`` (resolved config), ``fp32.pt``, ``cache.jsonl``, ``agent.zip`` (the
PPO agent), ``state.json`` (episodes done, per-episode history, the assignments ReLeQ evaluated),
``result.json``, ``plans/*.yaml``, ``releq_history.png``, ``releq_bits.png``. ``--resume``
continues from ``agent.zip`` and ``state.json`` (saved after every PPO update); evaluations already
in the cache cost nothing.

Deviations from the authors' code (he-actlab/releq, TF1): the bit assignment is reset every episode
and observations are copied (their two bugs); PPO updates once per ``episodes_per_update`` episodes
on the collected rollout (SB3) instead of one sampled transition per layer step; MLP policy (their
LSTM variant is not used); advantages not normalised (their normalisation was commented out).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from pydantic import Field, ValidationError

from ..config import Config, apply_overrides, check_finite, read_yaml_mapping, validate_names
from ..config import _Strict  # unknown keys refused, and true/false for a number
from ..errors import ConfigError
from ..plan import one_line
from ..quantize import quant_state
from .baselines import random_candidates, select, sensitivity_candidates, uniform_candidates
from .bitcost import BitCost, Budget, budget_wall
from .env import DEFAULT_BITS, ReleqEnv, layer_features
from .evaluator import BitEvaluator, EvalSpec


class BudgetOptions(_Strict):
    metric: Literal["size", "memory", "bitops"] = "memory"
    #: the budget as a fraction of the cost with every searched layer at the largest bits
    fraction: float | None = Field(None, gt=0)
    #: or absolute: bits (size, memory) or BitOPs per image
    value: float | None = Field(None, gt=0)


class PPOOptions(_Strict):
    """stable-baselines3 PPO; defaults are the authors' (METHODS.md): clip 0.3, value coef 1,
    entropy coef 0.01, Adam 1e-4, gamma 0.9, GAE lambda 1, MLP 128 units. Their update saw one transition
    per layer step (next value 0), so their advantage was r_t - V(s_t) and gamma had no effect; gamma: 0
    gives that one-step credit here, 0.9 credits a layer's choice with the later layers' rewards."""

    learning_rate: float = Field(1e-4, gt=0)
    clip_range: float = Field(0.3, gt=0)
    vf_coef: float = Field(1.0, ge=0)
    ent_coef: float = Field(0.01, ge=0)
    gamma: float = Field(0.9, ge=0, le=1)  # 0: the authors' one-step credit (r_t - V(s_t))
    gae_lambda: float = Field(1.0, gt=0, le=1)
    #: episodes per rollout (n_steps = this x the number of searched layers)
    episodes_per_update: int = Field(4, ge=1)
    n_epochs: int = Field(10, ge=1)
    normalize_advantage: bool = False
    max_grad_norm: float = Field(0.5, gt=0)
    pi_layers: list[int] = Field(default_factory=lambda: [128, 128, 128])
    vf_layers: list[int] = Field(default_factory=lambda: [128, 128, 64])


class ReleqOptions(_Strict):
    bits: list[int] = Field(default_factory=lambda: list(DEFAULT_BITS))
    #: searched layers (default: every layer the plan quantizes)
    layers: list[str] | None = None
    episodes: int = Field(100, ge=1)
    reward: Literal["step", "final"] = "step"
    finetune_steps: int = Field(50, ge=0)
    finetune_lr: float = Field(0.01, gt=0)
    workers: int = Field(1, ge=1)
    #: where parallel evaluations run: local spawn processes or Ray tasks (lowbit.parallel)
    backend: Literal["local", "ray"] = "local"
    #: a Ray cluster's address (backend: ray; None: a local Ray instance)
    address: str | None = None
    seed: int = 0
    budget: BudgetOptions | None = None
    ppo: PPOOptions = Field(default_factory=PPOOptions)
    baselines: list[Literal["uniform", "random", "sensitivity"]] = Field(
        default_factory=lambda: ["uniform", "random", "sensitivity"])
    #: FP32 epochs when model.init_from is not given (saved as fp32.pt in the search folder)
    pretrain_epochs: int = Field(5, ge=1)
    #: epochs of the final fine-tune written into plans/*.yaml (train.epochs)
    final_epochs: int = Field(10, ge=1)
    final_lr: float | None = Field(None, gt=0)
    progress: bool = True


def load_search_config(path: str | Path, overrides: list[str] | None = None) -> tuple[Config, ReleqOptions]:
    p = Path(path)
    data = read_yaml_mapping(p, "search config")  # not UTF-8, empty, duplicate keys: one line (before: a traceback)
    data.setdefault("name", p.stem)
    data = apply_overrides(data, overrides or [])
    check_finite(data, "")  # as load_config: NaN or infinity nowhere (before: train.lr: .inf was searched with)
    return parse_search_config(data, where=str(p))


def parse_search_config(data: dict, where: str = "config") -> tuple[Config, ReleqOptions]:
    data = dict(data)
    rel = data.pop("releq", None)
    rel = {} if rel is None else rel  # releq: [] is an error, not the defaults
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(one_line(e, where)) from None
    try:
        opts = ReleqOptions.model_validate(rel)
    except ValidationError as e:
        raise ConfigError(one_line(e, "releq")) from None
    validate_names(cfg)
    if cfg.plan.weight is None:
        raise ConfigError("plan.weight: the search needs a weight quantizer (e.g. {name: dorefa, bits: 8})")
    if cfg.dcq is not None:
        raise ConfigError("dcq: a bit search does not run a DCQ schedule")
    if cfg.plan.method.name == "sinareq":  # its setup sets every layer to ceil(beta): each assignment ran at 8 bits
        raise ConfigError("plan.method: sinareq learns each layer's bits itself, which would replace every assignment "
                          "the search evaluates; search with a fixed-bit method (e.g. ste or sinreq)")
    if len(set(opts.bits)) < 2 or min(opts.bits) < 1 or max(opts.bits) > 32:
        raise ConfigError(f"releq.bits: at least two widths in 1..32, got {opts.bits}")
    b = opts.budget
    if b is not None and (b.fraction is None) == (b.value is None):
        raise ConfigError("releq.budget: give exactly one of fraction or value")
    return cfg, opts


# ---------------------------------------------------------------------------------------------
# the FP32 start
# ---------------------------------------------------------------------------------------------
def fp32_start(cfg: Config, opts: ReleqOptions, out: Path) -> tuple[Config, float]:
    """(config whose model.init_from is the FP32 start, its validation accuracy). Without
    ``model.init_from``, ``pretrain_epochs`` of FP32 training (train.* settings) make ``out/fp32.pt``."""
    from ..data import BatchLoader
    from ..fit import evaluate, fit
    from ..plan import Plan
    from ..train import _save, build_model, build_optimizer, build_scheduler, load_data

    data = load_data(cfg)
    if cfg.model.init_from is None:
        path = out / "fp32.pt"
        if not path.is_file():
            t = cfg.train.model_copy(update={"epochs": opts.pretrain_epochs})
            model = build_model(cfg.model_copy(update={"plan": Plan()}, deep=True), data)
            loader = BatchLoader(data.train, data.info, t.batch_size, shuffle=True, augment=cfg.data.augment,
                                 seed=t.seed)
            opt = build_optimizer(model, t)
            fit(model, loader, optimizer=opt, scheduler=build_scheduler(opt, t, len(loader)), epochs=t.epochs)
            _save(path, model.state_dict())  # whole or absent: a kill while saving left a fp32.pt no rerun could read
        cfg = cfg.model_copy(deep=True)
        cfg.model.init_from = str(path.resolve())
    model = build_model(cfg.model_copy(update={"plan": Plan()}, deep=True), data)
    acc = evaluate(model, BatchLoader(data.val, data.info, cfg.train.eval_batch_size))["acc"]
    if not acc > 0:
        raise ConfigError("the FP32 start has zero validation accuracy; train it longer (releq.pretrain_epochs)")
    return cfg, acc


def plan_config(cfg: Config, layers: list[str], bits, opts: ReleqOptions, name: str, resolved=None) -> dict:
    """A ``lowbit train`` config: the search's config with per-layer weight bits, from the FP32 start.
    ``resolved``: the searched network's layer plans (name -> LayerPlan); a layer that one of the config's
    plan.layers patterns set is written whole (its quantizers as searched), after every pattern."""
    d = cfg.to_dict()
    d["name"] = name
    over = dict(d["plan"].get("layers", {}))
    for n, b in zip(layers, bits):
        lp = (resolved or {}).get(n)
        if lp is None or lp.source is None:
            over[n] = {"weight": {"bits": int(b)}}
        else:  # before: {weight: {bits}} replaced the layer's own entry (its quantizer, its act) or came before a glob
            over.pop(n, None)
            over[n] = {"weight": lp.weight.merged({"bits": int(b)}).model_dump(),
                       "act": lp.act.model_dump() if lp.act is not None else "fp"}
    d["plan"]["layers"] = over
    d["train"]["epochs"] = opts.final_epochs
    if opts.final_lr is not None:
        d["train"]["lr"] = opts.final_lr
    return d


# ---------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------
class _Recorder:
    """The acc_fn ReLeQ's environment calls: evaluates (cached) and records what was asked."""

    def __init__(self, evaluator: BitEvaluator, asked: list):
        self.evaluator, self.asked = evaluator, asked
        self.seen = {tuple(b) for b in asked}

    def __call__(self, bits):
        bits = tuple(int(b) for b in bits)
        if bits not in self.seen:
            self.seen.add(bits)
            self.asked.append(list(bits))
        return self.evaluator.accuracy(bits)


#: options a resumed search may change: how long it runs, where evaluations run, what is written at the end
_RESUMABLE = ("episodes", "progress", "workers", "backend", "address", "final_epochs", "final_lr", "baselines")


def _settings(data: dict) -> dict:
    """What a search's evaluations and agent depend on: its ``search.yaml`` without the resumable options."""
    return {**data, "releq": {k: v for k, v in data.get("releq", {}).items() if k not in _RESUMABLE}}


def search(cfg: Config, opts: ReleqOptions, out: str | Path, resume: bool = False) -> dict:
    """Run ReLeQ and the baselines into the search folder ``out``; returns ``result.json``'s dict."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.logger import Logger
    from stable_baselines3.common.callbacks import BaseCallback

    from ..fit import progress_bar
    from ..runfolder import atomic_write
    from ..train import _save

    if opts.backend == "ray":  # only the baselines use the pool, after the whole search: without Ray, refused now
        from ..parallel import import_ray

        import_ray()
    out = Path(out)
    state_path, agent_path = out / "state.json", out / "agent.zip"
    if resume:
        if not state_path.is_file():
            raise ConfigError(f"cannot resume: no {state_path}")
    elif state_path.exists():
        raise ConfigError(f"{out} already holds a search; use --resume or another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "plans").mkdir(exist_ok=True)
    now = {**cfg.to_dict(), "releq": opts.model_dump(mode="json")}
    if not resume:
        (out / "search.yaml").write_text(yaml.safe_dump(now, sort_keys=False))
    elif (out / "search.yaml").is_file():  # the cache and the agent were made with the saved settings
        from ..runfolder import _normal, _strip, config_diff

        saved = yaml.safe_load((out / "search.yaml").read_text()) or {}
        # read as a run folder's config: a field lowbit added or stopped recording since is no change (session 26's
        # non-integer plans no longer record integer_residual: every earlier search refused to resume)
        saved = {**_normal({k: v for k, v in saved.items() if k != "releq"}, saved=True),
                 "releq": saved.get("releq", {})}
        # threads, progress, device and data.root may change (runfolder.VOLATILE): a search folder moved to a machine
        # with the data elsewhere resumes, as a run folder does. The thread count moves a fine-tune's numbers by float
        # rounding (evaluator.BitEvaluator.eval_threads); the cached evaluations are kept as they were computed
        diff = config_diff(_settings(_strip(saved)), _settings(_strip(json.loads(json.dumps(now)))))
        if diff:
            raise ConfigError(f"cannot resume {out}: its evaluations were made with other settings ({'; '.join(diff)});"
                              f" only {', '.join(_RESUMABLE)} may change on --resume")
    t_start = time.perf_counter()
    torch.manual_seed(opts.seed)
    cfg, acc_fp = fp32_start(cfg, opts, out)

    # the evaluator, the layers, the cost model, the budget
    spec = EvalSpec(cfg.to_dict(), opts.layers, opts.finetune_steps, opts.finetune_lr, seed=opts.seed,
                    threads=torch.get_num_threads())
    ev = BitEvaluator(spec, out / "cache.jsonl", workers=opts.workers, backend=opts.backend, address=opts.address)
    ev._build()
    layers = ev.spec.layers
    choices = sorted(set(opts.bits))
    info = ev.data.info
    h, w = info.image_size if not isinstance(info.image_size, int) else (info.image_size, info.image_size)
    cost = BitCost(ev.model, layers, torch.zeros(1, info.in_channels, h, w))
    budget: Budget | None = None
    if opts.budget is not None:
        budget = cost.budget(opts.budget.metric, choices, opts.budget.fraction, opts.budget.value)

    def wall(bits):
        return budget_wall(bits, choices, cost, budget)

    def within(bits):
        return budget is None or cost.cost(bits, budget.metric) <= budget.limit

    # -- ReLeQ ---------------------------------------------------------------------------------
    st = json.loads(state_path.read_text()) if resume else {"episodes_done": 0, "history": [], "asked": [],
                                                               "releq_seconds": 0.0}
    st["history"] = st["history"][: st["episodes_done"]]
    L = len(layers)
    bar = progress_bar(total=opts.episodes, initial=st["episodes_done"], desc="releq episodes", enabled=opts.progress,
                       logs=True)  # one update per episode, the search's only progress
    best = {"reward": -np.inf}
    for hrow in st["history"]:
        if hrow["final_reward"] > best["reward"]:
            best = {"reward": hrow["final_reward"], "acc": hrow["acc"], "avg_bits": hrow["avg_bits"]}

    def on_episode(inf: dict) -> None:
        row = {"episode": len(st["history"]) + 1, "final_reward": inf["final_reward"],
               "episode_reward": inf["episode_reward"], "acc": inf["acc"], "avg_bits": inf["avg_bits"],
               "bits": list(inf["bits"])}
        st["history"].append(row)
        if row["final_reward"] > best["reward"]:
            best.update(reward=row["final_reward"], acc=row["acc"], avg_bits=row["avg_bits"])
        bar.update(1)
        bar.set_postfix(best_reward=f"{best['reward']:.3f}", acc=f"{best['acc']:.4f}",
                        avg_bits=f"{best['avg_bits']:.2f}")

    recorder = _Recorder(ev, st["asked"])
    env = ReleqEnv(recorder, acc_fp, layer_features(ev.model, layers), choices, wall=wall, reward=opts.reward,
                   on_episode=on_episode)
    p = opts.ppo
    t0 = time.perf_counter()

    seconds_before = st["releq_seconds"]

    rng_path = out / "rng.pt"

    def save() -> None:
        tmp = agent_path.with_name("agent.tmp.zip")  # a kill inside PPO.save left half a zip no resume could load
        model.save(tmp)
        tmp.replace(agent_path)
        # the random state the agent samples its actions from: PPO.load seeds it anew from opts.seed, and a resumed
        # search then replayed its first episodes (before session 23)
        _save(rng_path, {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()})
        st["episodes_done"] = len(st["history"])
        st["releq_seconds"] = seconds_before + time.perf_counter() - t0
        atomic_write(state_path, json.dumps(st))

    class Saver(BaseCallback):
        def _on_rollout_start(self) -> None:
            if len(st["history"]) > st["episodes_done"]:
                save()

        def _on_step(self) -> bool:
            return len(st["history"]) < opts.episodes

    if resume and agent_path.is_file():
        model = PPO.load(agent_path, env=env, device="cpu")
        if rng_path.is_file():
            rng = torch.load(rng_path, weights_only=False)
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["random"])
    else:
        model = PPO("MlpPolicy", env, learning_rate=p.learning_rate, n_steps=L * p.episodes_per_update,
                    batch_size=L * p.episodes_per_update, n_epochs=p.n_epochs, gamma=p.gamma,
                    gae_lambda=p.gae_lambda, clip_range=p.clip_range, ent_coef=p.ent_coef, vf_coef=p.vf_coef,
                    max_grad_norm=p.max_grad_norm, normalize_advantage=p.normalize_advantage,
                    policy_kwargs={"net_arch": {"pi": p.pi_layers, "vf": p.vf_layers}}, seed=opts.seed,
                    device="cpu", verbose=0)
    # a logger that writes nothing: left to itself, PPO.learn makes an empty SB3-<date> folder in the system's
    # temporary directory on every search (and on every resume)
    model.set_logger(Logger(folder=None, output_formats=[]))
    remaining = opts.episodes - len(st["history"])
    if remaining > 0:
        model.learn(total_timesteps=remaining * L, callback=Saver(), reset_num_timesteps=not resume)
    save()
    bar.close()
    # the trained policy's deterministic assignment (not a training episode)
    env.on_episode = None
    obs, _ = env.reset()
    for _ in range(L):
        a, _ = model.predict(obs, deterministic=True)
        obs, _, done, _, inf = env.step(int(a))
    policy_bits = list(inf["bits"])
    releq_seconds = st["releq_seconds"]
    asked = [tuple(b) for b in st["asked"]]
    n_evals = len(asked)

    # -- baselines at the same number of evaluated assignments ----------------------------------
    methods: dict[str, list[tuple]] = {"releq": asked}
    drop = None
    coef = cost.coef[budget.metric if budget else "size"]
    for name in opts.baselines:
        if name == "uniform":
            cands = uniform_candidates(choices, L, wall)
        elif name == "random":
            cands = random_candidates(n_evals, choices, L, wall, seed=opts.seed)
        else:
            cands, drop = sensitivity_candidates(ev, choices, L, coef, n_evals, within)
        ev.accuracies(cands)
        methods[name] = cands

    # -- picks, plans, result -------------------------------------------------------------------
    result = {"config": str(out / "search.yaml"), "acc_fp32_val": acc_fp, "layers": layers, "choices": choices,
              "budget": budget.to_dict() if budget else None,
              "budget_top_cost": cost.cost([choices[-1]] * L, budget.metric) if budget else None,
              "episodes": len(st["history"]), "releq_seconds": releq_seconds,
              "total_seconds": time.perf_counter() - t_start, "policy_bits": policy_bits,
              "policy_acc": ev.accuracy(policy_bits), "methods": {}}
    resolved = {lp.name: lp for lp in quant_state(ev.model).layers}
    for name, cands in methods.items():
        recs = [ev.cached(c) for c in cands]
        pick = select(recs, acc_fp, choices, within)
        plan_path = out / "plans" / f"{name}.yaml"
        plan_path.write_text(yaml.safe_dump(plan_config(cfg, layers, pick["bits"], opts, f"{cfg.name}-{name}",
                                                        resolved),
                                            sort_keys=False))
        result["methods"][name] = {
            "evaluations": len(cands), "eval_seconds": sum(r["seconds"] for r in recs),
            "bits": pick["bits"], "val_acc": pick["acc"], "reward": pick["reward"],
            "avg_bits": float(np.mean(pick["bits"])),
            "weighted_bits": float(np.dot(cost.coef["size"], pick["bits"]) / sum(cost.coef["size"])),
            "costs": cost.costs(pick["bits"]), "within_budget": within(pick["bits"]), "plan": str(plan_path)}
    if drop is not None:
        result["sensitivity_drop"] = {f"{layers[l]}@{b}": d for (l, b), d in drop.items()}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    try:
        from ..viz.releq import plot_bits, plot_history

        plot_history(st["history"], out / "releq_history.png")
        plot_bits(layers, result["methods"]["releq"]["bits"], drop, choices, out / "releq_bits.png")
    except ImportError:  # matplotlib is the optional "plot" extra
        pass
    return result


def format_result(r: dict) -> str:
    lines = [f"FP32 validation accuracy {100 * r['acc_fp32_val']:.2f}%; layers {', '.join(r['layers'])}"]
    if r["budget"]:
        b = r["budget"]
        lines.append(f"budget: {b['metric']} <= {b['limit']:.4g} ({b['limit'] / r['budget_top_cost']:.2f} of "
                     f"{max(r['choices'])}-bit)")
    lines.append(f"{'method':<12} {'evals':>5} {'val acc':>8} {'reward':>7} {'avg bits':>8} {'w. bits':>7}  bits")
    for name, m in r["methods"].items():
        lines.append(f"{name:<12} {m['evaluations']:>5} {100 * m['val_acc']:>7.2f}% {m['reward']:>7.3f} "
                     f"{m['avg_bits']:>8.2f} {m['weighted_bits']:>7.2f}  {m['bits']}")
    lines.append(f"ReLeQ: {r['episodes']} episodes in {r['releq_seconds']:.1f} s; policy's own choice "
                 f"{r['policy_bits']} (val {100 * r['policy_acc']:.2f}%)")
    return "\n".join(lines)
