"""Kill a training process at the worst moments; every resume must work and end bit-identical.

One run is killed (SIGKILL, nothing flushed) again and again, each time resumed from
whatever the previous kill left: inside a step before the first checkpoint, inside the
first checkpoint write, right after an epochs.jsonl append, between keeping the
previous checkpoint and putting the new one in place, halfway through a steps.csv row,
between the two record rewrites of a resume, then its latest checkpoint is corrupted
and it is killed once more. Its final weights and records must equal those of a run
that was never interrupted.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DRIVER = Path(__file__).with_name("fault_driver.py")
# 3 epochs x 3 steps; a row per step, so every kill lands between known records.
CONFIG = dict(train_subset=96, test_subset=64, batch_size=32, eval_batch_size=64, epochs=3, log_interval=1,
              device="cpu", progress=False, tensorboard=False, plots=False, models=["resnet8", "resnet8"])
KNOWN = {".cdfast-run", "config.yaml", "steps.csv", "epochs.jsonl", "checkpoint.pt", "checkpoint.prev.pt",
         "checkpoint.corrupt.pt", "summary.txt"}
TIMINGS = ("train_seconds", "images_per_second")


def drive(config: dict, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run([sys.executable, str(DRIVER), json.dumps(config), str(run_dir), *extra],
                          capture_output=True, text=True, env=env, timeout=300)


def records(run_dir: Path) -> tuple[list[str], list[dict]]:
    steps = (run_dir / "steps.csv").read_text().splitlines()
    epochs = [json.loads(line) for line in (run_dir / "epochs.jsonl").read_text().splitlines()]
    return steps, [{k: v for k, v in e.items() if k not in TIMINGS} for e in epochs]


@pytest.mark.slow
def test_killed_again_and_again_resumes_bit_identical(tmp_path, fmnist_root):
    config = dict(CONFIG, data_dir=str(fmnist_root))
    reference = drive(config, tmp_path / "reference", "--weights", str(tmp_path / "reference.pt"))
    assert reference.returncode == 0, reference.stderr

    run = tmp_path / "run"
    chain = [
        ("step:2", False),          # before any checkpoint: the folder has rows but no checkpoint
        ("ckpt-write:1", True),     # half of the first checkpoint on disk: resume starts from step 0
        ("epoch-record:2", True),   # epoch 2 recorded, its checkpoint never written
        ("ckpt-rotate:1", True),    # latest kept as previous, the new one not yet in place
        ("steps-row:2", True),      # half a steps.csv row
        ("records-rewrite:1", True),  # steps.csv cut back to the checkpoint, epochs.jsonl not yet
        ("step:5", True),           # epoch 2 checkpointed in this process, killed in epoch 3
        ("corrupt", None),          # bit rot in the latest checkpoint (epoch 2)
        ("step:5", True),           # falls back to epoch 1 (warning), sets the bad file aside, killed in epoch 3
    ]
    for kill, resume in chain:
        if kill == "corrupt":
            (run / "checkpoint.pt").write_bytes(b"\x00" * 100)
            continue
        result = drive(config, run, *(["--resume"] if resume else []), "--kill", kill)
        assert result.returncode == -9, f"{kill}: the kill point was not reached\n{result.stderr}"
        names = {p.name for p in run.iterdir()}
        assert not {n for n in names if not n.endswith(".tmp")} - KNOWN, names
    assert "resuming from the previous checkpoint" in result.stderr
    assert (run / "checkpoint.corrupt.pt").exists()
    assert torch.load(run / "checkpoint.prev.pt", weights_only=True)["epoch"] == 1  # never the corrupt one

    final = drive(config, run, "--resume", "--weights", str(tmp_path / "final.pt"))
    assert final.returncode == 0, final.stderr

    expected, got = torch.load(tmp_path / "reference.pt"), torch.load(tmp_path / "final.pt")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs from the uninterrupted run"
    assert records(run) == records(tmp_path / "reference")
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
