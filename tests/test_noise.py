import numpy as np
import pytest

from noisymix.launch import noise

C = 10
TRUE = np.repeat(np.arange(C), 200)


@pytest.mark.parametrize("kind", ["symmetric", "symmetric_incl", "pairflip", "instance", "asymmetric"])
def test_same_seed_same_labels_other_seed_other_labels(kind):
    images = np.random.default_rng(1).random((TRUE.size, 16))
    run = lambda seed: noise.apply_noise(TRUE, C, kind, 0.4, seed, images=images, dataset="mnist")
    assert np.array_equal(run(3), run(3))
    assert not np.array_equal(run(3), run(4))


def test_symmetric_moves_exactly_rate_to_other_classes():
    noisy = noise.symmetric(TRUE, C, 0.4, seed=0)
    assert (noisy != TRUE).sum() == round(0.4 * TRUE.size)
    moved = noisy[noisy != TRUE]
    # every other class receives flips: a uniform draw over the C - 1 others
    assert len(np.unique(moved)) == C


def test_symmetric_incl_keeps_some_true_labels():
    rate = noise.realised_rate(noise.symmetric_incl(TRUE, C, 0.8, seed=0), TRUE)
    assert rate == pytest.approx(0.8 * (C - 1) / C, abs=0.03)
    assert rate < 0.8


def test_pairflip_only_moves_to_next_class():
    noisy = noise.pairflip(TRUE, C, 0.4, seed=0)
    flipped = noisy != TRUE
    assert np.array_equal(noisy[flipped], (TRUE[flipped] + 1) % C)
    assert noise.realised_rate(noisy, TRUE) == pytest.approx(0.4, abs=0.04)


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_asymmetric_follows_the_dataset_map_and_leaves_other_classes(dataset):
    noisy = noise.apply_noise(TRUE, C, "asymmetric", 0.4, 0, dataset=dataset)
    flipped = noisy != TRUE
    mapping = noise.ASYMMETRIC_MAPS[dataset]
    assert all(mapping[int(t)] == int(n) for t, n in zip(TRUE[flipped], noisy[flipped]))
    unmapped = ~np.isin(TRUE, list(mapping))
    assert np.array_equal(noisy[unmapped], TRUE[unmapped])


def test_asymmetric_needs_a_map_for_unknown_datasets():
    with pytest.raises(noise.NoiseError, match="noise_map"):
        noise.apply_noise(TRUE, C, "asymmetric", 0.4, 0, dataset="kmnist")
    custom = noise.apply_noise(TRUE, C, "asymmetric", 0.5, 0, dataset="fashion-mnist", class_map={6: 0})
    assert set(np.unique(custom[custom != TRUE])) == {0}


def test_cifar100_map_stays_within_blocks_of_five():
    labels = np.repeat(np.arange(100), 10)
    noisy = noise.apply_noise(labels, 100, "asymmetric", 0.9, 0, dataset="cifar100")
    assert np.array_equal(noisy // 5, labels // 5)
    assert noise.ASYMMETRIC_MAPS["cifar100"][4] == 0


def test_instance_noise_rate_and_dependence_on_pixels():
    images = np.random.default_rng(0).random((TRUE.size, 64))
    noisy = noise.instance(TRUE, C, 0.4, 0, images)
    assert noise.realised_rate(noisy, TRUE) == pytest.approx(0.4, abs=0.03)
    other = noise.instance(TRUE, C, 0.4, 0, images[::-1].copy())
    assert not np.array_equal(noisy, other)


def test_file_noise_from_npy_and_npz(tmp_path):
    given = (TRUE + 1) % C
    np.save(tmp_path / "labels.npy", given)
    np.savez(tmp_path / "human.npz", aggre_label=given, worse_label=TRUE)
    assert np.array_equal(noise.apply_noise(TRUE, C, "file", 0.0, 0, noise_file=str(tmp_path / "labels.npy")), given)
    assert np.array_equal(noise.from_file(TRUE, C, tmp_path / "human.npz", "aggre_label"), given)
    with pytest.raises(noise.NoiseError, match="holds keys"):
        noise.from_file(TRUE, C, tmp_path / "human.npz", "random_label9")


@pytest.mark.parametrize("content, message", [
    (np.arange(5), "shape"),
    (np.full(TRUE.size, C), r"\[0, 10\)"),
    (np.zeros(TRUE.size, dtype=np.float32), "not integer"),
])
def test_file_noise_rejects_bad_files(tmp_path, content, message):
    np.save(tmp_path / "bad.npy", content)
    with pytest.raises(noise.NoiseError, match=message):
        noise.from_file(TRUE, C, tmp_path / "bad.npy", None)


def test_file_noise_refuses_pickles_and_missing_files(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(noise.NoiseError, match="cannot read"):
        noise.from_file(TRUE[:1], C, tmp_path / "obj.npy", None)
    with pytest.raises(noise.NoiseError, match="not found"):
        noise.from_file(TRUE, C, tmp_path / "absent.npy", None)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_rate_outside_unit_interval_is_refused(rate):
    with pytest.raises(noise.NoiseError, match="rate"):
        noise.symmetric(TRUE, C, rate, 0)


def test_unknown_type_and_out_of_range_labels_are_refused():
    with pytest.raises(noise.NoiseError, match="unknown noise type"):
        noise.apply_noise(TRUE, C, "gaussian", 0.2, 0)
    with pytest.raises(noise.NoiseError, match=r"\[0, 10\)"):
        noise.symmetric(np.array([0, 10]), C, 0.2, 0)


def test_inputs_are_not_modified():
    labels = TRUE.copy()
    noise.symmetric(labels, C, 0.5, 0)
    assert np.array_equal(labels, TRUE)
