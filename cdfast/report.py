"""The report of a comparison grid: paper-style tables, what the numbers say, a verdict (every
method against independent training and DML), how often perturbations won the election,
learning curves and a teacher timeline.

Reads ``<grid out>/results.jsonl`` and ``grid.yaml``; writes ``report.md`` and
PNG plots. Accuracies are test accuracies in percent, mean ± standard error
over seeds, taken at the **last epoch** (the best epoch is shown in a second
table, for comparison with papers that report it). A difference is called clear
when a two-sided Welch t-test rejects "no difference" at the 5 % level: with 3
seeds a side that takes about 2.8 standard errors, with 2 seeds a side 4.3.

The grid's ``report`` section names the methods of the tables (defaults shown)::

    report:
      independent: ind          # Table 2 columns
      dml: dml
      cd: cd
      ablation:                 # Table 4: backbone / +feature loss / +perturbation / +both (null: not run)
        cd: [cd-backbone, cd+feat, cd+perturb, cd]
        dml: [dml, dml+feat, dml+perturb, dml+both]
      timeline: {group: resnet8+resnet32, method: cd}
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any, Iterable, Iterator


from cdfast.safe_write import atomic_write
from cdfast.options import perturbs
from cdfast.train.config import read_yaml_mapping
from cdfast.train.run_folder import GRID_FILE, RESULTS_FILE

DEFAULT_ABLATION = {"cd": ["cd-backbone", "cd+feat", "cd+perturb", "cd"],
                    "dml": ["dml", "dml+feat", "dml+perturb", "dml+both"]}


def _stats(values: list[float]) -> tuple[float, float, int]:
    values = [100 * v for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), sd, len(values)


def _fmt(values: list[float] | None) -> str:
    """mean ± standard error of the mean over seeds (the scale on which differences are judged)."""
    if not values:
        return "—"
    mean, sd, n = _stats(values)
    return f"{mean:.2f} ± {sd / n ** 0.5:.2f}" + ("" if n > 1 else " (1 seed, no SE)")


class Results:
    def __init__(self, records: list[dict[str, Any]], grid_dir: Path | None = None):
        self.records = records
        self.failed: list[dict[str, Any]] = []  # runs that failed (diverged, ...): in no statistic, listed apart
        self.grid_dir = grid_dir
        self.groups = list(dict.fromkeys(r["group"] for r in records))
        self.methods = list(dict.fromkeys(r["method"] for r in records))

    def values(self, group: str, method: str, net: int | None, key: str = "final_acc") -> list[float]:
        """One value per run (seed): network ``net``'s, or the mean over the networks (``net=None``)."""
        return [(statistics.fmean(r[key]) if net is None else r[key][net]) if isinstance(r[key], list) else r[key]
                for r in self.records if r["group"] == group and r["method"] == method]

    def run_dir(self, run: dict[str, Any]) -> Path | None:
        """A run's folder: as recorded where it exists, else at its place in the grid folder, so that a
        report made from elsewhere (the record may be relative to where the grid ran), or of a moved
        grid, still finds it."""
        recorded = Path(run["run_dir"]) if run.get("run_dir") else None
        if recorded is not None and recorded.exists() or self.grid_dir is None:
            return recorded
        return self.grid_dir / run["group"] / run["method"] / f"seed-{run['seed']}"

    def models(self, group: str) -> list[str]:
        return next(r["models"] for r in self.records if r["group"] == group)


def load(grid_dir: Path) -> tuple[Results, dict[str, Any]]:
    path = grid_dir / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {RESULTS_FILE} in {grid_dir}; run `cdfast experiment` first")
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is corrupt at line {e.lineno} ({e.msg}); fix or delete that line, then "
                         "rerun `cdfast experiment` on this folder: it records again every run whose folder "
                         "exists (a record whose folder is gone exists nowhere else)") from None
    failed = [r for r in records if "failed" in r]
    records = [r for r in records if "failed" not in r]
    if not records:
        raise ValueError(f"{path} holds no finished runs yet" + (f" ({len(failed)} failed)" if failed else ""))
    grid = read_yaml_mapping(grid_dir / GRID_FILE, "grid file") if (grid_dir / GRID_FILE).exists() else {}
    res = Results(records, grid_dir)
    res.failed = failed
    return res, (grid.get("report") or {})


