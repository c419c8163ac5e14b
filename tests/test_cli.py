"""The cdfast command line."""

import json

import pytest

from cdfast.cli import build_parser, config_from_args, main


def test_help_lists_every_config_field(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--models", "--mode", "--teachers", "--epochs", "--amp", "--channels-last", "--resume", "--perturb-ops"):
        assert flag in out


def test_config_file_then_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("epochs: 7\nbatch-size: 32\nmodels: [resnet20, resnet8]\n")
    args = build_parser().parse_args(["train", "--config", str(cfg_file), "--epochs", "3", "--no-feature-loss",
                                      "--perturb-ops", "crop,noise", "--train-subset", "none"])
    cfg = config_from_args(args)
    assert (cfg.epochs, cfg.batch_size, cfg.models) == (3, 32, ["resnet20", "resnet8"])
    assert cfg.feature_loss is False and cfg.perturb_ops == ["crop", "noise"] and cfg.train_subset is None


def test_cli_smoke_run_and_resume(tmp_path, fmnist_root, capsys):
    out = tmp_path / "cli"
    args = ["train", "--data-dir", str(fmnist_root), "--train-subset", "256", "--test-subset", "200",
            "--batch-size", "64", "--epochs", "1", "--out", str(out), "--no-progress", "--no-tensorboard", "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "ensemble" in printed and str(out) in printed
    assert json.loads((out / "epochs.jsonl").read_text())["epoch"] == 1
    # running again into the same folder must not touch it
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    # resume of a finished run does no more epochs and reports the summary again
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0


def test_cli_bad_input_exits_with_a_message(tmp_path, capsys):
    assert main(["train", "--models", "resnet8,nosuchnet", "--out", str(tmp_path / "x"), "--train-subset", "64",
                 "--no-progress"]) == 2
    assert "unknown model 'nosuchnet'" in capsys.readouterr().err
    assert main(["train", "--models", "resnet8", "--out", str(tmp_path / "y")]) == 2
    assert "at least 2 models" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "does not exist; pass the folder of a cdfast run" in capsys.readouterr().err


def test_models_command(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "resnet32" in out and "resnet50" in out
