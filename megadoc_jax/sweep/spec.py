"""The sweep file: a typed spec, and what each grid point means as a training run. No JAX import.

    spec = load_spec("configs/sweeps/demo.yaml")      # ConfigError naming the file and the key
    runs = Runs(spec)
    runs.overrides(point)    # ["train.steps=40", ..., "optim.lr=0.003", "data.streams=[...]"]
    runs.name(point)         # run_names.run_name of the point's resolved config

A sweep file (YAML):

    config: ../demo.yaml          # the base training config, relative to the sweep file
    sweep_dir: runs/sweeps/demo   # relative to the current directory (as train.run_dir is)
    objective: eval/heldout/loss  # the metric to minimise: its last logged value in the run's metrics.jsonl
    centre: {lr: 3.0e-3, wd: 0.1}
    grids: {lr: [1.0e-3, 3.0e-3, 1.0e-2], wd: [0.1, 0.4, 0.8]}
    overrides: [train.steps=40]   # applied to every run, before the coordinates
    max_attempts: 2               # attempts of one run before it counts as failed
    lease_seconds: 600            # a claim without a heartbeat for this long may be taken over
    min_improvement: 0.0          # a neighbour must beat the centre by more than this to move there

Coordinates (COORDINATES): lr -> optim.lr, wd -> optim.weight_decay, epochs -> data.real_epochs, and r,
the weight of the stream named experiment.synthetic_stream (the real stream, data.real_stream, gets 1 - r;
the base config must have exactly these two streams).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

from megadoc_jax import config as config_lib
from megadoc_jax import run_names, storage
from megadoc_jax.config import ConfigError
from megadoc_jax.sweep.search import Point, Space

# coordinate -> the config key it sets ("r" rewrites data.streams: see the module docstring)
COORDINATES = {"lr": "optim.lr", "wd": "optim.weight_decay", "epochs": "data.real_epochs", "r": "data.streams"}
RUN_DIR_KEY = "train.run_dir"


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    config: str
    sweep_dir: str
    centre: dict[str, float]
    grids: dict[str, tuple[float, ...]]
    objective: str = "eval/heldout/loss"
    overrides: tuple[str, ...] = ()
    max_attempts: int = 2
    lease_seconds: float = 600.0
    min_improvement: float = 0.0

    @property
    def space(self) -> Space:
        return Space(
            {name: tuple(values) for name, values in self.grids.items()}, dict(self.centre), self.min_improvement
        )

    @property
    def heartbeat_seconds(self) -> float:
        """How often a worker touches its lease: four beats fit in one lease."""
        return self.lease_seconds / 4

    @property
    def poll_seconds(self) -> float:
        """How often an idle worker (every run of the round claimed by others) looks again."""
        return min(self.heartbeat_seconds, 5.0)

    def agreement(self) -> dict[str, Any]:
        """The fields every worker of one sweep directory must agree on (paths may differ between hosts)."""
        out = dataclasses.asdict(self)
        del out["config"], out["sweep_dir"]
        return json.loads(json.dumps(out))  # tuples as lists, as read back from JSON


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def validate_spec(spec: SweepSpec) -> None:
    _check(bool(spec.config), "config", "is empty: name the base training config")
    _check(bool(spec.sweep_dir), "sweep_dir", "is empty")
    _check(not storage.is_url(spec.sweep_dir), "sweep_dir", "must be a local or shared filesystem path, not a URL")
    _check(bool(spec.objective), "objective", "is empty: name a metric such as eval/heldout/loss")
    _check(spec.max_attempts >= 1, "max_attempts", f"must be >= 1, got {spec.max_attempts}")
    _check(spec.lease_seconds > 0, "lease_seconds", f"must be positive, got {spec.lease_seconds}")
    for name in spec.grids:
        _check(name in COORDINATES, f"grids.{name}", f"unknown coordinate; known: {sorted(COORDINATES)}")
    for name in spec.centre:
        _check(name in spec.grids, f"centre.{name}", f"has no grid (grids has {sorted(spec.grids)})")
    try:
        _ = spec.space  # Space checks the grids and the centre
    except ValueError as e:
        raise ConfigError(str(e)) from None
    checks = {
        "lr": (lambda v: v > 0, "positive"),
        "wd": (lambda v: v >= 0, ">= 0"),
        "epochs": (lambda v: v > 0, "positive"),
    }
    checks["r"] = (lambda v: 0 < v < 1, "in (0, 1): the real stream gets 1 - r")
    for name, values in spec.grids.items():
        test, wanted = checks[name]
        for value in values:
            _check(test(value), f"grids.{name}", f"{value} must be {wanted}")
        labels = [run_names.number(v) for v in values]
        _check(len(set(labels)) == len(labels), f"grids.{name}", f"values {list(values)} give equal run names {labels}")
    for text in spec.overrides:
        key = text.split("=", 1)[0].strip()
        _check(key != RUN_DIR_KEY, "overrides", f"{text!r}: the sweep sets {RUN_DIR_KEY} (SWEEP_DIR/runs/<run name>)")
        swept = [name for name in spec.grids if name != "r" and COORDINATES[name] == key]  # r keeps the stores
        _check(not swept, "overrides", f"{text!r}: {key} is swept (grids.{swept[0] if swept else ''})")


def load_spec(path: str | Path) -> SweepSpec:
    """The validated spec of a sweep file; `config` comes back relative to the current directory."""
    path = Path(path)
    raw = config_lib.read_yaml_mapping(path, "sweep file")
    try:
        for key in ("config", "sweep_dir", "centre", "grids"):
            _check(key in raw, key, "is required")
        spec = config_lib.build_dataclass(SweepSpec, raw, "")
        validate_spec(spec)
    except ConfigError as e:
        raise ConfigError(f"sweep file {path}: {e}") from None
    return dataclasses.replace(spec, config=str(path.parent / spec.config))


class Runs:
    """What each point of a sweep is as a training run: overrides, resolved config, run name.

    The base config (with the sweep's overrides) is composed once; a point's config is that dict with
    the coordinates' overrides applied and validated (config.from_dict)."""

    def __init__(self, spec: SweepSpec):
        self.spec = spec
        self.space = spec.space
        self.names: dict[Point, str] = {}  # point -> run name, computed once (or read from a done marker)
        self._base = config_lib.apply_overrides(config_lib.compose(spec.config), list(spec.overrides))
        base = config_lib.from_dict(copy.deepcopy(self._base))
        self._streams = [dataclasses.asdict(s) for s in base.data.streams]
        if "r" in spec.grids:
            real, synthetic = base.data.real_stream, base.experiment.synthetic_stream
            names = [s["name"] for s in self._streams]
            _check(
                sorted(names) == sorted([real, synthetic]),
                "grids.r",
                f"the base config's data.streams must be the real stream {real!r} (data.real_stream) and the "
                f"synthetic stream {synthetic!r} (experiment.synthetic_stream), got {names}",
            )
            self._real, self._synthetic = real, synthetic

    def coordinate_overrides(self, point: Point) -> list[str]:
        out = []
        for name, value in self.space.named(point).items():
            if name == "r":
                weights = {self._synthetic: value, self._real: round(1.0 - value, 12)}
                streams = [{**s, "weight": weights[s["name"]]} for s in self._streams]
                out.append(f"{COORDINATES[name]}={json.dumps(streams)}")
            else:
                out.append(f"{COORDINATES[name]}={value!r}")
        return out

    def overrides(self, point: Point) -> list[str]:
        """The overrides of a point's run on top of the base config (train.run_dir not included)."""
        return [*self.spec.overrides, *self.coordinate_overrides(point)]

    def config(self, point: Point) -> config_lib.Config:
        raw = config_lib.apply_overrides(copy.deepcopy(self._base), self.coordinate_overrides(point))
        return config_lib.from_dict(raw)

    def name(self, point: Point) -> str:
        if point not in self.names:
            self.names[point] = run_names.run_name(self.config(point))
        return self.names[point]

    def check(self) -> None:
        """Build the config of the centre and of every grid value changed alone, so that a bad value
        fails now, naming its coordinate, and not as a failed run later."""
        start = self.space.start
        for axis, (name, values) in enumerate(self.space.grids.items()):
            for value in values:
                point = start[:axis] + (value,) + start[axis + 1 :]
                try:
                    self.config(point)
                except ConfigError as e:
                    raise ConfigError(f"grids.{name}={value}: {e}") from None
