"""cdfast outside a checkout: the wheel's contents, presets by name from any directory, an unbuilt
source tree, and a compiled library built for another torch."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from cdfast import presets
from cdfast.ops import competitive_ce as ce_ops

ROOT = Path(__file__).resolve().parents[1]



def _own_environ() -> dict:
    """This environment without CDFAST_DISABLE_OPS (a caller's choice that would hide what these tests check)."""
    return {k: v for k, v in os.environ.items() if k != "CDFAST_DISABLE_OPS"}

def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return out.stdout.split()


def copy_checkout(dest: Path) -> Path:
    """The tracked files of this checkout (links kept as links) under ``dest``: a clean source tree."""
    for name in tracked_files():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_symlink():
            target.symlink_to(os.readlink(ROOT / name))
        elif (ROOT / name).is_file():
            target.write_bytes((ROOT / name).read_bytes())
    return dest


@pytest.fixture(scope="module")
def clean_python(tmp_path_factory) -> str:
    """A Python that sees this environment's packages (torch, ...) but not its editable cdfast: a venv whose
    one .pth file names the site-packages folder (a plain path entry: the editable install's own .pth
    file, which would map ``cdfast`` to this checkout, is not run)."""
    import site
    import sysconfig

    env = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    purelib = sysconfig.get_paths()["purelib"]
    target = next(Path(env, "lib").glob("python3*/site-packages"))
    (target / "outer.pth").write_text("\n".join(dict.fromkeys([purelib, *site.getsitepackages()])) + "\n")
    return str(env / "bin" / "python")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built without the compiled ops (CDFAST_BUILD_EXT=0: no compiler minutes) from a clean copy."""
    src = copy_checkout(tmp_path_factory.mktemp("src"))
    dist = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
                           str(dist), str(src)], capture_output=True, text=True, env={**os.environ, "CDFAST_BUILD_EXT": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = dist.glob("cdfast-*.whl")
    return path


def test_the_wheel_holds_the_kernels_presets_and_license(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "cdfast/kernels/student_loss.py" in names  # the top-level kernels/ folder, through the link
    assert "cdfast/presets/fashion_mnist.yaml" in names
    assert "cdfast/presets/experiments/fashion_mnist_long.yaml" in names
    assert any(n.endswith("licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    runtime = [r for r in requires if "extra ==" not in r]
    assert not any(tool in r for r in runtime for tool in ("pybind11", "ninja", "matplotlib", "tensorboard", "dali"))


def test_an_installed_wheel_finds_presets_by_name_from_any_directory(wheel, tmp_path, clean_python):
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                           str(wheel)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**_own_environ(), "PYTHONPATH": str(target)}
    code = ("import cdfast, cdfast.presets as p; from cdfast.train import TrainConfig; "
            "print(cdfast.__file__); print(TrainConfig.from_yaml(p.resolve('fashion_mnist', 'train')).models)")
    run = subprocess.run([clean_python, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert str(target) in run.stdout and "['resnet8', 'resnet8']" in run.stdout
    listed = subprocess.run([clean_python, "-m", "cdfast", "presets"], cwd=elsewhere, env=env, capture_output=True,
                            text=True)
    assert listed.returncode == 0 and "fashion_mnist_long" in listed.stdout
    assert "not built" in run.stderr  # built without the compiled ops: the one line says so


def test_an_unbuilt_source_tree_imports_and_uses_the_reference(tmp_path, clean_python):
    copy_checkout(tmp_path)
    code = ("import torch, cdfast; from cdfast.ops import competitive_ce as o; import cdfast.kernels; "
            "ce, t = cdfast.competitive_ce(torch.randn(2, 4, 3), torch.zeros(4, dtype=torch.int64)); "
            "print(o.HAS_EXTENSION, int(t) in (0, 1))")
    run = subprocess.run([clean_python, "-c", code], cwd=tmp_path, env={**_own_environ(), "PYTHONPATH": str(tmp_path)},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["False", "True"]
    assert "compiled ops are not built" in run.stderr and "circular import" not in run.stderr


def test_a_library_built_for_another_torch_is_not_loaded(tmp_path):
    lib = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    lib.write_bytes(b"")
    assert ce_ops.why_not_load(str(lib), torch.__version__) is None  # no stamp: try it (the import says more)
    (tmp_path / "_C.torch_version").write_text("2.0.0+cu118\n")
    why = ce_ops.why_not_load(str(lib), torch.__version__)
    assert "built against torch 2.0.0+cu118" in why and torch.__version__ in why and "pip install" in why
    assert ce_ops.why_not_load(str(lib), "2.0.0+cu118") is None
    assert "not built" in ce_ops.why_not_load(None, torch.__version__)


def test_every_shipped_train_preset_is_valid():
    from cdfast.train.config import TrainConfig

    names = presets.available("train")
    assert {"fashion_mnist", "fashion_mnist_paper"} <= set(names)
    for name in names:
        TrainConfig.from_yaml(presets.resolve(name, "train")).validate()
    paper = TrainConfig.from_yaml(presets.resolve("fashion_mnist_paper", "train"))
    assert paper.mode == "competitive" and paper.perturb and paper.feature_loss and paper.perturb_every == 1


def test_preset_names_and_clear_errors(tmp_path):
    assert "fashion_mnist" in presets.available("train")
    assert "fashion_mnist_long" in presets.available("experiment")
    assert presets.resolve("fashion_mnist.yaml", "train").is_file()
    own = tmp_path / "mine.yaml"
    own.write_text("epochs: 1\n")
    assert presets.resolve(own, "train") == own  # a file wins
    with pytest.raises(FileNotFoundError, match="no train preset is called 'fashion_mnst'.*fashion_mnist"):
        presets.resolve("fashion_mnst", "train")
