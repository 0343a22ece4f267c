"""Image-list sources: scanned without decoding, written as JPEG shards by parallel streaming writers (with
an index, pixel statistics and resume), read back by id and cropped in the loader."""

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import make_config
from noisymix.distributed import shards
from noisymix.distributed.engine import DataInfo
from noisymix.distributed.images import (ImageDecodeError, JpegCrops, PixelSums, encode_jpeg, open_rgb,
                                         random_resized_crop_box, stored_image)
from noisymix.launch.config import ConfigError
from noisymix.launch.image_lists import ShardJob, read_line_path, scan_image_list, stats_stride
from noisymix.launch.prepare import prepare
from noisymix.launch.sources import SourceError
from noisymix.launch.synth import SynthSection, synthesize
from noisymix.launch.train import preflight

LIST = dict(source="image_list", noise_type="none", noise_rate=0.0, num_shards=2, prepare_workers=1)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    """60 train / 20 test JPEGs of 3 classes, 40-80 px, 20% of the train labels flipped (truth in train_true.txt)."""
    out = tmp_path_factory.mktemp("synth") / "list"
    return synthesize(SynthSection.from_values({"out": str(out), "train": 60, "test": 20, "classes": 3,
                                                "min_size": 40, "max_size": 80, "noise_rate": 0.2, "workers": 1}),
                      log=lambda *_: None)


def prepared(tmp_path, source, **overrides):
    config = make_config(tmp_path, source_path=str(source), **{**LIST, **overrides})
    return prepare(config.data, config.run.seed, log=lambda *_: None), config


def test_an_image_list_becomes_jpeg_shards_with_an_index_and_true_labels(tmp_path, synth_dir):
    target, _ = prepared(tmp_path, synth_dir, stored_size=48)
    manifest = shards.load_manifest(target)
    assert manifest["image_format"] == "jpeg" and manifest["num_classes"] == 3 and manifest["has_true_labels"]
    counts = {split: info["count"] for split, info in manifest["splits"].items()}
    assert counts == {"train": 54, "val": 6, "test": 20}
    assert manifest["noise"]["realised_rate"] == pytest.approx(0.2, abs=0.02)
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".tar")) == [
        "manifest.json", "samples.csv", "test.index.npy", "test.labels.npy", "train.index.npy", "train.labels.npy",
        "val.index.npy", "val.labels.npy"]
    reader = shards.SampleReader(target, manifest, "train")
    sides = [min(open_rgb(reader.read(i)).size) for i in range(counts["train"])]
    assert max(sides) == 48 and manifest["splits"]["train"]["min_side"] == min(sides) >= 40
    given = shards.load_labels(str(target), manifest)
    true = shards.load_labels(str(target), manifest, label_key=shards.TRUE_LABEL)
    assert 0 < np.mean(given != true) < 0.35
    for split in counts:   # the labels files say what the shards say
        for key in (shards.GIVEN_LABEL, shards.TRUE_LABEL):
            assert np.array_equal(shards.load_labels(str(target), manifest, split, key),
                                  shards.scan_labels(str(target), manifest, split, key))
    shards.check_shards(target, manifest, full=True)
    with open(target / "samples.csv") as fh:   # each id names the list line whose label it carries
        refs = list(csv.DictReader(fh))
    assert [int(r["id"]) for r in refs] == list(range(sum(counts.values())))
    assert [r["split"] for r in refs] == ["train"] * 54 + ["val"] * 6 + ["test"] * 20
    lines = {name: (synth_dir / name).read_text().splitlines() for name in ("train.txt", "test.txt")}
    for split in ("train", "test"):
        labels = shards.load_labels(str(target), manifest, split)
        for r, label in zip((r for r in refs if r["split"] == split), labels):
            name, line = r["source_ref"].split(":")
            assert int(lines[name][int(line) - 1].rsplit(maxsplit=1)[1]) == label


