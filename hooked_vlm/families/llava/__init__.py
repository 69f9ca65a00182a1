"""LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision / LLaVA-NeXT-Video (and original-layout checkpoints): one folder,
one registration.

``model.py`` the hooked model (CLIP / SigLIP / DINOv2 tower, projector, any-resolution packing, Llama / Mistral /
Qwen2 decoder), ``layout.py`` geometry, input checks and the token layout, ``preprocess.py`` prompts, images and
videos -> keyword tensors, ``tiny.py`` the tiny configs. Importing this package imports no torch.
"""

from __future__ import annotations

from hooked_vlm.families.registry import LM_HOOKS, VISION_BLOCK_HOOKS, Family, InputSchema, TinyModel, lazy_attributes

_T = "hooked_vlm.families.llava.tiny:"

FAMILY = Family(
    name="llava",
    summary="LLaVA 1.5 / NeXT / OneVision / NeXT-Video (ViT tower, MLP projector, any-resolution crops, Llama-style decoder)",
    architectures=(
        "LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration",
        "LlavaNextVideoForConditionalGeneration", "LlavaLlamaForCausalLM", "LlavaMistralForCausalLM",
    ),
    model_class="hooked_vlm.families.llava.model:HookedLlava",
    config_families=("llava", "llava_next", "llava_onevision", "llava_next_video"),
    input_schema=InputSchema(
        pixels=("pixel_values", "pixel_values_videos"),
        pixel_kinds=(("image", "pixel_values"), ("video", "pixel_values_videos")),
        structure=("image_sizes", "image_sizes_videos"),
        per_prompt=("batch_num_images",),
        options=("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio"),
        padded_pixels=("pixel_values",),
    ),
    input_builder="hooked_vlm.families.llava.preprocess:cli_input_builder",
    tiny_models=(
        TinyModel("tiny-llava", _T + "llava_config", "LlavaForConditionalGeneration"),
        TinyModel("tiny-llava-next", _T + "llava_next_config", "LlavaNextForConditionalGeneration"),
        TinyModel("tiny-llava-onevision", _T + "llava_onevision_config", "LlavaOnevisionForConditionalGeneration"),
        TinyModel("tiny-llava-next-video", _T + "llava_next_video_config", "LlavaNextVideoForConditionalGeneration"),
        TinyModel("tiny-llava-dinov2", _T + "llava_dinov2_config", "LlavaForConditionalGeneration"),
    ),
    hooks=LM_HOOKS + VISION_BLOCK_HOOKS + ("projector.hook_in", "projector.hook_out"),
)

#: The model module's names (``HookedLlava``, ...) on first use (imports torch).
__getattr__ = lazy_attributes(__name__, ("model", "layout", "preprocess"))
