"""`noisymix train`: prepare the data if needed, run the method's stages and the Ray Train job, write the
run directory. `train()` at the bottom is the recipe; the pieces above it each do one stage."""

from __future__ import annotations

import dataclasses
import functools
import time
import uuid
from pathlib import Path

import numpy as np
import ray

from noisymix.distributed import shards, storage
from noisymix.distributed.engine import DataInfo, build_model, peak_rss_mb
from noisymix.distributed.artifacts import (CHECKPOINT_FILE, CONFIG, MODEL_BEST, MODEL_LAST, RAY_RUN, RunDir,
                                            load_checkpoint, read_out_of_fold)
from noisymix.distributed.folds import FoldCache, Selection, restore_selection, select
from noisymix.distributed.runner import check_resources, run_trainer, start_ray
from noisymix.distributed.sample_state import read_beliefs
from noisymix.distributed.messages import EpochRecord, StateDigest, StateSnapshot, TrainedIds
from noisymix.distributed.worker import WorkerJob
from noisymix.launch.config import Config, ConfigError, changed_settings
from noisymix.launch.errors import one_line, unnamed_file_error
from noisymix.launch.prepare import prepare
from noisymix.launch.report import Progress, summarize
from noisymix.launch.tracking import CURVES, abandon, plot_curves, trackers
from noisymix.mixing.method import TRUE, Method
from noisymix.mixing.selectmix import ROUND_TRAINS_ON
from noisymix.selection.crossval import check_out_of_fold
from noisymix.selection.report import LabelReport


class RunRecorder:
    """Takes the workers' messages: epoch records (metrics.jsonl, progress), per-sample beliefs (scored
    against true labels when the driver has them), and the id/state audits of the tests."""

    def __init__(self, run: RunDir, method: Method, epochs: int, true_labels: np.ndarray | None, log,
                 on_epoch=None, trackers: list | None = None, num_samples: int = 0):
        self.run, self.method, self.true, self.on_epoch = run, method, true_labels, on_epoch
        self.num_samples = num_samples
        self.state_parts: dict[tuple[int, int], dict[int, StateSnapshot]] = {}   # (epoch, world) -> start -> part
        self.trackers = trackers or []
        self.progress = Progress(epochs, log)
        self.history: dict[int, dict] = {record["epoch"]: record for record in run.metrics()}  # a resumed run's
        self.belief_metrics: dict[int, dict] = {}
        self.report: LabelReport | None = None  # the method's latest beliefs about the given labels
        self.trained_ids: dict[tuple[int, int], np.ndarray] = {}
        self.digests: list[dict] = []

    @functools.singledispatchmethod
    def on_message(self, message) -> None:
        raise TypeError(f"unexpected worker message {type(message).__name__}")

    @on_message.register
    def _(self, message: EpochRecord) -> None:
        record = {**message.metrics, **self.belief_metrics.get(message.metrics["epoch"], {})}
        self.history[record["epoch"]] = record
        self.run.append_metrics(record)
        self.run.write_status("running", "training", epoch=record["epoch"])
        self.progress.epoch(record)
        for tracker in self.trackers:
            tracker.epoch(record)
        if self.on_epoch is not None:
            self.on_epoch(record)

    @on_message.register
    def _(self, message: StateSnapshot) -> None:
        """A rank's part of a refresh's beliefs; the whole, once every rank's part of it has come."""
        parts = self.state_parts.setdefault((message.epoch, message.world), {})
        parts[message.start] = message
        if sum(len(part.given) for part in parts.values()) == self.num_samples:
            del self.state_parts[(message.epoch, message.world)]
            self.believe(self.method.label_report(state=StateSnapshot.join(list(parts.values()))), message.epoch)

    @on_message.register
    def _(self, message: TrainedIds) -> None:
        self.trained_ids[(message.epoch, message.rank)] = message.ids

    @on_message.register
    def _(self, message: StateDigest) -> None:
        self.digests.append(dataclasses.asdict(message))

    def believe(self, report: LabelReport, epoch: int) -> dict:
        """Take the method's latest beliefs; returns their scores against true labels ({} without them)."""
        self.report = report
        scores = self.method.evaluate(report, self.true) if self.true is not None else {}
        self.belief_metrics[epoch] = scores
        return scores

    def records(self) -> list[dict]:
        """One record per epoch; an epoch re-run after a worker failure keeps its last copy."""
        return [self.history[epoch] for epoch in sorted(self.history)]

    def close(self) -> None:
        self.run.write_audit(self.trained_ids, self.digests)