def test_shards_store_a_jpeg_sources_own_bytes_at_stored_size_0(tmp_path, synth_dir):
    target, _ = prepared(tmp_path, synth_dir, stored_size=0)
    manifest = shards.load_manifest(target)
    reader = shards.SampleReader(target, manifest, "test")
    first_test = manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"]
    source = (synth_dir / (synth_dir / "test.txt").read_text().split()[0]).read_bytes()
    assert reader.read(first_test) == source


def test_jpegs_that_need_no_resize_keep_their_own_bytes_and_larger_ones_are_re_encoded(tmp_path, synth_dir):
    target, _ = prepared(tmp_path, synth_dir, stored_size=60)
    manifest = shards.load_manifest(target)
    reader = shards.SampleReader(target, manifest, "test")
    first_test = manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"]
    kept = 0
    for k, line in enumerate((synth_dir / "test.txt").read_text().splitlines()):
        source = (synth_dir / line.split()[0]).read_bytes()
        stored = reader.read(first_test + k)
        with Image.open(synth_dir / line.split()[0]) as image:
            small = min(image.size) <= 60
        assert (stored == source) == small
        assert min(open_rgb(stored).size) == (min(open_rgb(source).size) if small else 60)
        kept += small
    assert 0 < kept < 20


def test_training_crops_are_seeded_by_epoch_and_id_and_evaluation_crops_are_fixed(tmp_path, synth_dir):
    target, _ = prepared(tmp_path, synth_dir, stored_size=48)
    manifest = shards.load_manifest(target)
    data = shards.SampleReader(target, manifest).read(5)
    crop = JpegCrops(32, train=True, seed=1, epoch=0)
    assert crop(data, 5).shape == (32, 32, 3) and np.array_equal(crop(data, 5), crop(data, 5))
    assert not np.array_equal(crop(data, 5), JpegCrops(32, train=True, seed=1, epoch=1)(data, 5))
    evaluation = JpegCrops(32)
    assert np.array_equal(evaluation(data, 5), evaluation(data, 5))
    urls = shards.shard_urls(target, manifest, "train")
    batches = list(shards.sample_stream(urls, images=crop, batch_size=16))
    assert sum(len(b[0]) for b in batches) == 54 and batches[0][1].shape == (16, 32, 32, 3)


def test_random_resized_crops_stay_inside_the_image_and_cover_the_scale():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box((120, 80), rng, (0.3, 1.0))
        assert 0 <= left < right <= 120 and 0 <= top < bottom <= 80
        assert (right - left) * (bottom - top) >= 0.2 * 120 * 80


def test_pixel_sums_of_shards_combine_into_the_whole_mean_and_std():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 5, 5, 3), dtype=np.uint8)
    a, b = PixelSums(), PixelSums()
    a.add(images[:4])
    b.add(images[4:])
    mean, std = a.merge(b).mean_std()
    np.testing.assert_allclose(mean, (images / 255.0).reshape(-1, 3).mean(0))
    np.testing.assert_allclose(std, (images / 255.0).reshape(-1, 3).std(0))


def test_an_interrupted_prepare_resumes_writing_only_the_missing_shards(tmp_path, synth_dir):
    source = tmp_path / "list"
    shutil.copytree(synth_dir, source)
    last_line = (source / "train.txt").read_text().splitlines()[-1].split()[0]
    (source / last_line).rename(source / "moved.jpg")
    logs = []
    config = make_config(tmp_path, source_path=str(source), **LIST)
    with pytest.raises(SourceError, match=r"train.txt:60: .*cannot read the image"):
        prepare(config.data, config.run.seed, log=logs.append)
    assert not (tmp_path / "data").exists(), "nothing that looks prepared"
    (source / "moved.jpg").rename(source / last_line)
    target = prepare(config.data, config.run.seed, log=logs.append)
    assert any("already written by an earlier run, kept" in line for line in logs)
    clean, _ = prepared(tmp_path / "clean", source)
    for a, b in zip(shards.load_manifest(target)["splits"]["train"]["shards"],
                    shards.load_manifest(clean)["splits"]["train"]["shards"]):
        assert a["sha256"] == b["sha256"], "a resumed prepare writes the same shards"
    assert not list(tmp_path.glob(".data.partial-*")), "the staging folder is gone once renamed"


