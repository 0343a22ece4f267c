"""Training-step cost of each method's batch rule over CE's, measured side by side in one process.

The issues' step targets (MixNN step <= 1.3x a CE step) compare two runs; on a shared 2-core machine
two runs minutes apart differ by more than the effect. Here every method steps its own copy of the
same model on the same real Fashion-MNIST batches, the methods interleave in a shuffled order within
each repetition, and the reported ratio is the median over repetitions of (method step / CE step)
taken within one repetition. Batches come from decoded arrays (the shard decoding every method
shares is left out), so the ratio isolates the method: its batch rule, partner/neighbour fetch by id,
and the soft-target step.

    python benchmarks/step_cost.py [--widths 16 32] [--reps 15] [--steps 10]

Writes benchmarks/results/step_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from noisymix.distributed.engine import InputTransform, build_optimizer, train_step
from noisymix.distributed.models import create_model
from noisymix.distributed.sample_state import SampleState
from noisymix.launch.noise import symmetric
from noisymix.launch.sources import SourceData, read_idx
from noisymix.mixing.method import BatchContext, method_class
from noisymix.mixing.soft_targets import TargetCodec
from noisymix.selection.mismatch import build_mixing_table

ROOT = Path(__file__).resolve().parents[1]
FASHION = ROOT.parent / "shared" / "data" / "fashion-mnist"
NUM_SAMPLES, BATCH, CLASSES = 9000, 128, 10


def planted_state(labels: np.ndarray, true: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, SampleState]:
    """Out-of-fold probabilities and a MixNN state shaped like a real run's: right for 85% of samples,
    clean probability high where the label is right, neighbours of the same true class."""
    n = len(labels)
    guess = np.where(rng.random(n) < 0.85, true, rng.integers(0, CLASSES, n))
    probs = np.full((n, CLASSES), 0.02, np.float32)
    probs[np.arange(n), guess] = 1 - 0.02 * (CLASSES - 1)
    by_class = [np.flatnonzero(true == c) for c in range(CLASSES)]
    state = SampleState(n, TargetCodec(CLASSES))
    state.fill(torch.from_numpy(labels), torch.from_numpy(probs.copy()),
               torch.from_numpy(np.where(labels == true, 0.9, 0.1).astype(np.float32)),
               neighbours=torch.from_numpy(np.stack([rng.choice(by_class[c], 3) for c in true])),
               embeddings=torch.nn.functional.normalize(torch.randn(n, 64) + 3 * torch.eye(CLASSES, 64)[true], dim=1))
    return probs, state


def batch_rules(labels, true, images, transform, rng) -> dict:
    """Each method's batch rule, made by its method object from its knobs, over the planted state."""
    probs, state = planted_state(labels, true, rng)
    context = BatchContext(CLASSES, table=build_mixing_table(probs, labels), state=state,
                           fetch_inputs=lambda ids, fetch_rng: transform(images[ids], torch.device("cpu"), fetch_rng))

    def rule(name, phase="", **knobs):
        cls = method_class(name)
        made = cls(cls.Config.from_values(knobs)).batch_rule(context)
        made.phase = phase
        return made

    return {"ce": rule("ce"), "mixup": rule("mixup"), "gmm_select": rule("gmm_select", "select"),
            "selectmix (buffer)": rule("selectmix", partner_source="buffer"),
            "selectmix (global)": rule("selectmix", partner_source="global"),
            "selectmix (batch)": rule("selectmix", partner_source="batch"),
            "mixnn (global, K=1)": rule("mixnn", "neighbours"),
            "mixnn (batch, K=1)": rule("mixnn", "neighbours", neighbour_source="batch"),
            "mixnn (global, K=3)": rule("mixnn", "neighbours", knn=3),
            "mixnn (mixup phase)": rule("mixnn", "mixup")}


def time_steps(model, optimizer, rule, batches, transform, rng) -> float:
    """Seconds per step over `batches`: augment, batch rule, forward, backward, optimizer step."""
    started = time.perf_counter()
    for ids, x_u8, y in batches:
        x = transform(x_u8, torch.device("cpu"), rng)
        x, targets = rule.batch(torch.from_numpy(ids), x, torch.from_numpy(y), rng)
        train_step(model, optimizer, x, targets)
    return (time.perf_counter() - started) / len(batches)


