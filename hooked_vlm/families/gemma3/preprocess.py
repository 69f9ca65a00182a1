"""Gemma 3 / MedGemma preprocessing: prompts and images -> transformers' keyword tensors, without a processor checkpoint.

:func:`cli_input_builder` is the family's input builder (named in :data:`hooked_vlm.families.gemma3.FAMILY`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from hooked_vlm.errors import InputError

# ----------------------------------------------------------------------------------------------- builder
def build_gemma3_inputs(
    tokenizer: Any,
    prompts: str | list[str],
    images: list[Any] | list[list[Any]] | None = None,
    image_size: int = 896,
    mm_tokens_per_image: int = 256,
    image_token: str | None = None,
    padding_side: str = "left",
) -> dict[str, Tensor]:
    """HF keyword tensors for Gemma 3 without a processor checkpoint.

    Each ``<start_of_image>`` in a prompt (or, if a prompt has none, one per image at its start) is expanded to
    ``\\n\\n<start_of_image> <image>*mm_tokens_per_image <end_of_image>\\n\\n`` as Gemma3Processor does; images
    (paths, PIL images or HWC uint8 arrays) are resized to ``image_size`` (bilinear) and normalised with
    mean = std = 0.5 by ``Gemma3ImageProcessorPil``. Returns ``input_ids``, ``attention_mask``,
    ``token_type_ids`` and (with images) ``pixel_values``.
    """
    from PIL import Image
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from hooked_vlm.inputs import load_image

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if images is None:
        per_prompt: list[list[Any]] = [[] for _ in prompts]
    elif len(prompts) == 1 and not (images and isinstance(images[0], (list, tuple))):
        per_prompt = [list(images)]
    else:
        per_prompt = [list(x) for x in images]  # type: ignore[arg-type]
    if len(per_prompt) != len(prompts):
        raise InputError(f"got {len(prompts)} prompts but images for {len(per_prompt)}; give one list of images per prompt")
    boi = getattr(tokenizer, "boi_token", None) or "<start_of_image>"
    eoi = getattr(tokenizer, "eoi_token", None) or "<end_of_image>"
    image_token = image_token or getattr(tokenizer, "image_token", None) or "<image_soft_token>"
    block = f"\n\n{boi}{image_token * mm_tokens_per_image}{eoi}\n\n"
    texts = []
    for i, (text, imgs) in enumerate(zip(prompts, per_prompt)):
        if imgs and boi not in text:
            text = boi * len(imgs) + text
        if text.count(boi) != len(imgs):
            raise InputError(f"prompt {i} has {text.count(boi)} {boi} markers but {len(imgs)} image(s); one marker per image")
        texts.append(text.replace(boi, block))
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side=padding_side)
    ids = enc["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    out = {"input_ids": ids, "attention_mask": enc["attention_mask"], "token_type_ids": (ids == image_id).long()}
    flat = [img for imgs in per_prompt for img in imgs]
    if flat:
        proc = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
        pil = [Image.fromarray(load_image(img)) for img in flat]
        out["pixel_values"] = proc(images=pil, return_tensors="pt")["pixel_values"]
    return out


def cli_input_builder(request: Any) -> dict[str, Tensor]:
    """``hooked-vlm inspect`` inputs for Gemma 3: the checkpoint's processor when it could be built, else
    :func:`build_gemma3_inputs` with the image size and token count read from the checkpoint's config.json
    (or the tiny model's config)."""
    import json

    if request.videos:
        raise InputError("Gemma 3 takes images only; pass --image (video frames are not a Gemma 3 input)")
    images = list(request.images)
    boi = getattr(request.tokenizer, "boi_token", None) or "<start_of_image>"
    prompt = request.prompt.replace("<image>", boi)  # the CLI's generic image marker
    if request.processor is not None:
        if images and boi not in prompt:
            prompt = boi * len(images) + prompt
        out = request.processor(text=[prompt], images=[images] if images else None, return_tensors="pt")
        return {k: out[k] for k in ("input_ids", "attention_mask", "pixel_values", "token_type_ids") if k in out}
    if request.checkpoint is not None:
        raw = json.loads((request.checkpoint / "config.json").read_text())
        size, per_image = raw["vision_config"]["image_size"], raw.get("mm_tokens_per_image", 256)
    else:
        from hooked_vlm.families.gemma3.tiny import gemma3_config

        cfg = gemma3_config()
        size, per_image = cfg.vision_config.image_size, cfg.mm_tokens_per_image
    return build_gemma3_inputs(request.tokenizer, prompt, images, image_size=size, mm_tokens_per_image=per_image)


__all__ = ["build_gemma3_inputs", "cli_input_builder"]
