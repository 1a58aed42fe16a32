"""Neural Channel Expansion (seed 004, Algorithm 1) on the open training core.

::

    res = search_nce(load_config("configs/nce_resnet8_w2a2.yaml"), NCEOptions(threshold=0.3), "runs/nce")
    res.channels        # {layer: width}: model.channels of the found network
    res.config          # the config `lowbit train` trains from scratch (derived.yaml in the folder)

The search is a :class:`NCEMethod` run by :func:`lowbit.fit` over the super-network
(:class:`lowbit.search.supernet.SuperNet`, quantized with the config's plan so that quantization
sensitivity drives the choice):

1. the training split is cut into two equal disjoint halves, D_weight (the batches ``fit`` iterates)
   and D_arch (the method's own loader) (Algorithm 1, input);
2. warm-up epochs: per step one width per group sampled uniformly among the active candidates,
   weights only (lines 1-4);
3. search epochs: per step a weight step on a D_weight batch with widths sampled from the softmax
   of the logits (TAS: two candidates from a Gumbel-softmax, mixed by their renormalised
   probabilities; the logits get no gradient), then an architecture step on a D_arch batch (the
   logits' own Adam): task loss + ``resource_weight`` x TAS's resource term on the expected cost
   (log E[cost] when the argmax network is over the target, -log E[cost] when it is more than
   ``tolerance`` under it, 0 between); then the expansion rule (lines 10-16,
   :meth:`SuperNet.expand_step`);
4. derive: argmax width per group; if that network is over the target (the resource term only
   pulls it there), the least confident groups step down one candidate until it fits
   (``fit_steps`` in the result says how many); the widths become ``model.channels`` of a
   config that ``lowbit train`` trains from scratch (line 19).

Cost targets: ``macs`` (004's FLOPs, counted as multiply-accumulates), ``params``, or ``mem`` (seed
002's Mem = params at their bits + N_a·max(b_a, 4), at the plan's bits); the default target is the
original network's cost. All are the numbers :func:`lowbit.cost.profile` gives the derived network.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..cost import mem_002
from ..data import BatchLoader, Split
from ..errors import ConfigError
from ..fit import StepResult, fit, resolve_device
from ..methods import STE
from ..quantize import layer_bits, quantize
from .supernet import RATIOS, SuperNet

#: target name -> cost key. mem: 002's Mem by lowbit.cost.profile (each tensor at its own bits: FP32 first/last
#: layer and BatchNorm at 32); mem002: `lowbit budget`'s N_p·b_p + N_a·max(b_p, 4) (every parameter at b_p)
TARGETS = {"macs": "macs", "flops": "macs", "params": "params", "mem": "mem_bits", "mem002": "mem_uniform"}


@dataclass
class NCEOptions:
    """Knobs of the search (defaults: TAS's where 004 says nothing, scaled to short searches)."""

    warmup_epochs: int = 1
    epochs: int = 3  # search epochs (after the warm-up)
    threshold: float = 0.3  # T: expand when p(largest) >= T (004: 0.3 best of 0.15..0.3)
    target: str = "macs"  # macs (= FLOPs) | params | mem | mem002
    target_value: float | None = None  # default: the original network's cost
    ratios: tuple[float, ...] = RATIOS
    cap: float = 2.0  # the widest allowed candidate, as a multiple of the original width
    expand_step: float = 0.1
    arch_lr: float = 0.02  # TAS: 1e-3 over hundreds of epochs; a few epochs here need more
    arch_weight_decay: float = 1e-3
    resource_weight: float = 2.0  # TAS
    tolerance: float = 0.05  # TAS: no resource term within 5 % under the target
    tau: tuple[float, float] = (10.0, 0.1)  # TAS's Gumbel temperature, linear over the search steps

    def check(self) -> None:
        if self.target not in TARGETS:
            raise ConfigError(f"nce target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"nce threshold must be in (0, 1], got {self.threshold}")
        for k in ("warmup_epochs", "epochs"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"nce {k} must be an integer >= 0, got {v!r}")
        if self.epochs < 1:
            raise ConfigError("nce epochs (search epochs) must be >= 1")
        if self.target_value is not None and not self.target_value > 0:
            raise ConfigError(f"nce target_value must be > 0, got {self.target_value}")


def resource_loss(expected: torch.Tensor, current: float, target: float, tolerance: float) -> torch.Tensor:
    """TAS's resource term: log E[cost] if the argmax network's cost is over the target, -log E[cost]
    if it is below target·(1 - tolerance), else 0 (costs normalised by the target)."""
    e = expected / target
    if current > target:
        return torch.log(e)
    if current < target * (1 - tolerance):
        return -torch.log(e)
    return e * 0.0


class NCEMethod(STE):
    """Algorithm 1 as a method: ``fit`` iterates D_weight; this method holds D_arch, the
    architecture logits' optimizer and the warm-up / search schedule."""

    name = "nce"

    def __init__(self, supernet: SuperNet, arch_batches: BatchLoader, opts: NCEOptions, target: float) -> None:
        super().__init__()
        self.sn, self.arch_batches, self.opts, self.target = supernet, arch_batches, opts, target
        self.key = TARGETS[opts.target]
        self.arch_opt: torch.optim.Optimizer | None = None
        self._arch_iter = None
        self._arch_epoch = 0
        self.expansions: list[dict] = []  # {step, group, width}
        self.tau = opts.tau[0]
        self._last: dict[str, float] = {}
        self.gen = torch.Generator().manual_seed(0)

    def setup(self, model: nn.Module, total_steps: int, steps_per_epoch: int) -> None:
        super().setup(model, total_steps, steps_per_epoch)
        dev = next(model.parameters()).device
        self.sn.logits.to(dev)
        self.arch_opt = torch.optim.Adam(self.sn.logits.parameters(), lr=self.opts.arch_lr, betas=(0.5, 0.999),
                                         weight_decay=self.opts.arch_weight_decay)
        self.warmup_steps = self.opts.warmup_epochs * steps_per_epoch
        self.gen.manual_seed(int(torch.initial_seed()) % (2**63))

    def _arch_batch(self, dev: torch.device):
        while True:
            if self._arch_iter is None:
                self.arch_batches.set_epoch(self._arch_epoch)
                self._arch_iter = iter(self.arch_batches)
            try:
                x, y = next(self._arch_iter)
                return x.to(dev), y.to(dev)
            except StopIteration:
                self._arch_iter, self._arch_epoch = None, self._arch_epoch + 1

    def _costs(self) -> tuple[torch.Tensor, float]:
        expected = self.sn.cost()[self.key]
        with torch.no_grad():
            current = float(self.sn.cost([float(w) for w in self.sn.widths_of(self.sn.choice())])[self.key])
        return expected, current

    def train_step(self, model: nn.Module, batch, optimizer, step: int):
        sn = self.sn
        if step < self.warmup_steps:  # Algorithm 1 lines 1-4
            sn.set_widths(sn.widths_of(sn.sample_uniform(self.gen)))
            try:
                res = super().train_step(model, batch, optimizer, step)
            finally:
                sn.set_widths(None)
            return res
        span = max(self.total_steps - self.warmup_steps - 1, 1)
        t0, t1 = self.opts.tau
        self.tau = t0 - (t0 - t1) * (step - self.warmup_steps) / span
        try:
            with torch.no_grad():  # lines 6-7: weights on D_weight, widths sampled from softmax(A)
                sn.set_mix(sn.sample_gumbel(self.tau))
            res = super().train_step(model, batch, optimizer, step)
            # lines 8-9: architecture on D_arch
            x, y = self._arch_batch(batch[0].device)
            sn.set_mix(sn.sample_gumbel(self.tau))
            out = model(x)
            task = F.cross_entropy(out, y)
            expected, current = self._costs()
            res_term = resource_loss(expected, current, self.target, self.opts.tolerance)
            total = task + self.opts.resource_weight * res_term
            self.arch_opt.zero_grad(set_to_none=True)
            total.backward()
            self.arch_opt.step()
            optimizer.zero_grad(set_to_none=True)  # the arch loss' weight gradients are not used
        finally:
            sn.set_widths(None)
        for gi, width in sn.expand_step(self.opts.threshold):  # lines 10-16
            self.expansions.append({"step": step, "group": sn.groups[gi].name, "width": width})
        self._last = {"arch_loss": float(task.detach()), "cost": float(expected.detach()) / self.target,
                      "argmax_cost": current / self.target}
        return res

    def log(self) -> dict[str, float]:
        if not self._last:
            return {}
        return {"E[cost]/target": self._last["cost"], "tau": self.tau}

    def epoch_record(self, model: nn.Module) -> dict:
        sn = self.sn
        with torch.no_grad():
            expected = [float(w) for w in sn.expected_widths()]
            e_cost = float(sn.cost()[self.key])
            widths = sn.widths_of(sn.choice())
            a_cost = float(sn.cost([float(w) for w in widths])[self.key])
        return {"nce_widths": widths, "nce_expected_widths": [round(w, 3) for w in expected],
                "nce_active_max": [g.widths[g.active - 1] for g in sn.groups],
                "nce_expected_cost": e_cost, "nce_argmax_cost": a_cost, "nce_target": self.target,
                "nce_expansions": len(self.expansions)}

    def state_dict(self) -> dict:
        return {"supernet": self.sn.state(), "arch_opt": self.arch_opt.state_dict() if self.arch_opt else None,
                "expansions": list(self.expansions), "arch_epoch": self._arch_epoch}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.sn.load_state(state["supernet"])
        if state.get("arch_opt") and self.arch_opt is not None:
            self.arch_opt.load_state_dict(state["arch_opt"])
        self.expansions = list(state.get("expansions", []))
        self._arch_epoch = state.get("arch_epoch", 0)


def split_halves(split: Split, seed: int) -> tuple[Split, Split]:
    """Algorithm 1's input: two disjoint halves of equal size (one example dropped if odd)."""
    n = len(split)
    if n < 2:
        raise ConfigError("NCE needs at least 2 training examples to split into D_weight and D_arch")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    h = n // 2
    a, b = perm[:h].sort().values, perm[h:2 * h].sort().values
    return Split(split.images[a], split.labels[a]), Split(split.images[b], split.labels[b])


def _unreachable(target: float, key: str) -> ConfigError:
    return ConfigError(f"NCE: even the narrowest candidates cost more than the target {target:,.0f} ({key})")


def fit_to_target(sn: SuperNet, choice: list[int], key: str, target: float) -> tuple[list[int], int]:
    """Step the least confident groups (smallest log p(current) - log p(one narrower)) down one
    candidate until the network's cost is <= target. Returns (choice, steps taken)."""
    choice, steps = list(choice), 0
    logp = [torch.log_softmax(sn.logits[gi][: g.active].detach().cpu(), 0) for gi, g in enumerate(sn.groups)]
    while float(sn.cost([float(w) for w in sn.widths_of(choice)])[key]) > target:
        options = [(float(logp[gi][k] - logp[gi][k - 1]), gi) for gi, k in enumerate(choice) if k > 0]
        if not options:
            raise _unreachable(target, key)
        _, gi = min(options)
        choice[gi] -= 1
        steps += 1
    return choice, steps


@dataclass
class NCEResult:
    out_dir: Path
    channels: dict[str, int]
    config: Config
    widths: list[int]
    base: list[int]
    groups: list[list[str]]
    cost: dict[str, float]  # derived network, by the cost model (profile)
    original: dict[str, float]
    target: dict[str, float]  # {key: value}
    fit_steps: int
    expansions: list[dict]
    history: list[dict]
    search_seconds: float
    candidates: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        d["config"] = self.config.to_dict()
        return d


def original_cost(cfg: Config, data) -> dict[str, float]:
    """params / macs / mem of the config's network as the cost model measures it (at the plan's bits)."""
    from ..train import build_model, cost_of

    return _cost_dict(cost_of(build_model(cfg, data), data))


def _cost_dict(c) -> dict[str, float]:
    bp = max((lc.w_bits for lc in c.layers if lc.w_bits < 32), default=32)
    return {"params": c.params, "macs": c.macs, "mem_bits": c.mem_bits, "bitops": c.bitops,
            "mem_uniform": mem_002(c.params, c.max_act_elems, bp)}


def search_nce(cfg: Config, opts: NCEOptions | None = None, out_dir: str | Path | None = None, data=None,
               progress: bool = True) -> NCEResult:
    """Run NCE on ``cfg`` (model, data, plan, train settings) and derive the widths; writes
    ``search.json``, ``derived.yaml`` and the plots into ``out_dir`` when given. torch's thread count is the
    caller's again afterwards (``train.threads`` is the search's)."""
    from ..parallel import callers_threads

    with callers_threads():
        return _search_nce(cfg, opts, out_dir, data, progress)


def _search_nce(cfg: Config, opts: NCEOptions | None, out_dir: str | Path | None, data, progress: bool) -> NCEResult:
    from ..config import Config as _Config
    from ..train import build_model, build_optimizer, build_scheduler, cost_of, load_data

    opts = opts or NCEOptions()
    opts.check()
    if cfg.plan.method.name != "ste":
        raise ConfigError(f"plan.method: NCE searches with plain STE QAT, got {cfg.plan.method.name!r}")
    if cfg.dcq is not None or cfg.train.distill is not None:
        raise ConfigError("NCE: dcq and train.distill are not supported in the search")
    if cfg.plan.integer:
        raise ConfigError("NCE: the search's super-network (expandable channels) has no integer mode; search without "
                          "plan.integer, then train derived.yaml with plan.integer=true "
                          "(session 24: it failed tracing)")
    if cfg.model.init_from is not None:
        raise ConfigError("NCE: model.init_from is set; the super-network is searched from scratch and the found "
                          "network is re-initialised (004 Algorithm 1, line 19): leave model.init_from out")
    for k in ("width", "channels"):
        if k in cfg.model.options and cfg.model.options[k] not in (None, 1, 1.0):
            raise ConfigError(f"NCE: model.{k} is set ({cfg.model.options[k]!r}); NCE searches the widths itself, "
                              f"from the model's own: leave model.{k} out (the result's model.channels is the "
                              "search's)")
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    data = data or load_data(cfg)
    info = data.info
    torch.manual_seed(t.seed)
    sn = SuperNet(cfg.model.name, info.in_channels, info.num_classes, info.image_size, opts.ratios, opts.cap,
                  opts.expand_step, cfg.model.options)
    key = TARGETS[opts.target]
    original = original_cost(cfg, data)
    target = float(opts.target_value) if opts.target_value is not None else float(original[key])

    d_weight, d_arch = split_halves(data.train, t.seed)
    w_loader = BatchLoader(d_weight, info, t.batch_size, shuffle=True, augment=cfg.data.augment, seed=t.seed)
    a_loader = BatchLoader(d_arch, info, t.batch_size, shuffle=True, augment=cfg.data.augment, seed=t.seed + 1)
    val_loader = BatchLoader(data.val, info, t.eval_batch_size) if len(data.val) else None
    method = NCEMethod(sn, a_loader, opts, target)
    quantize(sn.net, cfg.plan, method=method)
    sn.set_bits_table(layer_bits(sn.net))
    if float(sn.cost([float(g.widths[0]) for g in sn.groups])[key]) > target:  # before the search, not after it
        raise _unreachable(target, key)
    sn.net.to(device)
    total_epochs = opts.warmup_epochs + opts.epochs
    opt = build_optimizer(sn.net, t, method)
    sched = build_scheduler(opt, t.model_copy(update={"epochs": total_epochs}), len(w_loader))
    t_start = time.perf_counter()
    history = fit(sn.net, w_loader, method, opt, sched, epochs=total_epochs, device=device, val_batches=val_loader,
                  progress=progress)
    seconds = time.perf_counter() - t_start

    choice, steps = fit_to_target(sn, sn.choice(), key, target)
    widths = sn.widths_of(choice)
    channels = sn.channels(widths)
    d = cfg.to_dict()
    d["name"] = f"{cfg.name}-nce"
    d["model"]["channels"] = channels
    derived = _Config.model_validate(d)
    measured = cost_of(build_model(derived, data), data)  # the cost model on the derived network itself
    cost = _cost_dict(measured)
    res = NCEResult(Path(out_dir) if out_dir else Path("."), channels, derived, widths,
                    [g.base for g in sn.groups], [list(g.layers) for g in sn.groups], cost, original,
                    {key: target}, steps, method.expansions, history, seconds,
                    candidates=[g.widths[: g.active] for g in sn.groups])
    if out_dir is not None:
        write_search(res)
    return res


def write_search(res: NCEResult) -> None:
    out = res.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "derived.yaml").write_text(res.config.to_yaml())
    (out / "search.json").write_text(json.dumps(res.to_dict(), indent=1) + "\n")
    try:
        plot_search(res, out)
    except ImportError:  # matplotlib is optional
        pass


def plot_search(res: NCEResult, out: Path) -> list[Path]:
    """004's structure comparison (found width per layer vs the original) and the expansions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = {n: b for g, b in zip(res.groups, res.base) for n in g}
    order = list(res.channels)  # registration order of the free layers
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(order)), 3.5))
    xs = range(len(order))
    ax.bar([x - 0.2 for x in xs], [base[n] for n in order], 0.4, label="original", color="0.6")
    ax.bar([x + 0.2 for x in xs], [res.channels[n] for n in order], 0.4, label="NCE", color="tab:blue")
    ax.set_xticks(list(xs), order, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("out channels")
    key, tv = next(iter(res.target.items()))
    ax.set_title(f"NCE widths: {key} {res.cost[key]:,.0f} vs target {tv:,.0f}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p1 = out / "widths.png"
    fig.savefig(p1, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    rows = [r for r in res.history if "nce_active_max" in r]
    for gi, g in enumerate(res.groups):
        ys = [r["nce_active_max"][gi] / res.base[gi] for r in rows]
        ax.plot([r["epoch"] for r in rows], ys, marker="o", label=g[0])
    steps = [e["step"] for e in res.expansions]
    ax.set_xlabel("epoch")
    ax.set_ylabel("widest candidate / original")
    ax.set_title(f"expansions over the search ({len(steps)} in all)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    p2 = out / "expansions.png"
    fig.savefig(p2, dpi=120)
    plt.close(fig)
    return [p1, p2]


# ---------------------------------------------------------------------------------------------
# baselines at equal cost
# ---------------------------------------------------------------------------------------------
def uniform_width_for(cfg: Config, data, key: str, target: float, step: float = 1 / 16,
                      max_width: float = 4.0) -> tuple[float, dict]:
    """WRPN-style uniform widening: the widest ``model.width`` on a ``step`` grid whose cost <= target."""
    def cost(w: float) -> dict:
        c = cfg.model_copy(deep=True)
        c.model = c.model.model_copy(update={"width": w})
        return original_cost(c, data)

    lo, hi = 1, int(round(max_width / step))
    if cost(lo * step)[key] > target:
        raise ConfigError(f"no uniform width >= {step} meets the target {target:,.0f} ({key})")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost(mid * step)[key] <= target:
            lo = mid
        else:
            hi = mid
    return lo * step, cost(lo * step)


def random_channels(cfg: Config, data, opts: NCEOptions, key: str, target: float, seed: int,
                    band: float = 0.05, tries: int = 5000) -> tuple[dict[str, int], dict]:
    """Random per-group widths from the full candidate set (0.3 .. cap) whose cost lies within
    ``band`` below the target (rejection sampling, seeded)."""
    info = data.info
    sn = SuperNet(cfg.model.name, info.in_channels, info.num_classes, info.image_size, opts.ratios, opts.cap,
                  opts.expand_step, cfg.model.options)
    q = cfg.model_copy(deep=True)
    from ..train import build_model

    bits = layer_bits(build_model(q, data))
    sn.set_bits_table(bits)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(tries):
        widths = [g.widths[int(torch.randint(len(g.widths), (1,), generator=gen))] for g in sn.groups]
        c = float(sn.cost([float(w) for w in widths])[key])
        if target * (1 - band) <= c <= target:
            return sn.channels(widths), {k: float(v) for k, v in sn.cost([float(w) for w in widths]).items()}
    raise ConfigError(f"no random widths within {band:.0%} under the target after {tries} draws")


def derived_config(cfg: Config, channels: dict[str, int] | None = None, width: float | None = None,
                   name: str | None = None) -> Config:
    d = cfg.to_dict()
    if channels is not None:
        d["model"]["channels"] = channels
    if width is not None:
        d["model"]["width"] = width
    if name:
        d["name"] = name
    return Config.model_validate(d)


def format_result(res: NCEResult) -> str:
    key, tv = next(iter(res.target.items()))
    unit = {"macs": "MACs", "params": "params", "mem_bits": "Mem bits", "mem_uniform": "Mem(002, all at b_p) bits"}[key]
    lines = [f"NCE search: {len(res.groups)} width groups, {len(res.expansions)} expansions, "
             f"{res.search_seconds:.1f} s",
             f"{'group':<22} {'original':>8} {'found':>6}  candidates"]
    for g, b, w, c in zip(res.groups, res.base, res.widths, res.candidates):
        lines.append(f"{g[0] + (f' (+{len(g) - 1})' if len(g) > 1 else ''):<22} {b:>8} {w:>6}  {c}")
    lines.append(f"target          {unit} <= {tv:,.0f} (original {res.original[key]:,.0f})")
    for k, label in (("macs", "FLOPs (MACs)"), ("params", "params"), ("mem_bits", "Mem (002)")):
        lines.append(f"{label:<15} {res.cost[k]:>14,.0f}  original {res.original[k]:>14,.0f}  "
                     f"ratio {res.cost[k] / res.original[k]:.3f}")
    lines.append(f"meets target    {res.cost[key] <= tv}" + (f" (after {res.fit_steps} step-downs)" if res.fit_steps else ""))
    return "\n".join(lines)


__all__ = ["NCEMethod", "NCEOptions", "NCEResult", "derived_config", "fit_to_target", "format_budget", "format_result", "nce_budget",
           "random_channels", "resource_loss", "search_nce", "split_halves", "uniform_width_for"]



# ---------------------------------------------------------------------------------------------
# seed 002's width x precision question with NCE's per-layer widths
# ---------------------------------------------------------------------------------------------
def nce_budget(cfg: Config, bits_list: list[int], ratio: float | None = None, budget_kib: float | None = None,
               opts: NCEOptions | None = None, out_dir: str | Path = "runs/nce_budget", train: bool = True,
               data=None, progress: bool = False) -> dict:
    """Under one 002 memory budget M (``M0 / ratio`` or ``budget_kib``), for each weight precision:
    `lowbit budget`'s widest uniform width (search/budget.py, its quantizers: LSQ, BWN at 1 bit,
    activations at max(b, 4) bits) against NCE's per-layer widths searched at that precision with
    the target Mem = N_p·b_p + N_a·max(b_p, 4) <= M (the same accounting); with ``train`` both are
    trained from scratch. Does the best precision move? Writes ``budget.json`` and ``budget.md``;
    rows already in ``budget.json`` for the same budget, model and seed (and trained, if ``train``)
    are read back, not searched again, so a stopped call resumes at the next precision."""
    from ..train import load_data
    from .budget import budget_table, make_suite

    opts = opts or NCEOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = data or load_data(cfg)
    info = data.info
    budget, choices = budget_table(cfg.model.name, list(bits_list), info.in_channels, info.num_classes,
                                   info.image_size, ratio=ratio, budget_kib=budget_kib)
    suite = make_suite(choices, {}, [cfg.train.seed], name="nce-budget")
    done = {}
    if (out / "budget.json").is_file():
        prev = json.loads((out / "budget.json").read_text())
        if prev.get("budget_bits") == budget and prev.get("model") == cfg.model.name:
            done = {r["label"]: r for r in prev["rows"]
                    if r.get("seed") == cfg.train.seed and (not train or "nce_acc" in r)}
    rows = []
    for c, (label, patch) in zip(choices, suite["methods"].items()):
        if label in done:
            rows.append(done[label])
            continue
        d = cfg.to_dict()
        d["plan"] = {**d["plan"], "weight": None, "act": None, **patch.get("plan", {})}
        d["name"] = f"{cfg.name}-{label}"
        cfg_b = Config.model_validate(d)
        uniform = derived_config(cfg_b, width=c.width, name=f"{cfg.name}-{label}-uniform")
        cap = max(opts.cap, math.ceil(10 * 1.25 * c.width) / 10)
        o = NCEOptions(**{**asdict(opts), "target": "mem002", "target_value": budget, "cap": cap})
        res = search_nce(cfg_b, o, out / label / "search", data=data, progress=progress)
        row = {"label": label, "seed": cfg.train.seed, "bits": c.bits, "act_bits": c.act_bits,
               "uniform_width": c.width, "uniform_mem": c.mem_bits, "nce_mem": res.cost["mem_uniform"], "nce_widths": res.widths,
               "base": res.base, "cap": cap, "search_seconds": res.search_seconds,
               "nce_macs": res.cost["macs"], "nce_params": res.cost["params"], "uniform_params": c.params}
        if train:
            from ..train import run

            row["uniform_acc"] = run(uniform, out / label / "uniform", data=data).summary["test_acc"]
            row["nce_acc"] = run(res.config, out / label / "nce", data=data).summary["test_acc"]
        rows.append(row)
        _write_budget(out, budget, cfg.model.name, rows)
    return _write_budget(out, budget, cfg.model.name, rows)


def _write_budget(out: Path, budget: float, model: str, rows: list[dict]) -> dict:
    result = {"budget_bits": budget, "model": model, "rows": rows}
    (out / "budget.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "budget.md").write_text(format_budget(result) + "\n")
    return result


def format_budget(result: dict) -> str:
    lines = [f"memory budget M = {result['budget_bits'] / 8 / 1024:.1f} KiB ({result['model']}; "
             "Mem = N_p*b_p + N_a*max(b_p, 4))", "",
             "| W/A bits | uniform width | uniform Mem/M | uniform acc % | NCE Mem/M | NCE params / uniform | NCE acc % |",
             "|---|---|---|---|---|---|---|"]
    m = result["budget_bits"]
    for r in result["rows"]:
        acc = lambda k: f"{100 * r[k]:.2f}" if k in r else "-"  # noqa: E731
        lines.append(f"| W{r['bits']}A{r['act_bits']} | {r['uniform_width']:.4f} | {r['uniform_mem'] / m:.3f} | "
                     f"{acc('uniform_acc')} | {r['nce_mem'] / m:.3f} | {r['nce_params'] / r['uniform_params']:.3f} | "
                     f"{acc('nce_acc')} |")
    return "\n".join(lines)
