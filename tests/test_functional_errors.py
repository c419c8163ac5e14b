"""Bad input to the functional API gets a clear error that says what is wrong."""

import pytest
import torch

import cdfast


def test_group_of_one_is_refused():
    with pytest.raises(ValueError, match="N >= 2"):
        cdfast.competitive_ce(torch.randn(1, 4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="N >= 2"):
        cdfast.elect_teacher(torch.tensor([0.3]))


def test_labels_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cdfast.competitive_ce(torch.randn(2, 4, 3), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cdfast.competitive_ce(torch.randn(2, 4, 3), torch.tensor([0, -1, 2, 1]))


def test_labels_must_be_int64():
    with pytest.raises(TypeError, match="int64"):
        cdfast.competitive_ce(torch.randn(2, 4, 3), torch.zeros(4, dtype=torch.int32))


def test_mismatched_shapes():
    with pytest.raises(ValueError, match="targets has shape"):
        cdfast.competitive_ce(torch.randn(2, 4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="different shapes"):
        cdfast.competitive_ce([torch.randn(4, 3), torch.randn(4, 5)], torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[N, B, K\]"):
        cdfast.competitive_ce(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="adapter"):
        cdfast.student_loss(torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 2), torch.randn(4, 6))


def test_mixed_labels_need_both_parts():
    with pytest.raises(ValueError, match="targets_b and lam"):
        cdfast.competitive_ce(torch.randn(2, 4, 3), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))


def test_bad_temperature_and_teacher():
    logits = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="temperature"):
        cdfast.group_student_loss(logits, None, torch.tensor(0), temperature=0.0)
    with pytest.raises(ValueError, match="0-d int64"):
        cdfast.group_student_loss(logits, None, torch.tensor([0]))
    with pytest.raises(ValueError, match="mode='worst'; choose one of competitive, dml, independent"):
        cdfast.distillation_weights(torch.randn(3), "worst")
    with pytest.raises(ValueError, match="teachers='all-better' only applies to mode='competitive'"):
        cdfast.distillation_weights(torch.randn(3), "dml", "all-better")
    with pytest.raises(ValueError, match="'all' is now mode='dml'"):  # cdfast 0.1's single-word rules
        cdfast.distillation_weights(torch.randn(3), "all")
    with pytest.raises(ValueError, match=r"ce must be \[N\]"):
        cdfast.distillation_weights(torch.randn(2, 3))
    with pytest.raises(TypeError, match="ce must be a torch.Tensor"):
        cdfast.distillation_weights([0.1, 0.2])
