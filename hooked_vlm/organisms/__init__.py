"""Model organisms: tiny VLMs of real architectures trained here on synthetic tasks with planted ground truth.

``list_organisms()`` names them, ``get_organism(name)`` returns the :class:`~hooked_vlm.organisms.base.Organism`
(generator, training, evaluation), ``checkpoint_dir(name)`` is where the shipped checkpoint lives (package
data) and ``is_trained(name)`` says whether it is there. ``HookedVLM.from_pretrained(name)`` loads a shipped
organism by name. See ``hooked_vlm/organisms/base.py`` for the contract and docs/organisms.md for the
validation table.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hooked_vlm.organisms.base import Organism

__all__ = ["ORGANISMS", "list_organisms", "get_organism", "checkpoint_dir", "is_trained", "CHECKPOINTS"]

#: organism name -> module that implements it (the module exposes ``organism(name) -> Organism``)
ORGANISMS: dict[str, str] = {
    "grid-qwen2.5-vl": "hooked_vlm.organisms.grid_qwen",
    "video-qwen2-vl": "hooked_vlm.organisms.video_qwen",
    "shapes-clip": "hooked_vlm.organisms.shapes_clip",
    "rad-llava": "hooked_vlm.organisms.radiograph",
    "rad-gemma3": "hooked_vlm.organisms.radiograph",
}

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"


def list_organisms() -> list[str]:
    """Names of all organisms (trained or not)."""
    return list(ORGANISMS)


def _check_name(name: str) -> None:
    if name not in ORGANISMS:
        import difflib

        close = difflib.get_close_matches(name, list(ORGANISMS), n=2)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(f"unknown organism {name!r}; organisms: {', '.join(ORGANISMS)}.{hint}")


def get_organism(name: str) -> "Organism":
    """The organism object (generator, config, training, evaluation) of ``name``."""
    _check_name(name)
    module = importlib.import_module(ORGANISMS[name])
    return module.organism(name)


def checkpoint_dir(name: str) -> Path:
    """Folder of the shipped checkpoint of ``name`` (inside the installed package)."""
    _check_name(name)
    return CHECKPOINTS / name


def is_trained(name: str) -> bool:
    """Whether the shipped checkpoint of ``name`` exists (config.json and weights)."""
    folder = checkpoint_dir(name)
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
