import weakref

import numpy as np
import pytest

from noisymix.distributed.artifacts import read_out_of_fold
from noisymix.selection import crossval
from noisymix.selection.crossval import (FoldOutput, assemble_out_of_fold, check_out_of_fold,
                                         out_of_fold_probabilities, stratified_folds)
from noisymix.selection.detection import detection_metrics, selection_report
from noisymix.selection.mismatch import MixingTable, build_mixing_table, trusted_pools, uncertain_set


def test_folds_are_stratified_disjoint_and_cover_every_sample():
    labels = np.repeat(np.arange(4), 25)
    folds = stratified_folds(labels, 5, seed=0)
    held = np.concatenate([h for _, h in folds])
    assert np.array_equal(np.sort(held), np.arange(100))
    for train, held_out in folds:
        assert np.intersect1d(train, held_out).size == 0
        assert np.bincount(labels[held_out]).tolist() == [5, 5, 5, 5]
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, stratified_folds(labels, 5, seed=0)))


@pytest.mark.parametrize("k, message", [(1, "must be >= 2"), (6, "exceeds the smallest class count")])
def test_bad_fold_counts(k, message):
    labels = np.array([0] * 5 + [1] * 9)
    with pytest.raises(ValueError, match=message):
        stratified_folds(labels, k, 0)


def test_out_of_fold_assembly_checks_coverage():
    probs = assemble_out_of_fold(4, [(np.array([0, 2]), np.full((2, 3), 0.1)), (np.array([1, 3]), np.full((2, 3), 0.2))])
    assert probs[1, 0] == pytest.approx(0.2) and probs[2, 0] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unevenly"):
        assemble_out_of_fold(4, [(np.array([0, 1, 2]), np.ones((3, 2)))])
    with pytest.raises(ValueError, match="unevenly"):
        assemble_out_of_fold(3, [(np.array([0, 1, 2]), np.ones((3, 2))), (np.array([2]), np.ones((1, 2)))])



def test_out_of_fold_parts_are_let_go_as_they_are_placed():
    """At WebVision's 2.4M x 1000 a fold's part is 1.9 GB: the driver must not hold all K beside the table."""
    labels = np.repeat(np.arange(3), 20)
    alive_at_yield = []

    def fit(fold):
        return FoldOutput(fold.held, np.eye(3, dtype=np.float32)[labels[fold.held]], {"fold": fold.index})

    def lazy_map(fn, folds):
        parts = []
        for fold in folds:
            output = fn(fold)
            alive_at_yield.append(sum(ref() is not None for ref in parts))
            parts.append(weakref.ref(output.probs))
            yield output
            del output

    probs, fold_of, infos = out_of_fold_probabilities(labels, 5, 0, fit, map=lazy_map)
    assert alive_at_yield == [0, 1, 1, 1, 1], "only the part just placed may still be referenced"
    assert np.array_equal(probs.argmax(axis=1), labels) and [i["fold"] for i in infos] == [0, 1, 2, 3, 4]
    assert np.array_equal(np.bincount(fold_of), [12] * 5)

P = np.array([
    [0.9, 0.1, 0.0],   # y=0, agrees, confident -> trusted in T[0]
    [0.2, 0.7, 0.1],   # y=0, predicted 1 -> flagged
    [0.5, 0.4, 0.1],   # y=0, agrees, q=0.5
    [0.1, 0.8, 0.1],   # y=1, trusted in T[1]
    [0.3, 0.3, 0.4],   # y=1, predicted 2 -> flagged; class 2 has no trusted sample
], dtype=np.float32)
Y = np.array([0, 0, 0, 1, 1])


def test_uncertain_set_and_tau_low():
    c, q = P.argmax(1), P.max(1)
    assert uncertain_set(c != Y, q).tolist() == [False, True, False, False, True]
    assert uncertain_set(c != Y, q, tau_low=0.6).tolist() == [False, True, True, False, True]


def test_trusted_pools_respect_tau_high_and_leave_out_doubted_samples():
    c, q = P.argmax(1), P.max(1)
    assert [p.tolist() for p in trusted_pools(c, Y, q, 0.0, 3, c != Y)] == [[0, 2], [3], []]
    assert [p.tolist() for p in trusted_pools(c, Y, q, 0.6, 3, c != Y)] == [[0], [3], []]
    # sample 2 agrees with its label but is doubted (tau_low, or another flag rule): never a partner
    assert [p.tolist() for p in trusted_pools(c, Y, q, 0.0, 3, uncertain_set(c != Y, q, 0.6))] == [[0], [3], []]


