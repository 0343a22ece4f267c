"""`noisymix tune`: the sweep spec, every refusal before a trial starts, the resource plan, the fold key and
the report's figures. No Ray cluster (the sweep itself is in test_tune.py)."""

from pathlib import Path

import pytest
import yaml

from noisymix.launch.cli import main
from noisymix.launch.config import ConfigError, build_config
from noisymix.launch.sweep import EpochReporter, absolute_paths, fold_key, make_searcher, plan_concurrency, search_space
from noisymix.launch.sweep_report import asha_savings, choice_resolution, invocation_seconds, rank_correlation
from noisymix.launch.tune_spec import SweepSpecError, parse_sweep, trial_values

BASE = {"source": "digits", "epochs": 3, "num_shards": 4}


def spec(**overrides):
    raw = {"name": "s", "base": dict(BASE), "space": {"method": {"choice": ["selectmix", "mixnn"]},
                                                      "lr": {"loguniform": [0.01, 0.1]},
                                                      "selectmix": {"alpha": {"uniform": [0.5, 4.0]}},
                                                      "mixnn": {"knn": {"randint": [1, 5]}}}}
    raw.update(overrides)
    return raw


def test_a_spec_parses_into_dimensions_with_per_method_sub_spaces():
    parsed = parse_sweep(spec(num_samples=4, max_concurrent=2, scheduler={"name": "asha", "grace_period": 1}))
    assert [d.name for d in parsed.dimensions] == ["method", "lr", "selectmix.alpha", "mixnn.knn"]
    assert parsed.methods() == ["selectmix", "mixnn"] and parsed.max_epochs() == 3
    assert parsed.scheduler == {"name": "asha", "grace_period": 1, "reduction_factor": 2}
    assert parse_sweep(spec()).num_samples == 8, "sampled dimensions: 8 trials unless asked"
    assert parse_sweep(spec(space={"lr": {"grid": [0.01, 0.1]}})).num_samples == 1, "a grid alone runs once"
    space = search_space(parsed)
    assert set(space) == {"method", "lr", "selectmix", "mixnn"} and set(space["mixnn"]) == {"knn"}
    params = {"method": "mixnn", "lr": 0.02, "selectmix": {"alpha": 3.0}, "mixnn": {"knn": 2}}
    assert trial_values(parsed.base, params) == {**BASE, "method": "mixnn", "lr": 0.02, "knn": 2}


def test_command_line_keys_set_spec_keys_or_base_keys():
    parsed = parse_sweep(spec(), {"num_samples": 2, "epochs": 5, "sweep_dir": "/tmp/x"})
    assert parsed.num_samples == 2 and parsed.base["epochs"] == 5 and parsed.sweep_dir == "/tmp/x"
    assert parsed.max_epochs() == 5


@pytest.mark.parametrize("change, message", [
    ({"space": {"lrr": {"choice": [0.1]}}}, "unknown config key(s): lrr"),
    ({"base": {**BASE, "epochz": 2}}, "base: unknown config key(s): epochz"),
    ({"space": {"lr": {"uniform": [0.1, 0.1]}}}, "uniform needs lo < hi"),
    ({"space": {"lr": {"loguniform": [0.0, 0.1]}}}, "loguniform needs 0 < lo"),
    ({"space": {"lr": {"choice": []}}}, "choice needs a non-empty list"),
    ({"space": {"lr": {"normal": [0, 1]}}}, "unknown distribution 'normal'"),
    ({"space": {"knn": {"randint": [1.5, 4]}, "method": {"choice": ["mixnn"]}}}, "randint needs integer bounds"),
    ({"space": {"lr": {"choice": [-1.0]}}}, "lr=-1.0 is outside"),
    ({"space": {}}, "space must be a non-empty mapping"),
    ({"scheduler": "hyperband"}, "scheduler must be one of asha, fifo"),
    ({"scheduler": {"name": "asha", "reduction_factor": 1}}, "reduction_factor must be a number > 1"),
    ({"search": "bohb"}, "search must be one of random, optuna"),
    ({"num_samples": 0}, "num_samples must be an integer >= 1"),
    ({"max_concurrent": 0}, "max_concurrent must be an integer >= 1"),
    ({"metric": "test_acc"}, "metric 'test_acc' is not allowed"),
    ({"search": "optuna", "space": {"lr": {"grid": [0.01, 0.1]}}}, "use choice instead of grid"),
    ({"space": {"method": {"choice": ["selectmix"]}, "mixnn": {"knn": {"choice": [2]}}}},
     "the sweep's trials never train mixnn"),
    ({"space": {"method": {"choice": ["selectmix"]}, "selectmix": {"knn": {"choice": [2]}}}},
     "selectmix has no knob knn"),
    ({"space": {"method": {"choice": ["selectmix", "ce"]}, "alpha": {"uniform": [0.5, 2.0]}}},
     "ce has no knob alpha; put it in the sub-space"),
    ({"space": {"noise_rate": {"choice": [0.2, 0.4]}}}, "space.noise_rate: the data, the seed and where"),
    ({"space": {"method": {"choice": ["selectmix", "nope"]}}}, "unknown method(s) nope"),
    ({"base": {**BASE, "run_dir": "x"}}, "each trial's run directory is inside the sweep directory"),
    ({"name": "a b"}, "name must be a file-name-safe string"),
    ({"trials": 3}, "unknown spec key(s): trials"),
])
def test_a_bad_spec_is_refused_with_a_message_naming_the_part(change, message):
    with pytest.raises(SweepSpecError, match=None) as refused:
        parse_sweep(spec(**change))
    assert message in str(refused.value)


