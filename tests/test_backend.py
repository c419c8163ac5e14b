"""cdfast as a backend of other people's code: logits-only members (torchvision, timm), the loss as a
module, plain int teachers, exporting a member, and evaluating a run."""

import json

import pytest
import torch
import torchvision

import cdfast
from cdfast.models import FeatureTap, build_model
from cdfast.train import Trainer, TrainConfig


def tv_resnet(classes=5, seed=0):
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=classes)


def test_feature_tap_takes_a_named_layers_output():
    net = FeatureTap(tv_resnet(), "avgpool")
    logits, feats = net(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 5) and feats.shape == (3, 512)
    torch.testing.assert_close(net.model.fc(feats), logits)  # the feature is what the classifier read
    with pytest.raises(ValueError, match="has no layer 'pool5'; its last layers: .*avgpool.*fc"):
        FeatureTap(tv_resnet(), "pool5")
    with pytest.raises(ValueError, match="has no forward_features, forward_head, get_classifier"):
        FeatureTap(tv_resnet())


def test_a_group_of_torchvision_classifiers_trains_with_the_feature_loss():
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    group = cdfast.CompetitiveDistillation([tv_resnet(seed=0), tv_resnet(seed=1)], feature_layers=["avgpool", "avgpool"],
                                           perturb=False)
    out = group.losses(x, y)
    assert group.feature_loss and float(out.distill.detach().sum()) > 0  # the student has a loss
    group.step(x, y)
    with pytest.raises(ValueError, match="one entry per network"):
        cdfast.CompetitiveDistillation([tv_resnet(), tv_resnet()], feature_layers=["avgpool"])


def test_a_timm_model_gives_its_pre_logits_features():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=4)
    net = FeatureTap(model)
    x = torch.randn(2, 3, 32, 32)
    logits, feats = net(x)
    torch.testing.assert_close(logits, model(x))  # the same logits as the model's own forward
    assert feats.shape == (2, model.num_features)


def test_the_loss_module_equals_the_groups_losses():
    torch.manual_seed(0)
    logits, feats, y = torch.randn(3, 6, 5), torch.randn(3, 6, 8), torch.randint(0, 5, (6,))
    for mode, teachers in (("competitive", "best"), ("competitive", "all-better"), ("dml", "best"),
                           ("independent", "best")):
        loss = cdfast.CompetitiveLoss(mode=mode, teachers=teachers, temperature=2.0)
        out = loss(list(logits), y, list(feats))  # lists of the networks' tensors are taken too
        ce, teacher = cdfast.competitive_ce(logits, y)
        assert int(out.teacher) == int(teacher)
        torch.testing.assert_close(out.ce, ce)
        if mode == "competitive" and teachers == "best":
            want = cdfast.group_student_loss(logits, feats, int(teacher), temperature=2.0)  # a plain int teacher
        else:
            weights = cdfast.distillation_weights(ce, mode, teachers, teacher=teacher)
            want = cdfast.weighted_student_loss(logits, cdfast.pairwise_feature_l2(feats), weights, temperature=2.0)
        torch.testing.assert_close(out.distill, want)
        torch.testing.assert_close(out.loss, (ce + want).sum())
    with pytest.raises(ValueError, match="no feats were given"):
        cdfast.CompetitiveLoss()(logits, y)
    assert "temperature=1.0" in repr(cdfast.CompetitiveLoss())


def test_an_int_teacher_is_the_same_as_the_tensor():
    torch.manual_seed(1)
    logits, feats = torch.randn(3, 4, 5), torch.randn(3, 4, 6)
    torch.testing.assert_close(cdfast.group_student_loss(logits, feats, 2),
                               cdfast.group_student_loss(logits, feats, torch.tensor(2)))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from cdfast.data import FASHION_MNIST_ROOT

    root = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(data_dir=str(FASHION_MNIST_ROOT), train_subset=256, test_subset=128, batch_size=64,
                      eval_batch_size=128, epochs=1, out=str(root / "run"), progress=False, tensorboard=False,
                      plots=False, device="cpu", bn_recalibration=1)
    try:
        trainer = Trainer(cfg)
    except (FileNotFoundError, ValueError) as e:
        pytest.skip(f"real Fashion-MNIST is needed: {e}")
    trainer.fit()
    return root / "run", trainer


def test_export_writes_a_members_plain_weights_or_program(finished_run, tmp_path):
    from cdfast.train.export import export_member

    run, trainer = finished_run
    x = torch.randn(4, 1, 28, 28)
    want = trainer.group.networks[1].eval()(x)[0]
    path = export_member(run, 1, tmp_path / "net1.pt")
    net = build_model("resnet8", 10, 1)
    net.load_state_dict(torch.load(path, weights_only=True))  # plain keys: no group prefix
    torch.testing.assert_close(net.eval()(x)[0], want)
    program = export_member(run, 1, tmp_path / "net1.pt2", program=True)
    torch.testing.assert_close(torch.export.load(str(program)).module()(x), want)
    with pytest.raises(FileExistsError, match="--force"):
        export_member(run, 1, tmp_path / "net1.pt")
    assert export_member(run, 1, tmp_path / "net1.pt", force=True) == tmp_path / "net1.pt"
    with pytest.raises(ValueError, match="member must be a network of the group: 0..1"):
        export_member(run, 2)


def test_cdfast_evaluate_reports_what_training_recorded_and_writes_nothing(finished_run, capsys):
    from cdfast.cli import main

    run, _ = finished_run
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    assert main(["evaluate", str(run)]) == 0
    text = capsys.readouterr().out
    record = json.loads((run / "epochs.jsonl").read_text().splitlines()[-1])
    for i, acc in enumerate(record["test_acc"]):
        assert f"{100 * acc:.2f}%" in text.splitlines()[2 + i]  # the same numbers as at the end of training
    assert f"{100 * record['ensemble_acc']:.2f}%" in text
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before


def test_a_feature_tap_keeps_nothing_outside_its_own_forward():
    import copy

    from cdfast.engines.fused import why_not_fusable

    tap = FeatureTap(tv_resnet(), "avgpool")
    x = torch.randn(2, 3, 32, 32)
    tap.model(x)  # the bare model: the hook is disarmed
    copy.deepcopy(tap.model)(x)
    assert tap._kept is None
    logits, feats = copy.deepcopy(tap)(x)  # a deep copy (the fused engine's meta copy) taps its own layer
    assert feats.shape == (2, 512) and tap._kept is None
    assert "different layers" in why_not_fusable([FeatureTap(tv_resnet(), "avgpool"), FeatureTap(tv_resnet(), "layer4")])
    model = tap.remove()
    model(x)
    assert tap._kept is None and not model.avgpool._forward_hooks


def test_a_loader_view_keeps_soft_labels():
    from cdfast.perturb import Perturbed

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)) for _ in range(2)]
    group = cdfast.CompetitiveDistillation(nets, feature_loss=False, perturb=True)
    x, soft = torch.randn(4, 3, 2, 2), torch.softmax(torch.randn(4, 3), -1)
    view = Perturbed(x.flip(0), soft, soft.flip(0), 0.5, "mixup")
    out = group.losses(x, soft, perturbed=view)
    assert out.perturbation == "mixup" and torch.isfinite(out.ce).all()
