"""The benchmark scripts are thin clients of the library: each imports, and its library calls work on
tiny inputs, so a refactor cannot break them silently."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_config
from noisymix.distributed import shards
from noisymix.distributed.artifacts import RunDir, read_out_of_fold
from noisymix.distributed.engine import InputTransform
from noisymix.selection.crossval import Fold

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py"))


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_imports_and_has_a_main(name):
    assert callable(load(name).main)


def test_step_cost_steps_every_method_through_its_method_object():
    step_cost = load("step_cost")
    rng = np.random.default_rng(0)
    true = np.arange(400) % 10
    labels = np.where(rng.random(400) < 0.4, rng.integers(0, 10, 400), true)
    images = rng.integers(0, 255, (400, 8, 8, 1), dtype=np.uint8)
    transform = InputTransform((0.5,), (0.25,))
    step_cost.NUM_SAMPLES = 400
    rules = step_cost.batch_rules(labels, true, images, transform, rng)
    assert {"ce", "mixup", "gmm_select", "selectmix (global)", "mixnn (global, K=3)"} <= set(rules)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = (np.arange(32), images[:32], labels[:32])
    for rule in rules.values():
        assert step_cost.time_steps(model, optimizer, rule, [batch], transform, rng) > 0


def test_oracle_table_writes_the_true_labels_beside_the_given_ones(digits_dir, tmp_path):
    held = load("oracle_table").write_oracle_table(digits_dir, tmp_path / "oracle" / "oof.npz")
    manifest = shards.load_manifest(digits_dir)
    true = shards.load_labels(str(digits_dir), manifest, label_key=shards.TRUE_LABEL)
    table = read_out_of_fold(tmp_path / "oracle" / "oof.npz")
    assert np.array_equal(table["probs"].argmax(1), true) and held["wrong_labels"] == int(np.sum(table["given"] != true))


def test_clean_fold_table_holds_real_folds_trained_on_the_true_labels_beside_the_given_ones(digits_dir, tmp_path):
    config = make_config(tmp_path, method="selectmix", folds=3)
    target = tmp_path / "clean_folds" / "oof.npz"
    manifest = shards.load_manifest(digits_dir)
    given = shards.load_labels(str(digits_dir), manifest)
    true = shards.load_labels(str(digits_dir), manifest, label_key=shards.TRUE_LABEL)
    trained_on = []

    def in_process(trainer, folds):
        trained_on.append(trainer.labels)
        return [trainer(fold) for fold in folds]

    held = load("oracle_table").write_clean_fold_table(config, digits_dir, target, fold_epochs=2, map=in_process)
    assert len(trained_on) == 1 and np.array_equal(trained_on[0], true) and held["fold_epochs_kept"] != []
    table = read_out_of_fold(target)
    assert np.array_equal(table["given"], given) and sorted(np.unique(table["fold"])) == [0, 1, 2]
    predicted = table["probs"].argmax(1)
    assert held["fold_accuracy_on_true"] == pytest.approx(np.mean(predicted == true))
    # folds that learned the true classes agree with the wrong labels (40%) about as rarely as chance
    assert held["fold_accuracy_on_true"] > 0.5 and np.mean(predicted[given != true] == given[given != true]) < 0.2
    assert held["wrong_labels"] == int(np.sum(given != true)) and len(held["fold_epochs_kept"]) == 3


def test_fold_accuracy_scores_a_run_with_the_library_metrics(digits_dir, tmp_path):
    fold_accuracy = load("fold_accuracy")
    manifest = shards.load_manifest(digits_dir)
    given = shards.load_labels(str(digits_dir), manifest)
    true = shards.load_labels(str(digits_dir), manifest, label_key=shards.TRUE_LABEL)
    predicted = true.copy()
    predicted[:100] = (true[:100] + 1) % 10   # the folds err on the first 100 samples
    run = RunDir(tmp_path)
    run.write_config({"data_dir": str(digits_dir), "folds": 5, "fold_epochs": 2, "fold_select": "best", "seed": 0,
                      "noise_type": "symmetric"})
    run.write_out_of_fold(np.eye(10, dtype=np.float32)[predicted], given)
    row = fold_accuracy.fold_quality(tmp_path, 0.9)
    assert row["oof_acc"] == pytest.approx(1 - 100 / len(true))
    flagged, wrong = predicted != given, given != true
    assert row["precision"] == pytest.approx(np.mean(wrong[flagged]))
    assert fold_accuracy.required_clean_accuracy(0.4, 1.0, 0.9) == pytest.approx(1 - 0.4 * (1 / (0.9 / 1.1) - 1) / 0.6)
    rules = {r["rule"]: r for r in fold_accuracy.rule_scores(tmp_path, [0.5, 1.5])}
    assert set(rules) == {"mismatch", "confident", "oof_gmm", "agree", "auto", "none", "confident, top P >= 0.5",
                          "confident, top P >= 1.5"}
    assert rules["mismatch"]["precision"] == pytest.approx(row["precision"])
    assert rules["mismatch"]["class_acc_on_flagged"] == pytest.approx(np.mean(predicted[flagged] == true[flagged]))
    assert rules["mismatch"]["kept_noise"] == pytest.approx(np.mean(wrong[~flagged]))
    assert rules["none"]["flagged_rate"] == 0 and rules["none"]["kept_noise"] == pytest.approx(np.mean(wrong))
    # one-hot rows: every top probability is 1, so a floor of 0.5 keeps confident learning's flags, 1.5 none of them
    assert rules["confident, top P >= 0.5"]["f1"] == rules["confident"]["f1"]
    assert rules["confident, top P >= 1.5"]["flagged_rate"] == 0
    # the kept samples' noise matrix: estimated from a table whose argmax is the true class on all but 100 samples
    assert 0 < rules["mismatch"]["noise_matrix_max_error"] < 0.2


def finished_run(run_dir: Path, data_dir: Path, **config) -> dict:
    """A run directory holding a config and an untrained model_best.pt of the auto model for `data_dir`'s images;
    returns the data's manifest."""
    from noisymix.distributed.models import create_model

    manifest = shards.load_manifest(data_dir)
    RunDir(run_dir).write_config({"data_dir": str(data_dir), "model": "auto", "width": 0, **config})
    height, _, channels = manifest["image_shape"]
    torch.manual_seed(0)
    torch.save({"model": create_model("auto", channels, 10, height).state_dict()}, run_dir / "model_best.pt")
    return manifest


