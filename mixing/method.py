"""A method is one object: its knobs, its epoch schedule, its batch rule, its outputs; and the registry.

The trainer never tests a method's name. It asks the method object:
- `Config`: the method's config section (its knobs, defaults and validation);
- what it needs prepared: an out-of-fold table (`uses_out_of_fold`), per-sample state refreshed at epoch
  starts (`uses_sample_state`), training inputs fetched by id (`fetches_inputs_by_id`), the model's
  predictions on the batch (`predicts_in_batch`), fixed clean
  probabilities (`fixed_clean_file`), which label the training stream carries (`label_key`);
- `plan(epoch)`: what happens in that epoch (its schedule, in one small function);
- `batch_rule(context)`: (inputs, labels) -> (inputs, soft targets) for every batch;
- `label_report(...)` and `evaluate(...)`: the rows of label_issues.csv and the summary fields.
Adding a method is one new module that defines a `Method` subclass and decorates it with `@register`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from noisymix.mixing.config import ConfigError, Section
from noisymix.mixing.losses import soft_target_cross_entropy
from noisymix.selection.report import LabelReport

GIVEN, TRUE = "given", "true"
# The modules that register the built-in methods; imported on the first registry lookup.
BUILTIN_MODULES = ("noisymix.mixing.ce", "noisymix.mixing.mixup", "noisymix.mixing.gmm_select",
                   "noisymix.mixing.selectmix", "noisymix.mixing.mixnn", "noisymix.mixing.crossmix")


@dataclass(frozen=True)
class TaskAsk:
    """What one kind of Ray task or actor of a method reserves; `alongside` when it runs while the training
    workers do (so the cluster must hold both at once), not between training segments."""

    what: str
    cpus: float
    gpus: float = 0.0
    alongside: bool = False


@dataclass(frozen=True)
class NeighbourQuery:
    """K global nearest neighbours per sample from the FAISS index actor, and how that index is built."""

    k: int
    metric: str = "ip"
    kind: str = "auto"
    nlist: int = 0
    nprobe: int = 8
    gpu: bool = False
    cpus: float = 0.0
    auto_above: int = 100_000
    budget_s: float = 1200.0


@dataclass(frozen=True)
class EpochPlan:
    """What a method does in one epoch: the phase it trains in; whether the out-of-fold table is (re)built
    before it; whether the per-sample state is refreshed at its start, and if so whether that refresh moves
    the soft targets (with momentum m), keeps the embeddings (L2-normalised or raw) and looks up global
    neighbours."""

    phase: str
    select: bool = False
    refresh: bool = False
    target_momentum: float | None = None
    embeddings: str = ""           # "": not kept, "l2": L2-normalised, "raw"
    neighbours: NeighbourQuery | None = None


@dataclass
class BatchContext:
    """What a batch rule may read: the class count, the out-of-fold table, the per-sample state,
    `fetch_inputs(ids, rng)` for training inputs by id (transformed like the batch), and `predict(inputs)`: the
    model's current probabilities, without gradient (for label guessing)."""

    num_classes: int
    table: object = None
    state: object = None
    fetch_inputs: Callable[[np.ndarray, np.random.Generator], torch.Tensor] | None = None
    predict: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class BatchRule:
    """Base of the batch rules: `phase` is set by the trainer from the epoch's plan; `counts` are summed
    over ranks into the epoch record as samples_<name>."""

    num_classes: int
    phase: str = field(default="", kw_only=True)
    counts: dict = field(default_factory=dict, kw_only=True)

    def batch(self, ids: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch's logits against the targets `batch` made: soft-target cross-entropy."""
        return soft_target_cross_entropy(logits, targets)


@dataclass
class NoKnobs(Section):
    """The section of a method without knobs of its own."""


class Method:
    """Base class of every method; the defaults describe plain training on the given labels."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""          # one line for `noisymix --help`
    detector: ClassVar[str] = ""         # what label_issues.csv's noise_score is, where the method has one
    Config: ClassVar[type[Section]] = NoKnobs
    label_key: ClassVar[str] = GIVEN     # the label the training stream carries: GIVEN, or TRUE (clean bound)
    uses_out_of_fold: ClassVar[bool] = False
    uses_sample_state: ClassVar[bool] = False

    def __init__(self, config: Section | None = None):
        self.config = config if config is not None else self.Config()

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.config == other.config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    @property
    def checkpoint_every(self) -> int:
        """Epochs between checkpoints (methods with large per-sample state may checkpoint less often)."""
        return 1

    def target_codec(self, num_classes: int):
        """How the per-sample soft targets are stored (mixing.soft_targets.TargetCodec); None without state."""
        return None

    @property
    def reports_labels(self) -> bool:
        """Whether the method holds beliefs about each given label (label_issues.csv, detection metrics)."""
        return self.uses_out_of_fold or self.uses_sample_state

    def resolve(self, epochs: int, use_gpu: bool = False) -> None:
        """Fill `auto` knobs that depend on the run's length or its devices (called once, before the run)."""

    def fetches_inputs_by_id(self) -> bool:
        return False

    def predicts_in_batch(self) -> bool:
        """Whether the batch rule asks the model for its predictions on the batch (one extra forward pass)."""
        return False

    def task_resources(self) -> list[TaskAsk]:
        """Each kind of Ray task or actor the method runs besides the workers, so a request the cluster cannot
        place is refused before the run starts."""
        return []

    def fixed_clean_file(self) -> str | None:
        """An out-of-fold table whose GMM gives fixed clean probabilities in place of the loss GMM."""
        return None

    def fixed_clean_probability(self, probs: np.ndarray, given: np.ndarray, seed: int):
        """The fixed clean probabilities (a selection.gmm.CleanProbability) from fixed_clean_file's table."""
        raise NotImplementedError

    def workers_read_probs(self) -> bool:
        """Whether the batch rule reads the out-of-fold table's N x C probabilities (else they stay on the driver)."""
        return False

    def noise_matrix_over(self) -> str | None:
        """Which samples the table's C x C noise transition is estimated over for the batch rule: `kept` (the
        unflagged), `all`, or None (the batch rule reads none)."""
        return None

    def selection_note(self, table) -> str:
        """What the driver's log says of a new mixing table beyond its flags (\"\": nothing)."""
        return ""

    def out_of_fold_file(self) -> str | None:
        """An earlier run's out-of-fold table to use for the first selection instead of training folds."""
        return None

    def plan(self, epoch: int) -> EpochPlan:
        return EpochPlan("train")

    def batch_rule(self, context: BatchContext) -> BatchRule:
        raise NotImplementedError

    def label_report(self, table=None, state=None) -> LabelReport | None:
        """The rows of label_issues.csv from the method's latest beliefs (None: it has none)."""
        return None

    def evaluate(self, report: LabelReport, true: np.ndarray) -> dict:
        """Summary fields scoring the report against true labels (evaluation only)."""
        return {}


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `method=<cls.name>` find this method."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is taken by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def method_names() -> tuple[str, ...]:
    _load_builtins()
    return tuple(sorted(_REGISTRY))


def method_class(name: str) -> type[Method]:
    """The registered method called `name`; an unknown name lists the known ones."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ConfigError(f"method={name!r} is not one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def method_knobs() -> dict[str, tuple[str, ...]]:
    """Each registered method's knob names (its config section's keys)."""
    _load_builtins()
    return {name: cls.Config.keys() for name, cls in _REGISTRY.items()}
