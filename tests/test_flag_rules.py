"""Decision rules on an out-of-fold table: confident learning by hand, and every rule on a simulated table."""

import numpy as np
import pytest

from noisymix.selection.confident_learning import (calibrated_joint, confident_joint, confident_learning_flags,
                                                   least_separated, noise_transition, per_class_thresholds,
                                                   prune_by_noise_rate, row_separation)
from noisymix.selection.crossval import SelectionError
from noisymix.selection.detection import detection_metrics
from noisymix.selection.flag_rules import FLAG_RULES, auto_flags, choose_flags, corrected_labels, flag_given_labels
from noisymix.selection.mismatch import build_mixing_table

# Rows 2 and 5 are labelled against what the folds say; row 8 (label 0) is one the folds got wrong.
P = np.array([
    [0.80, 0.10, 0.10],
    [0.60, 0.30, 0.10],
    [0.20, 0.70, 0.10],
    [0.10, 0.80, 0.10],
    [0.10, 0.60, 0.30],
    [0.70, 0.20, 0.10],
    [0.10, 0.10, 0.80],
    [0.20, 0.10, 0.70],
    [0.40, 0.45, 0.15],
])
Y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 0])


def test_thresholds_joint_and_calibration_by_hand():
    t = per_class_thresholds(P, Y)
    assert t == pytest.approx([(0.8 + 0.6 + 0.2 + 0.4) / 4, (0.8 + 0.6 + 0.2) / 3, 0.75])
    joint = confident_joint(P, Y, t)
    # row 7 (p2 = 0.70 < t2) and row 8 (p0 = 0.40 < t0 = 0.5, p1 = 0.45 < t1 = 0.533) are counted nowhere
    assert joint.tolist() == [[2, 1, 0], [1, 2, 0], [0, 0, 1]]
    calibrated = calibrated_joint(joint, np.bincount(Y))
    assert calibrated == pytest.approx(np.array([[8 / 3, 4 / 3, 0], [1, 2, 0], [0, 0, 2]]))



def test_the_joint_is_the_same_read_in_row_blocks(monkeypatch):
    from noisymix.selection import confident_learning

    t, clean_only = per_class_thresholds(P, Y), np.arange(len(Y)) % 3 != 0
    whole = [confident_joint(P, Y, t), confident_joint(P, Y, t, clean_only)]
    monkeypatch.setattr(confident_learning, "ROW_BLOCK", 2)   # 9 rows: blocks of 2, the last of 1
    assert [confident_joint(P, Y, t).tolist(), confident_joint(P, Y, t, clean_only).tolist()] == [w.tolist() for w in whole]
    assert whole[1].sum() < whole[0].sum()

def test_prune_by_noise_rate_flags_the_largest_margins_only():
    flagged = confident_learning_flags(P, Y)
    # one of label 0 is estimated to be a 1 (round(4/3) = 1): row 2, margin 0.5, not row 8 (0.05)
    assert np.flatnonzero(flagged).tolist() == [2, 5]
    assert np.flatnonzero(P.argmax(1) != Y).tolist() == [2, 5, 8]
    # several counts for one row flag it once; a count above the class size takes the whole class
    wanted = np.zeros((3, 3))
    wanted[0, 1], wanted[0, 2] = 9, 9
    assert prune_by_noise_rate(P, Y, wanted).tolist() == [y == 0 for y in Y]


def test_a_class_nobody_is_labelled_as_takes_no_confident_counts():
    probs, given = P[:6], Y[:6]                        # nobody labelled 2
    t = per_class_thresholds(probs, given)
    assert np.isinf(t[2])
    assert confident_joint(probs, given, t)[:, 2].sum() == 0
    assert confident_learning_flags(probs, given).tolist() == [False, False, True, False, False, True]


