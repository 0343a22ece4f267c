import json
import tarfile

import numpy as np
import pytest
import torch

from conftest import make_config
from noisymix.distributed import shards, storage
from noisymix.launch import prepare as prepare_module
from noisymix.launch.prepare import prepare
from noisymix.launch.sources import SourceError, read_digits

quiet = dict(log=lambda *_: None)


def prepared(config, **kwargs):
    return prepare(config.data, config.run.seed, **kwargs)


def read_split(data_dir, split, label_key=shards.GIVEN_LABEL):
    manifest = shards.load_manifest(data_dir)
    samples = list(shards.sample_stream(shards.shard_urls(data_dir, manifest, split), label_key=label_key))
    ids = np.array([s[0] for s in samples])
    order = np.argsort(ids)
    return ids[order], np.stack([s[1] for s in samples])[order], np.array([s[2] for s in samples])[order]


def test_shards_round_trip_images_labels_and_ids(digits_dir):
    manifest = shards.load_manifest(digits_dir)
    source = read_digits()
    ids, images, given = read_split(digits_dir, "train")
    _, _, true = read_split(digits_dir, "train", shards.TRUE_LABEL)
    n_train, n_val = manifest["splits"]["train"]["count"], manifest["splits"]["val"]["count"]
    assert np.array_equal(ids, np.arange(n_train)), "train ids are 0..N-1, the keys of per-sample state"
    # every stored image is a source image whose true label is the stored true label
    lookup = {img.tobytes(): label for img, label in zip(source.train_images, source.train_labels)}
    assert all(lookup[img.tobytes()] == t for img, t in zip(images, true))
    val_ids, _, val_given = read_split(digits_dir, "val")
    _, _, val_true = read_split(digits_dir, "val", shards.TRUE_LABEL)
    assert np.array_equal(val_ids, n_train + np.arange(n_val))
    all_given, all_true = np.concatenate([given, val_given]), np.concatenate([true, val_true])
    assert np.mean(all_given != all_true) == pytest.approx(manifest["noise"]["realised_rate"])
    test_ids, _, test_labels = read_split(digits_dir, "test")
    assert np.array_equal(np.sort(test_labels), np.sort(source.test_labels))
    assert test_ids.min() == n_train + n_val


def test_labels_only_readers_give_the_full_reads_labels_in_id_order(digits_dir, monkeypatch):
    manifest = shards.load_manifest(digits_dir)
    scanned = {(split, key): shards.scan_labels(str(digits_dir), manifest, split, key)
               for split in ("train", "val", "test") for key in (shards.GIVEN_LABEL, shards.TRUE_LABEL)}
    for (split, key), labels in scanned.items():
        np.testing.assert_array_equal(labels, read_split(digits_dir, split, key)[2])
    # The labels files answer without opening a shard: 8 bytes per sample instead of the images' bytes.
    monkeypatch.setattr(shards, "label_stream", None)
    for (split, key), labels in scanned.items():
        from_file = shards.load_labels(str(digits_dir), manifest, split, key)
        assert from_file.dtype == np.int64
        np.testing.assert_array_equal(from_file, labels)
        assert (digits_dir / manifest["splits"][split]["labels"]["name"]).stat().st_size < 8 * len(labels) + 256
    assert np.any(shards.load_labels(str(digits_dir), manifest)
                  != shards.load_labels(str(digits_dir), manifest, label_key=shards.TRUE_LABEL))


def test_a_changed_labels_file_is_refused_and_verify_compares_it_with_the_shards(tmp_path, digits_dir, capsys):
    import shutil

    from noisymix.launch.cli import main

    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    manifest = shards.load_manifest(data)
    entry = manifest["splits"]["train"]["labels"]
    table = np.load(data / entry["name"])
    table[0, 0] = (table[0, 0] + 1) % 10
    np.save(data / entry["name"], table)
    with pytest.raises(shards.ShardError, match="train.labels.npy fails its sha256 check"):
        shards.load_labels(str(data), manifest)
    entry["sha256"] = storage.file_sha256(data / entry["name"])   # as if prepare had written the wrong labels
    (data / shards.MANIFEST).write_text(json.dumps(manifest))
    assert main(["verify", str(data)]) == 2
    assert "the labels file of the train split" in capsys.readouterr().err
    del manifest["splits"]["train"]["labels"]                     # a dataset from before labels files: scanned
    np.testing.assert_array_equal(shards.load_labels(str(data), manifest),
                                  shards.load_labels(str(digits_dir), shards.load_manifest(digits_dir)))


