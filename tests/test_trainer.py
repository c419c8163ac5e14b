"""The trainer: real-data learning, exact resume, atomic checkpoints, records, and bad runs."""

import hashlib
import json

import pytest
import torch

import cdfast

from cdfast.train import NonFiniteLossError, Trainer, TrainConfig, load_checkpoint, save_atomic


def small_config(tmp_path, fmnist_root, name="run", **kw):
    values = dict(data_dir=str(fmnist_root), train_subset=512, test_subset=256, batch_size=64,
                  eval_batch_size=256, epochs=2, out=str(tmp_path / name), progress=False,
                  tensorboard=False, plots=False, log_interval=3, device="cpu")
    values.update(kw)
    return TrainConfig(**values)


def weights(trainer):
    return {k: v.clone() for k, v in trainer.group.state_dict().items()}


def test_resume_gives_identical_weights(tmp_path, fmnist_root):
    straight = Trainer(small_config(tmp_path, fmnist_root, "straight"))
    straight.fit()
    first = Trainer(small_config(tmp_path, fmnist_root, "split"))
    first.fit(until_epoch=1)
    assert first.epoch == 1
    resumed = Trainer(small_config(tmp_path, fmnist_root, "split"), resume=tmp_path / "split")
    assert resumed.epoch == 1 and resumed.step == first.step
    resumed.fit()
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    lines = (tmp_path / "split" / "epochs.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    steps = (tmp_path / "split" / "steps.csv").read_text().splitlines()
    assert len(steps) == 1 + 2 * straight.steps_per_epoch


@pytest.mark.slow
def test_short_real_training_learns(tmp_path, fmnist_root):
    cfg = small_config(tmp_path, fmnist_root, train_subset=8000, test_subset=1000, batch_size=128,
                       epochs=2, plots=True, tensorboard=True, channels_last=True)
    trainer = Trainer(cfg)
    summary = trainer.fit()
    assert min(summary["final_acc"]) > 0.6  # chance is 0.1
    assert summary["ensemble_acc"] > 0.6
    assert sum(summary["teacher_share"]) == pytest.approx(1.0)
    out = tmp_path / "run"
    for name in ("config.yaml", "epochs.jsonl", "steps.csv", "checkpoint.pt", "summary.txt",
                 "accuracy.png", "teacher_timeline.png"):
        assert (out / name).exists(), name
    assert any((out / "tensorboard").iterdir())
    record = json.loads((out / "epochs.jsonl").read_text().splitlines()[-1])
    assert {"test_acc", "ensemble_acc", "teacher_share", "train_loss", "lr"} <= record.keys()


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, fmnist_root):
    trainer = Trainer(small_config(tmp_path, fmnist_root, epochs=3))
    trainer.fit(until_epoch=1)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    net = trainer.group.networks[1]
    original = net.forward
    calls = {"n": 0}

    def poisoned(x):
        calls["n"] += 1
        logits, feats = original(x)
        return (logits * float("nan") if calls["n"] >= 3 else logits), feats

    net.forward = poisoned
    with pytest.raises(NonFiniteLossError, match=r"network 1 \(resnet8\) at step 11"):
        trainer.fit()
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest
    assert load_checkpoint(ckpt)["epoch"] == 1