def accuracy_table(res: Results, spec: dict[str, Any], key: str) -> list[str]:
    ind, dml, cd = spec.get("independent", "ind"), spec.get("dml", "dml"), spec.get("cd", "cd")
    methods = res.methods
    head = "| group | network | " + " | ".join(methods) + " | Imp-Ind | Imp-DML |"
    lines = [head, "|" + "---|" * (len(methods) + 4)]
    for group in res.groups:
        for i, model in enumerate(res.models(group)):
            cells = [_fmt(res.values(group, m, i, key)) for m in methods]
            imp = []
            for base in (ind, dml):
                a, b = res.values(group, cd, i, key), res.values(group, base, i, key)
                imp.append(f"{_stats(a)[0] - _stats(b)[0]:+.2f}" if a and b else "—")
            lines.append(f"| {group} | net {i + 1}: {model} | " + " | ".join(cells) + " | " + " | ".join(imp) + " |")
    return lines


def _ablation(spec: dict[str, Any]) -> dict[str, list[str | None]]:
    """The ablation rows, each padded to its 4 columns (backbone, + feature loss, + perturbation, + both)."""
    rows = spec.get("ablation", DEFAULT_ABLATION)
    return {name: (list(methods) + [None] * 4)[:4] for name, methods in rows.items()}


def ablation_table(res: Results, spec: dict[str, Any]) -> list[str]:
    group = spec.get("ablation_group", res.groups[0])
    lines = [f"Group {group}, mean of the networks, last epoch:", "",
             "| method | backbone | + feature loss | + perturbation | + both |", "|---|---|---|---|---|"]
    for name, methods in _ablation(spec).items():
        lines.append(f"| {name.upper()} | " + " | ".join(_fmt(res.values(group, m, None) if m else None)
                                                         for m in methods) + " |")
    return lines


# Two-sided 95 % quantiles of Student's t by degrees of freedom; between two rows the lower one (the
# larger quantile) is used, which errs towards "within noise".
_T95 = ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571), (6, 2.447), (7, 2.365), (8, 2.306),
        (9, 2.262), (10, 2.228), (12, 2.179), (15, 2.131), (20, 2.086), (30, 2.042), (60, 2.000), (120, 1.980))


def _t95(df: float) -> float:
    return next((t for d, t in reversed(_T95) if df >= d), _T95[0][1]) if df < float("inf") else 1.960