def test_per_class_accuracy_scores_a_runs_best_model_on_each_test_class(digits_dir, tmp_path):
    per_class = load("per_class_accuracy")
    manifest = finished_run(tmp_path, digits_dir, method="ce")
    row = per_class.per_class_accuracy(tmp_path)
    labels = shards.load_labels(str(digits_dir), manifest, split="test")
    counts = np.bincount(labels, minlength=10)
    assert len(row["per_class"]) == 10 and row["method"] == "ce"
    assert row["test_acc"] == pytest.approx(np.dot(row["per_class"], counts) / counts.sum())
    assert "| class 9 |" in per_class.markdown([row], "cmd")


def test_ddp_overhead_measures_steps():
    ddp = load("ddp_overhead")
    model = ddp.create_model("small_cnn", 1, 10, 28, 4)
    assert ddp.steps_per_second(model, torch.optim.SGD(model.parameters(), lr=0.01), steps=1) > 0


def test_the_gpu_check_runs_as_a_cpu_dry_run_through_its_shell_wrapper_without_ray(tmp_path):
    import json
    import os
    import subprocess

    # The GPU machine has no Ray (its wheel cannot travel there): a `ray` that fails to import stands in for that.
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "__init__.py").write_text("raise ImportError('no ray on the GPU machine')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OUT": str(tmp_path)}
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout[out.stdout.index("{"):])
    assert report == json.loads((tmp_path / "gpu_check_all.json").read_text())
    training, index = report["training"], report["index"]
    assert report["device"] == "cpu" and training["loader_workers"] == 2
    assert set(training["loader_alone_images_per_s"]) == {"pickled", "shared"}
    assert set(training["fed_images_per_s"]) == {"before", "cudnn_search", "shared_memory", "after"}
    assert min([*training["loader_alone_images_per_s"].values(), *training["fed_images_per_s"].values(),
                *training["resident_batch_images_per_s"].values()]) > 0
    assert index["torch_fp32"]["exact_agreement"] == 1.0 and index["flat"]["exact_agreement"] == 1.0
    assert index["flat"]["seconds"] > 0 and 0.5 < index["ivf_recall_at_1"] <= 1.0 and index["faiss"].endswith("build")
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--part", "probe"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    probe = json.loads((tmp_path / "gpu_check_probe.json").read_text())["probe"]
    assert out.returncode == 0 and "training" not in json.loads(out.stdout[out.stdout.index("{"):])
    assert probe["probe_failure"] and probe["refused"].startswith("index_gpu=true, but FAISS here has no GPU support")


def test_index_scale_measures_the_table_and_its_recall_on_a_tiny_set(monkeypatch):
    index_scale = load("index_scale")
    monkeypatch.setattr(index_scale, "RECALL_QUERIES", 50)
    row, table = index_scale.measure(2000, "flat")
    assert table.shape == (2000, 1) and row["recall_at_1"] == 1.0 and not row["ivf"]
    ivf, _ = index_scale.measure(2000, "ivf")
    assert ivf["ivf"] and 0.5 < ivf["recall_at_1"] <= 1.0


