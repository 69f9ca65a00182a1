"""One description of the decoder language models (Llama, Mistral, Qwen2 / Qwen2-VL, Gemma 3): configuration,
blocks, RoPE, masks, weights.

:class:`DecoderSpec` is parsed once from the Hugging Face *text* config (a plain dict,
``config.text_config.to_dict()``) when a model is built (``HookedVLM.decoder``) and says everything that
distinguishes one decoder from another; :func:`build_decoder_block`, :func:`decoder_masks` and
:func:`rope_inverse_frequencies` read it, so nothing is re-parsed per forward.

* Llama: ``attention_bias`` on q/k/v/o, ``mlp_bias``; RoPE types default / linear / llama3 / yarn / longrope
  (inverse frequencies computed by transformers' own ``ROPE_INIT_FUNCTIONS``; ``dynamic`` is refused because
  its frequencies depend on the sequence length).
* Mistral: no biases; a ``sliding_window`` (when not null) applies to every layer: a query sees the last
  ``sliding_window`` keys including itself, as ``transformers.masking_utils.sliding_window_overlay``.
* Qwen2 (and the Qwen2-VL / Qwen2.5-VL text models): q/k/v biases, no o bias; sliding layers only where
  ``layer_types`` says so (the VLMs' M-RoPE tables are built by their family).
* Qwen3 (and the Qwen3-VL text model): ``attention_bias`` on q/k/v/o, QK-norm (RMSNorm over each head, no offset).
* Gemma (PaliGemma): RMSNorms ``(1 + w)``, embeddings times ``sqrt(d_model)``, GeGLU. Gemma 2 (PaliGemma 2) adds a
  norm after each sublayer, the softmax scale ``query_pre_attn_scalar ** -0.5``, alternating sliding / full layers
  and soft-capping of the attention scores (``attn_softcap``: :class:`~hooked_vlm.components.softcap.SoftcapAttention`)
  and of the final logits (``final_softcap``).
* Gemma 3: RMSNorms ``(1 + w)``, QK-norm, a norm after each sublayer, embeddings times ``sqrt(d_model)``, the
  softmax scale ``query_pre_attn_scalar ** -0.5``, GeGLU, alternating sliding / full layers with their own RoPE
  per layer type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_vlm.components.attention import Attention
from hooked_vlm.components.block import TransformerBlock
from hooked_vlm.components.mlp import GatedMLP
from hooked_vlm.components.norms import RMSNorm
from hooked_vlm.components.rotary import inverse_frequencies, rope_cos_sin
from hooked_vlm.config import HookedVLMConfig
from kernels.mask import MaskSpec

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class DecoderSpec:
    """What distinguishes one decoder from another (parsed once per model)."""

    model_type: str  # "llama" | "mistral" | "qwen2" | "qwen3" | "gemma" | "gemma2" | "gemma3_text"
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int  # 0 = none
    layer_types: tuple[str, ...]
    norm_offset: float = 0.0  # RMSNorm scale is (offset + w): Gemma 1.0
    qk_norm: bool = False  # RMSNorm on each head's q and k before rotary (Gemma 3)
    post_norms: bool = False  # a norm on each sublayer's output before the residual add (Gemma 3)
    embed_scale: float | None = None  # token embeddings times this (Gemma: sqrt(d_model)), cast to the weight dtype
    attn_scale: float | None = None  # softmax scale (None: d_head ** -0.5)
    rope_per_layer_type: bool = False  # each layer type has its own RoPE parameters (Gemma 3)
    attn_softcap: float | None = None  # attention scores soft-capped c * tanh(s / c) before the mask (Gemma 2)
    final_softcap: float | None = None  # final logits soft-capped (Gemma 2)

    @classmethod
    def from_text_config(cls, t: dict[str, Any]) -> "DecoderSpec":
        mt = t.get("model_type", "llama")
        n = t["num_hidden_layers"]
        if mt in ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text"):
            window = int(t.get("sliding_window") or 0) if t.get("use_sliding_window") else 0
            types = tuple(t.get("layer_types") or [FULL] * n) if window else (FULL,) * n
            return cls("qwen2", True, False, False, window, types)
        if mt in ("qwen3", "qwen3_vl_text"):
            window = int(t.get("sliding_window") or 0) if t.get("use_sliding_window") else 0
            types = tuple(t.get("layer_types") or [FULL] * n) if window else (FULL,) * n
            bias = bool(t.get("attention_bias", False))
            return cls("qwen3", bias, bias, False, window, types, qk_norm=True)
        if mt == "mistral":
            window = int(t.get("sliding_window") or 0)
            return cls(mt, False, False, False, window, ((SLIDING if window else FULL),) * n)
        if mt in ("llama", "vicuna"):
            bias = bool(t.get("attention_bias", False))
            return cls("llama", bias, bias, bool(t.get("mlp_bias", False)), 0, (FULL,) * n)
        if mt in ("gemma", "gemma2"):
            bias = bool(t.get("attention_bias", False))
            embed_scale = float(t["hidden_size"]) ** 0.5
            if mt == "gemma":
                return cls(mt, bias, bias, False, 0, (FULL,) * n, norm_offset=1.0, embed_scale=embed_scale)
            types = tuple(t.get("layer_types") or [SLIDING if (i + 1) % 2 else FULL for i in range(n)])
            d_head = t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]
            attn_cap, final_cap = t.get("attn_logit_softcapping"), t.get("final_logit_softcapping")
            return cls(
                mt, bias, bias, False, int(t.get("sliding_window") or 0), types, norm_offset=1.0, post_norms=True,
                embed_scale=embed_scale, attn_scale=float(t.get("query_pre_attn_scalar") or d_head) ** -0.5,
                attn_softcap=None if attn_cap is None else float(attn_cap),
                final_softcap=None if final_cap is None else float(final_cap),
            )
        if mt == "gemma3_text":
            if t.get("use_bidirectional_attention"):
                raise NotImplementedError("use_bidirectional_attention (EmbeddingGemma) is not supported: Gemma3 VLMs are causal")
            types = tuple(t.get("layer_types") or ())
            if not types:
                pattern = int(t.get("sliding_window_pattern") or t.get("_sliding_window_pattern") or 6)
                types = tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n))
            d_head = t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]
            bias = bool(t.get("attention_bias", False))
            return cls(
                mt, bias, bias, False, int(t.get("sliding_window") or 0), types, norm_offset=1.0, qk_norm=True,
                post_norms=True, embed_scale=float(t["hidden_size"]) ** 0.5,
                attn_scale=float(t.get("query_pre_attn_scalar") or d_head) ** -0.5, rope_per_layer_type=True,
            )
        raise NotImplementedError(
            f"text model_type {mt!r} is not a supported decoder (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text)"
        )


def decoder_config(
    t: dict[str, Any], family: str, architecture: str, hf_config: dict[str, Any], tie_word_embeddings: bool | None = None
) -> HookedVLMConfig:
    """A :class:`HookedVLMConfig` for the decoder described by the HF text config ``t``."""
    spec = DecoderSpec.from_text_config(t)
    n_heads = t["num_attention_heads"]
    d_head = t.get("head_dim") or t["hidden_size"] // n_heads
    tie = t.get("tie_word_embeddings", False) if tie_word_embeddings is None else tie_word_embeddings
    act = t.get("hidden_activation") or t.get("hidden_act") or "silu"
    return HookedVLMConfig(
        family=family,
        architecture=architecture,
        n_layers=t["num_hidden_layers"],
        d_model=t["hidden_size"],
        n_heads=n_heads,
        n_key_value_heads=t.get("num_key_value_heads") or n_heads,
        d_head=d_head,
        d_mlp=t["intermediate_size"],
        d_vocab=t["vocab_size"],
        act_fn=act,
        eps=t.get("rms_norm_eps", 1e-6),
        layer_types=list(spec.layer_types),
        hf_config=hf_config,
        tie_word_embeddings=bool(tie),
        model_name=hf_config.get("_name_or_path", "") or family,
        original_architecture=architecture,
    )


def build_decoder_block(cfg: HookedVLMConfig, spec: DecoderSpec, index: int) -> TransformerBlock:
    """One decoder layer: RMSNorm -> attention (GQA, RoPE; QK-norm) -> [post-norm] -> RMSNorm -> gated MLP -> [post-norm]."""
    kwargs = dict(
        qkv_bias=spec.qkv_bias, o_bias=spec.o_bias, scale=spec.attn_scale, qk_norm_eps=cfg.eps if spec.qk_norm else None,
        qk_norm_offset=spec.norm_offset, layer_index=index,
    )
    if spec.attn_softcap is not None:
        from hooked_vlm.components.softcap import SoftcapAttention

        attn: Attention = SoftcapAttention(cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, softcap=spec.attn_softcap, **kwargs)
    else:
        attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, **kwargs)
    mlp = GatedMLP(cfg.d_model, cfg.d_mlp, cfg.act_fn, bias=spec.mlp_bias)

    def norm() -> RMSNorm:
        return RMSNorm(cfg.d_model, cfg.eps, offset=spec.norm_offset)

    if spec.post_norms:
        return TransformerBlock(norm(), attn, norm(), mlp, ln1_post=norm(), ln2_post=norm())
    return TransformerBlock(norm(), attn, norm(), mlp)


def rope_parameters(t: dict[str, Any], layer_type: str | None = None) -> dict[str, Any]:
    """The text config's RoPE parameters (5.x ``rope_parameters`` or legacy ``rope_theta`` / ``rope_scaling``).

    ``layer_type``: the parameters of that layer type, where each has its own (Gemma 3).
    """
    params = dict(t.get("rope_parameters") or {})
    if layer_type is not None:
        rope = dict(params.get(layer_type) or {})
        if not rope:  # legacy Gemma 3: rope_theta (global) / rope_local_base_freq (sliding) / rope_scaling
            rope = dict(t.get("rope_scaling") or {}) if layer_type == FULL else {}
            rope["rope_theta"] = t.get("rope_local_base_freq", 1e4) if layer_type == SLIDING else t.get("rope_theta", 1e6)
    else:
        rope = params
        if not rope:
            rope = dict(t.get("rope_scaling") or {})
            rope.setdefault("rope_theta", t.get("rope_theta", 10000.0))
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", 10000.0)
    return rope


_DROP_KEYS = ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype")


def rope_inverse_frequencies(t: dict[str, Any], layer_type: str | None = None) -> tuple[Float[Tensor, "half"], float]:
    """(inverse frequencies, attention scaling) of the decoder's 1-D RoPE (of one layer type's, where each has its
    own), as transformers computes them."""
    rope = rope_parameters(t, layer_type)
    kind = rope["rope_type"]
    d_head = t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]
    if kind == "default":
        return inverse_frequencies(d_head, float(rope["rope_theta"])), 1.0
    if kind == "dynamic" or (layer_type is not None and kind == "longrope"):
        raise NotImplementedError(f"rope_type {kind!r} recomputes its frequencies per sequence length; not supported")
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if kind not in ROPE_INIT_FUNCTIONS:
        raise NotImplementedError(f"rope_type {kind!r} is not supported")
    keep = {k: v for k, v in t.items() if k not in _DROP_KEYS}
    extra = {} if layer_type is None else {"layer_type": layer_type}
    with torch.device("cpu"):  # real tensors even inside a meta-device construction context
        hf_cfg = AutoConfig.for_model(**keep)
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](hf_cfg, torch.device("cpu"), **extra)
    return inv_freq.float().cpu(), float(scaling)


def rope_tables(
    position_ids: Int[Tensor, "batch pos"], inv_freq: Tensor, attention_scaling: float = 1.0
) -> tuple[Float[Tensor, "batch pos d_head"], Float[Tensor, "batch pos d_head"]]:
    """Deprecated alias of :func:`hooked_vlm.components.rotary.rope_cos_sin` (kept for one release)."""
    import warnings

    warnings.warn("hooked_vlm.families.decoder.rope_tables is deprecated; use hooked_vlm.components.rotary.rope_cos_sin",
                  DeprecationWarning, stacklevel=2)
    return rope_cos_sin(position_ids, inv_freq, attention_scaling)


def decoder_masks(
    layer_types: list[str] | tuple[str, ...], attention_mask: Tensor | None, past: int, sliding_window: int,
    bidir_ids: Tensor | None = None,
) -> dict[str, MaskSpec]:
    """One causal :class:`MaskSpec` per layer type (padding keys hidden; ``past`` cached positions; a window on
    sliding layers); ``bidir_ids`` ``[B, L]``: positions with the same id >= 0 also see each other (Gemma 3 images)."""
    key_valid = None
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        key_valid = attention_mask.bool()
    masks = {FULL: MaskSpec(causal=True, key_valid=key_valid, bidir_ids=bidir_ids, q_offset=past)}
    if SLIDING in layer_types:
        masks[SLIDING] = MaskSpec(causal=True, window=sliding_window, key_valid=key_valid, bidir_ids=bidir_ids, q_offset=past)
    return {kind: masks[kind] for kind in dict.fromkeys(layer_types)}


def default_position_ids(input_ids: Tensor, past: int) -> Int[Tensor, "batch pos"]:
    """``past .. past+L-1`` for every row, as transformers' decoders use when no position_ids are given."""
    b, length = input_ids.shape
    return (torch.arange(length, device=input_ids.device) + past)[None].expand(b, -1)


