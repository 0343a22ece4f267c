import gzip
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from noisymix.launch import sources
from noisymix.launch.sources import SourceError


def write_idx(path, array, magic=None, gz=False):
    array = np.asarray(array, dtype=np.uint8)
    magic = magic if magic is not None else {1: 2049, 3: 2051}[array.ndim]
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if gz else open
    with opener(path, "wb") as fh:
        fh.write(header + array.tobytes())


def make_idx_dir(root, n_train=12, n_test=6, gz=True):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    write_idx(root / f"train-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n_train, 5, 5)), gz=gz)
    write_idx(root / f"train-labels-idx1-ubyte{suffix}", np.arange(n_train) % 3, gz=gz)
    write_idx(root / f"t10k-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n_test, 5, 5)), gz=gz)
    write_idx(root / f"t10k-labels-idx1-ubyte{suffix}", np.arange(n_test) % 3, gz=gz)
    return root


@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory_round_trip(tmp_path, gz):
    data = sources.read_idx(make_idx_dir(tmp_path, gz=gz), name="tiny")
    assert data.train_images.shape == (12, 5, 5, 1) and data.test_images.shape == (6, 5, 5, 1)
    assert data.num_classes == 3 and data.name == "tiny"
    assert np.array_equal(data.train_labels, np.arange(12) % 3)


def test_idx_wrong_magic(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(12) % 3, magic=1234)
    with pytest.raises(SourceError, match="wrong IDX magic 1234"):
        sources.read_idx(tmp_path)


def test_idx_count_mismatch(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(11) % 3)
    with pytest.raises(SourceError, match="12 train images but 11 labels"):
        sources.read_idx(tmp_path)


def test_idx_truncated_file(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(SourceError, match="bytes"):
        sources.read_idx(tmp_path)


def test_idx_missing_directory_and_file(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        sources.read_idx(tmp_path / "nowhere")
    make_idx_dir(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(SourceError, match="missing IDX file t10k-labels"):
        sources.read_idx(tmp_path)


def test_real_fashion_mnist_reads(request):
    path = request.config.rootpath.parent / "shared" / "data" / "fashion-mnist"
    data = sources.read_idx(path)
    assert data.train_images.shape == (60000, 28, 28, 1) and data.test_images.shape == (10000, 28, 28, 1)
    assert np.bincount(data.train_labels).tolist() == [6000] * 10


def write_cifar10(root, n=10):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}
        with open(root / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    return root


def test_cifar10_batches_through_the_restricted_unpickler(tmp_path):
    data = sources.read_cifar(write_cifar10(tmp_path))
    assert data.name == "cifar10" and data.train_images.shape == (50, 32, 32, 3)
    raw = sources.load_cifar_batch(tmp_path / "data_batch_1")["data"][0]
    # channel-major rows become HWC pixels: the red plane comes first in the row
    assert np.array_equal(data.train_images[0, :, :, 0].ravel(), raw[:1024])


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_batch_with_foreign_globals_is_refused(tmp_path):
    write_cifar10(tmp_path)
    with open(tmp_path / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": Exploit(), b"labels": [0]}, fh)
    with pytest.raises(SourceError, match="refusing to unpickle"):
        sources.read_cifar(tmp_path)


def test_cifar_directory_without_batches(tmp_path):
    with pytest.raises(SourceError, match="neither CIFAR-10"):
        sources.read_cifar(tmp_path)


def write_image_list(root, labels=(0, 1, 2, 1)):
    (root / "img").mkdir()
    lines = []
    for k, label in enumerate(labels):
        Image.fromarray(np.full((10, 14, 3), (40 * k) % 256, np.uint8)).save(root / "img" / f"{k}.png")
        lines.append(f"img/{k}.png {label}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "test.txt").write_text("img/0.png 0\nimg/1.png 1\n")
    (root / "classes.txt").write_text("shirt\ncoat\nknitwear\n")
    return root


def test_digits_default_split_is_fixed():
    a, b = sources.read_digits(), sources.read_digits()
    assert a.train_images.shape[1:] == (8, 8, 1) and len(a.test_labels) == 360
    assert np.array_equal(a.test_labels, b.test_labels)


def test_unknown_source_and_missing_path():
    with pytest.raises(SourceError, match="unknown source"):
        sources.read_source("imagenet", "/x")
    with pytest.raises(SourceError, match="needs source_path"):
        sources.read_source("idx", None)
