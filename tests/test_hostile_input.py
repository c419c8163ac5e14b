"""cdfast used by a hostile or careless user: every bad input gets a clear error, nothing written is lost.

Each case asserts the error class and what the message says; cases that touch an existing
run folder also assert that nothing in it changed.
"""

import errno
import gzip
import hashlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import cdfast
from cdfast import CompetitiveDistillation
from cdfast.cli import main
from cdfast.data import load_data
from cdfast.data.cifar import load_cifar
from cdfast.experiment import Grid, run_grid
from cdfast.models import build_model
from cdfast.safe_write import WriteError, atomic_write, open_append
from cdfast.train import CheckpointError, NonFiniteLossError, Trainer, TrainConfig, load_checkpoint
from cdfast.train.run_folder import RunFolderError

FMNIST = Path(os.environ.get("CDFAST_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
needs_data = pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").exists(), reason="no Fashion-MNIST")
TINY = dict(train_subset=64, test_subset=64, batch_size=32, eval_batch_size=64, epochs=2, device="cpu",
            progress=False, tensorboard=False, plots=False, log_interval=1)


def tiny_args(out, **kw):
    values = dict(TINY, data_dir=str(FMNIST), out=str(out), **kw)
    args = ["train"]
    for k, v in values.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            args.append(flag if v else "--no-" + flag[2:])
        else:
            args += [flag, ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    return args


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


# ---- settings: type and range, in YAML and flags alike --------------------------------------
YAML_CASES = [
    ("epochs: 1.5", TypeError, "epochs must be an integer, got 1.5"),
    ("perturb: 'no'", TypeError, "perturb must be true or false, got str 'no'"),
    ("feature_loss: 'false'", TypeError, "feature_loss must be true or false"),
    ("lr: '0.1'", TypeError, "lr must be a number, got str '0.1'"),
    ("models: resnet8,resnet8", TypeError, r"models must be a list.*\[resnet8, resnet8\]"),
    ("seed: 1.7", TypeError, "seed must be an integer"),
    ("alpha: .nan", ValueError, "alpha must be a finite number"),
    ("temperature: .inf", ValueError, "temperature must be a finite number"),
    ("perturb_ops: [crop, warp9]", ValueError, r"unknown perturbation ops \['warp9'\]"),
    ("lr_milestones: [0.5, 1.5]", ValueError, r"lr_milestones\[1\] must be > 0 and < 1"),
    ("epochs: true", TypeError, "epochs must be an integer, got bool True"),
    ("device: meta", ValueError, "device must be cpu, cuda, cuda:N, mps or auto"),
    ("warmup_epochs: 9\nepochs: 2", ValueError, r"warmup_epochs \(9\) exceeds epochs \(2\)"),
    ("nosuchkey: 1", ValueError, r"unknown config keys \['nosuchkey'\]"),
]


@pytest.mark.parametrize("text,error,message", YAML_CASES)
def test_yaml_values_are_type_and_range_checked(tmp_path, text, error, message):
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    with pytest.raises(error, match=message):
        TrainConfig.from_yaml(path).validate()


FLAG_CASES = [
    (["--alpha", "-1"], "alpha must be >= 0, got -1.0"),
    (["--beta", "-1"], "beta must be >= 0"),
    (["--warmup-epochs", "-1"], "warmup_epochs must be >= 0"),
    (["--threads", "-1"], "threads must be >= 1"),
    (["--threads", "0"], "threads must be >= 1"),
    (["--device", "tpu9"], "device must be cpu, cuda, cuda:N, mps or auto, got 'tpu9'"),
    (["--device", "meta"], "device must be cpu, cuda, cuda:N, mps or auto, got 'meta'"),
    (["--temperature", "inf"], "temperature must be a finite number, got inf"),
    (["--temperature", "0"], "temperature must be > 0"),
    (["--alpha", "nan"], "alpha must be a finite number, got nan"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--momentum", "1.5"], "momentum must be >= 0 and < 1"),
    (["--weight-decay", "-1"], "weight_decay must be >= 0"),
    (["--lr-gamma", "0"], "lr_gamma must be > 0"),
    (["--workers", "-1"], "workers must be >= 0"),
    (["--test-subset", "0"], "test_subset must be >= 1"),
    (["--image-size", "0"], "image_size must be >= 8"),
    (["--seed", "-5"], "seed must be >= 0"),
    (["--perturb-prob", "1.5"], "perturb_prob must be >= 0 and <= 1"),
    (["--log-interval", "0"], "log_interval must be >= 1"),
    (["--models", "resnet8"], "at least 2 models"),
    (["--models", "resnet8,nosuchnet"], "unknown model 'nosuchnet'"),
    (["--mode", "dml", "--teachers", "all-better"], "teachers='all-better' only applies to mode='competitive'"),
    (["--resume-with-changes"], "--resume-with-changes needs --resume"),
]


@pytest.mark.parametrize("flags,message", FLAG_CASES)
def test_bad_flags_exit_2_with_the_reason_and_write_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    code, err = run_cli(tiny_args(out) + flags, capsys)
    assert code == 2 and err.startswith("cdfast: error:") and message in err, err
    assert "Traceback" not in err and not out.exists()


def test_argparse_refuses_a_non_integer_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(tiny_args(tmp_path / "run") + ["--epochs", "1.5"])
    assert e.value.code == 2 and "invalid int value: '1.5'" in capsys.readouterr().err


def test_malformed_yaml_names_file_line_and_fix(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 3\nmodels: [resnet8, resnet8\nlr: 0.1\n")
    code, err = run_cli(["train", "--config", str(path)], capsys)
    assert code == 2 and f"config file {path} is not valid YAML, line 3" in err and "fix the file" in err
    path.write_text("- 1\n- 2\n")
    code, err = run_cli(["train", "--config", str(path)], capsys)
    assert code == 2 and "must hold a mapping of keys to values, not a list" in err


# ---- data ---------------------------------------------------------------------------------
def fm_copy(tmp_path) -> Path:
    folder = tmp_path / "fm"
    shutil.copytree(FMNIST, folder)
    return folder


@needs_data
def test_truncated_gzip_names_the_file(tmp_path):
    folder = fm_copy(tmp_path)
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz is corrupt or truncated"):
        load_data("fashion-mnist", str(folder))
    path.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz is corrupt or truncated"):
        load_data("fashion-mnist", str(folder))


@needs_data
def test_idx_file_with_no_items_is_refused(tmp_path):
    folder = fm_copy(tmp_path)
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + (0).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2)
    with pytest.raises(ValueError, match="holds no items"):
        load_data("fashion-mnist", str(folder))


class Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_crafted_cifar_pickle_runs_no_code(tmp_path):
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    proof = tmp_path / "pwned"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (batches / name).write_bytes(pickle.dumps({b"data": Exploit(proof), b"labels": [0]}))
    with pytest.raises(ValueError, match=r"data_batch_1 is not a readable CIFAR python batch.*refused to load "
                                         r"(posix|os)\.system"):
        load_cifar(tmp_path, 10)
    assert not proof.exists()


def test_cifar_pickles_from_numpy_load_with_protocol_2_and_5(tmp_path):
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        (batches / name).write_bytes(pickle.dumps({b"data": data, b"labels": [1, 2], b"filenames": [b"a", b"b"]},
                                                  protocol=2 if k % 2 else 5))
    out = load_cifar(tmp_path, 10)
    assert out["train"][0].shape == (10, 3, 32, 32) and out["test"][1].tolist() == [1, 2]


def image_folder(tmp_path, bad: bytes | None = b"not an image") -> Path:
    from PIL import Image

    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    if bad is not None:
        (root / "train" / "a" / "3.png").write_bytes(bad)
    return root


def test_corrupt_image_names_the_file_or_is_skipped_with_a_count(tmp_path):
    root = image_folder(tmp_path)
    data = load_data("imagefolder", str(root), batch_size=4, eval_batch_size=4, workers=0, image_size=8)
    with pytest.raises(cdfast.data.BadImageError, match=r"cannot read image .*train/a/3.png.*--skip-bad-images"):
        for _ in data.train:
            pass
    data = load_data("imagefolder", str(root), batch_size=4, eval_batch_size=4, workers=0, image_size=8,
                     skip_bad_images=True)
    with pytest.warns(UserWarning, match=r"skipped unreadable image .*3.png.*1 skipped so far"):
        seen = sum(x.shape[0] for x, _ in data.train)
    assert seen == 11 and len(data.train.skipped) == 1


def test_empty_image_file_is_found_before_training(tmp_path):
    root = image_folder(tmp_path, bad=b"")
    with pytest.raises(cdfast.data.BadImageError, match=r"1 empty image file\(s\).*3.png"):
        load_data("imagefolder", str(root), workers=0, image_size=8)
    with pytest.warns(UserWarning, match="skipping 1 empty image file"):
        data = load_data("imagefolder", str(root), batch_size=4, workers=0, image_size=8, skip_bad_images=True)
    assert data.train_size == 11


# ---- the run folder -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-epoch run (so checkpoint.pt and checkpoint.prev.pt exist); copy it before changing it."""
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("no Fashion-MNIST")
    out = tmp_path_factory.mktemp("finished") / "run"
    Trainer(TrainConfig(**TINY, data_dir=str(FMNIST), out=str(out))).fit()
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def test_out_with_foreign_files_is_refused_untouched(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "steps.csv").write_text("my,own,csv\n")
    before = snapshot(out)
    code, err = run_cli(tiny_args(out), capsys)
    assert code == 2 and "holds files cdfast did not write (notes.txt, steps.csv)" in err
    assert snapshot(out) == before
    (tmp_path / "afile").write_text("x")
    code, err = run_cli(tiny_args(tmp_path / "afile"), capsys)
    assert code == 2 and "is a file, not a folder" in err


RESUME_REFUSALS = [
    (["--alpha", "2"], "would change the run: alpha: 1.0 -> 2.0"),
    (["--momentum", "0.5"], "momentum: 0.9 -> 0.5"),
    (["--weight-decay", "0"], "weight_decay: 0.0005 -> 0.0"),
    (["--temperature", "4"], "temperature: 1.0 -> 4.0"),
    (["--perturb-prob", "0.5"], "perturb_prob: 1.0 -> 0.5"),
    (["--no-perturb"], "perturb: None -> False"),
    (["--perturb-ops", "crop"], "perturb_ops: ['crop', 'noise', 'mixup', 'cutmix', 'affine'] -> ['crop']"),
    (["--warmup-epochs", "1"], "warmup_epochs: 0.0 -> 1.0"),
    (["--test-subset", "32"], "test_subset: 64 -> 32"),
    (["--epochs", "3"], "epochs: 2 -> 3"),
    (["--models", "resnet8,resnet14"], "cannot resume .* with other models"),
    (["--batch-size", "16", "--resume-with-changes"], "with other batch_size"),
    (["--seed", "3", "--resume-with-changes"], "with other seed"),
    (["--epochs", "1", "--resume-with-changes"], "epochs=1 is below the 2 epochs"),
    (["--config", "x.yaml"], "drop --config"),
]


@pytest.mark.parametrize("flags,message", RESUME_REFUSALS)
def test_resume_refuses_to_change_the_run_and_touches_nothing(run_copy, capsys, flags, message):
    before = snapshot(run_copy)
    code, err = run_cli(["train", "--resume", str(run_copy), "--no-progress", *flags], capsys)
    assert code == 2, err
    assert message in err or re.search(message, err), err
    if "would change" in message:
        assert "--resume-with-changes" in err
    assert snapshot(run_copy) == before


@needs_data
def test_resume_may_change_how_the_run_executes(tmp_path, capsys):
    out = tmp_path / "run"
    Trainer(TrainConfig(**TINY, data_dir=str(FMNIST), out=str(out))).fit(until_epoch=1)
    code, err = run_cli(["train", "--resume", str(out), "--no-progress", "--threads", str(torch.get_num_threads()),
                         "--log-interval", "7", "--engine", "sequential", "--eval-batch-size", "32",
                         "--no-plots"], capsys)
    assert code == 0, err
    assert [json.loads(line)["epoch"] for line in (out / "epochs.jsonl").read_text().splitlines()] == [1, 2]
    assert yaml.safe_load((out / "config.yaml").read_text())["log_interval"] == 7
    assert not (out / "changes.jsonl").exists()  # nothing that changes the training was changed


def test_resume_with_changes_applies_them_for_real_and_records_them(run_copy, capsys):
    trainer = Trainer(resume=run_copy, overrides={"epochs": 3, "lr": 0.05, "momentum": 0.5, "weight_decay": 0.0,
                                                  "alpha": 0.5}, allow_changes=True)
    assert trainer.group.alpha == 0.5
    for opt, sched in zip(trainer.group.optimizers, trainer.schedulers):
        group = opt.param_groups[0]
        assert (group["momentum"], group["weight_decay"], group["initial_lr"]) == (0.5, 0.0, 0.05)
        assert sched.base_lrs == [0.05]
        # the cosine schedule of the new 3-epoch run at step 4 of 6
        assert group["lr"] == pytest.approx(0.05 * 0.5 * (1 + np.cos(np.pi * 4 / 6)))
    change = json.loads((run_copy / "changes.jsonl").read_text())
    assert change["first_step"] == 5 and change["epoch"] == 3  # step 4 ended epoch 2 with the old settings
    assert change["changes"]["momentum"] == {"from": 0.9, "to": 0.5}
    assert yaml.safe_load((run_copy / "config.yaml").read_text())["momentum"] == 0.5
    trainer.fit()
    state = load_checkpoint(run_copy / "checkpoint.pt")
    assert state["epoch"] == 3 and state["changes"][0]["changes"]["alpha"] == {"from": 1.0, "to": 0.5}
    assert state["optimizers"][0]["param_groups"][0]["momentum"] == 0.5
    # and a plain resume now continues the changed run, with nothing more to refuse
    code, err = run_cli(["train", "--resume", str(run_copy), "--no-progress"], capsys)
    assert code == 0, err


def test_crafted_checkpoint_runs_no_code(run_copy, tmp_path, capsys):
    proof = tmp_path / "pwned"
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        torch.save({"format_version": 1, "config": {}, "epoch": 1, "step": 1, "x": Exploit(proof)}, run_copy / name)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(run_copy / "checkpoint.pt")
    code, err = run_cli(["train", "--resume", str(run_copy), "--no-progress"], capsys)
    assert code == 2 and "unreadable" in err and "never runs code" in err
    assert not proof.exists()


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(run_copy, caplog):
    (run_copy / "checkpoint.pt").write_bytes(b"\x00" * 64)
    trainer = Trainer(resume=run_copy)
    assert (trainer.epoch, trainer.step) == (1, 2)
    assert "resuming from the previous checkpoint" in caplog.text
    assert [json.loads(line)["epoch"] for line in (run_copy / "epochs.jsonl").read_text().splitlines()] == [1]
    assert len((run_copy / "steps.csv").read_text().splitlines()) == 1 + 2


@needs_data
def test_a_run_without_a_checkpoint_is_resumable_and_restartable(tmp_path, capsys):
    out = tmp_path / "run"
    straight = Trainer(TrainConfig(**TINY, data_dir=str(FMNIST), out=str(tmp_path / "straight")))
    straight.fit()
    # a run that died before its first checkpoint: marker, config, some rows, even an epoch record
    first = Trainer(TrainConfig(**TINY, data_dir=str(FMNIST), out=str(out)))
    first.fit(until_epoch=1)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (out / name).unlink(missing_ok=True)
    (out / ".checkpoint.pt.staged.tmp").write_bytes(b"half a checkpoint")
    code, err = run_cli(["train", "--resume", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert not (out / ".checkpoint.pt.staged.tmp").exists()
    assert (out / "steps.csv").read_text() == (tmp_path / "straight" / "steps.csv").read_text()
    resumed = torch.load(out / "checkpoint.pt", weights_only=True)["group"]
    for k, v in straight.group.state_dict().items():
        assert torch.equal(v, resumed[k]), k
    # a fresh run into such a folder starts it again, with no duplicated rows
    again = tmp_path / "again"
    Trainer(TrainConfig(**TINY, data_dir=str(FMNIST), out=str(again))).fit(until_epoch=1)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (again / name).unlink(missing_ok=True)
    code, err = run_cli(tiny_args(again), capsys)
    assert code == 0, err
    assert (again / "steps.csv").read_text() == (tmp_path / "straight" / "steps.csv").read_text()


def test_resume_of_a_folder_with_nothing_says_how_to_start(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".cdfast-run").write_text("{}")
    code, err = run_cli(["train", "--resume", str(out)], capsys)
    assert code == 2 and f"Start it again with `cdfast train --out {out}`" in err
    code, err = run_cli(["train", "--resume", str(tmp_path)], capsys)
    assert code == 2 and "is not a cdfast run folder" in err
    with pytest.raises(RunFolderError, match="no checkpoint and no config.yaml"):
        Trainer(resume=out)


def test_disk_full_names_the_folder_and_keeps_the_checkpoint(run_copy, monkeypatch, capsys):
    digest = hashlib.sha256((run_copy / "checkpoint.pt").read_bytes()).hexdigest()
    real_fsync = os.fsync

    def full(fd):
        if ".checkpoint.pt" in Path(os.readlink(f"/proc/self/fd/{fd}")).name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    code, err = run_cli(["train", "--resume", str(run_copy), "--no-progress", "--epochs", "3",
                         "--resume-with-changes"], capsys)
    assert code == 1
    assert f"no space left on the device holding {run_copy} while writing checkpoint.pt" in err
    assert "The last checkpoint (epoch 2, step 4)" in err and "is intact" in err
    monkeypatch.undo()
    assert hashlib.sha256((run_copy / "checkpoint.pt").read_bytes()).hexdigest() == digest
    assert not [p for p in run_copy.iterdir() if p.name.endswith(".tmp")]


@needs_data
def test_non_finite_evaluation_is_never_recorded_or_checkpointed(tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = Trainer(TrainConfig(**TINY, data_dir=str(FMNIST), out=str(out)))
    real = trainer.evaluate

    def broken(**kw):
        metrics = real(**kw)
        metrics["test_loss"][1] = float("nan")
        return metrics

    monkeypatch.setattr(trainer, "evaluate", broken)
    with pytest.raises(NonFiniteLossError, match=r"non-finite test_loss for network\(s\) \[1\].*No checkpoint "
                                                 r"exists yet"):
        trainer.fit()
    assert not (out / "checkpoint.pt").exists() and not (out / "epochs.jsonl").exists()


@needs_data
def test_diverged_weights_are_never_checkpointed(tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = Trainer(TrainConfig(**{**TINY, "epochs": 3}, data_dir=str(FMNIST), out=str(out)))
    trainer.fit(until_epoch=1)
    digest = hashlib.sha256((out / "checkpoint.pt").read_bytes()).hexdigest()
    real = trainer.evaluate

    def poisoned(**kw):  # the losses stayed finite; a running statistic did not
        trainer.group.networks[1].stem[1].running_var.fill_(float("inf"))
        return real(**kw)

    monkeypatch.setattr(trainer, "evaluate", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"network 1 \(resnet8\) has non-finite weights after epoch 2 "
                                                 r"\(stem.1.running_var\).*The last checkpoint \(epoch 1, step 2\)"):
        trainer.fit()
    assert hashlib.sha256((out / "checkpoint.pt").read_bytes()).hexdigest() == digest
    assert [json.loads(line)["epoch"] for line in (out / "epochs.jsonl").read_text().splitlines()] == [1]


# ---- link-safe writes ---------------------------------------------------------------------
def test_atomic_write_never_follows_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".config.yaml.tmp").symlink_to(victim)  # the fixed temp name older versions used
    atomic_write(run / "config.yaml", "epochs: 1\n")
    assert victim.read_text() == "precious" and (run / "config.yaml").read_text() == "epochs: 1\n"


def test_records_are_never_appended_through_a_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "steps.csv").symlink_to(victim)
    with pytest.raises(WriteError, match="is a symbolic link"):
        open_append(tmp_path / "steps.csv")
    assert victim.read_text() == "precious"


@needs_data
def test_planted_link_in_a_run_folder_is_removed_not_followed(run_copy, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (run_copy / "steps.csv").unlink()
    (run_copy / "steps.csv").symlink_to(victim)
    (run_copy / ".epochs.jsonl.abc.tmp").symlink_to(victim)
    Trainer(resume=run_copy, overrides={"epochs": 3}, allow_changes=True).fit()
    assert victim.read_text() == "precious"
    assert not (run_copy / "steps.csv").is_symlink() and not (run_copy / ".epochs.jsonl.abc.tmp").exists()


# ---- grids --------------------------------------------------------------------------------
def grid_yaml(tmp_path, **spec):
    base = {"base": {**TINY, "data_dir": str(FMNIST), "epochs": 1}, "groups": {"pair": ["resnet8", "resnet8"]},
            "methods": {"cd": {}}, "seeds": [0]}
    base.update(spec)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


@pytest.mark.parametrize("spec,message", [
    ({"groups": {"../escape": ["resnet8", "resnet8"]}}, "group name '../escape' is not a plain name"),
    ({"groups": {"/abs/path": ["resnet8", "resnet8"]}}, "group name '/abs/path' is not a plain name"),
    ({"methods": {"a/b": {}}}, "method name 'a/b' is not a plain name"),
    ({"methods": {".hidden": {}}}, "method name '.hidden' is not a plain name"),
    ({"seeds": ["../x"]}, r"seeds must be integers >= 0, got '../x'"),
    ({"seeds": 3}, "seeds must be a list"),
    ({"methods": {"cd": {"epochs": 1.5}}}, "epochs must be an integer"),
    ({"groups": {"pair": "resnet8,resnet8"}}, "models must be a list"),
])
def test_grid_names_and_values_are_checked(tmp_path, spec, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Grid.from_yaml(grid_yaml(tmp_path, **spec))


def test_grid_out_with_foreign_files_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("x")
    with pytest.raises(ValueError, match="holds files cdfast did not write"):
        run_grid(Grid.from_yaml(grid_yaml(tmp_path)), out)
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


# ---- the Python API -----------------------------------------------------------------------
def group(**kw):
    torch.manual_seed(0)
    return CompetitiveDistillation([build_model("resnet8", 10, 1) for _ in range(2)], **kw)


X, Y = torch.randn(4, 1, 12, 12), torch.randint(0, 10, (4,))
LOGITS = torch.randn(2, 4, 3)

API_CASES = [
    ("empty batch", lambda: group().step(X[:0], Y[:0]), ValueError, "the batch is empty"),
    ("uint8 images", lambda: group().step((X * 50).to(torch.uint8), Y), TypeError, "floating-point tensor, got torch.uint8"),
    ("float64 images", lambda: group().step(X.double(), Y), TypeError, "images are torch.float64 but the networks"),
    ("numpy labels", lambda: group().step(X, Y.numpy()), TypeError, "labels must be a torch.Tensor"),
    ("numpy images", lambda: group().step(X.numpy(), Y), TypeError, "images must be a torch.Tensor"),
    ("float labels", lambda: group().step(X, Y.float()), TypeError, r"integer class indices \[B\] \(or float class probabilities \[B, K\]\), got torch.float32"),
    ("labels elsewhere", lambda: group().step(X, Y.to("meta")), ValueError, "labels are on meta but the networks are on cpu"),
    ("images elsewhere", lambda: group().step(X.to("meta"), Y), ValueError, "images are on meta"),
    ("labels out of range", lambda: group().step(X, Y + 10), ValueError, r"labels must lie in \[0, 10\)"),
    ("string alpha", lambda: group(alpha="1"), TypeError, "alpha must be a number, got str '1'"),
    ("inf temperature", lambda: group(temperature=float("inf")), ValueError, "temperature must be a finite number"),
    ("nan alpha", lambda: group(alpha=float("nan")), ValueError, "alpha must be a finite number"),
    ("negative beta", lambda: group(beta=-1.0), ValueError, "beta must be >= 0"),
    ("string perturb_prob", lambda: group(perturb_prob="0.5"), TypeError, "perturb_prob must be a number"),
    ("string feature_loss", lambda: group(feature_loss="no"), TypeError, "feature_loss must be true or false"),
    ("not a module", lambda: CompetitiveDistillation([build_model("resnet8", 10, 1), "resnet8"]), TypeError,
     r"networks \[1\] are not torch.nn.Module"),
    ("teacher out of range", lambda: cdfast.group_student_loss(LOGITS, None, 7), ValueError, "teacher 7 is not a network"),
    ("float teacher", lambda: cdfast.group_student_loss(LOGITS, None, 1.0), TypeError, "an int, or a 0-d int64 tensor"),
    ("teacher elsewhere", lambda: cdfast.group_student_loss(LOGITS, None, torch.tensor(0, device="meta")), ValueError,
     "teacher is on meta"),
    ("string alpha (functional)", lambda: cdfast.group_student_loss(LOGITS, None, torch.tensor(0), alpha="1"),
     TypeError, "alpha must be a number"),
    ("[G, N, B, K] logits", lambda: cdfast.group_student_loss(torch.randn(3, 2, 4, 5), None, torch.tensor(0)),
     ValueError, "takes one group, logits"),
    ("numpy targets", lambda: cdfast.competitive_ce(LOGITS, np.zeros(4, dtype=np.int64)), TypeError,
     "targets must be a torch.Tensor"),
    ("targets elsewhere", lambda: cdfast.competitive_ce(LOGITS, torch.zeros(4, dtype=torch.long, device="meta")),
     ValueError, "targets is on meta"),
    ("empty batch (functional)", lambda: cdfast.competitive_ce(torch.randn(2, 0, 3), torch.zeros(0, dtype=torch.long)),
     ValueError, "empty batch"),
    ("list of non-tensors", lambda: cdfast.competitive_ce([[1.0], [2.0]], torch.zeros(1, dtype=torch.long)),
     TypeError, "a list of the networks' tensors"),
    ("string temperature", lambda: cdfast.student_loss(LOGITS[0], LOGITS[1], temperature="2"), TypeError,
     "temperature must be a number"),
]


@pytest.mark.parametrize("name,call,error,message", API_CASES, ids=[c[0] for c in API_CASES])
def test_python_api_errors_are_cdfasts_own(name, call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_lists_are_stacked_like_tensors():
    teacher = torch.tensor(1)
    feats = torch.randn(2, 4, 5)
    a = cdfast.group_student_loss(list(LOGITS), list(feats), teacher)
    b = cdfast.group_student_loss(LOGITS, feats, teacher)
    torch.testing.assert_close(a, b)


def test_int32_labels_are_accepted_by_the_group():
    g = group()
    out = g.losses(X, Y.int())
    assert out.ce.shape == (2,)


@pytest.mark.parametrize("use_op", [True, False])
def test_non_finite_ce_is_never_elected(monkeypatch, use_op):
    from cdfast.ops import competitive_ce as _ops

    if use_op and not _ops.HAS_EXTENSION:
        pytest.skip("cdfast._C is not built")
    monkeypatch.setattr(_ops, "op_available", lambda device: use_op)
    logits = torch.randn(4, 6, 5)
    targets = torch.randint(0, 5, (6,))
    logits[0, 0, targets[0]] = float("-inf")  # CE = +inf
    logits[1, 2] = float("nan")                # CE = NaN
    ce, teacher = cdfast.competitive_ce(logits, targets)
    assert torch.isinf(ce[0]) and torch.isnan(ce[1])
    assert int(teacher) == 2 + int(torch.argmin(ce[2:]))
    logits[2:] = float("nan")
    assert int(cdfast.competitive_ce(logits, targets)[1]) == 0  # all non-finite: 0, and ce shows it
    assert int(cdfast.elect_teacher(torch.tensor([float("nan"), 0.3, float("inf"), 0.2]))) == 3


# ---- the command line's last resort ---------------------------------------------------------
def test_unexpected_errors_are_one_line_unless_debug(monkeypatch, capsys):
    import cdfast.cli

    def boom(args):
        raise RuntimeError("kaput\nsecond line of a long torch message")

    monkeypatch.setattr(cdfast.cli, "cmd_models", boom)
    code, err = run_cli(["models"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "unexpected error in `cdfast models`: RuntimeError: kaput" in err and "--debug" in err
    with pytest.raises(RuntimeError, match="kaput"):
        main(["--debug", "models"])


# ---- review follow-ups: locks, corrupt checkpoints, restarts, links, permissions ----------------
@needs_data
def test_one_process_per_run_folder(tmp_path):
    out = tmp_path / "run"
    first = Trainer(TrainConfig(**TINY, data_dir=str(FMNIST), out=str(out)))
    with pytest.raises(RunFolderError, match="in use by another cdfast process"):
        Trainer(resume=out)
    first.fit(until_epoch=1)  # fit releases the folder when it returns
    Trainer(resume=out).close()


def test_default_run_folders_never_collide(tmp_path, monkeypatch):
    from cdfast.train.run_folder import new_run_folder

    monkeypatch.chdir(tmp_path)
    Path("runs/x").mkdir(parents=True)
    Path("runs/x-2").mkdir()
    assert new_run_folder("runs/x") == Path("runs/x-3")


def test_a_corrupt_latest_is_set_aside_and_never_becomes_the_previous(run_copy):
    (run_copy / "checkpoint.pt").write_bytes(b"\x00" * 64)
    trainer = Trainer(resume=run_copy, overrides={"epochs": 3}, allow_changes=True)
    assert (run_copy / "checkpoint.corrupt.pt").exists() and not (run_copy / "checkpoint.pt").exists()
    trainer.fit()
    assert load_checkpoint(run_copy / "checkpoint.pt")["epoch"] == 3
    assert load_checkpoint(run_copy / "checkpoint.prev.pt")["epoch"] == 2


def test_unreadable_checkpoints_say_how_to_start_again(run_copy, capsys):
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (run_copy / name).write_bytes(b"junk")
    code, err = run_cli(["train", "--resume", str(run_copy), "--no-progress"], capsys)
    assert code == 2 and "start it again in another --out folder" in err
    assert "move checkpoint.pt and checkpoint.prev.pt out of the folder" in err
    records = {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file() and not p.name.endswith(".pt")}
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (run_copy / name).rename(run_copy.parent / name)
    # two finished epochs recorded: starting over would erase them, so it is refused, nothing touched
    code, err = run_cli(["train", "--resume", str(run_copy), "--no-progress"], capsys)
    assert code == 2 and "holds the records of 2 finished epoch(s) but no readable checkpoint" in err
    code, err = run_cli(tiny_args(run_copy), capsys)
    assert code == 2 and "starting it again would erase those records" in err
    assert {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()} == records


def test_a_finished_grid_run_whose_checkpoints_were_deleted_stays_done(run_copy):
    from cdfast.train.run_folder import run_state

    assert run_state(run_copy, 2) == "done"
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (run_copy / name).unlink()
    assert run_state(run_copy, 2) == "done"
    # the last epoch recorded but the run not summarised (a crash before its final checkpoint): continue it
    (run_copy / "summary.txt").unlink()
    assert run_state(run_copy, 2) == "partial"


def test_resume_from_a_named_checkpoint_file(run_copy, capsys):
    (run_copy / "checkpoint.superseded.pt").write_bytes(b"set aside by an earlier resume")
    trainer = Trainer(resume=run_copy / "checkpoint.prev.pt")
    assert (trainer.epoch, trainer.step) == (1, 2)
    # the epoch-2 checkpoint belongs to the abandoned line: set aside (nothing earlier overwritten), so
    # a plain --resume after a crash, or the next save's 'previous', cannot come from it
    assert not (run_copy / "checkpoint.pt").exists()
    assert load_checkpoint(run_copy / "checkpoint.superseded-2.pt")["epoch"] == 2
    assert (run_copy / "checkpoint.superseded.pt").read_bytes() == b"set aside by an earlier resume"
    assert "from checkpoint.prev.pt, so checkpoint.pt is set aside as checkpoint.superseded-2.pt" in capsys.readouterr().out
    assert [json.loads(line)["epoch"] for line in (run_copy / "epochs.jsonl").read_text().splitlines()] == [1]
    assert not (run_copy / "summary.txt").exists()  # the abandoned line's summary: the run is unfinished again
    trainer.close()
    trainer = Trainer(resume=run_copy)  # the line resumed from the named file
    assert (trainer.epoch, trainer.step) == (1, 2)
    trainer.fit()
    assert load_checkpoint(run_copy / "checkpoint.pt")["epoch"] == 2
    assert load_checkpoint(run_copy / "checkpoint.prev.pt")["epoch"] == 1


def test_resume_from_the_latest_by_name_or_from_a_copy(run_copy):
    Trainer(resume=run_copy / "checkpoint.pt").close()  # the latest itself: nothing is set aside
    assert (run_copy / "checkpoint.prev.pt").exists() and not list(run_copy.glob("*.superseded*"))
    shutil.copyfile(run_copy / "checkpoint.prev.pt", run_copy / "epoch1.pt")
    trainer = Trainer(resume=run_copy / "epoch1.pt")  # a copy outside the rotation: it becomes the latest
    assert (trainer.epoch, trainer.step) == (1, 2)
    assert load_checkpoint(run_copy / "checkpoint.pt")["epoch"] == 1 and not (run_copy / "checkpoint.prev.pt").exists()
    assert sorted(p.name for p in run_copy.glob("*.superseded*")) == ["checkpoint.prev.superseded.pt",
                                                                      "checkpoint.superseded.pt"]
    trainer.close()
    assert (Trainer(resume=run_copy).epoch) == 1  # a plain resume continues that line


def test_resume_into_another_out_folder_is_refused(run_copy, tmp_path, capsys):
    code, err = run_cli(["train", "--resume", str(run_copy), "--out", str(tmp_path / "fork"), "--epochs", "3",
                         "--resume-with-changes", "--no-progress"], capsys)
    assert code == 2 and "a resumed run continues in its own folder" in err and not (tmp_path / "fork").exists()


def test_changes_on_a_finished_run_are_refused(run_copy):
    with pytest.raises(ValueError, match="has trained all 2 epochs: nothing is left to train"):
        Trainer(resume=run_copy, overrides={"alpha": 0.5}, allow_changes=True)


def test_a_lost_uncheckpointed_change_is_reported(run_copy, capsys):
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    (run_copy / "config.yaml").write_text(yaml.safe_dump({**config, "alpha": 0.25}))
    Trainer(resume=run_copy).close()
    out = capsys.readouterr().out
    assert "holds settings its checkpoint does not (alpha: 1.0 -> 0.25)" in out
    assert yaml.safe_load((run_copy / "config.yaml").read_text())["alpha"] == 1.0


@needs_data
def test_switching_feature_adapters_mid_run_is_refused_clearly(tmp_path):
    out = tmp_path / "run"
    Trainer(TrainConfig(**TINY, data_dir=str(FMNIST), out=str(out), models=["resnet8", "resnet8x4"])).fit(until_epoch=1)
    with pytest.raises(ValueError, match="cannot switch its feature loss on or off mid-run"):
        Trainer(resume=out, overrides={"feature_loss": False}, allow_changes=True)


@needs_data
def test_a_restart_with_other_models_writes_a_matching_header(tmp_path):
    out = tmp_path / "run"
    Trainer(TrainConfig(**TINY, data_dir=str(FMNIST), out=str(out))).fit(until_epoch=1)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (out / name).unlink(missing_ok=True)
    three = ["resnet8", "resnet8", "resnet8"]
    Trainer(TrainConfig(**{**TINY, "epochs": 1}, data_dir=str(FMNIST), out=str(out), models=three)).fit()
    header = (out / "steps.csv").read_text().splitlines()[0].split(",")
    assert "ce_2" in header and len((out / "steps.csv").read_text().splitlines()) == 1 + 2


def test_a_leftover_marker_temp_is_not_a_foreign_file(tmp_path):
    from cdfast.train.run_folder import claim_new, unlock_folder

    out = tmp_path / "run"
    out.mkdir()
    (out / "..cdfast-run.abc123.tmp").write_text("half")
    lock, restarted = claim_new(out)
    unlock_folder(lock)
    assert (out / ".cdfast-run").is_file() and not (out / "..cdfast-run.abc123.tmp").exists()


def test_perturbation_rng_of_an_absent_gpu_is_skipped():
    from cdfast.perturb.ops import PerturbRNG

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    rng = PerturbRNG(0)
    state = rng.state_dict()
    state["generators"] = {"cuda:0": torch.zeros(16, dtype=torch.uint8)}
    rng.load_state_dict(state)  # a run moved from a GPU to this CPU-only machine
    assert rng.on(torch.device("cpu")) is not None


def test_all_better_never_learns_from_a_non_finite_network():
    w = cdfast.distillation_weights(torch.tensor([float("inf"), float("inf"), 0.5, float("nan")]),
                                     "competitive", "all-better")
    assert w[:, [0, 1, 3]].sum() == 0 and w[0, 2] == 1 and w[1, 2] == 1  # +inf students learn from the finite one


def test_a_diverged_network_reaches_no_other_through_the_weighted_losses():
    # all-better: network 1's NaN outputs teach no one, so no other network's loss or gradient may
    # turn NaN (0 * NaN in a contraction would); its own loss shows the failure
    torch.manual_seed(0)
    logits, feats, y = torch.randn(3, 8, 5), torch.randn(3, 8, 4), torch.randint(0, 5, (8,))
    logits[1], feats[1] = float("nan"), float("nan")
    z, f = logits.clone().requires_grad_(), feats.clone().requires_grad_()
    out = cdfast.CompetitiveLoss(mode="competitive", teachers="all-better")(z, y, f)
    out.per_network.sum().backward()
    assert torch.isnan(out.per_network[1]) and torch.isfinite(out.per_network[[0, 2]]).all()
    assert torch.isfinite(z.grad[[0, 2]]).all() and torch.isfinite(f.grad[[0, 2]]).all()
    # the same through the functions, with per-network feature lists (the adapter path)
    z, f = logits.clone().requires_grad_(), feats.clone().requires_grad_()
    ce, _ = cdfast.competitive_ce(z, y)
    w = cdfast.distillation_weights(ce.detach(), "competitive", "all-better")
    l2 = cdfast.pairwise_feature_l2(list(f), lambda i, j, x: x, teachers=(w != 0).any(0))
    distill = cdfast.weighted_student_loss(z, l2, w)
    distill[[0, 2]].sum().backward()
    assert torch.isfinite(distill[[0, 2]]).all()
    assert torch.isfinite(z.grad[[0, 2]]).all() and torch.isfinite(f.grad[[0, 2]]).all()


def test_feature_mistakes_in_the_functions_get_feature_errors():
    logits, y = torch.randn(2, 4, 5), torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match=r"features have different shapes .*FeatureAdapters"):
        cdfast.group_student_loss(logits, [torch.randn(4, 8), torch.randn(4, 16)], 0)
    with pytest.raises(ValueError, match=r"feats of networks \[1\] are None"):
        cdfast.CompetitiveLoss()(logits, y, [torch.randn(4, 8), None])
    w = cdfast.distillation_weights(torch.tensor([0.1, 0.2]), "dml")
    with pytest.raises(ValueError, match=r"feature_l2 must be the \[N, N\] = \[2, 2\] matrix"):
        cdfast.weighted_student_loss(logits, torch.ones(2), w)


def test_the_pairwise_losses_stay_float32_under_autocast():
    torch.manual_seed(0)
    logits, feats = 3 * torch.randn(3, 16, 100), torch.randn(3, 16, 32)
    logits[:, :, 7] = float("-inf")  # a masked class: low precision turns the clamp into -inf, 0 * -inf into NaN
    want_kl, want_l2 = cdfast.functional.pairwise_kl(logits), cdfast.pairwise_feature_l2(feats)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kl, l2 = cdfast.functional.pairwise_kl(logits), cdfast.pairwise_feature_l2(feats)
        w = cdfast.distillation_weights(torch.tensor([0.1, 0.2, 0.3]), "dml")
        loss = cdfast.weighted_student_loss(logits, l2, w)
    assert kl.dtype == l2.dtype == loss.dtype == torch.float32 and torch.isfinite(kl).all()
    torch.testing.assert_close(kl, want_kl, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(l2, want_l2)
    torch.testing.assert_close(loss, cdfast.weighted_student_loss(logits, want_l2, w), atol=1e-6, rtol=1e-6)


def test_planted_link_named_like_the_target_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "config.yaml").symlink_to(victim)
    atomic_write(tmp_path / "config.yaml", "epochs: 1\n")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "config.yaml").is_symlink() and (tmp_path / "config.yaml").read_text() == "epochs: 1\n"


def test_written_files_follow_the_umask(tmp_path):
    atomic_write(tmp_path / "a.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_planted_fifo_is_refused_without_hanging(tmp_path):
    os.mkfifo(tmp_path / "steps.csv")
    with pytest.raises(WriteError, match="not a regular file"):
        open_append(tmp_path / "steps.csv")


def test_a_full_disk_while_appending_records_is_a_clear_error(tmp_path, monkeypatch):
    from cdfast.train.metrics import RunLogger

    logger = RunLogger(tmp_path, 2, tensorboard=False)

    def full(rows):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(logger._steps, "writerows", full)
    with pytest.raises(WriteError, match=f"no space left on the device holding {tmp_path} while writing steps.csv"):
        logger.write_steps([{}])
    logger.close()


def test_tensorboard_link_is_refused(tmp_path):
    from cdfast.train.metrics import RunLogger

    (tmp_path / "tensorboard").symlink_to(tmp_path.parent)
    with pytest.raises(WriteError, match="tensorboard is a link or a file"):
        RunLogger(tmp_path, 2, tensorboard=True)


def test_checkpoints_with_every_gpus_rng_state_still_load(run_copy):
    # before 2026-11-27 a checkpoint held the RNG state of every visible GPU ([] on a CPU machine)
    from cdfast.train.checkpoint import save_atomic

    state = load_checkpoint(run_copy / "checkpoint.pt")
    assert state["rng"]["cuda"] is None  # now: only the run's own GPU, none for a CPU run
    state["rng"]["cuda"] = []
    for rank_state in state["rng_ranks"]:
        rank_state["cuda"] = []
    state.pop("format_version")
    save_atomic(state, run_copy / "checkpoint.pt")
    trainer = Trainer(resume=run_copy)
    assert (trainer.epoch, trainer.step) == (2, 4)
    trainer.close()


def test_a_resume_on_another_kind_of_device_is_a_change(run_copy, capsys):
    # device=auto compares equal as a setting; what it resolved to is in the checkpoint
    from cdfast.train.checkpoint import save_atomic

    state = load_checkpoint(run_copy / "checkpoint.pt")
    assert state["device_type"] == "cpu" and state["torch_version"] == torch.__version__
    state.update(device_type="cuda", torch_version="0.0.1")
    state.pop("format_version")
    save_atomic(state, run_copy / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"device: 'cpu, ran on cuda' -> 'cpu, now cpu'"):
        Trainer(resume=run_copy)
    trainer = Trainer(resume=run_copy, overrides={"epochs": 3}, allow_changes=True)
    assert trainer.changes[-1]["changes"]["device"] == {"from": "cpu, ran on cuda", "to": "cpu, now cpu"}
    assert "trained under torch 0.0.1 and resumes under" in capsys.readouterr().out
    trainer.close()
