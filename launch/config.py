"""The one config object of a run: typed sections composed from defaults, a YAML recipe and `key=value`
overrides, validated, resolved and saved.

Every key is flat (`lr=0.1`, `knn=2`) and belongs to exactly one section: the run's own (method, seed,
run_dir), the data (launch.prepare), training (distributed.engine), resources (distributed.runner), audits
(distributed.worker), and the chosen method's knobs (its Config in mixing/). Knobs of another registered
method are accepted and set aside (`ignored`), so one recipe can serve several methods.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass, field
from typing import Optional
from pathlib import Path

import yaml

from noisymix.distributed.engine import TrainSection
from noisymix.distributed.settings import AuditSection, ResourcesSection
from noisymix.launch.prepare import RETIRED_DATA_KEYS, DataSection
from noisymix.mixing.config import ConfigError, Section, check_choice
from noisymix.mixing.method import Method, method_class, method_knobs

__all__ = ["Config", "ConfigError", "RunSection", "build_config", "config_from_record", "parse_overrides",
           "computed_values", "with_defaults"]


TRACKERS = ("tensorboard", "mlflow")


@dataclass
class RunSection(Section):
    """The run itself: which method, the seed of everything random, where its directory goes, and where else its
    records go (TensorBoard files in the run directory always; `tracking=mlflow` also logs to MLflow's
    `tracking_uri`, default a local SQLite store `./mlflow.db`)."""

    method: str = "selectmix"
    seed: int = 0
    run_dir: str = "auto"
    tracking: str = "tensorboard"
    tracking_uri: Optional[str] = None

    def validate(self) -> None:
        super().validate()
        method_class(self.method)
        check_choice("tracking", self.tracking, TRACKERS)
        if self.tracking == "mlflow" and importlib.util.find_spec("mlflow") is None:
            raise ConfigError("tracking=mlflow needs MLflow: pip install -e '.[mlflow]' (or mlflow-skinny)")


# The sections every run has, in the order config.yaml lists their keys; the method's knobs follow `data`
# and `train`.
SECTIONS = {"run": RunSection, "data": DataSection, "train": TrainSection, "resources": ResourcesSection,
            "audit": AuditSection}
# Keys that say where a run lives or how it talks to Ray, not what it computes.
# Where things run, not what they compute (the index actor's CPUs, GPU and time budget included).
PLACEMENT_KEYS = ("run_dir", "data_dir", "ray_address", "ray_logs", "index_cpus", "index_gpu", "index_budget_s",
                  "tracking", "tracking_uri")
# Keys added with a default that changed behaviour: the value that reproduces what runs recorded before
# the key existed computed (their fold models predicted after their last epoch).
BEFORE_KEY_EXISTED = {"selectmix": {"fold_select": "last"}}


@dataclass
class Config:
    """A run's typed sections; `method` is the method object, holding its own section as `.config`."""

    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    method: Method = None
    resources: ResourcesSection = field(default_factory=ResourcesSection)
    audit: AuditSection = field(default_factory=AuditSection)
    ignored: tuple[str, ...] = ()  # other methods' knobs that were given and set aside

    def __post_init__(self):
        if self.method is None:
            self.method = method_class(self.run.method)()

    def to_dict(self) -> dict:
        """Every key flat, as config.yaml holds it and `key=value` sets it."""
        return {**self.run.to_dict(), **self.data.to_dict(), **self.train.to_dict(), **self.method.config.to_dict(),
                **self.resources.to_dict(), **self.audit.to_dict()}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def resolve(self) -> "Config":
        """Fill the `auto` values: data_dir from the data spec, loader workers and the method's shares of the
        run and of the devices, run_dir from method, data and time; then check what spans sections."""
        self.data.resolve(self.run.seed)
        self.resources.resolve(self.data.num_shards)
        self.method.resolve(self.train.epochs, self.resources.use_gpu)
        readers = self.resources.num_workers * max(1, self.resources.loader_workers)
        if self.data.num_shards < readers:
            raise ConfigError(f"num_shards={self.data.num_shards} cannot feed num_workers x loader_workers = "
                              f"{readers} readers; raise num_shards")
        if self.run.run_dir == "auto":
            d = self.data
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self.run.run_dir = str(Path("runs") / f"{self.run.method}-{d.dataset}-{d.noise_type}"
                                   f"{round(d.noise_rate * 100)}-{stamp}")
        return self


