"""PaliGemma prompts without a processor checkpoint, and the ``hooked-vlm inspect`` input builder.

The format is PaliGemmaProcessor's: ``<image>*N`` per image, then ``<bos>``, the prompt and ``\\n`` (the prefix,
``token_type_ids`` 0), then optionally the answer and ``<eos>`` (the suffix, ``token_type_ids`` 1). Images are
resized to the tower's square ``image_size`` (bicubic) and normalised with mean = std = 0.5 by
``SiglipImageProcessorPil``, as the released processors do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hooked_vlm.errors import InputError


def build_paligemma_inputs(
    tokenizer: Any,
    prompts: str | list[str],
    images: list[Any] | list[list[Any]] | None = None,
    answers: str | list[str] | None = None,
    image_size: int = 224,
    tokens_per_image: int = 256,
    image_token: str | None = None,
    padding_side: str = "left",
) -> dict[str, Tensor]:
    """HF keyword tensors for PaliGemma: ``input_ids``, ``attention_mask``, ``token_type_ids`` and (with images)
    ``pixel_values``. ``images``: one list per prompt (or, for one prompt, a flat list); paths, PIL images or HWC
    uint8 arrays. ``answers``: optional suffixes (training / scoring), appended with ``<eos>`` and causal."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    per_prompt = _images_per_prompt(prompts, images)
    answer_list = [None] * len(prompts) if answers is None else ([answers] if isinstance(answers, str) else list(answers))
    if len(answer_list) != len(prompts):
        raise InputError(f"got {len(prompts)} prompts but {len(answer_list)} answers; give one answer per prompt (or none)")
    image_token = image_token or getattr(tokenizer, "image_token", None) or "<image>"
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    rows, types = [], []
    for text, imgs, answer in zip(prompts, per_prompt, answer_list):
        prefix = [image_id] * (tokens_per_image * len(imgs)) + [tokenizer.bos_token_id] + _encode(tokenizer, text + "\n")
        suffix = [] if answer is None else _encode(tokenizer, answer) + [tokenizer.eos_token_id]
        rows.append(prefix + suffix)
        types.append([0] * len(prefix) + [1] * len(suffix))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask, token_types = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (r, t) in enumerate(zip(rows, types)):
        sl = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl], token_types[i, sl] = torch.tensor(r), 1, torch.tensor(t)
    out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": token_types}
    flat = [img for imgs in per_prompt for img in imgs]
    if flat:
        out["pixel_values"] = preprocess_images(flat, image_size)
    return out


def preprocess_images(images: list[Any], image_size: int) -> Tensor:
    """``[n, 3, S, S]`` pixels as PaliGemma's SigLIP image processor makes them."""
    from PIL import Image
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from hooked_vlm.inputs import load_image

    proc = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    return proc(images=[Image.fromarray(load_image(img)) for img in images], return_tensors="pt")["pixel_values"]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _images_per_prompt(prompts: list[str], images: Any) -> list[list[Any]]:
    if images is None:
        return [[] for _ in prompts]
    if len(prompts) == 1 and not (images and isinstance(images[0], (list, tuple))):
        return [list(images)]
    per_prompt = [list(x) for x in images]
    if len(per_prompt) != len(prompts):
        raise InputError(f"got {len(prompts)} prompts but images for {len(per_prompt)}; give one list of images per prompt")
    return per_prompt


def cli_input_builder(request: Any) -> dict[str, Tensor]:
    """``hooked-vlm inspect`` inputs for PaliGemma: the checkpoint's processor when it could be built, else
    :func:`build_paligemma_inputs` with the image size read from the checkpoint's config.json (or the tiny
    model's config). The CLI's generic ``<image>`` marker is dropped: PaliGemma's images always come first."""
    import json

    if request.videos:
        raise InputError("PaliGemma takes images only; pass --image (video frames are not a PaliGemma input)")
    images = list(request.images)
    prompt = " ".join(request.prompt.replace("<image>", " ").split())
    if request.processor is not None:
        marker = getattr(request.processor, "image_token", "<image>")
        out = request.processor(text=[marker * len(images) + prompt], images=[images] if images else None, return_tensors="pt")
        return {k: out[k] for k in ("input_ids", "attention_mask", "pixel_values", "token_type_ids") if k in out}
    if request.checkpoint is not None:
        vision = json.loads((request.checkpoint / "config.json").read_text())["vision_config"]
    else:
        from hooked_vlm.families.paligemma.tiny import paligemma_config

        vision = paligemma_config().vision_config.to_dict()
    size = vision.get("image_size", 224)
    return build_paligemma_inputs(request.tokenizer, prompt, images, image_size=size, tokens_per_image=(size // vision.get("patch_size", 14)) ** 2)


__all__ = ["build_paligemma_inputs", "preprocess_images", "cli_input_builder"]
