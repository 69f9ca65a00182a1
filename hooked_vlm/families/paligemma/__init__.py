"""PaliGemma / PaliGemma 2: one folder, one registration.

``model.py`` the hooked model (SigLIP tower, linear projector, Gemma / Gemma 2 decoder with the prefix-LM mask),
``softcap.py`` Gemma 2's logit soft-capping, ``layout.py`` input checks, token layout and the prefix block,
``preprocess.py`` prompts and images -> keyword tensors, ``tiny.py`` the tiny configs. Importing this package
imports no torch; ``HookedPaliGemma`` & co resolve lazily.
"""

from __future__ import annotations

from hooked_vlm.families.registry import LM_HOOKS, VISION_BLOCK_HOOKS, Family, InputSchema, TinyModel, lazy_attributes

_ARCH = "PaliGemmaForConditionalGeneration"

FAMILY = Family(
    name="paligemma",
    summary="PaliGemma / PaliGemma 2 (SigLIP tower, linear projector, Gemma / Gemma 2 decoder with the prefix-LM mask)",
    architectures=(_ARCH,),
    model_class="hooked_vlm.families.paligemma.model:HookedPaliGemma",
    config_families=("paligemma",),
    input_schema=InputSchema(
        per_sequence=("input_ids", "attention_mask", "token_type_ids"),
        pixels=("pixel_values",),
        pixel_kinds=(("image", "pixel_values"),),
    ),
    input_builder="hooked_vlm.families.paligemma.preprocess:cli_input_builder",
    model_types=(("paligemma", _ARCH),),
    tiny_models=(
        TinyModel("tiny-paligemma", "hooked_vlm.families.paligemma.tiny:paligemma_config", _ARCH),
        TinyModel("tiny-paligemma2", "hooked_vlm.families.paligemma.tiny:paligemma2_config", _ARCH),
    ),
    hooks=LM_HOOKS + VISION_BLOCK_HOOKS + (
        "vision.hook_patch_embed", "vision.hook_last_hidden", "projector.hook_out", "blocks.{i}.mlp.hook_pre_linear",
    ),
)

#: The model module's names (``HookedPaliGemma``, ...) on first use (imports torch).
__getattr__ = lazy_attributes(__name__, ("model", "layout", "preprocess", "softcap"))
