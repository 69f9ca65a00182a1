"""Qwen2-VL and Qwen2.5-VL: one folder, one registration.

``model.py`` the hooked model (vision tower, patch merger, M-RoPE decoder), ``layout.py`` input checks, token layout
and M-RoPE position ids, ``preprocess.py`` images / videos / prompts -> keyword tensors (no torchvision), ``tiny.py``
the tiny configs. Importing this package imports no torch; the old names (``HookedQwenVL``, ...) resolve lazily.
"""

from __future__ import annotations

from hooked_vlm.families.registry import LM_HOOKS, VISION_BLOCK_HOOKS, Family, InputSchema, TinyModel, lazy_attributes

FAMILY = Family(
    name="qwen_vl",
    summary="Qwen2-VL / Qwen2.5-VL (ViT with 2-D rotary and windows, patch merger, Qwen2 decoder with M-RoPE)",
    architectures=("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"),
    model_class="hooked_vlm.families.qwen_vl.model:HookedQwenVL",
    config_families=("qwen2_vl", "qwen2_5_vl"),
    input_schema=InputSchema(
        per_sequence=("input_ids", "attention_mask", "mm_token_type_ids"),
        pixels=("pixel_values", "pixel_values_videos"),
        pixel_kinds=(("image", "pixel_values"), ("video", "pixel_values_videos")),
        structure=("image_grid_thw", "video_grid_thw", "second_per_grid_ts"),
    ),
    input_builder="hooked_vlm.families.qwen_vl.preprocess:cli_input_builder",
    model_types=(("qwen2_vl", "Qwen2VLForConditionalGeneration"), ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration")),
    tiny_models=(
        TinyModel("tiny-qwen2-vl", "hooked_vlm.families.qwen_vl.tiny:qwen2_vl_config", "Qwen2VLForConditionalGeneration"),
        TinyModel("tiny-qwen2.5-vl", "hooked_vlm.families.qwen_vl.tiny:qwen2_5_vl_config", "Qwen2_5_VLForConditionalGeneration"),
    ),
    hooks=LM_HOOKS + VISION_BLOCK_HOOKS + ("vision.hook_patch_embed", "vision.merger.hook_in"),
)

#: The model module's names (``HookedQwenVL``, ``build_vision_plan``, ...) on first use (imports torch).
__getattr__ = lazy_attributes(__name__, ("model", "layout", "preprocess"))
