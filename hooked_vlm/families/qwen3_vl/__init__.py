"""Qwen3-VL (dense): one folder, one registration.

``model.py`` the hooked model (ViT with a resampled position table, DeepStack mergers whose features are added
after the first LM blocks, Qwen3 decoder with QK-norm and interleaved M-RoPE), ``layout.py`` input checks, token
layout and position ids (videos as timestamped slices), ``preprocess.py`` prompts, images and videos -> keyword
tensors, ``tiny.py`` the tiny config. Importing this package imports no torch; ``HookedQwen3VL`` & co resolve lazily.
"""

from __future__ import annotations

from hooked_vlm.families.registry import LM_HOOKS, VISION_BLOCK_HOOKS, Family, InputSchema, TinyModel, lazy_attributes

_ARCH = "Qwen3VLForConditionalGeneration"

FAMILY = Family(
    name="qwen3_vl",
    summary="Qwen3-VL dense (ViT + DeepStack features added after the first LM blocks, Qwen3 decoder, interleaved M-RoPE)",
    architectures=(_ARCH,),
    model_class="hooked_vlm.families.qwen3_vl.model:HookedQwen3VL",
    config_families=("qwen3_vl",),
    input_schema=InputSchema(
        per_sequence=("input_ids", "attention_mask", "mm_token_type_ids"),
        pixels=("pixel_values", "pixel_values_videos"),
        pixel_kinds=(("image", "pixel_values"), ("video", "pixel_values_videos")),
        structure=("image_grid_thw", "video_grid_thw"),
    ),
    input_builder="hooked_vlm.families.qwen3_vl.preprocess:cli_input_builder",
    model_types=(("qwen3_vl", _ARCH),),
    tiny_models=(TinyModel("tiny-qwen3-vl", "hooked_vlm.families.qwen3_vl.tiny:qwen3_vl_config", _ARCH),),
    hooks=LM_HOOKS + VISION_BLOCK_HOOKS + (
        "vision.hook_patch_embed", "vision.hook_pos_embed", "vision.hook_embed", "vision.merger.hook_in",
        "vision.deepstack_merger_list.0.hook_in", "blocks.0.hook_deepstack", "blocks.{i}.attn.q_norm.hook_normalized",
        "blocks.{i}.attn.k_norm.hook_normalized", "blocks.{i}.mlp.hook_pre_linear",
    ),
)

#: The model module's names (``HookedQwen3VL``, ...) on first use (imports torch).
__getattr__ = lazy_attributes(__name__, ("model", "layout", "preprocess"))
