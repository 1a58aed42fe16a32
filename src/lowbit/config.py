"""Typed run configuration: model, data, plan (with its method) and training, from YAML.

Every field is validated on load; an unknown key, a wrong type or a value out of range is a
one-line :class:`~lowbit.errors.ConfigError` naming the field (``train.lr: ...``). Names of
models, datasets, quantizers and methods are checked against their registries by
:func:`validate_names`, so ``lowbit info`` catches them before any training starts.

Command-line overrides use dotted keys with YAML values: ``train.epochs=3 plan.weight.bits=4``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError
from .plan import Plan, one_line
from .registry import is_number_annotation


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data):
        # pydantic's lax mode reads true as 1 (train.epochs: yes trained one epoch); as QuantSpec.bits
        if isinstance(data, dict):
            for k, v in data.items():
                f = cls.model_fields.get(k)
                if isinstance(v, bool) and f is not None and is_number_annotation(f.annotation):
                    raise ValueError(f"{k}: a number, got {str(v).lower()}")
        return data


class ModelConfig(BaseModel):
    """A registered model name; any extra key is a keyword of its builder (e.g. ``width: 2``).

    ``init_from`` (a run folder or a .pt file) loads pretrained weights before the plan is
    applied (:func:`lowbit.pretrained.load_weights`); from a quantized run, ``init_weights``
    takes its latent (default) or its quantized weights.
    """

    model_config = ConfigDict(extra="allow")
    name: str = "resnet20"
    init_from: str | None = None
    init_weights: Literal["latent", "quantized"] = "latent"

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _init_weights_needs_a_source(self):
        if self.init_weights != "latent" and self.init_from is None:  # accepted and ignored before session 23
            raise ValueError(f"init_weights: {self.init_weights!r} takes effect with init_from (a run folder); "
                             "there is none")
        return self


class DataConfig(_Strict):
    name: str = "fashion-mnist"
    root: str | None = None
    val_fraction: float = Field(0.05, ge=0.0, lt=0.5)
    augment: bool = True
    limit: int | None = Field(None, gt=0)


class DistillOptions(_Strict):
    """Hinton et al.'s knowledge distillation: loss = (1 - alpha)·task + alpha·T²·KL(softmax(teacher/T) ||
    softmax(student/T)) (:func:`lowbit.schedules.distill`)."""

    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.9, ge=0, le=1)


class DistillConfig(DistillOptions):
    """``train.distill``: a teacher (a run folder, any architecture; or a .pt file of the config's model)."""

    teacher: str


class DCQConfig(_Strict):
    """``dcq``: divide-and-conquer quantization (:mod:`lowbit.schedules.dcq`, docs/dcq.md)."""

    #: the full-precision teacher: a run folder or a .pt file of the config's model
    teacher: str
    #: N sections (cuts balancing multiply-accumulates), or the block names where a section starts
    sections: Union[Annotated[int, Field(ge=1)], Annotated[list[str], Field(min_length=1)]] = 2
    #: epochs each section trains (None: train.epochs)
    epochs: int | None = Field(None, ge=1)
    #: end-to-end epochs of the stitched network (train.* settings; lr finetune_lr or train.lr)
    finetune_epochs: int = Field(0, ge=0)
    finetune_lr: float | None = Field(None, gt=0)
    #: sections trained at once in worker processes (torch threads divided between them)
    workers: int = Field(1, ge=1)
    #: where parallel sections run: local spawn processes or Ray tasks (lowbit.parallel)
    backend: Literal["local", "ray"] = "local"
    #: a Ray cluster's address (backend: ray; None: a local Ray instance)
    address: str | None = None
    #: re-estimate BatchNorm statistics of the stitched network on this many batches (0: off)
    bn_recalibrate: int = Field(0, ge=0)
    #: knowledge distillation on the last section (and the fine-tune) from the teacher's logits
    distill: DistillOptions | None = None
    #: on-disk cache of the teacher's section features, at most this many MiB (0: off, features are
    #: recomputed batch by batch); :mod:`lowbit.schedules.featcache`
    feature_cache_mb: float = Field(0, ge=0, allow_inf_nan=False)
    #: where the cache lives (None: RUN_DIR/feature_cache)
    feature_cache_dir: str | None = None


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(500, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "multistep", "onecycle", "constant"] = "cosine"
    #: multistep: epochs at which the lr is multiplied by ``gamma``
    milestones: list[int] = Field(default_factory=lambda: [])
    gamma: float = Field(0.1, gt=0, le=1)
    seed: int = Field(0, ge=0, lt=2**63)
    #: torch threads (None: all cores)
    threads: int | None = Field(None, ge=1)
    progress: bool = True
    #: after ``finalize`` (e.g. a DQA/BR mixture hardened to Q_1), re-estimate every BatchNorm's
    #: running statistics on this many training batches (0: off, the papers' procedure). The new
    #: statistics are stored in best.pt and used by eval, info and export alike.
    bn_recalibrate: int = Field(0, ge=0)
    #: after this many epochs (a fraction counts: 1.5), every BatchNorm trains on its running statistics
    #: (frozen: training then computes what evaluation and the exported network compute;
    #: lowbit.FreezeBatchNorm). None: off (batch statistics throughout). Must be < epochs.
    freeze_bn_after: float | None = Field(None, ge=0, allow_inf_nan=False)
    #: the gradient of a frozen BatchNorm: running (the frozen affine map's own, PyTorch's
    #: freeze_bn_stats) or batch (the batch's statistics, straight through the frozen forward)
    freeze_bn_gradient: Literal["running", "batch"] = "running"
    #: auto: a CUDA GPU when there is one, else the CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: knowledge distillation from a teacher, with any method
    distill: DistillConfig | None = None
    #: under torchrun: BatchNorm statistics over all ranks (torch.nn.SyncBatchNorm; GPUs only)
    sync_batchnorm: bool = False
    #: the first N of ``epochs`` train the network unquantized (FP32, at a constant lr), in the run folder's
    #: ``warmup/``; the plan then trains from those weights for the rest, the lr going on where the schedule
    #: would be (:mod:`lowbit.schedules.warmup`). 0: off. Integer mode's recipe from scratch (docs/export.md)
    float_warmup_epochs: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _freeze_within_epochs(self):
        if self.freeze_bn_gradient != "running" and self.freeze_bn_after is None:  # ignored before session 25
            raise ValueError(f"freeze_bn_gradient: {self.freeze_bn_gradient} takes effect with freeze_bn_after (when "
                             "BatchNorm is frozen); set that too, or leave freeze_bn_gradient out")
        if self.float_warmup_epochs:
            if self.float_warmup_epochs >= self.epochs:
                raise ValueError(f"float_warmup_epochs ({self.float_warmup_epochs}) must be less than epochs "
                                 f"({self.epochs}): the plan would never train")
            if self.schedule not in ("cosine", "constant"):
                raise ValueError(f"float_warmup_epochs: the {self.schedule} schedule cannot go on after the warm-up; "
                                 "use cosine or constant")
            if self.freeze_bn_after is not None and self.freeze_bn_after <= self.float_warmup_epochs:
                raise ValueError(f"freeze_bn_after ({self.freeze_bn_after:g}) must be more than float_warmup_epochs "
                                 f"({self.float_warmup_epochs}): BatchNorm would be frozen in the FP32 warm-up")
        if self.freeze_bn_after is not None and self.freeze_bn_after >= self.epochs:
            raise ValueError(f"freeze_bn_after ({self.freeze_bn_after:g}) must be less than epochs ({self.epochs}): "
                             "BatchNorm would never be frozen")
        return self


class Config(_Strict):
    name: str = "run"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    plan: Plan = Field(default_factory=Plan)
    train: TrainConfig = Field(default_factory=TrainConfig)
    #: divide-and-conquer quantization (a schedule over fit; `lowbit train` dispatches to it)
    dcq: DCQConfig | None = None
    out_dir: str = "runs"

    @model_validator(mode="after")
    def _one_schedule(self):
        if self.dcq is not None and self.train.float_warmup_epochs:
            raise ValueError("train.float_warmup_epochs does not combine with dcq (DCQ starts from its FP32 teacher); "
                             "leave one out")
        return self

    def to_dict(self) -> dict:
        return {**self.model_dump(mode="json"), "plan": self.plan.to_dict()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value")
    key, raw = item.split("=", 1)
    if not key or any(not k for k in key.split(".")):
        raise ConfigError(f"override '{item}': bad key '{key}'")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            if not isinstance(node[k], dict):
                raise ConfigError(f"override '{item}': '{k}' is not a section")
            node = node[k]
        node[keys[-1]] = value
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error (PyYAML keeps the last one silently)."""

    def flatten_mapping(self, node):
        # every mapping is flattened before it is built, and a merged one (`<<: &a {...}`) before its parent: PyYAML
        # then writes the merged keys into its node, so a later `*a` would read an override as a key given twice
        checked = self.__dict__.setdefault("_checked", set())
        if id(node) not in checked:
            checked.add(id(node))
            self._check_unique(node)
        super().flatten_mapping(node)
        # keep only the last pair of a key (the override): PyYAML 6.0.4 merges the first pair of a key whose string is
        # the same object (single characters are), so `<<: *m` of `m: {<<: *b, g: 2}` read b's g
        last = {}
        for i, (k, _) in enumerate(node.value):
            if isinstance(k, yaml.ScalarNode):
                last[(k.tag, k.value)] = i
        node.value = [kv for i, kv in enumerate(node.value)
                      if not isinstance(kv[0], yaml.ScalarNode) or last[(kv[0].tag, kv[0].value)] == i]

    def _check_unique(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged by SafeLoader, its keys overridable
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping "
                                                            f"(line {key_node.start_mark.line + 1})")
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader's own error
                pass


def read_yaml_mapping(path: str | Path, what: str = "config") -> dict:
    """A YAML file whose top level is a mapping; every way it can be malformed (missing, a folder,
    not UTF-8, empty, not YAML, not a mapping) is one line naming the file."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p} is a folder; a {what} is a YAML file")
    if not p.is_file():
        raise ConfigError(f"{what} file not found: {p}")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                          f"a {what} is a YAML text file") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise ConfigError(f"{p}: not valid YAML (nested too deeply)") from None
    if data is None:
        raise ConfigError(f"{p}: the file is empty (expected a YAML mapping, e.g. `model: {{name: resnet20}}`)")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping, got {type(data).__name__}")
    return data


