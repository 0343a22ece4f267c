"""What a run tells a person and a script: the live progress lines, summary.json, the closing table."""

from __future__ import annotations

import time


def select_epoch(history: list[dict]) -> dict:
    """The epoch with the best accuracy on the NOISY validation split (the latest of ties); never test accuracy."""
    if not history:
        raise ValueError("no epochs were recorded")
    return max(reversed(history), key=lambda record: record["val_acc"])


def summarize(history: list[dict], config: dict, manifest: dict, wall_time_s: float) -> dict:
    """summary.json: the contract that scripts rely on (keys documented in README)."""
    chosen, last = select_epoch(history), history[-1]
    best_test = max(history, key=lambda record: record["test_acc"])
    return {
        "method": config["method"],
        "dataset": manifest["dataset"],
        "noise_type": manifest["noise"]["type"],
        "noise_rate": manifest["noise"]["rate"],
        "noise_realised_rate": manifest["noise"]["realised_rate"],
        "seed": config["seed"],
        "epochs": len(history),
        "test_acc": chosen["test_acc"],
        "selected_epoch": chosen["epoch"],
        "val_acc_noisy": chosen["val_acc"],
        "test_acc_last": last["test_acc"],
        "test_acc_best_test": best_test["test_acc"],
        "best_test_epoch": best_test["epoch"],
        "wall_time_s": wall_time_s,
        "train_time_s": sum(record["train_time_s"] for record in history),
        "samples_per_s_per_worker": _median([record["samples_per_s_per_worker"] for record in history]),
        "workers": last["workers"],
        "workers_per_epoch": [record["workers"] for record in history],
        "worker_groups": worker_groups(history),
        "peak_rss_mb_per_worker": max(record["peak_rss_mb_per_worker"] for record in history),
    }


def worker_groups(history: list[dict]) -> list[dict]:
    """Each worker group the run had: the epoch it started at and its size. A new group starts with the run,
    after a lost worker, an elastic resize, a resume, or a selection round between training segments."""
    return [{"epoch": record["epoch"], "workers": record["workers"]} for record in history
            if record["epoch"] == 0 or record.get("resumed_from_epoch") == record["epoch"]]


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


class Progress:
    """One line per epoch on the driver: loss, noisy-val and test accuracy, lr, speed, ETA."""

    def __init__(self, epochs: int, log=print):
        self.epochs, self.log, self.started = epochs, log, time.perf_counter()
        self.done = 0

    def epoch(self, record: dict) -> None:
        self.done += 1
        if record["epoch"] > 0 and record.get("resumed_from_epoch") == record["epoch"]:
            self.log(f"worker group started from the epoch {record['epoch']} checkpoint with {record['workers']} "
                     f"worker{'s' * (record['workers'] != 1)}")
        elapsed = time.perf_counter() - self.started
        remaining = self.epochs - record["epoch"] - 1
        eta = elapsed / self.done * remaining
        self.log(f"epoch {record['epoch'] + 1:>3}/{self.epochs}  loss {record['train_loss']:.4f}  "
                 f"val(noisy) {record['val_acc']:.4f}  test {record['test_acc']:.4f}  lr {record['lr']:.4g}  "
                 f"{record['epoch_time_s']:.1f}s  {record['samples_per_s_per_worker']:,.0f} samples/s/worker  "
                 f"ETA {_duration(eta)}")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def closing_table(summaries: list[dict]) -> str:
    """The short table a newcomer reads at the end of `noisymix train`."""
    rows = [("method", "noise", "test acc (val-selected)", "test acc (last)", "noisy-label F1", "run directory")]
    for s in summaries:
        f1 = s.get("detection", {}).get("f1")
        rows.append((s["method"], f"{s['noise_type']} {s['noise_rate']:.0%}", f"{s['test_acc']:.4f}",
                     f"{s['test_acc_last']:.4f}", "-" if f1 is None else f"{f1:.3f}", s["run_dir"]))
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
