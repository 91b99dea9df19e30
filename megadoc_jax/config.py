"""Typed run configuration: dataclasses, composable YAML files, `a.b=value` overrides, validation.

A config is built in one direction: YAML file and the base files it names -> one merged dict -> dotted
overrides -> model size preset -> dataclasses (types checked field by field) -> validation. Every error
names the key it is about (and the file, for what one file says), and all of it happens before JAX
compiles anything.

Composition: a file's top-level `base:` names one file or a list of files (paths relative to the file
that names them) that it extends; bases may have bases. The merged dict is the bases in order, then
the file itself, each deep-merged over what came before: mappings merge key by key, anything else
(numbers, strings, lists such as data.streams) is replaced by the later value. Overrides come last and
set the value at their path. The resolved Config has no trace of the bases: `dump` writes every value.

This module imports no JAX so that the generation stage and tools can read configs cheaply.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from megadoc_jax import hardware as hardware_table


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------

# The paper's four sizes (paper-notes.md) plus tiny sizes for tests and the demo.
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "150m": dict(hidden=512, mlp=1792, layers=6, heads=8, kv_heads=8, vocab_size=128_256),
    "300m": dict(hidden=768, mlp=2688, layers=12, heads=12, kv_heads=12, vocab_size=128_256),
    "600m": dict(hidden=1024, mlp=3584, layers=24, heads=16, kv_heads=8, vocab_size=128_256),
    "1.5b": dict(hidden=1536, mlp=5376, layers=36, heads=16, kv_heads=8, vocab_size=128_256),
    "tiny": dict(hidden=64, mlp=192, layers=2, heads=4, kv_heads=2, vocab_size=512),
    "demo": dict(hidden=128, mlp=384, layers=4, heads=4, kv_heads=2, vocab_size=2048),
}
# model.size=custom: no preset; every field of SHAPE_FIELDS must be given (head_dim may stay 0).
CUSTOM_SIZE = "custom"
SHAPE_FIELDS = ("vocab_size", "hidden", "mlp", "layers", "heads", "kv_heads")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Llama-style decoder. `size` picks a preset from MODEL_SIZES (explicit keys override it), or is
    'custom': no preset, every shape field given."""

    size: str = "tiny"
    vocab_size: int = 512
    hidden: int = 64
    mlp: int = 192
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 0  # 0: hidden // heads
    rope_base: float = 10_000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    attention: str = "xla"  # backend of megadoc_jax.attention.attention
    remat: str = "none"  # none | full | dots (save matmul outputs only)
    scan_layers: bool = True  # one compiled layer body: compile time stays flat in depth

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden // self.heads


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """One training stream: a token store and its mixture weight (real 1-r, synthetic r)."""

    name: str = "real"
    store: str = ""
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    streams: tuple[StreamConfig, ...] = ()
    # Held-out stores for the periodic evaluation loss, by name.
    eval_stores: dict[str, str] = dataclasses.field(default_factory=dict)
    # Hugging Face tokenizer directory of this run; stores from another tokenizer are refused.
    tokenizer: str = ""
    seq_len: int = 4096
    # concat: documents concatenated and cut into windows (the paper's headline runs).
    # document: long-context windows where a document that fits stays whole (positions restart).
    windows: str = "concat"
    # Attend only within a document (segment ids) instead of across document boundaries.
    document_masking: bool = False
    seed: int = 0
    # Real-data epochs E; with streams weights (1-r, r) total steps = S_epoch * E / (1 - r).
    # Used when train.steps is 0.
    real_epochs: float = 1.0
    # Name of the stream whose epochs define the run length (the real data).
    real_stream: str = "real"


# --------------------------------------------------------------------------------------------------
# Mesh, optimizer, training
# --------------------------------------------------------------------------------------------------

