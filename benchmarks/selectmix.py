"""SelectMix benchmark on Fashion-MNIST: methods x noise settings, ablations, partner sources, fold cost.

Every cell is a normal training run through the real trainer, side by side in one Ray session with
the same model, epochs and seed. Results are saved after every cell (a rerun skips finished cells),
then written to benchmarks/results/selectmix.{json,md}.

    python benchmarks/selectmix.py [--epochs 6] [--width 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import ray

from noisymix.distributed import shards
from noisymix.distributed.folds import fold_settings, load_split, run_folds_parallel
from noisymix.distributed.runner import start_ray
from noisymix.launch.config import build_config
from noisymix.launch.prepare import prepare
from noisymix.launch.train import train

ROOT = Path(__file__).resolve().parents[1]
FASHION = ROOT.parent / "shared" / "data" / "fashion-mnist"
SETTINGS = {"symmetric40": ("symmetric", 0.4), "instance40": ("instance", 0.4), "pairflip40": ("pairflip", 0.4)}
METHODS = {"ce": {"method": "ce"}, "mixup": {"method": "mixup"}, "clean": {"method": "clean"},
           "selectmix": {"method": "selectmix"}}
ABLATIONS = {  # at 40% symmetric only: the ablations, the partner sources, the fold schedule
    "selectmix:random-partners": {"method": "selectmix", "partners": "random"},
    "selectmix:hard-label": {"method": "selectmix", "selectmix_label": "hard"},
    "selectmix:selection-only": {"method": "selectmix", "partners": "none"},
    "selectmix:partners-batch": {"method": "selectmix", "partner_source": "batch"},
    "selectmix:partners-buffer": {"method": "selectmix", "partner_source": "buffer"},
    "selectmix:fold-epochs-1": {"method": "selectmix", "fold_epochs": 1},
    "selectmix:fold-epochs-4": {"method": "selectmix", "fold_epochs": 4},
    "selectmix:3-folds": {"method": "selectmix", "folds": 3},
}


def base(args, data_dir: Path, noise_type: str, rate: float) -> dict:
    return {"source": "idx", "source_path": str(FASHION), "dataset": "fashion-mnist", "noise_type": noise_type,
            "noise_rate": rate, "seed": 0, "model": "small_cnn", "width": args.width, "batch_size": 128, "lr": 0.05,
            "crop_padding": 2, "hflip": True, "num_shards": 8, "epochs": args.epochs, "num_workers": 1,
            "cpus_per_worker": 2, "data_dir": str(data_dir)}


def fold_stage_seconds(settings: dict, fold_cpus: float) -> float:
    """Wall time of the fold stage alone (5 folds, default length) with fold_cpus per task."""
    config = build_config(overrides={**settings, "method": "selectmix", "fold_cpus": fold_cpus})
    manifest = shards.load_manifest(config.data_dir)
    _, images, given = load_split(config.data_dir, manifest)
    started = time.perf_counter()
    run_folds_parallel(ray.put(images), given, config.folds, fold_settings(config, manifest), cpus=fold_cpus)
    return time.perf_counter() - started


def run_cell(settings: dict, overrides: dict, run_dir: Path) -> dict:
    config = build_config(overrides={**settings, **overrides, "run_dir": str(run_dir)})
    summary = train(config, log=lambda line: print(f"[{run_dir.name}] {line}", flush=True))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary["samples_per_s_per_worker_median"] = statistics.median(r["samples_per_s_per_worker"] for r in records)
    return summary


def recovery(acc: float, ce: float, clean: float) -> float | None:
    """R = (acc - acc_CE) / (acc_clean - acc_CE): the share of the noise damage a method undoes."""
    return (acc - ce) / (clean - ce) if clean > ce else None


def markdown(results: dict) -> str:
    cells, meta = results["cells"], results["meta"]
    out = ["# SelectMix benchmark: Fashion-MNIST", "",
           f"Command: `{meta['command']}`. Small CNN width {meta['width']}, {meta['epochs']} epochs, batch 128, "
           f"SGD lr 0.05 cosine, crop 2 + flip, seed 0, 1 worker x 2 CPUs; SelectMix defaults: "
           f"{meta['selectmix_defaults']}. Total wall time {meta.get('total_wall_s', 0) / 60:.0f} min.", "",
           "Headline = test accuracy at the epoch with the best accuracy on the noisy validation split. "
           "R = (acc - acc_CE) / (acc_clean - acc_CE). Wall = end-to-end wall time over CE's in the same setting "
           "(SelectMix: folds + training).", ""]
    for setting in SETTINGS:
        rows = {name.split("/", 1)[1]: s for name, s in cells.items() if name.startswith(setting + "/") and "error" not in s}
        if "ce" not in rows:
            continue
        ce, clean = rows["ce"], rows.get("clean")
        out += [f"## {setting}", "",
                "| method | headline | last | best test (labelled) | R | flagged P / R / F1 | AUROC | wall vs CE | folds s | train s |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for name, s in rows.items():
            r = recovery(s["test_acc"], ce["test_acc"], clean["test_acc"]) if clean else None
            d = s.get("detection")
            det = f"{d['precision']:.3f} / {d['recall']:.3f} / {d['f1']:.3f}" if d else "-"
            auroc = f"{d['auroc']:.3f}" if d and d.get("auroc") is not None else "-"
            st = s.get("stage_times_s", {})
            out.append(f"| {name} | {s['test_acc']:.4f} | {s['test_acc_last']:.4f} | {s['test_acc_best_test']:.4f} | "
                       f"{'-' if r is None else f'{r:.2f}'} | {det} | {auroc} | {s['wall_time_s'] / ce['wall_time_s']:.2f}x | "
                       f"{st.get('folds', 0):.0f} | {st.get('main_training', 0):.0f} |")
        out.append("")
    failed = {name: s["error"] for name, s in cells.items() if "error" in s}
    if failed:
        out += ["## Failed cells", ""] + [f"- {name}: {err}" for name, err in failed.items()] + [""]
    if "fold_parallelism" in results:
        fp = results["fold_parallelism"]
        out += ["## Fold stage parallelism (40% symmetric, 5 folds, default fold length)", "",
                "| tasks at once | CPUs per task | fold stage s |", "|---|---|---|",
                f"| 2 | 1 | {fp['2x1cpu']:.1f} |", f"| 1 | 2 | {fp['1x2cpu']:.1f} |", ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "selectmix")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "noisymix-bench-selectmix")
    args = parser.parse_args()
    started = time.perf_counter()
    results_path = args.out.with_suffix(".json")
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"cells": {}}
    defaults = build_config()
    results["meta"] = {"command": f"python benchmarks/selectmix.py --epochs {args.epochs} --width {args.width}",
                       "epochs": args.epochs, "width": args.width,
                       "selectmix_defaults": {k: getattr(defaults, k) for k in ("folds", "fold_epochs", "partners",
                                              "partner_source", "selectmix_label", "alpha", "tau_high")}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start_ray()
    for setting, (noise_type, rate) in SETTINGS.items():
        settings = base(args, args.work / f"data-{setting}", noise_type, rate)
        prepare(build_config(overrides=settings))
        cells = dict(METHODS, **(ABLATIONS if setting == "symmetric40" else {}))
        for name, overrides in cells.items():
            key = f"{setting}/{name}"
            if key in results["cells"] and "error" not in results["cells"][key]:
                continue
            run_dir = args.work / "runs" / key.replace("/", "-").replace(":", "-")
            try:
                results["cells"][key] = run_cell(settings, overrides, run_dir)
            except Exception as exc:  # noqa: BLE001 - a failed cell is reported in the table, the others still run
                results["cells"][key] = {"error": f"{type(exc).__name__}: {exc}"}
            results_path.write_text(json.dumps(results, indent=2))
        if setting == "symmetric40" and "fold_parallelism" not in results:
            results["fold_parallelism"] = {"2x1cpu": fold_stage_seconds(settings, 1.0),
                                           "1x2cpu": fold_stage_seconds(settings, 2.0)}
            results_path.write_text(json.dumps(results, indent=2))
    results["meta"]["total_wall_s"] = time.perf_counter() - started
    results_path.write_text(json.dumps(results, indent=2))
    args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
