"""Tiny random-weight Qwen2-VL / Qwen2.5-VL configs (registered in :data:`hooked_vlm.families.qwen_vl.FAMILY`)."""

from __future__ import annotations

from typing import Any

from hooked_vlm.tiny import SPECIAL_IDS, TEXT


def qwen2_vl_config(vision_depth: int = 2, **text_overrides: Any):
    from transformers import Qwen2VLConfig

    text = dict(TEXT, bos_token_id=0, eos_token_id=1, pad_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}, **text_overrides)
    vision = dict(depth=vision_depth, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, **SPECIAL_IDS)


def qwen2_5_vl_config(vision_depth: int = 4, window_size: int = 56, **text_overrides: Any):
    from transformers import Qwen2_5_VLConfig

    text = dict(TEXT, bos_token_id=0, eos_token_id=1, pad_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}, **text_overrides)
    vision = dict(
        depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, window_size=window_size,
        fullatt_block_indexes=[i for i in range(vision_depth) if i % 2 == 1], tokens_per_second=2,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
    )
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **SPECIAL_IDS)