def test_ivf_choices_assigning_once_finds_what_faiss_search_finds_and_reports_it(tmp_path):
    ivf_choices, index_scale = load("ivf_choices"), load("index_scale")
    z = index_scale.embeddings(3000)
    queries = np.arange(0, 3000, 30)
    exact = index_scale.exact_first_neighbours(z, queries)
    rows = [ivf_choices.measure(z, queries, exact, nlist=40, nprobe=4, per_list=64, pre=pre) for pre in (False, True)]
    assert rows[0]["recall"] == rows[1]["recall"] > 0.5 and rows[1]["assign_s"] >= 0 == rows[0]["assign_s"]
    log = tmp_path / "log"
    log.write_text("".join(json.dumps(row) + "\n" for row in rows))
    ivf_choices.report(log, tmp_path / "out")
    table = (tmp_path / "out.md").read_text()
    assert "'[{\"nlist\":40,\"nprobe\":4,\"per_list\":64,\"pre\":false}," in table and table.count("| 3,000 | 40 |") == 2


def test_prepare_cost_times_every_step_of_a_prepare_on_a_few_images(tmp_path, monkeypatch):
    from noisymix.launch.synth import SynthSection, synthesize

    source = synthesize(SynthSection.from_values({"out": str(tmp_path / "list"), "train": 6, "test": 2, "classes": 2,
                                                  "min_size": 40, "max_size": 60, "workers": 1}), log=lambda *_: None)
    prepare_cost = load("prepare_cost")
    monkeypatch.setattr(prepare_cost, "PASSES", 1)
    result = prepare_cost.measure(Path(source), 6)
    assert result["images"] == 6 and set(result["ms_per_image"]) == {
        "decode_resize", "encode_jpeg", "pixel_stats_pil_histogram", "pixel_stats_numpy_histogram",
        "pixel_stats_float_sums", "sha256", "stored_image", "stored_image_no_pixels"}
    assert all(value > 0 for value in result["ms_per_image"].values())
    assert result["stored_as_is"] == 1.0   # 40-60 px JPEGs need no resize to 256: kept as their own bytes


def test_memorise_table_scores_each_row_against_the_ce_and_clean_of_its_own_seeds():
    table = load("memorise_table")

    def cell(spec, setting, method, seed, acc, f1=None):
        summary = {"test_acc": acc, "test_acc_last": acc, "wall_time_s": 10.0, **({"detection": {"f1": f1}} if f1 else {})}
        return spec, {"status": "done", "setting": setting, "method": method, "seed": seed, "summary": summary}

    reports = {}
    for spec, c in [cell("a", "clean", "clean", 0, 0.9), cell("a", "clean", "clean", 1, 0.9),
                    cell("a", "symmetric40", "ce", 0, 0.7), cell("a", "symmetric40", "ce", 1, 0.5),
                    cell("b", "symmetric40", "x", 0, 0.8, 0.5), cell("b", "symmetric40", "x", 1, 0.8, 0.7),
                    cell("b", "pairflip40", "x", 0, 0.6)]:
        reports.setdefault(spec, {"name": spec, "cells": {}})["cells"][f"{c['setting']}/{c['method']}/{c['seed']}"] = c
    rows = {(r["setting"], r["spec"], r["method"]): r for r in table.rows(table.finished_cells(list(reports.values())))}
    x = rows["symmetric40", "b", "x"]
    assert x["R"] == pytest.approx((0.8 - 0.6) / (0.9 - 0.6)) and x["R_seeds"] == [0, 1]
    assert x["flag_f1"] == pytest.approx(0.6) and x["headline"] == (pytest.approx(0.8), 0.0)
    assert rows["pairflip40", "b", "x"]["R"] is None, "no CE at that setting: no R"
    assert "| symmetric40 | b / x | 0,1 | 0.8000 |" in table.markdown(list(rows.values()), "cmd", "title")


