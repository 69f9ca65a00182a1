"""Tiny random-weight models for tests, examples and the CLI: real transformers classes, CPU-sized.

Vocabulary convention (see ``hooked_vlm.tiny_tokenizer``): 0 bos, 1 eos, 2 pad, 3..95 words,
98/99 Gemma image begin/end, 100 image placeholder, 101 video placeholder, 102/103 vision start/end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # torch is imported where weights are made, so listing the names stays cheap
    import torch

TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
SPECIAL_IDS = dict(image_token_id=100, video_token_id=101, vision_start_token_id=102, vision_end_token_id=103)


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


def _qwen2_vl(config) -> Any:
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration(config)


def _qwen2_5_vl(config) -> Any:
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration(config)


#: name -> (config factory, HF model factory); other families register theirs with ``register_tiny``.
TINY_MODELS: dict[str, tuple[Callable[..., Any], Callable[[Any], Any]]] = {
    "tiny-qwen2-vl": (qwen2_vl_config, _qwen2_vl),
    "tiny-qwen2.5-vl": (qwen2_5_vl_config, _qwen2_5_vl),
}


def register_tiny(name: str, config_factory: Callable[..., Any], model_factory: Callable[[Any], Any]) -> None:
    TINY_MODELS[name] = (config_factory, model_factory)


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Fill every parameter from N(0, std) (norm weights around 1) so no path is trivially zero."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if ("norm" in name or "ln_" in name) and p.dim() == 1 and not name.endswith("bias"):
                p.copy_(1.0 + noise if float(p.detach().abs().mean()) > 0.5 else noise)
            else:
                p.copy_(noise * (4 if p.dim() == 1 else 1))
    return model


def tiny_hf_model(name: str = "tiny-qwen2-vl", seed: int = 0, attn_implementation: str = "eager", **config_overrides: Any):
    """A random-weight transformers model of the named tiny family, in eval mode, fp32."""
    if name not in TINY_MODELS:
        raise KeyError(f"unknown tiny model {name!r}; available: {sorted(TINY_MODELS)}")
    import torch

    config_factory, model_factory = TINY_MODELS[name]
    cfg = config_factory(**config_overrides)
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = model_factory(cfg)
    randomize_(model, seed)
    return model.eval()


def tiny_model(name: str = "tiny-qwen2-vl", seed: int = 0, **config_overrides: Any):
    """The hooked twin of :func:`tiny_hf_model` (same weights)."""
    from hooked_vlm.loading import from_hf

    return from_hf(tiny_hf_model(name, seed, **config_overrides))


# ----- Gemma 3 / MedGemma (hooked_vlm.families.gemma3) ---------------------------------------------------
def gemma3_config(
    mm_tokens_per_image: int = 4,
    image_size: int = 56,
    sliding_window: int = 8,
    layer_types: list[str] | None = None,
    vision_layers: int = 2,
    rope_parameters: dict[str, Any] | None = None,
    **text_overrides: Any,
):
    """Tiny Gemma3: SigLIP 56 px / 14 px patches (4x4) pooled to ``mm_tokens_per_image`` tokens; layer 0
    sliding, layer 1 full. ``layer_types`` is always set (the default, every 6th layer full, would make
    every layer of a 2-layer model sliding)."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    n_layers = text_overrides.pop("num_hidden_layers", TEXT["num_hidden_layers"])
    if layer_types is None:
        layer_types = ["full_attention" if i % 2 else "sliding_attention" for i in range(n_layers)]
    text = Gemma3TextConfig(
        **dict(TEXT, num_hidden_layers=n_layers), head_dim=16, query_pre_attn_scalar=16, sliding_window=sliding_window,
        layer_types=layer_types, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        rope_parameters=rope_parameters or {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                            "full_attention": {"rope_type": "default", "rope_theta": 1e6}},
        **text_overrides,
    )
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=2,
                                image_size=image_size, patch_size=14, vision_use_head=False)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=mm_tokens_per_image,
                        boi_token_index=98, eoi_token_index=99, image_token_index=100)


def _gemma3(config) -> Any:
    from transformers import Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration(config)


register_tiny("tiny-gemma3", gemma3_config, _gemma3)


