import numpy as np
import pytest
import torch

from noisymix.mixing.mixnn import neighbour_weights, synthetic_sample, synthetic_target, update_soft_targets
from noisymix.selection.crossval import SelectionError
from noisymix.selection.gmm import clean_probability, normalise_losses, window_average


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
