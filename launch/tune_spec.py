"""A sweep spec (`noisymix tune SPEC.yaml`): base config, search space, scheduler and search, validated whole
before any trial starts. Plain Python: the Ray Tune objects are built from it in launch/sweep.py.

A space maps a config key to one distribution (`choice`, `grid`, `uniform`, `loguniform`, `randint`); a
key named after a method holds that method's own sub-space, used only by trials of that method."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from noisymix.distributed import storage
from noisymix.launch.bench_spec import read_spec_file, spec_name
from noisymix.launch.config import ConfigError, build_config
from noisymix.launch.prepare import DataSection
from noisymix.mixing.method import method_class, method_names

SPEC_KEYS = ("name", "base", "space", "num_samples", "scheduler", "search", "max_concurrent", "seed", "metric",
             "sweep_dir")
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
# The objective is read on the NOISY validation split: the only labels a user of a noisy dataset has.
METRICS = {"val_acc": "max"}
SCHEDULERS = ("asha", "fifo")
SEARCHES = ("random", "optuna")
# clean_from (and oof_from) may name the sweep's own out-of-fold table: trained once per fold key, shared.
SHARED_FOLDS = "sweep"
# Keys the sweep sets for each trial: where it runs, and the data it shares with every other trial.
TRIAL_PLACED = ("run_dir", "data_dir")


class SweepSpecError(ValueError):
    """A sweep spec that cannot run; the message names the offending part."""


@dataclass(frozen=True)
class Dimension:
    """One searched key: `kind` is a DISTRIBUTIONS name; `method` is set for a method's sub-space."""

    key: str
    kind: str
    values: tuple
    method: str | None = None

    @property
    def name(self) -> str:
        """The parameter's name in tables: a sub-space key is prefixed with its method."""
        return f"{self.method}.{self.key}" if self.method else self.key

    def applies_to(self, method: str | None) -> bool:
        """Whether a trial of `method` samples this dimension: top-level ones always, a sub-space its method's."""
        return self.method is None or self.method == method

    def corners(self) -> list:
        """The values that bound what the dimension can take: each choice, or both ends of a range."""
        if self.kind in ("choice", "grid"):
            return list(self.values)
        lo, hi = self.values
        return [lo, hi - 1] if self.kind == "randint" else [lo, hi]


@dataclass
class SweepSpec:
    name: str
    base: dict
    dimensions: list[Dimension]
    num_samples: int = 8
    scheduler: dict = field(default_factory=lambda: {"name": "asha", "grace_period": 2, "reduction_factor": 2})
    search: str = "random"
    max_concurrent: int = 1
    seed: int = 0
    metric: str = "val_acc"
    sweep_dir: str = ""

    @property
    def mode(self) -> str:
        return METRICS[self.metric]

    @property
    def location(self) -> str:
        """Where the sweep lives: an absolute folder (trials run in their own working directories), or a URL."""
        return self.sweep_dir if storage.is_url(self.sweep_dir) else str(Path(self.sweep_dir).resolve())

    def methods(self) -> list[str]:
        """The methods the sweep's trials can train."""
        for dim in self.dimensions:
            if dim.key == "method" and dim.method is None:
                return list(dim.values)
        return [self.base.get("method", build_config(overrides={}).run.method)]

    def max_epochs(self) -> int:
        """The longest run a trial can have (ASHA's max_t)."""
        epochs = [v for d in self.dimensions if d.key == "epochs" for v in d.corners()]
        return max(epochs or [build_config(overrides=with_table_placeholders(self.base)).train.epochs])

    def to_dict(self) -> dict:
        space: dict = {}
        for dim in self.dimensions:
            target = space.setdefault(dim.method, {}) if dim.method else space
            target[dim.key] = {dim.kind: list(dim.values)}
        return {"name": self.name, "base": self.base, "space": space, "num_samples": self.num_samples,
                "scheduler": self.scheduler, "search": self.search, "max_concurrent": self.max_concurrent,
                "seed": self.seed, "metric": self.metric, "sweep_dir": self.sweep_dir}


def trial_values(base: dict, params: dict) -> dict:
    """A trial's flat config values: base, then the sampled top-level keys, then its method's sub-space (the
    sampled parameters nest each method's sub-space under the method's name)."""
    values = {**base, **{k: v for k, v in params.items() if k not in method_names()}}
    method = values.get("method", build_config(overrides={}).run.method)
    values.update(params.get(method, {}))
    return values


