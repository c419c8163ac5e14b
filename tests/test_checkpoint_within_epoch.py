"""Checkpoints within an epoch and stopping on SIGTERM / SIGINT: a run stopped or crashed mid-epoch
continues from its last checkpoint exactly as if it had never stopped."""

import csv
import json
import os
import pickle
import signal
import time

import pytest
import torch

from cdfast.cli import main
from cdfast.data import TensorLoader
from cdfast.engines import split_engine_name
from cdfast.experiment import Grid, run_dir, run_grid
from cdfast.train import NonFiniteLossError, Trainer, TrainConfig, load_checkpoint
from cdfast.train.metrics import StepBuffer
from cdfast.train.trainer import TrainingStopped

# 512 images in batches of 64: 8 steps an epoch; metrics are read every 3 steps
STEPS_PER_EPOCH = 8


def config(root, out, **kw):
    values = dict(data_dir=str(root), train_subset=512, test_subset=256, batch_size=64, eval_batch_size=256,
                  epochs=2, out=str(out), progress=False, tensorboard=False, plots=False, log_interval=3,
                  device="cpu", checkpoint_minutes=0.0)  # competitive mode: perturbations on
    values.update(kw)
    return TrainConfig(**values)


_straight: dict = {}


@pytest.fixture
def straight(tmp_path_factory, fmnist_root):
    """A run that never stopped: its weights and records (trained once for the module)."""
    if not _straight:
        out = tmp_path_factory.mktemp("straight") / "run"
        trainer = Trainer(config(fmnist_root, out))
        trainer.fit()
        _straight.update(run_record(trainer, out))
    return _straight


def weights(trainer):
    return {k: v.clone() for k, v in trainer.group.state_dict().items()}


def step_rows(out):
    with open(out / "steps.csv", newline="") as f:
        return list(csv.DictReader(f))


def epoch_records(out):
    timing = {"train_seconds", "images_per_second"}
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (out / "epochs.jsonl").read_text().splitlines()]


def run_record(trainer, out):
    """What a run that never stopped must be matched on: its weights and records (timings left out)."""
    return {"weights": weights(trainer), "steps": step_rows(out), "epochs": epoch_records(out)}


def assert_same_run(straight, trainer, out):
    a, b = straight["weights"], weights(trainer)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs from the run that never stopped"
    assert step_rows(out) == straight["steps"]
    assert epoch_records(out) == straight["epochs"]


def assert_resumes_to(expected, out):
    """Resume the run in ``out`` to its end: it must be the run ``expected`` describes, bit for bit."""
    resumed = Trainer(resume=out)
    resumed.fit()
    assert_same_run(expected, resumed, out)


def at_step(monkeypatch, step, action):
    """Run ``action()`` as the trainer records ``step`` (just after that step trained)."""
    add = StepBuffer.add

    def add_then_act(self, s, epoch, result):
        add(self, s, epoch, result)
        if s == step:
            action()

    monkeypatch.setattr(StepBuffer, "add", add_then_act)


def send(signum):
    return lambda: os.kill(os.getpid(), signum)


class Crash(RuntimeError):
    pass


def crash():
    raise Crash("the machine went away")


def test_loader_continues_at_the_batch_after_its_saved_state():
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randint(0, 256, (203, 1, 8, 8), dtype=torch.uint8, generator=g), torch.arange(203) % 10

    def loader():
        return TensorLoader(images, labels, 32, mean=(0.5,), std=(0.25,), shuffle=True, drop_last=True,
                            augment_pad=2, seed=3)

    one = loader()
    expected = [batch for _ in range(2) for batch in one]  # two epochs, never stopped

    two = loader()
    epoch = iter(two)
    seen = [next(epoch) for _ in range(4)]
    state = two.state_dict()
    assert state["next_batch"] == 4 and state["epoch_order"].shape == (203,)
    three = loader()
    three.load_state_dict(state)
    assert three.state_dict()["next_batch"] == 4  # loaded, not iterated yet: a checkpoint now keeps the position
    seen += list(three) + list(three)  # the rest of epoch 1, then epoch 2
    assert len(seen) == len(expected)
    for (x, y), (ex, ey) in zip(seen, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)

    assert "next_batch" not in three.state_dict()  # between epochs there is no position
    epoch = iter(three)
    next(epoch)
    epoch.close()  # an abandoned iteration: the next one is a new epoch, not its rest
    assert "next_batch" not in three.state_dict() and len(list(three)) == len(three)
    with pytest.raises(ValueError, match="another data set"):
        loader().load_state_dict({**state, "next_batch": len(three)})
    with pytest.raises(ValueError, match="another data set"):
        loader().load_state_dict({**state, "epoch_order": state["epoch_order"][:100]})


