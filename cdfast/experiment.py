"""Comparison grids: methods x ablations x groups x seeds from one YAML file, resumable.

A grid file holds

    base:    TrainConfig settings shared by every run (data, epochs, lr, ...)
    groups:  name -> list of models, or name -> {models: [...], methods: [...]} to run
             only some of the methods on that group (an expensive group, say)
    methods: name -> TrainConfig overrides (mode, teachers, feature_loss, perturb, ...)
    seeds:   [0, 1, 2]
    report:  which methods fill the paper-style tables (see cdfast.report)

Every (group, method, seed) run lives in ``<out>/<group>/<method>/seed-<n>/``
as an ordinary cdfast run folder. Running the grid again skips finished runs
and resumes interrupted ones from their checkpoints, so a grid can be stopped
at any time; a grid may also grow (seeds, groups, methods) in the same folder,
as long as what its finished runs were trained with stays the same.
``<out>/results.jsonl`` (one record per finished run) is rebuilt from the run
folders after every run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cdfast.train.checkpoint import write_text_atomic
from cdfast.train.config import TrainConfig, read_yaml_mapping
from cdfast.train.metrics import read_epochs

RESULTS_FILE = "results.jsonl"
GRID_FILE = "grid.yaml"


@dataclass
class Grid:
    base: dict[str, Any]
    groups: dict[str, list[str]]
    methods: dict[str, dict[str, Any]]
    seeds: list[int]
    report: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Grid":
        raw = read_yaml_mapping(path, "grid file")
        missing = [k for k in ("groups", "methods", "seeds") if k not in raw]
        if missing:
            raise ValueError(f"grid file {path} lacks {missing}; it needs base, groups, methods and seeds")
        unknown = sorted(set(raw) - {"base", "groups", "methods", "seeds", "report"})
        if unknown:
            raise ValueError(f"grid file {path} has unknown keys {unknown}")
        grid = cls(base=raw.get("base") or {}, groups=raw["groups"], methods=raw["methods"],
                   seeds=list(raw["seeds"]), report=raw.get("report") or {})
        grid.validate()
        return grid

    def config(self, group: str, method: str, seed: int, out: Path) -> TrainConfig:
        values = {k.replace("-", "_"): v for k, v in self.base.items()}
        values.update({k.replace("-", "_"): v for k, v in (self.methods[method] or {}).items()})
        values.update(models=self.models(group), seed=seed, out=str(run_dir(out, group, method, seed)))
        return TrainConfig.from_dict(values)

    def models(self, group: str) -> list[str]:
        spec = self.groups[group]
        return list(spec["models"] if isinstance(spec, dict) else spec)

    def methods_of(self, group: str) -> list[str]:
        """The methods run on ``group``: all of them unless the group lists its own."""
        spec = self.groups[group]
        return list(spec.get("methods") or self.methods) if isinstance(spec, dict) else list(self.methods)

    def validate(self) -> None:
        if not self.groups or not self.methods or not self.seeds:
            raise ValueError("a grid needs at least one group, one method and one seed")
        for group, spec in self.groups.items():
            if isinstance(spec, dict):
                unknown = sorted(set(spec) - {"models", "methods"})
                if unknown or "models" not in spec:
                    raise ValueError(f"group {group!r}: a mapping needs 'models' (and may have 'methods'); "
                                     f"got keys {sorted(spec)}")
                missing = [m for m in spec.get("methods") or [] if m not in self.methods]
                if missing:
                    raise ValueError(f"group {group!r} lists methods {missing} that the grid's 'methods' "
                                     f"does not define (defined: {list(self.methods)})")
            for method in self.methods_of(group):
                self.config(group, method, self.seeds[0], Path(".")).validate()

    def runs(self) -> list[tuple[str, str, int]]:
        return [(g, m, s) for g in self.groups for m in self.methods_of(g) for s in self.seeds]


def run_dir(out: Path, group: str, method: str, seed: int) -> Path:
    return Path(out) / group / method / f"seed-{seed}"


def run_state(path: Path, epochs: int) -> str:
    """'done', 'partial' (has a checkpoint) or 'new'."""
    finished = read_epochs(path)
    if finished and finished[-1]["epoch"] >= epochs and (path / "checkpoint.pt").exists():
        return "done"
    return "partial" if (path / "checkpoint.pt").exists() else "new"


def collect_results(grid: Grid, out: Path) -> list[dict[str, Any]]:
    """One record per finished run, read back from the run folders."""
    records = []
    for group, method, seed in grid.runs():
        path = run_dir(out, group, method, seed)
        cfg = grid.config(group, method, seed, out)
        if run_state(path, cfg.epochs) != "done":
            continue
        epochs = read_epochs(path)
        n = len(cfg.models)
        records.append({
            "group": group, "method": method, "seed": seed, "models": cfg.models,
            "final_acc": epochs[-1]["test_acc"],
            "best_acc": [max(e["test_acc"][i] for e in epochs) for i in range(n)],
            "ensemble_acc": epochs[-1]["ensemble_acc"],
            "teacher_share": [sum(e["teacher_share"][i] for e in epochs) / len(epochs) for i in range(n)],
            "curves": [e["test_acc"] for e in epochs],
            "train_seconds": sum(e["train_seconds"] for e in epochs),
            "run_dir": str(path),
            "config": {k: v for k, v in cfg.to_dict().items() if k != "out"},
        })
    return records


def write_results(grid: Grid, out: Path) -> Path:
    records = collect_results(grid, out)
    path = out / RESULTS_FILE
    write_text_atomic("".join(json.dumps(r) + "\n" for r in records), path)
    return path


def grid_conflict(saved: dict[str, Any], grid: Grid) -> str | None:
    """Why ``grid`` cannot continue the saved one, or None.

    A grid may grow (more seeds, groups or methods, a group running more methods) and
    its report section may change, but what its existing runs were trained with may not:
    the base settings, a group's models, a method's overrides.
    """
    if (saved.get("base") or {}) != grid.base:
        return "the base settings differ"
    saved_grid = Grid(base=grid.base, groups=saved.get("groups") or {}, methods=saved.get("methods") or {},
                      seeds=saved.get("seeds") or [])
    for group in set(saved_grid.groups) & set(grid.groups):
        if saved_grid.models(group) != grid.models(group):
            return f"group {group!r} had models {saved_grid.models(group)}, now {grid.models(group)}"
    for method in set(saved_grid.methods) & set(grid.methods):
        if (saved_grid.methods[method] or {}) != (grid.methods[method] or {}):
            return f"method {method!r} had settings {saved_grid.methods[method]}, now {grid.methods[method]}"
    return None


def run_grid(grid: Grid, out: str | Path, overrides: dict[str, Any] | None = None) -> Path:
    """Run every missing or unfinished run of the grid; returns the results file."""
    from cdfast.train import Trainer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / GRID_FILE
    description = yaml.safe_dump(dataclasses.asdict(grid), sort_keys=False)

    if saved.exists():
        conflict = grid_conflict(yaml.safe_load(saved.read_text()) or {}, grid)
        if conflict:
            raise ValueError(f"{out} holds another grid ({conflict}); use another --out folder, or restore the "
                             "original grid file to resume it")
    write_text_atomic(description, saved)
    runs = grid.runs()
    for k, (group, method, seed) in enumerate(runs, start=1):
        cfg = dataclasses.replace(grid.config(group, method, seed, out), **(overrides or {}))
        path = run_dir(out, group, method, seed)
        state = run_state(path, cfg.epochs)
        print(f"cdfast experiment [{k}/{len(runs)}] {group} / {method} / seed {seed}: "
              + {"done": "finished earlier, skipped", "partial": "resuming", "new": "training"}[state], flush=True)
        if state == "done":
            continue
        t0 = time.perf_counter()
        trainer = Trainer(cfg, resume=path if state == "partial" else None)
        summary = trainer.fit()
        accs = ", ".join(f"{100 * a:.2f}%" for a in summary["final_acc"])
        print(f"cdfast experiment [{k}/{len(runs)}] final test accuracy {accs} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        write_results(grid, out)
    return write_results(grid, out)