def test_scale_writes_the_prepare_table_alone_or_with_the_rest(tmp_path, monkeypatch):
    scale = load("scale")
    prepare = {"images_per_s": 400.0, "images_per_s_per_core": 200.0, "writer_peak_rss_mb": 380.0,
               "driver_peak_rss_mb": 370.0, "shard_bytes": 1000, "images_per_cpu_s": 270.0}
    row = {"n": 20000, "source_bytes": 2**30, "bare_loop_images_per_s": 250.0, "bare_loop_images_per_cpu_s": 300.0,
           "prepare": [prepare, {**prepare, "images_per_cpu_s": None}]}
    alone = scale.prepare_markdown({"command": "c", "machine": "m", "rows": [row]})
    assert "| 20,000 | 1,024 | 250 | 400, 0.80x | 400, 0.80x | 300 | 270, 0.90x | - | 380 / 370 |" in alone
    older = {k: v for k, v in row.items() if k != "bare_loop_images_per_cpu_s"}   # rows measured before CPU time
    assert "| 400, 0.80x | - | - | - | 380 / 370 |" in scale.prepare_markdown({"command": "c", "machine": "m",
                                                                              "rows": [older]})
    # each prepare against the loops just before and after it: the first ran while the machine was slower
    bracketed = {**row, "prepare": [{**prepare, **scale.bracketing_loops([(200.0, 240.0), (200.0, 300.0)])},
                                    {**prepare, **scale.bracketing_loops([(200.0, 300.0), (250.0, 300.0)])}]}
    assert "| 250 | 400, 1.00x | 400, 0.89x | 300 | 270, 1.00x | 270, 0.90x |" in scale.prepare_markdown(
        {"command": "c", "machine": "m", "rows": [bracketed]})
    full_row = {**row, "prepare_as_is": {"shard_bytes": 2**30}, "loader_images_per_s": {1: 500.0, 2: 800.0},
                "end_to_end": [{"method": "selectmix", "wall_s": 1.0, "driver_peak_rss_mb": 1.0,
                                "worker_peak_rss_mb": 1.0, "fold_task_peak_rss_mb": None,
                                "index_actor_peak_rss_mb": None}]}
    larger = {**full_row, "n": 80000, "end_to_end": [{**full_row["end_to_end"][0], "worker_peak_rss_mb": 2.0}]}
    extrapolated = scale.extrapolate([full_row, larger])
    assert [e["dataset"] for e in extrapolated] == ["clothing1m", "webvision"]
    worker = extrapolated[0]["memory_mb"]["selectmix.worker_peak_rss_mb"]   # 1 MB at 20k, 2 MB at 80k
    assert worker["log_n"] == pytest.approx(2 + np.log(1e6 / 8e4) / np.log(4))
    assert worker["linear"] == pytest.approx(2 + (1e6 - 8e4) / 6e4)
    assert "selectmix.fold_task_peak_rss_mb" not in extrapolated[0]["memory_mb"]   # not measured: not extrapolated
    full = scale.markdown({"command": "c", "machine": "m", "rows": [full_row, larger], "extrapolated": extrapolated})
    assert ("| 20,000 | 1,024 | 250 | 400, 0.80x | 400, 0.80x | 300 | 270, 0.90x | - | 380 / 370 | 1.000 | "
            "500 / 400, 2.00x / 1.60x |") in full
    assert "| clothing1m | 1,000,000 | 0.09 | 1 - 1 | 4 - 17 |" in full   # driver flat, worker log - linear
    out = tmp_path / "scale"   # --render: the report again from the JSON alone, nothing run
    out.with_suffix(".json").write_text(json.dumps({"command": "c", "machine": "m", "rows": [full_row, larger]}))
    monkeypatch.setattr("sys.argv", ["scale.py", "--render", "--out", str(out)])
    scale.main()
    assert out.with_suffix(".md").read_text() == full
    assert json.loads(out.with_suffix(".json").read_text())["extrapolated"] == extrapolated


def test_fold_loss_probe_losses_have_their_limits_and_a_tiny_probe_reports_every_loss(tmp_path):
    import torch
    import torch.nn.functional as F

    probe = load("fold_loss_probe")
    logits, labels = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]]), torch.tensor([0, 1])
    p_y = logits.softmax(dim=1)[[0, 1], labels]
    assert torch.isclose(probe.generalised_ce(logits, labels, q=1e-4), F.cross_entropy(logits, labels), atol=1e-3)
    assert torch.isclose(probe.generalised_ce(logits, labels, q=1.0), (1 - p_y).mean())
    assert torch.isclose(probe.symmetric_ce(logits, labels, alpha=0.0, beta=1.0), 4.0 * (1 - p_y).mean())
    source = ROOT.parent / "shared" / "data" / "fashion-mnist"
    data = probe.fold_data("asymmetric40", 0, source, subset=500)
    runs = [{**probe.probe("asymmetric40", loss, 0, 2, data), "labels": "given"} for loss in ("ce", "gce")]
    assert [r["loss"] for r in runs] == ["ce", "gce"] and all(len(r["per_epoch"]) == 2 for r in runs)
    assert all(0.0 <= r["acc_true_kept"] <= 1.0 and r["kept_epoch"] in (1, 2) for r in runs)
    assert all(r["fold_train"] == len(data[3]) == 360 for r in runs)   # 500 -> 450 after val -> 4/5 of it
    # the clean-fold ceiling trains on the true labels of the same samples and the same folds
    clean = probe.fold_data("asymmetric40", 0, source, subset=500, labels="true")
    assert torch.equal(clean[1], data[2]) and not torch.equal(data[1], data[2]) and np.array_equal(clean[3], data[3])
    runs.append({**probe.probe("asymmetric40", "ce", 0, 2, clean), "labels": "true"})
    table = probe.markdown({"command": "probe", "runs": runs})
    assert "| asymmetric40 | ce | 360 given labels | 0 |" in table
    assert "| asymmetric40 | gce | 360 given labels | 0 |" in table
    assert "| asymmetric40 | ce | 360 true labels | 0 |" in table


