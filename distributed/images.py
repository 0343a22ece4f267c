"""Encoded images in shards: how prepare re-encodes them and how loader workers decode and crop them.

Shards of image-list datasets hold JPEG bytes (`<id>.jpg`), never raw pixels; decoding, the training crop
(RandomResizedCrop + horizontal flip) and the evaluation crop (resize + centre crop) run per sample in the
loader, so a worker process never holds more than its batches. The training crop of a sample is drawn
from a generator seeded by (seed, epoch, id): the same run gives the same crops, however many loader
workers share the work.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

RESIZE = Image.BILINEAR
JPEG_MAGIC = b"\xff\xd8"
CHECK_SIDE = 32               # a JPEG decoded at this shorter side is proven to decode, for a fraction of the cost
EVAL_RESIZE_RATIO = 0.875     # evaluation: resize the shorter side to crop / 0.875, then a centre crop (224 of 256)


class ImageDecodeError(ValueError):
    """Bytes that are not a decodable image."""


def open_rgb(data: bytes, at_least: int = 0) -> Image.Image:
    """Decode to RGB; with `at_least`, JPEG's DCT scaling decodes straight to the smallest size whose shorter
    side is still >= at_least (2-8x faster for large photos)."""
    with _decoding():
        image = Image.open(io.BytesIO(data))
        if at_least and image.format == "JPEG":
            image.draft("RGB", _size_for_shorter(image.size, at_least))
        return image.convert("RGB")


def shorter_side(data: bytes) -> int:
    """The shorter side of an encoded image, from its header alone (nothing is decoded)."""
    with _decoding(), Image.open(io.BytesIO(data)) as header:
        return min(header.size)


@contextlib.contextmanager
def _decoding():
    """PIL's errors on bytes that are not a decodable image, as ImageDecodeError."""
    try:
        yield
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(str(exc) or type(exc).__name__) from exc


def _size_for_shorter(size: tuple[int, int], shorter: int) -> tuple[int, int]:
    """(width, height) scaled so that the shorter side is `shorter`."""
    width, height = size
    scale = shorter / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_shorter(image: Image.Image, shorter: int) -> Image.Image:
    """Resize so the shorter side is `shorter` (aspect ratio kept); images already that small stay as they are."""
    if min(image.size) <= shorter:
        return image
    return image.resize(_size_for_shorter(image.size, shorter), RESIZE)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def stored_image(data: bytes, stored_size: int, quality: int,
                 with_pixels: bool = True) -> tuple[bytes, Image.Image | None, int]:
    """(the JPEG bytes a shard stores, the RGB image for the channel statistics or None without `with_pixels`,
    the stored image's shorter side) for one source file. A JPEG that needs no resize (shorter side <=
    stored_size, or stored_size 0) is stored as its own bytes: without `with_pixels` it is only proven to decode,
    by a decode at CHECK_SIDE (JPEG's DCT scaling: cheaper than a full one). Others are re-encoded, after a
    shorter-side resize to stored_size where they are larger."""
    if data[:2] == JPEG_MAGIC:
        shorter = shorter_side(data)
        if stored_size == 0 or shorter <= stored_size:
            if with_pixels:
                return data, open_rgb(data), shorter
            open_rgb(data, at_least=CHECK_SIDE)
            return data, None, shorter
    image = open_rgb(data, at_least=stored_size)
    if stored_size:
        image = resize_shorter(image, stored_size)
    return encode_jpeg(image, quality), image if with_pixels else None, min(image.size)


_LEVELS = np.arange(256) / 255.0


@dataclass
class PixelSums:
    """Running per-channel sums of pixels in [0, 1], combinable across shards into a mean and std."""

    count: int = 0
    total: tuple[float, ...] = ()      # one sum per channel, from the first pixels added
    squares: tuple[float, ...] = ()

    def add(self, pixels: np.ndarray) -> None:
        """uint8 pixels through a per-channel histogram (4x cheaper than float sums, which cost as much as the
        JPEG decode); other dtypes as float sums."""
        flat = pixels.reshape(-1, pixels.shape[-1])
        if flat.dtype == np.uint8:
            self._add_histogram(np.stack([np.bincount(flat[:, c], minlength=256) for c in range(flat.shape[1])]))
            return
        self.count += len(flat)
        values = flat.astype(np.float64) / 255.0
        self.total = tuple(_add(self.total, values.sum(axis=0)))
        self.squares = tuple(_add(self.squares, np.square(values).sum(axis=0)))

    def add_image(self, image: Image.Image) -> None:
        """An RGB image through PIL's own per-channel histogram (4x cheaper than numpy's bincount over the pixel
        array, and no array is made)."""
        self._add_histogram(np.asarray(image.histogram(), dtype=np.int64).reshape(len(image.getbands()), 256))

    def _add_histogram(self, counts: np.ndarray) -> None:
        """counts[c, v]: how many pixels of channel c have the value v."""
        self.count += int(counts[0].sum())
        self.total = tuple(_add(self.total, counts @ _LEVELS))
        self.squares = tuple(_add(self.squares, counts @ np.square(_LEVELS)))

    def merge(self, other: "PixelSums") -> "PixelSums":
        return PixelSums(self.count + other.count, tuple(_add(self.total, other.total)),
                         tuple(_add(self.squares, other.squares)))

    def mean_std(self) -> tuple[list[float], list[float]]:
        mean = np.asarray(self.total) / max(self.count, 1)
        var = np.asarray(self.squares) / max(self.count, 1) - mean ** 2
        return mean.tolist(), np.maximum(np.sqrt(np.maximum(var, 0.0)), 1e-3).tolist()


def _add(a, b) -> np.ndarray:
    """Element-wise sum where an empty side counts as zeros of the other's length."""
    return np.add(a if len(a) else np.zeros(len(b)), b if len(b) else np.zeros(len(a)))


def random_resized_crop_box(size: tuple[int, int], rng: np.random.Generator, scale: tuple[float, float],
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a crop covering a `scale` share of the area with an aspect ratio in
    `ratio` (log-uniform), as torchvision's RandomResizedCrop draws it; after 10 misses, the largest
    centred crop within `ratio`."""
    width, height = size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


@dataclass(frozen=True)
class JpegCrops:
    """The loader's image stage for JPEG shards: bytes -> uint8 (crop, crop, 3).

    train=True: RandomResizedCrop(crop, scale=(crop_scale, 1)) and a horizontal flip with probability 1/2,
    drawn from a generator seeded by (seed, epoch, id); train=False: shorter side to crop / 0.875, centre crop.
    """

    crop: int
    train: bool = False
    crop_scale: float = 0.08
    seed: int = 0
    epoch: int = 0
    member: str = "jpg"

    def __call__(self, data: bytes, sample_id: int) -> np.ndarray:
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, sample_id])
            image = open_rgb(data, at_least=self.crop)
            box = random_resized_crop_box(image.size, rng, (self.crop_scale, 1.0))
            image = image.resize((self.crop, self.crop), RESIZE, box=box)
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            return np.asarray(image)
        shorter = round(self.crop / EVAL_RESIZE_RATIO)
        image = open_rgb(data, at_least=shorter)
        image = image.resize(_size_for_shorter(image.size, shorter), RESIZE)
        width, height = image.size
        left, top = (width - self.crop) // 2, (height - self.crop) // 2
        return np.asarray(image.crop((left, top, left + self.crop, top + self.crop)))