def _route(values: dict) -> tuple[dict[str, dict], dict, tuple[str, ...]]:
    """Split flat values into (per-section values, the method's knobs, other methods' knobs set aside)."""
    owner = {key: name for name, section in SECTIONS.items() for key in section.keys()}
    method = values.get("method", RunSection.method)
    if not isinstance(method, str):
        raise ConfigError(f"method must be str, got {method!r}")
    own = set(method_class(method).Config.keys())
    others = {key for keys in method_knobs().values() for key in keys} - own
    sections: dict[str, dict] = {name: {} for name in SECTIONS}
    knobs, ignored, unknown = {}, [], []
    for key, value in values.items():
        if key in RETIRED_DATA_KEYS:
            raise ConfigError(f"{key} is retired: image lists keep their aspect ratio, stored with shorter side "
                              "stored_size, and train on crops of crop_size")
        if key in owner:
            sections[owner[key]][key] = value
        elif key in own:
            knobs[key] = value
        elif key in others:
            ignored.append(key)
        else:
            unknown.append(key)
    if unknown:
        known = sorted({*owner, *own, *others})
        raise ConfigError(f"unknown config key(s): {', '.join(sorted(unknown))} (known keys: {', '.join(known)})")
    return sections, knobs, tuple(ignored)


def config_from_values(values: dict) -> Config:
    """A Config from flat values, each section validated (not yet resolved); missing keys keep their defaults."""
    sections, knobs, ignored = _route(values)
    typed = {name: SECTIONS[name].from_values(sections[name]) for name in SECTIONS}
    cls = method_class(typed["run"].method)
    method = cls(cls.Config.from_values(knobs))
    return Config(**typed, method=method, ignored=ignored)


def parse_overrides(pairs: list[str]) -> dict:
    """`key=value` strings to a dict; values parse as YAML (numbers, booleans, lists, maps)."""
    overrides = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {pair!r} is not key=value")
        try:
            overrides[key.strip()] = _number_or(yaml.safe_load(raw)) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {pair!r}: value does not parse: {exc}") from exc
    return overrides


def _number_or(value):
    """YAML 1.1 reads 1e-3 and 1e30 as strings (it wants 1.0e-3); a shell user means numbers."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def read_recipe(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must be a mapping of keys to values")
    return loaded


def build_config(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Defaults <- YAML recipe <- overrides, validated and resolved. Unknown keys are errors."""
    values = read_recipe(path) if path is not None else {}
    values.update(overrides or {})
    return config_from_values(values).resolve()


def with_defaults(recorded: dict) -> dict:
    """Values saved by an older version, with every key added since at the value that keeps the old
    behaviour (its default, or BEFORE_KEY_EXISTED), so what was computed then still counts as computed with it."""
    method = recorded.get("method", RunSection.method)
    defaults = Config(run=RunSection(method=method)).to_dict()
    kept = {k: v for k, v in recorded.items() if k not in RETIRED_DATA_KEYS}
    return {**defaults, **BEFORE_KEY_EXISTED.get(method, {}), **kept}


def config_from_record(recorded: dict) -> Config:
    """The Config of a run directory's config.yaml, from this version or an older one (which saved every
    method's knobs: the others are set aside). Its values were resolved when it was saved."""
    return config_from_values(with_defaults(recorded)).resolve()


def computed_values(values: dict) -> dict:
    """Every resolved value that decides what a run computes, JSON-normalised: placement and the knobs of
    other methods are left out; a key no section knows stays, so a run made with it never matches."""
    method = values.get("method", RunSection.method)
    own = set(method_class(method).Config.keys())
    others = {key for keys in method_knobs().values() for key in keys} - own
    skip = set(PLACEMENT_KEYS) | others
    return json.loads(json.dumps({k: v for k, v in values.items() if k not in skip}, default=str))


def changed_settings(recorded: dict, config: Config) -> list[str]:
    """The keys whose values differ between a run's recorded config and `config`, besides where it runs and
    on what (placement, resources, audits): what may not change when a run is resumed."""
    free = set(ResourcesSection.keys()) | set(AuditSection.keys())
    before, now = computed_values(with_defaults(recorded)), computed_values(config.to_dict())
    return sorted(k for k in set(before) | set(now) if k not in free and before.get(k) != now.get(k))
