"""Tiny random-weight LLaVA configs: 1.5, NeXT, OneVision, NeXT-Video, DINOv2 tower (registered in
:data:`hooked_vlm.families.llava.FAMILY`)."""

from __future__ import annotations

from typing import Any

from hooked_vlm.tiny import TEXT

LLAVA_TEXT = dict(TEXT, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def _clip_vision(image_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=image_size, patch_size=14, hidden_act="quick_gelu")


def llava_config(text: str = "llama", text_overrides: dict | None = None, **overrides: Any):
    """LLaVA-1.5 (``text="mistral"``: LLaVA-Med v1.5): CLIP 56 px (4x4 patches), 16 image tokens."""
    from transformers import LlamaConfig, LlavaConfig, MistralConfig

    text_cfg = (MistralConfig if text == "mistral" else LlamaConfig)(**dict(LLAVA_TEXT, **(text_overrides or {})))
    kw = dict(image_token_index=100, vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    kw.update(overrides)
    return LlavaConfig(vision_config=_clip_vision(56), text_config=text_cfg, **kw)


def llava_next_config(**overrides: Any):
    """LLaVA-NeXT: CLIP 28 px crops (2x2 patches), Mistral text, pinpoints 28x56 / 56x28 / 56x56."""
    from transformers import LlavaNextConfig, MistralConfig

    kw = dict(image_token_index=100, image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]], vision_feature_layer=-2, vision_feature_select_strategy="default")
    kw.update(overrides)
    return LlavaNextConfig(vision_config=_clip_vision(28), text_config=MistralConfig(**LLAVA_TEXT), **kw)


def llava_onevision_config(**overrides: Any):
    """LLaVA-OneVision: SigLIP 28 px crops (no CLS, no head), Qwen2 text, anyres_max_9, video pooling + newline."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vis = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14, vision_use_head=False)
    kw = dict(image_token_index=100, video_token_index=101, image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]],
              vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    kw.update(overrides)
    return LlavaOnevisionConfig(vision_config=vis, text_config=Qwen2Config(**LLAVA_TEXT), **kw)


def llava_next_video_config(**overrides: Any):
    """LLaVA-NeXT-Video: CLIP 56 px, Llama text, 2x2 average pooling before the projector (4 tokens per frame)."""
    from transformers import LlamaConfig, LlavaNextVideoConfig

    kw = dict(image_token_index=100, video_token_index=101, spatial_pool_mode="average", spatial_pool_stride=2,
              image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]], vision_feature_layer=-2, vision_feature_select_strategy="default")
    kw.update(overrides)
    return LlavaNextVideoConfig(vision_config=_clip_vision(56), text_config=LlamaConfig(**LLAVA_TEXT), **kw)


def llava_dinov2_config(**overrides: Any):
    """LLaVA-1.5 with a DINOv2 tower (LLaVA-Rad's geometry, 56 px instead of 518): transformers' LlavaConfig + Dinov2Config."""
    from transformers import Dinov2Config, LlamaConfig, LlavaConfig

    vis = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=56, patch_size=14)
    kw = dict(image_token_index=100, vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    kw.update(overrides)
    return LlavaConfig(vision_config=vis, text_config=LlamaConfig(**LLAVA_TEXT), **kw)