def test_fold_loss_probe_merges_earlier_reports_into_one_without_training(tmp_path, monkeypatch):
    probe = load("fold_loss_probe")
    run = {"setting": "asymmetric40", "loss": "ce", "seed": 0, "fold_train": 7200, "labels": "given", "epochs": 8,
           "kept_epoch": 8, "per_epoch": [], "seconds": 40.0, "acc_true_kept": 0.758, "acc_true_last": 0.758}
    parts = [tmp_path / "a.json", tmp_path / "b.json"]
    parts[0].write_text(json.dumps({"command": "probe a", "runs": [run]}))
    parts[1].write_text(json.dumps({"command": "probe b", "runs": [{**run, "labels": "true", "acc_true_kept": 0.846}]}))
    monkeypatch.setattr(probe, "fold_data", lambda *a, **k: pytest.fail("--merge trained"))
    monkeypatch.setattr("sys.argv", ["fold_loss_probe.py", "--merge", *map(str, parts), "--out", str(tmp_path / "m")])
    probe.main()
    merged = json.loads((tmp_path / "m.json").read_text())
    merge = f"python benchmarks/fold_loss_probe.py --merge {parts[0]} {parts[1]} --out {tmp_path / 'm'}"
    assert merged["command"] == f"probe a && probe b && {merge}"
    assert [r["labels"] for r in merged["runs"]] == ["given", "true"]
    table = (tmp_path / "m.md").read_text()
    assert f"Command: `probe a && probe b && {merge}`" in table
    assert table.index("| 7,200 given labels | 0 | 8 | 0.758") < table.index("| 7,200 true labels | 0 | 8 | 0.846")


def test_fold_knn_probe_votes_the_neighbours_given_labels_and_a_tiny_probe_reports_every_predictor():
    probe = load("fold_knn_probe")
    fit = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0], [0.1, 0.9]])
    shares = probe.neighbour_shares(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), fit, torch.tensor([0, 0, 1, 2, 2]),
                                    ks=(3,), num_classes=3)[3]
    assert torch.allclose(shares, torch.tensor([[2 / 3, 1 / 3, 0.0], [0.0, 1 / 3, 2 / 3]]))
    source = ROOT.parent / "shared" / "data" / "fashion-mnist"
    run = probe.probe("symmetric40", 0, 2, load("fold_loss_probe").fold_data("symmetric40", 0, source, subset=600))
    assert len(run["per_epoch"]) == 2 and run["kept_epoch"] in (1, 2)
    assert set(run["kept"]) == {"agree_given", "softmax", "knn 10", "knn 50", "knn 200", "blend 50", "pixels knn 10",
                                "pixels knn 50", "pixels knn 200", "pixels blend 50"}
    assert all(0.0 <= v["acc_true"] <= 1.0 and 0.0 <= v["flag_f1"] <= 1.0
               for name, v in run["kept"].items() if name != "agree_given")
    table = probe.markdown({"command": "probe", "runs": [run]})
    assert "| symmetric40 | 0 |" in table and "| knn 200 |" in table and "+0.000 / +0.000 |" in table


def test_loader_memory_measures_a_stream_in_a_child_and_tables_it_beside_another_run(digits_dir, tmp_path):
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loader_memory.py"), "--child", str(digits_dir),
                          "8", "100"], check=True, capture_output=True, text=True).stdout
    row = json.loads(out)
    assert row["images"] > 0 and row["peak_rss_mb"] >= row["base_rss_mb"] > 0 and row["images_per_s"] > 0
    loader_memory = load("loader_memory")
    rows = [{"n": 10, "crop": 8, "shuffle_buffer": 100, **row}]
    table = loader_memory.markdown({"command": "cmd", "label": "new", "machine": "m", "rows": rows},
                                   {"label": "old", "rows": [{**rows[0], "peak_rss_mb": row["base_rss_mb"] + 7}]})
    assert "| peak MB (old) | above base MB (old) |" in table and "| 7 |" in table


def test_eval_memory_measures_a_pass_in_a_child_and_tables_it(digits_dir):
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "eval_memory.py"), "--child", str(digits_dir)],
                         check=True, capture_output=True, text=True).stdout
    row = json.loads(out)
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    halves = [manifest["splits"][split]["count"] / 2 for split in ("val", "test")]
    assert all(abs(row[f"{split}_images"] - half) <= half / 2 for split, half in zip(("val", "test"), halves))
    assert row["after_test_peak_rss_mb"] >= row["after_val_peak_rss_mb"] >= row["base_rss_mb"] > 0
    table = load("eval_memory").markdown({"command": "cmd", "machine": "m", "rows": [{"n": 10, **row}]})
    assert f"| {row['val_images'] + row['test_images']:,} |" in table