class SelectionRounds:
    """The out-of-fold stage of a method that uses one (SelectMix): before the first epoch and at each
    re-selection, folds as Ray tasks -> the mixing table in the object store, and oof.npz."""

    def __init__(self, config: Config, data_dir: str, manifest: dict, run: RunDir, recorder: RunRecorder, log):
        self.config, self.data_dir, self.manifest, self.run, self.recorder, self.log = (
            config, data_dir, manifest, run, recorder, log)
        self.cv = config.method.config
        self.latest: Selection | None = None
        self.rounds: list[dict] = (run.status() or {}).get("rounds", [])   # a resumed run's finished rounds
        if self.rounds:
            self.latest = restore_selection(run.out_of_fold(), self.cv, config.run.seed,
                                            config.method.workers_read_probs(), config.method.noise_matrix_over())
            recorder.believe(config.method.label_report(table=self.latest.table), self.rounds[-1]["epoch"])
            self.latest = self.latest.without_probs()

    def done_at(self, epoch: int) -> bool:
        return any(r["epoch"] == epoch for r in self.rounds)

    def run_round(self, epoch: int, init_state: dict | None) -> Selection:
        cv, reused = self.cv, self.latest is None and bool(self.cv.oof_from)
        if reused:
            then = (f", then {cv.fold_rounds - 1} round(s) of {cv.folds} folds x {cv.fold_epochs} epochs on "
                    f"{ROUND_TRAINS_ON[cv.fold_round_train]}" if cv.fold_rounds > 1 else " (no fold training)")
            self.log(f"selection at epoch {epoch}: out-of-fold probabilities of {cv.oof_from}{then}")
        else:
            start = "fresh models" if init_state is None else f"the main model of epoch {epoch}"
            epochs = "epochs" if cv.fold_select == "ensemble" else "epoch"
            rounds = (f" x {cv.fold_rounds} rounds (each on {ROUND_TRAINS_ON[cv.fold_round_train]})"
                      if cv.fold_rounds > 1 else "")
            self.log(f"selection at epoch {epoch}: {cv.folds} folds x {cv.fold_epochs} epochs{rounds} from {start}, as "
                     f"Ray tasks (predictions of the {cv.fold_select} fold {epochs})")
        self.run.write_status("running", f"selection at epoch {epoch}", rounds=self.rounds)
        cache = FoldCache(self.run / "folds" / f"epoch{epoch}")
        selection = select(cv, self.config.train, self.config.run.seed, self.data_dir, self.manifest,
                           self.latest, init_state, self.config.method.workers_read_probs(), cache,
                           self.config.method.noise_matrix_over())
        table = selection.table
        write_selection(self.run, selection)
        note = self.config.method.selection_note(table)
        self.log(f"selection: {int(table.uncertain.sum())} of {len(table.uncertain)} samples flagged by "
                 f"{table.flag_rule} ({table.uncertain.mean():.1%}) in {selection.seconds:.1f}s"
                 + (f"; fold epochs kept: {[run['kept_epoch'] for run in selection.fold_runs]}" if selection.fold_runs
                    else "")
                 + (f"; classes with no trusted sample use every sample predicted as them: {table.fallback_classes}"
                    if table.fallback_classes else "")
                 + (f"; {note}" if note else ""))
        info = {"epoch": epoch, "seconds": selection.seconds, "flagged": int(table.uncertain.sum()),
                "flag_rule": table.flag_rule,
                "folds": selection.fold_runs, **({"oof_from": cv.oof_from} if reused else {}),
                **({"note": note} if note else {})}
        info.update(self.recorder.believe(self.config.method.label_report(table=table), epoch))
        self.rounds.append(info)
        self.latest = selection.without_probs()
        self.run.write_status("running", f"selection at epoch {epoch} done", rounds=self.rounds)
        cache.clear()   # oof.npz holds what the folds gave
        return self.latest