def test_the_command_refuses_a_bad_spec_in_one_line_and_leaves_no_sweep_directory(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec(space={"lr": {"uniform": [0.2, 0.1]}}, sweep_dir=str(tmp_path / "sweep"))))
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["noisymix: error: space.lr: uniform needs lo < hi, got [0.2, 0.1]"]
    assert not (tmp_path / "sweep").exists()


def test_concurrency_never_asks_for_more_cores_than_the_cluster_has():
    lines = []
    at_once, placed = plan_concurrency(parse_sweep(spec(max_concurrent=3)), 2.0, 0.0, lines.append)
    assert (at_once, placed) == (2, {"cpus_per_worker": 1.0})
    assert lines == ["max_concurrent=3 lowered to 2: each trial reserves 1 CPUs and the cluster has 2"]
    at_once, placed = plan_concurrency(parse_sweep(spec(max_concurrent=2)), 16.0, 0.0, lines.append)
    assert (at_once, placed) == (2, {"cpus_per_worker": 8.0})
    wide = spec(max_concurrent=4, base={**BASE, "num_workers": 2, "cpus_per_worker": 2.0})
    assert plan_concurrency(parse_sweep(wide), 8.0, 0.0, lines.append) == (2, {"cpus_per_worker": 2.0})
    with pytest.raises(ConfigError, match="one trial needs 6 CPUs"):
        plan_concurrency(parse_sweep(spec(base={**BASE, "num_workers": 2, "cpus_per_worker": 3.0})), 4.0, 0.0, print)
    gpus = spec(max_concurrent=4, base={**BASE, "num_workers": 2, "use_gpu": True, "num_shards": 8})
    assert plan_concurrency(parse_sweep(gpus), 16.0, 4.0, lines.append) == (2, {"cpus_per_worker": 1.0})
    with pytest.raises(ConfigError, match="and 2 GPUs; the cluster has 4 CPUs and 0 GPUs"):
        plan_concurrency(parse_sweep(gpus), 4.0, 0.0, print)
    waiting = spec(max_concurrent=4, base={**BASE, "num_workers": 2, "use_gpu": True, "num_shards": 8, "wait_for_resources": True})
    assert plan_concurrency(parse_sweep(waiting), 4.0, 0.0, lines.append) == (4, {"cpus_per_worker": 1.0})
    assert lines[-1].startswith("max_concurrent=4: the cluster holds 0 trial(s) now; the others wait")


def test_the_fold_key_follows_what_the_folds_read_and_nothing_else():
    def key(**values):
        values = {**BASE, "method": "selectmix", **values}
        return fold_key(values, build_config(overrides=values))

    assert key(alpha=0.5) == key(alpha=4.0) == key(tau_high=0.9, epochs=30)
    assert len({key(), key(fold_epochs=3), key(folds=4), key(lr=0.1), key(seed=1), key(noise_rate=0.2)}) == 6
    assert fold_key({**BASE, "method": "mixnn", "clean_from": "x"}, build_config(overrides={**BASE})) == key()
    # The stage is the first round: trials with more rounds share it and train their later rounds themselves
    assert key(fold_rounds=2, flag_rule="confident") == key(fold_rounds=3, fold_round_train="kept") == key()
    # CrossMix's fold_epochs=-1 is a fifth of the run: its key follows epochs, and equals SelectMix's with those folds
    crossmix = {**BASE, "method": "crossmix", "epochs": 40}
    assert fold_key(crossmix, build_config(overrides=crossmix)) == key(fold_epochs=8, epochs=40)
    assert fold_key(crossmix, build_config(overrides=crossmix)) != fold_key(
        {**crossmix, "epochs": 30}, build_config(overrides={**crossmix, "epochs": 30}))


