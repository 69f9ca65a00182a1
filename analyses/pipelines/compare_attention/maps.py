"""One CSV row on one model: the yes/no answer and three maps of the image, each a distribution over its pixels.

* ``attention``: what the answer position (the last prompt token, which predicts the answer) reads from the image
  tokens, from the attention-statistics kernels (:func:`analyses.attention_maps.attention_map`, no L x L), per
  layer and head renormalised over the image tokens, fused over heads (mean / max / entropy-weighted) and averaged
  over the last quarter of the layers. The question tokens' attention is recorded per layer too.
* ``gradcam``: Grad-CAM on the vision tower for the predicted answer token (:func:`analyses.attribution.grad_cam`).
* ``saliency``: ``|d (logit yes - logit no) / d pixels|`` summed over channels (:func:`analyses.attribution.gradient_saliency`).

Each map is spread onto the pixels of the image as stored (each cell's mass split by area: totals kept). The model
runs in eval mode. A map that cannot be computed raises :class:`AttentionUnavailableError` naming the model and the
reason; nothing is replaced by a uniform map (a Grad-CAM whose ReLU leaves nothing is reported as empty).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor

from analyses.attention_maps import MethodNotApplicableError, attention_map, eval_mode, fuse_heads, pool_grid

__all__ = ["AttentionUnavailableError", "RowMaps", "METHODS", "answer_ids", "build_inputs", "row_maps"]

METHODS = ("attention", "gradcam", "saliency")


class AttentionUnavailableError(RuntimeError):
    """A map could not be extracted from a model (the message names the model and why)."""


@dataclass
class RowMaps:
    """The answer and the maps of one row: ``maps[method]`` is ``[H, W]`` over the image's pixels (sum 1) or None."""

    answer: str
    prob: float
    p_yes: float
    maps: dict[str, Float[Tensor, "h w"] | None]
    answer_image_mass: list[list[float]]  # layers x heads: the answer position's attention mass on the image
    question_image_mass: list[float]  # per layer (mean over heads): the question tokens' mass on the image
    layers_used: list[int]


def answer_ids(tokenizer: Any, words: tuple[str, str], model_name: str) -> tuple[int, int]:
    """Token ids of the two answer words (each must be one token of the vocabulary)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    out = []
    for word in words:
        tid = tokenizer.convert_tokens_to_ids(word)
        if tid is None or tid == unk:
            pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(pieces) != 1:
                raise AttentionUnavailableError(f"{model_name}: the answer word {word!r} is {len(pieces)} tokens; pass "
                                                "--answer-words with single-token words of this tokenizer")
            tid = pieces[0]
        out.append(int(tid))
    return out[0], out[1]


def build_inputs(loaded: Any, image: np.ndarray, prompt: str, device: str) -> dict[str, Any]:
    """The family's keyword tensors for one prompt with one image (the input builder ``hooked-vlm inspect`` uses)."""
    from hooked_vlm.cli import InputRequest, input_builder_for

    family = loaded.model.cfg.family
    builder = input_builder_for(family)
    pil = Image.fromarray(image)
    if builder is not None:
        built = builder(InputRequest(loaded.tokenizer, prompt, [pil], [], loaded.processor, loaded.checkpoint, loaded.tiny))
    elif loaded.processor is not None:  # a family without a builder: its checkpoint's own HF processor
        built = dict(loaded.processor(text=[prompt], images=[pil], return_tensors="pt"))
    else:
        raise AttentionUnavailableError(f"{loaded.name}: no input builder for family {family!r} and no HF processor in the checkpoint")
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in built.items()}


def _with_answer(inputs: dict[str, Any], token: int) -> dict[str, Any]:
    """The prompt + one answer token: every per-position tensor gets one more column (the token / 1 / 0)."""
    ids = inputs["input_ids"]
    out = dict(inputs)
    for name, value in inputs.items():
        if isinstance(value, Tensor) and value.ndim == 2 and value.shape == ids.shape:
            fill = token if name == "input_ids" else (1 if name == "attention_mask" else 0)
            out[name] = torch.cat([value, torch.full_like(value[:, :1], fill)], dim=1)
    return out


def _to_pixels(grid: Tensor, size: tuple[int, int], what: str, model_name: str) -> Tensor | None:
    """A non-negative map on any grid -> a distribution over ``size`` pixels (cell mass split by area)."""
    g = grid.detach().double().cpu()
    if not torch.isfinite(g).all():
        raise AttentionUnavailableError(f"{model_name}: the {what} map is not finite")
    if (g < 0).any():
        raise AttentionUnavailableError(f"{model_name}: the {what} map has negative values; expected a non-negative map")
    total = float(g.sum())
    if total <= 0:
        return None
    return pool_grid(g / total, size, mode="mass").double()


