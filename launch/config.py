"""The one config object of a run: defaults, YAML recipe, `key=value` overrides, validation, saving."""

from __future__ import annotations

import dataclasses
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from noisymix.launch.noise import NOISE_TYPES
from noisymix.mixing.mixnn import NEIGHBOUR_SOURCES
from noisymix.mixing.selectmix import LABEL_MODES, PARTNER_MODES, PARTNER_SOURCES
from noisymix.launch.sources import SOURCES

METHODS = ("ce", "mixup", "clean", "selectmix", "mixnn", "gmm_select")
MODELS = ("auto", "small_cnn", "preact_resnet18")
SCHEDULES = ("cosine", "multistep")


# Knobs read only by some methods: a change to them leaves every other method's runs as they were.
SELECTMIX_KNOBS = ("folds", "fold_epochs", "fold_select", "fold_cpus", "fold_gpus", "fold_retries", "tau_low", "tau_high", "partners",
                   "partner_source", "selectmix_label", "lambda_per", "buffer_size", "reselect_every", "oof_from")
GMM_KNOBS = ("warmup", "loss_window", "gmm_max_iter", "gmm_tol", "gmm_reg_covar", "gmm_threshold", "clean_from")
MIXNN_KNOBS = (*GMM_KNOBS, "es", "update_every", "soft_momentum", "knn", "weight_eps", "neighbour_source",
               "normalise_embeddings", "index_metric", "index_kind", "index_nlist", "index_nprobe", "index_gpu")
METHOD_KNOBS = {"selectmix": SELECTMIX_KNOBS, "mixnn": MIXNN_KNOBS, "gmm_select": GMM_KNOBS}


def unused_knobs(method: str) -> set[str]:
    """The config keys that `method` never reads."""
    return {key for other, keys in METHOD_KNOBS.items() if other != method for key in keys} - set(
        METHOD_KNOBS.get(method, ()))


class ConfigError(ValueError):
    """A config key that does not exist, or a value it cannot take."""


