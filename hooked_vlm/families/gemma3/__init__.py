"""Gemma 3 / MedGemma: one folder, one registration.

``model.py`` the hooked model (SigLIP tower, pooling projector, Gemma 3 decoder), ``layout.py`` input checks, token
layout and bidirectional image blocks, ``preprocess.py`` prompts and images -> keyword tensors, ``tiny.py`` the tiny
config. Importing this package imports no torch; the old names (``HookedGemma3``, ...) resolve lazily.
"""

from __future__ import annotations

from hooked_vlm.families.registry import LM_HOOKS, VISION_BLOCK_HOOKS, Family, InputSchema, TinyModel, lazy_attributes

FAMILY = Family(
    name="gemma3",
    summary="Gemma 3 / MedGemma (SigLIP tower, average-pool projector, Gemma 3 decoder with QK-norm and sliding layers)",
    architectures=("Gemma3ForConditionalGeneration",),
    model_class="hooked_vlm.families.gemma3.model:HookedGemma3",
    config_families=("gemma3",),
    input_schema=InputSchema(
        per_sequence=("input_ids", "attention_mask", "token_type_ids"),
        pixels=("pixel_values",),
        pixel_kinds=(("image", "pixel_values"),),
    ),
    input_builder="hooked_vlm.families.gemma3.preprocess:cli_input_builder",
    model_types=(("gemma3", "Gemma3ForConditionalGeneration"),),
    tiny_models=(TinyModel("tiny-gemma3", "hooked_vlm.families.gemma3.tiny:gemma3_config", "Gemma3ForConditionalGeneration"),),
    hooks=LM_HOOKS + VISION_BLOCK_HOOKS + (
        "blocks.{i}.attn.q_norm.hook_normalized", "projector.hook_pooled", "projector.hook_out",
    ),
)

#: The model module's names (``HookedGemma3``, ...) on first use (imports torch).
__getattr__ = lazy_attributes(__name__, ("model", "layout", "preprocess"))
