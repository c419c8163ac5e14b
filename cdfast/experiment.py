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
``<out>/results.jsonl`` (one record per finished run) is rewritten from the run
folders after every run; it is also the grid's ledger: a finished run whose folder
was deleted afterwards (to free its checkpoints' disk, or on a fresh checkout of
a grid whose results were kept) keeps its record and is not trained again until
its line is deleted. A run that fails on its own (a non-finite loss: it
diverged; an unreadable image) is recorded as failed (``failed.txt`` in its
folder, a record in results.jsonl, a line in the report) and the grid goes on;
later invocations skip it until that file is deleted.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cdfast.safe_write import atomic_write
from cdfast.train.config import RESUME_FREE, TrainConfig, read_yaml_mapping
from cdfast.train.metrics import summarize_epochs
from cdfast.train.run_folder import (CONFIG_FILE, GRID_FILE, RESULTS_FILE, RunFolderError, has_checkpoint, read_epochs,
                                     run_state)

FAILED_FILE = "failed.txt"  # in a run folder: why the run failed (the grid skips it until the file is deleted)

# Group and method names become folder names: plain names only, never a path.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*")


def check_name(kind: str, name: Any) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise ValueError(f"{kind} name {name!r} is not a plain name: it becomes a folder name, so use letters, "
                         "digits and _ . + = - only (starting with a letter or digit, no '..', no '/')")


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
        if not isinstance(raw["seeds"], list):
            raise ValueError(f"grid file {path}: seeds must be a list such as [0, 1, 2], got {raw['seeds']!r}")
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
        models = spec["models"] if isinstance(spec, dict) else spec
        if not isinstance(models, list):
            raise ValueError(f"group {group!r}: models must be a list such as [resnet8, resnet20], got {models!r}")
        return list(models)

    def methods_of(self, group: str) -> list[str]:
        """The methods run on ``group``: all of them unless the group lists its own."""
        spec = self.groups[group]
        return list(spec.get("methods") or self.methods) if isinstance(spec, dict) else list(self.methods)

    def union(self, saved: "Grid") -> "Grid":
        """This grid grown by what the ``saved`` one (of the same folder) had beyond it: its other
        groups, methods, seeds and a group's other methods, so that a smaller grid run in the folder
        keeps the runs it does not name in grid.yaml, results.jsonl and the report. This grid's
        settings and report section win (a conflict was refused before). Seeds are the grid's, not a
        group's: the union runs every seed on every group if it is run itself."""
        methods = {**saved.methods, **self.methods}
        seeds = list(dict.fromkeys([*self.seeds, *saved.seeds]))
        groups: dict[str, Any] = {}
        for group in dict.fromkeys([*self.groups, *saved.groups]):
            runs = list(dict.fromkeys([*(self.methods_of(group) if group in self.groups else []),
                                       *(saved.methods_of(group) if group in saved.groups else [])]))
            models = self.models(group) if group in self.groups else saved.models(group)
            groups[group] = models if set(runs) == set(methods) else {"models": models, "methods": runs}
        return Grid(base=self.base, groups=groups, methods=methods, seeds=seeds, report=self.report or saved.report)

    def validate(self) -> None:
        for key, value in (("base", self.base), ("groups", self.groups), ("methods", self.methods)):
            if not isinstance(value, dict):
                raise ValueError(f"the grid's '{key}' must be a mapping of names to settings, got {type(value).__name__}")
        if not self.groups or not self.methods or not self.seeds:
            raise ValueError("a grid needs at least one group, one method and one seed")
        for group in self.groups:
            check_name("group", group)
        for method, overrides in self.methods.items():
            check_name("method", method)
            if not isinstance(overrides or {}, dict):
                raise ValueError(f"method {method!r} must map settings to values, got {overrides!r}")
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise ValueError(f"seeds must be integers >= 0, got {seed!r}")
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
        """Every (group, method, seed), a group's seeds outermost: each finished seed is a complete
        comparison of the group's methods, so a grid stopped part-way already answers something."""
        return [(g, m, s) for g in self.groups for s in self.seeds for m in self.methods_of(g)]


def run_dir(out: Path, group: str, method: str, seed: int) -> Path:
    return Path(out) / group / method / f"seed-{seed}"


def folder_state(path: Path, epochs: int) -> str:
    """A run folder's state: "failed" (a failed.txt), else run_state's "done", "partial" or "new"."""
    return "failed" if (path / FAILED_FILE).is_file() else run_state(path, epochs)


def read_ledger(out: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    """The finished runs recorded in ``<out>/results.jsonl`` (failed ones excluded), by (group, method, seed)."""
    path = out / RESULTS_FILE
    if not path.is_file():
        return {}
    ledger = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = (record["group"], record["method"], record["seed"])
            if not (isinstance(key[0], str) and isinstance(key[1], str) and type(key[2]) is int):
                raise TypeError("group and method must be names, seed an integer")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} line {number} is not a run record ({e}); fix or delete that line (a run "
                             "whose folder still exists is recorded again from it)") from None
        if "failed" not in record:
            ledger[key] = record
    return ledger


