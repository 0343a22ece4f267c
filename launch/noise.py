"""Synthetic label noise, one function per convention of docs/noise.md.

Every generator is deterministic in (labels, rate, seed[, images]) and never changes its input.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

NOISE_TYPES = ("none", "symmetric", "symmetric_incl", "pairflip", "asymmetric", "instance", "file")

# Fixed class maps of the published asymmetric benchmarks (noise.md); other datasets must give one.
# Fashion-MNIST has no published map: ours (issue 21) swaps its three pairs of look-alike garments,
# shirt<->T-shirt (6<->0), pullover<->coat (2<->4), sandal<->sneaker (5<->7), and sends ankle boot to sneaker.
ASYMMETRIC_MAPS: dict[str, dict[int, int]] = {
    "cifar10": {9: 1, 2: 0, 4: 7, 3: 5, 5: 3},
    "mnist": {7: 1, 2: 7, 5: 6, 6: 5, 3: 8},
    "cifar100": {c: (c // 5) * 5 + (c % 5 + 1) % 5 for c in range(100)},
    "fashion-mnist": {6: 0, 0: 6, 2: 4, 4: 2, 5: 7, 7: 5, 9: 7},
}


class NoiseError(ValueError):
    """A noise specification that cannot be applied."""


def _check(labels: np.ndarray, num_classes: int, rate: float) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise NoiseError(f"labels must be a 1-d integer array, got shape {labels.shape} dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise NoiseError(f"labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}")
    if not 0.0 <= rate < 1.0:
        raise NoiseError(f"noise rate must be in [0, 1), got {rate}")
    return labels.astype(np.int64)


def symmetric(labels, num_classes: int, rate: float, seed: int) -> np.ndarray:
    """Exactly round(r*N) random samples move to a uniformly drawn OTHER class: realised rate r."""
    labels = _check(labels, num_classes, rate)
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    flip = rng.choice(labels.size, size=round(rate * labels.size), replace=False)
    # An offset in [1, C) added mod C is a uniform draw over the C-1 other classes.
    noisy[flip] = (labels[flip] + rng.integers(1, num_classes, size=flip.size)) % num_classes
    return noisy


def symmetric_incl(labels, num_classes: int, rate: float, seed: int) -> np.ndarray:
    """round(r*N) random samples get a label drawn from ALL C classes (DivideMix/MixNN convention)."""
    labels = _check(labels, num_classes, rate)
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    flip = rng.choice(labels.size, size=round(rate * labels.size), replace=False)
    noisy[flip] = rng.integers(0, num_classes, size=flip.size)
    return noisy


def pairflip(labels, num_classes: int, rate: float, seed: int) -> np.ndarray:
    """Each sample of class c flips to (c + 1) mod C with probability r."""
    labels = _check(labels, num_classes, rate)
    flip = np.random.default_rng(seed).random(labels.size) < rate
    return np.where(flip, (labels + 1) % num_classes, labels)


def asymmetric(labels, num_classes: int, rate: float, seed: int, class_map: Mapping[int, int]) -> np.ndarray:
    """Samples of a mapped class flip along the map with probability r; other classes stay."""
    labels = _check(labels, num_classes, rate)
    if not class_map:
        raise NoiseError("asymmetric noise needs a non-empty class map")
    for src, dst in class_map.items():
        if not (0 <= int(src) < num_classes and 0 <= int(dst) < num_classes) or int(src) == int(dst):
            raise NoiseError(f"asymmetric map entry {src}->{dst} is not a move between classes in [0, {num_classes})")
    target = np.arange(num_classes)
    for src, dst in class_map.items():
        target[int(src)] = int(dst)
    flip = np.random.default_rng(seed).random(labels.size) < rate
    return np.where(flip, target[labels], labels)


def instance(labels, num_classes: int, rate: float, seed: int, images: np.ndarray) -> np.ndarray:
    """Part-dependent noise of Xia et al. (2020): a per-sample flip rate and class projections of the pixels."""
    labels = _check(labels, num_classes, rate)
    x = np.asarray(images, dtype=np.float64).reshape(labels.size, -1)
    if x.shape[0] != labels.size:
        raise NoiseError(f"instance noise needs one image per label: {x.shape[0]} images, {labels.size} labels")
    x = x / max(float(np.abs(x).max()), 1e-12)
    rng = np.random.default_rng(seed)
    # q_i ~ N(r, 0.1) truncated to [0, 1], by redrawing the values that fall outside.
    q = rng.normal(rate, 0.1, size=labels.size)
    while (bad := (q < 0) | (q > 1)).any():
        q[bad] = rng.normal(rate, 0.1, size=int(bad.sum()))
    projections = rng.standard_normal((num_classes, x.shape[1], num_classes))
    scores = np.empty((labels.size, num_classes))
    for c in range(num_classes):
        members = labels == c
        scores[members] = x[members] @ projections[c]
    scores[np.arange(labels.size), labels] = -np.inf
    scores -= scores.max(axis=1, keepdims=True)
    probs = np.exp(scores)
    probs *= (q / probs.sum(axis=1))[:, None]
    probs[np.arange(labels.size), labels] += 1.0 - q
    # Inverse-CDF draw: one uniform per sample against the cumulative noisy-label distribution.
    cdf = np.cumsum(probs, axis=1)
    u = rng.random(labels.size)[:, None] * cdf[:, -1:]
    return np.minimum((u > cdf).sum(axis=1), num_classes - 1).astype(np.int64)


def from_file(labels, num_classes: int, path: str | Path, key: str | None) -> np.ndarray:
    """Labels read from a .npy array, or from one key of an .npz archive (e.g. CIFAR-10N's aggre_label)."""
    labels = _check(labels, num_classes, 0.0)
    path = Path(path)
    if not path.is_file():
        raise NoiseError(f"noise file not found: {path}")
    if path.suffix not in (".npy", ".npz"):
        raise NoiseError(f"noise file {path} must be .npy or .npz (convert CIFAR-N's .pt with numpy.savez)")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise NoiseError(f"cannot read noise file {path}: {exc}") from exc
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            if key not in loaded.files:
                raise NoiseError(f"noise file {path} holds keys {loaded.files}; set noise_file_key to one of them")
            given = np.asarray(loaded[key])
    else:
        given = loaded
    if given.shape != labels.shape:
        raise NoiseError(f"noise file {path} has labels of shape {given.shape}, the dataset {labels.shape}")
    if not np.issubdtype(given.dtype, np.integer):
        raise NoiseError(f"noise file {path} holds {given.dtype} values, not integer labels")
    return _check(given.astype(np.int64), num_classes, 0.0)


def apply_noise(
    labels,
    num_classes: int,
    noise_type: str,
    rate: float,
    seed: int,
    *,
    images: np.ndarray | None = None,
    dataset: str = "",
    class_map: Mapping[int, int] | None = None,
    noise_file: str | None = None,
    noise_file_key: str | None = None,
) -> np.ndarray:
    """Dispatch to the generator named by noise_type; the single entry point prepare uses."""
    if noise_type not in NOISE_TYPES:
        raise NoiseError(f"unknown noise type {noise_type!r}; choose one of {', '.join(NOISE_TYPES)}")
    if noise_type == "none":
        if rate != 0:
            raise NoiseError(f"noise_type 'none' takes noise_rate 0, got {rate}")
        return _check(labels, num_classes, 0.0).copy()
    if noise_type == "file":
        if noise_file is None:
            raise NoiseError("noise_type 'file' needs noise_file")
        return from_file(labels, num_classes, noise_file, noise_file_key)
    if noise_type == "asymmetric":
        mapping = class_map or ASYMMETRIC_MAPS.get(dataset)
        if mapping is None:
            raise NoiseError(
                f"asymmetric noise has no fixed map for dataset {dataset!r}; give noise_map "
                f"(known maps: {', '.join(ASYMMETRIC_MAPS)})"
            )
        return asymmetric(labels, num_classes, rate, seed, mapping)
    if noise_type == "instance":
        if images is None:
            raise NoiseError("instance noise needs the images")
        return instance(labels, num_classes, rate, seed, images)
    generator = {"symmetric": symmetric, "symmetric_incl": symmetric_incl, "pairflip": pairflip}[noise_type]
    return generator(labels, num_classes, rate, seed)


def realised_rate(noisy: np.ndarray, true: np.ndarray) -> float:
    """Fraction of samples whose given label differs from the true one."""
    return float(np.mean(np.asarray(noisy) != np.asarray(true))) if len(true) else 0.0
