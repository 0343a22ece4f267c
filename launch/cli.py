"""The `noisymix` command: `prepare` and `train`, each taking an optional YAML recipe and key=value overrides."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from noisymix.launch.config import ConfigError, build_config, parse_overrides

USAGE = """noisymix prepare [CONFIG.yaml] [key=value ...] [--force]
       noisymix train   [CONFIG.yaml] [key=value ...]
       noisymix bench   SPEC.yaml [--only CELL-PATTERN ...] [--report-only] [--work DIR] [--out DIR]
       noisymix synth   out=DIR [train=N test=N classes=C min_size=PX max_size=PX noise_rate=R ...]

With no arguments, `noisymix train` prepares scikit-learn's digits with 40% symmetric noise, trains
the default method on them, then plain CE with the same settings, and prints both."""


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
    synth = commands.add_parser("synth", help="write a synthetic image-list dataset of JPEGs (to measure scale)")
    synth.add_argument("items", nargs="*", help="key=value ... (launch/synth.py: SynthSection)")
    bench = commands.add_parser("bench", help="run a benchmark spec (cached, resumable) and write its report")
    bench.add_argument("spec", help="benchmark spec YAML, e.g. benchmarks/fashion_mnist.yaml")
    bench.add_argument("--only", nargs="+", metavar="PATTERN", help="run only cells whose id matches a glob, "
                       "e.g. 'symmetric40/*/seed0' (the report still shows every finished cell)")
    bench.add_argument("--report-only", action="store_true", help="run nothing; rebuild the report from finished cells")
    bench.add_argument("--work", type=Path, help="where cells keep data and run directories (default runs/bench/NAME)")
    bench.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where the report is written")
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    from noisymix.distributed.models import PretrainedError
    from noisymix.distributed.shards import ShardError
    from noisymix.launch.noise import NoiseError
    from noisymix.launch.sources import SourceError
    from noisymix.selection.crossval import SelectionError

    from noisymix.launch.bench_spec import SpecError

    return ConfigError, NoiseError, SourceError, ShardError, SelectionError, SpecError, PretrainedError, FileNotFoundError


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


def _root_cause(exc: BaseException) -> BaseException:
    """Ray wraps a worker's exception (TrainingFailedError -> WorkerGroupError -> the worker's own)."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        return _root_cause(next(iter(failures.values())))
    cause = exc.__cause__
    return _root_cause(cause) if cause is not None and cause is not exc else exc


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "bench":
            return _bench(args)
        if args.command == "synth":
            from noisymix.launch.synth import SynthSection, synthesize

            print(f"source_path: {synthesize(SynthSection.from_values(parse_overrides(args.items)))}")
            return 0
        path, pairs = _split_args(args.items)
        config = build_config(path, parse_overrides(pairs))
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
    except Exception as exc:  # noqa: BLE001 - narrowed below: only our input errors become one-line messages
        cause = _root_cause(exc)
        if isinstance(cause, _known_errors()) or isinstance(exc, _known_errors()):
            print(f"noisymix: error: {exc if isinstance(exc, _known_errors()) else cause}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