def _attention(model: Any, inputs: dict[str, Any], image_pos: Tensor, question_pos: Tensor, fusion: str, name: str) -> tuple[Tensor, list, list, list]:
    layout = model.layout(**inputs)
    last = inputs["input_ids"].shape[1] - 1
    try:
        amap = attention_map(model, inputs, {"answer": [last], "question": question_pos.tolist()}, heads="per_head")
        grid = amap.grid(image=0)  # layers, H, QG, frames, rows, cols
    except (MethodNotApplicableError, NotImplementedError, KeyError, IndexError, ValueError) as err:
        raise AttentionUnavailableError(f"{name}: the answer token's attention to the image cannot be extracted "
                                        f"({type(err).__name__}: {err})") from err
    values = amap.values[:, 0]  # layers, H, QG, L
    answer_mass = values[:, :, 0][..., image_pos].sum(-1)  # layers, H
    question_mass = values[:, :, 1][..., image_pos].sum(-1).mean(-1)  # layers
    n = grid.shape[0]
    used = list(range(n - max(1, n // 4), n))
    cells = grid[used, :, 0, 0]  # used layers, H, rows, cols
    flat = cells.reshape(*cells.shape[:2], -1)
    mass = flat.sum(-1, keepdim=True)
    if not bool((mass > 0).all()):
        raise AttentionUnavailableError(f"{name}: some heads put no attention on the image tokens in layers {used}; "
                                        "the image's share cannot be renormalised")
    fused = fuse_heads(flat / mass, fusion, head_dim=-2).mean(0)  # cells
    return fused.reshape(cells.shape[-2:]), answer_mass.tolist(), question_mass.tolist(), used


def row_maps(loaded: Any, image: np.ndarray, prompt: str, yes_no: tuple[int, int], device: str, fusion: str = "mean",
             methods: tuple[str, ...] = METHODS) -> RowMaps:
    """Answer + maps of one image and prompt on one model (eval mode); see the module docstring."""
    from analyses.attribution import gradient_saliency, grad_cam, pixel_map

    model, name = loaded.model, loaded.name
    size = image.shape[:2]
    inputs = build_inputs(loaded, image, prompt, device)
    yes, no = yes_no
    with eval_mode(model):
        layout = model.layout(**inputs)
        try:
            image_pos = layout.positions(image=0).cpu()
        except IndexError as err:
            raise AttentionUnavailableError(f"{name}: the prompt holds no image tokens ({err}); put <image> in --prompt-template") from err
        last = inputs["input_ids"].shape[1] - 1
        question_pos = torch.arange(int(image_pos.max()) + 1, last)
        if question_pos.numel() == 0:
            raise AttentionUnavailableError(f"{name}: no question tokens follow the image; put {{question}} after <image> in the template")
        with torch.no_grad():
            logits = model(**inputs)[0, -1].float()
        probs = logits.softmax(-1)
        answer_id = yes if logits[yes] >= logits[no] else no
        maps: dict[str, Tensor | None] = {}
        answer_mass: list = []
        question_mass: list = []
        used: list[int] = []
        if "attention" in methods:
            grid, answer_mass, question_mass, used = _attention(model, inputs, image_pos, question_pos, fusion, name)
            maps["attention"] = _to_pixels(grid, size, "attention", name)
            if maps["attention"] is None:
                raise AttentionUnavailableError(f"{name}: the answer token's attention to the image is zero in layers {used}")
        if "gradcam" in methods:
            try:
                cams = grad_cam(model, _with_answer(inputs, answer_id), [last + 1])
            except MethodNotApplicableError as err:
                raise AttentionUnavailableError(f"{name}: Grad-CAM cannot be computed ({err})") from err
            maps["gradcam"] = _to_pixels(cams.maps[0, 0], size, "Grad-CAM", name)
        if "saliency" in methods:
            attr = gradient_saliency(model, inputs, lambda out: out[:, -1, yes] - out[:, -1, no])
            maps["saliency"] = _to_pixels(pixel_map(model, inputs, attr, image=0)[0], size, "saliency", name)
    word = "yes" if answer_id == yes else "no"
    p_yes = float(torch.softmax(logits[[yes, no]], -1)[0])
    return RowMaps(word, float(probs[answer_id]), p_yes, maps, answer_mass, question_mass, used)
