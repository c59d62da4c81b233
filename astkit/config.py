"""Typed run configuration: dataclasses, TOML files and ``key=value`` overrides.

A :class:`RunConfig` has one section per stage (``data``, ``model``,
``augment``, ``experts``, ``distill``, ``evaluate``) plus top-level keys and
``options``: per-plugin tables declared by plugins through the
``astkit_plugin_options`` hook. Defaults reproduce MTT; the published
per-dataset hyper-parameters are in docs/configuration.md.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astkit import store
from astkit.errors import UserError


@dataclass
class DataConfig:
    """Which dataset, from where."""

    dataset: str = "digits"
    root: str | None = None
    download: bool = False
    zca: bool = False
    zca_eps: float = 0.1


@dataclass
class ModelConfig:
    """The network experts and the student use (``None`` = the model's default)."""

    name: str = "convnet"
    width: int | None = None
    depth: int | None = None
    norm: str | None = None
    activation: str | None = None
    pooling: str | None = None

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "name" and v is not None}


@dataclass
class AugmentConfig:
    """Differentiable siamese augmentation (DSA), shared by the three stages."""

    strategy: str = "color_crop_cutout_flip_scale_rotate"
    mode: str = "single"


@dataclass
class ExpertConfig:
    """Stage 1: training expert trajectories."""

    num_experts: int = 5
    epochs: int = 20
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 256
    lr_decay: float = 1.0
    lr_decay_epoch: int | None = None
    lr_decay_fraction: float | None = None
    reset_optimizer_on_decay: bool = False
    augment: bool = True
    dir: str | None = None


@dataclass
class DistillConfig:
    """Stage 2: matching the student to the experts."""

    ipc: int = 10
    iterations: int = 1000
    syn_steps: int = 20
    expert_epochs: int = 2
    max_start_epoch: int = 10
    lr_img: float = 1000.0
    lr_lr: float = 1e-5
    lr_teacher: float = 0.01
    img_momentum: float = 0.5
    lr_momentum: float = 0.5
    learn_lr: bool = True
    learn_labels: bool = False
    lr_labels: float = 2.0
    labels_momentum: float = 0.9
    label_temperature: float = 1.0
    max_loss_to_update: float | None = None
    batch_syn: int | None = None
    student_momentum: float = 0.0
    recompute_segment: int | str = "auto"
    memory_budget_gib: float | None = None
    divergence_lr_factor: float = 0.5
    max_divergences: int = 5
    max_image_growth: float = 100.0
    max_lr_growth: float = 1000.0
    clip_image_grad: float | None = None
    augment: bool = True
    eval_every: int = 0
    checkpoint_every: int = 100


@dataclass
class EvalConfig:
    """Stage 3: training fresh networks on the distilled set."""

    models: list[str] = field(default_factory=list)
    num_nets: int = 5
    epochs: int = 1000
    batch_size: int = 256
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_decay: float = 0.1
    momentum_after_decay: float | None = None
    augment: bool = True
    report_max: bool = False
    test_every: int = 20


#: the largest seed: TOML integers are signed 64-bit, and torch's generators take it
MAX_SEED = 2**63 - 1

SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "augment": AugmentConfig,
    "experts": ExpertConfig,
    "distill": DistillConfig,
    "evaluate": EvalConfig,
}