def test_a_crash_mid_epoch_resumes_from_the_checkpoint_within_it(tmp_path, fmnist_root, monkeypatch, straight):
    out = tmp_path / "run"
    # checkpoint at every metric read (a tiny interval), crash at step 13: epoch 2, batch 5
    at_step(monkeypatch, 13, crash)
    with pytest.raises(Crash):
        Trainer(config(fmnist_root, out, checkpoint_minutes=1e-9)).fit()
    monkeypatch.undo()
    saved = load_checkpoint(out / "checkpoint.pt")
    # epoch 2's metric reads come after its batches 3 and 6: the last before the crash is batch 3 (step 11)
    assert (saved["epoch"], saved["step"]) == (1, 11)
    assert saved["epoch_progress"]["batches"] == 3 and saved["train_loader"]["next_batch"] == 3
    assert len(step_rows(out)) == 11  # steps 12 and 13 were not read yet when it crashed

    resumed = Trainer(resume=out)
    assert (resumed.epoch, resumed.step) == (1, 11)
    assert len(step_rows(out)) == 11  # rows after the checkpoint are cut back
    resumed.fit()
    assert_same_run(straight, resumed, out)


def test_sigterm_stops_after_a_checkpoint_and_the_run_continues_exactly(tmp_path, fmnist_root, monkeypatch,
                                                                         straight, capfd):
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    at_step(monkeypatch, 10, send(signal.SIGTERM))  # epoch 2, batch 2: the next metric read is after batch 3
    with pytest.raises(TrainingStopped, match=r"stopped on SIGTERM\. The last checkpoint \(epoch 2 after batch 3 of 8, "
                                              r"step 11\) in .* is intact; continue with --resume") as stop:
        Trainer(config(fmnist_root, out)).fit()
    assert stop.value.exit_code == 128 + signal.SIGTERM
    assert ("SIGTERM: stopping at the next metric read (within 3 steps), or before the epoch's evaluation, after a "
            "checkpoint") in capfd.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 11
    monkeypatch.undo()
    assert_resumes_to(straight, out)


def test_a_stop_in_an_epochs_last_steps_does_not_wait_for_its_evaluation(tmp_path, fmnist_root, monkeypatch,
                                                                          straight):
    """The evaluation can take minutes (ImageNet), longer than a scheduler's grace period: a stop that comes
    after the epoch's last metric read checkpoints as the training ends, and the resume evaluates."""
    out = tmp_path / "run"
    at_step(monkeypatch, STEPS_PER_EPOCH, send(signal.SIGINT))  # the epoch's last step: no metric read follows
    evaluated = []
    monkeypatch.setattr(Trainer, "evaluate", lambda self, **kw: evaluated.append(1))
    with pytest.raises(TrainingStopped, match=r"stopped on SIGINT\. The last checkpoint \(epoch 1 after its last "
                                              r"batch, before its evaluation, step 8\)") as stop:
        Trainer(config(fmnist_root, out)).fit()
    assert stop.value.exit_code == 130 and not evaluated
    saved = load_checkpoint(out / "checkpoint.pt")
    assert (saved["epoch"], saved["step"]) == (0, 8) and saved["epoch_progress"]["evaluation_pending"]
    assert not (out / "epochs.jsonl").exists() or not (out / "epochs.jsonl").read_text()
    monkeypatch.undo()
    assert_resumes_to(straight, out)


