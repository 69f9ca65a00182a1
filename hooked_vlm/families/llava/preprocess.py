"""LLaVA preprocessing without torchvision: images and videos -> the keyword tensors of every LLaVA variant.

:func:`build_llava_inputs` reproduces the HF processors' expansion of ``<image>`` / ``<video>`` markers (token
counts from :mod:`hooked_vlm.families.llava.layout`); :func:`cli_input_builder` is the family's input builder
(named in its registration, :data:`hooked_vlm.families.llava.FAMILY`).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_vlm.errors import InputError
from hooked_vlm.families.llava.layout import geometry_from_config, image_tokens

def _image_processor(d: dict[str, Any], checkpoint: Any = None) -> Any:
    """The variant's ``*Pil`` image processor (no torchvision): from the checkpoint's preprocessor_config.json
    when there is one, else sized from the config."""
    from transformers import LlavaImageProcessorPil, LlavaNextImageProcessorPil, LlavaOnevisionImageProcessorPil

    variant, s = d["model_type"], int(d["vision_config"]["image_size"])
    cls = {"llava": LlavaImageProcessorPil, "llava_onevision": LlavaOnevisionImageProcessorPil}.get(variant, LlavaNextImageProcessorPil)
    if checkpoint is not None and (checkpoint / "preprocessor_config.json").is_file():
        return cls.from_pretrained(checkpoint)
    kw: dict[str, Any] = {}
    if variant != "llava":
        kw["image_grid_pinpoints"] = [list(p) for p in d["image_grid_pinpoints"]]
    if variant == "llava_onevision":
        return cls(size={"height": s, "width": s}, **kw)
    return cls(size={"shortest_edge": s}, crop_size={"height": s, "width": s}, **kw)


def _video_pixels(frames: Any, size: int, mean: Any, std: Any) -> Float[Tensor, "frames 3 size size"]:
    """Frames -> ``[F, 3, S, S]``: shortest edge to S (PIL bicubic), centre crop, ``(x/255 - mean) / std``.

    The LLaVA video processors need torchvision; this follows their resize / crop / normalise steps (resized
    frames can differ from torchvision's antialiased resize by a few uint8 levels)."""
    import numpy as np
    from PIL import Image

    from hooked_vlm.inputs import load_video

    arr = load_video(frames)  # T H W 3 uint8
    out = []
    for f in arr:
        img = Image.fromarray(f)
        w, h = img.size
        scale = size / min(h, w)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        out.append(np.asarray(img.crop((left, top, left + size, top + size))))
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255.0
    m, sd = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return ((x - m) / sd).float()


def build_llava_inputs(tokenizer: Any, prompt: str, images: list[Any] | None, videos: list[Any] | None,
                       hf_config: Any, checkpoint: Any = None) -> dict[str, Tensor]:
    """Keyword tensors for one prompt of any LLaVA variant, without torchvision.

    Images go through the variant's ``*Pil`` image processor (``pixel_values``, ``image_sizes``); each ``<image>``
    (``<video>``) marker in ``prompt`` becomes the image (video) token repeated by :func:`image_tokens` /
    :meth:`LlavaGeometry.video_tokens` (identical to the HF processors' expansion); a prompt without markers gets
    every image, then every video, in front. Videos: frames resized and normalised as the LLaVA video processors.
    """
    from hooked_vlm.inputs import load_image

    d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    geom = geometry_from_config(d)
    images, videos = list(images or []), list(videos or [])
    img_tok = getattr(tokenizer, "image_token", None) or "<image>"
    vid_tok = getattr(tokenizer, "video_token", None) or "<video>"
    if "<image>" not in prompt and "<video>" not in prompt:
        prompt = "<image> " * len(images) + "<video> " * len(videos) + prompt
    n_img, n_vid = prompt.count("<image>"), prompt.count("<video>")
    if n_img != len(images) or n_vid != len(videos):
        raise InputError(f"the prompt has {n_img} <image> and {n_vid} <video> markers for {len(images)} image(s) and {len(videos)} video(s)")
    out: dict[str, Tensor] = {}
    counts: list[int] = []
    if images:
        ip = _image_processor(d, checkpoint)
        pil = [load_image(im) for im in images]
        arg = [pil] if d["model_type"] == "llava_onevision" and len(pil) > 1 else pil
        res = ip(images=arg, return_tensors="pt")
        out["pixel_values"] = res["pixel_values"]
        if "image_sizes" in res:
            out["image_sizes"] = res["image_sizes"]
        if d["model_type"] == "llava_onevision":
            out["batch_num_images"] = torch.tensor([len(pil)])
        sizes = res["image_sizes"].tolist() if "image_sizes" in res else [None] * len(pil)
        counts = [image_tokens(geom, tuple(sz) if sz else None, anyres=len(pil) == 1 or d["model_type"] != "llava_onevision")
                  for sz in sizes]
    if videos:
        if not geom.video_pool:
            raise InputError(f"{d['model_type']} takes no videos")
        ip = _image_processor(d, checkpoint)
        pix = [_video_pixels(v, geom.image_size, ip.image_mean, ip.image_std) for v in videos]
        if len({p.shape[0] for p in pix}) != 1:
            raise InputError("all videos of one call need the same number of frames (sample them with num_frames)")
        out["pixel_values_videos"] = torch.stack(pix)
    pieces = prompt.split("<image>")
    text = pieces[0] + "".join(img_tok * c + rest for c, rest in zip(counts, pieces[1:]))
    if videos:
        text = text.replace("<video>", vid_tok * geom.video_tokens(out["pixel_values_videos"].shape[1]))
    enc = tokenizer([text], return_tensors="pt")
    out["input_ids"], out["attention_mask"] = enc["input_ids"], enc["attention_mask"]
    return out


def cli_input_builder(request: Any, family: str | None = None) -> dict[str, Tensor]:
    """``hooked-vlm inspect`` inputs for a LLaVA variant (``family`` = ``cfg.family``): :func:`build_llava_inputs`
    with the checkpoint's config (or the tiny model's); the CLI prompt's ``<image>`` / ``<video>`` markers are
    expanded here."""
    import json

    from hooked_vlm.families.llava import tiny

    family = family or getattr(request, "family", None) or "llava"
    if request.checkpoint is not None:
        cfg = json.loads((request.checkpoint / "config.json").read_text())
    else:
        factories = {"llava": tiny.llava_config, "llava_next": tiny.llava_next_config,
                     "llava_onevision": tiny.llava_onevision_config, "llava_next_video": tiny.llava_next_video_config}
        cfg = factories[family]().to_dict()
    return build_llava_inputs(request.tokenizer, request.prompt, request.images, request.videos, cfg, request.checkpoint)


def expand_placeholders(input_ids: Int[Tensor, "batch pos"], counts: list[int], placeholder: int, pad_id: int = 0,
                        image_token_id: int | None = None) -> tuple[Int[Tensor, "batch pos2"], Int[Tensor, "batch pos2"]]:
    """Expand each single ``placeholder`` (e.g. the original LLaVA's ``-200``) into ``counts[i]`` image tokens.

    Returns ``(input_ids, attention_mask)``, right-padded with ``pad_id``. ``image_token_id`` (default: the
    placeholder itself) is the id written at the expanded positions. Placeholders are counted left to right
    across the batch.
    """
    tok = placeholder if image_token_id is None else image_token_id
    rows, k = [], 0
    for b in range(input_ids.shape[0]):
        row = []
        for t in input_ids[b].tolist():
            if t == placeholder:
                if k >= len(counts):
                    raise InputError(f"input_ids has more than {len(counts)} placeholders ({placeholder})")
                row += [tok] * counts[k]
                k += 1
            else:
                row.append(t)
        rows.append(row)
    if k != len(counts):
        raise InputError(f"input_ids has {k} placeholders ({placeholder}) but {len(counts)} counts were given")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
    return ids, mask


__all__ = ["build_llava_inputs", "cli_input_builder", "expand_placeholders"]
