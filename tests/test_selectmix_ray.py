"""SelectMix through Ray: fold tasks, the table in the object store, the workers' batch rule, outputs."""

import csv
import dataclasses
import functools
import json
import os
import sys
import time

import numpy as np
import pytest

from noisymix.distributed import shards
from noisymix.distributed.folds import FoldCache, FoldTrainer, next_round, ray_map
from noisymix.launch.cli import main
from noisymix.launch.config import build_config
from noisymix.selection.crossval import FoldOutput, SelectionError, out_of_fold_probabilities
from noisymix.selection.flag_rules import flag_given_labels
from noisymix.selection.mismatch import build_mixing_table


@pytest.fixture(scope="module")
def digits_train(digits_dir):
    manifest = shards.load_manifest(digits_dir)
    ids, images, given = shards.load_split(str(digits_dir), manifest)
    return manifest, images, given


def fold_trainer(digits_dir, manifest, **overrides):
    """The fold stage's fit_predict for a selectmix config with these overrides."""
    config = build_config(overrides={"method": "selectmix", "width": 8, **overrides})
    return FoldTrainer(str(digits_dir), manifest, config.train, config.method.config, config.run.seed)


def test_parallel_fold_tasks_give_the_table_of_sequential_folds(ray_session, digits_dir, digits_train):
    manifest, images, given = digits_train
    fit = fold_trainer(digits_dir, manifest, fold_epochs=1, seed=3)
    parallel, fold_par, _ = out_of_fold_probabilities(given, 3, 3, fit, map=ray_map)
    sequential, fold_seq, _ = out_of_fold_probabilities(given, 3, 3, fit)
    assert np.array_equal(fold_par, fold_seq)
    np.testing.assert_allclose(parallel, sequential, rtol=1e-5, atol=1e-6)
    a, b = build_mixing_table(parallel, given), build_mixing_table(sequential, given)
    assert np.array_equal(a.uncertain, b.uncertain) and np.array_equal(a.predicted, b.predicted)
    assert all(np.array_equal(p, q) for p, q in zip(a.pools, b.pools))


def test_best_fold_epoch_agrees_with_the_given_labels_at_least_as_well_as_the_last(digits_dir, digits_train):
    manifest, images, given = digits_train
    last_fit = fold_trainer(digits_dir, manifest, fold_epochs=3, seed=1, fold_select="last")
    best_fit = fold_trainer(digits_dir, manifest, fold_epochs=3, seed=1, fold_select="best")
    last, folds, last_runs = out_of_fold_probabilities(given, 3, 1, last_fit)
    best, _, best_runs = out_of_fold_probabilities(given, 3, 1, best_fit)
    assert [r["kept_epoch"] for r in last_runs] == [3, 3, 3]
    assert all(1 <= r["kept_epoch"] <= 3 for r in best_runs)
    for f, run in enumerate(best_runs):
        held = folds == f
        agree = lambda probs: np.mean(probs[held].argmax(1) == given[held])
        assert agree(best) >= agree(last)
        if run["kept_epoch"] == 3:
            np.testing.assert_allclose(best[held], last[held], rtol=1e-5, atol=1e-6)


def test_a_fold_predicts_its_held_out_part_in_eval_batches_and_the_same_probabilities(digits_dir, digits_train,
                                                                                       monkeypatch):
    manifest, _, given = digits_train
    from noisymix.distributed import folds
    batches = []
    original = folds.shards.sample_stream
    monkeypatch.setattr(folds.shards, "sample_stream",
                        lambda *a, **k: batches.append(k["batch_size"]) or original(*a, **k))
    runs = {size: out_of_fold_probabilities(given, 3, 1, fold_trainer(digits_dir, manifest, fold_epochs=1, seed=1,
                                                                     batch_size=32, eval_batch_size=size))
            for size in (0, 7)}
    assert batches == [32, 32] * 3 + [32, 7] * 3, "train at batch_size; predict at eval_batch_size (0: batch_size)"
    np.testing.assert_allclose(runs[7][0], runs[0][0], rtol=1e-5, atol=1e-6)
    assert np.array_equal(runs[7][1], runs[0][1])


