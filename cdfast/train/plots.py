"""PNG plots of a run, drawn from its record files (so they can be redrawn any time)."""

from __future__ import annotations

import csv
from pathlib import Path

from cdfast.safe_write import atomic_write
from cdfast.train.run_folder import STEPS_FILE, read_epochs


def plot_run(out: Path, names: list[str]) -> list[Path]:
    """Write ``accuracy.png`` (test accuracy per network per epoch) and ``teacher_timeline.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    epochs = read_epochs(out)
    if epochs:
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = [e["epoch"] for e in epochs]
        for i, name in enumerate(names):
            ax.plot(xs, [100 * e["test_acc"][i] for e in epochs], marker="o", label=f"net {i}: {name}")
        ax.plot(xs, [100 * e["ensemble_acc"] for e in epochs], linestyle="--", color="black", label="ensemble")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write(out / "accuracy.png", lambda f: fig.savefig(f, format="png", dpi=120))
        plt.close(fig)
        written.append(out / "accuracy.png")

    steps_path = out / STEPS_FILE
    if steps_path.exists():
        with open(steps_path, newline="") as f:
            rows = list(csv.DictReader(f))
        if rows:
            steps = [int(r["step"]) for r in rows]
            teacher = [int(r["teacher"]) for r in rows]
            n = len(names)
            window = max(1, len(rows) // 50)
            fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5), sharex=True,
                                              gridspec_kw={"height_ratios": [1, 2]})
            # one column per step, coloured by the teacher's index: switches show as stripes
            cmap = matplotlib.colors.ListedColormap([f"C{i % 10}" for i in range(n)])
            top.imshow([teacher], aspect="auto", cmap=cmap, vmin=-0.5, vmax=n - 0.5, interpolation="nearest",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, 0, 1))
            top.set_yticks([])
            top.set_ylabel("teacher")
            top.set_title("teacher per step (colour = network)")
            for i, name in enumerate(names):
                share = [sum(t == i for t in teacher[max(0, k - window + 1):k + 1]) / min(window, k + 1)
                         for k in range(len(teacher))]
                bottom.plot(steps, share, label=f"net {i}: {name}")
            bottom.set_ylabel(f"teacher share\n(last {window} logged steps)")
            bottom.set_xlabel("step")
            bottom.set_ylim(-0.02, 1.02)
            bottom.legend()
            bottom.grid(alpha=0.3)
            fig.tight_layout()
            atomic_write(out / "teacher_timeline.png", lambda f: fig.savefig(f, format="png", dpi=120))
            plt.close(fig)
            written.append(out / "teacher_timeline.png")
    return written
