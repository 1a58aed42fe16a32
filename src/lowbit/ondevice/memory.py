"""Training memory of one step, measured, beside seed 002's model (:func:`lowbit.cost.training_memory`).

**What is measured and how.** ``tracemalloc`` does not see torch's CPU allocator, and there is no
``torch.cuda.max_memory_allocated`` on a CPU. :func:`measure_step` runs one training step under
``torch.profiler`` with ``profile_memory=True``, which records every allocation and free of torch's
CPU allocator (bytes and time); the running sum over the step, sorted in time, gives the peak of what
the step allocates on top of what already existed. Added to it is the *persistent* state counted
directly (unique storages): parameters, buffers, gradients that exist before the step, the optimizer
state (and a local-loss method's heads). The step measured is the second one (the first creates the
optimizer state). ``peak = persistent + step peak`` is what a device would need to hold at once.

Why not ``saved_tensors_hooks`` (the sum of tensors autograd saves): it counts the activations stored
for backward, which is the model's ``activations`` term, but misses the temporaries (gradients of
activations, quantizer intermediates, im2col buffers) and NITI's integer step, which has no autograd.
The profiler sees all of them.

**Modes.** ``backprop`` (QAT or FP32: forward, backward, SGD-momentum step), ``local`` (all blocks at
once, each block's graph freed after its own backward), ``local_greedy`` (one block at a time; the
peak over the stages), ``niti`` (the integer step, no optimizer).

**Model side.** ``backprop``: :func:`lowbit.cost.training_memory` (latent 32-bit parameters,
optimizer slots, every stored activation at its bits x batch). ``local``: the same parameters and
optimizer (plus the heads') but only the largest block's stored activations. ``local_greedy``: the
frozen blocks at their trained bits, the current block's latent weights and optimizer, its activations;
the worst stage. ``niti``: int8 weights (no latent copy, no optimizer) and every stored activation at
8 bits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..cost import LayerBits, profile, training_memory
from .units import blocks


def _storages(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        s = t.untyped_storage()
        key = (s.data_ptr(), s.nbytes())
        if key not in seen:
            seen.add(key)
            total += s.nbytes()
    return total


def persistent_tensors(model: nn.Module, optimizer=None, extra: nn.Module | None = None) -> list:
    mods = [model] + ([extra] if extra is not None else [])
    out = []
    for m in mods:
        out += list(m.parameters()) + list(m.buffers()) + [p.grad for p in m.parameters()]
    if optimizer is not None:
        for st in optimizer.state.values():
            out += [v for v in st.values() if isinstance(v, torch.Tensor)]
    return out


def measure_step(step: Callable[[], None], persistent: list) -> dict:
    """Peak bytes of one call of ``step``: persistent state + the peak of the allocator's running
    sum during the call (torch.profiler, profile_memory)."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    base = _storages(persistent)
    with tprofile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    run = peak = 0
    for _, b in events:
        run += b
        peak = max(peak, run)
    return {"persistent_bytes": base, "step_peak_bytes": peak, "peak_bytes": base + peak}


# ---------------------------------------------------------------------------------------------------
# the model side
# ---------------------------------------------------------------------------------------------------
def _fp_elems(module: nn.Module, x: torch.Tensor) -> int:
    """Elements stored for backward per sample (every hooked output, 002's "all activations")."""
    return training_memory(module, x[:1], {}, 1, 0, "all")["activation_bits_per_sample"] // 32


def _sub_bits(bits: dict, names: list[str]) -> dict:
    out = {}
    for i, n in enumerate(names):
        for k, v in bits.items():
            if k == n or k.startswith(n + "."):
                out[str(i) + k[len(n):]] = v
    return out