MESH_AXES = ("data", "fsdp", "tensor", "context")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; -1 on exactly one axis means: all devices not used by the others."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    context: int = 1
    # Multislice: the data axis is split over this many TPU slices (granules) that talk over the data-centre
    # network; within a slice it keeps data / dcn_data. 1: one slice, the plain mesh (sharding.make_mesh).
    dcn_data: int = 1

    def sizes(self, num_devices: int) -> dict[str, int]:
        """Concrete axis sizes for `num_devices`, or ConfigError naming the mesh keys."""
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        free = [axis for axis, size in sizes.items() if size == -1]
        if len(free) > 1:
            raise ConfigError(f"mesh: only one axis may be -1, got {free}")
        fixed = 1
        for size in sizes.values():
            if size != -1:
                fixed *= size
        if free:
            if num_devices % fixed:
                named = ", ".join(f"mesh.{a}={s}" for a, s in sizes.items() if s != -1)
                raise ConfigError(f"mesh: {num_devices} devices are not divisible by {fixed}, the product of {named}")
            sizes[free[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise ConfigError(
                f"mesh: mesh.data*mesh.fsdp*mesh.tensor*mesh.context = {fixed} but there are {num_devices} devices"
            )
        if sizes["data"] % self.dcn_data:
            raise ConfigError(
                f"mesh.dcn_data: {self.dcn_data} slices do not divide the data axis of size {sizes['data']}"
            )
        return sizes


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with PyTorch weight-decay semantics (each step shrinks weights by lr * wd)."""

    lr: float = 3e-3
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    warmup_fraction: float = 0.01
    final_lr_fraction: float = 0.0  # cosine floor, as a fraction of lr
    clip_norm: float = 1.0  # 0 disables clipping
    # Parameters whose path matches any of these regular expressions are not decayed.
    no_decay: tuple[str, ...] = ("norm", "embed")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/demo"
    seed: int = 0
    batch_size: int = 64  # global, in sequences
    microbatches: int = 1  # gradient accumulation
    steps: int = 0  # 0: derived from data.real_epochs and the stream weights
    z_loss: float = 0.0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    # The periodic held-out loss: the first eval_batches batches (0: the whole store) of each eval store's
    # windows in eval_recipe, the evaluate command's recipes (concat, the paper's, or document).
    eval_batches: int = 0
    eval_recipe: str = "concat"
    # At the end, also the held-out loss of unigram and bigram count models of the real stream's tokens
    # (evaluation/count_models.py), printed next to eval/<name>/loss.
    baselines: bool = False
    checkpoint_every: int = 0  # 0: only at the end
    keep_last: int = 2
    keep_every: int = 0  # also keep every M-th step's checkpoint; 0: none
    checkpoints: bool = True
    # A newest checkpoint that cannot be restored (a file removed or truncated after it was finalized) stops
    # the run, naming the step; true: resume from the newest step that restores, deleting the damaged ones.
    fallback_on_damage: bool = False


# --------------------------------------------------------------------------------------------------
# Experiment: what a run is, for sweeps and reports
# --------------------------------------------------------------------------------------------------

# "real": the real-data-only baseline; the others are generation/megadocs.py's METHOD_TABLE (a test checks).
EXPERIMENT_METHODS = ("real", "simple", "stitched-back", "stitched-front", "stitched-nodoc", "stretched")
MAX_GENERATIONS = 32


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """What a run is: sweeps, run names (run_names.py) and reports read it from the resolved config, never
    from a directory name. Empty method: not stated (demo and test runs); reports list such runs apart."""

    name: str = ""  # the experiment this run belongs to, e.g. "stitched-g32" (free text)
    data: str = ""  # the real data set, e.g. "dclm": short, [a-z0-9_.]
    method: str = ""  # one of EXPERIMENT_METHODS, or "" (not stated)
    generations: int = 0  # G: generations per real document in the synthetic stream; 0 for "real"
    synthetic_stream: str = "synthetic"  # the stream whose weight is the paper's r
    # The TPU slice the run is sized for, e.g. "v4:2x2x2" (GENERATION:AxB[xC], as `--dry-run --topology`
    # takes it): `python -m megadoc_jax.experiments check --compile` compiles the step for it. "" = none.
    topology: str = ""


# --------------------------------------------------------------------------------------------------
# Hardware: what a configs/hardware/ file says about the machine, applied by xla_env.py before JAX starts
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HardwareConfig:
    """Compiler flags and environment of one hardware target (docs/hardware.md). xla_env.apply puts them in
    the process environment before JAX initialises a backend; a flag or variable the user set wins."""

    name: str = ""  # the target, e.g. "tpu-v5e-16" (free text, for the start-up line and reports)
    # The chip, as megadoc_jax.hardware.ACCELERATORS names it ("TPU v5e", "H100 SXM"): its HBM and peak FLOP/s
    # for the config check and cost estimates of a target that is not at hand. "": not stated.
    accelerator: str = ""
    devices: int = 0  # devices of the whole target (all slices, all hosts); 0: not stated
    xla_flags: tuple[str, ...] = ()  # XLA_FLAGS entries, each "--name=value" or "--name"
    libtpu_init_args: tuple[str, ...] = ()  # LIBTPU_INIT_ARGS entries (the TPU compiler and runtime's flags)
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # other variables: NCCL_*, CUDA_*, ...


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    experiment: ExperimentConfig = dataclasses.field(default_factory=ExperimentConfig)
    hardware: HardwareConfig = dataclasses.field(default_factory=HardwareConfig)


# --------------------------------------------------------------------------------------------------
# Building configs from dicts, with types checked
# --------------------------------------------------------------------------------------------------


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a type hint, converting only where it is lossless (int -> float)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return build_dataclass(hint, value, key)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} matches none of {hint}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_hint, _ellipsis) = typing.get_args(hint)
        return tuple(_coerce(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, value_hint = typing.get_args(hint)
        return {str(k): _coerce(v, value_hint, f"{key}.{k}") for k, v in value.items()}
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {hint}")


def build_dataclass(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """A dataclass from a dict, every value type-checked; an unknown key or a wrong type names `prefix.key`.
    The one coercer of the project: configs and generation backends' options are built with it."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]} (known keys of {prefix or 'the config'}: {sorted(names)})")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, value_text = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {text!r} has an empty key part")
    return path, yaml.safe_load(value_text) if value_text.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (values parsed as YAML) to a nested dict, in place."""
    for text in overrides:
        path, value = _parse_override(text)
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[: i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def _expand_model_size(raw_model: dict[str, Any]) -> dict[str, Any]:
    size = raw_model.get("size", ModelConfig.size)
    if size == CUSTOM_SIZE:  # no preset: every shape field is given (e.g. an imported Hugging Face model)
        missing = [key for key in SHAPE_FIELDS if key not in raw_model]
        if missing:
            raise ConfigError(
                f"model.size={CUSTOM_SIZE} takes no preset: give model.{missing[0]} too (missing: {', '.join(missing)})"
            )
        return raw_model
    if size not in MODEL_SIZES:
        raise ConfigError(
            f"model.size: unknown size {size!r}; known sizes: {sorted(MODEL_SIZES)} or {CUSTOM_SIZE!r} (no preset)"
        )
    return {**MODEL_SIZES[size], **raw_model}


def from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (as read from YAML plus overrides)."""
    raw = dict(raw)
    raw["model"] = _expand_model_size(dict(raw.get("model") or {}))
    config = build_dataclass(Config, raw, "")
    validate(config)
    return config


BASE_KEY = "base"


def _merge(below: dict[str, Any], above: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, any other value of `above` replaces the one below."""
    merged = dict(below)
    for key, value in above.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# libyaml's parser when PyYAML has it: about 1 ms a resolved config against 20 ms in pure Python (the
# study report reads thousands); both are safe loaders of the same YAML.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml_mapping(path: Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty: {}); ConfigError naming `what` and the path."""
    try:
        raw = yaml.load(path.read_text(), Loader=_YAML_LOADER) or {}
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path}: the top level must be a mapping")
    return raw


def _base_paths(raw: dict[str, Any], path: Path) -> list[Path]:
    bases = raw.get(BASE_KEY) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"config file {path}: {BASE_KEY} must be a file name or a list of them, got {bases!r}")
    return [path.parent / base for base in bases]


def compose(path: str | Path) -> dict[str, Any]:
    """The merged dict of config file `path` and its bases (module doc), without the base key.

    Each file's keys and types are checked on their own, so an unknown key or a wrong type is named
    with the file that holds it."""
    return _compose(Path(path), ())


def _compose(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    if path.resolve() in [p.resolve() for p in chain]:
        raise ConfigError("config files extend each other in a cycle: " + " -> ".join(map(str, (*chain, path))))
    raw = read_yaml_mapping(path)
    merged: dict[str, Any] = {}
    for base in _base_paths(raw, path):
        if not base.is_file():
            raise ConfigError(f"config file {path}: its base {base} does not exist")
        merged = _merge(merged, _compose(base, (*chain, path)))
    own = {key: value for key, value in raw.items() if key != BASE_KEY}
    try:
        build_dataclass(Config, {**own, "model": own.get("model") or {}}, "")
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    return _merge(merged, own)


def compose_files(paths: list[str | Path]) -> dict[str, Any]:
    """The merged dict of several config files (each with its bases), later files over earlier ones: what a
    file whose `base:` lists them would compose to."""
    merged: dict[str, Any] = {}
    for path in paths:
        merged = _merge(merged, compose(path))
    return merged


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config with its bases (or start from defaults when path is None) and apply overrides."""
    raw = compose(path) if path is not None else {}
    return from_dict(apply_overrides(raw, list(overrides)))


def to_dict(config: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), suitable for YAML or JSON."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def dump(config: Config, path: str | Path) -> None:
    """The resolved config as YAML at `path` (a local path or a URL of megadoc_jax/storage.py)."""
    from megadoc_jax import storage

    storage.write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


# --------------------------------------------------------------------------------------------------
# Validation: what can be checked from the config alone. Device counts and stores are checked by
# validate_for_devices (before the mesh is built) and by the data pipeline (when stores are opened).
# --------------------------------------------------------------------------------------------------

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots")
WINDOW_MODES = ("concat", "document")
EVAL_RECIPES = ("concat", "document")  # evaluation/loss_windows.py


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def validate(config: Config) -> None:
    m, d, o, t = config.model, config.data, config.optim, config.train
    for key in ("vocab_size", "hidden", "mlp", "layers", "heads", "kv_heads"):
        _require(getattr(m, key) > 0, f"model.{key}", f"must be positive, got {getattr(m, key)}")
    _require(m.head_dim >= 0, "model.head_dim", "must be 0 (hidden // heads) or positive")
    _require(
        m.head_dim > 0 or m.hidden % m.heads == 0,
        "model.hidden",
        f"{m.hidden} is not divisible by model.heads={m.heads}",
    )
    _require(m.heads % m.kv_heads == 0, "model.kv_heads", f"{m.kv_heads} does not divide heads={m.heads}")
    _require(m.head_size % 2 == 0, "model.head_dim", "rotary embeddings need an even head size")
    _require(m.param_dtype in DTYPES, "model.param_dtype", f"{m.param_dtype!r} not in {DTYPES}")
    _require(m.compute_dtype in DTYPES, "model.compute_dtype", f"{m.compute_dtype!r} not in {DTYPES}")
    _require(m.remat in REMAT_POLICIES, "model.remat", f"{m.remat!r} not in {REMAT_POLICIES}")
    _require(m.rope_base > 0, "model.rope_base", "must be positive")

    _require(d.seq_len > 0, "data.seq_len", "must be positive")
    _require(d.windows in WINDOW_MODES, "data.windows", f"{d.windows!r} not in {WINDOW_MODES}")
    names = [s.name for s in d.streams]
    _require(len(set(names)) == len(names), "data.streams", f"stream names repeat: {names}")
    for i, stream in enumerate(d.streams):
        _require(bool(stream.store), f"data.streams[{i}].store", "is empty")
        _require(stream.weight > 0, f"data.streams[{i}].weight", f"must be positive, got {stream.weight}")
    if d.streams:
        total = sum(s.weight for s in d.streams)
        _require(abs(total - 1.0) < 1e-6, "data.streams", f"weights sum to {total}, not 1")
    _require(d.real_epochs > 0, "data.real_epochs", "must be positive")

    _require(o.lr > 0, "optim.lr", "must be positive")
    _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b1", "betas must lie in [0, 1)")
    _require(0 <= o.warmup_fraction < 1, "optim.warmup_fraction", "must lie in [0, 1)")
    _require(0 <= o.final_lr_fraction <= 1, "optim.final_lr_fraction", "must lie in [0, 1]")
    _require(o.clip_norm >= 0, "optim.clip_norm", "must be >= 0")

    _require(t.batch_size > 0, "train.batch_size", "must be positive")
    _require(t.microbatches > 0, "train.microbatches", "must be positive")
    _require(
        t.batch_size % t.microbatches == 0,
        "train.microbatches",
        f"{t.microbatches} does not divide train.batch_size={t.batch_size}",
    )
    _require(t.steps >= 0, "train.steps", "must be >= 0")
    _require(t.log_every > 0, "train.log_every", "must be positive")
    _require(t.eval_batches >= 0, "train.eval_batches", "must be 0 (the whole store) or positive")
    _require(t.eval_recipe in EVAL_RECIPES, "train.eval_recipe", f"{t.eval_recipe!r} not in {EVAL_RECIPES}")
    _require(t.keep_last > 0, "train.keep_last", "must be positive")
    _require(not t.baselines or bool(d.eval_stores), "train.baselines", "needs data.eval_stores (targets to score)")

    _validate_experiment(config)
    _validate_hardware(config.hardware)

    for axis in MESH_AXES:
        size = getattr(config.mesh, axis)
        _require(size == -1 or size > 0, f"mesh.{axis}", f"must be positive or -1, got {size}")
    _require(config.mesh.dcn_data >= 1, "mesh.dcn_data", f"must be 1 (one slice) or more, got {config.mesh.dcn_data}")


# A flag as XLA and libtpu parse them: "--name" or "--name=value", no spaces (entries are joined by spaces).
_FLAG = re.compile(r"--[A-Za-z0-9_][A-Za-z0-9_.-]*(=\S*)?")
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
# Set through their own lists (merged flag by flag with the user's), never as a whole through hardware.env.
FLAG_VARIABLES = {"XLA_FLAGS": "xla_flags", "LIBTPU_INIT_ARGS": "libtpu_init_args"}


def flag_name(flag: str) -> str:
    """'--xla_foo=1' -> '--xla_foo': what makes two entries the same flag."""
    return flag.split("=", 1)[0]


def _validate_hardware(h: HardwareConfig) -> None:
    _require(h.devices >= 0, "hardware.devices", f"must be 0 (not stated) or positive, got {h.devices}")
    known = [acc.name for acc in hardware_table.ACCELERATORS]
    _require(not h.accelerator or h.accelerator in known, "hardware.accelerator", f"{h.accelerator!r} not in {known}")
    for field in FLAG_VARIABLES.values():
        seen: dict[str, str] = {}
        for i, flag in enumerate(getattr(h, field)):
            key = f"hardware.{field}[{i}]"
            _require(_FLAG.fullmatch(flag) is not None, key, f"{flag!r} is not of the form --name=value or --name")
            name = flag_name(flag)
            _require(name not in seen, key, f"{name} is given twice ({seen.get(name)!r} and {flag!r})")
            seen[name] = flag
    for name in h.env:
        key = f"hardware.env.{name}"
        _require(_ENV_NAME.fullmatch(name) is not None, key, "an environment variable name is an uppercase identifier")
        _require(name not in FLAG_VARIABLES, key, f"set it through hardware.{FLAG_VARIABLES.get(name)} instead")


def _validate_experiment(config: Config) -> None:
    e, streams = config.experiment, {s.name for s in config.data.streams}
    _require(
        not e.data or (len(e.data) <= 24 and all(c in "abcdefghijklmnopqrstuvwxyz0123456789_." for c in e.data)),
        "experiment.data",
        f"{e.data!r}: at most 24 characters of a-z, 0-9, '_', '.' (it goes into run names)",
    )
    _require(
        not e.topology or re.fullmatch(r"[a-z0-9]+:\d+(x\d+){1,2}", e.topology) is not None,
        "experiment.topology",
        f"{e.topology!r} is not of the form GENERATION:AxB[xC], e.g. 'v4:2x2x2'",
    )
    if not e.method:
        return
    _require(e.method in EXPERIMENT_METHODS, "experiment.method", f"{e.method!r} not in {EXPERIMENT_METHODS}")
    if e.method == "real":
        _require(e.generations == 0, "experiment.generations", "must be 0 for method 'real'")
        message = f"method 'real' has no stream {e.synthetic_stream!r}"
        _require(e.synthetic_stream not in streams, "data.streams", message)
        return
    _require(
        0 < e.generations <= MAX_GENERATIONS,
        "experiment.generations",
        f"must lie in [1, {MAX_GENERATIONS}] for method {e.method!r}, got {e.generations}",
    )
    _require(
        not streams or e.synthetic_stream in streams,
        "experiment.synthetic_stream",
        f"{e.synthetic_stream!r} is not one of data.streams {sorted(streams)}",
    )


def validate_for_devices(config: Config, num_devices: int) -> dict[str, int]:
    """Checks that need the device count; returns the concrete mesh axis sizes. What the attention backend
    needs of the mesh is its own declaration, checked by attention.check_mesh (from step.train_setup)."""
    sizes = config.mesh.sizes(num_devices)
    t, d, m = config.train, config.data, config.model
    batch_shards = sizes["data"] * sizes["fsdp"]
    micro = t.batch_size // t.microbatches
    _require(
        micro % batch_shards == 0,
        "train.batch_size",
        f"the microbatch of {micro} sequences (train.batch_size={t.batch_size} / "
        f"train.microbatches={t.microbatches}) is not divisible by the data axes "
        f"mesh.data*mesh.fsdp={batch_shards}",
    )
    _require(
        d.seq_len % sizes["context"] == 0,
        "data.seq_len",
        f"{d.seq_len} is not divisible by the context axis mesh.context={sizes['context']}",
    )
    _require(
        m.kv_heads % sizes["tensor"] == 0 or sizes["tensor"] % m.kv_heads == 0,
        "mesh.tensor",
        f"tensor axis {sizes['tensor']} does not fit model.kv_heads={m.kv_heads}",
    )
    _require(m.mlp % sizes["tensor"] == 0, "mesh.tensor", f"{sizes['tensor']} does not divide model.mlp={m.mlp}")
    return sizes