def simulated_table(n=3000, classes=5, noise=0.4, seed=0):
    """Out-of-fold probabilities of folds that learned the true classes through 40% symmetric noise, with errors:
    their argmax is the true class for ~79% of the samples."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, classes, n)
    given = true.copy()
    flip = rng.random(n) < noise
    given[flip] = (true[flip] + rng.integers(1, classes, flip.sum())) % classes
    logits = 2.0 * np.eye(classes)[true] + rng.normal(0, 1.0, (n, classes))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, given, true


def test_on_a_simulated_table_confident_learning_estimates_the_noise_and_is_more_precise():
    probs, given, true = simulated_table()
    noisy = given != true
    scores = {rule: detection_metrics(flag_given_labels(rule, probs, given), np.zeros(len(given)), given, true)
              for rule in FLAG_RULES}
    assert scores["confident"]["flagged_rate"] == pytest.approx(noisy.mean(), abs=0.08)
    assert scores["confident"]["precision"] > scores["mismatch"]["precision"] + 0.05
    assert scores["agree"]["precision"] > scores["confident"]["precision"] + 0.02
    assert scores["agree"]["recall"] <= min(scores["confident"]["recall"], scores["oof_gmm"]["recall"])
    # the GMM on out-of-fold losses separates the two loss modes: well above chance at 40% noise
    assert scores["oof_gmm"]["f1"] > 0.6


def pair_flip_table(n=3000, classes=5, noise=0.4, seed=0, learned=1.5):
    """Out-of-fold probabilities of folds that partly learned a pair flip (40% of class c labelled c + 1): every
    sample of class c also leans towards c + 1, so the flipped labels' losses are not a separate mode."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, classes, n)
    given = np.where(rng.random(n) < noise, (true + 1) % classes, true)
    logits = 2.0 * np.eye(classes)[true] + learned * np.eye(classes)[(true + 1) % classes] + rng.normal(0, 1.0,
                                                                                                         (n, classes))
    return np.exp(logits) / np.exp(logits).sum(1, keepdims=True), given, true


def test_auto_takes_the_gmm_where_the_losses_separate_and_confident_learning_where_the_noise_was_learned():
    probs, given, _ = simulated_table()
    rule, flags = choose_flags("auto", probs, given)
    assert rule == "oof_gmm" and np.array_equal(flags, flag_given_labels("oof_gmm", probs, given))
    probs, given, true = pair_flip_table()
    rule, flags = choose_flags("auto", probs, given)
    assert rule == "confident" and np.array_equal(flags, flag_given_labels("confident", probs, given))
    f1 = {r: detection_metrics(flag_given_labels(r, probs, given), np.zeros(len(given)), given, true)["f1"]
          for r in ("confident", "oof_gmm")}
    assert f1["confident"] > f1["oof_gmm"] + 0.05, "the GMM under-flags learned noise"
    assert build_mixing_table(probs, given, flag_rule="auto").flag_rule == "confident"


@pytest.mark.parametrize("gmm, confident, chosen", [
    (10, 12, "oof_gmm"), (12, 10, "oof_gmm"), (9, 12, "oof_gmm"), (8, 12, "confident"), (17, 12, "confident"),
    (0, 0, "confident"), (1, 0, "oof_gmm")])
def test_auto_trusts_the_gmm_only_where_both_count_about_as_many_wrong_labels(gmm, confident, chosen):
    def flags(count):
        return np.arange(20) < count

    rule, out = auto_flags(flags(gmm), flags(confident))
    assert rule == chosen and np.array_equal(out, flags(gmm if chosen == "oof_gmm" else confident))


def test_the_noise_transition_of_a_pair_flip_is_estimated_from_the_table():
    """Folds that did not learn the flip (learned=0; their argmax errs on ~20% of the samples, which the joint
    counts as noise too). Folds that learned it lean every class towards the next, which the joint reads as
    noise in the other direction (max error 0.22 at learned=1.5): the estimate is only as good as the table."""
    probs, given, true = pair_flip_table(n=6000, learned=0.0)
    estimated = noise_transition(probs, given)
    actual = np.zeros((5, 5))
    np.add.at(actual, (true, given), 1)
    actual /= actual.sum(axis=1, keepdims=True)
    assert estimated.shape == (5, 5) and estimated.sum(axis=1) == pytest.approx(np.ones(5), abs=1e-5)
    assert np.abs(estimated - actual).max() < 0.12
    off_pair = ~(np.eye(5, dtype=bool) | np.eye(5, k=1, dtype=bool) | np.eye(5, k=-4, dtype=bool))
    assert estimated[off_pair].max() < 0.07, "no noise is invented between classes the flip never links"


def test_the_noise_transition_counts_only_the_masked_samples_and_keeps_unseen_classes_clean():
    probs, given, true = pair_flip_table(n=6000, learned=0.0)
    clean_only = given == true
    kept = noise_transition(probs, given, clean_only)
    everything = noise_transition(probs, given)
    assert np.trace(kept) > np.trace(everything) + 1.0, "the clean samples carry less noise than all of them"
    by_hand = calibrated_joint(confident_joint(probs, given, per_class_thresholds(probs, given), clean_only),
                               np.bincount(given[clean_only], minlength=5)).T
    assert kept == pytest.approx(by_hand / by_hand.sum(axis=1, keepdims=True), abs=1e-6)
    nobody_in_2 = probs[:, 2] < 0.0                   # no sample counted: every row is the identity
    assert np.array_equal(noise_transition(probs, given, nobody_in_2), np.eye(5))


