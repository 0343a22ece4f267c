"""A benchmark spec: noise settings x methods x seeds (plus a clean bound and throughput cells), validated
into the list of cells it runs before any cell starts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from noisymix.distributed import storage
from noisymix.launch.config import Config, ConfigError, build_config, computed_values, with_defaults

SPEC_KEYS = ("name", "base", "settings", "methods", "clean_bound", "curves", "throughput")
SOURCES_WITH_PATH = ("idx", "cifar", "image_list")


class SpecError(ValueError):
    """A benchmark spec that cannot run; the message names the offending part."""


@dataclass(frozen=True)
class Cell:
    """One training run of the matrix. `overrides` is everything but where it runs."""

    id: str              # e.g. "symmetric40/mixnn/seed0"
    group: str           # "matrix", "clean" or "throughput"
    setting: str
    method: str          # the spec's label for the method variant
    seed: int
    overrides: dict = field(hash=False)

    @property
    def dirname(self) -> str:
        return self.id.replace("/", "-")

    def config(self, work: Path | str) -> Config:
        """The cell's resolved config, with its data and run directories under `work` (a folder or a URL)."""
        data = f"{self.setting}-seed{self.seed}" if self.group != "clean" else f"clean-seed{self.seed}"
        return build_config(overrides={**self.overrides, "data_dir": storage.join(work, "data", data),
                                       "run_dir": storage.join(work, "cells", self.dirname, "run")})


def same_computation(recorded: dict, config: Config) -> bool:
    """Whether a cell recorded with config `recorded` computed what `config` asks for now. A key added to
    Config after the cell ran counts as unchanged while it holds its default (a new knob keeps old behaviour)."""
    return computed_values(with_defaults(recorded)) == computed_values(config.to_dict())


@dataclass
class Spec:
    name: str
    cells: list[Cell]
    settings: dict[str, dict]
    methods: list[str]
    curves: dict
    base: dict


def _mapping(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise SpecError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def _seeds(value, where: str) -> list[int]:
    seeds = [0] if value is None else value
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SpecError(f"{where}.seeds must be a non-empty list of integers, got {value!r}")
    return seeds


def _placed(values: dict, setting: str, seed: int) -> dict:
    """String values with `{setting}` and `{seed}` filled in: per-cell files such as an oof_from table."""
    return {k: v.replace("{setting}", setting).replace("{seed}", str(seed)) if isinstance(v, str) else v
            for k, v in values.items()}


def _check_config(cell: Cell) -> None:
    """Build the cell's config now, so an unknown method, noise type or dataset stops the spec before any run."""
    try:
        config = build_config(overrides=cell.overrides)
    except ConfigError as exc:
        raise SpecError(f"cell {cell.id}: {exc}") from exc
    data = config.data
    if data.source in SOURCES_WITH_PATH and not (data.source_path and Path(data.source_path).exists()):
        raise SpecError(f"cell {cell.id}: dataset source_path {data.source_path!r} does not exist "
                        f"(relative paths are read from the current directory, {Path.cwd()})")


def spec_name(raw: dict, keys: tuple[str, ...], error: type[Exception]) -> str:
    """A spec's name, after refusing keys it does not know; the name must be usable as a file name."""
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise error(f"unknown spec key(s): {', '.join(unknown)} (known: {', '.join(keys)})")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise error(f"name must be a file-name-safe string, got {name!r}")
    return name


def parse_spec(raw: dict) -> Spec:
    """Validate a spec mapping and expand it into cells: seed-major, settings and methods in spec order."""
    raw = _mapping(raw, "the spec")
    name = spec_name(raw, SPEC_KEYS, SpecError)
    base = _mapping(raw.get("base", {}), "base")
    settings = _mapping(raw.get("settings"), "settings")
    methods = _mapping(raw.get("methods"), "methods")
    if not settings or not methods:
        raise SpecError("a spec needs at least one setting and one method")

    setting_seeds, setting_values = {}, {}
    for label, values in settings.items():
        values = dict(_mapping(values, f"settings.{label}"))
        setting_seeds[label] = _seeds(values.pop("seeds", None), f"settings.{label}")
        if "noise_type" not in values or "noise_rate" not in values:
            raise SpecError(f"settings.{label} needs noise_type and noise_rate")
        setting_values[label] = values
    method_values, method_settings, method_seeds = {}, {}, {}
    for label, values in methods.items():
        values = dict(_mapping(values, f"methods.{label}"))
        if "method" not in values:
            raise SpecError(f"methods.{label} needs a `method` key")
        only = values.pop("settings", list(settings))
        missing = [s for s in only if s not in settings] if isinstance(only, list) else [only]
        if missing:
            raise SpecError(f"methods.{label}.settings names unknown setting(s) {missing}")
        method_seeds[label] = None if "seeds" not in values else _seeds(values.pop("seeds"), f"methods.{label}")
        method_values[label], method_settings[label] = values, only
    if "ce" not in method_values or method_values["ce"].get("method") != "ce":
        raise SpecError("methods must include `ce: {method: ce}`: every ratio in the report is against it")

    cells: list[Cell] = []
    clean = raw.get("clean_bound", {"method": "ce", "noise_type": "none", "noise_rate": 0.0})
    all_seeds = sorted({s for seeds in setting_seeds.values() for s in seeds})
    for seed in all_seeds:
        if clean is not None:
            overrides = {**base, **_mapping(clean, "clean_bound"), "seed": seed}
            cells.append(Cell(f"clean/clean/seed{seed}", "clean", "clean", "clean", seed, overrides))
        for setting, seeds in setting_seeds.items():
            if seed not in seeds:
                continue
            for label in method_values:
                if setting in method_settings[label] and (method_seeds[label] is None or seed in method_seeds[label]):
                    overrides = _placed({**base, **setting_values[setting], **method_values[label], "seed": seed},
                                        setting, seed)
                    cells.append(Cell(f"{setting}/{label}/seed{seed}", "matrix", setting, label, seed, overrides))

    throughput = raw.get("throughput")
    if throughput is not None:
        throughput = _mapping(throughput, "throughput")
        setting, seed = throughput.get("setting"), throughput.get("seed", 0)
        if setting not in settings:
            raise SpecError(f"throughput.setting {setting!r} is not one of the settings")
        shared = _mapping(throughput.get("overrides", {}), "throughput.overrides")
        for label, values in _mapping(throughput.get("cells"), "throughput.cells").items():
            overrides = {**base, **setting_values[setting], **shared, **_mapping(values, f"throughput.cells.{label}"),
                         "seed": seed}
            cells.append(Cell(f"throughput/{label}/seed{seed}", "throughput", setting, label, seed, overrides))

    curves = _mapping(raw.get("curves", {}), "curves")
    curves = {"setting": curves.get("setting", next(iter(settings))), "seed": curves.get("seed", all_seeds[0])}
    if curves["setting"] not in settings:
        raise SpecError(f"curves.setting {curves['setting']!r} is not one of the settings")
    for cell in cells:
        _check_config(cell)
    return Spec(name, cells, setting_values, list(method_values), curves, base)


def read_spec_file(path: str | Path, error: type[Exception] = SpecError, what: str = "spec"):
    """A spec file's YAML; a missing file or invalid YAML is `error`, naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise error(f"{what} {path} is not valid YAML: {exc}") from exc


def load_spec(path: str | Path) -> Spec:
    return parse_spec(read_spec_file(path))
