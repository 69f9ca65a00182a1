"""PaliGemma and PaliGemma 2 (``PaliGemmaForConditionalGeneration``), reimplemented on the shared blocks.

Architecture:

* **Vision**: a SigLIP ViT (the shared :class:`~hooked_vlm.families.vit.HookedViT`) over a fixed
  ``image_size`` square (224 / 448 / 896 px, 14 px patches), ``post_layernorm`` on every patch. Every patch is
  one image token (256 / 1024 / 4096 per image): no pooling.
* **Projector**: one ``Linear`` (with bias) from the SigLIP width to the language model's width.
* **Language model**: Gemma (PaliGemma) or Gemma 2 (PaliGemma 2). Text embeddings are scaled by
  ``sqrt(d_model)`` (cast to the weight dtype); image features replace the image tokens *unscaled*.
  Gemma: ``x + attn(norm(x))``, ``x + mlp(norm(x))``; Gemma 2 adds a norm after each sublayer (four norms),
  the softmax scale ``query_pre_attn_scalar ** -0.5``, attention-logit soft-capping
  ``c * tanh(s / c)`` before the mask, alternating sliding-window / full layers and final-logit soft-capping.
  RMSNorms scale by ``1 + w``; the MLP is GeGLU (``gelu_pytorch_tanh``).
* **Prefix-LM mask**: the positions with ``token_type_ids == 0`` (image tokens, ``<bos>``, the prompt and its
  ``\\n``) form one bidirectional block; the answer (``token_type_ids == 1``) is causal. This is a
  :class:`~kernels.mask.MaskSpec` with ``bidir_ids`` (0 on the prefix, -1 elsewhere), so the SDPA fast path and
  the attention-statistics kernels use it unchanged. Without ``token_type_ids`` the model is causal everywhere,
  as transformers.
* **Positions** start at 1 (``arange(L) + 1``; ``generate`` counts only attended positions, then adds 1).

Differences from transformers' code that change no output: the prefix block is a ``MaskSpec`` instead of a
dense mask; the vision tower is batch-first per image.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vlm.components.softcap import SoftcapUnembed
from hooked_vlm.config import HookedVLMConfig
from hooked_vlm.errors import InputError
from hooked_vlm.families.decoder import SLIDING, convert_decoder_key, decoder_config
from hooked_vlm.families.gemma3.model import Gemma3SiglipTower
from hooked_vlm.families.vit import ViTSpec, convert_vit_state_dict
from hooked_vlm.families.paligemma import FAMILY
from hooked_vlm.layout import TokenLayout
from hooked_vlm.model import HookedVLM
from kernels.mask import MaskSpec

#: Gemma's two per-layer norms and Gemma 2's four (the rest maps as in any decoder).
GEMMA_NORMS: dict[str, str] = {"input_layernorm.weight": "ln1.w", "post_attention_layernorm.weight": "ln2.w"}
GEMMA2_NORMS: dict[str, str] = {
    "input_layernorm.weight": "ln1.w",
    "post_attention_layernorm.weight": "ln1_post.w",
    "pre_feedforward_layernorm.weight": "ln2.w",
    "post_feedforward_layernorm.weight": "ln2_post.w",
}


class PaliGemmaProjector(nn.Module):
    """``Linear(d_vision -> d_model)`` per patch; ``hook_out [n_images, N, d_model]`` (the projected features)."""

    def __init__(self, d_vision: int, d_model: int):
        super().__init__()
        self.linear = nn.Linear(d_vision, d_model, bias=True)
        self.hook_out = HookPoint()

    def forward(self, patches: Float[Tensor, "n patches d_vision"]) -> Float[Tensor, "n patches d_model"]:
        return self.hook_out(self.linear(patches))


class HookedPaliGemma(HookedVLM):
    """PaliGemma / PaliGemma 2 with hooks on the SigLIP tower, the projector and the Gemma / Gemma 2 decoder.

    Inputs are transformers' keyword tensors: ``input_ids``, ``attention_mask``, ``pixel_values``
    ``[n_images, 3, S, S]`` and ``token_type_ids`` (0 on the prefix: image, ``<bos>``, prompt; 1 on the answer).
    """

    hf_architectures = ("PaliGemmaForConditionalGeneration",)
    input_names = FAMILY.input_schema.names

    # ----- configuration ---------------------------------------------------------------------------------
    @classmethod
    def config_from_hf(cls, hf_config: Any) -> HookedVLMConfig:
        d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
        t = d["text_config"]
        model_type = t.get("model_type", "gemma")
        if model_type not in ("gemma", "gemma2"):
            raise NotImplementedError(f"PaliGemma text model_type {model_type!r} is not supported (gemma, gemma2)")
        t = {**t, "hidden_activation": t.get("hidden_activation") or t.get("hidden_act") or "gelu_pytorch_tanh"}
        return decoder_config(t, "paligemma", "PaliGemmaForConditionalGeneration", d,
                              tie_word_embeddings=bool(d.get("tie_word_embeddings", True)))

    @property
    def text_config(self) -> dict[str, Any]:
        return self.cfg.hf_config["text_config"]

    @property
    def is_gemma2(self) -> bool:
        return self.text_config.get("model_type") == "gemma2"

    @property
    def vision_spec(self) -> ViTSpec:
        return self.vision.spec

    @property
    def tokens_per_image(self) -> int:
        return self.vision_spec.grid**2

    @property
    def token_ids(self) -> dict[str, int]:
        d = self.cfg.hf_config
        return {"image_token_id": d.get("image_token_index", d.get("image_token_id")), "bos_token_id": self.text_config.get("bos_token_id", 2)}

    @property
    def sliding_window(self) -> int:
        return self.decoder.sliding_window

    def _build_vision(self) -> nn.Module:
        d = self.cfg.hf_config
        spec = ViTSpec.from_hf_config(d["vision_config"], kind="siglip")
        self.vision = Gemma3SiglipTower(spec)
        self.projector = PaliGemmaProjector(spec.width, self.cfg.d_model)  # listed after the tower
        return self.vision

    def _extra_hooks(self) -> None:
        cap = self.decoder.final_softcap
        if cap is not None:  # Gemma 2: logits = c * tanh(W_U x / c); unembed.hook_pre_softcap holds W_U x
            self.unembed = SoftcapUnembed(self.cfg.d_model, self.cfg.d_vocab, float(cap))
            if self.cfg.tie_word_embeddings:
                self.unembed.weight = self.embed.weight
        self._warned_token_types = False

    # ----- weights -----------------------------------------------------------------------------------------
    @classmethod
    def convert_hf_state_dict(cls, hf_config: Any, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        """Accepts the transformers 5 in-memory layout (``model.language_model.*``, ``model.vision_tower.*``,
        ``model.multi_modal_projector.*``) and the on-disk layout of the released checkpoints
        (``language_model.model.*``, ``vision_tower.vision_model.*``, ``multi_modal_projector.*``)."""
        d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
        norms = GEMMA2_NORMS if d["text_config"].get("model_type") == "gemma2" else GEMMA_NORMS
        vision: dict[str, Tensor] = {}
        out: dict[str, Tensor] = {}
        lm_head = None
        for k, v in sd.items():
            k = k[len("model.") :] if k.startswith("model.") else k
            if k.startswith("vision_tower."):
                vision[k] = v
            elif k.startswith("multi_modal_projector.linear."):
                out["projector.linear." + k.rsplit(".", 1)[1]] = v
            elif k.startswith("language_model."):
                rest = k[len("language_model.") :]
                rest = rest[len("model.") :] if rest.startswith("model.") else rest
                if rest == "lm_head.weight":
                    lm_head = v
                    continue
                out.update(convert_decoder_key(rest, v, norm_names=norms))
            elif k == "lm_head.weight":
                lm_head = v
            else:
                raise KeyError(f"unexpected PaliGemma weight {k!r}")
        for k, v in convert_vit_state_dict(vision, prefix="vision_tower.").items():
            out["vision." + k] = v
        tied = bool(d.get("tie_word_embeddings", True))
        out["unembed.weight"] = out["embed.weight"] if tied or lm_head is None else lm_head
        return out

    # ----- the steps of the forward skeleton that differ (HookedVLM._prepare runs them) --------------------
    def _check_inputs(self, inputs: dict[str, Any], past: int) -> None:
        from hooked_vlm.families.paligemma.layout import check_common_inputs

        check_common_inputs(self, inputs, past)

    def _layout(self, inputs: dict[str, Any]) -> TokenLayout:
        """Token layout of the given inputs, validated (see :func:`~hooked_vlm.families.paligemma.layout.build_paligemma_layout`)."""
        from hooked_vlm.families.paligemma.layout import build_paligemma_layout

        return build_paligemma_layout(self, inputs)

    def _attention_masks(self, inputs: dict[str, Any], layout: TokenLayout | None, past: int) -> dict[str, MaskSpec]:
        """Causal + padding; at prefill the prefix (``token_type_ids == 0``) is one bidirectional block (``bidir_ids``),
        in full and sliding layers; sliding layers bound the past by ``sliding_window``."""
        am = inputs.get("attention_mask")
        bidir = None
        if layout is not None:
            bidir = layout.meta["bidir_ids"]
            self._warn_without_token_types(inputs, layout)
        key_valid = am.bool() if am is not None and not bool(am.bool().all()) else None
        masks = {}
        for kind in set(self.cfg.layer_types):
            window = self.sliding_window if kind == SLIDING else 0
            if window and bidir is not None:
                _check_prefix_fits_window(bidir if am is None else bidir.masked_fill(am == 0, -1), window)
            masks[kind] = MaskSpec(causal=True, window=window, key_valid=key_valid, bidir_ids=bidir, q_offset=past)
        return masks

    def _warn_without_token_types(self, inputs: dict[str, Any], layout: TokenLayout) -> None:
        if inputs.get("token_type_ids") is None and layout.items and not self._warned_token_types:
            warnings.warn(
                "token_type_ids was not given, so every position attends causally (as transformers' PaliGemma without "
                "token_type_ids). PaliGemmaProcessor / build_paligemma_inputs return it: 0 on the image + prompt prefix, "
                "which then attends to itself bidirectionally (the prefix-LM mask PaliGemma was trained with).",
                stacklevel=5,
            )
            self._warned_token_types = True

    def _position_ids(self, inputs: dict[str, Any], layout: TokenLayout | None, past: int) -> Int[Tensor, "batch pos"]:
        """``position_ids`` if given, else ``past + 1 .. past + L`` (PaliGemma counts from 1)."""
        ids = inputs["input_ids"]
        pos = inputs.get("position_ids")
        if pos is not None:
            pos = pos.to(ids.device)
            pos = pos[None] if pos.dim() == 1 else pos
            if pos.dim() != 2 or pos.shape[-1] != ids.shape[1]:
                raise InputError(f"position_ids must be [B, L] (or [L]) matching input_ids {tuple(ids.shape)}; got {tuple(pos.shape)}")
            return pos.expand(ids.shape[0], -1)
        b, length = ids.shape
        return (torch.arange(length, device=ids.device) + past + 1)[None].expand(b, -1)

    def _generation_positions(self, input_ids: Tensor, attention_mask: Tensor, inputs: dict[str, Any]) -> Tensor:
        """As transformers' ``prepare_inputs_for_generation``: attended positions counted from 0, then + 1."""
        return super()._generation_positions(input_ids, attention_mask, inputs) + 1

    # ----- vision --------------------------------------------------------------------------------------------
    def image_features(self, pixel_values: Float[Tensor, "n channels height width"]) -> Float[Tensor, "n tokens d_model"]:
        """SigLIP tower + projector, per image (transformers' ``get_image_features(...).pooler_output``)."""
        return self.projector(self.vision(pixel_values).last_hidden_state)

    def _vision_features(self, inputs: dict[str, Any], layout: TokenLayout) -> Float[Tensor, "batch m d_model"]:
        """Per prompt, its images' projected patches in sequence order (zero-padded); ``vision.hook_out`` is fired
        by the skeleton."""
        from hooked_vlm.families.gemma3.layout import vision_row_index

        feats = self.image_features(inputs["pixel_values"])  # n N d
        image, slot = vision_row_index(layout, self.tokens_per_image)
        image, slot = image.to(feats.device), slot.to(feats.device)
        rows = feats[image.clamp(min=0), slot]
        return rows * (image >= 0)[..., None].to(rows.dtype)


def _check_prefix_fits_window(bidir: Tensor, window: int) -> None:
    """Gemma 2's sliding layers let the prefix block see itself whatever the distance (``(causal AND window) OR
    block`` in transformers), which a MaskSpec window (it bounds every past key) expresses only while no prefix
    is longer than the window."""
    in_block = bidir >= 0
    if not bool(in_block.any()):
        return
    pos = torch.arange(bidir.shape[1], device=bidir.device)
    first = torch.where(in_block, pos, bidir.shape[1]).amin(-1)
    last = torch.where(in_block, pos, -1).amax(-1)
    span = int((last - first + 1).max())
    if span > window:
        raise NotImplementedError(
            f"the image + prompt prefix spans {span} positions, more than Gemma 2's sliding window ({window}); "
            "transformers then lets prefix tokens see each other beyond the window, which hooked_vlm's MaskSpec cannot "
            "express yet. Use a shorter prompt or a checkpoint whose prefix fits the window (PaliGemma 2 at 224 / 448 px)"
        )


__all__ = ["HookedPaliGemma", "PaliGemmaProjector", "GEMMA_NORMS", "GEMMA2_NORMS"]