def check_finite(data: Any, where: str) -> None:
    """NaN or an infinity anywhere in a config (also in quantizer/method options, which are passed
    on unchecked) is an error naming its field: no number of lowbit's may be non-finite."""
    import math

    if isinstance(data, float) and not math.isfinite(data):
        raise ConfigError(f"{where}: {data} is not a finite number")
    if isinstance(data, dict):
        for k, v in data.items():
            check_finite(v, f"{where}.{k}" if where else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            check_finite(v, f"{where}.{i}")


def saved_config(data):
    """A config dict as a run folder (config.yaml) or checkpoint recorded it, read with the meaning
    it had when written. Every run records every field, so a field missing from it predates the
    field; where a later default changed what absence means, the old meaning is put back here:
    an integer-mode run without ``plan.integer_residual`` was trained before session 9's defaults
    (the output add, 8-bit stream) existed: it is the first form (accumulator add, conv bits); one
    without ``plan.integer_init`` initialised its 8-bit LSQ quantizers the paper's way ("lsq"); one
    without ``plan.integer_bias`` rounded its bias to whole units of the unscaled accumulator
    ("coarse", before session 11), and one without ``plan.integer_train_mid`` trained without the
    ``mid`` rounding. A run not in integer mode may have recorded integer-mode options that had no effect (they
    were accepted then, refused since session 23): they read as their defaults."""
    train = data.get("train") if isinstance(data, dict) else None
    if (isinstance(train, dict) and train.get("schedule", "cosine") != "multistep"
            and (train.get("milestones") or train.get("gamma", 0.1) != 0.1)):  # they had no effect (refused since 26)
        data = {**data, "train": {**train, "milestones": [], "gamma": 0.1}}
        train = data["train"]
    if isinstance(train, dict) and train.get("optimizer") == "adam" and train.get("momentum", 0.9) != 0.9:
        data = {**data, "train": {**train, "momentum": 0.9}}  # adam ignored it (refused since session 29)
    if isinstance(data, dict) and isinstance(data.get("plan"), dict) and not data["plan"].get("integer"):
        from .plan import Plan

        return {**data, "plan": {k: (Plan.model_fields[k].default if k in ("integer_init", "integer_bias",
                                                                          "integer_train_mid") else v)
                                 for k, v in data["plan"].items()}}
    if isinstance(data, dict) and isinstance(data.get("plan"), dict) and data["plan"].get("integer"):
        plan = dict(data["plan"])
        if "integer_residual" not in plan:
            plan.update(integer_residual="accumulator", integer_residual_bits=plan.get("integer_residual_bits"))
        plan.setdefault("integer_init", "lsq")
        plan.setdefault("integer_bias", "coarse")
        plan.setdefault("integer_train_mid", False)
        if plan["integer_residual"] == "accumulator":  # mid is the output add's: accepted before, it changed nothing
            plan["integer_train_mid"] = False
        data = {**data, "plan": plan}
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, saved: bool = False) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides. ``saved``:
    ``path`` is a run folder's config.yaml (:func:`saved_config`)."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        data = read_yaml_mapping(p)
        if "name" not in data:
            data["name"] = p.stem
        if saved:
            data = saved_config(data)
    data = apply_overrides(data, overrides or [])
    check_finite(data, "")
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(one_line(e, "config")) from None
    check_finite(cfg.model_dump(), "")  # 'inf' and 1e400 are YAML strings that pydantic reads as inf
    validate_names(cfg)
    return cfg