def during_evaluation(monkeypatch, action, after=False):
    """Run ``action()`` as the trainer's next evaluation starts (``after``: as it ends)."""
    evaluate = Trainer.evaluate

    def wrapped(self, **kw):
        if not after:
            action()
        metrics = evaluate(self, **kw)
        if after:
            action()
        return metrics

    monkeypatch.setattr(Trainer, "evaluate", wrapped)


def test_a_stop_during_the_evaluation_ends_it_and_the_resume_evaluates(tmp_path, fmnist_root, monkeypatch,
                                                                     straight):
    """The signal comes during the second pass, the one with BatchNorm statistics recalibrated: the stop
    puts them (and the random number generators) back before it checkpoints."""
    import cdfast.train.evaluate as evaluation

    out = tmp_path / "run"
    once, calls = evaluation.evaluate_once, []

    def evaluate_once(*args, **kw):
        calls.append(1)
        if len(calls) == 2:  # the recalibrated pass of epoch 1's evaluation
            send(signal.SIGTERM)()
        return once(*args, **kw)

    monkeypatch.setattr(evaluation, "evaluate_once", evaluate_once)
    with pytest.raises(TrainingStopped, match=r"stopped on SIGTERM\. The last checkpoint \(epoch 1 after its last "
                                              r"batch, before its evaluation, step 8\)"):
        Trainer(config(fmnist_root, out)).fit()
    saved = load_checkpoint(out / "checkpoint.pt")
    assert (saved["epoch"], saved["step"]) == (0, 8) and saved["epoch_progress"]["evaluation_pending"]
    assert saved["epoch_progress"]["engine"] == "sequential"
    monkeypatch.undo()
    assert_resumes_to(straight, out)


def test_changes_on_a_resume_that_only_evaluates_apply_from_the_next_epoch(tmp_path, fmnist_root, monkeypatch):
    out = tmp_path / "run"
    at_step(monkeypatch, STEPS_PER_EPOCH, send(signal.SIGTERM))
    with pytest.raises(TrainingStopped, match="before its evaluation"):
        Trainer(config(fmnist_root, out)).fit()
    monkeypatch.undo()
    with pytest.raises(ValueError, match="has trained all 1 epochs"):
        Trainer(resume=out, overrides={"epochs": 1, "alpha": 0.5}, allow_changes=True)
    Trainer(resume=out, overrides={"alpha": 0.5}, allow_changes=True).fit()
    change = json.loads((out / "changes.jsonl").read_text())
    assert (change["first_step"], change["epoch"]) == (STEPS_PER_EPOCH + 1, 2)
    assert [r["epoch"] for r in epoch_records(out)] == [1, 2]


def test_ctrl_c_twice_stops_at_once_and_a_repeated_sigterm_is_ignored(tmp_path, fmnist_root, monkeypatch):
    out = tmp_path / "ctrl-c"
    before = signal.getsignal(signal.SIGINT)
    at_step(monkeypatch, 10, lambda: (send(signal.SIGINT)(), send(signal.SIGINT)()))
    with pytest.raises(KeyboardInterrupt):
        Trainer(config(fmnist_root, out)).fit()
    assert load_checkpoint(out / "checkpoint.pt")["step"] == STEPS_PER_EPOCH  # epoch 1's, nothing newer
    assert signal.getsignal(signal.SIGINT) == before

    # Slurm signals every process of the job and torchrun forwards the signal again: one stop, with its checkpoint
    monkeypatch.undo()
    out = tmp_path / "sigterm"
    at_step(monkeypatch, 10, lambda: (send(signal.SIGTERM)(), send(signal.SIGTERM)()))
    trainer = Trainer(config(fmnist_root, out))
    with pytest.raises(TrainingStopped, match="after batch 3 of 8, step 11"):
        trainer.fit()
    with pytest.raises(RuntimeError, match=r"stopped on SIGTERM; continue the run with Trainer\(resume="):
        trainer.fit()  # its epoch is half done: only a resume from the checkpoint continues it exactly


