"""Tiny random-weight Qwen3-VL config (registered in :data:`hooked_vlm.families.qwen3_vl.FAMILY`)."""

from __future__ import annotations

from typing import Any

from hooked_vlm.tiny import SPECIAL_IDS, TEXT


def qwen3_vl_config(vision_depth: int = 2, deepstack_visual_indexes: tuple[int, ...] = (0, 1), num_hidden_layers: int = 3,
                    rope_theta: float = 10.0, **text_overrides: Any):
    """Tiny Qwen3-VL: ViT width 32 over 14 px patches (28 px merged cells, as the tiny Qwen2-VL), a 4 x 4 learned
    position grid, DeepStack features taken after vision blocks 0 and 1 and added after LM blocks 0 and 1 of 3
    (the last block has none), QK-norm, interleaved M-RoPE sections [2, 3, 3] with theta 10 (every axis turns
    visibly per position)."""
    from transformers import Qwen3VLConfig

    text = dict(TEXT, num_hidden_layers=num_hidden_layers, head_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True}, **text_overrides)
    vision = dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=list(deepstack_visual_indexes))
    return Qwen3VLConfig(text_config=text, vision_config=vision, **SPECIAL_IDS)
