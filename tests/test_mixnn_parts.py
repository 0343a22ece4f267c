import numpy as np
import pytest
import torch

from noisymix.mixing.mixnn import neighbour_weights, synthetic_sample, synthetic_target, update_soft_targets
from noisymix.selection.crossval import SelectionError
from noisymix.selection.gmm import (clean_probability, given_label_verdict, normalise_losses,
                                   out_of_fold_clean_probability, window_average)


def test_gmm_picks_the_low_loss_component_on_a_planted_bimodal_case():
    rng = np.random.default_rng(0)
    clean = rng.normal(0.2, 0.05, 700)
    noisy = rng.normal(2.0, 0.3, 300)
    result = clean_probability(normalise_losses(np.concatenate([clean, noisy])))
    assert not result.degenerate and result.means[0] < result.means[1]
    assert result.w[:700].mean() > 0.95 and result.w[700:].mean() < 0.05
    assert ((result.w > 0.5) == (np.arange(1000) < 700)).mean() > 0.99


@pytest.mark.parametrize("losses, reason", [(np.full(50, 0.7), "constant"), (np.array([1.0]), "constant")])
def test_degenerate_losses_give_all_trusted_not_nan(losses, reason):
    result = clean_probability(normalise_losses(losses))
    assert result.degenerate and reason in result.reason
    assert np.array_equal(result.w, np.ones(len(losses)))


def test_out_of_fold_clean_probability_rescales_p_given_and_keeps_a_perfect_table_exact():
    given = np.arange(200) % 10
    noisy = np.arange(200) < 80
    p_given = np.where(noisy, 0.05, 0.35) + np.random.default_rng(1).uniform(-0.02, 0.02, 200)
    probs = np.repeat(((1 - p_given) / 9)[:, None], 10, axis=1)
    probs[np.arange(200), given] = p_given
    w = out_of_fold_clean_probability(probs, given).w
    np.testing.assert_array_equal(w < 0.5, noisy)
    perfect = np.eye(10)[np.where(noisy, (given + 1) % 10, given)]
    np.testing.assert_array_equal(out_of_fold_clean_probability(perfect, given).w, (~noisy).astype(float))


def test_given_label_verdict_distrusts_corrected_targets_whatever_their_clean_probability():
    given = np.array([0, 0, 1, 1, 2])
    corrected = np.array([0, 0, 2, 2, 2])
    clean = np.array([0.9, 0.2, 0.9, 0.1, 0.5])
    flagged, trust = given_label_verdict(given, corrected, clean, threshold=0.5)
    assert flagged.tolist() == [False, True, True, True, False]
    np.testing.assert_allclose(trust, [0.95, 0.6, 0.05, 0.45, 0.75])
    assert list(np.argsort(trust)) == [2, 3, 1, 4, 0], "confident corrections first, trusted agreements last"
    with pytest.raises(ValueError, match="must match"):
        given_label_verdict(given, corrected[:3], clean)


def test_normalise_and_average():
    assert normalise_losses(np.array([2.0, 4.0, 3.0])).tolist() == [0.0, 1.0, 0.5]
    history = [np.array([0.0, 1.0]), np.array([1.0, 1.0]), np.array([0.5, 0.0])]
    assert window_average(history, 2).tolist() == [0.75, 0.5]
    with pytest.raises(SelectionError, match="not finite"):
        normalise_losses(np.array([0.1, np.nan]))


def test_soft_target_ema_on_a_hand_case():
    t = torch.tensor([[1.0, 0.0, 0.0]])
    p = torch.tensor([[0.0, 0.5, 0.5]])
    assert torch.allclose(update_soft_targets(t, p, 0.9), torch.tensor([[0.9, 0.05, 0.05]]))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        update_soft_targets(t, p, 1.0)


def test_neighbour_weights_sum_to_one_and_favour_cleaner_samples():
    a = neighbour_weights(torch.tensor([0.9, 0.1]), torch.tensor([[0.1, 0.1], [0.9, 0.8]]), eps=1e-3)
    assert torch.allclose(a.sum(1), torch.ones(2))
    assert a[0, 0] > a[0, 1] and a[1, 1] > a[1, 0]
    zero = neighbour_weights(torch.zeros(1), torch.zeros(1, 3), eps=1e-3)
    assert torch.allclose(zero, torch.full((1, 4), 0.25)), "all-noisy neighbourhoods mix evenly, never 0/0"


