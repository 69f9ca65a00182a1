"""Tiny random-weight PaliGemma / PaliGemma 2 configs (registered in :data:`hooked_vlm.families.paligemma.FAMILY`)."""

from __future__ import annotations

from typing import Any

from hooked_vlm.tiny import TEXT


def paligemma_config(text: str = "gemma", image_size: int = 56, vision_layers: int = 2, image_token_index: int = 100,
                     **text_overrides: Any):
    """Tiny PaliGemma: SigLIP 56 px / 14 px patches = 16 image tokens, Gemma text (``text="gemma2"``: PaliGemma 2,
    Gemma 2 text with four norms, query_pre_attn_scalar 24 != head_dim 16, attention / final soft-capping 50 / 30,
    layer 0 sliding (window 40: longer than a two-image prefix, shorter than a long answer), layer 1 full).
    Image token 100, bos 0."""
    from transformers import Gemma2Config, GemmaConfig, PaliGemmaConfig, SiglipVisionConfig

    common = dict(TEXT, head_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if text == "gemma2":
        common.update(query_pre_attn_scalar=24, sliding_window=40, layer_types=["sliding_attention", "full_attention"],
                      attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
        text_cfg = Gemma2Config(**dict(common, **text_overrides))
    elif text == "gemma":
        text_cfg = GemmaConfig(**dict(common, **text_overrides))
    else:
        raise ValueError(f"text must be 'gemma' (PaliGemma) or 'gemma2' (PaliGemma 2), got {text!r}")
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=2,
                                image_size=image_size, patch_size=14, vision_use_head=False)
    return PaliGemmaConfig(vision_config=vision, text_config=text_cfg, image_token_index=image_token_index, projection_dim=64,
                           hidden_size=64, vocab_size=128)


def paligemma2_config(**overrides: Any):
    """Tiny PaliGemma 2 (see :func:`paligemma_config`)."""
    return paligemma_config(text="gemma2", **overrides)