def test_the_shuffle_buffer_holds_samples_as_stored_and_decodes_only_what_leaves_it(digits_dir):
    manifest = shards.load_manifest(digits_dir)
    urls = shards.shard_urls(digits_dir, manifest, "train")

    class CountingImages(shards.NpyImages):
        decoded = 0

        def __call__(self, data, sample_id=-1):
            CountingImages.decoded += 1
            return super().__call__(data, sample_id)

    stream = iter(shards.sample_stream(urls, images=CountingImages(), shuffle_buffer=300, shuffle_seed=1))
    first = next(stream)
    assert CountingImages.decoded == 1   # the 300 samples waiting in the buffer are still their stored bytes
    rest = list(stream)
    assert CountingImages.decoded == 1 + len(rest)
    ids = sorted([first[0], *(sample[0] for sample in rest)])
    assert ids == sorted(read_split(digits_dir, "train")[0].tolist())


def test_loader_processes_hand_over_the_same_samples_with_images_in_shared_memory(digits_dir):
    manifest = shards.load_manifest(digits_dir)
    urls = shards.shard_urls(digits_dir, manifest, "train")

    def samples(loader_workers):
        """(ids, images, labels) of every batch concatenated in id order, and the batches' image types."""
        batches = list(shards.iterate_batches(shards.sample_stream(urls, batch_size=64), loader_workers))
        ids = np.concatenate([b[0] for b in batches])
        order = np.argsort(ids)
        images = np.concatenate([np.asarray(b[1]) for b in batches])[order]
        return ids[order], images, np.concatenate([b[2] for b in batches])[order], batches

    *in_process, plain = samples(0)
    *loaded, batches = samples(2)
    for expected, got in zip(in_process, loaded):
        assert np.array_equal(expected, got)
    assert all(isinstance(b[1], np.ndarray) for b in plain)
    for ids, images, labels in batches:
        assert isinstance(ids, np.ndarray) and isinstance(labels, np.ndarray)
        # a tensor crosses from the loader process through shared memory; a numpy array would be pickled
        assert isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.is_shared()


class FailingInLoader(torch.utils.data.IterableDataset):
    """Fails in the loader process with `message`, as torch does when /dev/shm has no room for a batch's tensor."""

    def __init__(self, message):
        self.message = message

    def __iter__(self):
        raise RuntimeError(self.message)


def test_a_loader_without_shared_memory_stops_with_what_to_do_and_other_errors_pass_unchanged():
    from noisymix.launch.errors import one_line

    full = "unable to write to file </torch_4242_1337_0>: No space left on device (28)"
    with pytest.raises(shards.SharedMemoryError) as raised:
        list(shards.iterate_batches(FailingInLoader(full), loader_workers=1))
    line = one_line(raised.value)
    assert line.startswith("loader processes could not hand a batch over through shared memory (/dev/shm: ")
    assert "docker --shm-size" in line and line.endswith(f"torch said: RuntimeError: {full}")
    with pytest.raises(RuntimeError, match="a bug of its own") as raised:
        list(shards.iterate_batches(FailingInLoader("a bug of its own"), loader_workers=1))
    assert not isinstance(raised.value, shards.SharedMemoryError)


def test_manifest_records_noise_split_and_checksums(digits_dir):
    manifest = shards.load_manifest(digits_dir)
    assert manifest["noise"]["type"] == "symmetric" and manifest["noise"]["rate"] == 0.4
    assert manifest["noise"]["realised_rate"] == pytest.approx(0.4, abs=1e-3)
    assert manifest["has_true_labels"] and manifest["num_classes"] == 10
    counts = {split: info["count"] for split, info in manifest["splits"].items()}
    assert counts["val"] == pytest.approx(0.1 * (counts["train"] + counts["val"]), abs=1)
    sizes = [s["count"] for s in manifest["splits"]["train"]["shards"]]
    assert len(sizes) == 4 and max(sizes) - min(sizes) <= 1
    shards.check_shards(digits_dir, manifest, full=True)


def test_val_split_is_stratified_by_given_label(digits_dir):
    _, _, train_given = read_split(digits_dir, "train")
    _, _, val_given = read_split(digits_dir, "val")
    share = np.bincount(val_given, minlength=10) / np.bincount(np.concatenate([train_given, val_given]), minlength=10)
    assert np.allclose(share, 0.1, atol=0.03)


def test_same_seed_gives_byte_identical_shards(tmp_path, digits_dir):
    again = prepared(make_config(tmp_path), **quiet)
    first, second = shards.load_manifest(digits_dir), shards.load_manifest(again)
    assert [s["sha256"] for s in first["splits"]["train"]["shards"]] == \
           [s["sha256"] for s in second["splits"]["train"]["shards"]]
    other = prepared(make_config(tmp_path / "other", seed=1), **quiet)
    assert shards.load_manifest(other)["splits"]["train"]["shards"][0]["sha256"] != \
           first["splits"]["train"]["shards"][0]["sha256"]