def _difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a minus mean of b, in points, and its standard error (Welch)."""
    (ma, sa, na), (mb, sb, nb) = _stats(a), _stats(b)
    return ma - mb, (sa * sa / na + sb * sb / nb) ** 0.5


def _verdict(a: list[float], b: list[float]) -> str:
    """Whether mean(a) - mean(b) is clear: a two-sided Welch t-test at the 5 % level (degrees of freedom
    by Welch-Satterthwaite). Each side needs 2 or more runs and some spread between them."""
    (ma, sa, na), (mb, sb, nb) = _stats(a), _stats(b)
    if min(na, nb) < 2:
        return "one seed: no spread to judge by"
    va, vb = sa * sa / na, sb * sb / nb  # the squared standard errors of the two means
    if va + vb == 0:
        return "no spread to judge by"
    df = (va + vb) ** 2 / (va * va / (na - 1) + vb * vb / (nb - 1))
    return "clear" if abs(ma - mb) > _t95(df) * (va + vb) ** 0.5 else "within noise"


def claims(res: Results, spec: dict[str, Any]) -> list[str]:
    """Plain statements computed from the numbers: which of the paper's claims held here.

    Every difference comes with its standard error over seeds; "clear" means a Welch t-test
    rejects "no difference" at 5 %, "within noise" means not.
    """
    ind, dml, cd = spec.get("independent", "ind"), spec.get("dml", "dml"), spec.get("cd", "cd")
    out = []
    for base, label in ((ind, "independent training"), (dml, "DML")):
        wins, clear_wins, clear_losses, details = 0, 0, 0, []
        for group in res.groups:
            for i, model in enumerate(res.models(group)):
                a, b = res.values(group, cd, i), res.values(group, base, i)
                if not (a and b):
                    continue
                diff, se = _difference(a, b)
                wins += diff > 0
                clear = _verdict(a, b) == "clear"
                clear_wins += clear and diff > 0
                clear_losses += clear and diff < 0
                details.append(f"{group} net {i + 1} ({model}) {diff:+.2f} ± {se:.2f}")
        if details:
            out.append(f"- CD vs {label}: CD's mean final accuracy is higher for {wins} of {len(details)} networks, "
                       f"clearly higher (Welch t-test, 5 %) for {clear_wins}, clearly lower for "
                       f"{clear_losses}. Differences in points ± standard error: " + "; ".join(details) + ".")
    group = spec.get("ablation_group", res.groups[0])
    for name, methods in _ablation(spec).items():
        vals = [res.values(group, m, None) if m else [] for m in methods]
        for k, part in ((2, "Perturbation"), (1, "Feature loss"), (3, "Feature loss and perturbation")):
            if vals[0] and vals[k]:
                diff, se = _difference(vals[k], vals[0])
                out.append(f"- {part} in {name.upper()} ({group}, mean of the networks): {diff:+.2f} ± {se:.2f} "
                           f"points over the backbone ({_verdict(vals[k], vals[0])}).")
    return out


def verdict(res: Results, spec: dict[str, Any]) -> list[str]:
    """Every method against independent training and DML, per group: the group's mean accuracy
    (mean over its networks, per run; for a group of different networks each network too, so that
    a gain of one paid by the other shows) and the difference ± standard error over seeds, with the
    training time per image relative to independent training (from each run's median epoch
    images/s, else the runs' seconds; median over seeds); then which configuration, if any, beats
    both clearly (a Welch t-test at 5 %)."""
    ind, dml = spec.get("independent", "ind"), spec.get("dml", "dml")

    # a run's cost: seconds per image from its median epoch's images/s (robust to a few epochs slowed
    # by other load) when every run has them, else every run's whole training time
    speeds = [median_speed(res.run_dir(r), r) for r in res.records]
    costs = [1.0 / v for v in speeds] if all(speeds) else [r.get("train_seconds") for r in res.records]

    def step_time(group: str, method: str) -> float | None:
        """Median over seeds of the runs' costs."""
        times = [c for r, c in zip(res.records, costs) if r["group"] == group and r["method"] == method and c]
        return statistics.median(times) if times else None

    lines = ["| group | networks | method | accuracy | vs independent | vs DML | training time / independent |",
             "|---|---|---|---|---|---|---|"]
    winners, best = [], None
    for group in res.groups:
        base_time = step_time(group, ind)
        models = res.models(group)
        views = [(None, "mean")] + ([(i, f"net {i + 1}: {m}") for i, m in enumerate(models)]
                                    if len(set(models)) > 1 else [])
        for method in res.methods:
            for net, label in views:
                acc = res.values(group, method, net)
                if not acc:
                    continue
                cells, clear_over = [], []
                for base in (ind, dml):
                    other = res.values(group, base, net)
                    if method == base or not other:
                        cells.append("—")
                        continue
                    diff, se = _difference(acc, other)
                    word = _verdict(acc, other)
                    cells.append(f"{diff:+.2f} ± {se:.2f}" + (f" (clearly {'better' if diff > 0 else 'worse'})"
                                                               if word == "clear" else f" ({word})"))
                    clear_over.append(word == "clear" and diff > 0)
                    if base == ind and net is None and method != dml and min(len(acc), len(other)) > 1 \
                            and (best is None or diff > best[2]):
                        best = (group, method, diff, se, word)
                time = step_time(group, method) if net is None else None
                cost = f"{time / base_time:.2f}x" if time and base_time else "—" if net is None else ""
                lines.append(f"| {group} | {label} | {method} | {_fmt(acc)} | {cells[0]} | {cells[1]} | {cost} |")
                if net is None and method not in (ind, dml) and len(clear_over) == 2 and all(clear_over):
                    winners.append(f"{method} ({group})")
    lines.append("")
    if winners:
        lines.append("Beats both independent training and DML clearly: " + ", ".join(winners) + ".")
    else:
        lines.append("No configuration beats both independent training and DML clearly (Welch t-test, 5 %).")
    if best is not None:
        group, method, diff, se, word = best
        lines.append((f"Highest mean against independent training: {method} in {group}, {diff:+.2f} ± {se:.2f} "
                      f"points ({'clearly better' if word == 'clear' else word})." if diff > 0 else
                      f"Every configuration's mean is at or below independent training's; the closest: {method} "
                      f"in {group}, {diff:+.2f} ± {se:.2f} points."))
    lines.append(("Training time: per image, from the median epoch's images/s of each run" if all(speeds) else
                  "Training time: each run's wall-clock training time") +
                 " (median over seeds); measured on the machine that ran the grid, so comparable only between runs "
                 "made alike.")
    return lines


def median_speed(run_dir: Path | None, record: dict[str, Any] | None = None) -> float | None:
    """The median over a run's epochs of its training images/s: from its epochs.jsonl, else as its
    record kept it (None without either)."""
    path = run_dir / "epochs.jsonl" if run_dir is not None else None
    if path is None or not path.is_file():
        return (record or {}).get("images_per_second")
    speeds = []
    for line in path.read_text().splitlines():
        try:
            speeds.append(float(json.loads(line)["images_per_second"]))
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line or an older record: skip it
    return statistics.median(speeds) if speeds else None


def iter_steps(run_dir: Path | None) -> Iterator[dict[str, str]]:
    """A run's steps.csv rows, one at a time (an ImageNet run has hundreds of thousands); none without it."""
    path = run_dir / "steps.csv" if run_dir is not None else None
    if path is None or not path.exists():
        return
    with open(path, newline="") as f:
        yield from csv.DictReader(f)


def perturbation_counts(steps: Iterable[dict[str, str]], networks: int) -> dict[str, list[float]]:
    """Per perturbation op over a run's steps.csv rows: [perturbed steps, steps the perturbed network was
    elected, sum of its CE, sum of the other networks' mean CE]."""
    by_op: dict[str, list[float]] = {}
    for step in steps:
        p = int(step["perturbed"])
        if p < 0:
            continue
        ces = [float(step[f"ce_{k}"]) for k in range(networks)]
        counts = by_op.setdefault(step["perturbation"], [0, 0, 0.0, 0.0])
        counts[0] += 1
        counts[1] += int(step["teacher"]) == p
        counts[2] += ces[p]
        counts[3] += statistics.fmean(c for k, c in enumerate(ces) if k != p)  # a group has 2 or more networks
    return by_op


def perturbation_table(res: Results) -> list[str]:
    """How often the perturbed network won the election, per group and method (the mechanism of the paper:
    a perturbation that helps wins and spreads; one that hurts loses), and how much harder its batch was:
    its cross-entropy against the other networks' on their clean batches, per op. From the runs' steps.csv
    files, else the counts their records kept."""
    rows, ops, missing = [], [], []
    for group in res.groups:
        for method in res.methods:
            by_op: dict[str, list[float]] = {}  # op: [steps, elected, CE of the perturbed, mean CE of the others]
            for run in (r for r in res.records if r["group"] == group and r["method"] == method):
                if "perturbation_counts" in run:  # counted when the grid recorded the run
                    counts = run["perturbation_counts"]
                else:  # a record from before the counts: its folder's steps.csv, where it is still there
                    counts = perturbation_counts(iter_steps(res.run_dir(run)), len(run["models"])) or None
                if counts is None:
                    config = run.get("config") or {}
                    if perturbs(config.get("perturb"), config.get("mode")):
                        missing.append(f"{group} / {method} / seed {run['seed']}")
                    continue
                for op, c in counts.items():
                    total = by_op.setdefault(op, [0, 0, 0.0, 0.0])
                    for i in range(4):
                        total[i] += c[i]
            if by_op:
                ops += [op for op in by_op if op not in ops]
                rows.append((group, method, by_op))
    uncounted = [f"Not counted: {len(missing)} perturbed run(s) whose steps.csv is gone (a folder deleted after "
                 f"its run, from a grid older than the counts in results.jsonl): {', '.join(missing)}."] if missing else []
    if not rows:
        return uncounted
    head = "| group | method | perturbed steps | all ops | " + " | ".join(ops) + " |"
    rule = "|" + "---|" * (4 + len(ops))
    lines = ["Share of the perturbed steps in which the perturbed network was elected:", "", head, rule]
    for group, method, by_op in rows:
        steps, won = sum(c[0] for c in by_op.values()), sum(c[1] for c in by_op.values())
        cells = [f"{100 * by_op[op][1] / by_op[op][0]:.1f}%" if op in by_op else "—" for op in ops]
        lines.append(f"| {group} | {method} | {steps} | {100 * won / steps:.1f}% | " + " | ".join(cells) + " |")
    lines += ["", "Mean cross-entropy of the perturbed network on its perturbed batch / of the other networks on "
              "the clean batch, same steps (for a mixed-label batch the perturbed CE includes the label entropy):",
              "", head, rule]
    for group, method, by_op in rows:
        steps = sum(c[0] for c in by_op.values())
        total = f"{sum(c[2] for c in by_op.values()) / steps:.2f} / {sum(c[3] for c in by_op.values()) / steps:.2f}"
        cells = [f"{by_op[op][2] / by_op[op][0]:.2f} / {by_op[op][3] / by_op[op][0]:.2f}" if op in by_op else "—"
                 for op in ops]
        lines.append(f"| {group} | {method} | {steps} | {total} | " + " | ".join(cells) + " |")
    return lines + ([""] + uncounted if uncounted else [])


def plot_curves(res: Results, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for group in res.groups:
        n = len(res.models(group))
        fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.6), squeeze=False)
        for i, ax in enumerate(axes[0]):
            for method in res.methods:
                curves = [r["curves"] for r in res.records if r["group"] == group and r["method"] == method]
                if not curves:
                    continue
                length = min(len(c) for c in curves)
                mean = [statistics.fmean(100 * c[e][i] for c in curves) for e in range(length)]
                ax.plot(range(1, length + 1), mean, marker=".", label=method)
            ax.set_title(f"{group}: net {i + 1} ({res.models(group)[i]})")
            ax.set_xlabel("epoch")
            ax.set_ylabel("test accuracy (%), mean over seeds")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        path = out / f"curves-{group}.png"
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)
        written.append(path)
    return written


