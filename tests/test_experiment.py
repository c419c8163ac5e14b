"""The comparison-grid tool and its report, on a tiny grid of real Fashion-MNIST."""

import dataclasses
import json

import pytest
import yaml

from cdfast.cli import main
from cdfast.experiment import Grid, run_dir, run_grid
from cdfast.report import write_report
from cdfast.train import Trainer


def grid_file(tmp_path, fmnist_root, epochs=1):
    spec = {
        "base": {"data_dir": str(fmnist_root), "train_subset": 128, "test_subset": 100, "batch_size": 64,
                 "eval_batch_size": 100, "epochs": epochs, "device": "cpu", "tensorboard": False,
                 "plots": False, "progress": False, "log_interval": 1},
        "groups": {"pair": ["resnet8", "resnet14"]},
        "methods": {"ind": {"mode": "independent"}, "dml": {"mode": "dml", "feature_loss": False},
                    "cd": {"mode": "competitive"}},
        "seeds": [0, 1],
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_grid_runs_reports_and_skips_finished_runs(tmp_path, fmnist_root, monkeypatch):
    grid = Grid.from_yaml(grid_file(tmp_path, fmnist_root))
    out = tmp_path / "grid"
    results = run_grid(grid, out)
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(records) == 6
    assert {(r["method"], r["seed"]) for r in records} == {(m, s) for m in ("ind", "dml", "cd") for s in (0, 1)}
    assert all(len(r["final_acc"]) == 2 and len(r["curves"]) == 1 for r in records)

    report = write_report(out)
    text = report.read_text()
    assert "Last epoch" in text and "Imp-Ind" in text and "Imp-DML" in text
    assert "| pair | net 1: resnet8 |" in text and "teacher switches" in text
    perturbations = [line for line in text.splitlines() if line.startswith("| pair | ")
                 and "%" in line and "net " not in line]
    assert [line.split(" | ")[1] for line in perturbations] == ["cd"]  # only cd perturbs (perturb on by default)
    assert int(perturbations[0].split(" | ")[2]) == 2 * 2  # 2 seeds x 2 steps, a perturbation in every step
    assert (out / "curves-pair.png").exists() and (out / "teacher-timeline-pair-cd.png").exists()

    def must_not_train(self, *a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(Trainer, "fit", must_not_train)
    run_grid(grid, out)  # everything is finished: nothing trains
    grid.report = {"ablation": {"cd": ["cd", None, None, "cd"]}}  # the report section may change
    run_grid(grid, out)
    assert "| CD | " in write_report(out).read_text() and "| — |" in write_report(out).read_text()


def test_a_recorded_run_whose_folder_is_gone_is_kept_not_retrained(tmp_path, fmnist_root, monkeypatch, capsys):
    """results.jsonl is the grid's ledger: a fresh checkout that kept it (and grid.yaml) but not the run
    folders, or a user who deleted a folder for its disk, keeps the record; deleting the line retrains."""
    import shutil

    class Trained(Exception):
        pass

    grid = Grid.from_yaml(grid_file(tmp_path, fmnist_root))
    grid.methods = {"cd": grid.methods["cd"]}
    out = tmp_path / "grid"
    results = run_grid(grid, out)
    before = results.read_text().splitlines()
    report = write_report(out).read_text()
    counted = [line for line in report.splitlines() if line.startswith("| pair | cd | ")]
    assert len(counted) == 2 and "Not counted" not in report  # the perturbation tables
    shutil.rmtree(run_dir(out, "pair", "cd", 0))
    for f in run_dir(out, "pair", "cd", 1).iterdir():  # emptied, the folder itself left
        shutil.rmtree(f) if f.is_dir() else f.unlink()

    def fit(self, *a, **k):
        raise Trained(self.out)

    monkeypatch.setattr(Trainer, "fit", fit)
    capsys.readouterr()
    assert run_grid(grid, out).read_text().splitlines() == before  # both records are kept as they were
    assert capsys.readouterr().out.count("its folder no longer holds the run), skipped") == 2
    # the report still counts their elections and their speed (kept in the records)
    assert [line for line in write_report(out).read_text().splitlines() if line.startswith("| pair | cd | ")] \
        == counted
    older = [json.dumps({k: v for k, v in json.loads(line).items() if k != "perturbation_counts"}) for line in before]
    results.write_text("\n".join(older) + "\n")  # records from a grid older than the counts
    assert ("Not counted: 2 perturbed run(s) whose steps.csv is gone (a folder deleted after its run, from a grid "
            "older than the counts in results.jsonl): pair / cd / seed 0, pair / cd / seed 1.") \
        in write_report(out).read_text()

    saved = (out / "grid.yaml").read_text()
    for bad, error in ((before[0] + "\n{not json\n", r"line 2 is not a run record.*fix or delete that line"),
                       (before[0].replace('"seed": 0', '"seed": "0"'), r"line 1 is not a run record"),
                       (before[0].replace('"lr": 0.1', '"lr": 0.2'),
                        r"does not belong to this grid: its record of pair / cd / seed 0 was trained with lr=0.2 "
                        r"where the grid gives 0.1")):
        results.write_text(bad)
        with pytest.raises(ValueError, match=error):
            run_grid(grid, out)
        assert results.read_text() == bad and (out / "grid.yaml").read_text() == saved  # nothing written

    results.write_text(before[1] + "\n")  # the user deletes seed 0's line: it is trained again
    with pytest.raises(Trained, match="seed-0"):
        run_grid(grid, out)


def test_grid_resumes_an_interrupted_run(tmp_path, fmnist_root):
    grid = Grid.from_yaml(grid_file(tmp_path, fmnist_root, epochs=2))
    grid.methods = {"cd": grid.methods["cd"]}
    grid.seeds = [0]
    out = tmp_path / "grid"
    cfg = grid.config("pair", "cd", 0, out)
    out.mkdir()
    (out / "grid.yaml").write_text(yaml.safe_dump(dataclasses.asdict(grid)))  # what run_grid writes first
    Trainer(cfg).fit(until_epoch=1)  # "crash" after epoch 1
    results = run_grid(grid, out)
    record = json.loads(results.read_text())
    assert len(record["curves"]) == 2
    epochs = (run_dir(out, "pair", "cd", 0) / "epochs.jsonl").read_text().splitlines()
    assert [json.loads(e)["epoch"] for e in epochs] == [1, 2]


def test_a_diverged_run_is_recorded_and_the_grid_goes_on(tmp_path, fmnist_root, monkeypatch, capsys):
    from cdfast.train.metrics import NonFiniteLossError

    grid = Grid.from_yaml(grid_file(tmp_path, fmnist_root))
    grid.methods = {"ind": grid.methods["ind"], "cd": grid.methods["cd"]}
    grid.seeds = [0]
    out = tmp_path / "grid"
    real_fit = Trainer.fit

    def diverge_in_cd(self, *a, **k):
        if self.cfg.mode == "competitive":
            raise NonFiniteLossError("the loss became nan at step 1 (net 0): try a lower --lr")
        return real_fit(self, *a, **k)

    monkeypatch.setattr(Trainer, "fit", diverge_in_cd)
    records = [json.loads(line) for line in run_grid(grid, out).read_text().splitlines()]
    assert [(r["method"], "failed" in r) for r in records] == [("ind", False), ("cd", True)]
    assert "the loss became nan" in (run_dir(out, "pair", "cd", 0) / "failed.txt").read_text()
    assert "FAILED: the loss became nan" in capsys.readouterr().out
    text = write_report(out).read_text()
    assert "**Failed runs**" in text and "pair / cd / seed 0, after 0 epoch(s): NonFiniteLossError" in text
    monkeypatch.setattr(Trainer, "fit", real_fit)
    run_grid(grid, out)  # a failed run is skipped until its failed.txt is deleted
    assert "failed earlier, skipped" in capsys.readouterr().out
    (run_dir(out, "pair", "cd", 0) / "failed.txt").write_text("")  # e.g. touched by hand to skip a run
    run_grid(grid, out)
    assert "pair / cd / seed 0, after 0 epoch(s): (no reason recorded)" in write_report(out).read_text()


def test_a_run_folder_that_cannot_go_on_is_recorded_as_failed(tmp_path, fmnist_root, capsys):
    grid = Grid.from_yaml(grid_file(tmp_path, fmnist_root, epochs=2))
    grid.methods = {"ind": grid.methods["ind"]}
    grid.seeds = [0, 1]
    out = tmp_path / "grid"
    run_grid(grid, out)
    first = run_dir(out, "pair", "ind", 0)
    for name in ("checkpoint.pt", "checkpoint.prev.pt", "summary.txt"):  # two epochs recorded, nothing to resume
        (first / name).unlink()
    (out / "results.jsonl").unlink()  # and no record of it (with one, the record would stand: the ledger)
    records = [json.loads(line) for line in run_grid(grid, out).read_text().splitlines()]
    assert [("failed" in r, r["seed"]) for r in records] == [(True, 0), (False, 1)]
    assert "holds the records of 2 finished epoch(s)" in (first / "failed.txt").read_text()
    assert (first / "epochs.jsonl").read_text().count("\n") == 2  # nothing erased


def test_a_group_may_run_a_subset_of_the_methods(tmp_path, fmnist_root):
    spec = yaml.safe_load(grid_file(tmp_path, fmnist_root).read_text())
    spec["groups"]["big"] = {"models": ["resnet8", "resnet20"], "methods": ["cd"]}
    path = tmp_path / "subset.yaml"
    path.write_text(yaml.safe_dump(spec))
    grid = Grid.from_yaml(path)
    runs = grid.runs()
    # groups and methods in the file's order (safe_dump sorted them), each group seed by seed
    assert runs == [("big", "cd", 0), ("big", "cd", 1), ("pair", "cd", 0), ("pair", "dml", 0), ("pair", "ind", 0),
                    ("pair", "cd", 1), ("pair", "dml", 1), ("pair", "ind", 1)]
    assert grid.config("big", "cd", 1, tmp_path).models == ["resnet8", "resnet20"]

    spec["groups"]["big"]["methods"] = ["cd", "kd"]
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=r"lists methods \['kd'\]"):
        Grid.from_yaml(path)
    spec["groups"]["big"] = {"nets": ["resnet8", "resnet20"]}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="needs 'models'"):
        Grid.from_yaml(path)