@dataclass
class RunConfig:
    """Everything a run needs. Build with :meth:`load` or field by field."""

    seed: int = 0
    device: str = "cpu"
    allocator: str = "auto"
    out: str = "runs/astkit"
    plugins: list[str] = field(default_factory=list)
    disable: list[str] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    experts: ExpertConfig = field(default_factory=ExpertConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    # ---------------------------------------------------------------- build
    def __post_init__(self) -> None:
        #: the dotted keys set through :meth:`set` (a file, ``--set``, ``load``):
        #: the keys a preset's values do not override
        self.explicit: set[str] = set()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """A config from nested dicts (as TOML gives), validated."""
        config = cls()
        config.update(data)
        return config

    def update(self, data: dict[str, Any]) -> None:
        """Set every key of nested dicts (as TOML gives), validated."""
        config = self
        for key, value in data.items():
            if key in SECTIONS:
                if not isinstance(value, dict):
                    raise UserError(f"config section [{key}] must be a table, got {value!r}; write it as [{key}] with key = value lines")
                for sub, subvalue in value.items():
                    config.set(f"{key}.{sub}", subvalue)
            elif key == "options":
                if not isinstance(value, dict):
                    raise UserError("config section [options] must hold one table per plugin; write [options.PLUGIN] tables")
                for ns, table in value.items():
                    if not isinstance(table, dict):
                        raise UserError(f"config section [options.{ns}] must be a table; write key = value lines under it")
                    for sub, subvalue in table.items():
                        config.set(f"{ns}.{sub}", subvalue)
            else:
                config.set(key, value)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> "RunConfig":
        """Read a TOML file (optional) and apply ``key=value`` overrides."""
        data = read_config_file(path) if path is not None else {}
        config = cls.from_dict(data)
        for item in overrides or []:
            config.apply_override(item)
        return config

    def apply_override(self, item: str) -> None:
        """Apply one ``section.key=value`` (or ``plugin.key=value``) string."""
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override {item!r} is not of the form key=value (e.g. distill.ipc=10)")
        self.set(key.strip(), parse_value(raw.strip()))

    def set(self, key: str, value: Any, *, explicit: bool = True) -> None:
        """Set a dotted key, converting ``value`` to the field's type.

        ``explicit`` (the default) records the key in :attr:`explicit`, so a
        preset's value for it is not applied over it.
        """
        head, _, rest = key.partition(".")
        if head in SECTIONS and rest:
            _set_field(getattr(self, head), rest, value, prefix=f"{head}.")
        elif not rest and head in _field_types(RunConfig) and head not in SECTIONS and head != "options":
            _set_field(self, head, value, prefix="")
        elif rest and "." not in rest:
            self.options.setdefault(head, {})[rest] = value
        else:
            raise UserError(f"unknown config key {key!r}; see `astkit run --help` or docs/configuration.md")
        if explicit:
            self.explicit.add(key)
        else:
            self.explicit.discard(key)

    def get(self, key: str) -> Any:
        """The value of a dotted key (a plugin option not set yet: ``None``)."""
        head, _, rest = key.partition(".")
        if head in SECTIONS and rest:
            return getattr(getattr(self, head), rest)
        if not rest:
            return getattr(self, head)
        return self.options.get(head, {}).get(rest)

    def is_default(self, key: str) -> bool:
        """Whether a section or top-level key holds astkit's default value."""
        head, _, rest = key.partition(".")
        fresh = RunConfig()
        return self.get(key) == (getattr(getattr(fresh, head), rest) if rest else getattr(fresh, head))

    # --------------------------------------------------------------- plugins
    def plugin(self, namespace: str) -> dict[str, Any]:
        """The options of one plugin (defaults merged in by the engine)."""
        return self.options.get(namespace, {})

    def resolve_options(self, declared: dict[str, dict[str, Any]]) -> None:
        """Merge plugin defaults into ``options``; reject unknown keys; cast types."""
        for ns, table in self.options.items():
            if ns not in declared:
                known = ", ".join(sorted(declared)) or "none"
                raise UserError(f"unknown config section {ns!r}; plugin option namespaces: {known}")
            for key in table:
                if key not in declared[ns]:
                    raise UserError(
                        f"unknown option {ns}.{key}; {ns} has: {', '.join(sorted(declared[ns]))}"
                    )
        for ns, defaults in declared.items():
            table = self.options.setdefault(ns, {})
            for key, default in defaults.items():
                if key in table:
                    table[key] = _coerce(table[key], type(default) if default is not None else Any, f"{ns}.{key}")
                else:
                    table[key] = copy.deepcopy(default)

    # ---------------------------------------------------------------- output
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return _drop_none(data)

    def to_toml(self) -> str:
        """The config as TOML text (``None`` values are omitted)."""
        return dump_toml(self.to_dict())

    def validate(self) -> None:
        """Range checks that do not need the data (raise UserError)."""
        d, e, v = self.distill, self.experts, self.evaluate
        checks = [
            (d.ipc >= 1, "distill.ipc must be >= 1"),
            (d.syn_steps >= 1, "distill.syn_steps must be >= 1"),
            (d.expert_epochs >= 1, "distill.expert_epochs must be >= 1"),
            (d.max_start_epoch >= 1, "distill.max_start_epoch must be >= 1"),
            (d.iterations >= 0, "distill.iterations must be >= 0"),
            (d.lr_img > 0, "distill.lr_img must be > 0"),
            (d.lr_teacher > 0, "distill.lr_teacher must be > 0"),
            (d.lr_lr >= 0, "distill.lr_lr must be >= 0"),
            (d.batch_syn is None or d.batch_syn >= 1, "distill.batch_syn must be >= 1 (or unset for all)"),
            (0 <= d.student_momentum < 1, "distill.student_momentum must be in [0, 1)"),
            (0 < d.divergence_lr_factor <= 1, "distill.divergence_lr_factor must be in (0, 1]"),
            (d.max_divergences >= 1, "distill.max_divergences must be >= 1"),
            (d.max_image_growth > 1, "distill.max_image_growth must be > 1"),
            (d.max_lr_growth > 1, "distill.max_lr_growth must be > 1"),
            (d.clip_image_grad is None or d.clip_image_grad > 0, "distill.clip_image_grad must be > 0 (or unset for no clipping)"),
            (d.recompute_segment == "auto" or (isinstance(d.recompute_segment, int) and d.recompute_segment >= 0),
             f"distill.recompute_segment must be 'auto' or an integer >= 0 (0 keeps the whole graph), "
             f"got {d.recompute_segment!r}"),
            (d.memory_budget_gib is None or d.memory_budget_gib > 0,
             "distill.memory_budget_gib must be > 0 (or unset for an eighth of the device's memory)"),
            (d.checkpoint_every >= 0 and d.eval_every >= 0, "distill.checkpoint_every and eval_every must be >= 0"),
            (e.num_experts >= 1, "experts.num_experts must be >= 1"),
            (e.epochs >= 1, "experts.epochs must be >= 1"),
            (e.lr > 0, "experts.lr must be > 0"),
            (e.batch_size >= 1, "experts.batch_size must be >= 1"),
            (e.optimizer in ("sgd", "adam"), f"experts.optimizer must be 'sgd' or 'adam', got {e.optimizer!r}"),
            (0 <= e.momentum < 1, "experts.momentum must be in [0, 1)"),
            (e.weight_decay >= 0, "experts.weight_decay must be >= 0"),
            (e.lr_decay > 0, "experts.lr_decay must be > 0 (1 for no decay)"),
            (e.lr_decay_epoch is None or e.lr_decay_epoch >= 1, "experts.lr_decay_epoch must be >= 1 (or unset)"),
            (e.lr_decay_fraction is None or 0 < e.lr_decay_fraction <= 1,
             "experts.lr_decay_fraction must be in (0, 1] (or unset)"),
            (0 <= d.img_momentum < 1, "distill.img_momentum must be in [0, 1)"),
            (0 <= d.lr_momentum < 1, "distill.lr_momentum must be in [0, 1)"),
            (d.lr_labels > 0, "distill.lr_labels must be > 0"),
            (0 <= d.labels_momentum < 1, "distill.labels_momentum must be in [0, 1)"),
            (d.label_temperature > 0, "distill.label_temperature must be > 0"),
            (d.max_loss_to_update is None or d.max_loss_to_update > 0,
             "distill.max_loss_to_update must be > 0 (or unset to update after every iteration)"),
            (self.data.zca_eps > 0, "data.zca_eps must be > 0"),
            (v.num_nets >= 1, "evaluate.num_nets must be >= 1"),
            (v.epochs >= 1, "evaluate.epochs must be >= 1"),
            (v.batch_size >= 1, "evaluate.batch_size must be >= 1"),
            (v.lr is None or v.lr > 0, "evaluate.lr must be > 0 (or unset to use the learned lr)"),
            (0 <= v.momentum < 1, "evaluate.momentum must be in [0, 1)"),
            (v.momentum_after_decay is None or 0 <= v.momentum_after_decay < 1,
             "evaluate.momentum_after_decay must be in [0, 1) (or unset to keep evaluate.momentum)"),
            (v.weight_decay >= 0, "evaluate.weight_decay must be >= 0"),
            (v.lr_decay > 0, "evaluate.lr_decay must be > 0 (1 for no decay)"),
            (v.test_every >= 1, "evaluate.test_every must be >= 1"),
            (self.augment.mode in ("single", "multiple"), "augment.mode must be 'single' or 'multiple'"),
            (self.allocator in ("auto", "system", "retain"),
             f"allocator must be 'auto', 'system' or 'retain', got {self.allocator!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        self._validate_seed_and_paths()

    def _validate_seed_and_paths(self) -> None:
        """The seed fits every generator and TOML; no path is empty (it would mean the current folder)."""
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise UserError(f"seed must be a whole number from 0 to 2**63 - 1, got {seed!r}; pick another seed")
        for key, value in (("out", self.out), ("data.root", self.data.root), ("experts.dir", self.experts.dir)):
            if value is not None and not str(value).strip():
                raise UserError(f"{key} is an empty path; give a folder (. for the current one) or leave {key} unset")

    def check_expert_length(self) -> None:
        """Experts must be long enough for the last start epoch plus expert_epochs."""
        d, e = self.distill, self.experts
        if d.max_start_epoch - 1 + d.expert_epochs > e.epochs:
            raise UserError(
                f"the last start epoch ({d.max_start_epoch - 1}) + distill.expert_epochs ({d.expert_epochs}) "
                f"exceeds experts.epochs = {e.epochs}; lower distill.max_start_epoch or train longer experts"
            )


# ------------------------------------------------------------------ helpers
def read_config_file(path: str | Path) -> dict[str, Any]:
    """The tables of a TOML config file; a missing path, a folder or bad TOML is a UserError."""
    if not str(path).strip():
        raise UserError("the config file path is empty; pass --config FILE.toml")
    path = store.require_file(path, "a TOML file", named="config file", fix="pass the .toml file itself")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text; write the config as a TOML text file") from None
    except OSError as exc:
        raise UserError(f"cannot read config file {path}: {exc.strerror or exc}; check its permissions") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML: {exc}; fix the file (see docs/configuration.md)") from None


def parse_value(raw: str) -> Any:
    """A ``--set`` value: TOML syntax (numbers, booleans, lists), else a string."""
    if raw.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if "," in raw:
            return [part.strip() for part in raw.split(",") if part.strip()]
        return raw


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _set_field(obj, name: str, value: Any, prefix: str) -> None:
    types_ = _field_types(type(obj))
    if name not in types_:
        known = ", ".join(f.name for f in dataclasses.fields(obj))
        raise UserError(f"unknown config key '{prefix}{name}'; known keys in this section: {known}")
    setattr(obj, name, _coerce(value, types_[name], prefix + name))


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert ``value`` to ``annotation`` (int, float, bool, str, list, optional)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        if str in args and isinstance(value, str):  # int | str: a number if it reads as one, else the word
            try:
                return _coerce(value, args[0], key)
            except UserError:
                return value.strip()
        return _coerce(value, args[0], key)
    if annotation is Any:
        return value
    if origin is list or annotation is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key {key} expects a list, got {value!r}; write a,b or [\"a\", \"b\"]")
        (item,) = typing.get_args(annotation) or (Any,)
        return [_coerce(v, item, key) for v in value]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key {key} expects a table, got {value!r}; write it as a TOML table")
        return value
    if value is None:
        if annotation is str:  # `--set augment.strategy=none` means the word
            return "none"
        raise UserError(f"config key {key} cannot be empty; give it a value")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise UserError(f"config key {key} expects true or false, got {value!r}; write {key}=true or {key}=false")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UserError(f"config key {key} expects an integer, got {value!r}; write a whole number")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())  # exact: a long seed must not pass through a float
            except ValueError:
                pass
        try:
            as_float = float(value)
        except ValueError:
            raise UserError(f"config key {key} expects an integer, got {value!r}; write a whole number") from None
        if not as_float.is_integer():
            raise UserError(f"config key {key} expects an integer, got {value!r}; write a whole number")
        return int(as_float)
    if annotation is float:
        if isinstance(value, bool):
            raise UserError(f"config key {key} expects a number, got {value!r}; write e.g. 0.01 or 1e-5")
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"config key {key} expects a number, got {value!r}; write e.g. 0.01 or 1e-5") from None
        if not math.isfinite(number):
            raise UserError(f"config key {key} expects a finite number, got {value!r}; write e.g. 0.01 or 1e-5")
        return number
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"config key {key} expects a string, got {value!r}; write a single name")
        return str(value)
    return value


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def dump_toml(data: dict[str, Any]) -> str:
    """Minimal TOML writer for configs (scalars, lists, nested tables)."""
    lines: list[str] = []
    tables: list[tuple[str, dict]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")

    def emit(prefix: str, table: dict) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        subs = {k: v for k, v in table.items() if isinstance(v, dict)}
        if scalars or not subs:
            lines.append("")
            lines.append(f"[{prefix}]")
            for k, v in scalars.items():
                lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in subs.items():
            emit(f"{prefix}.{_toml_key(k)}", v)

    for key, table in tables:
        emit(_toml_key(key), table)
    return "\n".join(lines).strip() + "\n"


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else f'"{key}"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