def test_atomic_save_survives_a_crash_while_writing(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_atomic({"config": {}, "epoch": 1, "step": 4}, path)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_atomic({"config": {}, "epoch": 2, "step": 8}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_refuses_to_overwrite_a_run(tmp_path, fmnist_root):
    Trainer(small_config(tmp_path, fmnist_root, epochs=1)).fit()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(small_config(tmp_path, fmnist_root, epochs=1))


def test_resume_with_mismatched_or_broken_checkpoint(tmp_path, fmnist_root):
    Trainer(small_config(tmp_path, fmnist_root)).fit(until_epoch=1)
    with pytest.raises(ValueError, match=r"with other models \(models: \['resnet8', 'resnet8'\] -> "):
        Trainer(small_config(tmp_path, fmnist_root, models=["resnet8", "resnet14"]), resume=tmp_path / "run")
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="unreadable"):
        Trainer(small_config(tmp_path, fmnist_root), resume=tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Trainer(small_config(tmp_path, fmnist_root), resume=tmp_path / "elsewhere")


def test_heterogeneous_group_with_adapters_trains_and_resumes(tmp_path, fmnist_root):
    cfg = small_config(tmp_path, fmnist_root, models=["resnet8", "resnet8x4"], train_subset=256, epochs=2)
    trainer = Trainer(cfg)
    assert trainer.group.adapters.needed
    trainer.fit(until_epoch=1)
    resumed = Trainer(cfg, resume=tmp_path / "run")
    torch.testing.assert_close(weights(resumed), weights(trainer))


@pytest.mark.parametrize("mode,teachers", [("dml", "best"), ("independent", "best"), ("competitive", "all-better")])
def test_other_modes_run(tmp_path, fmnist_root, mode, teachers):
    cfg = small_config(tmp_path, fmnist_root, mode=mode, teachers=teachers, epochs=1, train_subset=256,
                       models=["resnet8", "resnet8", "resnet8"] if mode == "dml" else ["resnet8", "resnet8"])
    summary = Trainer(cfg).fit()
    assert summary["epochs"] == 1


def test_config_validation():
    with pytest.raises(ValueError, match="at least 2 models"):
        TrainConfig(models=["resnet8"]).validate()
    with pytest.raises(ValueError, match="mode="):
        TrainConfig(mode="solo").validate()
    with pytest.raises(ValueError, match="unknown perturbation"):
        TrainConfig(perturb_ops=["crop", "zoom"]).validate()
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"epochz": 3})
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        TrainConfig(compile_mode="fastest").validate()


@pytest.mark.parametrize("options, error", [
    (dict(mode="solo"), "mode='solo'; choose one of competitive, dml, independent"),
    (dict(mode="dml", teachers="all-better"), "teachers='all-better' only applies to mode='competitive'"),
    (dict(election="vote"), "election='vote'; choose one of ce, clean-equivalent"),
    (dict(perturbed_bn="fresh"), "perturbed_bn='fresh'; choose one of frozen, updated, clean"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(feature_loss=1), "feature_loss must be true or false"),
])
def test_config_and_class_refuse_an_option_with_the_same_message(options, error):
    """One source of truth: cdfast.options checks the group's options for the config and the class alike."""
    with pytest.raises((ValueError, TypeError), match=error):
        TrainConfig(**options).validate()
    with pytest.raises((ValueError, TypeError), match=error):
        cdfast.CompetitiveDistillation([torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)], **options)


def test_settings_saved_under_former_names_load_as_today():
    """Run folders written before perturbed_bn (mutated_bn, perturb_bn_stats) still resume."""
    assert TrainConfig.from_dict({"mutated_bn": "clean", "perturb_bn_stats": False}).perturbed_bn == "clean"
    assert TrainConfig.from_dict({"mutated_bn": None, "perturb_bn_stats": True}).perturbed_bn == "updated"
    assert TrainConfig.from_dict({"mutated_bn": None, "perturb_bn_stats": False}).perturbed_bn == "frozen"
    from cdfast.train.trainer import config_changes

    saved = {**TrainConfig().to_dict(), "mutated_bn": None, "perturb_bn_stats": True}
    del saved["perturbed_bn"]
    assert config_changes(saved, TrainConfig(perturbed_bn="updated")) == {}
    assert config_changes(saved, TrainConfig()) == {"perturbed_bn": ("updated", "frozen")}


def test_compile_settings_reach_the_engine(tmp_path, fmnist_root):
    trainer = Trainer(small_config(tmp_path, fmnist_root, compile_mode="max-autotune"))
    assert trainer.group.engine.compile_options == {"mode": "max-autotune"}
    trainer = Trainer(small_config(tmp_path, fmnist_root, name="plain"))
    assert trainer.group.engine.compile_options is None