def test_a_smaller_grid_in_the_same_folder_keeps_the_other_runs(tmp_path, fmnist_root, monkeypatch):
    grid = Grid.from_yaml(grid_file(tmp_path, fmnist_root))
    grid.seeds = [0]
    out = tmp_path / "grid"
    run_grid(grid, out)

    def must_not_train(self, *a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(Trainer, "fit", must_not_train)
    small = Grid.from_yaml(grid_file(tmp_path, fmnist_root))
    small.methods = {"ind": small.methods["ind"]}
    small.seeds = [0]
    records = [json.loads(line) for line in run_grid(small, out).read_text().splitlines()]
    assert sorted(r["method"] for r in records) == ["cd", "dml", "ind"]
    saved = Grid.from_yaml(out / "grid.yaml")
    assert set(saved.methods) == {"ind", "dml", "cd"} and saved.groups == {"pair": ["resnet8", "resnet14"]}
    assert "| dml |" in write_report(out).read_text()


def test_a_grid_may_grow_but_not_change_what_it_trained(tmp_path, fmnist_root, monkeypatch):
    grid = Grid.from_yaml(grid_file(tmp_path, fmnist_root))
    grid.methods = {"cd": grid.methods["cd"]}
    grid.seeds = [0]
    out = tmp_path / "grid"
    run_grid(grid, out)

    trained = []
    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: trained.append(self.cfg.out) or fit(self, *a, **k))
    grid.seeds = [0, 1]
    grid.methods["ind"] = {"mode": "independent"}
    results = run_grid(grid, out)  # only the three new runs train
    assert sorted(trained) == sorted(str(run_dir(out, "pair", m, s)) for m, s in [("cd", 1), ("ind", 0), ("ind", 1)])
    assert len(results.read_text().splitlines()) == 4

    changed = Grid.from_yaml(grid_file(tmp_path, fmnist_root))
    changed.methods = {"cd": {"mode": "competitive", "alpha": 2.0}}
    with pytest.raises(ValueError, match="method 'cd' had settings"):
        run_grid(changed, out)
    changed.methods = grid.methods
    changed.groups = {"pair": ["resnet8", "resnet20"]}
    with pytest.raises(ValueError, match="group 'pair' had models"):
        run_grid(changed, out)