def test_prepared_dir_is_reused_and_a_different_spec_refused(tmp_path):
    config = make_config(tmp_path)
    target = prepared(config, **quiet)
    stamp = (target / shards.MANIFEST).stat().st_mtime_ns
    assert prepared(config, **quiet) == target
    assert (target / shards.MANIFEST).stat().st_mtime_ns == stamp
    with pytest.raises(SourceError, match="noise_rate"):
        prepared(make_config(tmp_path, noise_rate=0.2), **quiet)
    rebuilt = prepared(make_config(tmp_path, noise_rate=0.2), force=True, **quiet)
    assert shards.load_manifest(rebuilt)["noise"]["rate"] == 0.2


def test_manifest_written_before_a_data_key_existed_is_reused_while_the_key_holds_its_default(tmp_path):
    target = prepared(make_config(tmp_path), **quiet)
    manifest = json.loads((target / shards.MANIFEST).read_text())
    del manifest["spec"]["train_subset"]
    (target / shards.MANIFEST).write_text(json.dumps(manifest))
    assert prepared(make_config(tmp_path), **quiet) == target
    with pytest.raises(SourceError, match="train_subset"):
        prepared(make_config(tmp_path, train_subset=500), **quiet)


def test_train_subset_is_stratified_seeded_and_points_at_the_source(tmp_path):
    source = read_digits()
    target = prepared(make_config(tmp_path, train_subset=500, val_fraction=0.2), **quiet)
    manifest = shards.load_manifest(target)
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 500
    _, images, _ = read_split(target, "train")
    _, _, true = read_split(target, "train", shards.TRUE_LABEL)
    _, val_images, _ = read_split(target, "val")
    _, _, val_true = read_split(target, "val", shards.TRUE_LABEL)
    full = np.bincount(source.train_labels) / len(source.train_labels)
    kept = np.bincount(np.concatenate([true, val_true]), minlength=10) / 500
    assert np.abs(kept - full).max() < 0.01, "every class keeps its share"
    rows = [line.split(",") for line in (target / "samples.csv").read_text().splitlines()[1:]]
    refs = {int(i): ref for i, split, ref in rows if split in ("train", "val")}
    ordered = np.concatenate([images, val_images])
    for sample_id in (0, 123, 499):
        k = int(refs[sample_id].split(":")[1])
        assert np.array_equal(source.train_images[k], ordered[sample_id]), "samples.csv names the source sample"
    again = prepared(make_config(tmp_path / "again", train_subset=500, val_fraction=0.2), **quiet)
    assert (again / "samples.csv").read_text() == (target / "samples.csv").read_text()
    other = prepared(make_config(tmp_path / "other", train_subset=500, val_fraction=0.2, seed=1), **quiet)
    assert (other / "samples.csv").read_text() != (target / "samples.csv").read_text()


@pytest.mark.parametrize("size, message", [(10**6, "more than the 1437"), (5, "cannot hold every class")])
def test_bad_train_subset_is_refused_before_anything_is_written(tmp_path, size, message):
    with pytest.raises(SourceError, match=message):
        prepared(make_config(tmp_path, train_subset=size), **quiet)
    assert not (tmp_path / "data").exists()


def test_interrupted_prepare_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    real_write = shards.write_split

    def failing_write(directory, split, *args, **kwargs):
        if split == "test":
            raise KeyboardInterrupt
        return real_write(directory, split, *args, **kwargs)

    monkeypatch.setattr(prepare_module.shards, "write_split", failing_write)
    with pytest.raises(KeyboardInterrupt):
        prepared(make_config(tmp_path), **quiet)
    assert not (tmp_path / "data").exists()
    assert list(tmp_path.iterdir()) == [], "the staging directory is removed too"


