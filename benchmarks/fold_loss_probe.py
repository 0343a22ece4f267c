"""Would a noise-robust loss make the folds better detectors? One fold of the memorising regime's fold stage
(issue 21), trained with CE and with two losses built to resist label noise, scored on the TRUE labels of
its held-out samples.

A probe outside the trainer, in one process: the data of fashion_mnist_memorise.yaml (10,000 Fashion-MNIST
training samples, the same noise, the same 90/10 train/val split by seed), fold 0 of the same 5 stratified
folds, the width-32 small CNN, SGD at lr 0.05 with cosine decay over `--epochs`, batch 128, no augmentation
(the regime's base), kept epoch = the one whose held-out predictions agree most with the GIVEN labels (the
fold stage's `fold_select=best`). Images are standardised by the fold's training images' mean and std.
`--subsets` draws other numbers of training samples (60,000: the whole source) and `--labels true` trains the fold
on the true labels of the same samples instead (the clean-fold ceiling; its kept epoch agrees most with them).
- `ce`: cross-entropy (what the folds use);
- `gce`: generalised cross-entropy (1 - p_y^q) / q, q = 0.7 (Zhang & Sabuncu, NeurIPS 2018);
- `sce`: symmetric cross-entropy 0.1 CE + 1.0 RCE, log 0 clipped at -4 (Wang et al., ICCV 2019).
True labels are read here to score, never to train.

    python benchmarks/fold_loss_probe.py --settings asymmetric40 --seeds 0 1 2 [--epochs 8] [--losses ce] \
        [--subsets 10000 60000] [--labels given true] [--out benchmarks/results/fold_loss_probe]
    python benchmarks/fold_loss_probe.py --merge A.json B.json --out OUT   # one report of earlier runs
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from noisymix.distributed.engine import TrainSection, build_optimizer
from noisymix.distributed.models import create_model
from noisymix.launch import noise
from noisymix.launch.prepare import _split_val, _subsample
from noisymix.launch.sources import read_idx
from noisymix.selection.crossval import stratified_folds

SETTINGS = {"symmetric40": ("symmetric", 0.4), "asymmetric40": ("asymmetric", 0.4), "pairflip40": ("pairflip", 0.4),
            "instance40": ("instance", 0.4), "symmetric_incl80": ("symmetric_incl", 0.8)}
SUBSET, FOLDS, BATCH, LR, WIDTH = 10000, 5, 128, 0.05, 32
GCE_Q, SCE_ALPHA, SCE_BETA, SCE_LOG_ZERO = 0.7, 0.1, 1.0, -4.0


def generalised_ce(logits: torch.Tensor, labels: torch.Tensor, q: float = GCE_Q) -> torch.Tensor:
    """(1 - p_y^q) / q, averaged: CE as q -> 0, mean absolute error at q = 1."""
    p_y = logits.softmax(dim=1).gather(1, labels[:, None]).squeeze(1)
    return ((1.0 - p_y.clamp_min(1e-7) ** q) / q).mean()


def symmetric_ce(logits: torch.Tensor, labels: torch.Tensor, alpha: float = SCE_ALPHA, beta: float = SCE_BETA,
                 log_zero: float = SCE_LOG_ZERO) -> torch.Tensor:
    """alpha CE + beta reverse CE, where reverse CE = -sum_c p_c log onehot_c with log 0 taken as `log_zero`:
    -log_zero (1 - p_y)."""
    reverse = -log_zero * (1.0 - logits.softmax(dim=1).gather(1, labels[:, None]).squeeze(1))
    return alpha * F.cross_entropy(logits, labels) + beta * reverse.mean()


LOSSES = {"ce": F.cross_entropy, "gce": generalised_ce, "sce": symmetric_ce}


def fold_data(setting: str, seed: int, source: Path, subset: int = SUBSET, labels: str = "given"):
    """(images as float tensors, labels to train on, true labels, fold-0 train positions, held positions) of the
    regime's training split, prepared as `noisymix prepare` does (`subset` of the source's training samples, all
    of them when it is their number). The folds train on the given labels, or (labels="true") on the true ones:
    the clean-fold ceiling, an evaluation-only reading."""
    noise_type, rate = SETTINGS[setting]
    data = read_idx(source)
    if subset != len(data.train_labels):
        data = _subsample(data, subset, seed)
    given = noise.apply_noise(data.train_labels, data.num_classes, noise_type, rate, seed,
                              images=data.train_images, dataset=data.name)
    train, _ = _split_val(given, 0.1, seed)
    images = torch.from_numpy(data.train_images[train].astype(np.float32) / 255.0)
    images = images.reshape(len(train), -1, *data.train_images.shape[1:3])
    fit, held = stratified_folds(given[train], FOLDS, seed)[0]
    true = torch.from_numpy(data.train_labels[train]).long()
    return images, true if labels == "true" else torch.from_numpy(given[train]).long(), true, fit, held


def train_fold(data: tuple, loss: str, seed: int, epochs: int, score) -> list[dict]:
    """Train fold 0 of `data` (fold_data's) with `loss` as the fold stage does; after every epoch, in eval mode
    and without gradient, score(model, standardised images) gives that epoch's entry of the returned list."""
    images, given, _, fit, _ = data
    mean, std = images[fit].mean(), images[fit].std()
    images = (images - mean) / std
    torch.manual_seed(seed)
    model = create_model("small_cnn", images.shape[1], 10, images.shape[-1], width=WIDTH)
    optimizer = build_optimizer(model, LR, TrainSection.momentum, TrainSection.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    order_rng = np.random.default_rng(seed)
    per_epoch = []
    for _ in range(epochs):
        model.train()
        order = order_rng.permutation(fit)
        for start in range(0, len(order), BATCH):
            rows = torch.from_numpy(order[start:start + BATCH])
            value = LOSSES[loss](model(images[rows]), given[rows])
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
        scheduler.step()
        model.eval()
        with torch.no_grad():
            per_epoch.append(score(model, images))
    return per_epoch


def scored_fold(data: tuple, loss: str, seed: int, epochs: int, score) -> dict:
    """train_fold's scores per epoch, the kept epoch (1-based) by the fold stage's `fold_select=best` (the epoch
    whose held-out predictions agree most with the given labels; the later one on a tie) and the seconds taken."""
    started = time.perf_counter()
    per_epoch = train_fold(data, loss, seed, epochs, score)
    kept = max(range(epochs), key=lambda e: (per_epoch[e]["agree_given"], e))
    return {"epochs": epochs, "kept_epoch": kept + 1, "per_epoch": per_epoch, "seconds": time.perf_counter() - started}


def probe(setting: str, loss: str, seed: int, epochs: int, data: tuple) -> dict:
    """Train fold 0 of `data` (fold_data's, read once per seed) with `loss`; the held-out accuracy on true
    labels at the kept epoch and the last."""
    _, given, true, _, held = data

    def score(model, images):
        predicted = model(images[held]).argmax(dim=1)
        return {"agree_given": float((predicted == given[held]).float().mean()),
                "acc_true": float((predicted == true[held]).float().mean())}

    run = scored_fold(data, loss, seed, epochs, score)
    return {"setting": setting, "loss": loss, "seed": seed, "fold_train": len(data[3]), **run,
            "acc_true_kept": run["per_epoch"][run["kept_epoch"] - 1]["acc_true"],
            "acc_true_last": run["per_epoch"][-1]["acc_true"]}


def report_head(title: str, command: str, doc: str, columns: list[str]) -> list[str]:
    """A probe report's first lines: its title, its command with the description of its docstring (`doc`'s second
    paragraph), and the header of its table."""
    return [f"# {title}", "", f"Command: `{command}`. {doc.split(chr(10) + chr(10))[1].strip()}", "",
            "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def grouped(runs: list[dict], key) -> dict:
    """The runs by key(run), in the order each key first appears."""
    groups: dict = {}
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    return groups


def markdown(result: dict) -> str:
    title = "One fold of the fold stage by loss, training samples and labels: held-out accuracy on the true labels"
    lines = report_head(title, result["command"], __doc__, ["setting", "loss", "fold trains on", "seeds", "kept epochs",
                                                           "acc on true labels, kept epoch", "last epoch", "s per run"])
    for (setting, loss, size, labels), rows in grouped(
            result["runs"], lambda r: (r["setting"], r["loss"], r["fold_train"], r["labels"])).items():
        kept = [r["acc_true_kept"] for r in rows]
        last = [r["acc_true_last"] for r in rows]
        spread = (lambda v: f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else "")
        lines.append(f"| {setting} | {loss} | {size:,} {labels} labels | {','.join(str(r['seed']) for r in rows)} | "
                     f"{','.join(str(r['kept_epoch']) for r in rows)} | {statistics.mean(kept):.3f}{spread(kept)} "
                     f"({', '.join(f'{v:.3f}' for v in kept)}) | {statistics.mean(last):.3f}{spread(last)} | "
                     f"{statistics.median(r['seconds'] for r in rows):.0f} |")
    return "\n".join(lines) + "\n"


def fold_arguments(parser: argparse.ArgumentParser, out: str) -> argparse.Namespace:
    """The arguments every fold probe takes (seeds, epochs, source, threads, out); sets torch's threads."""
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--source", type=Path, default=Path("../shared/data/fashion-mnist"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results") / out)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def write_report(out: Path, result: dict, markdown) -> None:
    """The probe's runs as out.json and its table as out.md (printed too)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", choices=sorted(SETTINGS), nargs="+", default=["asymmetric40"])
    parser.add_argument("--losses", nargs="+", choices=sorted(LOSSES), default=list(LOSSES))
    parser.add_argument("--subsets", type=int, nargs="+", default=[SUBSET],
                        help="training samples drawn from the source before the val split (60000: all of it)")
    parser.add_argument("--labels", choices=["given", "true"], nargs="+", default=["given"],
                        help="what the fold trains on: true = the clean-fold ceiling (evaluation only)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="train nothing: OUT is the runs of these earlier reports (e.g. run side by side), in order")
    args = fold_arguments(parser, "fold_loss_probe")
    if args.merge:
        parts = [json.loads(path.read_text()) for path in args.merge]
        merge = f"python benchmarks/fold_loss_probe.py --merge {' '.join(map(str, args.merge))} --out {args.out}"
        write_report(args.out, {"command": " && ".join([*(part["command"] for part in parts), merge]),
                                "runs": [run for part in parts for run in part["runs"]]}, markdown)
        return
    listed = (lambda values: " ".join(map(str, values)))
    command = (f"python benchmarks/fold_loss_probe.py --settings {listed(args.settings)} --seeds {listed(args.seeds)} "
               f"--losses {listed(args.losses)} --epochs {args.epochs}"
               + (f" --subsets {listed(args.subsets)}" if args.subsets != [SUBSET] else "")
               + (f" --labels {listed(args.labels)}" if args.labels != ["given"] else "")
               + (f" --threads {args.threads}" if args.threads != 1 else "") + f" --out {args.out}")
    runs = []
    for setting, subset, labels, seed in itertools.product(args.settings, args.subsets, args.labels, args.seeds):
        data = fold_data(setting, seed, args.source, subset, labels)
        for loss in args.losses:
            runs.append({**probe(setting, loss, seed, args.epochs, data), "labels": labels})
            print(f"{setting} {loss} {subset} {labels} seed {seed}: kept epoch {runs[-1]['kept_epoch']}, "
                  f"acc on true {runs[-1]['acc_true_kept']:.3f} (last {runs[-1]['acc_true_last']:.3f})", flush=True)
    write_report(args.out, {"command": command, "runs": runs}, markdown)


if __name__ == "__main__":
    main()
