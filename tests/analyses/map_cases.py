"""Tiny models and inputs of every family for the attention-map / attribution tests (cached per process)."""

from __future__ import annotations

import functools

import numpy as np
import torch

VLM_FAMILIES = [
    "qwen2-vl-image", "qwen2.5-vl-video", "llava", "llava-next", "llava-onevision", "llava-next-video", "gemma3",
    "qwen3-vl-video", "paligemma",  # i10b: new families (PaliGemma 2's soft-capped attention has no kernels path)
]


def _image(size=(56, 56), seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (*size, 3), dtype=np.uint8)


@functools.lru_cache(maxsize=None)
def tokenizer():
    from hooked_vlm.tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


@functools.lru_cache(maxsize=None)
def case(name: str):
    """(model, inputs) for a family case; the model is a random tiny model in eval mode."""
    from hooked_vlm.loading import from_hf
    from hooked_vlm.tiny import tiny_hf_model

    tok = tokenizer()
    torch.manual_seed(0)
    if name == "qwen2-vl-image":
        from hooked_vlm.inputs import build_qwen_inputs

        hf = tiny_hf_model("tiny-qwen2-vl")
        inputs = build_qwen_inputs(tok, "what is <image> the red circle", images=[_image((112, 112))])
    elif name == "qwen2.5-vl-video":
        from hooked_vlm.inputs import build_qwen_inputs

        hf = tiny_hf_model("tiny-qwen2.5-vl")
        frames = np.stack([_image((56, 84), s) for s in range(4)])
        inputs = build_qwen_inputs(tok, "<video> where does it go", videos=[frames], video_min_pixels=56 * 84,
                                   video_max_pixels=56 * 84)
    elif name == "gemma3":
        from hooked_vlm.families.gemma3_inputs import build_gemma3_inputs

        hf = tiny_hf_model("tiny-gemma3")
        inputs = build_gemma3_inputs(tok, "what color is <start_of_image> the circle ?", [_image((40, 70))],
                                     image_size=56, mm_tokens_per_image=4)
    elif name == "qwen3-vl-video":
        from hooked_vlm.families.qwen3_vl.preprocess import build_qwen3_vl_inputs

        hf = tiny_hf_model("tiny-qwen3-vl")
        frames = np.stack([_image((56, 84), s) for s in range(4)])
        inputs = build_qwen3_vl_inputs(tok, "<image> and <video> where does it go", [_image((56, 56))], [frames], patch_size=14,
                                       video_min_pixels=56 * 84, video_max_pixels=56 * 84)
    elif name == "paligemma":
        from hooked_vlm.families.paligemma.preprocess import build_paligemma_inputs

        hf = tiny_hf_model("tiny-paligemma")
        inputs = build_paligemma_inputs(tok, "what color is the circle ?", [_image((40, 70))], answers="red", image_size=56,
                                        tokens_per_image=16)
    elif name.startswith("llava"):
        from hooked_vlm.families.llava_inputs import build_llava_inputs

        hf = tiny_hf_model(f"tiny-{name}")
        if name == "llava-next-video":
            video = np.stack([_image((40, 60), s) for s in range(2)])
            inputs = build_llava_inputs(tok, "what is <video> that ?", [], [video], hf.config)
        else:
            inputs = build_llava_inputs(tok, "what is <image> this ?", [_image((45, 70))], [], hf.config)
    elif name in ("clip", "siglip"):
        hf = tiny_hf_model(f"tiny-{name}")
        size = 64 if name == "clip" else 56
        pix = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        ids = torch.tensor([[0, 5, 9, 12, 7, 1]]) if name == "clip" else torch.tensor([[5, 9, 12, 7, 3, 4, 8, 6, 10, 11, 13, 14, 15, 16, 17, 1]])
        inputs = dict(input_ids=ids, pixel_values=pix)
    else:
        raise KeyError(name)
    model = from_hf(hf).eval()
    return model, {k: v for k, v in inputs.items()}


def patterns(model, inputs, prefix: str = "") -> dict[int, torch.Tensor]:
    """Materialised ``hook_pattern`` of every layer (fp32, [B, H, L, L]) via the cache: the independent reference."""
    _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.startswith(prefix + "blocks.") and n.endswith("attn.hook_pattern"))
    out = {}
    for name in cache.keys():
        if name.startswith(prefix + "blocks.") and name.endswith("attn.hook_pattern"):
            out[int(name[len(prefix):].split(".")[1])] = cache[name].double()
    return out
