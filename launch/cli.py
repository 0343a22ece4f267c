"""The `noisymix` command: `prepare` and `train`, each taking an optional YAML recipe and key=value overrides."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from noisymix.launch.config import ConfigError, build_config, parse_overrides
from noisymix.launch.errors import one_line

USAGE = """noisymix prepare [CONFIG.yaml] [key=value ...] [--force]
       noisymix train   [CONFIG.yaml] [key=value ...]
       noisymix train   resume=RUN_DIR [num_workers=N ...]   (continue an interrupted or failed run)
       noisymix tune    SWEEP.yaml [key=value ...]   (Ray Tune search on the noisy validation accuracy)
       noisymix bench   SPEC.yaml [--only CELL-PATTERN ...] [--report-only] [--work DIR] [--out DIR]
       noisymix verify  DATA_DIR   (every shard's checksum and every split's count against manifest.json)
       noisymix synth   out=DIR [train=N test=N classes=C min_size=PX max_size=PX noise_rate=R ...]

With no arguments, `noisymix train` prepares scikit-learn's digits with 40% symmetric noise, trains
the default method on them, then plain CE with the same settings, and prints both."""


def _resumed_config(overrides: dict):
    """The config saved in resume=RUN_DIR; only where and on what it runs may change (resources)."""
    from noisymix.distributed.artifacts import CONFIG, RunDir
    from noisymix.distributed.settings import ResourcesSection
    from noisymix.launch.config import config_from_record

    run_dir = str(overrides.pop("resume"))
    if not RunDir(run_dir).exists(CONFIG):
        raise ConfigError(f"resume={run_dir}: no {CONFIG} there (not a noisymix run directory)")
    other = sorted(set(overrides) - set(ResourcesSection.keys()))
    if other:
        raise ConfigError(f"resume takes the run's own settings; only resources may change, not {', '.join(other)}")
    return config_from_record({**RunDir(run_dir).config_values(), **overrides, "run_dir": str(run_dir)})


def _split_args(items: list[str]) -> tuple[str | None, list[str]]:
    """The first item is a recipe path unless it is a key=value override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def _methods_epilog() -> str:
    from noisymix.launch.config import RunSection
    from noisymix.mixing.method import method_class, method_names

    lines = [f"  {name:<11} {method_class(name).summary}" + (" (default)" if name == RunSection.method else "")
             for name in method_names()]
    return "methods (method=NAME):\n" + "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    # argparse formats usage and epilog with %: a literal percent sign must be doubled.
    parser = argparse.ArgumentParser(prog="noisymix", usage=USAGE.replace("%", "%%"),
                                     epilog=_methods_epilog().replace("%", "%%"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Train image classifiers on noisy labels (SelectMix, MixNN, baselines).")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="write WebDataset shards and manifest.json for a dataset")
    prepare.add_argument("items", nargs="*", help="[CONFIG.yaml] key=value ...")
    prepare.add_argument("--force", action="store_true", help="rebuild data_dir even if prepared with other settings")
    train = commands.add_parser("train", help="train a method (prepares the data first if needed)")
    train.add_argument("items", nargs="*", help="[CONFIG.yaml] key=value ...")
    tune = commands.add_parser("tune", help="search a method's knobs with Ray Tune (resumable; see docs in README)")
    tune.add_argument("spec", help="sweep spec YAML, e.g. benchmarks/tune_digits.yaml")
    tune.add_argument("items", nargs="*", help="key=value: spec keys (num_samples, max_concurrent, sweep_dir, ...) "
                                               "or base config keys")
    verify = commands.add_parser("verify", help="check a prepared dataset: checksums and counts against its manifest")
    verify.add_argument("data_dir", type=Path)
    synth = commands.add_parser("synth", help="write a synthetic image-list dataset of JPEGs (to measure scale)")
    synth.add_argument("items", nargs="*", help="key=value ... (launch/synth.py: SynthSection)")
    bench = commands.add_parser("bench", help="run a benchmark spec (cached, resumable) and write its report")
    bench.add_argument("spec", help="benchmark spec YAML, e.g. benchmarks/fashion_mnist.yaml")
    bench.add_argument("--only", nargs="+", metavar="PATTERN", help="run only cells whose id matches a glob, "
                       "e.g. 'symmetric40/*/seed0' (the report still shows every finished cell)")
    bench.add_argument("--report-only", action="store_true", help="run nothing; rebuild the report from finished cells")
    bench.add_argument("--work", help="where cells keep data and run directories: a folder or an object-store URL "
                                      "(default runs/bench/NAME)")
    bench.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where the report is written")
    return parser


def _bench(args: argparse.Namespace) -> int:
    """Validate the whole spec, run the cells not yet done, then write the report from every finished cell."""
    from noisymix.launch.bench import gather, run_spec, write_report
    from noisymix.launch.bench_spec import load_spec

    spec = load_spec(args.spec)
    work = args.work or Path("runs") / "bench" / spec.name
    outcome = {"failed": 0}
    if not args.report_only:
        outcome = run_spec(spec, work, args.only)
    command = shlex.join(["noisymix", "bench", args.spec])
    for path in write_report(gather(spec, work), args.out, command):
        print(f"wrote {path}")
    return 1 if outcome["failed"] else 0


def _tune(args: argparse.Namespace) -> int:
    from noisymix.launch.sweep import run_sweep
    from noisymix.launch.tune_spec import load_sweep

    report = run_sweep(load_sweep(args.spec, parse_overrides(args.items)))
    failed = sum(row["status"] == "failed" for row in report["trials"])
    return 1 if failed == len(report["trials"]) else 0


def _verify(data_dir: Path) -> int:
    import numpy as np

    from noisymix.distributed import shards

    manifest = shards.load_manifest(data_dir)
    shards.check_shards(data_dir, manifest, full=True)
    for split, info in manifest["splits"].items():
        given = shards.scan_labels(data_dir, manifest, split)
        if len(given) != info["count"]:
            raise shards.ShardError(f"the {split} split of {data_dir} holds {len(given)} readable samples, the "
                                    f"manifest lists {info['count']}")
        if "labels" in info and not np.array_equal(shards.load_labels(data_dir, manifest, split), given):
            raise shards.ShardError(f"the labels file of the {split} split of {data_dir} disagrees with its shards")
        print(f"{split}: {len(info['shards'])} shards, {len(given)} samples, checksums match")
    print(f"verified: {data_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    # Progress lines as they happen, also into a pipe (`| tee`, a Ray job's log), not when a buffer fills.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    args = _parser().parse_args(argv)
    try:
        if args.command == "bench":
            return _bench(args)
        if args.command == "tune":
            return _tune(args)
        if args.command == "verify":
            return _verify(args.data_dir)
        if args.command == "synth":
            from noisymix.launch.synth import SynthSection, synthesize

            print(f"source_path: {synthesize(SynthSection.from_values(parse_overrides(args.items)))}")
            return 0
        path, pairs = _split_args(args.items)
        overrides = parse_overrides(pairs)
        config = _resumed_config(overrides) if "resume" in overrides else build_config(path, overrides)
        if config.ignored:
            print(f"note: method={config.method.name} has no knob(s) {', '.join(config.ignored)}: ignored", file=sys.stderr)
        if args.command == "prepare":
            from noisymix.launch.prepare import prepare

            print(f"data_dir: {prepare(config.data, config.run.seed, force=args.force)}")
            return 0
        from noisymix.launch.report import closing_table
        from noisymix.launch.train import train

        summaries = [train(config)]
        if not args.items:
            # The newcomer's job: the default method, then plain CE on the same data, seed and schedule beside it.
            baseline = build_config(None, {"method": "ce"})
            summaries.append(train(baseline))
        print()
        print(closing_table(summaries))
        print(f"run_dir: {summaries[0]['run_dir']}")
        return 0
    except KeyboardInterrupt as exc:
        print(f"noisymix: {exc or 'interrupted'}", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - narrowed below: what a user can cause becomes one line
        message = one_line(exc)
        if message is None:
            raise
        print(f"noisymix: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