def test_grid_errors(tmp_path, fmnist_root):
    bad = tmp_path / "bad.yaml"
    bad.write_text("groups: {a: [resnet8]}\nmethods: {x: {}}\nseeds: [0]\n")
    with pytest.raises(ValueError, match="at least 2 models"):
        Grid.from_yaml(bad)
    bad.write_text("groups: {a: [resnet8, resnet8]}\nmethods: {x: {mode: solo}}\nseeds: [0]\n")
    with pytest.raises(ValueError, match="mode"):
        Grid.from_yaml(bad)
    bad.write_text("groups: {a: [resnet8, resnet8]}\n")
    with pytest.raises(ValueError, match="lacks"):
        Grid.from_yaml(bad)
    grid = Grid.from_yaml(grid_file(tmp_path, fmnist_root))
    out = tmp_path / "g"
    out.mkdir()
    (out / "grid.yaml").write_text("groups: {}\n")
    with pytest.raises(ValueError, match="holds another grid"):
        run_grid(grid, out)


def test_experiment_cli(tmp_path, fmnist_root, capsys):
    path = grid_file(tmp_path, fmnist_root)
    spec = yaml.safe_load(path.read_text())
    spec["methods"] = {"cd": {"mode": "competitive"}}
    spec["seeds"] = [0]
    path.write_text(yaml.safe_dump(spec))
    assert main(["experiment", "--config", str(path), "--out", str(tmp_path / "exp")]) == 0
    assert "report in" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "exp"), "--out", str(tmp_path / "rep"), "--title", "Tiny"]) == 0
    assert (tmp_path / "rep" / "report.md").read_text().startswith("# Tiny")
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_report_judges_differences_by_a_welch_t_test():
    from cdfast.report import _difference, _verdict

    diff, se = _difference([0.90, 0.92], [0.80, 0.82])  # stds sqrt(2) points each
    assert diff == pytest.approx(10.0) and se == pytest.approx(2 ** 0.5)
    assert _verdict([0.90, 0.92], [0.80, 0.82]) == "clear"  # 7 SE; 2 seeds a side (df 2) need 4.3
    # 3 seeds a side, SD 1 point each: 2 points are 2.4 SE, clear by a 2-SE rule but not by the t-test
    # at df 4 (2.78 SE); 3 points are 3.7 SE: clear
    assert _difference([0.90, 0.91, 0.92], [0.88, 0.89, 0.90]) == pytest.approx((2.0, (2 / 3) ** 0.5))
    assert _verdict([0.90, 0.91, 0.92], [0.88, 0.89, 0.90]) == "within noise"
    assert _verdict([0.90, 0.91, 0.92], [0.87, 0.88, 0.89]) == "clear"
    # 2 seeds a side: 2 points are 2.8 SE, below 4.3 at df 2; all the spread on one side (df 1): even 11 SE
    assert _verdict([0.90, 0.91], [0.88, 0.89]) == "within noise"
    assert _verdict([0.90, 0.91], [0.85, 0.85]) == "within noise"
    assert _verdict([0.90, 0.92, 0.91], [0.89, 0.93]) == "within noise"
    assert _verdict([0.90, 0.92, 0.91], [0.90, 0.90]) == "within noise"
    assert _verdict([0.9], [0.8]) == "one seed: no spread to judge by"
    assert _verdict([0.9, 0.9], [0.8, 0.8]) == "no spread to judge by"  # identical seeds: nothing to judge by