def measure(source: SourceData, width: int, augment: bool, reps: int, steps: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    keep = rng.permutation(len(source.train_labels))[:NUM_SAMPLES]
    images, true = source.train_images[keep], source.train_labels[keep].astype(np.int64)
    labels = symmetric(true, CLASSES, 0.4, seed).astype(np.int64)
    transform = InputTransform((0.286,), (0.353,), 2 if augment else 0, augment)
    rules = batch_rules(labels, true, images, transform, rng)
    torch.manual_seed(seed)
    base = create_model("small_cnn", 1, CLASSES, images.shape[1], width)
    # The same CE step with the model in the NCHW layout create_model no longer uses: the layout's gain.
    rules["ce (NCHW weights)"] = rules["ce"]
    models = {name: copy.deepcopy(base) for name in rules}
    models["ce (NCHW weights)"] = models["ce (NCHW weights)"].to(memory_format=torch.contiguous_format)
    optimizers = {name: build_optimizer(m, 0.05, 0.9, 5e-4) for name, m in models.items()}
    order = rng.permutation(NUM_SAMPLES)
    seconds = {name: [] for name in rules}
    for rep in range(-1, reps):  # rep -1 warms up every model and allocator
        start = (rep + 1) * steps * BATCH % (NUM_SAMPLES - steps * BATCH)
        batches = [(ids, images[ids], labels[ids]) for ids in
                   (order[start + s * BATCH:start + (s + 1) * BATCH] for s in range(steps))]
        for name in rng.permutation(list(rules)):
            elapsed = time_steps(models[name], optimizers[name], rules[name], batches, transform,
                                 np.random.default_rng([seed, rep + 1]))
            if rep >= 0:
                seconds[name].append(elapsed)
    ce = seconds["ce"]
    return {name: {"median_step_ms": 1000 * statistics.median(s),
                   "ratio_vs_ce": statistics.median(a / b for a, b in zip(s, ce)),
                   "ratio_iqr": _iqr([a / b for a, b in zip(s, ce)])} for name, s in seconds.items()}


def _iqr(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def write_report(results: dict, args, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_cost.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Step cost of each method over CE, side by side", "",
             f"Command: `python benchmarks/step_cost.py --widths {' '.join(map(str, args.widths))} --reps {args.reps} "
             f"--steps {args.steps}`. Machine: {results['machine']}, torch {results['torch']}, "
             f"{results['threads']} torch threads.", "",
             f"Real Fashion-MNIST, {NUM_SAMPLES} samples at 40% symmetric noise, batch {BATCH}, small CNN, SGD. "
             "Each method steps its own copy of one model on the same batches; methods interleave in a shuffled "
             f"order in each of {args.reps} repetitions of {args.steps} steps. Ratio = median over repetitions of "
             "(method s/step) / (CE s/step) within the repetition, with its interquartile range. Shard decoding, "
             "shared by all methods, is left out. Planted selection state: SelectMix flags ~45% of samples; "
             "MixNN neighbours are ids of the same true class, their images fetched by id from the array.", ""]
    for setting, table in results["settings"].items():
        lines += [f"## {setting}", "", "| method | median ms/step | step vs CE | IQR of the ratio |", "|---|---|---|---|"]
        for name, row in table.items():
            lines.append(f"| {name} | {row['median_step_ms']:.1f} | {row['ratio_vs_ce']:.2f}x | "
                         f"{row['ratio_iqr'][0]:.2f}-{row['ratio_iqr'][1]:.2f} |")
        lines.append("")
    (out / "step_cost.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = read_idx(FASHION)
    results = {"machine": platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": args.threads, "settings": {}}
    for width in args.widths:
        for augment in (False, True):
            setting = f"width {width}, {'crop 2 + flip' if augment else 'no augmentation'}"
            results["settings"][setting] = measure(source, width, augment, args.reps, args.steps)
            print(setting, json.dumps({k: round(v["ratio_vs_ce"], 2) for k, v in results["settings"][setting].items()}),
                  flush=True)
    write_report(results, args, args.out)


if __name__ == "__main__":
    main()