def test_rule_none_flags_nothing():
    probs, given, _ = simulated_table(n=300)
    rule, flags = choose_flags("none", probs, given)
    assert rule == "none" and flags.dtype == bool and not flags.any() and len(flags) == 300
    table = build_mixing_table(probs, given, flag_rule="none")
    assert not table.uncertain.any() and table.noise_matrix is None


def test_the_table_carries_the_noise_transition_of_its_unflagged_or_all_samples_where_asked():
    probs, given, _ = pair_flip_table(n=2000)
    table = build_mixing_table(probs, given, flag_rule="confident", noise_matrix="kept")
    assert table.noise_matrix == pytest.approx(noise_transition(probs, given, ~table.uncertain))
    every = build_mixing_table(probs, given, flag_rule="confident", noise_matrix="all").noise_matrix
    assert every == pytest.approx(noise_transition(probs, given))
    assert np.abs(every - table.noise_matrix).max() > 0.05, "dropping the flags changes the estimate"
    with pytest.raises(SelectionError, match="noise_matrix must be one of"):
        build_mixing_table(probs, given, noise_matrix=True)
    arrays = table.to_arrays(for_workers=True, probs=False)
    assert np.array_equal(type(table).from_arrays(arrays).noise_matrix, table.noise_matrix)
    assert "noise_matrix" not in build_mixing_table(probs, given).to_arrays(for_workers=True)


def test_agree_is_the_intersection_and_every_rule_is_deterministic():
    probs, given, _ = simulated_table(n=600)
    agree = flag_given_labels("agree", probs, given)
    both = flag_given_labels("oof_gmm", probs, given) & flag_given_labels("confident", probs, given)
    assert np.array_equal(agree, both)
    for rule in FLAG_RULES:
        assert np.array_equal(flag_given_labels(rule, probs, given), flag_given_labels(rule, probs, given))


def test_a_table_built_with_another_rule_keeps_its_flagged_samples_out_of_the_pools():
    probs, given, _ = simulated_table(n=600)
    table = build_mixing_table(probs, given, flag_rule="oof_gmm")
    assert np.array_equal(table.uncertain, flag_given_labels("oof_gmm", probs, given))
    pooled = np.concatenate(table.pools)
    assert not table.uncertain[pooled].any()
    assert (table.predicted[pooled] == given[pooled]).all()


@pytest.mark.parametrize("probs, given, message", [
    (np.ones((3, 2)) / 2, np.array([0, 1]), "out-of-fold probabilities for 2 labels"),
    (np.ones((2, 2)) / 2, np.array([0, 2]), r"given labels must lie in \[0, 2\)"),
])
def test_bad_tables_are_refused(probs, given, message):
    with pytest.raises(SelectionError, match=message):
        confident_learning_flags(probs, given)


def test_an_unknown_rule_is_refused():
    with pytest.raises(SelectionError, match="flag_rule='vote' is not one of mismatch, confident"):
        flag_given_labels("vote", P, Y)


def test_corrected_labels_take_the_prediction_where_flagged_only():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], dtype=np.float32)
    given = np.array([0, 0, 1])
    assert corrected_labels("mismatch", probs, given).tolist() == [0, 1, 0]
    with pytest.raises(SelectionError, match="flag_rule='vote'"):
        corrected_labels("vote", probs, given)


def test_row_separation_is_the_total_variation_between_two_true_classes_labels():
    swap = np.array([[0.6, 0.4, 0.0], [0.4, 0.6, 0.0], [0.0, 0.0, 1.0]])
    assert row_separation(swap) == pytest.approx(np.array([[0, 0.2, 1.0], [0.2, 0, 1.0], [1.0, 1.0, 0]]))
    assert least_separated(swap) == pytest.approx((0.2, 0, 1))
    cycle = np.array([[0.6, 0.4, 0.0], [0.0, 0.6, 0.4], [0.4, 0.0, 0.6]])
    assert least_separated(cycle)[0] == pytest.approx(0.6), "a cycle of flips keeps its rows apart"
    assert least_separated(np.eye(4))[0] == 1.0 and least_separated(np.eye(1)) == (1.0, 0, 0)