# ----- LLaVA family (tiny configs of docs/notes §2) ---------------------------------------------------------------
LLAVA_TEXT = dict(TEXT, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def _clip_vision(image_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=image_size, patch_size=14, hidden_act="quick_gelu")


def llava_config(text: str = "llama", text_overrides: dict | None = None, **overrides: Any):
    """LLaVA-1.5 (``text="mistral"``: LLaVA-Med v1.5): CLIP 56 px (4x4 patches), 16 image tokens."""
    from transformers import LlamaConfig, LlavaConfig, MistralConfig

    text_cfg = (MistralConfig if text == "mistral" else LlamaConfig)(**dict(LLAVA_TEXT, **(text_overrides or {})))
    kw = dict(image_token_index=100, vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    kw.update(overrides)
    return LlavaConfig(vision_config=_clip_vision(56), text_config=text_cfg, **kw)


def llava_next_config(**overrides: Any):
    """LLaVA-NeXT: CLIP 28 px crops (2x2 patches), Mistral text, pinpoints 28x56 / 56x28 / 56x56."""
    from transformers import LlavaNextConfig, MistralConfig

    kw = dict(image_token_index=100, image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]], vision_feature_layer=-2, vision_feature_select_strategy="default")
    kw.update(overrides)
    return LlavaNextConfig(vision_config=_clip_vision(28), text_config=MistralConfig(**LLAVA_TEXT), **kw)


def llava_onevision_config(**overrides: Any):
    """LLaVA-OneVision: SigLIP 28 px crops (no CLS, no head), Qwen2 text, anyres_max_9, video pooling + newline."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vis = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14, vision_use_head=False)
    kw = dict(image_token_index=100, video_token_index=101, image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]],
              vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    kw.update(overrides)
    return LlavaOnevisionConfig(vision_config=vis, text_config=Qwen2Config(**LLAVA_TEXT), **kw)


def llava_next_video_config(**overrides: Any):
    """LLaVA-NeXT-Video: CLIP 56 px, Llama text, 2x2 average pooling before the projector (4 tokens per frame)."""
    from transformers import LlamaConfig, LlavaNextVideoConfig

    kw = dict(image_token_index=100, video_token_index=101, spatial_pool_mode="average", spatial_pool_stride=2,
              image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]], vision_feature_layer=-2, vision_feature_select_strategy="default")
    kw.update(overrides)
    return LlavaNextVideoConfig(vision_config=_clip_vision(56), text_config=LlamaConfig(**LLAVA_TEXT), **kw)


def _hf_class(name: str) -> Callable[[Any], Any]:
    def make(config) -> Any:
        import transformers

        return getattr(transformers, name)(config)

    return make


register_tiny("tiny-llava", llava_config, _hf_class("LlavaForConditionalGeneration"))
register_tiny("tiny-llava-next", llava_next_config, _hf_class("LlavaNextForConditionalGeneration"))
register_tiny("tiny-llava-onevision", llava_onevision_config, _hf_class("LlavaOnevisionForConditionalGeneration"))
register_tiny("tiny-llava-next-video", llava_next_video_config, _hf_class("LlavaNextVideoForConditionalGeneration"))


# ----- CLIP / SigLIP two-tower models (hooked_vlm.families.clip) -----------------------------------------------
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


def _clip(config) -> Any:
    from transformers import CLIPModel

    return CLIPModel(config)


def _siglip(config) -> Any:
    from transformers import SiglipModel

    return SiglipModel(config)


register_tiny("tiny-clip", clip_config, _clip)
register_tiny("tiny-siglip", siglip_config, _siglip)


def llava_dinov2_config(**overrides: Any):
    """LLaVA-1.5 with a DINOv2 tower (LLaVA-Rad's geometry, 56 px instead of 518): transformers' LlavaConfig + Dinov2Config."""
    from transformers import Dinov2Config, LlamaConfig, LlavaConfig

    vis = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=56, patch_size=14)
    kw = dict(image_token_index=100, vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    kw.update(overrides)
    return LlavaConfig(vision_config=vis, text_config=LlamaConfig(**LLAVA_TEXT), **kw)


register_tiny("tiny-llava-dinov2", llava_dinov2_config, _hf_class("LlavaForConditionalGeneration"))


# ----- PaliGemma / PaliGemma 2 (hooked_vlm.families.paligemma) ---------------------------------------------------
def paligemma_config(text: str = "gemma", image_size: int = 56, vision_layers: int = 2, image_token_index: int = 100,
                     **text_overrides: Any):
    """Tiny PaliGemma: SigLIP 56 px / 14 px patches = 16 image tokens, Gemma text (``text="gemma2"``: PaliGemma 2,
    Gemma 2 text with four norms, query_pre_attn_scalar 24 != head_dim, attention / final soft-capping 50 / 30,
    layer 0 sliding (window 40: longer than a two-image prefix, shorter than a long answer) and layer 1 full). Image token 100, bos 0."""
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


register_tiny("tiny-paligemma", paligemma_config, _hf_class("PaliGemmaForConditionalGeneration"))
register_tiny("tiny-paligemma2", paligemma2_config, _hf_class("PaliGemmaForConditionalGeneration"))
