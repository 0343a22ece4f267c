import numpy as np
import pytest
import torch
import torch.nn.functional as F

from noisymix.distributed import shards
from noisymix.distributed.engine import (InputTransform, accuracy_counts, build_optimizer, epoch_rng, lr_factor,
                                         random_crop_flip, train_epoch)
from noisymix.distributed.models import create_model
from noisymix.distributed.artifacts import load_checkpoint, save_checkpoint
from noisymix.mixing.losses import one_hot, soft_target_cross_entropy
from noisymix.mixing.ce import PlainTargets
from noisymix.mixing.mixup import MixupTargets, mixup_batch, sample_lambda


def test_soft_target_ce_equals_ce_on_one_hot_targets():
    logits, labels = torch.randn(16, 5), torch.randint(0, 5, (16,))
    assert torch.allclose(soft_target_cross_entropy(logits, one_hot(labels, 5)), F.cross_entropy(logits, labels))


def test_one_hot_refuses_labels_outside_range():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        one_hot(torch.tensor([0, 3]), 3)


def test_mixup_targets_are_the_same_mix_as_inputs():
    rng = np.random.default_rng(0)
    x = torch.arange(8.0).reshape(8, 1)
    t = one_hot(torch.arange(8) % 4, 4)
    mixed_x, mixed_t = mixup_batch(x, t, 1.0, rng)
    assert torch.allclose(mixed_t.sum(1), torch.ones(8))
    rng = np.random.default_rng(0)
    lam = float(sample_lambda(1.0, 1, rng))
    partner = torch.from_numpy(rng.permutation(8))
    assert torch.allclose(mixed_x, lam * x + (1 - lam) * x[partner])
    assert torch.allclose(mixed_t, lam * t + (1 - lam) * t[partner])


def test_lambda_is_beta_distributed():
    lam = sample_lambda(0.5, 50_000, np.random.default_rng(0)).numpy()
    assert lam.mean() == pytest.approx(0.5, abs=0.01)
    assert lam.var() == pytest.approx(1 / (4 * 2), abs=0.01)  # Beta(a, a): 1 / (4 (2a + 1))
    with pytest.raises(ValueError, match="alpha"):
        sample_lambda(0.0, 1, np.random.default_rng(0))


def test_crop_without_padding_is_identity_and_with_padding_a_shifted_window():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    assert torch.equal(random_crop_flip(x, 0, False, np.random.default_rng(0)), x)
    out = random_crop_flip(x, 2, False, np.random.default_rng(0))
    rng = np.random.default_rng(0)
    dy, dx = rng.integers(0, 5, size=2), rng.integers(0, 5, size=2)
    padded = F.pad(x, (2, 2, 2, 2))
    for n in range(2):
        assert torch.equal(out[n], padded[n, :, dy[n]:dy[n] + 6, dx[n]:dx[n] + 6])


