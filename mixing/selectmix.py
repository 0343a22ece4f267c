"""SelectMix (methods.md A): cross-validated selection (A1-A2, its knobs and schedule) and the batch rule
(A3): flagged samples mix with a trusted partner of their predicted class and train on a soft label saying
what was mixed; the others train plainly on their given label.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from noisymix.mixing.config import Section, check_choice, check_epochs_or_auto, check_range
from noisymix.mixing.losses import one_hot
from noisymix.mixing.method import BatchContext, BatchRule, EpochPlan, Method, TaskAsk, register
from noisymix.mixing.mixup import MixupConfig, mix, sample_lambda
from noisymix.selection.flag_rules import FLAG_RULES
from noisymix.selection.report import LabelReport, evaluate_out_of_fold, out_of_fold_report

PARTNER_SOURCES = ("batch", "buffer", "global")
PARTNER_MODES = ("class", "random", "none")
LABEL_MODES = ("mixed", "soft", "hard")
LAMBDA_PER = ("sample", "batch")
FOLD_SELECT = ("best", "last", "ensemble")
# What a fold round after the first trains on: every sample on the labels the round before corrected, or only the
# samples it did not flag, on their given labels (Chen et al., "Understanding and Utilizing Deep Neural Networks
# Trained with Noisy Labels", ICML 2019: iterative noisy cross-validation).
ROUND_TRAINS_ON = {"corrected": "the labels the round before corrected",
                   "kept": "the given labels the round before did not flag"}
FOLD_ROUND_TRAIN = tuple(ROUND_TRAINS_ON)


def selectmix_soft_label(given_part: torch.Tensor, predicted: torch.Tensor, lam: torch.Tensor,
                         num_classes: int) -> torch.Tensor:
    """t~ = lambda * onehot(y_i) + (1 - lambda) * onehot(c_i); given_part may be P[i] (the soft variant)."""
    lam = lam.to(given_part.device, given_part.dtype)[:, None]
    return lam * given_part + (1 - lam) * one_hot(predicted, num_classes).to(given_part.device)


class ClassReservoir:
    """Per-class reservoir of trusted inputs seen in the stream (reservoir sampling, no extra I/O).

    Holds up to `capacity` transformed inputs per class, fewer where `max_bytes` over all classes asks for it
    (at least one each); each class's slots are a uniform sample of every trusted input of that class added
    so far.
    """

    def __init__(self, num_classes: int, capacity: int, max_bytes: int = 0):
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        self.capacity, self.max_bytes = capacity, max_bytes
        self.slots: list[torch.Tensor | None] = [None] * num_classes
        self.filled = np.zeros(num_classes, dtype=np.int64)
        self.seen = np.zeros(num_classes, dtype=np.int64)

    def _fit_capacity(self, inputs: torch.Tensor) -> None:
        """Shrink the per-class capacity so that every class's slots together stay within max_bytes."""
        per_input = inputs[0].numel() * inputs.element_size()
        if self.max_bytes:
            self.capacity = max(1, min(self.capacity, self.max_bytes // (len(self.slots) * per_input)))

    def add(self, inputs: torch.Tensor, classes: np.ndarray, rng: np.random.Generator) -> None:
        if not self.filled.any() and len(inputs):
            self._fit_capacity(inputs)
        for row, c in enumerate(classes):
            if self.slots[c] is None:
                self.slots[c] = inputs.new_empty((self.capacity, *inputs.shape[1:]))
            self.seen[c] += 1
            if self.filled[c] < self.capacity:
                slot = self.filled[c]
                self.filled[c] += 1
            else:
                slot = rng.integers(self.seen[c])
                if slot >= self.capacity:
                    continue
            self.slots[c][slot] = inputs[row].detach()

    def draw(self, classes: np.ndarray, rng: np.random.Generator, like: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """One uniformly drawn stored input per requested class; found[k] is False where a class is empty."""
        out = like.new_zeros((len(classes), *like.shape[1:]))
        found = self.filled[classes] > 0
        for k in np.flatnonzero(found):
            c = classes[k]
            out[k] = self.slots[c][rng.integers(self.filled[c])]
        return out, found


@dataclass
class SelectMixTargets(BatchRule):
    """The SelectMix batch rule over a mixing table (methods.md A3), with its ablations.

    partners: `class` (a trusted partner of c_i: SelectMix), `random` (any partner of the batch:
    Mixup on M only), `none` (no mixing: train on the trusted samples only). label: `mixed`
    (lambda y_i + (1 - lambda) c_i), `soft` (P[i] in place of onehot(y_i)), `hard` (y_i only).
    partner_source: `batch`, `buffer` (ClassReservoir) or `global` (any id of T[c_i], whose inputs
    `fetch_inputs(ids, rng)` returns transformed like the batch).
    """

    uncertain: np.ndarray = None
    predicted: np.ndarray = None
    probs: np.ndarray = None
    pools: list[np.ndarray] = None
    alpha: float = 1.0
    partners: str = "class"
    label: str = "mixed"
    partner_source: str = "buffer"
    lambda_per: str = "sample"
    buffer_size: int = 256
    buffer_bytes: int = 0
    fetch_inputs: Callable[[np.ndarray, np.random.Generator], torch.Tensor] | None = None
    counts: dict = field(default_factory=lambda: {"flagged": 0, "mixed": 0, "no_partner": 0}, kw_only=True)

    def __post_init__(self):
        for name, value, allowed in (("partners", self.partners, PARTNER_MODES), ("label", self.label, LABEL_MODES),
                                     ("partner_source", self.partner_source, PARTNER_SOURCES),
                                     ("lambda_per", self.lambda_per, LAMBDA_PER)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.partner_source == "global" and self.partners == "class" and self.fetch_inputs is None:
            raise ValueError("partner_source=global needs fetch_inputs")
        self.in_pool = np.zeros(len(self.predicted), dtype=bool)
        for pool in self.pools:
            self.in_pool[pool] = True
        # The pools as one id array with per-class offsets, for one vectorised draw per batch.
        self.pool_ids = np.concatenate(self.pools).astype(np.int64) if self.pools else np.empty(0, np.int64)
        self.pool_sizes = np.array([len(p) for p in self.pools], dtype=np.int64)
        self.pool_starts = np.concatenate([[0], np.cumsum(self.pool_sizes)[:-1]]).astype(np.int64)
        self.reservoir = (ClassReservoir(self.num_classes, self.buffer_size, self.buffer_bytes)
                          if self.partner_source == "buffer" else None)

    def batch(self, ids: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ids_np = ids.numpy()
        targets = one_hot(labels, self.num_classes)
        if self.partners == "none":
            # Selection baseline: only trusted samples carry loss (zero targets drop the others).
            keep = torch.from_numpy(self.in_pool[ids_np]).to(targets.device)
            return inputs, targets * keep[:, None]
        trusted_rows = np.flatnonzero(self.in_pool[ids_np])
        if self.reservoir is not None and trusted_rows.size:
            self.reservoir.add(inputs[trusted_rows], self.predicted[ids_np[trusted_rows]], rng)
        rows = np.flatnonzero(self.uncertain[ids_np])
        self.counts["flagged"] += int(rows.size)
        if rows.size == 0:
            return inputs, targets
        lam = sample_lambda(self.alpha, 1 if self.lambda_per == "batch" else rows.size, rng).expand(rows.size)
        rows_t = torch.from_numpy(rows).to(inputs.device)
        if self.partners == "random":
            partner = torch.from_numpy(rng.integers(0, len(ids_np), size=rows.size)).to(inputs.device)
            mixed_x = mix(inputs[rows_t], inputs[partner], lam)
            mixed_t = mix(targets[rows_t], targets[partner], lam)
            found = np.ones(rows.size, dtype=bool)
        else:
            predicted = self.predicted[ids_np[rows]]
            partner_x, found = self._class_partners(ids_np, inputs, trusted_rows, predicted, rng)
            found_t = torch.from_numpy(found).to(inputs.device)[:, None, None, None]
            # No partner of c_i at hand (batch/buffer only): the input stays, the soft label still moves.
            mixed_x = torch.where(found_t, mix(inputs[rows_t], partner_x, lam), inputs[rows_t])
            mixed_t = self._soft_label(ids_np[rows], targets[rows_t], predicted, lam)
        inputs, targets = inputs.clone(), targets.clone()
        inputs[rows_t], targets[rows_t] = mixed_x, mixed_t
        self.counts["mixed"] += int(found.sum())
        self.counts["no_partner"] += int((~found).sum())
        return inputs, targets

    def _soft_label(self, ids: np.ndarray, given_onehot: torch.Tensor, predicted: np.ndarray,
                    lam: torch.Tensor) -> torch.Tensor:
        if self.label == "hard":
            return given_onehot
        given_part = given_onehot
        if self.label == "soft":
            given_part = torch.from_numpy(self.probs[ids]).to(given_onehot.device, given_onehot.dtype)
        return selectmix_soft_label(given_part, torch.from_numpy(predicted), lam, self.num_classes)

    def _class_partners(self, ids: np.ndarray, inputs: torch.Tensor, trusted_rows: np.ndarray, predicted: np.ndarray,
                        rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
        if self.partner_source == "global":
            # Uniform over T[c_i] for every flagged row at once (pools of needed classes are never empty).
            offsets = (rng.random(len(predicted)) * self.pool_sizes[predicted]).astype(np.int64)
            partner_ids = self.pool_ids[self.pool_starts[predicted] + offsets]
            return self.fetch_inputs(partner_ids, rng), np.ones(len(predicted), dtype=bool)
        if self.partner_source == "buffer":
            return self.reservoir.draw(predicted, rng, inputs)
        classes_in_batch = self.predicted[ids[trusted_rows]]
        choice = np.zeros(len(predicted), dtype=np.int64)
        found = np.zeros(len(predicted), dtype=bool)
        for k, c in enumerate(predicted):
            candidates = trusted_rows[classes_in_batch == c]
            if candidates.size:
                choice[k], found[k] = candidates[rng.integers(candidates.size)], True
        return inputs[torch.from_numpy(choice).to(inputs.device)], found


@dataclass
class CrossValConfig(Section):
    """A1-A2's selection stage: K folds trained `fold_epochs` each (predicting from their `best` epoch by
    held-out agreement with the given labels, the `last`, or the `ensemble`: the mean of every epoch's held-out
    probabilities, a temporal ensemble at the cost of `best`), trained with CE on the given labels (the paper)
    or, with `fold_mixup` > 0, with Mixup of that alpha, one Ray task of `fold_cpus`/`fold_gpus` each, in
    `fold_rounds` rounds (each after the first trains on the labels the one before corrected, or, with
    `fold_round_train`=kept, on the given labels of only the samples the one before did not flag), optionally
    re-run every `reselect_every` epochs from the main model; `oof_from` takes an earlier run's
    oof.npz for the first selection instead of training folds; `flag_rule` decides which given labels are
    flagged from the out-of-fold table (selection.flag_rules: `mismatch` is the paper's); tau_low/tau_high are
    the table's thresholds."""

    folds: int = 5
    fold_epochs: int = 2           # -1: a fifth of the run's epochs
    fold_select: str = "best"
    fold_mixup: float = 0.0        # 0: the folds train with CE (the paper); > 0: Mixup Beta(a, a) in the folds
    fold_rounds: int = 1           # > 1: each further round retrains the folds on the labels the last one corrected
    fold_round_train: str = "corrected"   # kept: a further round trains on the unflagged samples' given labels only
    fold_cpus: float = 1.0
    fold_gpus: float = -1.0        # -1: one GPU per fold task when the workers train on GPUs, else none
    fold_retries: int = 2
    reselect_every: int = 0
    oof_from: Optional[str] = None
    flag_rule: str = "mismatch"
    tau_low: float = 0.0
    tau_high: float = 0.0

    def validate(self) -> None:
        super().validate()
        check_choice("fold_select", self.fold_select, FOLD_SELECT)
        check_choice("flag_rule", self.flag_rule, FLAG_RULES)
        check_choice("fold_round_train", self.fold_round_train, FOLD_ROUND_TRAIN)
        for key in ("tau_low", "tau_high"):
            check_range(key, getattr(self, key), 0.0, 1.0)
        check_range("folds", self.folds, 2)
        check_epochs_or_auto("fold_epochs", self.fold_epochs, minimum=1)
        check_range("fold_cpus", self.fold_cpus, 0, None, lo_open=True)
        check_range("fold_mixup", self.fold_mixup, 0.0)
        check_range("fold_rounds", self.fold_rounds, 1)
        for key in ("fold_retries", "reselect_every"):
            check_range(key, getattr(self, key), 0)
        if self.fold_gpus != -1:
            check_range("fold_gpus", self.fold_gpus, 0.0)

    def resolve(self, use_gpu: bool, epochs: int) -> None:
        if self.fold_gpus == -1:
            self.fold_gpus = 1.0 if use_gpu else 0.0
        if self.fold_epochs == -1:
            self.fold_epochs = max(1, round(epochs / 5))

    def selects_at(self, epoch: int) -> bool:
        """The table is built before epoch 0 and rebuilt every `reselect_every` epochs."""
        return epoch == 0 or (self.reselect_every > 0 and epoch % self.reselect_every == 0)


@dataclass
class SelectMixConfig(CrossValConfig, MixupConfig):
    """A3's batch rule with its ablations (see SelectMixTargets)."""

    partners: str = "class"
    partner_source: str = "buffer"
    selectmix_label: str = "mixed"
    lambda_per: str = "sample"
    buffer_size: int = 256
    buffer_bytes: int = 2**28      # the reservoir's cap over all classes (256 MiB): fewer slots for large inputs

    def validate(self) -> None:
        super().validate()
        check_choice("partners", self.partners, PARTNER_MODES)
        check_choice("partner_source", self.partner_source, PARTNER_SOURCES)
        check_choice("selectmix_label", self.selectmix_label, LABEL_MODES)
        check_choice("lambda_per", self.lambda_per, LAMBDA_PER)
        check_range("buffer_size", self.buffer_size, 0, None, lo_open=True)
        check_range("buffer_bytes", self.buffer_bytes, 0)


class OutOfFoldMethod(Method):
    """Shared by the methods whose beliefs are the out-of-fold table (A1-A2): its folds, the earlier run's table
    they may read instead, the epochs it is (re)built before, and label_issues.csv from it."""

    Config = CrossValConfig
    detector = "1 - out-of-fold P[given label]"
    uses_out_of_fold = True

    def resolve(self, epochs: int, use_gpu: bool = False) -> None:
        self.config.resolve(use_gpu, epochs)

    def task_resources(self) -> list[TaskAsk]:
        c = self.config
        return [] if c.oof_from and not c.reselect_every and c.fold_rounds == 1 else [
            TaskAsk(f"a fold task (fold_cpus={c.fold_cpus:g}, fold_gpus={c.fold_gpus:g})", c.fold_cpus, c.fold_gpus)]

    def out_of_fold_file(self) -> str | None:
        return self.config.oof_from

    def plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(self.name, select=self.config.selects_at(epoch))

    def label_report(self, table=None, state=None) -> LabelReport | None:
        if table is None:
            return None
        return out_of_fold_report(table.probs, table.given, table.predicted, table.confidence, table.uncertain)

    def evaluate(self, report: LabelReport, true: np.ndarray) -> dict:
        return evaluate_out_of_fold(report, true)


@register
class SelectMix(OutOfFoldMethod):
    name = "selectmix"
    summary = "SelectMix: K-fold flags, then mix each flagged sample with a trusted one of its predicted class"
    Config = SelectMixConfig

    def fetches_inputs_by_id(self) -> bool:
        return self.config.partner_source == "global" and self.config.partners == "class"

    def workers_read_probs(self) -> bool:
        return self.config.selectmix_label == "soft"

    def batch_rule(self, context: BatchContext) -> BatchRule:
        c, table = self.config, context.table
        return SelectMixTargets(context.num_classes, table.uncertain, table.predicted, table.probs, table.pools,
                                alpha=c.alpha, partners=c.partners, label=c.selectmix_label,
                                partner_source=c.partner_source, lambda_per=c.lambda_per,
                                buffer_size=c.buffer_size, buffer_bytes=c.buffer_bytes,
                                fetch_inputs=context.fetch_inputs)