def with_table_placeholders(values: dict) -> dict:
    """Values with the sweep's shared out-of-fold table stood in by a file name, for validation only."""
    return {k: ("oof.npz" if v == SHARED_FOLDS and k in ("clean_from", "oof_from") else v) for k, v in values.items()}


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SweepSpecError(f"{where}: bounds must be finite numbers, got {value!r}")
    return value


def _dimension(key: str, raw, method: str | None) -> Dimension:
    where = f"space.{method + '.' if method else ''}{key}"
    if not isinstance(raw, dict) or len(raw) != 1:
        raise SweepSpecError(f"{where} must be one distribution, e.g. {{choice: [a, b]}} or {{uniform: [lo, hi]}} "
                             f"(distributions: {', '.join(DISTRIBUTIONS)}), got {raw!r}")
    kind, values = next(iter(raw.items()))
    if kind not in DISTRIBUTIONS:
        raise SweepSpecError(f"{where}: unknown distribution {kind!r} (known: {', '.join(DISTRIBUTIONS)})")
    if not isinstance(values, list) or not values:
        raise SweepSpecError(f"{where}: {kind} needs a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2:
            raise SweepSpecError(f"{where}: {kind} needs [lo, hi], got {values!r}")
        lo, hi = (_number(v, where) for v in values)
        if lo >= hi:
            raise SweepSpecError(f"{where}: {kind} needs lo < hi, got [{lo}, {hi}]")
        if kind == "loguniform" and lo <= 0:
            raise SweepSpecError(f"{where}: loguniform needs 0 < lo, got {lo}")
        if kind == "randint" and not all(isinstance(v, int) for v in (lo, hi)):
            raise SweepSpecError(f"{where}: randint needs integer bounds [lo, hi) , got {values!r}")
    elif len(set(map(repr, values))) != len(values):
        raise SweepSpecError(f"{where}: {kind} lists a value twice: {values!r}")
    return Dimension(key, kind, tuple(values), method)


def _dimensions(space: dict, methods: list[str]) -> list[Dimension]:
    dims = []
    for key, raw in space.items():
        if key in method_names() and key != "method":
            if not isinstance(raw, dict) or not raw:
                raise SweepSpecError(f"space.{key} is {key}'s sub-space: a mapping of its knobs to distributions")
            dims += [_dimension(sub, sub_raw, key) for sub, sub_raw in raw.items()]
        else:
            dims.append(_dimension(key, raw, None))
    for dim in dims:
        if dim.key == "method" and (dim.method or dim.kind not in ("choice", "grid")):
            raise SweepSpecError("space.method must be a top-level choice or grid of method names")
        if dim.method and dim.method not in methods:
            raise SweepSpecError(f"space.{dim.method}: the sweep's trials never train {dim.method} "
                                 f"(methods: {', '.join(methods)})")
        if dim.key in DataSection.keys() or dim.key in TRIAL_PLACED or dim.key == "seed":
            raise SweepSpecError(f"space.{dim.key}: the data, the seed and where trials run are the sweep's, not "
                                 "searched (set them in base: every trial trains on the same prepared data)")
    return dims


def _check_trials(base: dict, dims: list[Dimension], methods: list[str]) -> None:
    """Build the config of every method with every corner of every dimension, so an unknown key or a value a
    key cannot take stops the sweep before its first trial."""
    for method in methods:
        own = set(method_class(method).Config.keys())
        for dim in [d for d in dims if d.applies_to(method)] or [None]:
            if dim is not None and dim.method == method and dim.key not in own:
                raise SweepSpecError(f"space.{method}.{dim.key}: {method} has no knob {dim.key} "
                                     f"(its knobs: {', '.join(sorted(own))})")
            for value in (dim.corners() if dim else [None]):
                values = {**base, "method": method}
                if dim is not None and dim.key != "method":
                    values[dim.key] = value
                where = f"method={method}" + (f", {dim.name}={value!r}" if dim is not None else "")
                try:
                    config = build_config(overrides=with_table_placeholders(values))
                except ConfigError as exc:
                    raise SweepSpecError(f"{where}: {exc}") from exc
                if dim is not None and dim.key in config.ignored:
                    raise SweepSpecError(f"space.{dim.key}: {method} has no knob {dim.key}; put it in the sub-space "
                                         f"of the methods that have it (space.<method>.{dim.key})")


def _scheduler(raw) -> dict:
    raw = {"name": raw} if isinstance(raw, str) else raw
    if not isinstance(raw, dict) or raw.get("name") not in SCHEDULERS:
        raise SweepSpecError(f"scheduler must be one of {', '.join(SCHEDULERS)} (or {{name: asha, grace_period: N, "
                             f"reduction_factor: R}}), got {raw!r}")
    allowed = {"name"} | ({"grace_period", "reduction_factor"} if raw["name"] == "asha" else set())
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise SweepSpecError(f"scheduler {raw['name']}: unknown key(s) {', '.join(unknown)}")
    scheduler = {"name": raw["name"]}
    if raw["name"] == "asha":
        scheduler["grace_period"] = raw.get("grace_period", 2)
        scheduler["reduction_factor"] = raw.get("reduction_factor", 2)
        if not isinstance(scheduler["grace_period"], int) or scheduler["grace_period"] < 1:
            raise SweepSpecError(f"scheduler.grace_period must be an integer >= 1, got {scheduler['grace_period']!r}")
        factor = scheduler["reduction_factor"]
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
            raise SweepSpecError(f"scheduler.reduction_factor must be a number > 1, got {factor!r}")
    return scheduler


def _positive_int(raw: dict, key: str, default: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SweepSpecError(f"{key} must be an integer >= 1, got {value!r}")
    return value


def parse_sweep(raw, overrides: dict | None = None) -> SweepSpec:
    """Validate a spec mapping; `overrides` set spec keys (num_samples=...) or, for any other key, base keys."""
    if not isinstance(raw, dict):
        raise SweepSpecError(f"the spec must be a mapping, got {type(raw).__name__}")
    overrides = dict(overrides or {})
    raw = {**raw, **{k: overrides.pop(k) for k in list(overrides) if k in SPEC_KEYS}}
    name = spec_name(raw, SPEC_KEYS, SweepSpecError)
    base, space = raw.get("base", {}), raw.get("space")
    if not isinstance(base, dict):
        raise SweepSpecError(f"base must be a mapping of config keys, got {type(base).__name__}")
    if not isinstance(space, dict) or not space:
        raise SweepSpecError("space must be a non-empty mapping of config keys to distributions")
    base = {**base, **overrides}
    placed = sorted(set(base) & {"run_dir"})
    if placed:
        raise SweepSpecError("base.run_dir: each trial's run directory is inside the sweep directory (sweep_dir=...)")
    metric = raw.get("metric", "val_acc")
    if metric not in METRICS:
        raise SweepSpecError(f"metric {metric!r} is not allowed: the objective is the noisy validation accuracy "
                             f"({', '.join(METRICS)}); test labels are for the report only")
    search = raw.get("search", "random")
    if search not in SEARCHES:
        raise SweepSpecError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SweepSpecError(f"seed must be an integer, got {seed!r}")
    try:
        build_config(overrides=with_table_placeholders(base))
    except ConfigError as exc:
        raise SweepSpecError(f"base: {exc}") from exc
    methods_dim = space.get("method")
    methods = (list(methods_dim[next(iter(methods_dim))]) if isinstance(methods_dim, dict) and methods_dim
               and isinstance(next(iter(methods_dim.values())), list) else
               [base.get("method", build_config(overrides={}).run.method)])
    unknown_methods = [m for m in methods if m not in method_names()]
    if unknown_methods:
        raise SweepSpecError(f"space.method: unknown method(s) {', '.join(map(str, unknown_methods))} "
                             f"(known: {', '.join(method_names())})")
    dims = _dimensions(space, methods)
    if search == "optuna" and any(d.kind == "grid" for d in dims):
        raise SweepSpecError("search=optuna samples its own points: use choice instead of grid")
    _check_trials(base, dims, methods)
    sweep_dir = raw.get("sweep_dir") or str(Path("runs") / "tune" / name)
    if not isinstance(sweep_dir, str):
        raise SweepSpecError(f"sweep_dir must be a path, got {sweep_dir!r}")
    # Tune repeats a grid num_samples times: a sweep of grids alone runs each point once unless asked otherwise.
    samples = _positive_int(raw, "num_samples", 1 if all(d.kind == "grid" for d in dims) else 8)
    return SweepSpec(name, base, dims, samples, _scheduler(raw.get("scheduler", "asha")),
                     search, _positive_int(raw, "max_concurrent", 1), seed, metric, sweep_dir)


def load_sweep(path: str | Path, overrides: dict | None = None) -> SweepSpec:
    return parse_sweep(read_spec_file(path, SweepSpecError, "sweep spec"), overrides)