def test_flip_mirrors_the_chosen_samples():
    x = torch.randn(64, 1, 3, 3)
    out = random_crop_flip(x, 0, True, np.random.default_rng(1))
    flipped = torch.tensor([torch.equal(o, xi.flip(2)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert (flipped | kept).all() and 10 < flipped.sum() < 54


def test_schedules():
    cosine = lr_factor("cosine", 10, [], 0.1)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)
    steps = lr_factor("multistep", 10, [3, 6], 0.1)
    assert [round(steps(e), 6) for e in (0, 3, 6)] == [1.0, 0.1, 0.01]


@pytest.mark.parametrize("name, size, channels", [("small_cnn", 8, 1), ("small_cnn", 28, 1), ("preact_resnet18", 32, 3)])
def test_models_give_logits_and_features(name, size, channels):
    model = create_model(name, channels, 7, size, width=8)
    x = torch.randn(2, channels, size, size)
    assert model(x).shape == (2, 7) and model.features(x).shape == (2, model.feature_dim)


def test_models_are_channels_last_and_layout_does_not_change_outputs():
    """create_model returns channels_last weights (the fast layout); NCHW and NHWC inputs agree."""
    torch.manual_seed(0)
    model = create_model("small_cnn", 3, 5, 8, width=4).eval()
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(model(x), model(x.contiguous(memory_format=torch.channels_last)))


def test_train_epoch_learns_digits_in_process(digits_dir):
    """The same training code the Ray worker runs, without Ray: loss falls and test accuracy rises."""
    manifest = shards.load_manifest(digits_dir)
    urls = {s: shards.shard_urls(digits_dir, manifest, s) for s in ("train", "test")}
    torch.manual_seed(0)
    model = create_model("auto", 1, 10, 8)
    optimizer = build_optimizer(model, 0.05, 0.9, 5e-4)
    transform = InputTransform(tuple(manifest["mean"]), tuple(manifest["std"]), padding=1)
    test = lambda: accuracy_counts(model, shards.sample_stream(urls["test"], batch_size=256), transform, torch.device("cpu"))
    before = test()
    losses = []
    for epoch in range(4):
        stream = shards.sample_stream(urls["train"], shard_seed=epoch, shuffle_buffer=500, batch_size=64)
        losses.append(train_epoch(model, optimizer, stream, PlainTargets(10), transform, torch.device("cpu"),
                                  epoch_rng(0, epoch, 0)).mean_loss)
    correct, total = test()
    assert total == manifest["splits"]["test"]["count"]
    assert losses[-1] < losses[0] and correct / total > before[0] / before[1] + 0.3


def test_train_epoch_steps_on_the_batch_rules_own_loss(digits_dir):
    """A rule's `loss` is what the optimizer steps on (CrossMix's forward correction); the default is soft CE."""
    manifest = shards.load_manifest(digits_dir)
    stream = shards.sample_stream(shards.shard_urls(digits_dir, manifest, "train"), batch_size=64)
    transform = InputTransform(tuple(manifest["mean"]), tuple(manifest["std"]))
    seen = []

    class DoubledLoss(PlainTargets):
        def loss(self, logits, targets):
            seen.append(len(targets))
            return 2 * super().loss(logits, targets)

    model = create_model("auto", 1, 10, 8)
    stats = train_epoch(model, build_optimizer(model, 0.0, 0.9, 0.0), stream, DoubledLoss(10), transform,
                        torch.device("cpu"), np.random.default_rng(0))
    assert sum(seen) == stats.samples == manifest["splits"]["train"]["count"]
    plain = train_epoch(model, build_optimizer(model, 0.0, 0.9, 0.0), stream, PlainTargets(10), transform,
                        torch.device("cpu"), np.random.default_rng(0))
    assert stats.mean_loss == pytest.approx(2 * plain.mean_loss, rel=1e-5), "lr 0: the same model, twice the loss"


def test_nan_loss_stops_with_the_step_range(digits_dir):
    manifest = shards.load_manifest(digits_dir)
    model = create_model("auto", 1, 10, 8)
    optimizer = build_optimizer(model, 1e30, 0.9, 0.0)
    stream = shards.sample_stream(shards.shard_urls(digits_dir, manifest, "train"), batch_size=64)
    transform = InputTransform(tuple(manifest["mean"]), tuple(manifest["std"]))
    with pytest.raises(FloatingPointError, match="between steps"):
        train_epoch(model, optimizer, stream, MixupTargets(10), transform, torch.device("cpu"),
                    np.random.default_rng(0), check_every=2)


def test_checkpoint_round_trip_loads_with_weights_only(tmp_path):
    model = create_model("small_cnn", 1, 10, 8, width=4)
    optimizer = build_optimizer(model, 0.1, 0.9, 0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor("multistep", 10, [2], 0.1))
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    optimizer.step()
    scheduler.step()
    save_checkpoint(tmp_path / "state.pt", model, optimizer, scheduler, epoch=3, seed=7)
    state = load_checkpoint(tmp_path / "state.pt")
    fresh = create_model("small_cnn", 1, 10, 8, width=4)
    fresh.load_state_dict(state["model"])
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert state["epoch"] == 3 and state["seed"] == 7 and state["scheduler"]["last_epoch"] == 1


def test_checkpoint_loader_refuses_arbitrary_objects(tmp_path):
    import pickle

    torch.save({"model": {}, "evil": np.random.default_rng(0)}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path / "evil.pt")
