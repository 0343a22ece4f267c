"""`noisymix bench`: spec validation, cell caching and invalidation, failed cells, the table and the plots."""

import json
from pathlib import Path

import pytest
import yaml

from noisymix.launch import bench
from noisymix.launch.bench_spec import SpecError, load_spec, parse_spec, same_computation
from noisymix.launch.bench_tables import markdown, summary_rows
from noisymix.launch.cli import main
from noisymix.launch.config import build_config


def spec_dict(**changes):
    spec = {
        "name": "tiny",
        "base": {"source": "digits", "epochs": 2, "num_shards": 4},
        "settings": {"sym40": {"noise_type": "symmetric", "noise_rate": 0.4, "seeds": [0, 1]},
                     "pair40": {"noise_type": "pairflip", "noise_rate": 0.4}},
        "methods": {"ce": {"method": "ce"}, "mixup": {"method": "mixup"},
                    "gmm": {"method": "gmm_select", "settings": ["sym40"]},
                    "knn2": {"method": "mixnn", "knn": 2, "settings": ["sym40"], "seeds": [1]}},
        "curves": {"setting": "sym40", "seed": 0},
    }
    spec.update(changes)
    return spec


def test_spec_expands_seed_major_with_a_clean_bound_per_seed_and_method_restrictions():
    spec = parse_spec(spec_dict())
    assert [c.id for c in spec.cells] == [
        "clean/clean/seed0", "sym40/ce/seed0", "sym40/mixup/seed0", "sym40/gmm/seed0",
        "pair40/ce/seed0", "pair40/mixup/seed0",
        "clean/clean/seed1", "sym40/ce/seed1", "sym40/mixup/seed1", "sym40/gmm/seed1", "sym40/knn2/seed1"]
    clean = spec.cells[0].overrides
    assert (clean["method"], clean["noise_type"], clean["noise_rate"], clean["seed"]) == ("ce", "none", 0.0, 0)
    assert spec.cells[5].overrides == {"source": "digits", "epochs": 2, "num_shards": 4, "noise_type": "pairflip",
                                       "noise_rate": 0.4, "method": "mixup", "seed": 0}


def test_setting_and_seed_placeholders_name_per_cell_files():
    methods = {"ce": {"method": "ce"}, "oracle": {"method": "selectmix", "oof_from": "tables/{setting}-seed{seed}.npz"}}
    spec = parse_spec(spec_dict(methods=methods))
    files = {c.id: c.overrides["oof_from"] for c in spec.cells if c.method == "oracle"}
    assert files == {"sym40/oracle/seed0": "tables/sym40-seed0.npz", "pair40/oracle/seed0": "tables/pair40-seed0.npz",
                     "sym40/oracle/seed1": "tables/sym40-seed1.npz"}


def test_the_committed_fashion_spec_is_valid(monkeypatch):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # its source_path is relative to the repository root, like the README's command
    spec = load_spec(root / "benchmarks" / "fashion_mnist.yaml")
    assert {c.setting for c in spec.cells if c.group == "matrix"} >= {"symmetric40", "instance40", "symmetric_incl80"}
    assert sorted({c.seed for c in spec.cells if c.setting == "symmetric40" and c.group == "matrix"}) == [0, 1, 2]
    for other in ("fashion_mnist_long.yaml", "fashion_mnist_memorise.yaml"):
        assert {c.method for c in load_spec(root / "benchmarks" / other).cells} >= {"ce", "clean", "selectmix", "mixnn"}
    ablations = {c.method for c in load_spec(root / "benchmarks" / "selectmix_ablations.yaml").cells}
    assert {"ce", "clean", "selectmix", "random_partners", "selection_only", "folds3"} <= ablations


ONE_SETTING = {"methods": {"ce": {"method": "ce"}}, "curves": {}}


