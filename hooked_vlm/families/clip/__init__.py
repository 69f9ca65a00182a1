"""CLIP and SigLIP two-tower models: one folder, one registration.

``model.py`` the hooked two-tower model (shared ViT, text tower, contrastive head), ``preprocess.py`` images ->
``pixel_values`` with the family's PIL processor, ``tiny.py`` the tiny configs. No token layout: the towers do not
share a sequence. Importing this package imports no torch.
"""

from __future__ import annotations

from hooked_vlm.families.registry import Family, InputSchema, TinyModel, lazy_attributes

FAMILY = Family(
    name="clip",
    summary="CLIP / SigLIP two-tower models (ViT image tower, text tower, contrastive similarity)",
    architectures=(
        "CLIPModel", "CLIPVisionModel", "CLIPTextModel", "CLIPVisionModelWithProjection",
        "CLIPTextModelWithProjection", "SiglipModel", "SiglipVisionModel", "SiglipTextModel",
    ),
    model_class="hooked_vlm.families.clip.model:HookedCLIP",
    config_families=("clip", "siglip"),
    input_schema=InputSchema(pixels=("pixel_values",), pixel_kinds=(("image", "pixel_values"),)),
    input_builder=None,  # hooked-vlm inspect runs two-tower models through hooked_vlm.cli_two_tower
    tiny_models=(
        TinyModel("tiny-clip", "hooked_vlm.families.clip.tiny:clip_config", "CLIPModel"),
        TinyModel("tiny-siglip", "hooked_vlm.families.clip.tiny:siglip_config", "SiglipModel"),
    ),
    hooks=(
        "vision.blocks.{j}.hook_resid_pre", "vision.blocks.{j}.hook_resid_post", "vision.blocks.{j}.attn.hook_pattern",
        "text.blocks.{i}.hook_resid_post", "text.blocks.{i}.attn.hook_pattern",
    ),
    generative=False,
)

#: The model module's names (``HookedCLIP``, ...) on first use (imports torch).
__getattr__ = lazy_attributes(__name__, ("model", "preprocess"))