@dataclass
class Config:
    """Every knob of a run. `auto` values are resolved by `resolve()` and saved resolved."""

    # data: what `prepare` writes
    source: str = "digits"
    source_path: typing.Optional[str] = None
    dataset: str = ""
    train_subset: int = 0          # use this many of the source's training samples (stratified, seeded); 0 = all
    image_size: int = 32
    noise_type: str = "symmetric"
    noise_rate: float = 0.4
    noise_map: typing.Optional[dict] = None
    noise_file: typing.Optional[str] = None
    noise_file_key: typing.Optional[str] = None
    seed: int = 0
    val_fraction: float = 0.1
    num_shards: int = 8
    data_dir: str = "auto"
    # method and model
    method: str = "selectmix"
    alpha: float = 1.0
    model: str = "auto"
    width: int = 0
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: list = field(default_factory=list)
    gamma: float = 0.1
    crop_padding: int = -1
    hflip: bool = False
    amp: bool = False
    # SelectMix (docs/methods.md A): the fold stage, the table thresholds, the batch rule
    folds: int = 5
    fold_epochs: int = 2
    fold_select: str = "best"      # which fold epoch predicts: `best` held-out agreement with the given labels, or `last`
    fold_cpus: float = 1.0
    fold_gpus: float = 0.0
    fold_retries: int = 2
    tau_low: float = 0.0
    tau_high: float = 0.0
    partners: str = "class"
    partner_source: str = "buffer"
    selectmix_label: str = "mixed"
    lambda_per: str = "sample"
    buffer_size: int = 256
    reselect_every: int = 0
    oof_from: typing.Optional[str] = None  # an earlier run's oof.npz: its out-of-fold P instead of training folds
    # MixNN and GMM selection (docs/methods.md B, C); -1 epochs = the paper's share of `epochs`
    warmup: int = -1
    es: int = -1
    update_every: int = -1
    soft_momentum: float = 0.9
    knn: int = 1
    weight_eps: float = 1e-3
    neighbour_source: str = "global"   # better than "batch" on all three settings of benchmarks/fashion_mnist.yaml
    normalise_embeddings: bool = True
    index_metric: str = "ip"
    index_kind: str = "flat"
    index_nlist: int = 0          # IVF lists; 0 = sqrt(N)
    index_nprobe: int = 8         # IVF lists searched per query
    index_gpu: bool = True
    loss_window: int = 1
    gmm_max_iter: int = 10
    gmm_tol: float = 1e-2
    gmm_reg_covar: float = 5e-4
    gmm_threshold: float = 0.5
    clean_from: typing.Optional[str] = None  # an earlier run's oof.npz: the GMM on its losses -log P[i, y_i] gives w
    # execution
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 0.0
    loader_workers: int = 0
    shuffle_buffer: int = 2000
    max_failures: int = 1
    ray_address: typing.Optional[str] = None
    ray_logs: bool = False
    audit_ids: bool = False
    audit_state: bool = False
    run_dir: str = "auto"

    def resolve(self) -> "Config":
        """Fill the `auto` values: data_dir from the data spec, run_dir from method and time."""
        if not self.dataset:
            self.dataset = self.source if self.source in ("digits", "cifar") else Path(self.source_path or self.source).name
        if self.data_dir == "auto":
            rate = f"{round(self.noise_rate * 100):d}"
            subset = f"-n{self.train_subset}" if self.train_subset else ""
            self.data_dir = str(Path("data") / f"{self.dataset}{subset}-{self.noise_type}{rate}-seed{self.seed}")
        # The authors' schedule is warm-up 10, es 60, updates every 10 of 300 epochs (methods.md B).
        if self.warmup == -1:
            self.warmup = max(1, round(self.epochs / 30))
        if self.es == -1:
            self.es = max(self.warmup, round(self.epochs / 5))
        if self.update_every == -1:
            self.update_every = max(1, round(self.epochs / 30))
        if self.es < self.warmup:
            raise ConfigError(f"es={self.es} must not come before warmup={self.warmup}")
        if self.run_dir == "auto":
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self.run_dir = str(Path("runs") / f"{self.method}-{self.dataset}-{self.noise_type}{round(self.noise_rate * 100)}-{stamp}")
        return self

    def validate(self) -> "Config":
        """Check every value; the message names the key."""
        _choice("source", self.source, SOURCES)
        _choice("noise_type", self.noise_type, NOISE_TYPES)
        _choice("method", self.method, METHODS)
        _choice("model", self.model, MODELS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("partners", self.partners, PARTNER_MODES)
        _choice("partner_source", self.partner_source, PARTNER_SOURCES)
        _choice("selectmix_label", self.selectmix_label, LABEL_MODES)
        _choice("lambda_per", self.lambda_per, ("sample", "batch"))
        _choice("fold_select", self.fold_select, ("best", "last"))
        _choice("neighbour_source", self.neighbour_source, NEIGHBOUR_SOURCES)
        _choice("index_metric", self.index_metric, ("ip", "l2"))
        _choice("index_kind", self.index_kind, ("flat", "ivf"))
        _range("soft_momentum", self.soft_momentum, 0.0, 1.0, hi_open=True)
        _range("gmm_threshold", self.gmm_threshold, 0.0, 1.0)
        _range("weight_eps", self.weight_eps, 0.0, None, lo_open=True)
        _range("index_nlist", self.index_nlist, 0, None)
        for key in ("knn", "loss_window", "gmm_max_iter", "index_nprobe"):
            _range(key, getattr(self, key), 1, None)
        _range("gmm_tol", self.gmm_tol, 0.0, None, lo_open=True)
        _range("gmm_reg_covar", self.gmm_reg_covar, 0.0, None)
        for key in ("warmup", "es", "update_every"):
            if getattr(self, key) < -1 or (key == "update_every" and getattr(self, key) == 0):
                raise ConfigError(f"{key} must be -1 (auto) or a number of epochs{' >= 1' if key == 'update_every' else ''}")
        _range("noise_rate", self.noise_rate, 0.0, 1.0, hi_open=True)
        _range("tau_low", self.tau_low, 0.0, 1.0)
        _range("tau_high", self.tau_high, 0.0, 1.0)
        _range("folds", self.folds, 2, None)
        for key in ("fold_epochs", "buffer_size", "fold_cpus"):
            _range(key, getattr(self, key), 0, None, lo_open=True)
        for key in ("fold_gpus", "fold_retries", "reselect_every"):
            _range(key, getattr(self, key), 0, None)
        _range("val_fraction", self.val_fraction, 0.0, 0.5, lo_open=True)
        _range("momentum", self.momentum, 0.0, 1.0, hi_open=True)
        _range("gamma", self.gamma, 0.0, 1.0, lo_open=True)
        for key in ("image_size", "num_shards", "epochs", "batch_size", "num_workers"):
            _range(key, getattr(self, key), 1, None)
        for key in ("train_subset", "width", "loader_workers", "max_failures", "shuffle_buffer", "cpus_per_worker", "weight_decay"):
            _range(key, getattr(self, key), 0, None)
        _range("lr", self.lr, 0.0, None, lo_open=True)
        _range("alpha", self.alpha, 0.0, None, lo_open=True)
        if self.crop_padding < -1:
            raise ConfigError(f"crop_padding must be -1 (auto) or >= 0, got {self.crop_padding}")
        if self.noise_type == "none" and self.noise_rate != 0:
            raise ConfigError(f"noise_type=none needs noise_rate=0, got {self.noise_rate}")
        if self.noise_type == "file" and not self.noise_file:
            raise ConfigError("noise_type=file needs noise_file")
        if self.noise_map is not None:
            try:
                self.noise_map = {int(k): int(v) for k, v in self.noise_map.items()}
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"noise_map must map class ids to class ids, got {self.noise_map!r}") from exc
        if not all(isinstance(m, int) and m > 0 for m in self.milestones) or self.milestones != sorted(self.milestones):
            raise ConfigError(f"milestones must be increasing positive epochs, got {self.milestones!r}")
        if self.num_shards < self.num_workers * max(1, self.loader_workers):
            raise ConfigError(f"num_shards={self.num_shards} cannot feed num_workers x loader_workers = "
                              f"{self.num_workers * max(1, self.loader_workers)} readers; raise num_shards")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# Keys added with a default that changed behaviour: the value that reproduces what runs recorded
