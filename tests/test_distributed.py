"""Data parallelism on torch.distributed (gloo, 2 processes, loopback): one election for the global
batch, the same update as one process on the global batch, agreed perturbation choices, and a dead rank."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import cdfast

DRIVER = Path(__file__).with_name("distributed_driver.py")
sys.path.insert(0, str(DRIVER.parent))
import distributed_driver as driver  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def launch(scenario: str, tmp_path: Path, world: int = 2, env: dict | None = None, timeout: float = 240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    (tmp_path / "rendezvous").unlink(missing_ok=True)  # an earlier job's in the same folder would mislead gloo
    procs = [subprocess.Popen([sys.executable, str(DRIVER), scenario, str(tmp_path), str(r), str(world)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for r, p in enumerate(procs):
        if scenario not in ("dead-rank",):
            assert p.returncode == 0, f"rank {r} failed:\n{outputs[r][-3000:]}"
    return [torch.load(tmp_path / f"rank-{r}.pt", weights_only=False) if (tmp_path / f"rank-{r}.pt").exists()
            else None for r in range(world)]


@pytest.mark.parametrize("teachers", ["best", "all-better"])
def test_two_ranks_elect_one_teacher_and_step_like_one_process(tmp_path, teachers):
    ranks = launch("group", tmp_path, env={"CDFAST_TEACHERS": teachers})
    assert ranks[0]["steps"] == ranks[1]["steps"]  # the same teacher on both ranks, every step
    single = driver.make_group(process_group=None, teachers=teachers)
    want = []
    for x, y in driver.batches():
        want.append(int(single.step(x, y).teacher))
    assert [t for t, _, _ in ranks[0]["steps"]] == want  # and the one a single process elects on the global batch
    for name, value in single.state_dict().items():
        for r in (0, 1):  # the same weights as one process on the global batch (float rounding of the all-reduce)
            torch.testing.assert_close(ranks[r]["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_perturbation_choices_agree_and_draws_differ_across_ranks(tmp_path):
    ranks = launch("perturbed", tmp_path)
    assert ranks[0]["steps"] == ranks[1]["steps"]  # teacher, perturbed network and op agree
    assert any(p >= 0 for _, p, _ in ranks[0]["steps"])
    assert ranks[0]["device_seed"] != ranks[1]["device_seed"]  # the ops' own draws differ per rank
    alone = driver.make_group(process_group=None, perturb=True)
    assert alone.pool.rng.on(torch.device("cpu")).initial_seed() == ranks[0]["device_seed"]  # rank 0 = one process


def test_functional_election_is_global(tmp_path):
    ranks = launch("functional", tmp_path)
    assert [r["local"] for r in ranks] == [0, 1]  # the shards alone disagree...
    assert [r["teacher"] for r in ranks] == [1, 1]  # ...the global batch elects network 1 on both ranks
    assert not torch.equal(ranks[0]["ce"], ranks[1]["ce"])  # ce stays each rank's own mean


@pytest.mark.parametrize("teachers", ["best", "all-better"])
def test_one_network_per_rank_steps_like_one_process_holding_the_group(tmp_path, teachers):
    ranks = launch("placement", tmp_path, env={"CDFAST_TEACHERS": teachers})
    assert ranks[0]["steps"] == ranks[1]["steps"]  # the same election, choices and CEs on both ranks
    single = driver.make_group(process_group=None, perturb=True, teachers=teachers, n=2)
    for (teacher, perturbed, op, ce), (x, y) in zip(ranks[0]["steps"], driver.batches()):
        out = single.step(x, y)
        assert (int(out.teacher), out.perturbed, out.perturbation) == (teacher, perturbed, op)
        assert ce == pytest.approx(out.ce.tolist(), abs=1e-4)
    assert any(p >= 0 for _, p, _, _ in ranks[0]["steps"])
    for r in (0, 1):  # rank r's network ends where network r of the one-process group does
        for name, value in single.networks[r].state_dict().items():
            torch.testing.assert_close(ranks[r]["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path, fmnist_root):
    t0 = time.perf_counter()
    ranks = launch("trainer-nan", tmp_path, timeout=180)
    assert "non-finite" in ranks[1]["error"]  # the rank that saw it
    assert "another rank found a non-finite loss" in ranks[0]["error"]  # and the other, at the same step
    assert time.perf_counter() - t0 < 150  # nobody waited for a collective timeout
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # nothing of the broken epoch was saved


def test_a_stop_signal_on_one_rank_stops_every_rank_at_one_checkpoint_and_the_run_resumes_exactly(tmp_path,
                                                                                                  fmnist_root):
    straight = launch("fit-straight", tmp_path)
    stopped = launch("fit-stop", tmp_path)
    # only rank 0 got the SIGTERM (at step 3); both stop after the checkpoint at the next metric read
    assert [r["step"] for r in stopped] == [4, 4]
    assert "stopped on SIGTERM" in stopped[0]["stopped"]
    assert "stopped: another rank got a stop signal" in stopped[1]["stopped"]
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (saved["epoch"], saved["step"], saved["epoch_progress"]["batches"]) == (0, 4, 4)
    resumed = launch("fit-resume", tmp_path)
    for rank in range(2):
        assert resumed[rank]["step"] == straight[rank]["step"] == 16
        for k, v in straight[rank]["params"].items():
            assert torch.equal(v, resumed[rank]["params"][k]), f"rank {rank}: {k} differs after the resume"


def test_a_stop_in_an_epochs_last_steps_on_one_rank_leaves_the_evaluation_to_the_resume(tmp_path, fmnist_root):
    straight = launch("fit-straight", tmp_path)
    stopped = launch("fit-stop-late", tmp_path)
    assert [r["step"] for r in stopped] == [8, 8]  # every rank trained the epoch, none evaluated it
    assert "stopped: another rank got a stop signal" in stopped[0]["stopped"]
    assert "before its evaluation" in stopped[1]["stopped"]
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (0, 8) and saved["epoch_progress"]["evaluation_pending"]
    resumed = launch("fit-resume", tmp_path)
    for rank in range(2):
        assert resumed[rank]["step"] == straight[rank]["step"] == 16
        for k, v in straight[rank]["params"].items():
            assert torch.equal(v, resumed[rank]["params"][k]), f"rank {rank}: {k} differs after the resume"


def test_a_rank_that_dies_stops_the_others_with_an_error(tmp_path):
    t0 = time.perf_counter()
    ranks = launch("dead-rank", tmp_path, timeout=120)
    assert ranks[1] is None  # it died without writing anything
    assert "error" in ranks[0], "the surviving rank kept stepping without noticing"
    assert time.perf_counter() - t0 < 90


def test_without_torch_distributed_the_group_is_one_process():
    group = driver.make_group()
    assert group.process_group is None and (group.rank, group.world_size) == (0, 1)
    with pytest.raises(ValueError, match="process_group must be 'auto', None"):
        driver.make_group(process_group="everyone")
    with pytest.raises(RuntimeError, match="not initialised"):
        cdfast.competitive_ce(torch.zeros(2, 4, 3), torch.zeros(4, dtype=torch.int64), process_group=object())


def torchrun(tmp_path: Path, *flags: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           "-m", "cdfast", "train", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CDFAST_DIST_TIMEOUT": "60", "TMPDIR": str(tmp_path)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def test_cdfast_train_under_torchrun_writes_one_run_folder_and_resumes(tmp_path, fmnist_root):
    out = tmp_path / "run"
    flags = ["--train-subset", "128", "--test-subset", "64", "--batch-size", "32", "--eval-batch-size", "48",
             "--device", "cpu", "--out", str(out), "--no-progress", "--no-tensorboard", "--no-plots",
             "--bn-recalibration", "1", "--log-interval", "2", "--data-dir", str(fmnist_root)]
    done = torchrun(tmp_path, *flags, "--epochs", "1")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("cdfast: competitive training") == 1  # rank 0 speaks for the job
    assert "x 2 processes (data parallel, global batch 32)" in done.stdout
    steps = (out / "steps.csv").read_text().splitlines()
    assert len(steps) == 1 + 128 // 32  # one row per global step, written once
    assert not list(tmp_path.glob("cdfast-rank*"))  # the other rank's scratch folder is gone
    again = torchrun(tmp_path, "--resume", str(out), "--resume-with-changes", "--epochs", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from epoch 1" in again.stdout
    assert len((out / "epochs.jsonl").read_text().splitlines()) == 2
    alone = subprocess.run([sys.executable, "-m", "cdfast", "train", "--resume", str(out), "--resume-with-changes",
                            "--epochs", "3"], capture_output=True, text=True, timeout=300)
    assert alone.returncode != 0
    assert "was trained by 2 process(es), and this resume runs 1" in alone.stderr
    assert len((out / "epochs.jsonl").read_text().splitlines()) == 2  # nothing was touched


def test_sync_batchnorm_is_refused_where_it_cannot_run():
    from cdfast.engines.fused import why_not_fusable
    from cdfast.models import build_model
    from cdfast.train import TrainConfig, build_group

    with pytest.raises(ValueError, match="sync_bn needs GPUs"):
        TrainConfig(sync_bn=True, device="cpu").validate()
    with pytest.raises(ValueError, match="sync_bn needs GPUs"):
        TrainConfig(sync_bn=True, engine="fused").validate()
    with pytest.raises(ValueError, match="this run is on cpu"):  # device auto that resolved to the CPU
        build_group(TrainConfig(sync_bn=True).validate(), num_classes=10, input_shape=(1, 28, 28), device="cpu")
    nets = [torch.nn.SyncBatchNorm.convert_sync_batchnorm(build_model("resnet8", 10, 1)) for _ in range(2)]
    assert "SyncBatchNorm" in why_not_fusable(nets)


@pytest.mark.parametrize("train", [True, False])
def test_rank_shares_of_every_global_batch_are_disjoint_and_complete(train):
    """The loaders' data-parallel sharding: the same global order on every rank, a contiguous share each."""
    from cdfast.data.folder import RankShare
    from cdfast.data.loader import TensorLoader

    n, batch, world = 22, 8, 2
    shares = [list(RankShare(n, batch, train, torch.Generator().manual_seed(5), r, world)) for r in range(world)]
    one = list(RankShare(n, batch, train, torch.Generator().manual_seed(5), 0, 1))
    assert len(shares[0]) == len(shares[1]) == len(one) == (n // batch if train else -(-n // batch))
    for k, whole in enumerate(one):  # rank r holds its half of global batch k, in order
        assert shares[0][k] + shares[1][k] == whole
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    ids = torch.arange(n)
    # training augments (pad-crop-flip): each rank transforms only its share, with the whole batch's draws
    pad = 1 if train else None
    images = torch.randint(0, 256, (n, 1, 4, 4), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    loaders = [TensorLoader(images, ids, batch, mean=(0.0,), std=(1 / 255,), shuffle=train, drop_last=train, seed=5,
                            rank=r, world=world, augment_pad=pad) for r in range(world)]
    alone = TensorLoader(images, ids, batch, mean=(0.0,), std=(1 / 255,), shuffle=train, drop_last=train, seed=5,
                         augment_pad=pad)
    batches = list(zip(*loaders, alone))
    assert len(batches) == len(one)
    for (x0, y0), (x1, y1), (x, y) in batches:
        assert torch.equal(torch.cat([y0, y1]), y) and torch.equal(torch.cat([x0, x1]), x)


def test_a_rank_augments_only_its_share(monkeypatch):
    import cdfast.data.loader as loader_module

    sizes = []
    real = loader_module.pad_crop_flip

    def recording(x, *args, **kw):
        sizes.append(x.shape[0])
        return real(x, *args, **kw)

    monkeypatch.setattr(loader_module, "pad_crop_flip", recording)
    images = torch.zeros(16, 1, 4, 4, dtype=torch.uint8)
    loader = loader_module.TensorLoader(images, torch.arange(16), 8, mean=(0.0,), std=(1.0,), shuffle=True,
                                        drop_last=True, seed=0, rank=1, world=4, augment_pad=1)
    assert [x.shape[0] for x, _ in loader] == [2, 2] and sizes == [2, 2]


@pytest.mark.parametrize("local_rank, visible, expected", [("0", 8, 0), ("3", 8, 3), ("1", 1, 0), ("5", 2, 1)])
def test_each_process_drives_its_local_gpu_whatever_the_launcher_shows_it(monkeypatch, local_rank, visible, expected):
    """torchrun shows every GPU (LOCAL_RANK indexes them); Slurm's --gpus-per-task shows each process only
    its own (LOCAL_RANK 1 must then be cuda:0, not a device that does not exist)."""
    from cdfast.distributed import local_cuda_index

    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert local_cuda_index() == expected