def plot_timeline(res: Results, spec: dict[str, Any], out: Path) -> tuple[Path, str] | None:
    """The teacher per step of one run of a heterogeneous pair (like the paper's Fig. 3a): plot and summary."""
    from cdfast.train.plots import plot_run

    timeline = spec.get("timeline") or {}
    group = timeline.get("group") or next((g for g in res.groups if len(set(res.models(g))) > 1), None)
    method = timeline.get("method", spec.get("cd", "cd"))
    for run in (r for r in res.records if r["group"] == group and r["method"] == method):
        folder = res.run_dir(run)
        teachers = [int(step["teacher"]) for step in iter_steps(folder)]
        if teachers:  # the first run whose steps.csv is there
            break
    else:
        return None
    plot_run(folder, run["models"])
    target = out / f"teacher-timeline-{group}-{method}.png"
    atomic_write(target, (folder / "teacher_timeline.png").read_bytes())
    switches = sum(a != b for a, b in zip(teachers, teachers[1:]))
    share = [teachers.count(i) / len(teachers) for i in range(len(run["models"]))]
    text = (f"{group} / {method} / seed {run['seed']}: {switches} teacher switches in {len(teachers)} steps; "
            "teacher share " + ", ".join(f"{m} {100 * s:.1f}%" for m, s in zip(run["models"], share)))
    return target, text