def test_empty_trusted_pool_falls_back_to_every_sample_predicted_as_that_class():
    table = build_mixing_table(P, Y, tau_high=0.6)
    assert table.fallback_classes == [2]
    assert table.pools[2].tolist() == [4]
    again = MixingTable.from_arrays(table.to_arrays())
    assert [p.tolist() for p in again.pools] == [p.tolist() for p in table.pools]
    assert np.array_equal(again.uncertain, table.uncertain) and again.fallback_classes == [2]


@pytest.mark.parametrize("tau", [-0.1, 1.5])
def test_tau_outside_unit_interval(tau):
    with pytest.raises(ValueError, match="tau"):
        build_mixing_table(P, Y, tau_high=tau)


def test_detection_metrics_on_a_hand_made_case():
    given = np.array([0, 0, 1, 1, 2, 2])
    true = np.array([0, 1, 1, 0, 2, 2])          # samples 1 and 3 are noisy
    flagged = np.array([False, True, False, False, True, False])
    score = np.array([0.1, 0.9, 0.2, 0.6, 0.7, 0.0])
    m = detection_metrics(flagged, score, given, true)
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["f1"] == 0.5
    # noisy scores {0.9, 0.6} vs clean {0.1, 0.2, 0.7, 0.0}: 7 of 8 pairs ordered right
    assert m["auroc"] == pytest.approx(7 / 8)


def test_selection_report_scores_given_label_probability():
    true = np.array([0, 1, 0, 1, 2])
    report = selection_report(uncertain_set(P.argmax(1) != Y, P.max(1)), P.argmax(1), 1 - P[np.arange(len(Y)), Y], Y,
                              true)
    assert report["recall"] == 1.0 and report["precision"] == 1.0
    assert report["predicted_class_acc_on_flagged"] == 1.0


def load_out_of_fold(path, given, num_classes):
    return check_out_of_fold(read_out_of_fold(path), given, num_classes, str(path))


def _oof_file(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_out_of_fold_predictions_load_from_an_earlier_run(tmp_path):
    given = np.array([0, 1, 2, 1])
    probs = np.eye(3)[[0, 2, 2, 1]]
    path = _oof_file(tmp_path / "oof.npz", probs=probs, given=given, fold=np.array([0, 1, 0, 1]))
    loaded, fold_of = load_out_of_fold(path, given, 3)
    assert np.array_equal(loaded, probs) and fold_of.tolist() == [0, 1, 0, 1]
    assert load_out_of_fold(_oof_file(tmp_path / "nofold.npz", probs=probs, given=given), given, 3)[1].tolist() == [-1] * 4


@pytest.mark.parametrize("arrays, message", [
    ({"probs": np.eye(3)[[0, 1, 2, 1]]}, "lacks given"),
    ({"probs": np.eye(4)[[0, 1, 2, 1]], "given": np.array([0, 1, 2, 1])}, r"needs \(4, 3\)"),
    ({"probs": np.eye(3)[[0, 1, 2, 1]], "given": np.array([0, 1, 2, 2])}, "1 of 4 differ"),
    ({"probs": np.full((4, 3), 0.5), "given": np.array([0, 1, 2, 1])}, "probability vector"),
    ({"probs": np.array([[np.nan, 1, 0]] * 4), "given": np.array([0, 1, 2, 1])}, "probability vector"),
    ({"probs": np.array([None] * 12, dtype=object).reshape(4, 3), "given": np.array([0, 1, 2, 1])}, "cannot read"),
])
def test_out_of_fold_file_that_does_not_fit_is_refused(tmp_path, arrays, message):
    path = _oof_file(tmp_path / "oof.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        load_out_of_fold(path, np.array([0, 1, 2, 1]), 3)
    with pytest.raises(ValueError, match="cannot read"):
        load_out_of_fold(tmp_path / "absent.npz", np.array([0, 1, 2, 1]), 3)


@pytest.mark.parametrize("bad", ["negative", "nan", "sum"])
def test_a_bad_row_in_any_row_block_of_an_out_of_fold_table_is_found(monkeypatch, bad):
    monkeypatch.setattr(crossval, "ROW_BLOCK", 2)   # 7 rows: blocks of 2, the last of 1
    probs = np.full((7, 4), 0.25, dtype=np.float32)
    assert crossval.rows_are_distributions(probs)
    probs[6] = {"negative": [-0.25, 0.5, 0.5, 0.25], "nan": [np.nan, 0.25, 0.25, 0.25], "sum": [0.5, 0.5, 0.5, 0]}[bad]
    assert not crossval.rows_are_distributions(probs), "the last block, of one row, is read too"