def test_merge_report_takes_the_new_finished_cells_and_keeps_every_other_committed_one():
    merge = load("merge_report")
    committed = {"name": "spec", "settings": {}, "methods": {"a": {}}, "curves": {}, "base": {}, "commit": "old",
                 "command": "noisymix bench spec.yaml",
                 "cells": {"s/a/seed0": {"status": "done", "v": 1}, "s/a/seed1": {"status": "not run"}}}
    new = {"name": "spec", "settings": {"s": {}}, "methods": {"a": {}, "b": {}}, "curves": {}, "base": {},
           "commit": "new", "cells": {"s/a/seed0": {"status": "not run"}, "s/a/seed1": {"status": "done", "v": 2},
                                      "s/b/seed0": {"status": "not run"}}}
    results, taken = merge.merged(committed, new)
    assert taken == ["s/a/seed1"]
    assert results["cells"] == {"s/a/seed0": {"status": "done", "v": 1}, "s/a/seed1": {"status": "done", "v": 2},
                                "s/b/seed0": {"status": "not run"}}
    assert results["commit"] == "new" and results["methods"] == new["methods"]
    assert results["command"] == "noisymix bench spec.yaml"
    with pytest.raises(SystemExit, match="different specs"):
        merge.merged(committed, {**new, "name": "other"})


def test_rss_breakdown_finds_a_child_in_the_tree_and_splits_its_memory(monkeypatch):
    import os
    import subprocess
    import sys
    rss = load("rss_breakdown")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert {os.getpid(), child.pid} <= set(rss.descendants(os.getpid()))
        fields = rss.memory(child.pid)
        assert set(fields) == {"Rss", "RssAnon", "RssFile", "RssShmem", "Hwm"}
        assert fields["Rss"] == pytest.approx(fields["RssAnon"] + fields["RssFile"] + fields["RssShmem"], abs=0.1)
        assert rss.role(child.pid) == "-c" and rss.allocator(child.pid) == "glibc"
    finally:
        child.kill()
        child.wait()
    maps = "7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"
    monkeypatch.setattr(rss, "Path", lambda _: type("Maps", (), {"read_text": lambda self: maps})())
    assert rss.allocator(1) == "jemalloc"
    row = {"n": 10, "method": "selectmix", "roles": {"driver": [
        {"Hwm": 500, "Rss": 480, "RssAnon": 300, "RssFile": 180, "RssShmem": 0, "title": "driver", "pid": 1}]}}
    assert "| 10 | selectmix | driver | 500 | 480 | 300 | 180 | 0 | glibc |" in rss.markdown(
        {"command": "c", "machine": "m", "rows": [row]})


def test_heap_threshold_pairs_each_setting_with_the_default_and_tables_their_medians(monkeypatch):
    heap = load("heap_threshold")
    chosen = heap.settings(256, "/lib/libjemalloc.so.2", 20)
    assert chosen["default"] == ({}, 0) and chosen["fixed"][0]["MALLOC_TRIM_THRESHOLD_"] == str(256 * 1024)
    assert chosen["preload"] == ({"LD_PRELOAD": "/lib/libjemalloc.so.2"}, 0) and chosen["trim"] == ({}, 20)
    assert set(heap.settings(128, None)) == {"default", "fixed"}
    seen = []
    monkeypatch.setenv("MALLOC_ARENA_MAX", "1")
    monkeypatch.setattr(heap.subprocess, "run", lambda args, env, **k: seen.append((args, env)) or
                        type("Done", (), {"stdout": '{"train_samples_per_s": 1.0}'}))
    assert heap.run_child(Path("d"), "preload", *chosen["preload"]) == {"setting": "preload", "train_samples_per_s": 1.0}
    assert seen[0][1]["LD_PRELOAD"] == "/lib/libjemalloc.so.2" and "MALLOC_ARENA_MAX" not in seen[0][1]
    heap.run_child(Path("d"), "trim", *chosen["trim"])
    assert seen[1][0][-2:] == ["d", "20"] and "LD_PRELOAD" not in seen[1][1]
    runs = [{"setting": name, "train_samples_per_s": rate, "eval_images_per_s": 900.0,
             "peak_after_training_mb": peak, "peak_rss_mb": peak + 10}
            for name, rate, peak in (("default", 1000.0, 800), ("fixed", 950.0, 700), ("preload", 1200.0, 600),
                                     ("default", 1100.0, 820), ("fixed", 1100.0, 690), ("preload", 1100.0, 610))]
    row = heap.summarise(20_000, runs)
    assert row["train_rate_ratios"]["fixed"] == pytest.approx([0.95, 1.0])
    assert row["train_rate_ratio"]["preload"] == pytest.approx(1.1)
    assert row["median"]["fixed"]["peak_rss_mb"] == 705 and row["median"]["default"]["train_samples_per_s"] == 1050
    text = heap.markdown({"command": "c", "machine": "m", "threshold_kb": 128, "preload": "/lib/libjemalloc.so.2",
                          "repeats": 2, "rows": [row]})
    assert "| 20,000 | fixed at 128 KB | 1,025 | 900 | 695 | 705 | 0.97x |" in text
    assert "| 20,000 | LD_PRELOAD=/lib/libjemalloc.so.2 | 1,150 | 900 | 605 | 615 | 1.10x |" in text