# before the key existed computed (their fold models predicted after their last epoch).
BEFORE_KEY_EXISTED = {"fold_select": "last"}


def with_defaults(recorded: dict) -> dict:
    """Values saved by an older version, with every key added since at the value that keeps the old
    behaviour (its default, or BEFORE_KEY_EXISTED), so what was computed then still counts as computed with it."""
    return {**Config().to_dict(), **BEFORE_KEY_EXISTED, **recorded}


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")


def _range(key: str, value, lo, hi, lo_open: bool = False, hi_open: bool = False) -> None:
    below = value <= lo if lo_open else value < lo
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if below or above:
        lo_b, hi_b = "(" if lo_open else "[", ")" if hi_open or hi is None else "]"
        raise ConfigError(f"{key}={value!r} is outside {lo_b}{lo}, {'inf' if hi is None else hi}{hi_b}")


_HINTS = typing.get_type_hints(Config)


def _coerce(key: str, value):
    """Check a value against the field's type; ints are accepted where floats are expected."""
    hint = _HINTS[key]
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} cannot be null")
    base = typing.get_args(hint)[0] if optional else hint
    base = typing.get_origin(base) or base
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {base.__name__}, got {value!r} ({type(value).__name__})")
    return value


def parse_overrides(pairs: list[str]) -> dict:
    """`key=value` strings to a dict; values parse as YAML (numbers, booleans, lists, maps)."""
    overrides = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {pair!r} is not key=value")
        try:
            overrides[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {pair!r}: value does not parse: {exc}") from exc
    return overrides


def build_config(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Defaults <- YAML recipe <- overrides, validated. Unknown keys are errors."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must be a mapping of keys to values")
        values.update(loaded)
    values.update(overrides or {})
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)} (known keys: {', '.join(sorted(known))})")
    config = Config(**{key: _coerce(key, value) for key, value in values.items()})
    return config.validate().resolve()