class _ResidualTail(nn.Module):
    """The second block of a split residual block (``conv2 .. bn2``, ``shortcut``, ``relu2`` and the units after it)
    as one module the cost model can trace: ``relu2(bn2(conv2(h)) + shortcut(x))`` with the block's input ``x`` held
    as a constant; ``x`` passes an ``nn.Identity`` so that it is counted as stored (a projection shortcut keeps it for
    its backward; an identity shortcut does not, so such a block is over-counted by its input). Children ``0, 1, ..`` are the block's modules, so :func:`_sub_bits` maps the bits."""

    def __init__(self, mods: list[nn.Module], shortcut: nn.Module, x: torch.Tensor):
        super().__init__()
        for i, m in enumerate(mods):
            self.add_module(str(i), m)
        self.held = nn.Identity()
        self.x = x
        self.k = next(i for i, m in enumerate(mods) if m is shortcut)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mods = [m for n, m in self.named_children() if n != "held"]
        for i, m in enumerate(mods):
            if i == self.k:
                h = h + m(self.held(self.x))
            else:
                h = m(h)
        return h


def _block_modules(model: nn.Module, x: torch.Tensor, bl) -> list[tuple[nn.Module, torch.Tensor]]:
    """Each block as one module the cost model can trace, with its input (one image): an ``nn.Sequential`` of its
    units, or, for a split residual block's second block, a :class:`_ResidualTail` holding the residual block's input."""
    got: list = [None] * len(bl)
    res_in: dict = {}
    hooks = [b.modules[0].register_forward_pre_hook(
        lambda m, a, i=b.index: got.__setitem__(i, a[0].detach())) for b in bl]
    hooks += [b.residual.register_forward_pre_hook(
        lambda m, a, i=b.index: res_in.__setitem__(i, a[0].detach())) for b in bl if b.residual is not None]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return [(nn.Sequential(*b.modules) if b.residual is None else _ResidualTail(b.modules, b.residual.shortcut,
                                                                                res_in[b.index]), got[b.index])
            for b in bl]


def model_bits(mode: str, model: nn.Module, x: torch.Tensor, bits: dict, batch: int, optimizer_slots: int = 1,
               head_params: int = 0, split_residual: bool = True) -> dict:
    """The cost model's training memory (bits) for ``mode`` at batch ``batch``; ``split_residual``: the ``local``
    option of that name (how the blocks are cut; where the heads read changes no block's activations)."""
    if mode == "backprop":
        t = training_memory(model, x[:1], bits, batch, optimizer_slots, "all")
        return {"params": t["latent_params_bits"], "optimizer": t["optimizer_bits"],
                "activations": t["activations_bits"], "total": t["total_bits"]}
    if mode == "niti":
        n_p = profile(model, x[:1], {}).params
        acts = 8 * _fp_elems(model, x) * batch
        return {"params": 8 * n_p, "optimizer": 0, "activations": acts, "total": 8 * n_p + acts}
    bl, _ = blocks(model, split_residual)
    per_block = []
    for b, (seq, inp) in zip(bl, _block_modules(model, x, bl)):
        sub = _sub_bits(bits, b.names)
        acts = training_memory(seq, inp, sub, batch, optimizer_slots, "all")["activations_bits"]
        cs = profile(seq, inp, sub)
        per_block.append((acts, cs.params + cs.n_scales, cs.param_bits))
    whole = training_memory(model, x[:1], bits, batch, optimizer_slots, "all")
    heads = 32 * head_params * (1 + optimizer_slots)
    if mode == "local":
        acts = max(a for a, _, _ in per_block)
        total = whole["latent_params_bits"] + whole["optimizer_bits"] + heads + acts
        return {"params": whole["latent_params_bits"], "optimizer": whole["optimizer_bits"] + heads,
                "activations": acts, "total": total}
    if mode == "local_greedy":  # worst stage: frozen blocks at their bits, the trained one at 32 + optimizer
        inference_params = profile(model, x[:1], bits).param_bits
        worst = None
        for acts, n_train, frozen_bits in per_block:
            params = inference_params - frozen_bits + 32 * n_train
            opt = optimizer_slots * 32 * n_train + heads // max(len(per_block), 1)
            tot = params + opt + acts
            if worst is None or tot > worst["total"]:
                worst = {"params": params, "optimizer": opt, "activations": acts, "total": tot}
        return worst
    raise ValueError(mode)


# ---------------------------------------------------------------------------------------------------
# the measured side
# ---------------------------------------------------------------------------------------------------
W3A3 = {"weight": {"name": "sawb", "bits": 3}, "act": {"name": "pact", "bits": 3}}