def write_selection(run: RunDir, selection: Selection) -> None:
    """oof.npz: the out-of-fold probabilities, folds and the mixing table's per-id columns (and its noise matrix
    where the method asked for one)."""
    table = selection.table
    extra = {} if table.noise_matrix is None else {"noise_matrix": table.noise_matrix}
    run.write_out_of_fold(table.probs, table.given, fold=selection.fold_of, predicted=table.predicted,
                          confidence=table.confidence, uncertain=table.uncertain, **extra)


def preflight(config: Config, log) -> tuple[str, dict]:
    """Prepare (or reuse) the data and refuse what cannot run, before any run directory exists."""
    method = config.method
    data_dir = prepare(config.data, config.run.seed, log=log)
    manifest = shards.load_manifest(data_dir)
    if shards.check_shards(data_dir, manifest, full=True, cached=True):
        log(f"data: every shard of {data_dir} matches its checksum")
    if method.label_key == TRUE and not manifest["has_true_labels"]:
        raise ConfigError(f"method={method.name} trains on true labels, and {data_dir} has none (real-noise dataset)")
    tables = [path for path in (method.out_of_fold_file(), method.fixed_clean_file()) if path]
    for path in tables:
        if not storage.is_file(path):
            raise ConfigError(f"out-of-fold table {path} is not a file (oof_from and clean_from name the oof.npz "
                              "of an earlier SelectMix run)")
    if tables:
        given = shards.load_labels(data_dir, manifest)
        for path in tables:
            check_out_of_fold(read_out_of_fold(path), given, manifest["num_classes"], path)
    data = DataInfo.from_manifest(manifest, config.train.crop_size)
    if config.train.pretrained:
        build_model(config.train, data)   # a file that does not fit stops here, not on every worker
    for split, info in manifest["splits"].items():
        if data.image_format == "jpeg" and info["min_side"] < data.height:
            raise ConfigError(f"crop_size={data.height} is larger than the smallest stored image of the {split} split "
                              f"({info['min_side']} px): lower crop_size, or prepare with a larger stored_size")
    for split in ("train", "val", "test"):
        count = len(manifest["splits"][split]["shards"])
        if count < config.resources.num_workers:
            raise ConfigError(f"the {split} split of {data_dir} has {count} shards for num_workers="
                              f"{config.resources.num_workers}; prepare with a larger num_shards")
    return data_dir if storage.is_url(data_dir) else str(Path(data_dir).resolve()), manifest


def fixed_clean_probability(config: Config, data_dir: str, manifest: dict, log) -> np.ndarray | None:
    """`clean_from`: w_i from an earlier run's out-of-fold table, checked against this data's given labels."""
    path = config.method.fixed_clean_file()
    if not path:
        return None
    given = shards.load_labels(data_dir, manifest)
    probs, _ = check_out_of_fold(read_out_of_fold(path), given, manifest["num_classes"], path)
    fit = config.method.fixed_clean_probability(probs, given, config.run.seed)
    if fit.degenerate:
        log(f"clean probabilities: the out-of-fold losses of {path} do not separate ({fit.reason}); every sample "
            "is trusted")
    log(f"clean probabilities: a GMM on the out-of-fold losses -log P[i, y_i] of {path}, in place of the "
        f"training-loss GMM on every epoch ({int(np.sum(fit.w < 0.5))} of {len(fit.w)} below 0.5)")
    return fit.w


def segments(method: Method, epochs: int) -> list[tuple[int, int]]:
    """Main training runs in one segment, or in segments that start where the method re-selects."""
    starts = [e for e in range(1, epochs) if method.plan(e).select]
    return list(zip([0, *starts], [*starts, epochs]))


def model_weights(checkpoint) -> dict:
    with checkpoint.as_directory() as directory:
        return load_checkpoint(Path(directory) / CHECKPOINT_FILE)["model"]


def state_snapshot(checkpoint) -> StateSnapshot | None:
    """The per-sample beliefs a checkpoint's state files hold (a run resumed after its last epoch sends none)."""
    with checkpoint.as_directory() as directory:
        epoch = load_checkpoint(Path(directory) / CHECKPOINT_FILE)["epoch"]
        beliefs = read_beliefs(Path(directory))
    return None if beliefs is None else StateSnapshot(epoch, *beliefs)