def test_synthetic_sample_and_target():
    x = torch.tensor([[1.0, 1.0], [0.0, 2.0]])[:, :, None]          # B=2, feature 2x1
    xn = torch.tensor([[[3.0, 3.0]], [[4.0, 0.0]]])[:, :, :, None]  # K=1
    a = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    assert torch.allclose(synthetic_sample(x, xn, a).squeeze(-1), torch.tensor([[2.5, 2.5], [2.0, 1.0]]))
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tn = torch.tensor([[[0.0, 1.0]], [[0.3, 0.7]]])
    target = synthetic_target(t, tn, a)
    assert torch.allclose(target.sum(1), torch.ones(2)) and torch.allclose(target[0], torch.tensor([0.25, 0.75]))


class FakeState:
    """Per-sample state of 4 ids in 2 classes; ids 0 and 1 look alike, as do 2 and 3."""

    ready = True
    targets = torch.tensor([[1.0, 0.0], [0.8, 0.2], [0.0, 1.0], [0.1, 0.9]])
    clean = torch.tensor([0.9, 0.1, 0.5, 0.5])
    embeddings = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [1.0, 0.0], [0.0, 1.0], [0.1, 1.0]]), dim=1)
    neighbours = torch.tensor([[1], [0], [3], [2]])

    def targets_of(self, ids):
        return self.targets[ids]

    def clean_of(self, ids):
        return self.clean[ids]

    def neighbours_of(self, ids):
        return self.neighbours[ids]

    def embeddings_of(self, ids):
        return self.embeddings[ids]


def inputs_of(ids):
    return torch.tensor(ids, dtype=torch.float32)[:, None, None, None].expand(len(ids), 1, 2, 2).clone()


@pytest.mark.parametrize("source", ["batch", "global"])
def test_mixnn_mixes_each_sample_with_its_neighbour_weighted_by_clean_probability(source):
    from noisymix.mixing.mixnn import MixNNTargets

    fetch = lambda ids, rng: inputs_of(list(ids))
    method = MixNNTargets(2, FakeState(), k=1, eps=1e-3, neighbour_source=source, fetch_inputs=fetch, phase="neighbours")
    ids = torch.tensor([0, 1, 2, 3])
    x, t = method.batch(ids, inputs_of([0, 1, 2, 3]), torch.tensor([0, 0, 1, 1]), np.random.default_rng(0))
    a0 = (0.9 + 1e-3) / (0.9 + 0.1 + 2e-3)
    assert float(x[0, 0, 0, 0]) == pytest.approx(a0 * 0 + (1 - a0) * 1, abs=1e-5)
    assert torch.allclose(t[0], a0 * FakeState.targets[0] + (1 - a0) * FakeState.targets[1], atol=1e-5)
    assert torch.allclose(t.sum(1), torch.ones(4))
    assert float(x[2, 0, 0, 0]) == pytest.approx(2.5, abs=1e-5), "equal clean probabilities mix evenly"


def test_mixnn_phases_and_bad_options():
    from noisymix.mixing.mixnn import MixNNTargets

    method = MixNNTargets(2, FakeState(), phase="warmup")
    ids, labels = torch.tensor([0, 1]), torch.tensor([0, 1])
    _, t = method.batch(ids, inputs_of([0, 1]), labels, np.random.default_rng(0))
    assert torch.equal(t, torch.eye(2)), "warm-up trains on the given labels"
    method.phase = "mixup"
    _, t = method.batch(ids, inputs_of([0, 1]), labels, np.random.default_rng(0))
    assert torch.allclose(t.sum(1), torch.ones(2))
    with pytest.raises(ValueError, match="fetch_inputs"):
        MixNNTargets(2, FakeState(), neighbour_source="global")
    with pytest.raises(ValueError, match="K must be"):
        MixNNTargets(2, FakeState(), k=0)


def test_gmm_select_keeps_only_samples_the_gmm_calls_clean():
    from noisymix.mixing.gmm_select import GMMSelectTargets

    method = GMMSelectTargets(2, FakeState(), 0.5, phase="select")
    _, t = method.batch(torch.tensor([0, 1, 2, 3]), inputs_of([0, 1, 2, 3]), torch.tensor([0, 0, 1, 1]),
                        np.random.default_rng(0))
    assert t.sum(1).tolist() == [1.0, 0.0, 0.0, 0.0]