#: Per-layer norm weights of a Llama / Mistral / Qwen2 layer and their hooked names.
LLAMA_NORMS: dict[str, str] = {
    "input_layernorm.weight": "ln1.w",
    "post_attention_layernorm.weight": "ln2.w",
}


def convert_decoder_key(k: str, v: Tensor, norm_names: Mapping[str, str] = LLAMA_NORMS) -> dict[str, Tensor]:
    """Map one decoder weight name (relative to the decoder: ``embed_tokens.*``, ``layers.{i}.*``, ``norm.*``).

    ``norm_names`` maps a layer's norm weights (relative to ``layers.{i}.``) to our names; families with
    other norms (Gemma 3's four norms and QK-norm) pass their own table.
    """
    if k == "embed_tokens.weight":
        return {"embed.weight": v}
    if k == "norm.weight":
        return {"ln_final.w": v}
    parts = k.split(".")
    if parts[0] != "layers":
        raise KeyError(f"unexpected language-model weight {k!r}")
    i, rest = parts[1], ".".join(parts[2:])
    if rest in norm_names:
        return {f"blocks.{i}.{norm_names[rest]}": v}
    if rest.startswith("self_attn."):
        return {f"blocks.{i}.attn.{rest[len('self_attn.'):]}": v}
    if rest.startswith("mlp."):
        return {f"blocks.{i}.{rest}": v}
    if "rotary_emb" in rest:
        return {}
    raise KeyError(f"unexpected language-model weight {k!r}")


__all__ = [
    "DecoderSpec",
    "decoder_config",
    "build_decoder_block",
    "rope_parameters",
    "rope_inverse_frequencies",
    "rope_tables",
    "decoder_masks",
    "default_position_ids",
    "convert_decoder_key",
    "LLAMA_NORMS",
    "FULL",
    "SLIDING",
]