def test_a_loader_that_resumes_only_at_epoch_starts_stops_without_a_checkpoint_within_the_epoch(
        tmp_path, fmnist_root, monkeypatch, capsys, straight):
    out = tmp_path / "run"
    trainer = Trainer(config(fmnist_root, out, checkpoint_minutes=1e-9))
    trainer.data.train.resumes_mid_epoch = False  # a loader without a state within the epoch (cdfast's all have one)
    at_step(monkeypatch, 10, send(signal.SIGTERM))
    with pytest.raises(TrainingStopped, match=r"The last checkpoint \(epoch 1, step 8\)"):
        trainer.fit()
    assert "the 3 steps of epoch 2 are trained again on resume" in capsys.readouterr().out
    assert load_checkpoint(out / "checkpoint.pt")["step"] == STEPS_PER_EPOCH
    monkeypatch.undo()
    assert_resumes_to(straight, out)


def test_checkpoints_come_every_checkpoint_minutes(tmp_path, fmnist_root, monkeypatch):
    """On a clock that moves one minute a step, with reads every step: a checkpoint once 2.5 minutes have
    passed since the last one (epoch ends included)."""
    import cdfast.train.trainer as trainer_module

    clock = {"minutes": 0}
    fake_time = type("FakeTime", (), {"monotonic": staticmethod(lambda: 60.0 * clock["minutes"]),
                                      "perf_counter": staticmethod(time.perf_counter),
                                      "strftime": staticmethod(time.strftime)})
    monkeypatch.setattr(trainer_module, "time", fake_time)
    saves = []
    save = Trainer.save_checkpoint

    def recording(self, progress=None):
        saves.append(self.step)
        return save(self, progress)

    monkeypatch.setattr(Trainer, "save_checkpoint", recording)
    add = StepBuffer.add

    def tick(self, step, epoch, result):
        clock["minutes"] += 1
        add(self, step, epoch, result)

    monkeypatch.setattr(StepBuffer, "add", tick)
    Trainer(config(fmnist_root, tmp_path / "run", log_interval=1, checkpoint_minutes=2.5)).fit()
    assert saves == [3, 6, 8, 11, 14, 16]


def test_weights_that_went_non_finite_are_never_checkpointed_within_an_epoch(tmp_path, fmnist_root, monkeypatch):
    out = tmp_path / "run"
    trainer = Trainer(config(fmnist_root, out, checkpoint_minutes=1e-9))
    # a BatchNorm buffer: training uses batch statistics, so no loss shows it before the checkpoint would
    buffer = next(b for name, b in trainer.group.networks[0].named_buffers() if name.endswith("running_mean"))
    at_step(monkeypatch, 11, lambda: buffer.fill_(float("nan")))
    with pytest.raises(NonFiniteLossError, match=r"network 0 \(resnet8\) has non-finite weights after step 11 "
                                                 r"\(epoch 2\).*The last checkpoint \(epoch 1, step 8\)"):
        trainer.fit()
    assert load_checkpoint(out / "checkpoint.pt")["step"] == STEPS_PER_EPOCH


def test_cli_exits_with_the_signal_code_and_says_how_to_continue(tmp_path, fmnist_root, monkeypatch, capsys):
    out = tmp_path / "cli"
    args = ["train", "--data-dir", str(fmnist_root), "--train-subset", "512", "--test-subset", "256",
            "--batch-size", "64", "--epochs", "2", "--log-interval", "3", "--out", str(out), "--no-progress",
            "--no-tensorboard", "--no-plots", "--device", "cpu"]
    at_step(monkeypatch, 4, send(signal.SIGTERM))
    assert main(args) == 128 + signal.SIGTERM
    assert f"continue with --resume {out}" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert "resumed from epoch 1 after batch 6 of 8, step 6" in capsys.readouterr().out


