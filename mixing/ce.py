"""Plain cross-entropy (methods.md C): on the given labels (`ce`), and on the true labels (`clean`, the
upper bound where true labels are known)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from noisymix.mixing.losses import one_hot
from noisymix.mixing.method import TRUE, BatchContext, BatchRule, Method, register


@dataclass
class PlainTargets(BatchRule):
    """CE on the labels the stream carries."""

    def batch(self, ids: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return inputs, one_hot(labels, self.num_classes)


@register
class CrossEntropy(Method):
    name = "ce"
    summary = "plain cross-entropy on the given labels (the baseline)"

    def batch_rule(self, context: BatchContext) -> BatchRule:
        return PlainTargets(context.num_classes)


@register
class CleanBound(CrossEntropy):
    name = "clean"
    summary = "cross-entropy on the TRUE labels: the upper bound, where true labels are known"
    label_key = TRUE