# Settings a recorded run may differ in from the grid and still be its run: where and how it ran,
# not what it trained (the settings a resume may change, but BatchNorm recalibration changes the
# reported accuracy; the data's folder, which another machine has elsewhere).
_LEDGER_FREE = (set(RESUME_FREE) - {"bn_recalibration"}) | {"device", "data_dir"}


def ledger_conflict(grid: Grid, out: Path, ledger: dict[tuple[str, str, int], dict[str, Any]]) -> str | None:
    """Why a record kept for a run whose folder no longer holds it is not that run of ``grid`` (other
    models or settings than the grid gives it: results.jsonl from another grid), or None."""
    for group, method, seed in grid.runs():
        record = ledger.get((group, method, seed))
        if record is None:
            continue
        cfg = grid.config(group, method, seed, out)
        if folder_state(run_dir(out, group, method, seed), cfg.epochs) in ("done", "failed"):
            continue  # the folder's own result wins over the record
        expected = cfg.to_dict()
        recorded = record.get("config") or {}
        # every setting both know (a record from an older cdfast lacks the newer ones), defaults
        # included: a default changed since is a run trained otherwise
        differ = sorted(k for k in (set(recorded) & set(expected)) - _LEDGER_FREE if recorded[k] != expected[k])
        if record.get("models") != expected["models"]:
            differ.insert(0, "models")
        if differ:
            said = [f"{k}={recorded.get(k, record.get(k))!r} where the grid gives {expected[k]!r}" for k in differ]
            return f"its record of {group} / {method} / seed {seed} was trained with {'; '.join(said)}"
    return None


def collect_results(grid: Grid, out: Path) -> list[dict[str, Any]]:
    """One record per finished run: read back from its folder where it finished there, else kept from
    results.jsonl (its folder deleted or emptied since); records of runs the grid does not name are
    kept at the end."""
    from cdfast.report import iter_steps, median_speed, perturbation_counts

    ledger = read_ledger(out)
    records = []
    for group, method, seed in grid.runs():
        path = run_dir(out, group, method, seed)
        cfg = grid.config(group, method, seed, out)
        kept = ledger.pop((group, method, seed), None)
        state = folder_state(path, cfg.epochs)
        if state == "failed":
            reason = (path / FAILED_FILE).read_text(errors="replace").strip()
            records.append({"group": group, "method": method, "seed": seed, "failed": reason[:2000],
                            "epochs_done": len(read_epochs(path)), "run_dir": str(path)})
            continue
        if state != "done":
            if kept is not None:  # its folder deleted or emptied since: the record stands
                records.append({**kept, "run_dir": str(path)})  # where its folder would be now
            continue
        epochs = read_epochs(path)
        try:  # what the run really trained with (a --resume-with-changes may have changed it)
            cfg = TrainConfig.from_yaml(path / CONFIG_FILE)
        except (OSError, ValueError, TypeError):
            pass
        summary = summarize_epochs(epochs)
        curves = [e["test_acc"] for e in epochs]
        if kept is not None and kept.get("curves") == curves and "perturbation_counts" in kept:
            speed, counts = kept.get("images_per_second"), kept["perturbation_counts"]  # read already
        else:
            speed = median_speed(path)
            try:
                counts = perturbation_counts(iter_steps(path), len(cfg.models)) or None
            except (OSError, ValueError, KeyError, IndexError):  # a steps.csv cdfast cannot read: no counts
                counts = None
        records.append({
            "group": group, "method": method, "seed": seed, "models": cfg.models,
            "final_acc": summary["final_acc"],
            "best_acc": summary["best_acc"],
            "ensemble_acc": summary["ensemble_acc"],
            "teacher_share": summary["teacher_share"],
            "curves": curves,
            "train_seconds": sum(e["train_seconds"] for e in epochs),
            # what the report reads from the folder, kept here for when the folder is gone
            "images_per_second": speed,
            "perturbation_counts": counts,
            "run_dir": str(path),
            "config": {k: v for k, v in cfg.to_dict().items() if k != "out"},
        })
    return records + list(ledger.values())  # runs the grid no longer names: their record is all there is


def write_results(grid: Grid, out: Path) -> Path:
    records = collect_results(grid, out)
    path = out / RESULTS_FILE
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in records))
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


FINISHED = ("done", "failed", "recorded")  # the states of runs the grid does not train


