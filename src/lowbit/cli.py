"""``lowbit`` command line: it only wires the Python API.

    lowbit train CONFIG [key=value ...] [--out DIR]      train; prints a summary, writes a run folder
    lowbit train --resume RUN_DIR                        continue a killed run from its last epoch
    lowbit eval RUN_DIR                                  re-evaluate a run's best checkpoint
    lowbit info CONFIG|RUN_DIR [key=value ...]           plan table and cost (+ packed size of a run), no training
    lowbit export RUN_DIR [--format packed,onnx,c]       deployable files, each checked against PyTorch
    lowbit export RUN_DIR --format c --target cortex-m4  ... + cross-compiled, run under QEMU (flash, RAM, instructions)
    lowbit bench SUITE [--workers N] [--dry-run]         run a grid of configs x seeds (resumable)
    lowbit report RESULTS [RESULTS ...]                  002-style table (mean ± std error) + plots
    lowbit report attention RUN_DIR | loss-surface CONFIG   003 Figures 3 and 4
    lowbit report sinreq RUN_DIR                         001: weight histogram at the levels, learned bits
    lowbit budget --model M --bits ... --ratio C         002's widest-network-per-precision under a budget
    lowbit search nce CONFIG [key=value ...] [--train]   004: neural channel expansion -> per-layer widths
    lowbit search nce-budget CONFIG --bits ... --ratio C 002 x 004: NCE widths vs uniform widths per precision
    lowbit search releq CONFIG [key=value ...] --out DIR [--resume]   001's ReLeQ bit search + baselines
    lowbit list                                          registered models, datasets, quantizers, methods

Every user error (unknown name, bits out of range, missing file, wrong type) prints one line
``lowbit: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import codecs
import errno
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

from .errors import ConfigError, LowbitError


def _load_cfg(target: str, overrides: list[str]):
    from .config import load_config

    p = Path(target)
    if p.is_dir():
        if not (p / "config.yaml").is_file():
            raise LowbitError(f"{p} is not a run folder (no config.yaml)")
        from .runfolder import run_config

        return run_config(p, overrides)
    return load_config(target, overrides)


def cmd_train(args) -> int:
    from .train import format_summary, run

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise LowbitError(f"cannot resume: {run_dir} is not a run folder (no config.yaml)")
        cfg = _load_cfg(str(run_dir), [])
        if args.config or args.overrides:
            raise LowbitError("--resume takes the config of the run folder; give no CONFIG or overrides")
    else:
        if not args.config:
            raise LowbitError("train needs a CONFIG file (or --resume RUN_DIR)")
        cfg = _load_cfg(args.config, args.overrides)
        from .distributed import is_writer, shared_run_dir
        from .runfolder import check_fresh, new_run_dir

        if args.out:
            run_dir = Path(args.out)
            made = not run_dir.exists()
            if is_writer():
                check_fresh(run_dir, cfg.to_yaml())  # never onto other files or an earlier run (nor its .lock)
        else:  # NAME-TIMESTAMP, made atomically: two runs started in the same second get two folders
            run_dir = shared_run_dir(lambda: new_run_dir(cfg.out_dir, cfg.name, time.strftime('%Y%m%d-%H%M%S')))
            made = True
    from .distributed import is_writer

    if is_writer():
        print(f"run folder: {run_dir}", flush=True)
    args.run_folder = run_dir  # for main's message if interrupted
    args.writes = run_dir  # for main's message when a write fails without naming its file
    try:
        res = run(cfg, run_dir, resume=bool(args.resume))
    except BaseException:
        if not args.resume and made and is_writer():  # a start that failed before writing anything
            from .runfolder import discard_if_unused

            discard_if_unused(run_dir)
        raise
    if is_writer():  # under torchrun: rank 0 reports
        print(format_summary(res.summary))
        print(f"run folder      {run_dir}")
    return 0


def cmd_eval(args) -> int:
    from .train import BatchLoader, evaluate, format_summary, load_run, make_summary

    cfg, data, model, state = load_run(args.run_dir)  # the network train.run tested
    t = cfg.train
    val = evaluate(model, BatchLoader(data.val, data.info, t.eval_batch_size))
    test = evaluate(model, BatchLoader(data.test, data.info, t.eval_batch_size))
    summary = make_summary(cfg, model, data, test, {"epoch": state["epoch"], "val_acc": val["acc"]})
    trained = Path(args.run_dir) / "summary.json"
    try:
        recorded = json.loads(trained.read_text()) if trained.is_file() else {}
    except ValueError:
        recorded = {}
    at_training = recorded.get("best_val_acc")
    if isinstance(recorded.get("method_info"), dict):  # facts of the training (a schedule, learned weights, a
        summary["method_info"] = recorded["method_info"]  # distillation), which a reloaded method does not know
    text = format_summary(summary)
    from .train import unfinished_note

    if unfinished_note(args.run_dir):
        text += "\n" + unfinished_note(args.run_dir)
        summary["unfinished"] = True  # --json: a script sees it too (the note goes to stderr there)
    if at_training is not None and not math.isnan(val["acc"]) and at_training != val["acc"]:
        text += (f"\nnote            validation {100 * val['acc']:.2f}% as evaluated now; training picked the epoch at "
                 f"{100 * at_training:.2f}%" + (" (before train.bn_recalibrate)" if cfg.train.bn_recalibrate else ""))
    # --json: stdout is the JSON alone (the text goes to stderr), as lowbit export --json
    print(text, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0


def cmd_info(args) -> int:
    from .cost import training_memory
    from .quantize import layer_bits
    from .quantize import quant_state
    from .train import build_model, cost_of, final_model, load_data

    cfg = _load_cfg(args.target, args.overrides)
    run_ck = Path(args.target) / "best.pt"
    if run_ck.is_file() and args.overrides:  # a run is described as trained: an override is not an edit of config.yaml
        from .runfolder import edits_since

        changed = edits_since(_load_cfg(args.target, []).to_dict(), cfg.to_dict())
        if changed:
            raise LowbitError(f"info {args.target}: a run folder is described as it was trained, and the overrides "
                              f"change that ({changed}); for the untrained network: lowbit info "
                              f"{Path(args.target) / 'config.yaml'} {' '.join(args.overrides)}")
    data = load_data(cfg)
    model = build_model(cfg, data)
    if run_ck.is_file():  # a run folder: describe the trained model, incl. its packed size
        from .train import checkpoint_fits, load_checkpoint

        ck = load_checkpoint(run_ck, config=cfg)
        with checkpoint_fits(run_ck, Path(args.target)):
            final_model(model, ck)

    state = quant_state(model)
    print(state.table())
    if cfg.model.options.get("channels"):
        from .models.channels import describe_channels

        print(describe_channels(model, cfg.model.options["channels"]))
    info = state.method.summary(model)
    trained = Path(args.target) / "summary.json"
    if run_ck.is_file() and trained.is_file():  # facts of the training (a schedule, the attention before hardening),
        try:  # which a reloaded method does not know: as lowbit eval, the run's own summary
            recorded = json.loads(trained.read_text())
        except ValueError:
            recorded = {}
        if isinstance(recorded.get("method_info"), dict):
            info = recorded["method_info"]
    for k, v in info.items():
        print(f"{k}: {v}")
    print()
    print(cost_of(model, data).table())
    t = cfg.train
    tm = training_memory(model, data.test.images[:1].float() / 255.0, layer_bits(model), batch_size=t.batch_size,
                         optimizer_slots=(1 if t.momentum > 0 else 0) if t.optimizer == "sgd" else 2,
                         stored="layer_inputs")  # torch's SGD keeps a momentum buffer only at momentum > 0
    print(f"training memory (002, batch {t.batch_size}): latent params {tm['latent_params_mb']:.3f} MB + optimizer "
          f"{tm['optimizer_mb']:.3f} MB + layer inputs {tm['activations_mb']:.3f} MB = {tm['total_mb']:.3f} MB; "
          f"inference {tm['inference_total_mb']:.4f} MB")
    if run_ck.is_file():
        from .export import packed_size_table
        from .intmode import is_integer

        print()
        if is_integer(model):  # what lowbit export writes for it: the integer package
            from .export.api import int_run_meta
            from .export.int_api import int_package_table
            from .schedules.distill import example_input

            print(int_package_table(model, example_input(data.info, 1), int_run_meta(args.target, cfg, data.info, ck)))
        else:
            print(packed_size_table(model))
    return 0


def cmd_list(args) -> int:
    from .data import list_datasets
    from .methods import list_methods
    from .models import list_models
    from .quant import list_quantizers

    print("models:     ", ", ".join(list_models()))
    print("datasets:   ", ", ".join(list_datasets()))
    print("quantizers: ", ", ".join(list_quantizers("weight")), "(weights)")
    print("            ", ", ".join(list_quantizers("act")), "(activations)")
    print("methods:    ", ", ".join(list_methods()))
    return 0


def cmd_export(args) -> int:
    from .export import export_run, format_report

    formats = [f.strip() for part in (args.format or ["packed,onnx,c"]) for f in part.split(",")]
    if args.target and not args.format:
        formats = ["c"]  # --target alone: the C export on the core
    args.writes = Path(args.out) if args.out else Path(args.run_dir) / "export"  # as export_run's default
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # failed checks: the report says them, and the status is 1
        rep = export_run(args.run_dir, formats=formats, out_dir=args.out, limit=args.limit, c_images=args.c_images,
                         target=args.target, c_prefix=args.c_prefix, latency_repeats=args.latency_repeats)
    # --json: stdout is the JSON alone (the text report goes to stderr)
    print(format_report(rep), file=sys.stderr if args.json else sys.stdout)
    from .train import unfinished_note

    if unfinished_note(args.run_dir):  # a resume later changes best.pt, not this export
        print(unfinished_note(args.run_dir), file=sys.stderr)
    if args.json:
        print(json.dumps(rep, indent=2))
    if rep.get("failed_checks"):
        print(f"lowbit: export: {len(rep['failed_checks'])} check(s) failed: {rep['failed_checks'][0]}", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args) -> int:
    from .bench.suite import run_suite

    res = run_suite(args.suite, workers=args.workers, out=args.out, dry_run=args.dry_run, reuse=args.reuse,
                    backend=args.backend, address=args.address)
    if args.dry_run:  # the absolute folder: a suite's `out:` is relative to where lowbit runs, not to the suite
        print(f"{res['runs']} runs into {Path(res['out']).resolve()}:")
        print("\n".join(f"  {r}" for r in res["rows"]))
        return 0
    print(res["table"])
    print(f"results: {Path(res['out']).resolve()}/results.jsonl  (tables: summary.md, summary.csv)")
    return 0


def _need_matplotlib(what: str, alternative: str = "") -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LowbitError(f"{what} draws with matplotlib, the 'plot' extra: pip install 'lowbit[plot]'"
                          f"{alternative}") from None


def cmd_report(args) -> int:
    if args.target in ("attention", "sinreq", "loss-surface"):
        _need_matplotlib(f"lowbit report {args.target}")
    elif not args.no_plots:
        _need_matplotlib("lowbit report", " (or --no-plots: the tables alone)")
    if args.target == "attention":  # 003 Figure 3 for a DQA run
        from .viz import plot_attention

        if len(args.rest) != 1:
            raise LowbitError("usage: lowbit report attention RUN_DIR [--layer NAME] [--out PNG]")
        print(f"wrote {plot_attention(args.rest[0], layer=args.layer, out_png=args.out)}")
        return 0
    if args.target == "sinreq":  # 001: weights at the levels, learned bits, quantization error
        from .viz.sinreq import format_error, sinreq_report

        if len(args.rest) != 1:
            raise LowbitError("usage: lowbit report sinreq RUN_DIR [--layer NAME] [--out FOLDER]")
        res = sinreq_report(args.rest[0], layer=args.layer, out_dir=args.out)
        print(format_error(res))
        print("wrote " + ", ".join(map(str, res["files"])))
        return 0
    if args.target == "loss-surface":  # 003 Figure 4 for a config
        from .viz import loss_surface

        if not args.rest:
            raise LowbitError("usage: lowbit report loss-surface CONFIG [key=value ...] --out PNG")
        out = args.out or "loss_surface.png"
        png = loss_surface(args.rest[0], out, steps=args.steps, span=args.span, overrides=args.rest[1:])
        print(f"wrote {png}")
        return 0
    from .bench.report import report

    last = Path(args.rest[-1] if args.rest else args.target)  # report() writes beside the last results by default
    args.writes = Path(args.out) if args.out else last if last.is_dir() else last.parent
    res = report([args.target, *args.rest], out=args.out, plots=not args.no_plots)
    print(res["table"])
    print("wrote " + ", ".join(res["files"]))
    return 0


def cmd_budget(args) -> int:
    import yaml

    from .data import load_dataset
    from .search.budget import budget_table, format_table, make_suite

    info = load_dataset(args.dataset, root=args.root, limit=1).info
    budget, choices = budget_table(args.model, args.bits, info.in_channels, info.num_classes, info.image_size,
                                   ratio=args.ratio, budget_kib=args.budget_kib)
    print(format_table(args.model, budget, choices))
    if args.emit:
        tag = f"C{args.ratio:g}" if args.ratio else f"{args.budget_kib:g}KiB"
        data = {"name": args.dataset, "limit": args.limit, **({"root": args.root} if args.root else {})}
        base = {"model": {"name": args.model}, "data": data, "train": {"epochs": args.epochs, "progress": False}}
        suite = make_suite(choices, base, args.seeds, name=f"budget-{args.model}-{tag}")
        if args.out:
            suite["out"] = args.out
        Path(args.emit).write_text(yaml.safe_dump(suite, sort_keys=False))
        print(f"suite written to {args.emit}: run it with `lowbit bench {args.emit}`, then `lowbit report {suite.get('out') or 'bench_out/' + suite['name']}`")
    return 0


def cmd_search_nce(args) -> int:
    from .search.nce import NCEOptions, format_result, search_nce

    cfg = _load_cfg(args.config, args.overrides)
    opts = NCEOptions(warmup_epochs=args.warmup, epochs=args.epochs, threshold=args.threshold, target=args.target,
                      target_value=args.target_value, cap=args.cap, arch_lr=args.arch_lr)
    out = Path(args.out) if args.out else Path(cfg.out_dir) / f"{cfg.name}-nce-{time.strftime('%Y%m%d-%H%M%S')}"
    res = search_nce(cfg, opts, out, progress=cfg.train.progress)
    print(format_result(res))
    print(f"search folder   {out}  (search.json, widths.png, expansions.png)")
    print(f"derived config  {out / 'derived.yaml'}  (train it: lowbit train {out / 'derived.yaml'})")
    if args.train:
        from .train import format_summary, run

        t0 = time.perf_counter()
        r = run(res.config, out / "train")
        seconds = time.perf_counter() - t0
        print(format_summary(r.summary))
        print(f"search time     {res.search_seconds:.1f} s = {res.search_seconds / seconds:.2f}x this training run "
              f"({seconds:.1f} s)")
    return 0


def cmd_search_nce_budget(args) -> int:
    from .search.nce import NCEOptions, format_budget, nce_budget

    cfg = _load_cfg(args.config, args.overrides)
    opts = NCEOptions(warmup_epochs=args.warmup, epochs=args.epochs, threshold=args.threshold, cap=args.cap,
                      arch_lr=args.arch_lr)
    out = Path(args.out) if args.out else Path(cfg.out_dir) / f"{cfg.name}-nce-budget-{time.strftime('%Y%m%d-%H%M%S')}"
    res = nce_budget(cfg, args.bits, ratio=args.ratio, budget_kib=args.budget_kib, opts=opts, out_dir=out,
                     train=not args.no_train, progress=cfg.train.progress)
    print(format_budget(res))
    print(f"results: {out / 'budget.json'}")
    return 0


def cmd_search_releq(args) -> int:
    try:
        from .search.releq import format_result, load_search_config, search
    except ImportError as e:
        raise LowbitError(f"lowbit search releq needs the 'search' extra ({e.name} missing): pip install 'lowbit[search]'") from None

    cfg, opts = load_search_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path(cfg.out_dir) / f"{cfg.name}-releq"
    print(f"search folder: {out}", file=sys.stderr)
    res = search(cfg, opts, out, resume=args.resume)
    print(format_result(res))
    print(f"plans: {out}/plans/*.yaml (fine-tune with `lowbit train PLAN`); result: {out}/result.json")
    return 0


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (``lowbit train: error: ...``), exit status 2, like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _number(kind, low: float, strict: bool, what: str):
    import math

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(v) or v < low or (strict and v == low):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return v

    parse.__name__ = what
    return parse


_positive_int = _number(int, 0, True, "an integer >= 1")
_nonneg_int = _number(int, 0, False, "an integer >= 0")


def _bits(text: str) -> int:
    """A precision of ``budget``/``nce-budget``: 1..8 bits (what the quantizers support), or 32 (full precision)."""
    v = _positive_int(text)
    if not (v <= 8 or v == 32):
        raise argparse.ArgumentTypeError(f"must be 1..8 bits (what the quantizers support) or 32 (FP32), got {text}")
    return v


_bits.__name__ = "bits"
_nonneg_int = _number(int, 0, False, "an integer >= 0")
_positive_float = _number(float, 0.0, True, "a finite number > 0")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lowbit", description="Train, measure and export low-bit quantized CNNs.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a config; writes a run folder")
    t.add_argument("config", nargs="?", help="YAML config")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides (YAML values)")
    t.add_argument("--out", help="run folder (default: OUT_DIR/NAME-TIMESTAMP)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="evaluate a run's best checkpoint on validation and test")
    e.add_argument("run_dir")
    e.add_argument("--json", action="store_true", help="also print the summary as JSON")
    e.set_defaults(func=cmd_eval)
    i = sub.add_parser("info", help="plan table and cost of a config or run folder, no training")
    i.add_argument("target", help="YAML config or run folder")
    i.add_argument("overrides", nargs="*")
    i.set_defaults(func=cmd_info)
    x = sub.add_parser("export", help="export a run: packed weights, ONNX, C99; each checked against PyTorch")
    x.add_argument("run_dir")
    x.add_argument("--format", action="append",
                   help="packed, onnx, c (comma-separated or repeated; default all, or c alone with --target); an "
                        "integer-mode run builds its NumPy, C and ONNX from the packed file, kept only with packed")
    x.add_argument("--out", help="output folder (default RUN_DIR/export)")
    x.add_argument("--limit", type=_positive_int, help="check on the first N test images only")
    x.add_argument("--c-images", type=_positive_int, default=8, help="test images run through the compiled C code")
    x.add_argument("--latency-repeats", type=_nonneg_int, default=20, metavar="N",
                   help="onnxruntime latency: median of N alternating runs per model (default 20; 0: not measured)")
    x.add_argument("--target", metavar="CORE",
                   help="cortex-m0 or cortex-m3 (no FPU), cortex-m4, cortex-m7, cortex-m33, or nrf51822 (a Cortex-M0 with the part's 256 KiB flash and 16 KiB RAM): also cross-compile the C code for this core and run it under QEMU (flash, RAM, instructions)")
    x.add_argument("--c-prefix", default="lowbit", metavar="NAME",
                   help="name the C API NAME_predict, NAME_IN_SIZE, ... (default lowbit): two models in one firmware")
    x.add_argument("--json", action="store_true", help="print the report as JSON on stdout (the text on stderr)")
    x.set_defaults(func=cmd_export)
    b = sub.add_parser("bench", help="run a benchmark suite (methods x bits x models x widths x seeds)")
    b.add_argument("suite", help="suite YAML")
    b.add_argument("--workers", type=_positive_int, default=1, help="runs at once, as separate processes")
    b.add_argument("--out", help="output folder (default: the suite's out, or bench_out/NAME)")
    b.add_argument("--dry-run", action="store_true", help="validate every config and list the runs")
    b.add_argument("--reuse", action="store_true", help="report finished runs even if their config differs "
                   "from the suite's (default: an error)")
    b.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local: a process pool (default); ray: each (row, seed) a Ray task (pip install lowbit[cluster])")
    b.add_argument("--address", help="ray: the cluster to join (default: start a local Ray instance)")
    b.set_defaults(func=cmd_bench)
    r = sub.add_parser("report", help="002's table + plots from results; `attention RUN_DIR`; `loss-surface CONFIG`",
                       description="lowbit report RESULTS [RESULTS ...] | attention RUN_DIR | sinreq RUN_DIR | "
                       "loss-surface CONFIG [key=value ...]")
    r.add_argument("target", help="results.jsonl (or its folder), or 'attention', 'sinreq', or 'loss-surface'")
    r.add_argument("rest", nargs="*", help="more RESULTS (drawn on one plot; --out required); RUN_DIR for "
                   "attention; CONFIG [key=value ...] for loss-surface")
    r.add_argument("--out", help="output folder (table) or PNG path (figures)")
    r.add_argument("--no-plots", action="store_true")
    r.add_argument("--layer", help="attention, sinreq: the layer to draw (default: the first quantized one)")
    r.add_argument("--steps", type=_positive_int, default=21, help="loss-surface: grid points per direction")
    r.add_argument("--span", type=_positive_float, default=1.0, help="loss-surface: extent along each direction")
    r.set_defaults(func=cmd_report)
    g = sub.add_parser("budget", help="002: widest network per precision under a memory budget")
    g.add_argument("--model", default="resnet20")
    g.add_argument("--dataset", default="fashion-mnist")
    g.add_argument("--root", help="the dataset's folder (CIFAR, SVHN, MNIST: data.root), also in the emitted suite")
    g.add_argument("--bits", type=_bits, nargs="+", default=[1, 2, 3, 4, 6, 8, 32])
    grp = g.add_mutually_exclusive_group(required=True)
    grp.add_argument("--ratio", type=_positive_float, help="budget M = M0 / RATIO (M0: the FP32 width-1 model)")
    grp.add_argument("--budget-kib", type=_positive_float, help="absolute budget in KiB")
    g.add_argument("--emit", metavar="SUITE.yaml", help="write a bench suite that trains every choice")
    g.add_argument("--epochs", type=_positive_int, default=10, help="epochs in the emitted suite")
    g.add_argument("--seeds", type=_nonneg_int, nargs="+", default=[0, 1, 2], help="seeds in the emitted suite")
    g.add_argument("--limit", type=_positive_int, help="cap the training set in the emitted suite")
    g.add_argument("--out", help="the emitted suite's output folder (default bench_out/NAME)")
    g.set_defaults(func=cmd_budget)
    se = sub.add_parser("search", help="searches over the network: nce (004 channel expansion), releq (001 per-layer bits)")
    search = se.add_subparsers(dest="search_command", required=True)  # one subcommand per search
    n = search.add_parser("nce", help="004: neural channel expansion; writes derived.yaml with model.channels")
    n.add_argument("config", help="YAML config (model, data, plan, train settings of the search)")
    n.add_argument("overrides", nargs="*", help="key.sub=value overrides (YAML values)")
    n.add_argument("--out", help="search folder (default: OUT_DIR/NAME-nce-TIMESTAMP)")
    n.add_argument("--warmup", type=_nonneg_int, default=1, help="warm-up epochs (uniformly sampled widths)")
    n.add_argument("--epochs", type=_positive_int, default=3, help="search epochs (alternating weight/architecture steps)")
    n.add_argument("--threshold", type=float, default=0.3, help="T: expand when p(widest candidate) >= T")
    n.add_argument("--target", default="macs", choices=["macs", "flops", "params", "mem", "mem002"],
                   help="resource (flops = MACs; mem = 002's memory at the plan's bits; mem002 = at one uniform "
                        "precision, as nce-budget compares)")
    n.add_argument("--target-value", type=_positive_float, help="default: the original network's cost")
    n.add_argument("--cap", type=_positive_float, default=2.0, help="widest candidate, x the original width")
    n.add_argument("--arch-lr", type=_positive_float, default=0.02, help="Adam lr of the architecture logits")
    n.add_argument("--train", action="store_true", help="then train the derived network (into OUT/train)")
    n.set_defaults(func=cmd_search_nce)
    nb = search.add_parser("nce-budget", help="002 x 004: per precision, NCE widths vs uniform widths at one memory budget")
    nb.add_argument("config", help="YAML config (model, data, train settings; the plan's bits are set per row)")
    nb.add_argument("overrides", nargs="*")
    nb.add_argument("--bits", type=_bits, nargs="+", default=[1, 2, 3, 4, 8])
    grp = nb.add_mutually_exclusive_group(required=True)
    grp.add_argument("--ratio", type=_positive_float, help="budget M = M0 / RATIO (M0: the FP32 width-1 model)")
    grp.add_argument("--budget-kib", type=_positive_float, help="absolute budget in KiB")
    nb.add_argument("--out", help="output folder")
    nb.add_argument("--warmup", type=_nonneg_int, default=1)
    nb.add_argument("--epochs", type=_positive_int, default=2, help="search epochs")
    nb.add_argument("--threshold", type=float, default=0.3)
    nb.add_argument("--cap", type=_positive_float, default=2.0, help="at least; raised to 1.25 x the uniform width")
    nb.add_argument("--arch-lr", type=_positive_float, default=0.02)
    nb.add_argument("--no-train", action="store_true", help="search only (no training of either network)")
    nb.set_defaults(func=cmd_search_nce_budget)
    rq = search.add_parser("releq", help="001: ReLeQ per-layer bit search (PPO) with baselines and budgets")
    rq.add_argument("config", help="search config (a training config with a releq: section)")
    rq.add_argument("overrides", nargs="*", help="key.sub=value overrides (YAML values)")
    rq.add_argument("--out", help="search folder (default OUT_DIR/NAME-releq)")
    rq.add_argument("--resume", action="store_true", help="continue the search in --out")
    rq.set_defaults(func=cmd_search_releq)
    ls = sub.add_parser("list", help="registered models, datasets, quantizers and methods")
    ls.set_defaults(func=cmd_list)
    return p


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill`, a container stopping), handled as Ctrl-C is: before session 25 the process
    ended without a word (status 143)."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    parser = build_parser()
    args = parser.parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    restore = _tolerant_output()
    try:
        return _dispatch(args)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        for stream, errors in restore:
            try:
                stream.reconfigure(errors=errors)
            except (OSError, ValueError):
                pass


def _escape(e: UnicodeError):
    """Codec error handler of lowbit's output: bytes a C locale read into surrogates (a path in argv) go out as they
    came in (as surrogateescape writes them); a character the encoding lacks becomes an escape (backslashreplace)."""
    if not isinstance(e, UnicodeEncodeError):
        raise e
    return b"".join(bytes([ord(c) - 0xDC00]) if 0xDC80 <= ord(c) <= 0xDCFF else c.encode("ascii", "backslashreplace")
                    for c in e.object[e.start:e.end]), e.end


def _tolerant_output() -> list:
    """stdout/stderr that cannot encode a character lowbit prints ('±' of a value set, 'Δ' of every export report):
    PYTHONIOENCODING=ascii or latin-1, a latin-1 locale, LC_ALL=C with PYTHONUTF8=0. Such a character is written as
    an escape (\\u0394) instead of ending the command, its work done, with a UnicodeEncodeError traceback (status 1,
    which lowbit export also gives for a failed check). Returns the streams and error handlers to restore."""
    try:
        codecs.lookup_error("lowbit.escape")
    except LookupError:
        codecs.register_error("lowbit.escape", _escape)
    undo = []
    for stream in (sys.stdout, sys.stderr):  # None where the descriptor is closed (`>&-`)
        errors = getattr(stream, "errors", None)
        if errors in ("strict", "surrogateescape") and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="lowbit.escape")
                undo.append((stream, errors))
            except (OSError, ValueError):
                pass
    return undo


#: errors of a write that does not name its file (a full disk: the write fails when flushed, as Path.write_text,
#: onnx.save or a metrics line do): the CLI names the folder the command writes (before session 29 it said
#: "lowbit: error: No space left on device", not where)
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _dispatch(args) -> int:
    try:
        return args.func(args)
    except LowbitError as e:
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"lowbit: error: {e}", file=sys.stderr)
        elif not isinstance(e, ConfigError):  # a config is refused alike on every torchrun rank: rank 0 says it
            print(f"lowbit: error (rank {rank}): {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout's reader went away (`| head`): not a file error; say so on stderr, as SIGPIPE
        try:  # would end the process (128 + 13); no second error when Python flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        hint = _resume_hint(getattr(args, "run_folder", None))
        print("lowbit: output closed (broken pipe)" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 141
    except UnicodeEncodeError as e:  # a name the locale's file-name encoding lacks (ascii: LC_ALL=C with PYTHONUTF8=0)
        what = e.object[max(0, e.start - 40):e.end + 20] if isinstance(e.object, str) else e.object
        print(f"lowbit: error: cannot write {what!r} in {e.encoding}, this locale's encoding: use UTF-8 "
              "(PYTHONUTF8=1 or LC_ALL=C.UTF-8) or an ASCII name", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only folder, a missing permission: one line naming the file
        folder = getattr(args, "writes", None) if e.errno in _NO_ROOM else None  # a write that failed when flushed
        where = f"{e.filename}: " if getattr(e, "filename", None) else f"{folder}: " if folder else ""
        print(f"lowbit: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        hint = _resume_hint(getattr(args, "run_folder", None))
        what = "terminated (SIGTERM)" if isinstance(e, _Terminated) else "interrupted"
        print(f"lowbit: {what}" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130


def _resume_hint(run_dir) -> str:
    if run_dir is None:  # not lowbit train: its own command's --resume, where it has one, says what to do
        return ""
    if (Path(run_dir) / "summary.json").is_file():  # it finished before the interruption
        return f"the run finished: `lowbit eval {run_dir}` shows its result"
    if (Path(run_dir) / "last.pt").is_file():
        return f"continue with `lowbit train --resume {run_dir}`"
    return f"{run_dir} holds no finished epoch yet: start the same command again (into the same --out, or anew)"


if __name__ == "__main__":
    sys.exit(main())