@pytest.mark.parametrize("line, message", [
    ("images/x.jpg zero", r"train.txt:1: expected 'relative/path.jpg label'"),
    ("../outside.jpg 0", r"train.txt:1: '../outside.jpg' is outside the list's folder"),
    ("/etc/passwd 0", r"train.txt:1: '/etc/passwd' is outside the list's folder"),
    ("images/x.jpg 7", r"train.txt:1: label 7 is outside \[0, 3\)"),
])
def test_bad_list_lines_are_named_before_anything_is_written(tmp_path, synth_dir, line, message):
    source = tmp_path / "list"
    shutil.copytree(synth_dir, source)
    (source / "train_true.txt").unlink()
    (source / "train.txt").write_text(line + "\n" + (source / "train.txt").read_text())
    with pytest.raises(SourceError, match=message):
        prepared(tmp_path, source)
    assert not (tmp_path / "data").exists() and not list(tmp_path.glob(".data.partial-*"))


def test_an_undecodable_image_stops_with_its_line_or_is_skipped_and_counted(tmp_path, synth_dir):
    source = tmp_path / "list"
    shutil.copytree(synth_dir, source)
    bad = (source / "train.txt").read_text().splitlines()[2].split()[0]
    (source / bad).write_bytes(b"not an image at all")
    with pytest.raises(SourceError, match=r"train.txt:3: .*not a decodable image.*skip_bad_images=true"):
        prepared(tmp_path, source)
    logs = []
    config = make_config(tmp_path / "skip", source_path=str(source), skip_bad_images=True, **LIST)
    target = prepare(config.data, config.run.seed, log=logs.append)
    assert any("skipped 1 of 60 lines" in line and "line 3" in line for line in logs)
    manifest = shards.load_manifest(target)
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 59


def test_a_val_list_is_the_validation_split_and_class_limit_keeps_the_first_classes(tmp_path, synth_dir):
    source = tmp_path / "list"
    shutil.copytree(synth_dir, source)
    (source / "val.txt").write_text((source / "test.txt").read_text())
    target, _ = prepared(tmp_path, source, class_limit=2)
    manifest = shards.load_manifest(target)
    assert manifest["num_classes"] == 2 and manifest["class_names"] == ["class0", "class1"]
    assert manifest["splits"]["val"]["count"] == manifest["splits"]["test"]["count"] == 14
    assert set(shards.load_labels(str(target), manifest)) <= {0, 1}


def test_a_crop_larger_than_the_stored_images_is_refused_before_training(tmp_path, synth_dir):
    config = make_config(tmp_path, source_path=str(synth_dir), stored_size=48, crop_size=64, method="ce", **LIST)
    with pytest.raises(ConfigError, match=r"crop_size=64 is larger than the smallest stored image"):
        preflight(config, log=lambda *_: None)
    assert not (tmp_path / "run").exists()
    manifest = shards.load_manifest(config.data.data_dir)
    assert DataInfo.from_manifest(manifest, 32).height == 32 and DataInfo.from_manifest(manifest).height == 224


def test_synth_writes_a_learnable_balanced_list_and_refuses_to_overwrite(tmp_path, synth_dir):
    labels = [int(line.split()[1]) for line in (synth_dir / "train_true.txt").read_text().splitlines()]
    assert np.bincount(labels).tolist() == [20, 20, 20]
    with Image.open(synth_dir / (synth_dir / "test.txt").read_text().split()[0]) as image:
        assert image.format == "JPEG" and 40 <= min(image.size) <= max(image.size) <= 80
    with pytest.raises(ConfigError, match="already holds a dataset"):
        synthesize(SynthSection.from_values({"out": str(synth_dir), "train": 3}), log=lambda *_: None)
    assert json.loads(json.dumps(SynthSection().to_dict()))["train"] == 20_000


@pytest.mark.parametrize("method", [["method=selectmix", "partner_source=global", "folds=2", "fold_epochs=1",
                                     "fold_cpus=2", "epochs=1"],
                                    ["method=mixnn", "epochs=3", "warmup=1", "es=2", "loader_workers=1"]])