def test_bf16_autocast_and_channels_last_run(tmp_path, fmnist_root):
    cfg = small_config(tmp_path, fmnist_root, epochs=1, train_subset=128, test_subset=128, amp=True, channels_last=True)
    trainer = Trainer(cfg)
    assert trainer.group.autocast_dtype == torch.bfloat16
    summary = trainer.fit()
    assert summary["epochs"] == 1 and all(0.0 <= a <= 1.0 for a in summary["final_acc"])


def test_lr_schedules():
    from cdfast.train.trainer import lr_factor

    cos = TrainConfig(epochs=2, schedule="cosine")
    assert lr_factor(cos, 0, 10) == pytest.approx(1.0)
    assert lr_factor(cos, 10, 10) == pytest.approx(0.5)
    assert lr_factor(cos, 20, 10) == pytest.approx(0.0, abs=1e-12)
    step = TrainConfig(epochs=4, schedule="step", lr_milestones=[0.5, 0.75], lr_gamma=0.1)
    assert [lr_factor(step, s, 10) for s in (0, 19, 20, 30, 39)] == pytest.approx([1, 1, 0.1, 0.01, 0.01])
    warm = TrainConfig(epochs=2, schedule="constant", warmup_epochs=1)
    assert lr_factor(warm, 0, 10) == pytest.approx(0.1) and lr_factor(warm, 10, 10) == 1.0


def test_fused_engine_trains_and_resumes_like_any_engine(tmp_path, fmnist_root):
    cfg = small_config(tmp_path, fmnist_root, engine="fused", epochs=2, train_subset=256)
    trainer = Trainer(cfg)
    assert trainer.group.engine.name == "fused"
    trainer.fit(until_epoch=1)
    resumed = Trainer(small_config(tmp_path, fmnist_root, engine="sequential", epochs=2, train_subset=256),
                      resume=tmp_path / "run")  # checkpoints are per network: engines are interchangeable
    assert resumed.group.engine.name == "sequential"
    assert resumed.fit()["epochs"] == 2


def test_fused_sgd_trains_like_the_default(tmp_path, fmnist_root):
    runs = []
    for name, fused in (("plain", False), ("fused", True)):
        trainer = Trainer(small_config(tmp_path, fmnist_root, name=name, epochs=1, train_subset=192, fused_sgd=fused))
        assert trainer.group.optimizers[0].defaults["fused"] is (True if fused else None)
        trainer.fit()
        runs.append(weights(trainer))
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k].float(), runs[1][k].float(), atol=1e-4, rtol=1e-4)


def test_graph_engine_trains_like_eager_and_resumes_from_portable_checkpoints(tmp_path, fmnist_root):
    # The trainer's side of the graph engine, on the CPU with the stand-in graph (tests/helpers.py):
    # cosine schedule into the captured learning rate, metrics read from the ring every 3 steps,
    # then a resume that must drop the captured steps and go on exactly.
    from helpers import graph_engine_on_cpu

    eager = Trainer(small_config(tmp_path, fmnist_root, "eager", engine="sequential", fused_sgd=True, train_subset=640,
                                 perturb_ops=["noise", "mixup"]))
    eager.fit()
    graphed = Trainer(small_config(tmp_path, fmnist_root, "graph", engine="graph", train_subset=640, perturb_ops=["noise", "mixup"]))
    assert graphed.group.optimizers[0].param_groups[0]["fused"] is True
    graph_engine_on_cpu(graphed.group)
    graphed.fit(until_epoch=1)
    assert graphed.group._graph_step.captures >= 2
    state = torch.load(tmp_path / "graph" / "checkpoint.pt", weights_only=True)
    assert all(isinstance(g["lr"], float) for opt in state["optimizers"] for g in opt["param_groups"])
    resumed = Trainer(small_config(tmp_path, fmnist_root, "graph", engine="graph", train_subset=640, perturb_ops=["noise", "mixup"]),
                      resume=tmp_path / "graph")
    graph_engine_on_cpu(resumed.group)
    resumed.fit()
    a, b = weights(eager), weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between the eager and the graph engine"
    assert (tmp_path / "eager" / "steps.csv").read_text() == (tmp_path / "graph" / "steps.csv").read_text()


