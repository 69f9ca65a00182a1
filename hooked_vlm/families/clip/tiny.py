"""Tiny random-weight CLIP / SigLIP configs (registered in :data:`hooked_vlm.families.clip.FAMILY`)."""

from __future__ import annotations

from typing import Any

TWO_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TWO_TOWER_TEXT = dict(TWO_TOWER, vocab_size=128, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def clip_config(eos_token_id: int = 1, **overrides: Any):
    """Tiny CLIP: B/32 geometry (64 px, 2x2 patches + [CLS]), projection 16; ``eos_token_id=2`` gives the legacy pooling."""
    from transformers import CLIPConfig

    text = dict(TWO_TOWER_TEXT, eos_token_id=eos_token_id)
    vision = dict(TWO_TOWER, image_size=64, patch_size=32, hidden_act="quick_gelu")
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, **overrides)


def siglip_config(**overrides: Any):
    """Tiny SigLIP: 56 px / patch 14 (4x4 patches, no [CLS]) with the MAP head; texts pool the last of 16 tokens."""
    from transformers import SiglipConfig

    vision = dict(TWO_TOWER, image_size=56, patch_size=14)
    return SiglipConfig(text_config=dict(TWO_TOWER_TEXT), vision_config=vision, **overrides)