def test_every_shipped_grid_file_is_valid():
    from pathlib import Path

    from cdfast.experiment import Grid

    files = sorted((Path(__file__).resolve().parents[1] / "cdfast" / "presets" / "experiments").glob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        grid = Grid.from_yaml(path)  # validates every (group, method) config
        assert grid.runs(), path


def test_report_cells_are_mean_and_standard_error():
    from cdfast.report import _fmt

    # 90, 92, 94 %: mean 92, sample SD 2, standard error 2 / sqrt(3) = 1.15
    assert _fmt([0.90, 0.92, 0.94]) == "92.00 ± 1.15"
    assert _fmt([0.9]) == "90.00 ± 0.00 (1 seed, no SE)" and _fmt([]) == "—"


def test_verdict_names_what_beats_independent_training_and_dml_clearly(tmp_path):
    from cdfast.report import Results, verdict

    def run(method, seed, accs, seconds, models=("a", "a")):
        return {"group": "g", "method": method, "seed": seed, "models": list(models), "final_acc": accs,
                "train_seconds": seconds}

    # group means (mean of the two networks): ind 91, 91.5, 92; dml 91, 92, 91.5; cd 95, 96, 95.5; cd-x 91.5 x 3
    records = [run("ind", 0, [0.90, 0.92], 100), run("ind", 1, [0.91, 0.92], 110), run("ind", 2, [0.92, 0.92], 90),
               run("dml", 0, [0.91, 0.91], 120), run("dml", 1, [0.92, 0.92], 120), run("dml", 2, [0.91, 0.92], 120),
               run("cd", 0, [0.95, 0.95], 200), run("cd", 1, [0.96, 0.96], 210), run("cd", 2, [0.95, 0.96], 220),
               run("cd-x", 0, [0.90, 0.93], 100), run("cd-x", 1, [0.93, 0.90], 100), run("cd-x", 2, [0.91, 0.92], 100)]
    text = "\n".join(verdict(Results(records), {}))
    # cd: +4 against both, SE sqrt(0.25/3 + 0.25/3) = 0.41, df 4: clear; time 210 / 100 (medians)
    assert "| g | mean | cd | 95.50 ± 0.29 | +4.00 ± 0.41 (clearly better) | +4.00 ± 0.41 (clearly better) | 2.10x |" \
        in text
    # cd-x: no spread of its own, its networks' gains and losses cancel
    assert "| g | mean | cd-x | 91.50 ± 0.00 | +0.00 ± 0.29 (within noise) | +0.00 ± 0.29 (within noise) | 1.00x |" \
        in text
    assert "| net 1" not in text  # a group of like networks: their mean only
    assert "Beats both independent training and DML clearly: cd (g)." in text
    assert "Highest mean against independent training: cd in g, +4.00 ± 0.41 points (clearly better)." in text

    # a group of different networks: each network's rows too, where a gain of one paid by the other shows
    pair = [run(m, s, accs, 100, models=("a", "b")) for m, s, accs in
            [("ind", 0, [0.90, 0.95]), ("ind", 1, [0.91, 0.96]), ("ind", 2, [0.92, 0.94]),
             ("cd", 0, [0.93, 0.92]), ("cd", 1, [0.94, 0.93]), ("cd", 2, [0.95, 0.91])]]
    text = "\n".join(verdict(Results(pair), {}))
    assert "| g | mean | cd | 93.00 ± 0.29 | +0.00 ± 0.41 (within noise) | — | 1.00x |" in text
    assert "| g | net 1: a | cd | 94.00 ± 0.58 | +3.00 ± 0.82 (clearly better) | — |  |" in text
    assert "| g | net 2: b | cd | 92.00 ± 0.58 | -3.00 ± 0.82 (clearly worse) | — |  |" in text
    assert "Every configuration's mean is at or below independent training's; the closest: cd in g, +0.00" in text

    # training time from the median epoch's images/s where the run folder has them (a slowed epoch and
    # a torn last line do not count), else the run's seconds; a folder recorded relative to where the
    # grid ran is found in the grid folder
    grid_dir = tmp_path / "grid"
    for name, speeds in (("ind/seed-0", [100, 100, 10]), ("ind/seed-1", [100]), ("cd/seed-0", [50, 40, 50]),
                         ("cd/seed-1", [50])):
        (grid_dir / "g" / name).mkdir(parents=True)
        (grid_dir / "g" / name / "epochs.jsonl").write_text(
            "".join(f'{{"epoch": {e}, "images_per_second": {v}}}\n' for e, v in enumerate(speeds)) + '{"epo')
    timed = [dict(run(m, seed, [0.9, 0.91 + seed / 100], 999), run_dir=f"elsewhere/g/{m}/seed-{seed}")
             for m in ("ind", "cd") for seed in (0, 1)]
    # ind: 100 images/s (median epoch) in both runs, cd 50: twice the time, whatever the runs' seconds
    assert "| g | mean | cd | 90.75 ± 0.25 | +0.00 ± 0.35 (within noise) | — | 2.00x |" \
        in "\n".join(verdict(Results(timed, grid_dir), {}))
    timed[3]["run_dir"] = str(tmp_path / "gone")  # one run's folder missing, here and in the grid folder:
    (grid_dir / "g" / "cd" / "seed-1" / "epochs.jsonl").unlink()  # every run's seconds (999 each)
    assert "| g | mean | cd | 90.75 ± 0.25 | +0.00 ± 0.35 (within noise) | — | 1.00x |" \
        in "\n".join(verdict(Results(timed, grid_dir), {}))
    worse = [run("ind", s, [0.95 + s / 100] * 2, 1) for s in (0, 1, 2)] + \
        [run("cd", s, [0.90 + s / 100] * 2, 1) for s in (0, 1, 2)]
    text = "\n".join(verdict(Results(worse), {}))
    assert "No configuration beats both independent training and DML clearly" in text
    assert "(clearly worse)" in text


def test_perturbation_table_counts_elections_and_cross_entropies(tmp_path):
    from cdfast.report import Results, perturbation_table

    rows = ["step,epoch,teacher,perturbed,perturbation,ce_0,ce_1,ce_2",
            "1,1,0,0,noise,0.5,0.7,0.9",   # the perturbed network 0 won
            "2,1,1,0,noise,0.9,0.3,0.5",
            "3,1,2,-1,,0.4,0.4,0.2",       # nothing perturbed: not counted
            "4,1,0,2,mixup,0.1,0.3,1.5"]
    (tmp_path / "g" / "cd" / "seed-0").mkdir(parents=True)
    (tmp_path / "g" / "cd" / "seed-0" / "steps.csv").write_text("\n".join(rows) + "\n")
    record = {"group": "g", "method": "cd", "seed": 0, "models": ["a", "a", "a"], "final_acc": [0.9] * 3,
              "run_dir": "moved/away"}  # found in the grid folder
    text = "\n".join(perturbation_table(Results([record], tmp_path)))
    assert "| g | cd | 3 | 33.3% | 50.0% | 0.0% |" in text  # elected: 1 of 3; noise 1 of 2, mixup 0 of 1
    # noise: perturbed CE (0.5 + 0.9) / 2 = 0.70 against the others' (0.8 + 0.4) / 2 = 0.60; mixup 1.50 / 0.20
    assert "| g | cd | 3 | 0.97 / 0.47 | 0.70 / 0.60 | 1.50 / 0.20 |" in text
    assert perturbation_table(Results([record])) == []  # no steps.csv where the record points
