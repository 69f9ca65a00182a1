"""Tiny random-weight Gemma 3 config (registered in :data:`hooked_vlm.families.gemma3.FAMILY`)."""

from __future__ import annotations

from typing import Any

from hooked_vlm.tiny import TEXT


def gemma3_config(
    mm_tokens_per_image: int = 4,
    image_size: int = 56,
    sliding_window: int = 8,
    layer_types: list[str] | None = None,
    vision_layers: int = 2,
    rope_parameters: dict[str, Any] | None = None,
    **text_overrides: Any,
):
    """Tiny Gemma3: SigLIP 56 px / 14 px patches (4x4) pooled to ``mm_tokens_per_image`` tokens; layer 0
    sliding, layer 1 full. ``layer_types`` is always set (the default, every 6th layer full, would make
    every layer of a 2-layer model sliding)."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    n_layers = text_overrides.pop("num_hidden_layers", TEXT["num_hidden_layers"])
    if layer_types is None:
        layer_types = ["full_attention" if i % 2 else "sliding_attention" for i in range(n_layers)]
    text = Gemma3TextConfig(
        **dict(TEXT, num_hidden_layers=n_layers), head_dim=16, query_pre_attn_scalar=16, sliding_window=sliding_window,
        layer_types=layer_types, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        rope_parameters=rope_parameters or {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                            "full_attention": {"rope_type": "default", "rope_theta": 1e6}},
        **text_overrides,
    )
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=2,
                                image_size=image_size, patch_size=14, vision_use_head=False)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=mm_tokens_per_image,
                        boi_token_index=98, eoi_token_index=99, image_token_index=100)
