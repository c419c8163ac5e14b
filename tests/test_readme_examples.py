"""The README's Python examples run as written (on the CPU: `.cuda()` is dropped, inputs provided)."""

import re
from pathlib import Path

import torch

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 2


def test_group_step_example_runs():
    code = next(b for b in BLOCKS if "CompetitiveDistillation(" in b).replace(".cuda()", "")
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 100, (8,), generator=g)) for _ in range(2)]
    scope = {"loader": loader}
    exec(compile(code, "README.md", "exec"), scope)
    result = scope["result"]
    assert result.loss.shape == (2,) and torch.isfinite(result.loss).all()


def test_functional_example_runs():
    code = next(b for b in BLOCKS if "cdfast.competitive_ce(" in b)
    import cdfast

    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(6, 10, generator=g, requires_grad=True) for _ in range(3)]
    feats = [torch.randn(6, 16, generator=g, requires_grad=True) for _ in range(3)]
    scope = {"torch": torch, "cdfast": cdfast, "logits": logits, "feats": feats,
             "y": torch.randint(0, 10, (6,), generator=g)}
    exec(compile(code, "README.md", "exec"), scope)
    assert all(z.grad is not None for z in logits)
    assert scope["distill"][int(scope["teacher"])] == 0


def test_torchvision_and_timm_example_runs():
    import pytest

    pytest.importorskip("timm")
    code = next(b for b in BLOCKS if "CompetitiveLoss(" in b)
    g = torch.Generator().manual_seed(2)
    loader = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
    scope = {"loader": loader}
    exec(compile(code, "README.md", "exec"), scope)
    out = scope["out"]
    assert out.per_network.shape == (2,) and torch.isfinite(out.loss) and int(out.teacher) in (0, 1)


def test_torchvision_mixup_example_runs():
    code = next(b for b in BLOCKS if "v2.MixUp(" in b)
    g = torch.Generator().manual_seed(3)
    loader = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
    scope = {"loader": loader}
    exec(compile(code, "README.md", "exec"), scope)
    assert torch.isfinite(scope["result"].loss).all()
