"""CrossMix's formulas and batch rule (docs/crossmix.md H2-H3), on hand-made tables."""

import numpy as np
import pytest
import torch

from noisymix.launch.config import ConfigError, build_config
from noisymix.mixing.crossmix import CrossMixTargets, dominant_lambda, label_guess, sharpen
from noisymix.mixing.losses import forward_corrected_cross_entropy, soft_target_cross_entropy
from noisymix.mixing.method import BatchContext
from noisymix.selection.mismatch import build_mixing_table

C = 3


def test_sharpen_by_hand():
    q = sharpen(torch.tensor([[0.6, 0.3, 0.1]]), 0.5)
    expected = torch.tensor([0.36, 0.09, 0.01]) / 0.46
    assert torch.allclose(q, expected[None])
    assert torch.allclose(sharpen(torch.tensor([[0.6, 0.3, 0.1]]), 1.0), torch.tensor([[0.6, 0.3, 0.1]]))
    with pytest.raises(ValueError, match="temperature"):
        sharpen(q, 0.0)


def test_label_guess_is_the_mean_where_both_are_given():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])
    assert torch.equal(label_guess(a, None), a) and torch.equal(label_guess(None, b), b)
    assert torch.allclose(label_guess(a, b), torch.tensor([[0.75, 0.25]]))
    with pytest.raises(ValueError):
        label_guess(None, None)


def test_dominant_lambda_keeps_each_row_mostly_its_own():
    assert torch.allclose(dominant_lambda(torch.tensor([0.2, 0.5, 0.9])), torch.tensor([0.8, 0.5, 0.9]))


def make_table(n=40):
    """Given labels cycle over the classes; ids 0 mod 4 are predicted one class further (flagged)."""
    given = np.arange(n) % C
    predicted = given.copy()
    predicted[::4] = (given[::4] + 1) % C
    probs = np.full((n, C), 0.1, dtype=np.float32)
    probs[np.arange(n), predicted] = 0.8
    return build_mixing_table(probs, given), given


def batch_of(ids, given):
    ids = np.asarray(ids)
    inputs = torch.from_numpy(ids).float()[:, None, None, None].expand(len(ids), 1, 2, 2).clone()
    return torch.from_numpy(ids), inputs, torch.from_numpy(given[ids])


def unmixed(rule, ids, given):
    """The rule with alpha so small that every lambda' is 1 to float precision: targets before mixing."""
    rule.alpha = 1e-4
    return rule.batch(*batch_of(ids, given), np.random.default_rng(0))


def test_trusted_rows_keep_their_label_and_flagged_rows_get_the_sharpened_guess():
    table, given = make_table()
    rule = CrossMixTargets(C, uncertain=table.uncertain, probs=table.probs, guess="oof", temperature=0.5,
                           flagged_weight=0.5)
    ids = np.arange(12)
    _, targets = unmixed(rule, ids, given)
    flagged = ids % 4 == 0
    assert torch.allclose(targets[~flagged], torch.eye(C)[given[ids[~flagged]]], atol=1e-3)
    guess = sharpen(torch.from_numpy(table.probs[ids[flagged]]), 0.5)
    assert torch.allclose(targets[flagged], 0.5 * guess, atol=1e-3)
    assert rule.counts["flagged"] == flagged.sum()


def test_the_model_guess_reads_the_batch_inputs_and_mean_averages_it_with_the_table():
    table, given = make_table()
    seen = []

    def predict(inputs):
        seen.append(inputs[:, 0, 0, 0].clone())
        return torch.tensor([[0.0, 0.0, 1.0]]).expand(len(inputs), C)

    ids = np.arange(8)
    rule = CrossMixTargets(C, uncertain=table.uncertain, probs=table.probs, guess="mean", temperature=1.0,
                           predict=predict)
    _, targets = unmixed(rule, ids, given)
    assert torch.equal(seen[0], torch.tensor([0.0, 4.0])), "the un-mixed flagged inputs are predicted"
    expected = (torch.from_numpy(table.probs[[0, 4]]) + torch.tensor([0.0, 0.0, 1.0])) / 2
    assert torch.allclose(targets[[0, 4]], expected, atol=1e-3)