def test_the_search_is_told_the_noisy_validation_accuracy_only(monkeypatch):
    told = []
    monkeypatch.setattr("noisymix.launch.sweep.tune.report", told.append)
    report = EpochReporter("val_acc")
    for epoch, test in ((0, 0.1), (1, 0.9), (1, 0.9), (2, 0.0)):   # epoch 1 sent twice after a worker restart
        report({"epoch": epoch, "val_acc": 0.5 + epoch / 10, "test_acc": test, "train_loss": 1.0})
    assert told == [{"epochs_done": 1, "val_acc": 0.5}, {"epochs_done": 2, "val_acc": 0.6},
                    {"epochs_done": 3, "val_acc": 0.7}]


def test_the_report_counts_epochs_saved_and_rank_correlation():
    rows = [{"status": "finished", "epochs": 4, "epochs_run": 4, "best_val_acc": 0.5, "test_acc_at_best_val": 0.8},
            {"status": "stopped early", "epochs": 4, "epochs_run": 1, "best_val_acc": 0.2, "test_acc_at_best_val": 0.3},
            {"status": "stopped early", "epochs": 4, "epochs_run": 2, "best_val_acc": 0.3, "test_acc_at_best_val": 0.5},
            {"status": "failed", "epochs": 4, "epochs_run": 0, "best_val_acc": None, "test_acc_at_best_val": None}]
    assert asha_savings(rows) == {"trial_epochs_run": 7, "trial_epochs_budget": 12, "share_saved": pytest.approx(5 / 12)}
    assert rank_correlation(rows) == pytest.approx(1.0)
    assert rank_correlation(rows[:2]) is None


def test_the_report_adds_up_the_wall_time_of_every_invocation_of_a_resumed_sweep():
    assert invocation_seconds(None, 5.0) == [5.0]
    assert invocation_seconds({"wall_s": 100.0}, 5.0) == [100.0, 5.0], "a sweep.json from before the list"
    assert invocation_seconds({"wall_s": 5.0, "invocation_s": [100.0, 5.0]}, 1.0) == [100.0, 5.0, 1.0]


def test_the_report_says_which_trials_the_noisy_validation_split_cannot_tell_apart():
    rows = [{"trial": "a", "best_val_acc": 0.50, "test_acc_at_best_val": 0.80},
            {"trial": "b", "best_val_acc": 0.47, "test_acc_at_best_val": 0.84},   # 0.03 < 2 x 0.0158
            {"trial": "c", "best_val_acc": 0.46, "test_acc_at_best_val": 0.70},   # 0.04 > 2 x 0.0158
            {"trial": "d", "best_val_acc": None, "test_acc_at_best_val": None}]
    resolution = choice_resolution(rows, 1000)
    assert resolution["standard_error"] == pytest.approx((0.5 * 0.5 / 1000) ** 0.5)
    assert resolution["tied_trials"] == 2 and resolution["tied_test_acc"] == [0.80, 0.84]
    assert choice_resolution(rows, 100_000)["tied_trials"] == 1, "a larger split breaks the tie"
    assert choice_resolution(rows[3:], 1000) is None and choice_resolution(rows, 0) is None


def test_optuna_samples_the_nested_space_with_the_spec_seed():
    parsed = parse_sweep(spec(search="optuna", seed=7))
    suggested = []
    for _ in range(2):
        searcher = make_searcher(parsed, 1)
        searcher.set_search_properties(parsed.metric, parsed.mode, search_space(parsed))
        suggested.append(searcher.suggest("t0"))
    assert suggested[0] == suggested[1], "same seed, same first point"
    point = suggested[0]
    assert point["method"] in ("selectmix", "mixnn") and 0.01 <= point["lr"] <= 0.1
    assert 0.5 <= point["selectmix"]["alpha"] <= 4.0 and 1 <= point["mixnn"]["knn"] < 5


def test_a_trial_recognises_data_the_driver_prepared_from_a_relative_source_path(tmp_path, monkeypatch):
    """The driver prepares from its own directory; a trial runs in another one. It must find the prepared data
    as it is (no 'prepared with other settings'), and still read the run's own files from the driver's folder."""
    from noisymix.launch.prepare import prepare
    from tests.test_sources import make_idx_dir

    driver, trial = tmp_path / "driver", tmp_path / "trial"
    (driver / "idx").mkdir(parents=True)
    trial.mkdir()
    make_idx_dir(driver / "idx", n_train=40, n_test=10, gz=False)
    base = {"source": "idx", "source_path": "idx", "num_shards": 2, "data_dir": "data/tiny", "oof_from": "oof.npz"}
    monkeypatch.chdir(driver)
    prepared = prepare(build_config(overrides=base).data, 0, log=print)
    values = absolute_paths({**base, "data_dir": str(Path(prepared).resolve())}, str(driver))
    assert values["oof_from"] == str(driver / "oof.npz") and values["source_path"] == "idx"
    monkeypatch.chdir(trial)
    lines = []
    prepare(build_config(overrides={k: v for k, v in values.items() if k != "oof_from"}).data, 0, log=lines.append)
    assert lines == [f"data ready: {driver / 'data' / 'tiny'} (already prepared with this spec)"]
