"""``hooked-vlm video mean-vector DIR``: the mean vector of cached activation tensors, streamed file by file.

Files: ``*.safetensors`` (every tensor in the file) and ``*.pt`` / ``*.pth`` (a tensor, or a dict of tensors,
loaded with ``torch.load(weights_only=True)``). A tensor ``[..., d]`` contributes its rows (``d`` = last axis);
one running float64 sum per tensor name (a bare ``.pt`` tensor is named ``activations``) keeps memory at one
file. A file that cannot be read, or whose width differs from the others, is skipped and listed with the reason.
Writes ``mean_vector.pt`` (a tensor when there is one name, else a dict) and ``mean_vector.json`` (counts,
files used, files skipped) into DIR, or to ``--output``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float

__all__ = ["MeanVectorError", "mean_vector", "load_activation_file"]

SUFFIXES = (".safetensors", ".pt", ".pth")
OUTPUT_NAME = "mean_vector.pt"
BARE = "activations"


class MeanVectorError(ValueError):
    """The folder holds no usable activation file."""


def load_activation_file(path: Path) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of one cache file (safetensors, or a weights-only torch file)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, torch.Tensor):
        return {BARE: obj}
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {str(k): v for k, v in obj.items()}
    raise ValueError(f"holds a {type(obj).__name__}, not a tensor or a dict of tensors")


def mean_vector(folder: str | Path, output: str | Path | None = None, device: str = "cpu") -> dict[str, Any]:
    """Stream the activation files of ``folder``; write and return the mean per tensor name (see the module docstring)."""
    from hooked_vlm.atomic_files import atomic_output, atomic_write_json

    folder = Path(folder)
    if not folder.is_dir():
        raise MeanVectorError(f"{folder} is not a folder; pass the folder that holds the cached activation files")
    out = Path(output) if output else folder / OUTPUT_NAME
    files = sorted(p for p in folder.iterdir() if p.suffix in SUFFIXES and p.is_file() and p.resolve() != out.resolve())
    if not files:
        raise MeanVectorError(f"{folder} holds no {' / '.join(SUFFIXES)} files; cache activations there first")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    used, skipped = [], []
    for path in files:
        try:
            tensors = load_activation_file(path)
            for name, t in tensors.items():
                if t.ndim == 0 or not (t.is_floating_point() or t.is_complex()):
                    raise ValueError(f"tensor {name!r} is {'a scalar' if t.ndim == 0 else t.dtype}; expected floating activations [..., d]")
                if name in sums and sums[name].shape[0] != t.shape[-1]:
                    raise ValueError(f"tensor {name!r} has width {t.shape[-1]}, the files before it {sums[name].shape[0]}")
        except Exception as err:  # noqa: BLE001 - one bad file is recorded and the others still count
            skipped.append({"file": path.name, "error": f"{type(err).__name__}: {err}"})
            continue
        for name, t in tensors.items():
            rows = t.to(device=device, dtype=torch.float64).reshape(-1, t.shape[-1])
            sums[name] = sums.get(name, torch.zeros(rows.shape[1], dtype=torch.float64, device=device)) + rows.sum(0)
            counts[name] = counts.get(name, 0) + rows.shape[0]
        used.append(path.name)
    if not sums:
        raise MeanVectorError(f"no file of {folder} could be used: " + "; ".join(f"{s['file']}: {s['error']}" for s in skipped))
    means: dict[str, Float[torch.Tensor, "d"]] = {n: (sums[n] / counts[n]).float().cpu() for n in sums}
    with atomic_output(out) as tmp:
        torch.save(means[next(iter(means))] if len(means) == 1 else means, tmp)
    summary = {"output": str(out), "vectors": {n: {"rows": counts[n], "width": int(means[n].shape[0])} for n in means},
               "files_used": used, "files_skipped": skipped}
    atomic_write_json(out.with_suffix(".json"), summary, sort_keys=False)
    return summary
