"""Per-layer summaries of the residual stream for the Have-1 / Have-2 probes, reduced during the forward.

For one input: ``layers_mean`` (mean over every position), ``last_token`` (the last position) and
``frames_mean`` (mean over the video's tokens), each ``[n_layers, d_model]`` from ``blocks.{i}.hook_resid_post``.
Hooks reduce each layer as it is computed, so a 16k-token clip never holds all layers' states at once.
Files: one ``.npz`` per entry while tracing (``representations/<id>.npz``, keys ``<condition>/<kind>``), and
the assembled ``--representations_output`` (``.npz``, or ``.json`` lists as the original scripts wrote).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float

__all__ = ["KINDS", "LayerSummaries", "summarise_layers", "write_case_file", "assemble", "load_representations"]

KINDS = ("layers_mean", "last_token", "frames_mean")
FORMAT = "hooked_vlm.video_representations/1"


class LayerSummaries:
    """Hooks that reduce ``blocks.{i}.hook_resid_post`` (batch row 0) to the three summaries as each layer runs."""

    def __init__(self, n_layers: int, visual_positions: Sequence[int]) -> None:
        self.rows: dict[str, list[Any]] = {k: [None] * n_layers for k in KINDS}
        self.visual = torch.as_tensor(list(visual_positions), dtype=torch.long)
        self.hooks = [(f"blocks.{i}.hook_resid_post", self._reduce(i)) for i in range(n_layers)]

    def _reduce(self, layer: int):
        def hook(act: torch.Tensor, hook: Any = None) -> None:
            x = act[0].float()
            vis = self.visual.to(x.device)
            self.rows["layers_mean"][layer] = x.mean(0).cpu().numpy()
            self.rows["last_token"][layer] = x[-1].cpu().numpy()
            self.rows["frames_mean"][layer] = (x[vis].mean(0) if len(vis) else torch.full_like(x[0], float("nan"))).cpu().numpy()
        return hook

    def arrays(self) -> dict[str, Float[np.ndarray, "layers d"]]:
        """``{kind: [n_layers, d]}``; raises if a forward has not filled every layer."""
        missing = [i for i, row in enumerate(self.rows["last_token"]) if row is None]
        if missing:
            raise RuntimeError(f"layers {missing} produced no resid_post: run the summary hooks through a full forward")
        return {k: np.stack(v) for k, v in self.rows.items()}


@torch.no_grad()
def summarise_layers(model: Any, inputs: Mapping[str, Any], visual_positions: Sequence[int]
                     ) -> tuple[dict[str, Float[np.ndarray, "layers d"]], Float[torch.Tensor, "vocab"]]:
    """``{kind: [n_layers, d]}`` of the residual stream after each block (batch row 0), and the next-token logits."""
    summaries = LayerSummaries(int(model.cfg.n_layers), visual_positions)
    logits = model.run_with_hooks(**inputs, fwd_hooks=summaries.hooks)
    return summaries.arrays(), logits[0, -1].float()


def write_case_file(path: Path, conditions: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """One entry's summaries, ``{condition: {kind: array}}``, as an npz (atomically)."""
    from hooked_vlm.atomic_files import atomic_output

    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **{f"{c}/{k}": v for c, kinds in conditions.items() for k, v in kinds.items()})


def assemble(case_files: Sequence[tuple[str, str, Path]], output: Path) -> int:
    """Write ``output`` (.npz or .json) from ``(question_id, video_name, case file)`` triples; returns rows written.

    npz: ``question_id``, ``video_name``, ``condition`` ``[N]`` and one ``[N, n_layers, d]`` array per kind.
    """
    from hooked_vlm.atomic_files import atomic_output, atomic_write_text

    ids, videos, conds, arrays = [], [], [], {k: [] for k in KINDS}
    for qid, video, path in case_files:
        with np.load(path) as data:
            for condition in sorted({key.split("/")[0] for key in data.files}, key=lambda c: (c != "clean", c)):
                ids.append(qid)
                videos.append(video)
                conds.append(condition)
                for k in KINDS:
                    arrays[k].append(data[f"{condition}/{k}"])
    if output.suffix == ".json":
        rows = [{"question_id": q, "video_name": v, "condition": c, **{k: arrays[k][i].tolist() for k in KINDS}}
                for i, (q, v, c) in enumerate(zip(ids, videos, conds))]
        atomic_write_text(output, json.dumps({"format": FORMAT, "rows": rows}))
    else:
        with atomic_output(output) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, question_id=np.array(ids, dtype=str), video_name=np.array(videos, dtype=str),
                         condition=np.array(conds, dtype=str), **{k: np.stack(v) if v else np.zeros((0,)) for k, v in arrays.items()})
    return len(ids)


def load_representations(path: str | Path) -> tuple[Any, dict[str, np.ndarray]]:
    """``(index DataFrame [question_id, video_name, condition], {kind: [N, n_layers, d]})`` from either file format."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"representations file {path} does not exist; run `hooked-vlm video trace --dump_representations "
                                "--representations_output FILE` first")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        rows = data["rows"] if isinstance(data, dict) and "rows" in data else None
        if rows is None:
            raise ValueError(f"{path} is not a representations file ({FORMAT}); write one with `hooked-vlm video trace --dump_representations`")
        index = pd.DataFrame([{k: r[k] for k in ("question_id", "video_name", "condition")} for r in rows])
        return index, {k: np.asarray([r[k] for r in rows], dtype=np.float32) for k in KINDS}
    with np.load(path) as data:
        index = pd.DataFrame({k: data[k].astype(str) for k in ("question_id", "video_name", "condition")})
        return index, {k: data[k] for k in KINDS}