def export_model(run: RunDir, checkpoint, name: str) -> None:
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            run.export_model(directory, name)


def finish(config: Config, run: RunDir, recorder: RunRecorder, rounds: SelectionRounds | None, result, manifest: dict,
           stage_times: dict, started: float) -> dict:
    """Models, label_issues.csv and summary.json (written last: its presence means the run finished)."""
    best = result.best_checkpoints[0][0] if result.best_checkpoints else None
    export_model(run, best, MODEL_BEST)
    export_model(run, result.checkpoint, MODEL_LAST)
    records = recorder.records()
    summary = summarize(records, config.to_dict(), manifest, time.perf_counter() - started)
    if rounds is not None:
        stage_times["folds"] = sum(r["seconds"] for r in rounds.rounds)
        summary["selections"] = rounds.rounds
    if config.method.uses_sample_state:
        for key, stage in (("pass_s", "loss_pass"), ("gmm_s", "gmm"), ("index_s", "index")):
            stage_times[stage] = sum(record.get(key, 0.0) for record in records)
    if recorder.report is None and config.method.uses_sample_state and result.checkpoint is not None:
        snapshot = state_snapshot(result.checkpoint)
        recorder.report = None if snapshot is None else config.method.label_report(state=snapshot)
    if recorder.report is not None:
        run.write_label_issues(recorder.report)
        summary.update(recorder.method.evaluate(recorder.report, recorder.true) if recorder.true is not None else {})
    summary["stage_times_s"] = stage_times
    summary["driver_peak_rss_mb"] = peak_rss_mb()
    summary["run_dir"] = run.location
    plot_curves(records, run.path / CURVES, f"{config.method.name} on {manifest['dataset']}")
    run.written(CURVES)
    run.write_summary(summary)
    for tracker in recorder.trackers:
        tracker.close(config.to_dict(), stage_times)
    run.write_status("finished", "done", **({"rounds": rounds.rounds} if rounds is not None else {}))
    return summary


def open_run(config: Config, log) -> tuple[RunDir, dict | None]:
    """A fresh run directory, or the unfinished run it holds with the same settings (returns its status).
    Resources may differ on a resume (another cluster, more or fewer workers); nothing else may."""
    run = RunDir(config.run.run_dir)
    path = run.location
    if run.summary() is not None:
        raise ConfigError(f"run_dir {path} holds a finished run (summary.json); choose another run_dir")
    if run.holds_files():
        status = run.status()
        if status is None or not run.exists(CONFIG):
            raise ConfigError(f"run_dir {path} holds files that are not an unfinished noisymix run; choose another "
                              "run_dir")
        changed = changed_settings(run.config_values(), config)
        if changed:
            raise ConfigError(f"run_dir {path} holds an unfinished run with other settings ({', '.join(changed)} "
                              f"differ): resume it with `noisymix train resume={path}`, or choose another run_dir")
        log(f"resuming the {status['state']} run in {path} (it stopped at: {status['stage']})")
        run.create()
        return run, status
    run.create()
    run.write_config(config.to_dict())
    run.write_status("running", "starting")
    return run, None


class RunStopped(KeyboardInterrupt):
    """A run stopped by the user; its directory can be resumed."""

    def __init__(self, run_dir: str, stage: str):
        super().__init__(f"interrupted at: {stage}; resume with: noisymix train resume={run_dir}")
        self.run_dir, self.stage = run_dir, stage


def train(config: Config, log=print, on_epoch=None) -> dict:
    """Run one training job end to end and return its summary (also written to summary.json). A run_dir
    holding an unfinished run with these settings is resumed: finished selection rounds and folds are kept,
    training continues from the latest checkpoint. `on_epoch` gets each epoch's record as it arrives (a sweep's
    trial reports it to Ray Tune)."""
    started, method = time.perf_counter(), config.method
    data_dir, manifest = preflight(config, log)
    fixed_clean = fixed_clean_probability(config, data_dir, manifest, log)
    start_ray(config.resources.ray_address, config.resources.ray_logs, config.resources.heap_env())
    check_resources(config.resources, method.task_resources(), log)
    run, _ = open_run(config, log)
    try:
        return run_stages(config, run, data_dir, manifest, fixed_clean, started, log, on_epoch)
    except KeyboardInterrupt as exc:
        stage = mark_stopped(run, "interrupted")
        raise RunStopped(run.location, stage) from exc
    except Exception as exc:
        mark_stopped(run, "failed", error=(one_line(exc) or f"{type(exc).__name__}: {exc}").splitlines()[0][:500])
        unnamed = unnamed_file_error(exc)
        if unnamed is not None:   # say where: the run directory, where Ray Train and the driver write
            raise OSError(unnamed.errno, unnamed.strerror or str(unnamed), f"{run.location} (run_dir)") from exc
        raise