def test_a_stopped_grid_continues_its_run_within_the_epoch(tmp_path, fmnist_root, monkeypatch, capsys):
    grid = Grid(base={"data_dir": str(fmnist_root), "train_subset": 512, "test_subset": 100, "batch_size": 64,
                      "eval_batch_size": 100, "epochs": 1, "device": "cpu", "tensorboard": False, "plots": False,
                      "progress": False, "log_interval": 2},
                groups={"pair": ["resnet8", "resnet8"]}, methods={"cd": {"mode": "competitive"}}, seeds=[0, 1])
    out = tmp_path / "grid"
    at_step(monkeypatch, 5, send(signal.SIGTERM))
    with pytest.raises(TrainingStopped):
        run_grid(grid, out)
    monkeypatch.undo()
    assert load_checkpoint(run_dir(out, "pair", "cd", 0) / "checkpoint.pt")["step"] == 6
    assert not run_dir(out, "pair", "cd", 1).exists()  # the grid stopped: it did not go on to the next run
    results = run_grid(grid, out)
    assert "[1/2] pair / cd / seed 0: resuming" in capsys.readouterr().out
    assert len(results.read_text().splitlines()) == 2


def test_a_stop_as_a_grid_run_finishes_stops_the_grid_before_the_next_run(tmp_path, fmnist_root, monkeypatch,
                                                                          capsys):
    grid = Grid(base={"data_dir": str(fmnist_root), "train_subset": 512, "test_subset": 100, "batch_size": 64,
                      "eval_batch_size": 100, "epochs": 1, "device": "cpu", "tensorboard": False, "plots": False,
                      "progress": False, "log_interval": 3},
                groups={"pair": ["resnet8", "resnet8"]}, methods={"ind": {"mode": "independent"}}, seeds=[0, 1])
    out = tmp_path / "grid"
    during_evaluation(monkeypatch, send(signal.SIGTERM), after=True)  # as the run's last evaluation ends
    with pytest.raises(TrainingStopped, match="after run pair / ind / seed 0 finished"):
        run_grid(grid, out)
    monkeypatch.undo()
    assert len((out / "results.jsonl").read_text().splitlines()) == 1
    assert not run_dir(out, "pair", "ind", 1).exists()
    run_grid(grid, out)
    assert "[1/2] pair / ind / seed 0: finished earlier, skipped" in capsys.readouterr().out
    # a stop as the grid's last run to train finishes: nothing is left, the grid ends as usual
    grid.seeds = [0, 1, 2]
    during_evaluation(monkeypatch, send(signal.SIGTERM), after=True)
    assert run_grid(grid, out).read_text().count("\n") == 3


@pytest.fixture
def image_folder(tmp_path, fmnist_root):
    from PIL import Image

    from cdfast.data import load_fashion_mnist

    x, y = load_fashion_mnist(fmnist_root)["test"]
    for i in range(42):
        folder = tmp_path / "images" / f"class_{int(y[i]) % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i, 0].numpy()).save(folder / f"{i}.png")
    return tmp_path / "images"


@pytest.mark.parametrize("data", ["imagefolder", "dali"])
def test_a_stopped_run_continues_exactly_with_image_folders_and_dali(tmp_path, image_folder, fmnist_root, monkeypatch,
                                                                      data):
    if data == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
        kw = dict(loader="dali", perturb_ops=["noise", "mixup", "cutmix"], train_subset=256, test_subset=64)
    else:  # 42 images of 12x12 in batches of 8: 5 steps an epoch
        root = tmp_path / "data"  # the same images as train and val splits
        root.mkdir()
        (root / "train").symlink_to(image_folder)
        (root / "val").symlink_to(image_folder)
        kw = dict(data="imagefolder", data_dir=str(root), image_size=12, batch_size=8, eval_batch_size=16,
                  workers=0, train_subset=None, test_subset=None, perturb_ops=["crop", "noise", "mixup"])
    straight = Trainer(config(fmnist_root, tmp_path / "straight", **kw))
    straight.fit()
    expected = run_record(straight, tmp_path / "straight")
    out = tmp_path / "run"
    at_step(monkeypatch, straight.steps_per_epoch + 1, send(signal.SIGTERM))
    with pytest.raises(TrainingStopped, match=r"epoch 2 after batch 3 of"):
        Trainer(config(fmnist_root, out, **kw)).fit()
    monkeypatch.undo()
    assert_resumes_to(expected, out)


