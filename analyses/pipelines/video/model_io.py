"""A video model for the pipeline: loading, prompt + frames -> the family's inputs, candidate answers -> token ids.

Inputs come from the family's registered input builder (``hooked_vlm.cli.INPUT_BUILDERS``, the same one
``hooked-vlm inspect`` uses), so nothing here knows a family's keyword names. A checkpoint folder's saved
processor settings win (``preprocessor_config.json`` / ``video_preprocessor_config.json``, which organisms
can ship, see :func:`hooked_vlm.organisms.saving.qwen_preprocessor_files`); an organism folder without them
gets the pixel limits and frame rate of its organism class (``input_kwargs``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, UInt8
from torch import Tensor

from analyses.pipelines.runner import ModelSpec, load_hooked_model

__all__ = ["CandidateError", "VideoModel", "load_video_model", "input_options", "PROCESSOR_FILES", "build_inputs", "candidate_tokens", "first_token_ids",
           "candidate_logprobs", "greedy_answer", "last_logits"]


class CandidateError(ValueError):
    """A candidate answer the tokenizer cannot represent as written, or candidates the margin cannot tell apart."""


@dataclass
class VideoModel:
    """The loaded model (``hooked_vlm.cli.LoadedModel``) and the input-builder options it needs."""

    loaded: Any
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer


def load_video_model(spec: ModelSpec) -> VideoModel:
    """Load ``spec.name`` (organism, tiny model, checkpoint folder) with its input options (the Pipeline loader)."""
    loaded = load_hooked_model(spec)
    return VideoModel(loaded, input_options(spec.name, loaded.checkpoint))


#: the processor files a checkpoint folder may hold its input settings in (the video one first)
PROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")


def input_options(name: str, folder: Path | None) -> dict[str, Any]:
    """Input-builder options for a model: the frame rate saved in its folder's processor config when one is there
    (the family's input builder reads the pixel limits from the same files), else the ``input_kwargs`` of the
    organism it is (by name, or by the ``organism.json`` of a copied organism folder), else none."""
    from hooked_vlm.organisms import ORGANISMS, get_organism

    saved = [folder / f for f in PROCESSOR_FILES if folder is not None and (folder / f).is_file()]
    if saved:
        configs = [json.loads(path.read_text()) for path in saved]
        fps = [c["fps"] for c in configs if "fps" in c]  # the video processor's file holds it, the image one does not
        return {"fps": float(fps[0])} if fps else {}
    organism = name if name in ORGANISMS else None
    meta = None if folder is None else folder / "organism.json"
    if organism is None and meta is not None and meta.is_file():
        organism = json.loads(meta.read_text()).get("name")
    if organism not in ORGANISMS:
        return {}
    return dict(getattr(get_organism(organism), "input_kwargs", {}) or {})


def build_inputs(vm: VideoModel, prompt: str, frames: UInt8[np.ndarray, "time height width 3"] | None, fps: float,
                 device: str, dtype: torch.dtype) -> dict[str, Any]:
    """The family's keyword tensors for ``prompt`` (``<video>`` marks the clip) and ``frames`` shot at ``fps``."""
    import hooked_vlm.cli as cli
    from hooked_vlm.errors import InputError, UnsupportedModelError

    options = dict(vm.options)
    if frames is not None:
        options["fps"] = float(fps)
    loaded = vm.loaded
    request = cli.InputRequest(loaded.tokenizer, prompt, [], [] if frames is None else [frames], loaded.processor,
                               loaded.checkpoint, loaded.tiny, options)
    family = vm.model.cfg.family
    builder = cli.INPUT_BUILDERS.get(family)
    if builder is None:
        raise UnsupportedModelError(f"no input builder for model family {family!r}; register one with "
                                    "hooked_vlm.cli.register_input_builder")
    try:
        inputs = builder(request)
    except InputError as err:
        if frames is None or "video" not in str(err).lower():
            raise
        raise UnsupportedModelError(
            f"model {loaded.name!r} cannot take a video ({err}): `hooked-vlm video` needs a video family (Qwen2-VL, Qwen2.5-VL, "
            "LLaVA-OneVision, LLaVA-NeXT-Video), and a visual_frames token slice has no frames to point at on an image model"
        ) from err
    out = {}
    for key, value in inputs.items():
        if isinstance(value, Tensor):
            value = value.to(device)
            if value.is_floating_point() and value.ndim >= 2 and key.startswith("pixel"):
                value = value.to(dtype)
        out[key] = value
    return out


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def candidate_tokens(tokenizer: Any, candidates: Sequence[str]) -> list[list[int]]:
    """Token ids of each candidate (as it follows the prompt after a space); unknown words raise :class:`CandidateError`."""
    unk = getattr(tokenizer, "unk_token_id", None)
    out = []
    for cand in candidates:
        if not isinstance(cand, str) or not cand.strip():
            raise CandidateError(f"candidate {cand!r} is empty; give each candidate as non-empty text")
        ids = _ids(tokenizer, " " + cand) or _ids(tokenizer, cand)
        if not ids or (unk is not None and unk in ids):
            raise CandidateError(
                f"candidate {cand!r} is not in the model's vocabulary as stated (it tokenizes to the unknown token); "
                "write it as the model's answer words (check case and spelling) or drop it"
            )
        out.append(ids)
    return out


def first_token_ids(tokenizer: Any, candidates: Sequence[str]) -> list[int]:
    """The first token of each candidate; they must differ, since a next-token margin compares them."""
    firsts = [ids[0] for ids in candidate_tokens(tokenizer, candidates)]
    if len(set(firsts)) != len(firsts):
        dup = [c for c, f in zip(candidates, firsts) if firsts.count(f) > 1]
        raise CandidateError(f"candidates {dup} start with the same token, so the next-token margin cannot tell them apart; "
                             "reword them so each starts differently")
    return firsts


@torch.no_grad()
def candidate_logprobs(vm: VideoModel, prompt: str, frames: np.ndarray, fps: float, candidates: Sequence[str],
                       device: str, dtype: torch.dtype, prompt_inputs: Mapping[str, Any] | None = None) -> list[float]:
    """Summed log-probability of each candidate's tokens after the prompt (one forward when all are one token)."""
    token_lists = candidate_tokens(vm.tokenizer, candidates)
    if all(len(t) == 1 for t in token_lists):
        inputs = prompt_inputs if prompt_inputs is not None else build_inputs(vm, prompt, frames, fps, device, dtype)
        logp = vm.model(**inputs)[0, -1].float().log_softmax(-1)
        return [float(logp[t[0]]) for t in token_lists]
    scores = []
    n_prompt = int(build_inputs(vm, prompt, frames, fps, device, dtype)["input_ids"].shape[1])
    for cand in candidates:
        inputs = build_inputs(vm, f"{prompt} {cand}", frames, fps, device, dtype)
        ids = inputs["input_ids"][0]
        logp = vm.model(**inputs)[0].float().log_softmax(-1)
        scores.append(float(sum(logp[t - 1, ids[t]] for t in range(n_prompt, ids.shape[0]))))
    return scores


@torch.no_grad()
def greedy_answer(vm: VideoModel, inputs: Mapping[str, Any], max_new_tokens: int) -> str:
    """The model's greedy continuation of the prompt, decoded (special tokens dropped)."""
    eos = getattr(vm.tokenizer, "eos_token_id", None)
    out = vm.model.generate(max_new_tokens=max_new_tokens, eos_token_id=eos, **inputs)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    return vm.tokenizer.decode(new, skip_special_tokens=True).strip()


def last_logits(vm: VideoModel, inputs: Mapping[str, Any]) -> Float[Tensor, "vocab"]:
    """Next-token logits after the prompt."""
    with torch.no_grad():
        return vm.model(**inputs)[0, -1].float()