def test_selectmix_and_mixnn_train_on_jpeg_shards_reading_partners_by_id(ray_session, synth_dir, tmp_path, capsys,
                                                                          method):
    from noisymix.distributed.artifacts import RunDir
    from noisymix.launch.cli import main

    code = main(["train", "source=image_list", f"source_path={synth_dir}", "noise_type=none", "noise_rate=0",
                 "num_shards=2", "prepare_workers=1", "stored_size=48", "crop_size=32", "model=small_cnn", "width=8",
                 "num_workers=2", f"data_dir={tmp_path / 'data'}", f"run_dir={tmp_path / 'run'}", *method])
    assert code == 0, capsys.readouterr().err
    run = RunDir(tmp_path / "run")
    summary = run.summary()
    assert summary["detection"]["noise_rate"] == pytest.approx(0.2, abs=0.05), "train_true.txt scores the detector"
    issues = run.label_issues()
    assert sorted(issues["id"]) == list(range(54))
    if "method=selectmix" in method:
        assert run.metrics()[0]["samples_mixed"] == run.metrics()[0]["samples_flagged"] > 0
    else:
        assert [r["phase"] for r in run.metrics()] == ["warmup", "mixup", "neighbours"]


def test_pixel_sums_of_an_image_equal_those_of_its_pixels():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(19, 29, 3), dtype=np.uint8)
    from_image, from_array = PixelSums(), PixelSums()
    from_image.add_image(Image.fromarray(pixels))
    from_array.add(pixels)
    assert from_image == from_array and from_image.count == 19 * 29


def test_pixel_sums_of_uint8_images_equal_the_float_sums():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(5, 17, 23, 3), dtype=np.uint8)
    exact, as_float = PixelSums(), PixelSums()
    exact.add(pixels)
    as_float.add(pixels.astype(np.float32))
    assert exact.count == as_float.count == 5 * 17 * 23
    assert np.allclose(exact.total, as_float.total, rtol=1e-12) and np.allclose(exact.squares, as_float.squares,
                                                                                  rtol=1e-12)


def test_mean_and_std_come_from_every_sth_training_image_and_the_other_splits_add_none(tmp_path, synth_dir):
    assert [stats_stride(n) for n in (60, 1999, 2000, 5000, 80_000)] == [1, 1, 2, 5, 8]
    listed = scan_image_list(synth_dir).splits["train"]
    part = listed.take(np.arange(20))

    def sums(stats_every):
        job = ShardJob(tmp_path / f"train-{stats_every}.tar", synth_dir, part, np.arange(20), 0, 90, stats_every)
        return PixelSums(**job()["sums"])

    expected = PixelSums()
    with open(listed.path, "rb") as fh:
        for k in range(0, 20, 3):
            expected.add_image(open_rgb((synth_dir / read_line_path(fh, part.offsets[k])).read_bytes()))
    assert sums(3) == expected and expected.count > 0
    assert sums(0).count == 0


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_truncated_jpeg_kept_as_its_own_bytes_is_refused_with_its_line_without_pixel_statistics(tmp_path, synth_dir,
                                                                                               split):
    source = tmp_path / "list"
    shutil.copytree(synth_dir, source)
    bad = source / (source / f"{split}.txt").read_text().splitlines()[1].split()[0]
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) // 2])
    with pytest.raises(ImageDecodeError):
        stored_image(bad.read_bytes(), 0, 90, with_pixels=False)
    assert stored_image(data, 0, 90, with_pixels=False)[:2] == (data, None)
    with pytest.raises(SourceError, match=rf"{split}.txt:2: .*not a decodable image"):
        prepared(tmp_path, source, stored_size=0)


def test_a_jpeg_twice_the_stored_size_is_re_encoded_at_it_not_kept_because_dct_scaling_reached_it():
    rng = np.random.default_rng(0)
    big = encode_jpeg(Image.fromarray(rng.integers(0, 256, (512, 768, 3), dtype=np.uint8)), 90)
    data, image, side = stored_image(big, 256, 90)
    assert data != big and side == 256 and open_rgb(data).size == image.size == (384, 256)
