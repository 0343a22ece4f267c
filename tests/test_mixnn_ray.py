"""MixNN through Ray: the FAISS index actor, per-sample state across ranks, and the method end to end."""

import csv
import json

import numpy as np
import pytest
import faiss
import ray
import torch

from conftest import MIXNN_RUN
from noisymix.distributed import index_actor as index_actor_module, shards
from noisymix.distributed.index_actor import NeighbourIndex, NeighbourIndexError, drop_self, index_actor, ivf_lists
from noisymix.distributed.sample_state import neighbour_rows, read_beliefs
from noisymix.launch.cli import main
from noisymix.mixing.method import NeighbourQuery
from noisymix.selection.gmm import out_of_fold_clean_probability


def brute_force_neighbours(z, k):
    similarity = torch.from_numpy(z) @ torch.from_numpy(z).T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.topk(k, dim=1).indices.numpy()


def test_index_actor_matches_brute_force_top_k(ray_session):
    z = np.random.default_rng(0).standard_normal((500, 12)).astype(np.float32)
    actor = index_actor("test-index-brute", 12, NeighbourQuery(4, gpu=False))
    table, _ = ray.get(actor.neighbour_table.remote(z, 4))
    assert np.array_equal(table, brute_force_neighbours(z, 4))
    ray.kill(actor)


@pytest.mark.parametrize("kind, every_list_recall", [("ivf", 1.0), ("ivf_sq8", 0.95)])
def test_ivf_index_is_exact_when_every_list_is_probed_and_close_with_few(kind, every_list_recall):
    """IVF with every list probed is exact search; 8-bit scalars lose a little even then."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((8, 12)).astype(np.float32)
    z = centres[rng.integers(0, 8, 2000)] + 0.3 * rng.standard_normal((2000, 12)).astype(np.float32)
    exact = brute_force_neighbours(z, 1)
    every_list, _ = NeighbourIndex(12, "ip", kind, nlist=16, nprobe=16, use_gpu=False).neighbour_table(z, 1)
    assert (every_list == exact).mean() >= every_list_recall
    default = NeighbourIndex(12, "ip", kind, use_gpu=False)  # 2000 // 39 = 51 lists (not 4 sqrt(N) = 179)
    assert (default.neighbour_table(z, 1)[0] == exact).mean() > 0.8 and default.index.nlist == 51


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivf_sq8"])
def test_neighbours_by_id_are_those_of_the_whole_table_and_of_a_plain_faiss_search(kind, monkeypatch):
    """Ranks ask by id; a CPU IVF index reuses the lists it assigned each row when adding it, which must find what
    FAISS's own search (its own coarse assignment) finds, in query blocks of any size."""
    rng = np.random.default_rng(3)
    z = rng.standard_normal((1500, 12)).astype(np.float32)
    index = NeighbourIndex(12, "ip", kind, nlist=20, nprobe=4, use_gpu=False)
    table, _ = index.neighbour_table(z, 3)
    assert index.stored is None, "every id was answered: the embeddings are released"
    with pytest.raises(ValueError, match="every sample's neighbours of this refresh were given"):
        index.neighbours(np.arange(2), 3)
    index.refresh(z)
    assert (index.assigned is None) == (kind == "flat")
    ids = rng.choice(1500, 300, replace=False)
    by_id, seconds = index.neighbours(ids, 3)
    assert np.array_equal(by_id, table[ids]) and seconds >= 0
    assert np.array_equal(by_id, drop_self(index.index.search(z[ids], 4)[1], 3, ids))
    monkeypatch.setattr(index_actor_module, "QUERY_BLOCK", 7)
    assert np.array_equal(index.neighbours(ids, 3)[0], by_id)


@pytest.mark.parametrize("call, message", [
    (lambda index: index.refresh(np.zeros((5, 3), np.float32)), r"must be \(n, 8\)"),
    (lambda index: index.neighbour_table(np.zeros((5, 8), np.float32), 5), "1 <= k < N=5"),
    (lambda index: index.search(np.zeros((1, 8), np.float32), 1), "refresh it first"),
    (lambda index: index.neighbours(np.arange(2), 1), "refresh it first"),
    (lambda index: index.refresh(np.zeros((5, 8), np.float32)) and index.neighbours(np.array([4, 5]), 1),
     r"sample ids must be in \[0, 5\), got 4..5"),
    (lambda index: index.refresh(np.full((5, 8), np.nan, np.float32)), "non-finite"),
])
def test_index_rejects_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call(NeighbourIndex(8, use_gpu=False))


def test_ivf_lists_are_four_sqrt_n_with_enough_embeddings_per_list_to_train():
    assert [ivf_lists(n) for n in (1, 600, 100_000, 1_000_000, 2_400_000)] == [1, 15, 1265, 4000, 6197]