def test_an_ensemble_fold_predicts_the_mean_of_its_epochs(digits_dir, digits_train):
    manifest, _, given = digits_train
    one = {select: out_of_fold_probabilities(given, 3, 1, fold_trainer(digits_dir, manifest, fold_epochs=1, seed=1,
                                                                      fold_select=select))
           for select in ("last", "ensemble")}
    np.testing.assert_allclose(one["ensemble"][0], one["last"][0], rtol=1e-5, atol=1e-6)
    two = {select: out_of_fold_probabilities(given, 3, 1, fold_trainer(digits_dir, manifest, fold_epochs=2, seed=1,
                                                                      fold_select=select))
           for select in ("last", "ensemble")}
    ensemble, last = two["ensemble"][0], two["last"][0]
    assert [r["kept_epoch"] for r in two["ensemble"][2]] == ["mean of 1-2"] * 3
    np.testing.assert_allclose(ensemble.sum(axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(ensemble, last), "the first epoch's predictions are averaged in"
    assert np.array_equal(two["ensemble"][1], two["last"][1]), "the same folds"


def test_mixup_folds_train_on_mixed_batches_reproducibly(digits_dir, digits_train, monkeypatch):
    manifest, _, given = digits_train
    from noisymix.mixing import mixup
    mixed = []
    real = mixup.MixupTargets.batch
    monkeypatch.setattr(mixup.MixupTargets, "batch", lambda self, *a: mixed.append(self.alpha) or real(self, *a))
    runs = [out_of_fold_probabilities(given, 3, 1, fold_trainer(digits_dir, manifest, fold_epochs=1, seed=1,
                                                                fold_mixup=mix))[0] for mix in (0.0, 0.4, 0.4)]
    assert mixed and set(mixed) == {0.4}, "only the fold_mixup folds mix, with that alpha"
    np.testing.assert_array_equal(runs[1], runs[2])
    np.testing.assert_allclose(runs[1].sum(axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(runs[0], runs[1]), "Mixup folds predict otherwise than CE folds"


def test_a_later_fold_round_trains_on_the_labels_it_is_given(digits_dir, digits_train):
    manifest, _, given = digits_train
    fit = fold_trainer(digits_dir, manifest, fold_epochs=2, seed=1)
    plain = out_of_fold_probabilities(given, 3, 1, fit)[0]
    same = out_of_fold_probabilities(given, 3, 1, dataclasses.replace(fit, labels=given.copy()))[0]
    np.testing.assert_allclose(same, plain, rtol=1e-5, atol=1e-6)
    shifted = (given + 1) % 10
    moved = out_of_fold_probabilities(given, 3, 1, dataclasses.replace(fit, labels=shifted))[0]
    agree = {name: (np.mean(p.argmax(axis=1) == shifted), np.mean(p.argmax(axis=1) == given))
             for name, p in (("plain", plain), ("moved", moved))}
    assert agree["moved"][0] > agree["moved"][1] and agree["moved"][0] > agree["plain"][0] + 0.05, agree


def test_a_kept_fold_round_trains_on_the_unflagged_only_and_predicts_every_held_out_id(digits_dir, digits_train):
    """fold_round_train=kept: the round after a table that flagged every label of class 3 never sees a 3, yet
    predicts every held-out id (the flagged ones too); a table that flags everything leaves nothing to train."""
    manifest, _, given = digits_train
    fit = fold_trainer(digits_dir, manifest, fold_epochs=2, seed=1, fold_rounds=2, fold_round_train="kept")
    cv = fit.cv
    table = np.eye(10, dtype=np.float32)[np.where(given == 3, 4, given)]   # argmax != given exactly where given is 3
    probs, fold_of, runs = out_of_fold_probabilities(given, 3, 1, next_round(fit, cv, table, given, seed=1))
    assert len(runs) == 3 and np.allclose(probs.sum(axis=1), 1, atol=1e-4) and set(fold_of) == {0, 1, 2}
    plain = out_of_fold_probabilities(given, 3, 1, fit)[0]
    assert (plain.argmax(axis=1) == 3).sum() > 20, "folds that see the 3s predict some"   # 57 here
    assert (probs.argmax(axis=1) == 3).sum() == 0, "no 3 was trained on"
    assert probs[:, 3].mean() < 0.75 * plain[:, 3].mean()   # 0.055 against 0.099 here
    with pytest.raises(SelectionError, match="flagged every sample"):
        next_round(fit, cv, np.eye(10, dtype=np.float32)[(given + 1) % 10], given, seed=1)


def test_a_failing_fold_task_is_named(ray_session, digits_dir, digits_train):
    manifest, images, given = digits_train
    fit = fold_trainer(digits_dir, manifest, fold_epochs=1)
    broken = dataclasses.replace(fit, train=dataclasses.replace(fit.train, model="no_such_model"))
    with pytest.raises(RuntimeError, match=r"fold \d of 3 failed"):
        out_of_fold_probabilities(given, 3, 0, broken, map=functools.partial(ray_map, retries=1))



def slow_first(seconds: float, item: int) -> FoldOutput:
    """A fold output for `item`, the first one finishing last."""
    time.sleep(seconds if item == 0 else 0.0)
    return FoldOutput(np.array([item]), np.full((1, 2), 0.5, np.float32), {"item": item})


def broken(item: int) -> FoldOutput:
    raise ValueError(f"item {item} cannot be fitted")


@pytest.fixture
def tasks_from_this_module(ray_session):
    """Ray tasks may run this module's functions: the workers cannot import a test module, so they travel by value."""
    ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray_session.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_ray_map_yields_in_order_caches_as_results_arrive_and_resumes_from_the_cache(tasks_from_this_module,
                                                                                      tmp_path):
    cache = FoldCache(tmp_path / "folds")
    results = ray_map(functools.partial(slow_first, 3.0), [0, 1, 2], cache=cache)
    first = next(results)
    assert first.info == {"item": 0}
    assert all(cache.has(k) for k in range(3)), "the later items were cached while the first was awaited"
    assert [r.info["item"] for r in results] == [1, 2]
    # a resumed stage runs nothing the cache holds: a task here would fail
    assert [r.info["item"] for r in ray_map(broken, [0, 1, 2], cache=cache)] == [0, 1, 2]
    cache.clear()
    with pytest.raises(RuntimeError, match=r"(?s)fold \d of 3 failed after 0 retries: .*cannot be fitted"):
        list(ray_map(broken, [0, 1, 2], retries=0, cache=cache))


def own_pid(item: int) -> int:
    return os.getpid()


def test_ray_map_runs_each_task_in_a_process_of_its_own_that_exits_after_it(tasks_from_this_module, ray_session):
    every_cpu = ray_session.cluster_resources()["CPU"]   # one task at a time, so a process could be reused
    pids = list(ray_map(own_pid, [0, 1, 2, 3], cpus=every_cpu, fresh_process=True))
    assert len(set(pids)) == 4, "no process ran two tasks"
    deadline = time.time() + 30
    while any(alive(pid) for pid in pids):
        assert time.time() < deadline, "a task's process outlived its task"
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_selectmix_end_to_end_on_two_workers(selectmix_whole, digits_dir):
    run = selectmix_whole   # SELECTMIX_RUN: the session's run that the interrupt tests resume to
    summary = json.loads((run / "summary.json").read_text())
    detection = summary["detection"]
    assert {"precision", "recall", "f1", "auroc", "predicted_class_acc_on_flagged"} <= set(detection)
    assert detection["auroc"] > 0.6, "out-of-fold confidence separates noisy from clean labels"
    assert set(summary["stage_times_s"]) == {"folds", "main_training"}
    n_train = shards.load_manifest(digits_dir)["splits"]["train"]["count"]
    with open(run / "label_issues.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == n_train and sorted(int(r["id"]) for r in rows) == list(range(n_train))
    probs = [float(r["given_label_prob"]) for r in rows]
    assert probs == sorted(probs), "least trusted labels first"
    oof = np.load(run / "oof.npz")
    assert oof["probs"].shape == (n_train, 10) and np.allclose(oof["probs"].sum(1), 1, atol=1e-4)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["samples_flagged"] == int(oof["uncertain"].sum()), "every flagged id met once per epoch"
    assert records[0]["samples_mixed"] == records[0]["samples_flagged"], "global partners never miss"


def test_selectmix_refuses_more_folds_than_the_smallest_class(ray_session, digits_dir, tmp_path, capsys):
    code = main(["train", "method=selectmix", f"data_dir={digits_dir}", f"run_dir={tmp_path / 'r'}",
                 "num_shards=4", "folds=500"])
    assert code == 2 and "exceeds the smallest class count" in capsys.readouterr().err


def test_reselection_mid_training_warm_starts_folds_and_resumes_the_run(ray_session, digits_dir, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "method=selectmix", f"data_dir={digits_dir}", f"run_dir={run}", "epochs=3", "num_shards=4",
                 "folds=3", "fold_epochs=1", "reselect_every=2"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert [r["epoch"] for r in summary["selections"]] == [0, 2]
    first, second = summary["selections"]
    assert second["detection"] != first["detection"], "the warm-started folds gave a new table"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[2]["resumed_from_epoch"] == 2, "the second segment continued from the first one's checkpoint"
    assert summary["detection"] == second["detection"]


def test_out_of_fold_predictions_of_an_earlier_run_replace_the_folds(ray_session, digits_dir, digits_train, tmp_path,
                                                                     capsys):
    """The earlier table flags by the run's flag_rule: confident learning here, which leaves out most of the
    samples the folds got wrong by a small margin (ids 3 mod 7) that the paper's mismatch rule flags."""
    manifest, _, given = digits_train
    ids = np.arange(len(given))
    planted, confused = np.flatnonzero(ids % 7 == 0), np.flatnonzero(ids % 7 == 3)
    predicted = given.copy()
    predicted[planted] = (given[planted] + 1) % 10
    probs = 0.9 * np.eye(10, dtype=np.float32)[predicted] + 0.01
    eye = np.eye(10, dtype=np.float32)
    probs[confused] = 0.46 * eye[given[confused]] + 0.54 * eye[(given[confused] + 1) % 10]
    expected = flag_given_labels("confident", probs, given)
    assert expected[planted].all() and 0 < expected[confused].sum() < len(confused) / 2
    oof = tmp_path / "oof.npz"
    np.savez(oof, probs=probs, given=given)
    run = tmp_path / "run"
    code = main(["train", "method=selectmix", f"data_dir={digits_dir}", f"run_dir={run}", "epochs=1", "num_shards=4",
                 f"oof_from={oof}", "flag_rule=confident"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["selections"][0]["folds"] == [] and summary["selections"][0]["oof_from"] == str(oof)
    assert np.array_equal(np.load(run / "oof.npz")["uncertain"], expected)
    with open(run / "label_issues.csv") as fh:
        flagged = sorted(int(r["id"]) for r in csv.DictReader(fh) if r["flagged"] == "1")
    assert flagged == np.flatnonzero(expected).tolist()


def test_out_of_fold_predictions_for_other_labels_are_refused(ray_session, digits_dir, digits_train, tmp_path, capsys):
    _, _, given = digits_train
    oof = tmp_path / "oof.npz"
    np.savez(oof, probs=np.eye(10, dtype=np.float32)[given], given=(given + 1) % 10)
    code = main(["train", "method=selectmix", f"data_dir={digits_dir}", f"run_dir={tmp_path / 'r'}", "num_shards=4",
                 f"oof_from={oof}"])
    assert code == 2 and "other given labels" in capsys.readouterr().err
    code = main(["train", "method=selectmix", f"data_dir={digits_dir}", f"run_dir={tmp_path / 'r2'}", "num_shards=4",
                 f"oof_from={tmp_path / 'absent.npz'}"])
    assert code == 2 and "is not a file" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "r2").exists(), "refused before a run directory is made"


def test_crossmix_guesses_with_the_model_on_two_workers_from_an_earlier_table(ray_session, digits_dir, digits_train,
                                                                              tmp_path, capsys):
    """CrossMix (guess=mean: the table's probabilities and the model's extra forward pass) through DDP workers."""
    _, _, given = digits_train
    ids = np.arange(len(given))
    predicted = np.where(ids % 5 == 0, (given + 1) % 10, given)
    probs = 0.8 * np.eye(10, dtype=np.float32)[predicted] + 0.02
    oof = tmp_path / "oof.npz"
    np.savez(oof, probs=probs, given=given)
    run = tmp_path / "run"
    code = main(["train", "method=crossmix", f"data_dir={digits_dir}", f"run_dir={run}", "epochs=2", "num_shards=4",
                 "num_workers=2", f"oof_from={oof}", "guess=mean"])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["crossmix", "crossmix"]
    assert all(r["samples_flagged"] == int((ids % 5 == 0).sum()) for r in records), "every flagged id once an epoch"
    with open(run / "label_issues.csv") as fh:
        flagged = sorted(int(r["id"]) for r in csv.DictReader(fh) if r["flagged"] == "1")
    assert flagged == np.flatnonzero(ids % 5 == 0).tolist()


def test_a_second_fold_round_retrains_on_an_earlier_tables_corrections(ray_session, digits_dir, digits_train, tmp_path,
                                                                       capsys):
    """oof_from gives the first round; fold_rounds=2 trains the folds once more on the labels it corrected."""
    _, _, given = digits_train
    probs = 0.8 * np.eye(10, dtype=np.float32)[given] + 0.02
    oof = tmp_path / "oof.npz"
    np.savez(oof, probs=probs, given=given)
    run = tmp_path / "run"
    code = main(["train", "method=selectmix", f"data_dir={digits_dir}", f"run_dir={run}", "epochs=1", "num_shards=4",
                 f"oof_from={oof}", "fold_rounds=2", "folds=3", "fold_epochs=2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "then 1 round(s) of 3 folds x 2 epochs on the labels the round before corrected" in out
    [selection] = json.loads((run / "summary.json").read_text())["selections"]
    assert [f["round"] for f in selection["folds"]] == [2, 2, 2]
    table = np.load(run / "oof.npz")
    assert not np.allclose(table["probs"], probs), "the last round's probabilities are the table's"
    assert not (run / "folds").exists() or not any((run / "folds").rglob("*.npz")), "round caches are cleared"


@pytest.mark.parametrize("keys, said", [
    (["flag_rule=none", "noise_correction=forward"], "flagged by none (0.0%)"),
    (["flag_rule=mismatch", "noise_correction=auto"], "auto: on (>= forward_separation 0.3): every label kept"),
])
def test_crossmix_forward_corrects_every_label_through_the_tables_noise_matrix(ray_session, digits_dir, digits_train,
                                                                              tmp_path, capsys, keys, said):
    """Nothing dropped (nothing flagged, or auto's flags reported but kept), the matrix estimated on the driver
    reaches the workers and oof.npz; the table below says class 0 is labelled 1 a third of the time."""
    _, _, given = digits_train
    true_guess = np.where((given == 1) & (np.arange(len(given)) % 3 == 0), 0, given)
    probs = 0.8 * np.eye(10, dtype=np.float32)[true_guess] + 0.02
    oof = tmp_path / "oof.npz"
    np.savez(oof, probs=probs, given=given)
    run = tmp_path / "run"
    code = main(["train", "method=crossmix", f"data_dir={digits_dir}", f"run_dir={run}", "epochs=1", "num_shards=4",
                 f"oof_from={oof}", *keys])
    out = capsys.readouterr().out
    assert code == 0, out
    assert said in out and "forward correction: " in out and "labels estimated wrong" in out
    [record] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert record["samples_flagged"] == 0
    matrix = np.load(run / "oof.npz")["noise_matrix"]
    assert matrix[0, 1] > 0.2 and matrix[0, 0] < 0.8 and np.allclose(np.diag(matrix)[2:], 1.0)