def test_refuses_to_write_into_a_foreign_directory(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    with pytest.raises(SourceError, match="not a prepared dataset"):
        prepared(make_config(tmp_path), **quiet)


def copy_dataset(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_is_detected(tmp_path, digits_dir):
    data = copy_dataset(digits_dir, tmp_path / "d")
    shard = data / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(shards.ShardError, match="train-000001.tar has 5000 bytes"):
        shards.check_shards(data, shards.load_manifest(data))
    with pytest.raises(shards.ShardError, match="corrupt or unreadable shard"):
        list(shards.sample_stream([str(shard)]))
    with pytest.raises(shards.ShardError, match="corrupt or unreadable shard"):
        list(shards.label_stream([str(shard)]))


def test_missing_and_empty_shards_are_detected(tmp_path, digits_dir):
    data = copy_dataset(digits_dir, tmp_path / "d")
    (data / "val-000002.tar").unlink()
    with pytest.raises(shards.ShardError, match="val-000002.tar is missing"):
        shards.check_shards(data, shards.load_manifest(data))
    tarfile.open(data / "val-000002.tar", "w").close()
    with pytest.raises(shards.ShardError, match="bytes"):
        shards.check_shards(data, shards.load_manifest(data))


def test_sample_missing_a_member_names_the_shard(tmp_path):
    import webdataset as wds

    path = tmp_path / "bad.tar"
    with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
        sink.write({"__key__": "0000000001", "input.npy": shards.encode_sample(1, np.zeros((2, 2, 1)), 0, None)["input.npy"]})
    with pytest.raises(shards.ShardError, match=r"bad.tar.*lacks the field"):
        list(shards.sample_stream([str(path)]))
    with pytest.raises(shards.ShardError, match=r"bad.tar.*lacks the field"):
        list(shards.label_stream([str(path)]))


def test_the_index_puts_each_id_at_its_row_and_refuses_ids_that_are_not_consecutive(tmp_path):
    rows = [np.array([[12, 100, 5], [10, 200, 6]]), np.array([[11, 50, 7]])]   # (id, offset, size) per shard
    shards.write_index(tmp_path, "train", rows)
    assert np.load(tmp_path / shards.index_file("train")).tolist() == [[0, 200, 6], [1, 50, 7], [0, 100, 5]]
    for bad in ([np.array([[10, 1, 1], [10, 2, 2]])], [np.array([[10, 1, 1]]), np.array([[12, 2, 2]])]):
        with pytest.raises(shards.ShardError, match="not consecutive"):
            shards.write_index(tmp_path, "val", bad)


def test_manifest_errors(tmp_path):
    with pytest.raises(shards.ShardError, match="run `noisymix prepare` first"):
        shards.load_manifest(tmp_path)
    (tmp_path / shards.MANIFEST).write_text("{not json")
    with pytest.raises(shards.ShardError, match="not valid JSON"):
        shards.load_manifest(tmp_path)
    (tmp_path / shards.MANIFEST).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(shards.ShardError, match="format_version"):
        shards.load_manifest(tmp_path)


def test_rank_split_covers_every_shard_once_and_rotates_by_epoch():
    urls = [f"s{k}" for k in range(8)]
    for seed in (None, 0, 1):
        dealt = [list(shards.RankShards(rank, 2, seed)(iter(urls))) for rank in range(2)]
        assert sorted(dealt[0] + dealt[1]) == sorted(urls)
    assert list(shards.RankShards(0, 2, 0)(iter(urls))) != list(shards.RankShards(0, 2, 1)(iter(urls)))


def test_more_ranks_than_shards_is_refused():
    with pytest.raises(shards.ShardError, match="3 shards cannot feed 4 ranks"):
        shards.sample_stream(["a", "b", "c"], world_size=4)


def test_npy_decoder_matches_numpy_and_refuses_object_arrays():
    import io

    decode = shards.NpyImages()
    for k in range(3):
        image = np.random.default_rng(k).integers(0, 255, (4, 4, 3), dtype=np.uint8)
        assert np.array_equal(decode(shards.encode_sample(k, image, 0, None)["input.npy"]), image)
    buf = io.BytesIO()
    np.save(buf, np.array([None, 1], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        shards.NpyImages()(buf.getvalue())


def corrupt_middle(path, size=4096, seed=0):
    """Overwrite `size` bytes in the middle of a file with random ones: same size, other content."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    data[start:start + size] = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def test_checksums_are_verified_once_per_shard_and_again_when_a_shard_changes(tmp_path, digits_dir):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    manifest = shards.load_manifest(data)
    total = sum(len(info["shards"]) for info in manifest["splits"].values())
    assert shards.check_shards(data, manifest, full=True, cached=True) == total
    assert shards.check_shards(data, manifest, full=True, cached=True) == 0, "cached by size and mtime"
    test_shard = data / manifest["splits"]["test"]["shards"][1]["name"]
    corrupt_middle(test_shard)
    with pytest.raises(shards.ShardError, match=f"{test_shard.name} fails its sha256 check"):
        shards.check_shards(data, manifest, full=True, cached=True)


def test_noisymix_verify_checks_every_shard_and_names_a_corrupt_one(tmp_path, digits_dir, capsys):
    import shutil

    from noisymix.launch.cli import main

    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    assert main(["verify", str(data)]) == 0 and "test: 4 shards, 360 samples" in capsys.readouterr().out
    manifest = shards.load_manifest(data)
    corrupt_middle(data / manifest["splits"]["val"]["shards"][0]["name"])
    assert main(["verify", str(data)]) == 2
    assert "val-000000.tar fails its sha256 check" in capsys.readouterr().err
