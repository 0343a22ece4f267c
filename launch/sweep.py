"""`noisymix tune SPEC.yaml`: a Ray Tune search over noisymix training runs, selected on the NOISY validation
accuracy. Each trial is an ordinary `train()` run with its run directory in the sweep directory; trials
whose folds would be equal share one fold stage; a rerun of the same command resumes the sweep."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

import ray
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from noisymix.distributed import shards, storage
from noisymix.distributed.artifacts import OUT_OF_FOLD, RunDir, write_json_atomic
from noisymix.distributed.fold_registry import FoldStageRegistry, shared_stage
from noisymix.distributed.folds import select
from noisymix.distributed.runner import alongside_cpus, start_ray
from noisymix.launch.config import Config, ConfigError, build_config
from noisymix.launch.prepare import prepare
from noisymix.launch.tune_spec import SHARED_FOLDS, SweepSpec, SweepSpecError, with_table_placeholders, trial_values
from noisymix.mixing.selectmix import CrossValConfig

SPEC_FILE, TRIALS, FOLDS, TUNE_RUN = "spec.yaml", "trials", "folds", "tune"
TRIAL_FILE, TRIAL_LOG, STAGE_FILE = "trial.json", "log.txt", "stage.json"
EPOCHS_DONE = "epochs_done"   # what ASHA counts a trial's progress in
TRIAL_DRIVER_MEMORY = 512 * 2**20   # bytes: a trial's driver process (torch imported, the run's records)
# Keys that name local files a trial reads while training: it runs in its own working directory, so the driver
# makes them absolute. The data keys (source_path, noise_file) stay as given: only the driver's prepare reads
# them, and a trial's prepare recognises the prepared data by the same values its manifest recorded.
PATH_KEYS = ("pretrained", "oof_from", "clean_from")
# Keys the fold models do not read: the main run's length and schedule (folds have their own).
NOT_READ_BY_FOLDS = ("epochs", "schedule", "milestones", "gamma")
# A trial's Ray Train run never restarts its own worker group: Tune retries the trial instead (max_failures of
# the base), and the retried trial resumes its run directory from the latest checkpoint. When Tune stops a trial,
# its workers die before its Ray Train controller does; a controller allowed to retry takes that for a worker
# failure and reserves a new placement group that nothing removes until the sweep ends (ray-project/ray#58515):
# each such leak held a trial's CPUs, and a small cluster's sweep could wait forever.
IN_TRIAL_RETRIES = {"max_failures": 0}


class SweepInterrupted(KeyboardInterrupt):
    """The sweep stopped before every trial ended; the same command resumes it."""


def search_space(spec: SweepSpec) -> dict:
    """The spec's dimensions as Ray Tune's sampling objects; a method's sub-space nests under its name."""
    make = {"choice": lambda v: tune.choice(list(v)), "grid": lambda v: tune.grid_search(list(v)),
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(*v)}
    space: dict = {}
    for dim in spec.dimensions:
        target = space.setdefault(dim.method, {}) if dim.method else space
        target[dim.key] = make[dim.kind](dim.values)
    return space


def expected_trials(spec: SweepSpec) -> int:
    return spec.num_samples * math.prod(len(d.values) for d in spec.dimensions if d.kind == "grid")


def fold_settings(values: dict, config: Config) -> CrossValConfig:
    """The fold stage's own knobs of a trial, resolved for its run: its method's where the method has folds (so a
    method's own defaults apply, e.g. CrossMix's fold_epochs), else those among the values (a MixNN trial's
    clean_from table); never an oof_from (the stage trains the folds)."""
    own = config.method.config
    known = {k: getattr(own, k) for k in CrossValConfig.keys()} if isinstance(own, CrossValConfig) else values
    cv = CrossValConfig.from_values({k: known[k] for k in CrossValConfig.keys() if k in known and k != "oof_from"})
    cv.resolve(config.resources.use_gpu, config.train.epochs)
    return cv