def write_report(grid_dir: str | Path, out: str | Path | None = None, title: str | None = None) -> Path:
    grid_dir = Path(grid_dir)
    out = Path(out) if out else grid_dir
    out.mkdir(parents=True, exist_ok=True)
    res, spec = load(grid_dir)
    seeds = sorted({r["seed"] for r in res.records})
    example = res.records[0]["config"]
    recal = example.get("bn_recalibration")
    lines = [f"# {title or 'Competitive Distillation: comparison grid'}", "",
             f"Data: {example['data']}; {example['epochs']} epochs, batch {example['batch_size']}, lr {example['lr']} "
             f"({example['schedule']}), seeds {seeds}; {len(res.records)} finished runs. Test accuracy in %, "
             "mean ± standard error over seeds (sample SD / sqrt(seeds)). **Last epoch** reported (best epoch in the "
             "second table)" + (f", evaluated after recomputing BatchNorm statistics on {recal} clean training batches"
                                if recal else ", evaluated with BatchNorm's running statistics") + ". A difference "
             "is called clear when a two-sided Welch t-test rejects no difference at 5 % (about 2.8 standard "
             "errors with 3 seeds a side, 4.3 with 2).",
             ""]
    if res.failed:
        lines += ["**Failed runs** (in no table below; a diverged run is itself a result):", ""]
        lines += [f"- {r['group']} / {r['method']} / seed {r['seed']}, after {r.get('epochs_done', '?')} epoch(s): "
                  f"{(r['failed'].splitlines() or ['(no reason recorded)'])[0][:300]}" for r in res.failed]
        lines += [""]
    lines += ["## Accuracy (like the paper's Table 2), last epoch", ""]
    lines += accuracy_table(res, spec, "final_acc")
    lines += ["", "## Accuracy, best epoch (for comparison only)", ""]
    lines += accuracy_table(res, spec, "best_acc")
    lines += ["", "## Ablation (like the paper's Table 4)", ""]
    lines += ablation_table(res, spec)
    lines += ["", "## What the numbers say", ""]
    lines += claims(res, spec)
    lines += ["", "## Verdict: every method against independent training and DML", "",
              "Final accuracy averaged over a group's networks in each run (and, for a group of different "
              "networks, each network alone); differences in points ± standard error over seeds.", ""]
    lines += verdict(res, spec)
    perturbations = perturbation_table(res)
    if perturbations:
        lines += ["", "## Did perturbations win the election?", "",
                  "The seeds pooled, overall and per perturbation op. In independent training the election is "
                  "recorded but used by nobody: there it says which network would have been the teacher.",
                  ""] + perturbations
    lines += ["", "## Learning curves", ""]
    try:
        lines += [f"![{p.stem}]({p.name})" for p in plot_curves(res, out)]
        timeline = plot_timeline(res, spec, out)
    except ImportError:
        lines += ["(No plots: matplotlib is not installed; `pip install 'cdfast[viz]'` and run the report again.)"]
        timeline = None
    if timeline is not None:
        image, text = timeline
        lines += ["", "## Teacher timeline of a heterogeneous pair (like the paper's Fig. 3a)", "",
                  text + ".", "", f"![teacher timeline]({image.name})"]
    path = out / "report.md"
    atomic_write(path, "\n".join(lines) + "\n")
    return path