def test_drop_self_when_self_is_not_first():
    ids = np.array([[1, 0, 2], [0, 2, 3], [3, 1, 0], [1, 2, 0]])
    assert drop_self(ids, 2).tolist() == [[1, 2], [0, 2], [3, 1], [1, 2]]


def test_a_dead_index_actor_is_recreated_and_refilled(ray_session):
    z = np.random.default_rng(1).standard_normal((200, 6)).astype(np.float32)
    query = NeighbourQuery(2, gpu=False)
    ids = np.arange(200)
    first, timings = neighbour_rows(ids, z, 200, query, "test-index-restart", token=0)
    ray.kill(ray.get_actor("test-index-restart"))
    again, _ = neighbour_rows(ids, z, 200, query, "test-index-restart", token=1)
    assert np.array_equal(first, again) and np.array_equal(first, brute_force_neighbours(z, 2))
    assert set(timings) == {"index_refresh_s", "index_query_s", "index_peak_rss_mb", "index_ivf"}
    assert timings["index_ivf"] == 0.0 and all(timings[key] > 0 for key in ("index_refresh_s", "index_query_s"))


def test_an_index_slower_than_its_budget_stops_with_what_would_help(ray_session):
    z = np.random.default_rng(1).standard_normal((20000, 64)).astype(np.float32)
    with pytest.raises(NeighbourIndexError, match=r"took longer than index_budget_s=0.01 for 20000 embeddings of "
                                                  r"dimension 64 \(index_kind=flat, index_cpus=0\): use index_kind=ivf_sq8"):
        neighbour_rows(np.arange(20000), z, 20000, NeighbourQuery(1, kind="flat", budget_s=0.01), "test-index-budget", 0)
    with pytest.raises(ValueError, match="Failed to look up actor"):
        ray.get_actor("test-index-budget")   # killed, not left computing


def test_auto_is_exact_below_its_threshold_and_ivf_above():
    z = np.random.default_rng(2).standard_normal((600, 8)).astype(np.float32)
    below = NeighbourIndex(8, kind="auto", auto_above=601)
    assert np.array_equal(below.neighbour_table(z, 1)[0], brute_force_neighbours(z, 1)) and below.index.ntotal == 600
    above = NeighbourIndex(8, kind="auto", auto_above=600)
    _, timings = above.neighbour_table(z, 1)
    assert timings["index_ivf"] == 1.0 and above.index.nlist == 15   # 600 // 39: 4 sqrt(N) = 98 is capped
    assert isinstance(above.index, faiss.IndexIVFScalarQuantizer), "8-bit IVF above the threshold"


def test_a_gpu_index_without_gpu_support_is_refused_by_name():
    with pytest.raises(NeighbourIndexError, match="index_gpu=true, but FAISS here has no GPU support"):
        NeighbourIndex(8, use_gpu=True)


# What FAISS printed before aborting on an H200 with a faiss-gpu-cu12 wheel (benchmarks/results/gpu_check.md)
NO_KERNEL = ("Faiss assertion 'err__ == cudaSuccess' failed in runL2Norm at L2Norm.cu:257; details: CUDA error 209 "
             "no kernel image is available for execution on the device")
ABORTING_PROBE = (f"import os, sys; print('loading'); sys.stderr.write({NO_KERNEL!r} + '\\n'); sys.stderr.flush(); "
                  "os.abort()")


def test_the_gpu_probe_says_what_failed_in_its_child_process():
    assert index_actor_module.gpu_search_failure("import faiss") is None
    assert index_actor_module.gpu_search_failure(ABORTING_PROBE) == NO_KERNEL.split("details: ")[1]
    assert index_actor_module.gpu_search_failure("raise SystemExit(3)") == "the probe exited with status 3"
    assert "took over 0.2 s" in index_actor_module.gpu_search_failure("import time; time.sleep(30)", timeout_s=0.2)


def test_a_gpu_index_whose_faiss_build_aborts_on_this_gpu_is_refused_and_the_process_lives(monkeypatch):
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(index_actor_module, "GPU_PROBE", ABORTING_PROBE)
    with pytest.raises(NeighbourIndexError, match="fails on this GPU: CUDA error 209 no kernel image .* "
                                                  "install noisymix\\[gpu\\] \\(faiss-gpu >= 1.15"):
        NeighbourIndex(8, use_gpu=True)