def mark_stopped(run: RunDir, state: str, **info) -> str:
    """Turn the run's status into `state`, keeping where it stood (stage, epoch, finished rounds); returns the stage.
    Best effort: on a full or vanished disk the error that stopped the run is the one to report."""
    status = {k: v for k, v in (run.status() or {}).items() if k not in ("state", "updated_unix")}
    stage = status.pop("stage", "starting")
    try:
        run.write_status(state, stage, **status, **info)
    except OSError:
        pass
    return stage


def run_stages(config: Config, run: RunDir, data_dir: str, manifest: dict, fixed_clean: np.ndarray | None,
               started: float, log, on_epoch=None) -> dict:
    """The stages of a run: the method's selection rounds between training segments, then the outputs."""
    method = config.method
    log(f"run {run.location}: method={method.name} dataset={manifest['dataset']} epochs={config.train.epochs} "
        f"workers={config.resources.num_workers}")
    # True labels are read for evaluating the method's beliefs only; they stay on the driver.
    true_labels = (shards.load_labels(data_dir, manifest, label_key=shards.TRUE_LABEL)
                   if manifest["has_true_labels"] and method.reports_labels else None)
    recorder = RunRecorder(run, method, config.train.epochs, true_labels, log, on_epoch,
                           trackers(run, config.to_dict()), manifest["splits"]["train"]["count"])
    try:
        rounds = SelectionRounds(config, data_dir, manifest, run, recorder, log) if method.uses_out_of_fold else None
        job = WorkerJob(method, config.train, config.audit, config.run.seed, data_dir, manifest, config.train.epochs,
                        index_name=f"noisymix-index-{uuid.uuid4().hex[:8]}",
                        fixed_clean=None if fixed_clean is None else ray.put(fixed_clean))
        try:
            result, seconds = train_segments(config, run, job, rounds, recorder)
        finally:
            recorder.close()
        run.write_status("running", "writing the outputs", **({"rounds": rounds.rounds} if rounds else {}))
        return finish(config, run, recorder, rounds, result, manifest, {"main_training": seconds}, started)
    except BaseException as exc:
        abandon(recorder.trackers, exc)
        raise


def train_segments(config: Config, run: RunDir, job: WorkerJob, rounds, recorder: RunRecorder) -> tuple:
    """The training segments between selection rounds (one for methods without rounds), skipping those a resumed
    run had finished; returns Ray Train's last result and the seconds spent training."""
    result, seconds = None, 0.0
    trained_to = run.latest_checkpoint_epoch()   # a resumed run's latest checkpoint
    for first, stop in segments(config.method, config.train.epochs):
        if trained_to is not None and stop - 1 <= trained_to and stop < config.train.epochs:
            continue   # a segment a resumed run had finished
        if rounds is not None:
            if not rounds.done_at(first):
                init = None if first == 0 else model_weights(result.checkpoint if result else latest(run))
                rounds.run_round(first, init)
            job = dataclasses.replace(job, table=rounds.latest.table_ref)
        run.write_status("running", "training", **({"rounds": rounds.rounds} if rounds else {}))
        segment_started = time.perf_counter()
        # Segments share the Ray Train run: each resumes from the previous one's checkpoint.
        result = run_trainer(dataclasses.replace(job, stop_epoch=stop), config.resources, run.ray_storage,
                             recorder.on_message, RAY_RUN)
        seconds += time.perf_counter() - segment_started
    return result, seconds


def latest(run: RunDir):
    """Ray Train's latest checkpoint of a run, as a Checkpoint (a resumed run re-selects from its weights)."""
    return ray.train.Checkpoint(run.latest_checkpoint_dir())