def test_a_stopped_graph_engine_run_continues_exactly(tmp_path, fmnist_root, monkeypatch):
    """The graph engine's side of a stop, on the CPU stand-in of its CUDA graphs (tests/helpers.py): the
    metrics come from its ring, the checkpoint within the epoch holds plain learning rates, and the
    resume captures its graphs again; the result is the eager run's, bit for bit."""
    from helpers import graph_engine_on_cpu

    kw = dict(fused_sgd=True, perturb_ops=["noise", "mixup"])
    eager = Trainer(config(fmnist_root, tmp_path / "eager", engine="sequential", **kw))
    eager.fit()
    expected = run_record(eager, tmp_path / "eager")
    out = tmp_path / "graph"
    trainer = Trainer(config(fmnist_root, out, engine="graph", **kw))
    graph_engine_on_cpu(trainer.group)
    at_step(monkeypatch, 10, send(signal.SIGTERM))
    with pytest.raises(TrainingStopped, match="after batch 3 of 8, step 11"):
        trainer.fit()
    assert trainer.group._graph_step.captures >= 1
    monkeypatch.undo()
    resumed = Trainer(resume=out)
    graph_engine_on_cpu(resumed.group)
    resumed.fit()
    for k, v in expected["weights"].items():
        assert torch.equal(v, weights(resumed)[k]), f"{k} differs from the eager run"
    assert step_rows(out) == expected["steps"]
    # the graph engine's learning rate is a float32 tensor (captured): its record reads 0.05000000074505806
    others = lambda records: [{k: v for k, v in r.items() if k not in ("engine", "lr")} for r in records]  # noqa: E731
    assert others(epoch_records(out)) == others(expected["epochs"])
    assert [r["lr"] for r in epoch_records(out)] == pytest.approx([r["lr"] for r in expected["epochs"]], rel=1e-6)


CUDA_RUNS = {  # the trainer's whole path on a GPU: GPU-resident loader, engine, evaluation, checkpoints
    "graph": dict(engine="graph"),
    "streams-bf16-channels-last": dict(engine="streams", amp=True, channels_last=True),
    "fused-channels-last": dict(engine="fused", channels_last=True),
}


@pytest.fixture
def deterministic_cudnn_after_the_trainer(monkeypatch):
    """The Trainer turns cuDNN autotuning on; a test comparing two runs on a GPU turns it off again
    after building each Trainer (``.fix()``) and gets back the settings it found."""
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic

    class Fix:
        @staticmethod
        def fix():
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True

    yield Fix
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


@pytest.mark.cuda
@pytest.mark.parametrize("variant", list(CUDA_RUNS))
def test_cuda_training_stopped_within_an_epoch_continues(tmp_path, monkeypatch, variant,
                                                         deterministic_cudnn_after_the_trainer):
    """On a GPU: a training run (engine, precision and layout as named) stopped by SIGTERM within an
    epoch and resumed ends where an uninterrupted run ends. Synthetic images: the GPU machine has no
    Fashion-MNIST, and this tests the machinery, not accuracy."""
    from helpers import synthetic_fashion_mnist

    fmnist_root = synthetic_fashion_mnist(tmp_path / "data")
    kw = dict(device="cuda", perturb_ops=["noise", "mixup"], **CUDA_RUNS[variant])
    tolerance = 2e-2 if kw.get("amp") else 1e-4  # bf16 rounds differently where an algorithm does

    def trainer(*args, **kwargs):
        t = Trainer(*args, **kwargs)
        deterministic_cudnn_after_the_trainer.fix()
        return t

    straight = trainer(config(fmnist_root, tmp_path / "straight", **kw))
    straight.fit()
    assert straight.group.engine.name == split_engine_name(kw["engine"])[0]  # no fallback
    out = tmp_path / "stopped"
    at_step(monkeypatch, 10, send(signal.SIGTERM))
    with pytest.raises(TrainingStopped, match="after batch 3 of 8, step 11"):
        trainer(config(fmnist_root, out, **kw)).fit()
    monkeypatch.undo()
    resumed = trainer(resume=out)
    resumed.fit()
    a, b = weights(straight), weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=tolerance, rtol=tolerance, msg=lambda m: f"{k}: {m}")
    assert [r["step"] for r in step_rows(out)] == [r["step"] for r in step_rows(tmp_path / "straight")]
    assert [r["epoch"] for r in epoch_records(out)] == [1, 2]