def validate_names(cfg: Config) -> None:
    """Check registry names and quantizer/method options without building anything large."""
    from .data import list_datasets
    from .methods import build_method
    from .models import MODELS
    from .models.channels import check_channels
    from .quant import build_quantizer

    try:
        MODELS.get(cfg.model.name)
    except ConfigError as e:
        raise ConfigError(f"model.name: {e}") from None
    MODELS.check_options(cfg.model.name, cfg.model.options)  # "model 'x' has no option y; ..."
    if "channels" in cfg.model.options:  # per-layer out channels; layer names are checked when built
        try:
            check_channels(cfg.model.name, cfg.model.options["channels"])
        except ConfigError as e:
            raise ConfigError(f"model.channels: {e}") from None
    if cfg.data.name not in list_datasets():
        raise ConfigError(f"data.name: unknown dataset '{cfg.data.name}'; available: {', '.join(list_datasets())}")
    for role in ("weight", "act"):
        spec = getattr(cfg.plan, role)
        if spec is not None:
            try:
                build_quantizer(spec.name, spec.bits, role=role, **spec.options)
            except ConfigError as e:
                raise ConfigError(f"plan.{role}: {e}") from None
    try:  # the method's options, and whether it can train this many epochs (before the run folder is written)
        build_method(cfg.plan.method.name, **cfg.plan.method.options).check_epochs(cfg.train.epochs)
    except ConfigError as e:
        raise ConfigError(f"plan.method: {e}") from None
    check_trainable(cfg)


