"""Loss-GMM selection (methods.md C, the DivideMix-style split with one network): after a CE warm-up,
train only on the samples whose clean probability w_i (B1) is above a threshold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from noisymix.mixing.config import Section, check_choice, check_epochs_or_auto, check_range
from noisymix.mixing.losses import one_hot
from noisymix.mixing.method import BatchContext, BatchRule, EpochPlan, Method, register
from noisymix.mixing.soft_targets import TARGET_DTYPES, TargetCodec
from noisymix.selection.gmm import CleanProbability, out_of_fold_clean_probability
from noisymix.selection.report import LabelReport, clean_probability_report, evaluate_clean_probability


@dataclass
class GMMConfig(Section):
    """B1's knobs: the CE warm-up, the loss window and GMM fit, the clean threshold, and `clean_from` (an
    earlier run's oof.npz whose out-of-fold losses -log P[i, y_i] give w in place of the training loss)."""

    warmup: int = -1               # -1: the authors' share, 10 of 300 epochs
    loss_window: int = 1
    gmm_max_iter: int = 10
    gmm_tol: float = 1e-2
    gmm_reg_covar: float = 5e-4
    gmm_threshold: float = 0.5
    clean_from: Optional[str] = None
    target_dtype: str = "float32"  # per-sample soft targets stored as float32, float16 or bfloat16
    target_topk: int = 0           # >0: keep each soft target's top k classes, the rest as a uniform remainder
    state_checkpoint_every: int = 1  # epochs between checkpoints of the per-sample state (each rank its shard)

    def validate(self) -> None:
        super().validate()
        check_epochs_or_auto("warmup", self.warmup)
        check_choice("target_dtype", self.target_dtype, TARGET_DTYPES)
        check_range("target_topk", self.target_topk, 0)
        check_range("state_checkpoint_every", self.state_checkpoint_every, 1)
        check_range("gmm_threshold", self.gmm_threshold, 0.0, 1.0)
        for key in ("loss_window", "gmm_max_iter"):
            check_range(key, getattr(self, key), 1)
        check_range("gmm_tol", self.gmm_tol, 0.0, None, lo_open=True)
        check_range("gmm_reg_covar", self.gmm_reg_covar, 0.0)

    def resolve(self, epochs: int) -> None:
        if self.warmup == -1:
            self.warmup = max(1, round(epochs / 30))


class CleanProbabilityMethod(Method):
    """Shared by the methods whose beliefs are per-sample state refreshed each epoch (B1, B2)."""

    Config = GMMConfig
    detector = "1 - GMM clean probability"
    uses_sample_state = True

    def resolve(self, epochs: int, use_gpu: bool = False) -> None:
        self.config.resolve(epochs)

    def fixed_clean_file(self) -> str | None:
        return self.config.clean_from

    def target_codec(self, num_classes: int) -> TargetCodec:
        return TargetCodec(num_classes, self.config.target_topk, self.config.target_dtype)

    @property
    def checkpoint_every(self) -> int:
        return self.config.state_checkpoint_every

    def fixed_clean_probability(self, probs: np.ndarray, given: np.ndarray, seed: int) -> CleanProbability:
        """B1's GMM on the out-of-fold losses -log P[i, y_i] (selection.gmm.out_of_fold_clean_probability)."""
        c = self.config
        return out_of_fold_clean_probability(probs, given, max_iter=c.gmm_max_iter, tol=c.gmm_tol,
                                             reg_covar=c.gmm_reg_covar, seed=seed)

    def label_report(self, table=None, state=None) -> LabelReport | None:
        if state is None:
            return None
        return clean_probability_report(state.given, state.corrected, state.clean, self.config.gmm_threshold)

    def evaluate(self, report: LabelReport, true: np.ndarray) -> dict:
        return evaluate_clean_probability(report, true, self.config.gmm_threshold)


@dataclass
class GMMSelectTargets(BatchRule):
    """Phase `warmup` trains on every sample, phase `select` only on samples with w_i > threshold (a zero
    target row drops a sample from the loss without breaking the ranks' lockstep)."""

    state: object = None
    threshold: float = 0.5

    def batch(self, ids: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        targets = one_hot(labels, self.num_classes)
        if self.phase == "warmup" or not self.state.ready:
            return inputs, targets
        keep = self.state.clean_of(ids).to(inputs.device) > self.threshold
        return inputs, targets * keep[:, None]


@register
class GMMSelection(CleanProbabilityMethod):
    name = "gmm_select"
    summary = "loss-GMM sample selection: train on samples whose clean probability > gmm_threshold"

    def plan(self, epoch: int) -> EpochPlan:
        if epoch < self.config.warmup:
            return EpochPlan("warmup")
        return EpochPlan("select", refresh=True)

    def batch_rule(self, context: BatchContext) -> BatchRule:
        return GMMSelectTargets(context.num_classes, state=context.state, threshold=self.config.gmm_threshold)