@pytest.mark.parametrize("change, message", [
    ({"methods": {"ce": {"method": "ce"}, "x": {"method": "dividemix"}}}, "method='dividemix'"),
    ({"settings": {"s": {"noise_type": "gaussian", "noise_rate": 0.4}}, **ONE_SETTING}, "noise_type='gaussian'"),
    ({"base": {"source": "imagenet"}}, "source='imagenet'"),
    ({"base": {"source": "idx", "source_path": "/no/such/dir"}}, "source_path '/no/such/dir' does not exist"),
    ({"methods": {"mixup": {"method": "mixup"}}}, "must include `ce: {method: ce}`"),
    ({"methods": {"ce": {"method": "ce"}, "m": {"alpha": 1.0}}}, "methods.m needs a `method` key"),
    ({"methods": {"ce": {"method": "ce", "settings": ["sym99"]}}}, "unknown setting(s) ['sym99']"),
    ({"settings": {"s": {"noise_type": "symmetric", "noise_rate": 0.4, "seeds": []}}, **ONE_SETTING},
     "seeds must be a non-empty list"),
    ({"settings": {"s": {"noise_type": "symmetric"}}, **ONE_SETTING}, "needs noise_type and noise_rate"),
    ({"colour": "red"}, "unknown spec key(s): colour"),
    ({"name": "a/b"}, "file-name-safe"),
    ({"curves": {"setting": "nope"}}, "curves.setting 'nope'"),
    ({"throughput": {"setting": "nope", "cells": {}}}, "throughput.setting 'nope'"),
    ({"base": {"epochs": 0}}, "epochs=0 is outside"),
])
def test_bad_specs_are_refused_before_any_cell(change, message):
    with pytest.raises(SpecError) as info:
        parse_spec(spec_dict(**change))
    assert message in str(info.value)