def build(model_name: str, mode: str, bits: str, width: float = 1.0, image: int = 32, channels: int = 3,
          seed: int = 0):
    """(model, method, optimizer, bits map, head params) for a mode."""
    import lowbit
    from ..quantize import layer_bits

    torch.manual_seed(seed)
    niti = mode == "niti"
    kw = {"batch_norm": False, "bias": False} if niti else {}
    m = lowbit.create_model(model_name, in_channels=channels, num_classes=10, image_size=image, width=width, **kw)
    if niti:
        plan = {"weight": {"name": "pow2int", "bits": 8}, "keep_first": False, "keep_last": False,
                "method": {"name": "niti"}}
    elif mode.startswith("local"):
        plan = {**(W3A3 if bits == "w3a3" else {}), "method": {"name": "local", "greedy": mode == "local_greedy"}}
    else:
        plan = {**(W3A3 if bits == "w3a3" else {}), "method": {"name": "ste"}}
    lowbit.quantize(m, plan)
    method = lowbit.quant_state(m).method
    opt = None if niti else torch.optim.SGD(
        [p for g in method.param_groups(m) for p in g["params"]], lr=0.01, momentum=0.9)
    heads = getattr(method, "heads", None)
    hp = sum(p.numel() for p in heads.parameters()) if heads is not None else 0
    return m, method, opt, layer_bits(m), hp


def measure(model_name: str, mode: str, bits: str, batch: int, width: float = 1.0, image: int = 32,
            channels: int = 3, stages: tuple[int, ...] | None = None) -> dict:
    """Measured peak of one step (the second) and the model's estimate, bytes."""
    from ..ondevice import intops

    m, method, opt, lb, hp = build(model_name, mode, bits, width, image, channels)
    x = torch.randn(batch, channels, image, image)
    y = torch.randint(0, 10, (batch,))
    m.train()
    total = 4 * len(method.blocks) if mode == "local_greedy" else 4
    method.setup(m, total, 1)
    if mode == "niti":
        xi = intops.from_float(x)
        step = lambda: method.integer_step(m, xi, y)  # noqa: E731
        pers = [mod.code for mod in m.modules() if hasattr(mod, "code")]
    else:
        step = lambda: method.train_step(m, (x, y), opt, 0)  # noqa: E731
        pers = None
    results = []
    for s in (stages if mode == "local_greedy" else (0,)) or (0,):
        if mode == "local_greedy":
            method.on_step(m, 4 * s)
        step()  # warm-up: optimizer state exists afterwards
        if opt is not None:  # gradients are allocated inside the measured step (a free of a block that
            opt.zero_grad(set_to_none=True)  # existed before profiling would not be seen)
        p = pers if pers is not None else persistent_tensors(m, opt, getattr(method, "heads", None))
        results.append({"stage": s, **measure_step(step, p)})
    worst = max(results, key=lambda r: r["peak_bytes"])
    return {"model": model_name, "mode": mode, "bits": bits, "batch": batch, "width": width, "image": image,
            **{k: v for k, v in worst.items()}, "model_bytes": _model_bytes(mode, m, x, lb, batch, hp, getattr(method, "split_residual", True)),
            "stages": results}


def _model_bytes(mode: str, m: nn.Module, x: torch.Tensor, lb: dict, batch: int, hp: int,
                 split_residual: bool = True) -> dict:
    niti = mode == "niti"
    est = model_bits(mode.replace("_fp32", ""), m, x, {} if niti else lb, batch, 0 if niti else 1, hp, split_residual)
    return {k: v / 8 for k, v in est.items()}


def remodel_table(out_dir: Path) -> list[dict]:
    """Recompute the cost model's column (``model_bytes``) of every row of ``memory.json`` with the current cost
    model, the measured columns kept, and rewrite ``memory.json`` / ``memory.md`` (session 26: the cost hooks
    had counted each quantized layer's input twice)."""
    path = Path(out_dir) / "memory.json"
    rows = json.loads(path.read_text())
    for r in rows:
        m, _, _, lb, hp = build(r["model"], r["mode"], r["bits"], r["width"], r["image"])
        x = torch.randn(r["batch"], 3, r["image"], r["image"])
        r["model_bytes"] = _model_bytes(r["mode"], m, x, lb, r["batch"], hp)
    path.write_text(json.dumps(rows, indent=1))
    (Path(out_dir) / "memory.md").write_text(format_memory(rows) + "\n")
    return rows