#: activation quantizers that take sign(x): every input after a ReLU (>= 0) maps to +1
SIGN_ACT = ("bnn",)


def check_trainable(cfg: Config) -> None:
    """Combinations that validate field by field but cannot train."""
    import inspect

    from .models import MODELS

    t = cfg.train
    if cfg.dcq is not None and cfg.plan.method.name in ("niti", "local"):  # session 25: a traceback, or a late refusal
        raise ConfigError(f"dcq: method '{cfg.plan.method.name}' does not train DCQ's sections (they learn by "
                          "regressing the teacher's feature maps, a loss; NITI's integer error and the local heads' "
                          "losses are not); train it without dcq")
    if cfg.dcq is not None and cfg.plan.method.name == "sinareq":
        raise ConfigError("dcq: method 'sinareq' does not train DCQ's sections (its learned bits are set by layer "
                          "name, which a section does not carry, and the stitched network would be evaluated at the "
                          "plan's bits, not the learned ones); train it without dcq, or use sinreq with fixed bits")
    if cfg.plan.integer and cfg.dcq is not None:
        raise ConfigError("dcq: DCQ does not train in integer mode (plan.integer: true): its sections call the "
                          "model's modules directly, outside the traced graph integer mode trains and evaluates, so "
                          "they trained with no activation quantization (session 24); train with plan.integer and "
                          "without dcq, or distill with train.distill")
    if t.schedule == "multistep":
        bad = [m for m in t.milestones if not 0 < m < t.epochs]
        if bad:
            raise ConfigError(f"train.milestones: {bad} not within 1..{t.epochs - 1} (epochs)" if t.epochs > 1 else
                              f"train.milestones: {bad}, but train.epochs is 1: there is no epoch boundary for a "
                              "milestone (use schedule constant or more epochs)")
        if cfg.dcq is not None:  # DCQ trains its sections for dcq.epochs and the stitched network for
            # dcq.finetune_epochs, each with this schedule (session 25: refused after every section had trained)
            stages = {"dcq.epochs": cfg.dcq.epochs or t.epochs, "dcq.finetune_epochs": cfg.dcq.finetune_epochs}
            for key, n in stages.items():
                bad = [m for m in t.milestones if n and not 0 < m < n]
                if bad:
                    raise ConfigError(f"train.milestones: {bad} not within 1..{n - 1} ({key}, which DCQ trains with "
                                      "this schedule)")
        if not t.milestones:  # before session 25 the lr stayed constant without a word
            raise ConfigError("train.schedule multistep needs train.milestones (epochs where the lr is multiplied by "
                              "train.gamma), e.g. [30, 60]")
    if t.schedule != "multistep" and (t.milestones or t.gamma != TrainConfig.model_fields["gamma"].default):
        raise ConfigError(f"train.milestones and train.gamma take effect with schedule multistep, not "
                          f"{t.schedule}; set train.schedule=multistep, or leave them out")
    if t.optimizer == "adam" and t.momentum != TrainConfig.model_fields["momentum"].default:  # ignored before session 29
        raise ConfigError(f"train.momentum is SGD's (got {t.momentum:g} with optimizer adam, which keeps torch's betas "
                          f"(0.9, 0.999)); leave it out with adam, or use optimizer sgd")
    if t.nesterov and (t.optimizer != "sgd" or t.momentum <= 0):  # torch's own ValueError before session 25
        raise ConfigError(f"train.nesterov needs optimizer sgd with momentum > 0 (got {t.optimizer}, momentum "
                          f"{t.momentum:g})")
    act = cfg.plan.act
    if act is not None and act.name in SIGN_ACT:
        activation = cfg.model.options.get("activation")
        if activation is None:
            try:
                param = inspect.signature(MODELS.get(cfg.model.name)).parameters.get("activation")
                activation = param.default if param is not None else "relu"
            except (TypeError, ValueError):
                activation = "relu"
        if activation == "relu":
            raise ConfigError(f"plan.act: '{act.name}' takes sign(x), but model '{cfg.model.name}' has activation "
                              "relu, so every input is >= 0 and maps to +1 (nothing can train); set "
                              "model.activation=hardtanh")
