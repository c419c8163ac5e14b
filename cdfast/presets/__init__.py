"""Ready-made settings shipped with cdfast: training configs (``*.yaml``) and comparison grids
(``experiments/*.yaml``), found by name from any directory after any install.

``cdfast train --config fashion_mnist`` and ``cdfast experiment --config fashion_mnist_long``
take a preset's name where a file path is not found; ``cdfast presets`` lists them.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["KINDS", "available", "resolve", "describe"]

KINDS = {"train": "", "experiment": "experiments"}  # kind -> sub-folder of this package


def _folder(kind: str):
    return resources.files(__name__).joinpath(KINDS[kind]) if KINDS[kind] else resources.files(__name__)


def available(kind: str) -> list[str]:
    """The preset names of one kind (``"train"`` or ``"experiment"``), sorted."""
    return sorted(p.name[:-5] for p in _folder(kind).iterdir() if p.name.endswith(".yaml"))


def resolve(spec: str | Path, kind: str) -> Path:
    """``spec`` if it is a file; else the preset of that name (with or without ``.yaml``); else a clear error."""
    path = Path(spec)
    if path.is_file():
        return path
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if path.parent == Path(".") and name in available(kind):
        return Path(str(_folder(kind).joinpath(f"{name}.yaml")))
    what = "config file" if kind == "train" else "grid file"
    raise FileNotFoundError(f"{what} {spec} not found, and no {kind} preset is called {name!r}; presets: "
                            f"{', '.join(available(kind))} (cdfast presets lists them)")


def describe(kind: str, name: str) -> str:
    """What the preset is for: the first sentence of its leading comment, or ''."""
    words = []
    for line in _folder(kind).joinpath(f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        words.append(line.lstrip("# ").strip())
    text = " ".join(words)
    end = min((i for i in (text.find(". "), text.find(": ")) if i >= 0), default=len(text))
    return text[:end].rstrip(".:")
