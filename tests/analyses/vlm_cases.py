"""Tiny hooked models of every decoder family with a prompt each (image or video), for the representation tests."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

#: case name -> (tiny model name, visual kind)
CASES = {
    "qwen2-vl-image": ("tiny-qwen2-vl", "image"),
    "qwen2-vl-video": ("tiny-qwen2-vl", "video"),
    "qwen2.5-vl-image": ("tiny-qwen2.5-vl", "image"),
    "qwen2.5-vl-video": ("tiny-qwen2.5-vl", "video"),
    "llava-image": ("tiny-llava", "image"),
    "llava-next-image": ("tiny-llava-next", "image"),
    "llava-next-video": ("tiny-llava-next-video", "video"),
    "llava-onevision-image": ("tiny-llava-onevision", "image"),
    "llava-dinov2-image": ("tiny-llava-dinov2", "image"),
    "gemma3-image": ("tiny-gemma3", "image"),
}


@lru_cache(maxsize=None)
def model_and_config(name: str):
    from hooked_vlm.loading import from_hf
    from hooked_vlm.tiny import tiny_hf_model

    hf = tiny_hf_model(name)
    return from_hf(hf).eval(), hf.config


@lru_cache(maxsize=None)
def tokenizer():
    from hooked_vlm.tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


def make_inputs(case: str, seed: int = 0, prompt: str = "what is the red circle"):
    """``(model, inputs, image_or_frames)`` of one case; the pixels depend on ``seed``, the layout does not."""
    from hooked_vlm.samples import synthetic_grid_image, synthetic_video

    name, kind = CASES[case]
    model, cfg = model_and_config(name)
    tok = tokenizer()
    if kind == "image":
        visual, _ = synthetic_grid_image(seed=seed, grid=4, num_shapes=3)
    else:
        frames, _ = synthetic_video(num_frames=4, size=(56, 56), seed=seed, object_size=20)
        visual = np.ascontiguousarray(frames)
    if name.startswith("tiny-qwen"):
        from hooked_vlm.inputs import build_qwen_inputs

        if kind == "image":
            inputs = build_qwen_inputs(tok, f"<image> {prompt}", images=[visual])
        else:
            kw = dict(video_min_pixels=56 * 56, video_max_pixels=56 * 56)
            inputs = build_qwen_inputs(tok, f"<video> {prompt}", videos=[visual], **kw)
    elif name.startswith("tiny-llava"):
        from hooked_vlm.families.llava_inputs import build_llava_inputs

        if kind == "image":
            inputs = build_llava_inputs(tok, f"<image> {prompt}", [visual], [], cfg)
        else:
            inputs = build_llava_inputs(tok, f"<video> {prompt}", [], [visual], cfg)
    else:
        from hooked_vlm.families.gemma3_inputs import build_gemma3_inputs

        inputs = build_gemma3_inputs(tok, f"<start_of_image> {prompt}", [visual], image_size=56, mm_tokens_per_image=4)
    return model, dict(inputs), visual
