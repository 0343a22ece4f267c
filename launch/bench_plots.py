"""The benchmark report's PNGs (matplotlib, Agg): accuracy vs noise rate, per-epoch curves, detector PR curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from noisymix.launch.bench_tables import mean_std, summary_rows  # noqa: E402


def _colour(results: dict, method: str):
    """One colour per method across every panel and plot."""
    return plt.get_cmap("tab10")(results["methods"].index(method) % 10) if method in results["methods"] else "black"


def accuracy_vs_noise(results: dict, path: Path) -> Path | None:
    """Headline test accuracy (mean, std over seeds) against noise rate, one panel per noise type."""
    rows = [r for r in summary_rows(results) if r.get("headline")]
    if not rows:
        return None
    rate = {name: (s["noise_type"], s["noise_rate"]) for name, s in results["settings"].items()}
    types = sorted({rate[r["setting"]][0] for r in rows})
    clean = mean_std([c["summary"]["test_acc"] for c in results["cells"].values()
                      if c["group"] == "clean" and c["status"] == "done"])
    fig, axes = plt.subplots(1, len(types), figsize=(4.2 * len(types), 3.6), squeeze=False, sharey=True)
    for ax, noise_type in zip(axes[0], types):
        for method in results["methods"]:
            points = sorted((rate[r["setting"]][1], *r["headline"]) for r in rows
                            if r["method"] == method and rate[r["setting"]][0] == noise_type)
            if points:
                x, y, err = zip(*points)
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method, color=_colour(results, method))
        if clean:
            ax.axhline(clean[0], color="black", linestyle="--", linewidth=1, label="clean bound")
        ax.set(title=noise_type, xlabel="noise rate")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (noisy-val selected)")
    axes[0][-1].legend(fontsize=7)
    return _save(fig, path)


def epoch_curves(results: dict, path: Path) -> Path | None:
    """Test and noisy-validation accuracy per epoch for every method of the chosen setting and seed."""
    curve = results["curves"]
    cells = [c for c in results["cells"].values() if c["group"] == "matrix" and c["status"] == "done"
             and c["setting"] == curve["setting"] and c["seed"] == curve["seed"]]
    if not cells:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for cell in cells:
        epochs = [r["epoch"] + 1 for r in cell["records"]]
        for ax, key in zip(axes, ("test_acc", "val_acc")):
            ax.plot(epochs, [r[key] for r in cell["records"]], marker=".", label=cell["method"],
                    color=_colour(results, cell["method"]))
    axes[0].set(title=f"test accuracy, {curve['setting']} seed {curve['seed']}", xlabel="epoch", ylabel="accuracy")
    axes[1].set(title="noisy-validation accuracy", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    return _save(fig, path)


def detector_pr(results: dict, path: Path) -> Path | None:
    """Precision-recall of each method's noisy-label score at the chosen setting and seed."""
    curve = results["curves"]
    curves = [c for c in results["cells"].values() if c["group"] == "matrix" and c["status"] == "done"
              and c["setting"] == curve["setting"] and c["seed"] == curve["seed"] and c.get("detector_curve")]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    for cell in curves:
        d = cell["detector_curve"]
        ax.plot(d["recall"], d["precision"], label=f"{cell['method']} (AP {d['average_precision']:.3f})",
                color=_colour(results, cell["method"]))
    ax.set(title=f"noisy-label detection, {curve['setting']} seed {curve['seed']}", xlabel="recall",
           ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(results: dict, out: Path) -> list[Path]:
    name = results["name"]
    made = [accuracy_vs_noise(results, out / f"{name}_accuracy_vs_noise.png"),
            epoch_curves(results, out / f"{name}_curves.png"),
            detector_pr(results, out / f"{name}_detectors_pr.png")]
    return [path for path in made if path is not None]