@pytest.mark.parametrize("source, compact", [("batch", []), ("global", ["target_topk=3", "target_dtype=float16"])])
def test_mixnn_end_to_end_on_two_workers(request, ray_session, digits_dir, tmp_path, capsys, source, compact):
    if source == "batch":   # MIXNN_RUN itself: the session's run that the interrupt test resumes to
        run = request.getfixturevalue("mixnn_whole")
    else:
        run = tmp_path / "run"
        code = main(["train", f"data_dir={digits_dir}", f"run_dir={run}", *MIXNN_RUN, f"neighbour_source={source}",
                     *compact])
        assert code == 0, capsys.readouterr().err
    # Each rank holds (and digests) only its home id range of the per-sample state: the ranges tile the ids.
    digests = json.loads((run / "state_digests.json").read_text())
    by_epoch = {}
    for d in digests:
        by_epoch.setdefault(d["epoch"], []).append((d["start"], d["stop"]))
    assert len(digests) == 2 * 4 and all(sorted(v) == [(0, 646), (646, 1293)] for v in by_epoch.values()), by_epoch
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["warmup", "mixup", "neighbours", "neighbours", "neighbours"]
    assert all("corrected_label_acc" in r and "detection" in r for r in records[1:])
    if source == "global":
        assert "index_s" in records[2] and "index_s" not in records[1]
        assert records[2]["index_refresh_s"] + records[2]["index_query_s"] <= records[2]["index_s"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["detection"]["auroc"] > 0.6 and 0.5 < summary["corrected_label_acc"] <= 1.0
    assert {"loss_pass", "gmm", "main_training"} <= set(summary["stage_times_s"])
    with open(run / "label_issues.csv") as fh:
        rows = list(csv.DictReader(fh))
    trust = [float(r["given_label_trust"]) for r in rows]
    assert len(rows) == 1293 and trust == sorted(trust)
    assert all((r["flagged"] == "1") == (r["corrected_label"] != r["given_label"] or float(r["clean_probability"]) < 0.5)
               for r in rows)
    assert 0.0 <= summary["given_label_detection"]["f1"] <= 1.0 and summary["given_label_detection"]["auroc"] > 0.6
    # The last checkpoint holds one state file per rank (its home range), in the run's codec, and the beliefs
    # they hold are those of label_issues.csv.
    latest = max(path for path in (run / "ray" / "train").glob("checkpoint_*") if path.is_dir())
    files = sorted(latest.glob("sample_state_*.pt"))
    assert [f.name for f in files] == ["sample_state_000000000000_000000000646.pt",
                                       "sample_state_000000000646_000000001293.pt"]
    part = torch.load(files[1], weights_only=True)
    assert part["targets"].shape == ((647, 6) if compact else (647, 10))
    assert part["targets"].dtype == (torch.int16 if compact else torch.float32)
    given, corrected, clean = read_beliefs(latest)
    by_id = {int(r["id"]): r for r in rows}
    assert all(int(by_id[i]["corrected_label"]) == corrected[i] and int(by_id[i]["given_label"]) == given[i]
               for i in range(1293))


def test_clean_probabilities_from_an_out_of_fold_table_replace_the_gmm(ray_session, digits_dir, tmp_path, capsys):
    """clean_from: w from the GMM on the table's losses -log P[i, y_i], the same on every epoch.

    The planted table is calibrated like folds trained at 80% noise: P[i, y_i] is 0.3 for a clean sample
    and 0.02 for a noisy one, so taken raw every w would be below 0.5."""
    given = shards.load_labels(str(digits_dir), shards.load_manifest(digits_dir))
    planted_clean = np.random.default_rng(0).uniform(size=len(given)) < 0.3
    p_given = np.where(planted_clean, 0.3, 0.02).astype(np.float32)
    probs = np.repeat(((1 - p_given) / 9)[:, None], 10, axis=1)
    probs[np.arange(len(given)), given] = p_given
    table = tmp_path / "oof.npz"
    np.savez(table, probs=probs, given=given)
    run = tmp_path / "run"
    code = main(["train", "method=gmm_select", f"data_dir={digits_dir}", f"run_dir={run}", "epochs=3", "warmup=1",
                 "num_shards=4", f"clean_from={table}"])
    assert code == 0, capsys.readouterr().err
    with open(run / "label_issues.csv") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: int(r["id"]))
    w = np.array([float(r["clean_probability"]) for r in rows])
    np.testing.assert_array_equal(w > 0.5, planted_clean)
    np.testing.assert_allclose(w, out_of_fold_clean_probability(probs, given).w, atol=5e-5)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["detection"] == records[2]["detection"], "the same w on every epoch, no GMM refit"


def test_clean_probability_tables_for_other_labels_or_absent_are_refused(ray_session, digits_dir, tmp_path, capsys):
    given = shards.load_labels(str(digits_dir), shards.load_manifest(digits_dir))
    table = tmp_path / "oof.npz"
    np.savez(table, probs=np.eye(10, dtype=np.float32)[given], given=(given + 1) % 10)
    code = main(["train", "method=mixnn", f"data_dir={digits_dir}", f"run_dir={tmp_path / 'r'}", "num_shards=4",
                 f"clean_from={table}"])
    assert code == 2 and "other given labels" in capsys.readouterr().err
    assert not (tmp_path / "r").exists(), "refused before a run directory is made"
    code = main(["train", "method=gmm_select", f"data_dir={digits_dir}", f"run_dir={tmp_path / 'r2'}", "num_shards=4",
                 f"clean_from={tmp_path / 'absent.npz'}"])
    assert code == 2 and "is not a file" in capsys.readouterr().err