def test_bn_recalibration_changes_evaluation_only(tmp_path, fmnist_root):
    plain = Trainer(small_config(tmp_path, fmnist_root, "plain", bn_recalibration=0, epochs=1))
    plain.fit()
    recal = Trainer(small_config(tmp_path, fmnist_root, "recal", bn_recalibration=3, epochs=1))
    recal.fit()
    a, b = weights(plain), weights(recal)
    for k in a:  # the running statistics included: the recalibration is undone after evaluating
        assert torch.equal(a[k], b[k]), f"{k} differs: the recalibration leaked into training"
    p = json.loads((tmp_path / "plain" / "epochs.jsonl").read_text())
    r = json.loads((tmp_path / "recal" / "epochs.jsonl").read_text())
    assert "test_acc_running_stats" not in p
    assert r["test_acc_running_stats"] == p["test_acc"] and r["ensemble_acc_running_stats"] == p["ensemble_acc"]
    assert r["test_acc"] != p["test_acc"]  # other statistics, other predictions


def test_recalibrated_batchnorm_is_the_exact_average_and_is_undone():
    from cdfast.engines.batchnorm import recalibrated_batchnorm

    net = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    net[0].running_mean.fill_(5.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 4, 4, generator=g) * 2 + torch.tensor([1.0, -1.0, 3.0]).view(1, 3, 1, 1), None)
               for _ in range(3)]
    net.eval()
    with recalibrated_batchnorm([net], batches):
        means = torch.stack([x.mean((0, 2, 3)) for x, _ in batches]).mean(0)
        variances = torch.stack([x.transpose(0, 1).flatten(1).var(1) for x, _ in batches]).mean(0)
        torch.testing.assert_close(net[0].running_mean, means)
        torch.testing.assert_close(net[0].running_var, variances)
    assert not net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert net[0].momentum == 0.1


def test_summary_teacher_share_is_step_weighted_and_shared_by_grid_records():
    from cdfast.train.metrics import summarize_epochs

    epochs = [{"epoch": 1, "step": 10, "test_acc": [0.5, 0.6], "ensemble_acc": 0.62, "teacher_share": [1.0, 0.0]},
              {"epoch": 2, "step": 40, "test_acc": [0.7, 0.65], "ensemble_acc": 0.71, "teacher_share": [0.0, 1.0]}]
    s = summarize_epochs(epochs)
    assert s["teacher_share"] == pytest.approx([0.25, 0.75])  # 10 of 40 steps had network 0 teaching
    assert s["best_acc"] == [0.7, 0.65] and s["best_epoch"] == [2, 2] and s["final_acc"] == [0.7, 0.65]
    assert summarize_epochs([]) == {"epochs": 0}


def test_an_evaluation_leaves_the_random_number_generators_as_they_were():
    """Dropout draws in the recalibration's train-mode forwards must not shift training's random streams."""
    import torch.nn as nn

    from cdfast import CompetitiveDistillation
    from cdfast.train.evaluate import evaluate_group

    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64), nn.Dropout(0.5), nn.Linear(64, 10)) for _ in range(2)]
    group = CompetitiveDistillation(nets, perturb=False)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(3)]
    before = torch.get_rng_state()
    metrics = evaluate_group(group, batches, lambda x: x, torch.device("cpu"), calibration=batches)
    assert torch.equal(torch.get_rng_state(), before)
    assert set(metrics) >= {"test_acc", "test_acc_running_stats"}