def test_selection_memory_measures_the_driver_over_real_fold_tasks(ray_session, monkeypatch):
    memory = load("selection_memory")
    # the fold tasks cannot import the script: its RandomFold travels by value
    monkeypatch.setitem(sys.modules, memory.__name__, memory)
    ray_session.cloudpickle.register_pickle_by_value(memory)
    try:
        row = memory.measure(3000, 20, "confident", "file")
        on_heap = memory.measure(3000, 20, "confident", "memory")
    finally:
        ray_session.cloudpickle.unregister_pickle_by_value(memory)
    assert row["table_mb"] == pytest.approx(3000 * 20 * 4 / 2**20) and 0 < row["flagged"] < 3000
    assert row["flagged"] == on_heap["flagged"], "the same folds flag the same labels wherever the table lives"
    assert row["flagged_again"] == row["flagged"] == on_heap["flagged_again"], "its oof.npz read back: the same flags"
    assert row["folds_total_mb"] >= row["folds_anon_mb"] and row["folds_s"] > 0 and "build_file_mb" in row
    output = memory.RandomFold(20)(Fold(0, np.arange(5), np.arange(5, 9)))
    assert np.array_equal(output.held_ids, [5, 6, 7, 8]) and np.allclose(output.probs.sum(axis=1), 1.0)
    text = memory.markdown({"machine": "m", "commands": ["c"], "rows": [{**row, "commit": "abc"}]})
    assert "| abc | 3,000 | 20 | confident | file | 0 |" in text and text.endswith("    c\n")


def test_heldout_memory_predicts_a_folds_held_out_ids_and_tables_each_setting(digits_dir, monkeypatch):
    from noisymix.distributed import heap
    from noisymix.selection.crossval import stratified_folds

    bench = load("heldout_memory")
    monkeypatch.setattr(heap, "TRIM_EVERY", heap.TRIM_EVERY)   # the child sets it for its process
    run = bench.heldout_pass(str(digits_dir), 3)
    given = shards.load_labels(str(digits_dir), shards.load_manifest(digits_dir))
    assert run["every"] == 3 and heap.TRIM_EVERY == 3
    assert run["samples"] == len(stratified_folds(given, 5, 0)[0][1]) and run["wall_s"] > 0
    runs = [dict(run, every=0, wall_s=2.0), dict(run, every=20, wall_s=2.2, hwm_above_base_mb=5.0),
            dict(run, every=0, wall_s=4.0), dict(run, every=20, wall_s=4.0, hwm_above_base_mb=7.0)]
    rows = bench.summarise(runs)
    assert rows[1]["every"] == 20 and rows[1]["wall_ratios"] == pytest.approx([1.1, 1.0])
    assert rows[1]["hwm_above_base_mb"] == 6.0 and rows[0]["wall_ratios"] == [1.0, 1.0]
    text = bench.markdown({"command": "c", "machine": "m", "data": "d", "repeats": 2, "runs": runs, "rows": rows})
    assert "| 20 batches | 6 (5, 7) |" in text and "| never |" in text