def test_cli_refuses_a_bad_spec_with_one_line_and_runs_nothing(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict(methods={"ce": {"method": "ce"}, "x": {"method": "dividemix"}})))
    code = main(["bench", str(path), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("noisymix: error: cell ") and "dividemix" in err
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def fake_summary(config, acc):
    method, seed = config.method.name, config.run.seed
    return {"method": method, "test_acc": acc, "test_acc_last": acc - 0.01, "test_acc_best_test": acc + 0.01,
            "wall_time_s": 10.0 * (2 if method == "gmm_select" else 1), "workers": config.resources.num_workers,
            "seed": seed, "stage_times_s": {"main_training": 9.0},
            **({"detection": {"f1": 0.8}, "given_label_detection": {"f1": 0.85 + 0.01 * seed},
                "corrected_label_acc": 0.7} if method == "gmm_select" else {})}


# Headline accuracy of each fake cell: clean 0.9, CE 0.6 (+0.02 per seed), the others in between.
FAKE_ACC = {"clean": 0.9, "ce": 0.6, "mixup": 0.66, "gmm_select": 0.75, "mixnn": 0.7}


class FakeTrain:
    """Stands in for launch.train.train: writes metrics.jsonl and returns a summary; can fail on demand."""

    def __init__(self, fail: str = ""):
        self.calls, self.fail = [], fail

    def __call__(self, config, log=print):
        self.calls.append(config.run.run_dir)
        if self.fail and self.fail in config.run.run_dir:
            raise RuntimeError("worker exploded\nsecond line")
        run = Path(config.run.run_dir)
        run.mkdir(parents=True)
        method = "clean" if config.data.noise_type == "none" else config.method.name
        acc = FAKE_ACC[method] + 0.02 * config.run.seed
        records = [{"epoch": e, "test_acc": acc - 0.1 + 0.05 * e, "val_acc": acc - 0.1 + 0.04 * e,
                    "epoch_time_s": 5.0, "samples_per_s_per_worker": 1000.0 if method != "gmm_select" else 800.0,
                    "pass_s": 0.5 if method == "gmm_select" else 0.0} for e in range(config.train.epochs)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return fake_summary(config, acc)


@pytest.fixture
def fake_train(monkeypatch):
    import noisymix.launch.train

    def install(fail=""):
        fake = FakeTrain(fail)
        monkeypatch.setattr(noisymix.launch.train, "train", fake)
        monkeypatch.setattr(bench, "detector_curve", lambda run, config: None)
        return fake
    return install


def test_finished_cells_are_reused_and_a_changed_config_reruns_only_its_cells(tmp_path, fake_train):
    work = tmp_path / "work"
    first = fake_train()
    assert bench.run_spec(parse_spec(spec_dict()), work, log=lambda *_: None) == {"chosen": 11, "ran": 11, "failed": 0}
    assert len(first.calls) == 11
    again = fake_train()
    assert bench.run_spec(parse_spec(spec_dict()), work, log=lambda *_: None)["ran"] == 0 and not again.calls
    changed = spec_dict()
    changed["methods"]["mixup"] = {"method": "mixup", "alpha": 0.5}
    third = fake_train()
    bench.run_spec(parse_spec(changed), work, log=lambda *_: None)
    assert sorted(Path(p).parent.name for p in third.calls) == ["pair40-mixup-seed0", "sym40-mixup-seed0",
                                                               "sym40-mixup-seed1"]
    # The table only counts a cell when it ran with the config the spec asks for now.
    stale = bench.gather(parse_spec(spec_dict()), work)["cells"]
    assert stale["sym40/mixup/seed0"]["status"] == "not run" and stale["sym40/ce/seed0"]["status"] == "done"


def test_only_patterns_choose_cells(tmp_path, fake_train):
    fake = fake_train()
    outcome = bench.run_spec(parse_spec(spec_dict()), tmp_path / "w", only=["sym40/*/seed1"], log=lambda *_: None)
    assert outcome["ran"] == 4 and all("sym40" in p and "seed1" in p for p in fake.calls)


def test_a_failed_cell_is_reported_and_the_others_still_run(tmp_path, fake_train):
    work = tmp_path / "work"
    fake_train(fail="pair40-mixup")
    outcome = bench.run_spec(parse_spec(spec_dict()), work, log=lambda *_: None)
    assert outcome == {"chosen": 11, "ran": 11, "failed": 1}
    results = bench.gather(parse_spec(spec_dict()), work)
    failed = results["cells"]["pair40/mixup/seed0"]
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: worker exploded"
    text = markdown({**results, "command": "noisymix bench tiny.yaml"}, [])
    assert "| pair40 | mixup | 0 | failed |" in text and "- pair40/mixup/seed0: RuntimeError: worker exploded" in text
    fake = fake_train()
    bench.run_spec(parse_spec(spec_dict()), work, log=lambda *_: None)
    assert [Path(p).parent.name for p in fake.calls] == ["pair40-mixup-seed0"]  # a failed cell is retried


def test_table_numbers_on_fake_runs(tmp_path, fake_train):
    work = tmp_path / "work"
    fake_train()
    bench.run_spec(parse_spec(spec_dict()), work, log=lambda *_: None)
    results = bench.gather(parse_spec(spec_dict()), work)
    rows = {(r["setting"], r["method"]): r for r in summary_rows(results)}
    gmm = rows["sym40", "gmm"]
    assert gmm["seeds"] == [0, 1]
    assert gmm["headline"][0] == pytest.approx(0.76) and gmm["headline"][1] == pytest.approx(0.0141421, rel=1e-4)
    assert gmm["best_test"][0] == pytest.approx(0.77) and gmm["last"][0] == pytest.approx(0.75)
    assert gmm["recovery"] == pytest.approx((0.76 - 0.61) / (0.91 - 0.61))
    assert gmm["wall_vs_ce"] == (2.0, 0.0) and gmm["f1"] == (0.8, 0.0)
    assert rows["pair40", "mixup"]["recovery"] == pytest.approx(0.06 / 0.3)
    text = markdown({**results, "command": "noisymix bench tiny.yaml"}, ["x.png"])
    assert "| sym40 | gmm | 2 | 0.7600 ± 0.0141 | 0.7500 ± 0.0141 | 0.7700 ± 0.0141 | 0.50 | 0.800 ± 0.000 | 0.855 ± 0.007 |" in text
    assert "Clean bound (CE on the true labels): 0.9100 ± 0.0141 over 2 seed(s)." in text
    # Cost at the curves setting: gmm's step rate 800 vs CE's 1000, pass 0.5 s of 5 s epochs.
    assert "| gmm | 1 | 800 | 1.25x | 5.0 | 10.0% | 0.0% | - | - | 20 |" in text, "no index: no split"


def test_index_split_sums_the_actor_seconds_and_is_absent_where_unrecorded():
    from noisymix.launch.bench_tables import _index_split

    records = [{"index_refresh_s": 1.0, "index_query_s": 2.0, "index_s": 4.0}, {"index_s": 1.0},
               {"index_refresh_s": 0.5, "index_query_s": 1.0, "index_s": 2.0}]
    assert _index_split(records) == (1.5, 3.0)
    assert _index_split([{"index_s": 4.0}, {"index_s": 1.0}]) is None


def test_report_files_and_plots_from_fake_runs(tmp_path, fake_train):
    work = tmp_path / "work"
    fake_train()
    spec = parse_spec(spec_dict())
    bench.run_spec(spec, work, log=lambda *_: None)
    results = bench.gather(spec, work)
    results["cells"]["sym40/gmm/seed0"]["detector_curve"] = {
        "detector": "gmm", "average_precision": 0.8, "precision": [0.4, 0.8, 1.0], "recall": [1.0, 0.5, 0.0]}
    paths = bench.write_report(results, tmp_path / "out", "noisymix bench tiny.yaml")
    names = sorted(p.name for p in paths)
    assert names == ["tiny.json", "tiny.md", "tiny_accuracy_vs_noise.png", "tiny_curves.png", "tiny_detectors_pr.png"]
    for path in paths:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert json.loads((tmp_path / "out" / "tiny.json").read_text())["command"] == "noisymix bench tiny.yaml"
    assert "![tiny_curves.png](tiny_curves.png)" in (tmp_path / "out" / "tiny.md").read_text()


def test_a_cell_matches_on_what_it_computes_not_where_it_ran(tmp_path):
    cell = parse_spec(spec_dict()).cells[1]
    ran = cell.config(tmp_path / "a").to_dict()
    assert same_computation(ran, cell.config(tmp_path / "b"))
    other = parse_spec(spec_dict(base={"source": "digits", "epochs": 3, "num_shards": 4})).cells[1]
    assert not same_computation(ran, other.config(tmp_path / "a"))
    # A key added to Config since the cell ran leaves it valid at its default, not at another value.
    mixnn = next(c for c in parse_spec(spec_dict()).cells if c.id == "sym40/knn2/seed1")
    older = {k: v for k, v in mixnn.config(tmp_path).to_dict().items() if k != "index_nprobe"}
    assert same_computation(older, mixnn.config(tmp_path))
    assert not same_computation(older, build_config(overrides={**mixnn.overrides, "index_nprobe": 32}))
    # A key whose default changed the behaviour stands, in a record made before it, at the old behaviour.
    selectmix_ran = build_config(overrides={"method": "selectmix"}).to_dict()
    del selectmix_ran["fold_select"]
    assert same_computation(selectmix_ran, build_config(overrides={"method": "selectmix", "fold_select": "last"}))
    assert not same_computation(selectmix_ran, build_config(overrides={"method": "selectmix"}))
    # Another method's knobs do not touch a CE cell; the method's own knobs do.
    assert same_computation(ran, build_config(overrides={**cell.overrides, "neighbour_source": "batch",
                                                         "folds": 3}))
    gmm = parse_spec(spec_dict()).cells[3]
    assert gmm.overrides["method"] == "gmm_select"
    gmm_ran = gmm.config(tmp_path).to_dict()
    assert not same_computation(gmm_ran, build_config(overrides={**gmm.overrides, "gmm_threshold": 0.6}))
    assert same_computation(gmm_ran, build_config(overrides={**gmm.overrides, "partner_source": "batch"}))
    # A key the cell ran with that Config no longer has: the run is not comparable.
    assert not same_computation({**ran, "retired_knob": 1}, cell.config(tmp_path / "a"))


def test_a_real_bench_on_digits_trains_caches_and_scores_the_detector(tmp_path, ray_session):
    spec = parse_spec(spec_dict(settings={"sym40": {"noise_type": "symmetric", "noise_rate": 0.4}},
                                methods={"ce": {"method": "ce"}, "gmm": {"method": "gmm_select"}}))
    work = tmp_path / "work"
    assert bench.run_spec(spec, work, log=lambda *_: None) == {"chosen": 3, "ran": 3, "failed": 0}
    results = bench.gather(spec, work)
    gmm = results["cells"]["sym40/gmm/seed0"]
    assert gmm["status"] == "done" and (work / "cells" / "sym40-gmm-seed0" / "run" / "summary.json").is_file()
    curve = gmm["detector_curve"]
    assert 0.4 < curve["average_precision"] <= 1.0 and len(curve["precision"]) == len(curve["recall"]) > 10
    assert bench.run_spec(spec, work, log=lambda *_: None)["ran"] == 0


def test_code_digest_follows_training_sources_not_the_bench_itself(tmp_path):
    for folder in ("selection", "launch"):
        (tmp_path / folder).mkdir()
    (tmp_path / "selection" / "gmm.py").write_text("a = 1\n")
    (tmp_path / "launch" / "bench_tables.py").write_text("b = 1\n")
    before = bench.code_digest(tmp_path)
    (tmp_path / "launch" / "bench_tables.py").write_text("b = 2\n")
    assert bench.code_digest(tmp_path) == before
    (tmp_path / "selection" / "gmm.py").write_text("a = 2\n")
    assert bench.code_digest(tmp_path) != before