def test_mixing_pairs_each_row_with_a_partner_and_keeps_it_dominant():
    table, given = make_table()
    rule = CrossMixTargets(C, uncertain=table.uncertain, probs=table.probs, guess="oof", alpha=1.0)
    ids = np.arange(40)
    _, inputs, labels = batch_of(ids, given)
    mixed_x, mixed_t = rule.batch(torch.from_numpy(ids), inputs, labels, np.random.default_rng(1))
    assert not torch.equal(mixed_x, inputs), "rows are mixed"
    assert torch.allclose(mixed_t.sum(dim=1), torch.ones(40), atol=1e-5), "full-weight targets stay distributions"
    assert torch.allclose(mixed_t, rule.batch(torch.from_numpy(ids), inputs, labels, np.random.default_rng(1))[1])


def test_guess_none_drops_flagged_rows_and_never_uses_them_as_partners():
    table, given = make_table()
    rule = CrossMixTargets(C, uncertain=table.uncertain, guess="none", alpha=1.0)
    ids = np.arange(40)
    mixed_x, mixed_t = rule.batch(*batch_of(ids, given), np.random.default_rng(2))
    flagged = ids % 4 == 0
    assert (mixed_t[flagged] == 0).all()
    lam = mixed_t[~flagged].max(dim=1).values
    assert (lam >= 0.5 - 1e-6).all()
    # input value = l' * id + (1 - l') * partner id: the partner id must be a trusted (non-multiple of 4) id
    own = torch.from_numpy(ids[~flagged]).float()
    x = mixed_x[~flagged, 0, 0, 0]
    same_class = (mixed_t[~flagged] > 0).sum(dim=1) == 1
    mixed = (lam < 1 - 1e-4) & ~same_class
    partner = (x[mixed] - lam[mixed] * own[mixed]) / (1 - lam[mixed])
    assert mixed.any() and (torch.round(partner) % 4 != 0).all()


def test_a_guess_below_the_threshold_drops_its_sample():
    table, given = make_table()
    probs = table.probs.copy()
    probs[4] = [0.4, 0.35, 0.25]            # id 4's guess is unsure; id 0's (0.8 on one class) is not
    rule = CrossMixTargets(C, uncertain=table.uncertain, probs=probs, guess="oof", temperature=1.0, threshold=0.5)
    _, targets = unmixed(rule, np.arange(8), given)
    assert targets[4].sum() == 0 and torch.allclose(targets[0], torch.from_numpy(probs[0]), atol=1e-3)
    assert rule.counts == {"flagged": 2, "guessed": 1}