def test_a_checkpoint_whose_loader_position_and_progress_disagree_is_refused(tmp_path, fmnist_root, monkeypatch):
    out = tmp_path / "run"
    at_step(monkeypatch, 10, send(signal.SIGTERM))
    with pytest.raises(TrainingStopped):
        Trainer(config(fmnist_root, out)).fit()
    state = load_checkpoint(out / "checkpoint.pt")
    del state["epoch_progress"]
    torch.save(state, out / "checkpoint.pt")
    with pytest.raises(ValueError, match="does not fit this data set's loader: its loader's position within the "
                                         "epoch and the epoch's progress disagree"):
        Trainer(resume=out / "checkpoint.pt")


def test_image_folder_batches_continue_exactly_and_do_not_depend_on_workers_or_ranks(image_folder):
    from cdfast.data import FolderLoader

    def loader(workers=0, rank=0, world=1):
        return FolderLoader(image_folder, True, 8, workers, 12, 1, seed=4, rank=rank, world=world)

    one = loader()
    rng = torch.get_rng_state()
    expected = [batch for _ in range(2) for batch in one]  # two epochs of 5 batches (42 images, 2 dropped)
    assert len(expected) == 10
    assert torch.equal(torch.get_rng_state(), rng)  # the augmentation leaves torch's global stream alone

    two = loader(workers=2)
    epoch = iter(two)
    seen = [next(epoch) for _ in range(2)]  # its workers have read ahead: the state counts what it handed out
    state = two.state_dict()
    assert state["next_batch"] == 2
    del epoch
    three = loader()
    three.load_state_dict(state)
    assert three.state_dict()["next_batch"] == 2  # loaded, not iterated yet: a checkpoint now keeps the position
    seen += list(three) + list(three)
    assert len(seen) == len(expected)
    for (x, y), (ex, ey) in zip(seen, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)

    halves = [list(loader(rank=r, world=2)) for r in range(2)]  # a data-parallel rank augments its share alike
    for (x0, y0), (x1, y1), (x, y) in zip(*halves, expected[:5]):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    with pytest.raises(ValueError, match="saved for other data"):
        loader().load_state_dict({**state, "next_batch": 5})
    with pytest.warns(UserWarning, match="predates per-sample seeds"):  # a checkpoint of an earlier cdfast
        loader().load_state_dict({"generator": state["generator"]})
    # workers started by spawn / forkserver (macOS, Python 3.14 on Linux) unpickle the dataset
    dataset = pickle.loads(pickle.dumps(one.loader.dataset))
    assert torch.equal(dataset[(3, 7)][0], one.loader.dataset[(3, 7)][0])
    four = loader()
    four.load_state_dict(state)
    four.load_state_dict(three.state_dict())  # an epoch-end state after a mid-epoch one: the position is gone
    assert len(list(four)) == 5
    # each epoch draws new crops: the seeds of its samples differ from the last epoch's
    sampler = loader().sampler
    seeds = [[seed for batch in sampler for _, seed in batch] for _ in range(2)]
    assert len(set(seeds[0])) == 40 and not set(seeds[0]) & set(seeds[1])