def fold_key(values: dict, config: Config) -> str:
    """What decides a fold stage's out-of-fold table: the data, the seed, the training knobs the fold models
    read, and the folds' own (folds, fold_epochs, fold_select, fold_mixup). The stage is the first fold round only:
    a trial with fold_rounds > 1 trains its later rounds itself from the shared table, as a run does from an
    oof_from. Equal keys, equal tables."""
    cv = fold_settings(values, config)
    train = {k: v for k, v in config.train.to_dict().items() if k not in NOT_READ_BY_FOLDS}
    decided = {"data": config.data.to_dict(), "seed": config.run.seed, "train": train,
               "folds": [cv.folds, cv.fold_epochs, cv.fold_select, cv.fold_mixup]}
    return hashlib.sha256(json.dumps(decided, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_fold_stage(values: dict, config: Config, folder: str, log) -> None:
    """Train the K folds of `values` once and write folder/oof.npz and stage.json (its cost, for the report)."""
    from noisymix.distributed import shards
    from noisymix.launch.train import write_selection

    started = time.perf_counter()
    cv = dataclasses.replace(fold_settings(values, config), fold_rounds=1)   # a trial trains its later rounds
    data_dir = config.data.data_dir
    manifest = shards.load_manifest(data_dir)
    log(f"fold stage: {cv.folds} folds x {cv.fold_epochs} epochs, shared by every trial with these fold settings")
    selection = select(cv, config.train, config.run.seed, data_dir, manifest)
    run = RunDir(folder)
    run.create()
    write_selection(run, selection)
    write_json_atomic(run.path / STAGE_FILE, {"seconds": time.perf_counter() - started, "folds": cv.folds,
                                              "fold_epochs": cv.fold_epochs, "fold_runs": selection.fold_runs})
    run.written(STAGE_FILE)


def with_shared_folds(values: dict, sweep_dir: str, registry, log) -> dict:
    """A SelectMix trial takes the sweep's out-of-fold table for its fold key (unless it names its own
    oof_from); a trial with clean_from=sweep takes the same table as its clean probabilities. The first trial
    of a key trains it."""
    config = build_config(overrides=with_table_placeholders(values))
    wants = ([("oof_from", values.get("oof_from"))] if config.method.uses_out_of_fold else []) + \
        [("clean_from", SHARED_FOLDS)] * (values.get("clean_from") == SHARED_FOLDS)
    keys = [key for key, given in wants if given in (None, SHARED_FOLDS)]
    if not keys:
        return values
    key = fold_key(values, config)
    folder = storage.join(sweep_dir, FOLDS, key)
    table = storage.join(folder, OUT_OF_FOLD)
    shared_stage(registry, key, lambda: storage.is_file(table),
                 lambda: run_fold_stage(values, config, folder, log), log)
    return {**values, **{key: table for key in keys}}


class EpochReporter:
    """Reports each epoch's noisy validation accuracy to Ray Tune, once per epoch (a worker restart may send
    an epoch twice). Test accuracy is never reported: the search cannot read it."""

    def __init__(self, metric: str):
        self.metric, self.done = metric, 0

    def __call__(self, record: dict) -> None:
        done = record["epoch"] + 1   # records count epochs from 0
        if done > self.done:
            self.done = done
            tune.report({EPOCHS_DONE: done, self.metric: record[self.metric]})


def run_trial(params: dict, base: dict, sweep_dir: str, placed: dict, metric: str, registry) -> None:
    """One trial: its config (base and sampled values, with what the sweep places: the prepared data_dir, the
    CPUs per worker, and `origin` for relative paths), the shared fold stage it needs, then an ordinary training
    run in sweep_dir/trials/<trial id>/run (resumed if a restarted sweep had begun it)."""
    from noisymix.launch.train import train

    trial = RunDir(storage.join(sweep_dir, TRIALS, tune.get_context().get_trial_id()))
    trial.path.mkdir(parents=True, exist_ok=True)
    if trial.remote and trial.exists(TRIAL_LOG):   # a resumed trial appends to its log
        storage.download(trial.url(TRIAL_LOG), trial.path / TRIAL_LOG)
    with open(trial.path / TRIAL_LOG, "a", buffering=1) as log_file:
        def log(line: str) -> None:
            log_file.write(f"{line}\n")

        def record(**fields) -> None:
            write_json_atomic(trial.path / TRIAL_FILE, {"params": params, "values": values, **fields})
            trial.written(TRIAL_FILE)

        try:
            values = trial_values(base, params)
            record()
            placed = dict(placed)
            run_values = {**absolute_paths(values, placed.pop("origin")), **placed}
            shared = with_shared_folds(run_values, sweep_dir, registry, log)
            record(run_values=shared)
            config = build_config(overrides={**shared, "run_dir": storage.join(trial.location, "run")})
            reporter = EpochReporter(metric)
            run = RunDir(config.run.run_dir)
            if run.summary() is not None:   # finished before the sweep's driver stopped: reported again, not retrained
                for epoch in run.metrics():
                    reporter(epoch)
                return
            train(config, log=log, on_epoch=reporter)
        finally:
            log_file.flush()
            trial.written(TRIAL_LOG)


def absolute_paths(values: dict, origin: str) -> dict:
    """`values` with every relative file path (PATH_KEYS) read from `origin`, the sweep driver's directory."""
    return {k: (str(Path(origin, v)) if k in PATH_KEYS and isinstance(v, str) and v != SHARED_FOLDS
                and not storage.is_url(v) else v) for k, v in values.items()}


def plan_concurrency(spec: SweepSpec, total_cpus: float, total_gpus: float, log) -> tuple[int, dict]:
    """(trials at once, keys set on every trial): each trial's workers reserve whole CPUs, so that
    max_concurrent trials never ask for more cores than the cluster has."""
    configs = [build_config(overrides=with_table_placeholders({**spec.base, "method": m})) for m in spec.methods()]
    resources = configs[0].resources
    workers = resources.num_workers
    alongside = max(alongside_cpus(c.method.task_resources()) for c in configs)
    if resources.cpus_per_worker:
        per_worker = resources.cpus_per_worker
    else:   # as a single run: one CPU per GPU worker, else the cluster's CPUs split between the trials' workers
        per_worker = 1 if resources.use_gpu else max(1, int((total_cpus / spec.max_concurrent - alongside) // workers))
    per_trial = workers * per_worker + alongside
    fits = int(total_cpus // per_trial)
    if resources.use_gpu:
        fits = min(fits, int(total_gpus // workers))
    if resources.wait_for_resources:   # an autoscaling cluster: trials whose workers cannot be placed yet wait
        if fits < spec.max_concurrent:
            log(f"max_concurrent={spec.max_concurrent}: the cluster holds {fits} trial(s) now; the others wait for "
                "the autoscaler (wait_for_resources=true)")
        return spec.max_concurrent, {"cpus_per_worker": float(per_worker)}
    if fits < 1:
        raise ConfigError(f"one trial needs {per_trial:g} CPUs ({workers} workers x {per_worker:g}"
                          f"{f' + {alongside:g} alongside' if alongside else ''})"
                          f"{f' and {workers} GPUs' if resources.use_gpu else ''}; the cluster has {total_cpus:g} "
                          f"CPUs and {total_gpus:g} GPUs: ask for less, or set wait_for_resources=true on an "
                          "autoscaling cluster")
    at_once = min(spec.max_concurrent, fits)
    if at_once < spec.max_concurrent:
        log(f"max_concurrent={spec.max_concurrent} lowered to {at_once}: each trial reserves {per_trial:g} CPUs "
            f"and the cluster has {total_cpus:g}")
    return at_once, {"cpus_per_worker": float(per_worker)}


class TrialLines(tune.Callback):
    """One console line per ended trial."""

    def __init__(self, spec: SweepSpec, total: int, log):
        self.spec, self.total, self.log, self.ended = spec, total, log, 0

    def _line(self, trial, how: str) -> None:
        self.ended += 1
        values = trial_values(self.spec.base, trial.config)
        searched = " ".join(f"{d.name}={_short(_param(trial.config, d))}" for d in self.spec.dimensions
                            if d.applies_to(values.get("method")))
        best = trial.metric_analysis.get(self.spec.metric, {}).get(self.spec.mode)
        done = (trial.last_result or {}).get(EPOCHS_DONE, 0)
        score = f"best {self.spec.metric} {best:.4f} in {done} epochs" if best is not None else "no epoch reported"
        self.log(f"trial {self.ended}/{self.total} {trial.trial_id} {how}: {searched}: {score}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trial, "ended")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, "FAILED")


def _param(params: dict, dim):
    return (params.get(dim.method) or {}).get(dim.key) if dim.method else params.get(dim.key)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def open_sweep(spec: SweepSpec, log) -> bool:
    """Claim the sweep directory (a folder, or a URL every node of a cluster reaches); returns whether it holds
    this same sweep to resume."""
    folder = sweep_folder(spec)
    if folder.exists(SPEC_FILE):
        if yaml.safe_load((folder / SPEC_FILE).read_text()) != json.loads(json.dumps(spec.to_dict())):
            raise SweepSpecError(f"sweep_dir {spec.sweep_dir} holds a sweep of another spec; choose another sweep_dir")
        log(f"resuming the sweep in {spec.sweep_dir}")
        return True
    if folder.holds_files():
        raise SweepSpecError(f"sweep_dir {spec.sweep_dir} holds files that are not a noisymix sweep; choose another "
                             "sweep_dir")
    folder.create()
    (folder.path / SPEC_FILE).write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    folder.written(SPEC_FILE)
    return False


def sweep_folder(spec: SweepSpec) -> RunDir:
    """The sweep directory as a folder-or-URL with a local working copy (what a run directory is too)."""
    return RunDir(spec.location)


def make_searcher(spec: SweepSpec, at_once: int):
    """Random search (grids expanded) seeded by the spec, or Optuna's TPE."""
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=spec.seed)
    return BasicVariantGenerator(random_state=spec.seed, max_concurrent=at_once)


def build_tuner(spec: SweepSpec, at_once: int, placed: dict, registry, resume: bool, retries: int,
                log) -> tune.Tuner:
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=spec.base, sweep_dir=spec.location, placed=placed,
                             metric=spec.metric, registry=registry),
        # The trial only drives its run (its workers and fold tasks reserve the CPUs); Ray needs a non-empty
        # bundle, and the driver's memory is what it does use.
        {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})
    path = storage.join(spec.location, TUNE_RUN)
    if resume and tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False)
    if spec.scheduler["name"] == "asha":
        # max_t past the last epoch: ASHA stops at max_t, and a trial on its last epoch must end by itself
        # (writing its outputs), not be stopped.
        scheduler = ASHAScheduler(time_attr=EPOCHS_DONE, max_t=spec.max_epochs() + 1,
                                  grace_period=spec.scheduler["grace_period"],
                                  reduction_factor=spec.scheduler["reduction_factor"])
    else:
        scheduler = FIFOScheduler()
    searcher = make_searcher(spec, at_once)
    return tune.Tuner(
        trainable, param_space=search_space(spec),
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                                    scheduler=scheduler, search_alg=searcher,
                                    # random search limits itself (make_searcher); Tune limits any other
                                    max_concurrent_trials=None if spec.search == "random" else at_once),
        run_config=tune.RunConfig(name=TUNE_RUN, storage_path=spec.location, verbose=0,
                                  callbacks=[TrialLines(spec, expected_trials(spec), log)],
                                  failure_config=tune.FailureConfig(max_failures=retries)))


def run_sweep(spec: SweepSpec, log=print) -> dict:
    """Prepare the data once, run (or resume) the search, then write trials.csv, best.yaml and sweep.md."""
    from noisymix.launch.sweep_report import write_sweep_report

    config = build_config(overrides=with_table_placeholders(spec.base))
    fresh = not storage.is_dir(spec.location)
    try:
        data_dir = prepare(config.data, config.run.seed, log=log)
        val_count = shards.load_manifest(data_dir)["splits"]["val"]["count"]   # the report's resolution of the choice
        start_ray(config.resources.ray_address, config.resources.ray_logs, config.resources.heap_env())
        total = ray.cluster_resources()
        at_once, placed = plan_concurrency(spec, total.get("CPU", 0.0), total.get("GPU", 0.0), log)
        placed.update(IN_TRIAL_RETRIES, origin=str(Path.cwd()),
                      data_dir=data_dir if storage.is_url(data_dir) else str(Path(data_dir).resolve()))
        resume = open_sweep(spec, log)
    except BaseException:
        if fresh:
            storage.delete_tree(spec.location)
        raise
    log(f"sweep {spec.name}: {expected_trials(spec)} trials of {', '.join(spec.methods())}, {at_once} at a time, "
        f"{spec.search} search, {spec.scheduler['name']} scheduler, objective {spec.metric} (noisy validation) -> "
        f"{spec.sweep_dir}")
    registry = FoldStageRegistry.remote()
    started = time.perf_counter()
    try:
        grid = build_tuner(spec, at_once, placed, registry, resume, config.resources.max_failures, log).fit()
    finally:
        ray.kill(registry)
    ended = grid.num_terminated + grid.num_errors
    report = write_sweep_report(spec, grid, time.perf_counter() - started, val_count, log)
    if ended < expected_trials(spec):
        raise SweepInterrupted(f"the sweep stopped with {ended} of {expected_trials(spec)} trials ended; the same "
                               "command resumes it")
    return report