@pytest.mark.parametrize("kwargs, message", [
    ({"guess": "oof"}, "needs the out-of-fold probabilities"),
    ({"guess": "model", "probs": np.ones((4, C))}, "needs the model's predictions"),
    ({"guess": "maybe"}, "guess='maybe' is not one of"),
    ({"guess": "none", "temperature": 0.0}, "temperature"),
    ({"guess": "none", "flagged_weight": -1.0}, "flagged_weight"),
    ({"guess": "none", "threshold": 1.5}, "threshold"),
])
def test_the_rule_refuses_what_it_cannot_do(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CrossMixTargets(C, uncertain=np.zeros(4, bool), **kwargs)


@pytest.mark.parametrize("overrides, message", [
    ({"guess": "teacher"}, "guess='teacher' is not one of"),
    ({"sharpen_t": 0}, "sharpen_t=0.0 is outside"),
    ({"sharpen_t": 1.5}, "sharpen_t=1.5 is outside"),
    ({"flagged_weight": -0.1}, "flagged_weight"),
    ({"guess_threshold": 2}, "guess_threshold=2.0 is outside"),
])
def test_config_refuses_bad_knobs(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config(overrides={"method": "crossmix", **overrides})


def test_only_the_guesses_that_need_them_read_probabilities_or_predict():
    needs = {g: (build_config(overrides={"method": "crossmix", "guess": g}).method.workers_read_probs(),
                 build_config(overrides={"method": "crossmix", "guess": g}).method.predicts_in_batch())
             for g in ("oof", "model", "mean", "none")}
    assert needs == {"oof": (True, False), "model": (False, True), "mean": (True, True), "none": (False, False)}


def test_the_forward_corrected_loss_carries_the_prediction_through_the_noise():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.5]])
    targets = torch.tensor([[0.0, 1.0, 0.0], [0.3, 0.7, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(forward_corrected_cross_entropy(logits, targets, torch.eye(C)),
                          soft_target_cross_entropy(logits, targets))
    noise = torch.tensor([[0.6, 0.4, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    noisy = torch.softmax(logits, dim=1) @ noise
    by_hand = -(targets * noisy.log()).sum(dim=1)
    assert torch.allclose(forward_corrected_cross_entropy(logits, targets, noise, reduction="none"), by_hand)
    assert torch.allclose(forward_corrected_cross_entropy(logits, targets, noise), by_hand[:2].mean()), \
        "a zero target row is left out of the mean"


def test_forward_correction_lets_a_confident_true_class_pay_little_for_its_flipped_label():
    """Class 0 is labelled 1 with probability 0.4: predicting the true class 0 for a sample labelled 1 costs
    -log 0.4 under the correction, against -log p_1 (large) without it."""
    logits = torch.tensor([[8.0, 0.0, 0.0]])
    target = torch.tensor([[0.0, 1.0, 0.0]])
    noise = torch.tensor([[0.6, 0.4, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert float(forward_corrected_cross_entropy(logits, target, noise)) == pytest.approx(-np.log(0.4), abs=1e-3)
    assert float(soft_target_cross_entropy(logits, target)) > 7.9


def test_with_a_noise_matrix_the_rule_drops_flagged_rows_and_forward_corrects_the_rest():
    table, given = make_table()
    noise = np.array([[0.7, 0.3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.1, 0.9]], dtype=np.float32)
    rule = CrossMixTargets(C, uncertain=table.uncertain, guess="none", transition=noise)
    ids = np.arange(12)
    _, targets = unmixed(rule, ids, given)
    assert (targets[ids % 4 == 0] == 0).all(), "flagged rows are still dropped"
    logits = torch.randn(12, C)
    assert torch.allclose(rule.loss(logits, targets),
                          forward_corrected_cross_entropy(logits, targets, torch.from_numpy(noise)))
    plain = CrossMixTargets(C, uncertain=table.uncertain, guess="none")
    assert torch.allclose(plain.loss(logits, targets), soft_target_cross_entropy(logits, targets))


@pytest.mark.parametrize("kwargs, message", [
    ({"guess": "oof", "probs": np.ones((4, C)), "transition": np.eye(C)}, "needs guess=none"),
    ({"guess": "none", "transition": np.eye(C + 1)}, "noise transition of shape"),
])
def test_the_forward_rule_refuses_guesses_and_a_wrong_matrix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CrossMixTargets(C, uncertain=np.zeros(4, bool), **kwargs)


def test_forward_correction_is_a_knob_that_asks_the_table_for_its_noise_matrix():
    method = build_config(overrides={"method": "crossmix", "noise_correction": "forward"}).method
    assert method.noise_matrix_over() == "kept" and not method.workers_read_probs()
    assert build_config(overrides={"method": "crossmix"}).method.noise_matrix_over() == "all", "auto by default"
    guessing = build_config(overrides={"method": "crossmix", "guess": "mean"}).method
    assert guessing.noise_matrix_over() is None and not guessing.corrects_all(make_table()[0]), "auto: no correction"
    plain = build_config(overrides={"method": "crossmix", "noise_correction": "none"}).method
    assert plain.noise_matrix_over() is None
    with pytest.raises(ConfigError, match="noise_correction=forward needs guess=none"):
        build_config(overrides={"method": "crossmix", "noise_correction": "forward", "guess": "mean"})
    with pytest.raises(ConfigError, match="noise_correction='backward' is not one of"):
        build_config(overrides={"method": "crossmix", "noise_correction": "backward"})
    table, _ = make_table()
    with pytest.raises(ValueError, match="carries no noise transition"):
        method.batch_rule(BatchContext(C, table=table))


# A pair swapped 40% each way, as estimated at 40% asymmetric (rows 0 and 1 0.10 apart), and a cycle of flips
# over-estimated at 50%, as at 40% pairflip (rows 0.5 apart).
SWAPPED = np.array([[0.50, 0.45, 0.05], [0.40, 0.55, 0.05], [0.0, 0.0, 1.0]], dtype=np.float32)
CYCLE = np.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5]], dtype=np.float32)


@pytest.mark.parametrize("noise, flagged_by, applied", [(SWAPPED, "confident", False), (CYCLE, "confident", True),
                                                      (CYCLE, "oof_gmm", False)])
def test_auto_correction_keeps_and_corrects_every_label_only_where_the_matrix_tells_every_two_classes_apart(
        noise, flagged_by, applied):
    method = build_config(overrides={"method": "crossmix", "noise_correction": "auto"}).method
    assert method.noise_matrix_over() == "all"
    table, _ = make_table()
    table.noise_matrix, table.flag_rule = noise, flagged_by
    rule = method.batch_rule(BatchContext(C, table=table))
    assert (rule.transition is noise) == applied and (rule.transition is None) == (not applied)
    assert table.uncertain.sum() == 10 and rule.uncertain.sum() == (0 if applied else 10), "on: no flag dropped"
    note = method.selection_note(table)
    why = "the flags are the GMM's" if flagged_by == "oof_gmm" else "below forward_separation 0.3"
    assert ("auto: on (>= forward_separation 0.3): every label kept and corrected, the 10 flags reported" in note
            ) == applied and (f"auto: off ({why}): the flags dropped, plain loss" in note) == (not applied), note
    assert ("closest true classes 0 and 1, rows 0.10 apart" in note) == (noise is SWAPPED), note
    forward = build_config(overrides={"method": "crossmix", "noise_correction": "forward"}).method
    assert forward.batch_rule(BatchContext(C, table=table)).transition is noise, "forward applies whatever T says"
    with pytest.raises(ConfigError, match="forward_separation"):
        build_config(overrides={"method": "crossmix", "noise_correction": "auto", "forward_separation": 1.5})


def test_keep_close_pairs_keeps_the_labels_of_flags_between_classes_the_matrix_cannot_tell_apart():
    """make_table flags ids 0 mod 4, predicted one class further: given 0 -> 1 (a close pair under SWAPPED), 1 -> 2
    and 2 -> 0 (far apart). Those given 0 keep their labels; the others are dropped, as without the knob."""
    table, given = make_table()
    table.noise_matrix, table.flag_rule = SWAPPED, "confident"
    method = build_config(overrides={"method": "crossmix", "keep_close_pairs": True}).method
    rule = method.batch_rule(BatchContext(C, table=table))
    assert rule.transition is None
    ids = np.arange(24)
    _, targets = unmixed(rule, ids, given)
    flagged = ids % 4 == 0
    close = flagged & (given[ids] == 0)
    assert close.sum() == 2 and (flagged & ~close).sum() == 4
    assert torch.equal(targets[close], torch.eye(C)[0].expand(2, C)), "a close pair's flag keeps its label"
    assert (targets[flagged & ~close] == 0).all(), "the other flags are dropped"
    assert rule.counts["flagged"] == 4
    note = method.selection_note(table)
    assert "auto: off (below forward_separation 0.3): 4 flags between classes closer than that keep their labels" \
           " (keep_close_pairs), the other 6 dropped" in note, note
    table.flag_rule = "oof_gmm"
    assert method.batch_rule(BatchContext(C, table=table)).close_pairs is None, "the GMM's flags are all dropped"
    table.noise_matrix, table.flag_rule = CYCLE, "confident"
    assert method.batch_rule(BatchContext(C, table=table)).close_pairs is None, "correcting every label: none drop"


@pytest.mark.parametrize("overrides", [{"noise_correction": "none"}, {"noise_correction": "forward"},
                                       {"guess": "mean"}])
def test_keep_close_pairs_needs_the_auto_matrix(overrides):
    with pytest.raises(ConfigError, match="keep_close_pairs reads the noise matrix of noise_correction=auto"):
        build_config(overrides={"method": "crossmix", "keep_close_pairs": True, **overrides})