def test_scale_extrapolation_fits_both_models_to_every_size_and_names_the_one_the_sizes_follow():
    bench = load("scale_extrapolation")

    def run(n, method, roles):
        return {"n": n, "method": method,
                "roles": {role: [{"Hwm": v} for v in values] for role, values in roles.items()}}

    sizes = [20_000, 80_000, 320_000]
    runs = [run(n, "selectmix", {"fold task": [500 + n / 1000, 500 + n / 1000 + 10],   # linear: 1 MB per 1k
                                 "driver": [400 + 8 * np.log2(n / 20_000)],          # log N: 8 MB a doubling
                                 "raylet": [30]}) for n in sizes]
    runs.append(run(20_000, "mixnn", {"driver": [500]}))   # one size: nothing to fit
    rows = {(r["method"], r["role"]): r for r in bench.extrapolate(bench.role_peaks(runs))}
    assert set(rows) == {("selectmix", "fold task"), ("selectmix", "driver")}, "roles kept, one-size fits left out"
    fold = rows["selectmix", "fold task"]["models"]
    assert fold["linear"]["residual_mb"] < 1e-6 < fold["log_n"]["residual_mb"]
    assert fold["linear"]["targets"]["clothing1m"]["mean"] == pytest.approx(500 + 1000 + 5)
    assert fold["linear"]["targets"]["webvision"]["max"] == pytest.approx(500 + 2400 + 10)
    driver = rows["selectmix", "driver"]["models"]
    assert driver["log_n"]["residual_mb"] < 1e-6 < driver["linear"]["residual_mb"]
    assert driver["log_n"]["targets"]["clothing1m"]["mean"] == pytest.approx(400 + 8 * np.log2(50))
    prepare = bench.prepare_hours({"rows": [{"n": 10, "prepare": [{"images_per_s_per_core": 900}]},
                                            {"n": 80, "prepare": [{"images_per_s_per_core": 100},
                                                                  {"images_per_s_per_core": 300}]}]})
    assert prepare["images_per_s_per_core"] == 200 and prepare["measured_n"] == 80
    assert prepare["hours"]["clothing1m"] == pytest.approx(1_000_000 / (200 * 16) / 3600)
    text = bench.markdown({"rows": list(rows.values()), "prepare": prepare, "command": "c", "inputs": ["a.json"],
                           "out_of_fold_table_mb": bench.out_of_fold_table_mb()})
    assert "| selectmix | fold task | 20k -> 525 (2), 80k -> 585 (2), 320k -> 825 (2) | log N |" in text
    assert "+1,049 B per sample" in text and "+8 MB per doubling" in text and "webvision 9,155 MB" in text


def test_scale_extrapolation_writes_its_report_from_the_committed_runs(tmp_path, monkeypatch):
    bench = load("scale_extrapolation")
    out = tmp_path / "new" / "extrapolation"
    monkeypatch.setattr(sys, "argv", ["scale_extrapolation.py", "--out", str(out)])
    bench.main()
    results = json.loads(out.with_suffix(".json").read_text())
    assert {(r["method"], r["role"]) for r in results["rows"]} >= {("selectmix", "fold task"), ("mixnn", "index actor")}
    assert out.with_suffix(".md").read_text() == bench.markdown(results)


def test_prior_shift_probe_moves_the_posterior_from_the_trained_prior_to_the_target(digits_dir, tmp_path):
    probe = load("prior_shift_probe")
    probs = np.array([[0.5, 0.5, 0.0], [0.7, 0.3, 0.0]])
    trained, uniform = np.array([0.8, 0.2, 0.0]), np.full(3, 1 / 3)
    # row 0: 0.5 / 0.8 < 0.5 / 0.2; row 1: 0.7 / 0.8 = 0.875 < 0.3 / 0.2 = 1.5
    assert probe.adjusted_predictions(probs, trained, uniform).tolist() == [1, 1]
    assert probe.adjusted_predictions(probs, trained, trained).tolist() == [0, 0], "no shift: the plain argmax"
    assert probe.adjusted_predictions(probs, trained, np.array([0.0, 0.5, 0.5])).tolist() == [1, 1], "prior 0: never"
    assert probe.adjusted_predictions(np.array([[0.3, 0.1, 0.6]]), trained, np.array([0.5, 0.5, 0.0])).tolist() == [1]
    assert probe.adjusted_predictions(np.array([[0.2, 0.1, 0.7]]), trained, uniform).tolist() == [2], "k_c = 0: unmoved"
    given, flagged = np.array([0, 0, 1, 2]), np.array([False, True, False, False])
    assert probe.trained_labels({"method": "crossmix"}, given, flagged)[0].tolist() == [0, 1, 2]
    assert probe.trained_labels({"method": "crossmix", "guess": "mean"}, given, flagged)[1] == "given"
    assert probe.trained_labels({"method": "mixup"}, given, flagged)[0].tolist() == [0, 0, 1, 2]

    manifest = finished_run(tmp_path, digits_dir, method="crossmix", guess="none")
    given = shards.load_labels(str(digits_dir), manifest)
    flagged = np.arange(len(given)) % 3 == 0
    kept_prior = probe.class_prior(given[~flagged], 10)
    row = probe.probe(tmp_path, given, flagged, kept_prior, np.full(10, 0.1))
    assert row["trained_on"] == "kept" and row["trained_prior"] == pytest.approx(kept_prior, abs=1e-4)
    assert row["table prior"] == row["as trained"], "the table's prior equal to the trained one moves nothing"
    assert row["as trained"]["acc"] == pytest.approx(load("per_class_accuracy").per_class_accuracy(tmp_path)["test_acc"])
    assert "| true prior |" in probe.markdown([row], kept_prior, "cmd")