def run_grid(grid: Grid, out: str | Path, overrides: dict[str, Any] | None = None) -> Path:
    """Run every missing or unfinished run of the grid; returns the results file."""
    from cdfast.data.folder import BadImageError
    from cdfast.train.metrics import NonFiniteLossError

    out = Path(out)
    saved = out / GRID_FILE
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if out.is_dir() and not saved.is_file() and any(out.iterdir()):
        raise ValueError(f"--out {out} holds files cdfast did not write and no {GRID_FILE}; pass a new or empty "
                         "folder, or the folder of this grid (nothing there was touched)")
    out.mkdir(parents=True, exist_ok=True)

    ledger = read_ledger(out)  # before anything is written: a damaged results.jsonl stops the grid here
    whole = grid  # what the folder holds: this grid, and what an earlier, larger one ran there
    if saved.exists():
        raw = read_yaml_mapping(saved, "saved grid")
        conflict = grid_conflict(raw, grid)
        if conflict:
            raise ValueError(f"{out} holds another grid ({conflict}); use another --out folder, or restore the "
                             "original grid file to resume it")
        whole = grid.union(Grid(base=grid.base, groups=raw.get("groups") or {}, methods=raw.get("methods") or {},
                                seeds=list(raw.get("seeds") or []), report=raw.get("report") or {}))
    conflict = ledger_conflict(whole, out, ledger)
    if conflict:
        raise ValueError(f"{out / RESULTS_FILE} does not belong to this grid: {conflict}; use another --out "
                         "folder, or delete that record to train the run again (nothing was written)")
    atomic_write(saved, yaml.safe_dump(dataclasses.asdict(whole), sort_keys=False))
    runs = grid.runs()
    overrides = overrides or {}

    def config(run: tuple[str, str, int]) -> TrainConfig:
        return dataclasses.replace(grid.config(*run, out), **overrides)

    def state_of(run: tuple[str, str, int]) -> str:
        """folder_state, or "recorded": its folder is gone or no longer holds the finished run, the record stands."""
        state = folder_state(run_dir(out, *run), config(run).epochs)
        return "recorded" if run in ledger and state not in ("done", "failed") else state

    for k, (group, method, seed) in enumerate(runs, start=1):
        cfg = config((group, method, seed))
        path = run_dir(out, group, method, seed)
        state = state_of((group, method, seed))
        print(f"cdfast experiment [{k}/{len(runs)}] {group} / {method} / seed {seed}: "
              + {"done": "finished earlier, skipped", "partial": "resuming", "new": "training",
                 "recorded": f"finished earlier (its record in {RESULTS_FILE} is kept; its folder no longer holds the run), skipped "
                             "(delete its line there to train it again)",
                 "failed": f"failed earlier, skipped (delete {path / FAILED_FILE} to try it again)"}[state], flush=True)
        if state in FINISHED:
            continue
        t0 = time.perf_counter()
        try:
            trainer = _open_run(cfg, path, state, overrides, (group, method, seed))
        except RunFolderError as e:  # this run's folder cannot be continued nor started over: record it, go on
            _record_failure(whole, out, path, e, f"cdfast experiment [{k}/{len(runs)}]")
            continue
        try:
            summary = trainer.fit()
        except (NonFiniteLossError, BadImageError) as e:  # this run's own failure: record it and go on
            _record_failure(whole, out, path, e, f"cdfast experiment [{k}/{len(runs)}]")
            continue
        accs = ", ".join(f"{100 * a:.2f}%" for a in summary["final_acc"])
        print(f"cdfast experiment [{k}/{len(runs)}] final test accuracy {accs} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        write_results(whole, out)
        # a stop that came as the run finished: stop before the next run to train
        if trainer.stop_requested and any(state_of(r) not in FINISHED for r in runs[k:]):
            from cdfast.train.trainer import TrainingStopped

            raise TrainingStopped(f"stopped on {trainer.stop_requested} after run {group} / {method} / seed {seed} "
                                  "finished (its record is written)", trainer.stop_requested)
    return write_results(whole, out)


def _record_failure(whole: Grid, out: Path, path: Path, error: Exception, prefix: str) -> None:
    atomic_write(path / FAILED_FILE, f"{type(error).__name__}: {error}\n")
    print(f"{prefix} FAILED: {error}\n  recorded in {path / FAILED_FILE}; the grid goes on (delete that file to try "
          "the run again: a run that diverged diverges again unless its settings change)", flush=True)
    write_results(whole, out)


def _open_run(cfg: TrainConfig, path: Path, state: str, overrides: dict[str, Any], run: tuple[str, str, int]):
    """The trainer of one grid run: resumed from its checkpoint, or started (again) from step 0."""
    from cdfast.train import Trainer
    from cdfast.train.trainer import ResumeChangeError, _listed

    if state == "partial" and has_checkpoint(path):
        try:  # the run continues with its own settings (the grid cannot have changed: see grid_conflict)
            return Trainer(resume=path, overrides=overrides)
        except ResumeChangeError as e:
            group, method, seed = run
            raise ValueError(f"run {group} / {method} / seed {seed} in {path} was started with other settings "
                             f"than this command gives ({_listed(e.changes)}); rerun without those options, or "
                             f"continue that run alone with `cdfast train --resume {path}`") from None
    return Trainer(cfg)  # new, or stopped before its first checkpoint: starts (again) from step 0
