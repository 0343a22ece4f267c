"""CrossMix (docs/crossmix.md, ours): SelectMix's cross-validated detection with the flagged samples treated
as UNLABELED (DivideMix's insight) instead of as wrongly labeled: a flagged sample's given label is dropped
and replaced by a sharpened guess (the out-of-fold prediction, the main model's, or their mean), and every
sample of the batch is mixed MixMatch-style with a random partner, its own part dominant. Optionally the kept
labels' loss is forward-corrected through the noise the out-of-fold table estimates among them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from noisymix.mixing.config import ConfigError, check_choice, check_range
from noisymix.mixing.losses import forward_corrected_cross_entropy, one_hot
from noisymix.mixing.method import BatchContext, BatchRule, register
from noisymix.mixing.mixup import MixupConfig, mix, sample_lambda
from noisymix.mixing.selectmix import CrossValConfig, OutOfFoldMethod
from noisymix.selection.confident_learning import least_separated, row_separation

GUESSES = ("oof", "model", "mean", "none")
CORRECTIONS = ("none", "forward", "auto")


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """q = p^(1/T) / sum_c p_c^(1/T): T < 1 moves mass to the likeliest classes (MixMatch's guess sharpening)."""
    if not 0 < temperature <= 1:
        raise ValueError(f"sharpening temperature must be in (0, 1], got {temperature}")
    powered = probs.clamp_min(0).pow(1.0 / temperature)
    return powered / powered.sum(dim=1, keepdim=True).clamp_min(torch.finfo(powered.dtype).tiny)


def label_guess(oof: torch.Tensor | None, model: torch.Tensor | None) -> torch.Tensor:
    """g_i: the out-of-fold prediction P[i], the main model's current p_i, or their mean where both are given."""
    if oof is None and model is None:
        raise ValueError("a label guess needs the out-of-fold or the model's prediction")
    if oof is None or model is None:
        return oof if model is None else model
    return (oof + model) / 2


def dominant_lambda(lam: torch.Tensor) -> torch.Tensor:
    """lambda' = max(lambda, 1 - lambda): each mixed row stays mostly its own sample (MixMatch)."""
    return torch.maximum(lam, 1 - lam)


@dataclass
class CrossMixTargets(BatchRule):
    """CrossMix's batch rule (docs/crossmix.md H2-H3) over the out-of-fold table's flags and probabilities.

    Trusted rows keep onehot(y_i); flagged rows get w_u * sharpen(g_i, T) where its top class reaches
    `threshold`, else (and always with `guess=none`) a zero target: dropped, and never a partner. Then every row
    i is mixed with a random partner j among the rows that are not dropped: x = l' x_i + (1 - l') x_j,
    t = l' t_i + (1 - l') t_j, l' = max(l, 1 - l), l ~ Beta(alpha, alpha) per row. `predict(inputs)` gives the
    main model's probabilities (guess model/mean). counts: flagged rows, and those that kept a guess.
    With a `transition` T (C x C, P(given | true)) the loss is forward-corrected: -sum_k t_k log (p T)_k.
    With `close_pairs` (C x C bool) and `predicted` (the table's c_i), a flag whose given label y and predicted class
    c have close_pairs[y, c] is not dropped: the row keeps its label.
    """

    uncertain: np.ndarray = None
    probs: np.ndarray | None = None
    guess: str = "mean"
    temperature: float = 0.5
    flagged_weight: float = 1.0
    threshold: float = 0.0
    alpha: float = 1.0
    predict: Callable[[torch.Tensor], torch.Tensor] | None = None
    transition: np.ndarray | None = None
    predicted: np.ndarray | None = None
    close_pairs: np.ndarray | None = None
    counts: dict = field(default_factory=lambda: {"flagged": 0, "guessed": 0}, kw_only=True)

    def __post_init__(self):
        check_choice("guess", self.guess, GUESSES)
        if self.guess in ("oof", "mean") and self.probs is None:
            raise ValueError(f"guess={self.guess} needs the out-of-fold probabilities")
        if self.guess in ("model", "mean") and self.predict is None:
            raise ValueError(f"guess={self.guess} needs the model's predictions (predict)")
        if self.alpha <= 0 or self.flagged_weight < 0 or not 0 <= self.threshold <= 1:
            raise ValueError(f"alpha must be > 0, flagged_weight >= 0 and threshold in [0, 1], got {self.alpha}, "
                             f"{self.flagged_weight}, {self.threshold}")
        sharpen(torch.ones(1, 2), self.temperature)   # refuses a temperature outside (0, 1] now, not mid-epoch
        if self.transition is not None:
            if self.guess != "none":
                raise ValueError("a forward-corrected loss reads every target as a given label: it needs guess=none "
                                 f"(a guess is a distribution over true classes), got guess={self.guess}")
            if self.transition.shape != (self.num_classes, self.num_classes):
                raise ValueError(f"noise transition of shape {self.transition.shape} for {self.num_classes} classes")
            self._transition = torch.from_numpy(np.asarray(self.transition, dtype=np.float32))
        if self.close_pairs is not None:
            if self.predicted is None or self.close_pairs.shape != (self.num_classes, self.num_classes):
                raise ValueError(f"close_pairs needs the predicted classes and a {self.num_classes} x "
                                 f"{self.num_classes} matrix, got {self.close_pairs.shape}")

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.transition is None:
            return super().loss(logits, targets)
        return forward_corrected_cross_entropy(logits, targets, self._transition)

    def batch(self, ids: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ids_np = ids.numpy()
        targets = one_hot(labels, self.num_classes).to(inputs.device)
        flagged = self.uncertain[ids_np]
        if self.close_pairs is not None:
            flagged = flagged & ~self.close_pairs[labels.cpu().numpy(), self.predicted[ids_np]]
        rows = np.flatnonzero(flagged)
        self.counts["flagged"] += int(rows.size)
        kept = np.ones(len(ids_np), dtype=bool)
        if rows.size:
            rows_t = torch.from_numpy(rows).to(inputs.device)
            targets[rows_t], kept[rows] = self._flagged_targets(ids_np[rows], inputs[rows_t])
        self.counts["guessed"] += int(kept[rows].sum())
        partners = torch.from_numpy(self._partners(kept, rng)).to(inputs.device)
        lam = dominant_lambda(sample_lambda(self.alpha, len(ids_np), rng))
        mixed_t = mix(targets, targets[partners], lam)
        mixed_t[torch.from_numpy(~kept).to(inputs.device)] = 0.0
        return mix(inputs, inputs[partners], lam), mixed_t

    def _flagged_targets(self, ids: np.ndarray, inputs: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """(targets, kept) of the flagged rows: w_u * sharpen(g_i, T) where its top class reaches `threshold`, a
        zero row (dropped) elsewhere. `kept` is read back from the device only where a threshold can drop a row."""
        none_kept = np.zeros(len(ids), dtype=bool)
        if self.guess == "none" or self.flagged_weight == 0:
            return inputs.new_zeros((len(ids), self.num_classes)), none_kept
        oof = None if self.guess == "model" else torch.from_numpy(self.probs[ids]).to(inputs.device, torch.float32)
        model = None if self.guess == "oof" else self.predict(inputs).float()
        guess = sharpen(label_guess(oof, model), self.temperature)
        if self.threshold <= 0:
            return self.flagged_weight * guess, ~none_kept
        confident = guess.max(dim=1).values >= self.threshold
        return self.flagged_weight * guess * confident[:, None], confident.cpu().numpy()

    @staticmethod
    def _partners(kept: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A random partner row for every row, among the rows that carry a target (all rows if none does)."""
        pool = np.flatnonzero(kept)
        if pool.size == 0:
            pool = np.arange(len(kept))
        return pool[rng.integers(pool.size, size=len(kept))]


@dataclass
class CrossMixConfig(CrossValConfig, MixupConfig):
    """H1's flag rule and folds (CrossValConfig's knobs), H2's guess and correction, and H3's alpha (MixupConfig's).
    The defaults were chosen by measurement (docs/crossmix.md): folds a fifth of the run, `auto` flags (the GMM's on
    symmetric-looking noise, else confident learning's), flagged samples dropped unless `auto` correction keeps and
    corrects every label."""

    fold_epochs: int = -1          # a fifth of the run's epochs (5 x 8 folds of a 40-epoch run were measured)
    flag_rule: str = "auto"
    guess: str = "none"
    sharpen_t: float = 0.5
    flagged_weight: float = 1.0
    guess_threshold: float = 0.0   # a flagged sample whose sharpened guess peaks below this is dropped
    noise_correction: str = "auto"  # forward: the kept labels' loss through their estimated noise (guess=none)
    # auto (with guess=none; else none): every label kept and forward-corrected where the flags are not the GMM's and
    # every two true classes' rows of the noise over all samples are this far apart (total variation); else the
    # flags dropped, plain loss
    forward_separation: float = 0.3
    # auto, where it drops the flags (and they are not the GMM's): a flag whose given and predicted classes' rows are
    # closer than forward_separation keeps its label (measured, not adopted: docs/crossmix.md)
    keep_close_pairs: bool = False

    def validate(self) -> None:
        super().validate()
        check_choice("guess", self.guess, GUESSES)
        check_range("sharpen_t", self.sharpen_t, 0.0, 1.0, lo_open=True)
        check_range("flagged_weight", self.flagged_weight, 0.0)
        check_range("guess_threshold", self.guess_threshold, 0.0, 1.0)
        check_choice("noise_correction", self.noise_correction, CORRECTIONS)
        check_range("forward_separation", self.forward_separation, 0.0, 1.0)
        if self.keep_close_pairs and (self.noise_correction != "auto" or self.guess != "none"):
            raise ConfigError("keep_close_pairs reads the noise matrix of noise_correction=auto with guess=none (got "
                              f"noise_correction={self.noise_correction}, guess={self.guess})")
        if self.noise_correction == "forward" and self.guess != "none":
            raise ConfigError(f"noise_correction={self.noise_correction} needs guess=none: the correction reads every "
                              "target as a given label, and a guess is a distribution over true classes (got "
                              f"guess={self.guess})")


@register
class CrossMix(OutOfFoldMethod):
    name = "crossmix"
    summary = ("CrossMix (ours): K-fold flags; flagged samples unlabeled with a sharpened label guess, "
               "every sample mixed MixMatch-style")
    Config = CrossMixConfig

    def workers_read_probs(self) -> bool:
        return self.config.guess in ("oof", "mean")

    def predicts_in_batch(self) -> bool:
        return self.config.guess in ("model", "mean")

    def noise_matrix_over(self) -> str | None:
        """`auto` with a label guess corrects nothing: a guess is a distribution over true classes, not a label."""
        if self.config.noise_correction == "auto" and self.config.guess != "none":
            return None
        return {"none": None, "forward": "kept", "auto": "all"}[self.config.noise_correction]

    def corrects_all(self, table, separation: float | None = None) -> bool:
        """`auto`'s choice between its two treatments of the noise (docs/crossmix.md H2): every label kept and
        forward-corrected where the flags are not the GMM's (where `auto` flags take the GMM's, the losses formed
        two modes: noise that does not follow the classes, which dropping its flags handled best) and the noise
        matrix over all samples tells every two true classes apart; else the flags dropped with a plain loss.
        `separation`: the matrix's least row separation where the caller has it already."""
        if self.noise_matrix_over() != "all" or table.flag_rule == "oof_gmm":
            return False
        if separation is None:
            separation = least_separated(table.noise_matrix)[0]
        return separation >= self.config.forward_separation

    def close_pairs(self, table) -> np.ndarray | None:
        """C x C: the (given, predicted) class pairs whose flags keep their labels (`keep_close_pairs`), for a table
        whose flags `auto` drops (callers ask only where `corrects_all` is false): those between two true classes
        whose rows of the noise matrix are closer than forward_separation. The table cannot tell such a pair apart,
        and its flags fall unevenly on the pair's two directions, so dropping them leaves one-sided noise (that this
        costs accuracy was the hypothesis; it did not hold at 40% asymmetric)."""
        if not self.config.keep_close_pairs or table.flag_rule == "oof_gmm":
            return None
        close = row_separation(table.noise_matrix) < self.config.forward_separation
        np.fill_diagonal(close, False)
        return close

    def selection_note(self, table) -> str:
        if self.noise_matrix_over() is None or table.noise_matrix is None:
            return ""
        separation, j, k = least_separated(table.noise_matrix)
        over = "kept labels" if self.noise_matrix_over() == "kept" else "labels"
        note = (f"forward correction: {over} estimated wrong {1 - float(np.diag(table.noise_matrix).mean()):.1%} of "
                "the time (mean over true classes of 1 - T[j, j], oof.npz's noise_matrix); closest true classes "
                f"{j} and {k}, rows {separation:.2f} apart")
        if self.config.noise_correction == "forward":
            return note
        if self.corrects_all(table, separation):
            return note + (f"; auto: on (>= forward_separation {self.config.forward_separation:g}): every label kept "
                           f"and corrected, the {int(table.uncertain.sum())} flags reported, not dropped")
        why = ("the flags are the GMM's" if table.flag_rule == "oof_gmm" else
               f"below forward_separation {self.config.forward_separation:g}")
        close = self.close_pairs(table)
        if close is None:
            return note + f"; auto: off ({why}): the flags dropped, plain loss"
        kept = int((table.uncertain & close[table.given, table.predicted]).sum())
        return note + (f"; auto: off ({why}): {kept} flags between classes closer than that keep their labels "
                       f"(keep_close_pairs), the other {int(table.uncertain.sum()) - kept} dropped, plain loss")

    def batch_rule(self, context: BatchContext) -> BatchRule:
        """H2-H3 on the table: with `forward` the kept labels go through their noise matrix; with `auto` every label
        does where `corrects_all` says so (nothing dropped), else the flags are dropped with a plain loss (but for
        those of `close_pairs`)."""
        c, table = self.config, context.table
        if self.noise_matrix_over() is not None and table.noise_matrix is None:
            raise ValueError(f"noise_correction={c.noise_correction}, but the mixing table carries no noise transition")
        corrects_all = self.corrects_all(table)
        transition = table.noise_matrix if c.noise_correction == "forward" or corrects_all else None
        uncertain = np.zeros_like(table.uncertain) if corrects_all else table.uncertain
        return CrossMixTargets(context.num_classes, uncertain=uncertain, probs=table.probs, guess=c.guess,
                               temperature=c.sharpen_t, flagged_weight=c.flagged_weight,
                               threshold=c.guess_threshold, alpha=c.alpha, predict=context.predict,
                               transition=transition, predicted=table.predicted,
                               close_pairs=None if corrects_all else self.close_pairs(table))
