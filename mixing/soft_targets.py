"""Compact storage of soft targets (methods.md B2's t_i): what MixNN keeps per sample, N x C.

Dense float32 costs 4C bytes per sample (4 KB at WebVision's C=1000). A codec stores each row as
float16/bfloat16 (half that), or as its top-k classes with the rest of the mass spread uniformly over the
other C - k classes: 2k values + k indices, ~4k bytes at k=16, and exact for C <= k (rows then stay dense).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TARGET_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_INDEX_DTYPES = {2: torch.int16, 4: torch.int32}


@dataclass(frozen=True)
class TargetCodec:
    """Encode N x C probability rows into a compact tensor of `width` columns (`dtype` below) and back."""

    num_classes: int
    topk: int = 0                  # 0 (or >= num_classes): every class kept
    dtype: str = "float32"

    def __post_init__(self):
        if self.num_classes < 1 or self.topk < 0:
            raise ValueError(f"num_classes must be >= 1 and topk >= 0, got {self.num_classes}, {self.topk}")
        if self.dtype not in TARGET_DTYPES:
            raise ValueError(f"target dtype {self.dtype!r} is not one of {', '.join(TARGET_DTYPES)}")
        if self.sparse and self.num_classes > torch.iinfo(self.index_dtype).max:
            raise ValueError(f"{self.num_classes} classes do not fit the {self.dtype} top-k index: use float32")

    @property
    def value_dtype(self) -> torch.dtype:
        return TARGET_DTYPES[self.dtype]

    @property
    def index_dtype(self) -> torch.dtype:
        """Indices are stored in an integer type of the values' width, so one tensor holds both."""
        return _INDEX_DTYPES[self.value_dtype.itemsize]

    @property
    def sparse(self) -> bool:
        return 0 < self.topk < self.num_classes

    @property
    def width(self) -> int:
        return 2 * self.topk if self.sparse else self.num_classes

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.index_dtype if self.sparse else self.value_dtype

    @property
    def bytes_per_row(self) -> int:
        return self.width * self.value_dtype.itemsize

    def encode(self, dense: torch.Tensor) -> torch.Tensor:
        """n x C probabilities -> n x width storage rows."""
        if dense.dim() != 2 or dense.shape[1] != self.num_classes:
            raise ValueError(f"soft targets must be (n, {self.num_classes}), got {tuple(dense.shape)}")
        if not self.sparse:
            return dense.to(self.value_dtype)
        values, indices = dense.float().topk(self.topk, dim=1)
        return torch.cat([values.to(self.value_dtype).view(self.index_dtype), indices.to(self.index_dtype)], dim=1)

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """n x width storage rows -> n x C float32 probabilities; each row renormalised to sum to 1, since rounding
        to 16 bits (or a top-k mass above 1 by rounding) would otherwise drift over many EMA updates. Leading
        dimensions are kept: (..., width) -> (..., C)."""
        if rows.dim() != 2:
            return self.decode(rows.reshape(-1, self.width)).reshape(*rows.shape[:-1], self.num_classes)
        if not self.sparse:
            dense = rows.float()
        else:
            k = self.topk
            values = rows[:, :k].contiguous().view(self.value_dtype).float()
            indices = rows[:, k:].long()
            rest = (1.0 - values.sum(dim=1, keepdim=True)).clamp_min(0.0) / (self.num_classes - k)
            dense = rest.expand(len(rows), self.num_classes).clone()
            dense.scatter_(1, indices, values)
        return dense / dense.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)

    def empty(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.empty((n, self.width), dtype=self.storage_dtype, device=device)