def table_002(image: int = 32) -> dict:
    """Seed 002's ResNet-20 CIFAR-10 table from the cost model (MB = 1e6 bytes, per sample for
    activations): 002's count is one stored tensor per layer input (``stored="layer_inputs"``)."""
    import lowbit
    from ..quantize import layer_bits

    out = {}
    for name, plan in (("W32A32", {}), ("W3A3", {**W3A3, "keep_first": True, "keep_last": True})):
        torch.manual_seed(0)
        m = lowbit.create_model("resnet20", in_channels=3, num_classes=10, image_size=image)
        lowbit.quantize(m, plan)
        x = torch.randn(1, 3, image, image)
        lb = layer_bits(m)
        li = training_memory(m, x, lb, 1, 1, "layer_inputs")
        al = training_memory(m, x, lb, 1, 1, "all")
        out[name] = {"inference_activation_mb": li["inference_activation_mb"],
                     "inference_params_mb": li["inference_params_mb"],
                     "inference_total_mb": li["inference_total_mb"],
                     "train_activations_per_sample_mb (layer inputs)": li["activations_mb"],
                     "train_activations_per_sample_mb (all stored)": al["activations_mb"],
                     "train_params_mb": li["latent_params_mb"], "train_optimizer_mb": li["optimizer_mb"],
                     "train_fixed_mb": li["latent_params_mb"] + li["optimizer_mb"]}
    return out


MODES = (("backprop", "fp32"), ("backprop", "w3a3"), ("local", "w3a3"), ("local_greedy", "w3a3"), ("niti", "int8"))


def memory_table(out_dir: Path, models=(("resnet20", 1.0), ("vgg_small", 0.25)), batches=(1, 32, 128),
                 modes=MODES, log=print) -> list[dict]:
    """Measure every (model, mode, batch), write ``memory.json`` and ``memory.md`` to ``out_dir``
    (resumable: rows already in memory.json are kept)."""
    import time

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "memory.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    done = {(r["model"], r["mode"], r["bits"], r["batch"]) for r in rows}
    for name, width in models:
        for batch in batches:
            for mode, bits in modes:
                if (name, mode, bits, batch) in done:
                    continue
                t0 = time.perf_counter()
                n_blocks = None
                stages = None
                if mode == "local_greedy":
                    m, *_ = build(name, mode, bits, width)
                    n_blocks = len(blocks(m)[0])
                    stages = tuple(sorted({0, n_blocks // 2, n_blocks - 1}))
                r = measure(name, mode, bits, batch, width, stages=stages)
                r["seconds"] = time.perf_counter() - t0
                rows.append(r)
                path.write_text(json.dumps(rows, indent=1))
                log(f"{name} {mode} {bits} B={batch}: measured {r['peak_bytes'] / 1e6:.2f} MB, "
                    f"model {r['model_bytes']['total'] / 1e6:.2f} MB ({r['seconds']:.0f}s)")
    (out_dir / "memory.md").write_text(format_memory(rows) + "\n")
    return rows


def format_memory(rows: list[dict]) -> str:
    lines = ["| model | mode | bits | batch | measured peak MB | of which persistent MB | model MB | "
             "model: params / optimizer / activations MB | measured / model |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(dict.fromkeys(mode for mode, _ in MODES))}
    for r in sorted(rows, key=lambda r: (r["model"], r["batch"], order.get(r["mode"], 99), r["bits"])):
        mb = r["model_bytes"]
        lines.append(
            f"| {r['model']}{'' if r['width'] == 1 else ' x' + str(r['width'])} | {r['mode']} | {r['bits']} | {r['batch']} | "
            f"{r['peak_bytes'] / 1e6:.2f} | {r['persistent_bytes'] / 1e6:.2f} | {mb['total'] / 1e6:.2f} | "
            f"{mb['params'] / 1e6:.2f} / {mb['optimizer'] / 1e6:.2f} / {mb['activations'] / 1e6:.2f} | "
            f"{r['peak_bytes'] / mb['total']:.1f} |")
    return "\n".join(lines)
