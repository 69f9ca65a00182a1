"""Gemma 3 and MedGemma (``Gemma3ForConditionalGeneration``), reimplemented on the shared blocks.

Architecture:

* **Vision**: a SigLIP ViT (the shared :class:`~hooked_vlm.families.vit.HookedViT`) over a fixed
  ``image_size`` square (896 px, 14 px patches = 64 x 64 patches), ``post_layernorm`` on every patch.
* **Projector**: the patch grid is average-pooled to ``mm_tokens_per_image`` tokens (16 x 16 with a 4 x 4
  kernel), normalised by a Gemma RMSNorm (``mm_soft_emb_norm``, scale ``1 + w``) and multiplied by
  ``mm_input_projection_weight`` (``x @ W``, no bias).
* **Language model**: text embeddings are scaled by ``sqrt(d_model)`` (cast to the weight dtype); image
  features replace the image tokens *unscaled*. Each layer is
  ``x + post_attn_norm(attn(input_norm(x)))`` then ``x + post_ff_norm(mlp(pre_ff_norm(x)))`` with Gemma
  RMSNorms ``(1 + w)``, GeGLU (``gelu_pytorch_tanh``), grouped-query attention with QK-norm before RoPE and
  the softmax scale ``query_pre_attn_scalar ** -0.5``. Layers alternate between sliding-window (local RoPE
  theta, a window over the past) and full attention (global RoPE theta, optionally linearly scaled).
* **Attention mask**: causal plus padding, except that the tokens of one image (a run of
  ``token_type_ids == 1``) see each other bidirectionally, in full *and* sliding layers (the window bounds
  only the past, so an image token sees later tokens of its own image however far).

Differences from transformers' code that change no output: the bidirectional image blocks are a
:class:`~kernels.mask.MaskSpec` (``bidir_ids``) instead of a dense mask; average pooling runs on the
``[n, d, P, P]`` grid as transformers does; the vision tower is batch-first per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vlm.components.norms import RMSNorm
from hooked_vlm.config import HookedVLMConfig
from hooked_vlm.errors import InputError
from hooked_vlm.families.gemma3 import FAMILY
from hooked_vlm.families.decoder import convert_decoder_key, decoder_config
from hooked_vlm.families.vit import HookedViT, ViTSpec, convert_vit_state_dict
from hooked_vlm.layout import TokenLayout
from hooked_vlm.model import HookedVLM

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class Gemma3VisionSpec:
    """Image geometry of a Gemma 3 checkpoint: SigLIP patch grid and the pooled token grid."""

    image_size: int
    patch_size: int
    num_channels: int
    width: int
    eps: float
    tokens_per_image: int

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.patches_per_side**2

    @property
    def tokens_per_side(self) -> int:
        return math.isqrt(self.tokens_per_image)

    @property
    def pool_kernel(self) -> int:
        return self.patches_per_side // self.tokens_per_side

    @property
    def cell_pixels(self) -> int:
        """Side in pixels of the square one image token covers."""
        return self.pool_kernel * self.patch_size

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "Gemma3VisionSpec":
        v = d["vision_config"]
        spec = cls(
            image_size=v["image_size"],
            patch_size=v["patch_size"],
            num_channels=v.get("num_channels", 3),
            width=v["hidden_size"],
            eps=v.get("layer_norm_eps", 1e-6),
            tokens_per_image=d.get("mm_tokens_per_image", 256),
        )
        side = spec.tokens_per_side
        if side * side != spec.tokens_per_image or spec.patches_per_side % side:
            raise NotImplementedError(
                f"mm_tokens_per_image={spec.tokens_per_image} must be a square whose side divides the "
                f"{spec.patches_per_side}x{spec.patches_per_side} patch grid (image_size {spec.image_size} / patch "
                f"{spec.patch_size}); other geometries pool to a different token count in transformers"
            )
        return spec


class Gemma3Projector(nn.Module):
    """Average-pool the SigLIP patch grid to the token grid, RMSNorm ``(1 + w)``, then ``x @ W``.

    Hooks (per image, ``n`` = images in ``pixel_values``): ``hook_pooled [n, M, d_vision]`` (after the
    average pool, raster order of the token grid), ``mm_soft_emb_norm.hook_scale [n, M, 1]`` /
    ``hook_normalized [n, M, d_vision]``, ``hook_out [n, M, d_model]`` (the projected image features).
    """

    def __init__(self, spec: Gemma3VisionSpec, d_model: int):
        super().__init__()
        self.spec = spec
        self.hook_pooled = HookPoint()
        self.mm_soft_emb_norm = RMSNorm(spec.width, spec.eps, offset=1.0)
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(spec.width, d_model))
        self.hook_out = HookPoint()

    def forward(self, patches: Float[Tensor, "n patches d_vision"]) -> Float[Tensor, "n tokens d_model"]:
        side, k = self.spec.patches_per_side, self.spec.pool_kernel
        grid = rearrange(patches, "n (h w) d -> n d h w", h=side, w=side).contiguous()
        pooled = rearrange(F.avg_pool2d(grid, kernel_size=k, stride=k), "n d h w -> n (h w) d")
        pooled = self.hook_pooled(pooled)
        normed = self.mm_soft_emb_norm(pooled)
        return self.hook_out(torch.matmul(normed, self.mm_input_projection_weight).type_as(patches))


class Gemma3SiglipTower(HookedViT):
    """The shared SigLIP tower (hooks per image, ``[n_images, N, d_vision]``) plus ``hook_out``: the image
    features injected into the language model, batch-first per prompt ``[B, M, d_model]`` (that prompt's
    images in sequence order, zero-padded), as ``vision.hook_out`` in every family."""

    def __init__(self, spec: ViTSpec):
        super().__init__(spec)
        self.hook_out = HookPoint()


class HookedGemma3(HookedVLM):
    """Gemma 3 / MedGemma with hooks on the SigLIP tower, the projector and the decoder.

    Inputs are transformers' keyword tensors: ``input_ids``, ``attention_mask``, ``pixel_values``
    ``[n_images, 3, S, S]`` and ``token_type_ids`` (1 at image tokens; derived from the image token id
    when absent). ``bidirectional_images`` (default True) can be set False to make image tokens attend
    causally, as transformers does when called without ``token_type_ids``.
    """

    hf_architectures = ("Gemma3ForConditionalGeneration",)
    input_names = FAMILY.input_schema.names

    # ----- configuration ---------------------------------------------------------------------------------
    @classmethod
    def config_from_hf(cls, hf_config: Any) -> HookedVLMConfig:
        d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
        t = d["text_config"]
        # final_logit_softcapping / attn_logit_softcapping: Gemma3ForConditionalGeneration applies neither.
        Gemma3VisionSpec.from_hf_dict(d)  # validates the geometry early
        t = {**t, "hidden_activation": t.get("hidden_activation") or t.get("hidden_act") or "gelu_pytorch_tanh"}
        # Gemma3ForConditionalGeneration always ties lm_head to the embeddings
        return decoder_config(t, "gemma3", "Gemma3ForConditionalGeneration", d, tie_word_embeddings=True)

    @property
    def vision_spec(self) -> Gemma3VisionSpec:
        return self.projector.spec

    @property
    def token_ids(self) -> dict[str, int]:
        d = self.cfg.hf_config
        return {
            "image_token_id": d.get("image_token_index", d.get("image_token_id")),
            "boi_token_id": d.get("boi_token_index", d.get("boi_token_id")),
            "eoi_token_id": d.get("eoi_token_index", d.get("eoi_token_id")),
        }

    @property
    def sliding_window(self) -> int:
        return int(self.cfg.hf_config["text_config"].get("sliding_window") or 0)

    def _build_vision(self) -> nn.Module:
        d = self.cfg.hf_config
        self.vision = Gemma3SiglipTower(ViTSpec.from_hf_config(d["vision_config"], kind="siglip"))
        self.projector = Gemma3Projector(Gemma3VisionSpec.from_hf_dict(d), self.cfg.d_model)  # listed after the tower
        return self.vision

    def _extra_hooks(self) -> None:
        self.bidirectional_images = True
        self._warned_token_types = False

    # ----- weights -----------------------------------------------------------------------------------------
    @classmethod
    def convert_hf_state_dict(cls, hf_config: Any, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        """Accepts the transformers 5 in-memory layout (``model.language_model.*``, ``model.vision_tower.*``,
        ``model.multi_modal_projector.*``) and the on-disk layout of the released checkpoints
        (``language_model.model.*``, ``vision_tower.vision_model.*``, ``multi_modal_projector.*``)."""
        vision: dict[str, Tensor] = {}
        out: dict[str, Tensor] = {}
        for k, v in sd.items():
            k = k[len("model.") :] if k.startswith("model.") else k
            if k.startswith("vision_tower."):
                vision[k] = v
            elif k.startswith("multi_modal_projector."):
                rest = k[len("multi_modal_projector.") :]
                if rest == "mm_soft_emb_norm.weight":
                    out["projector.mm_soft_emb_norm.w"] = v
                elif rest == "mm_input_projection_weight":
                    out["projector.mm_input_projection_weight"] = v
                else:
                    raise KeyError(f"unexpected projector weight {k!r}")
            elif k.startswith("language_model."):
                rest = k[len("language_model.") :]
                if rest.startswith("model."):
                    rest = rest[len("model.") :]
                if rest == "lm_head.weight":
                    continue  # tied to the embeddings
                out.update(convert_decoder_key(rest, v, norm_names=GEMMA3_NORMS))
            elif k == "lm_head.weight":
                continue  # tied to the embeddings
            else:
                raise KeyError(f"unexpected Gemma3 weight {k!r}")
        for k, v in convert_vit_state_dict(vision, prefix="vision_tower.").items():
            out["vision." + k] = v
        out["unembed.weight"] = out["embed.weight"]
        return out

    # ----- the steps of the forward skeleton that differ (HookedVLM._prepare runs them) --------------------
    def _check_inputs(self, inputs: dict[str, Any], past: int) -> None:
        from hooked_vlm.families.gemma3.layout import check_common_inputs

        check_common_inputs(self, inputs, past)

    def _layout(self, inputs: dict[str, Any]) -> TokenLayout:
        """Token layout of the given inputs, validated (see :func:`build_gemma3_layout`)."""
        from hooked_vlm.families.gemma3.layout import build_gemma3_layout

        return build_gemma3_layout(self, inputs)

    def _bidirectional_ids(self, layout: TokenLayout | None) -> Tensor | None:
        """The tokens of one image see each other (``bidir_ids``, prefill only), in full and sliding layers alike;
        ``bidirectional_images = False`` makes them causal (transformers without ``token_type_ids``)."""
        if layout is None or not self.bidirectional_images:
            return None
        bidir = layout.meta["bidir_ids"]
        return bidir if bool((bidir >= 0).any()) else None

    def _embed_text(self, ids: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        """Token embeddings times ``sqrt(d_model)`` (the decoder description's ``embed_scale``)."""
        return self._embed_tokens(ids)

    def _position_ids(self, inputs: dict[str, Any], layout: TokenLayout | None, past: int) -> Int[Tensor, "batch pos"]:
        ids = inputs["input_ids"]
        pos = inputs.get("position_ids")
        if pos is not None:
            pos = pos.to(ids.device)
            if pos.dim() == 1:
                pos = pos[None]
            if pos.dim() != 2 or pos.shape[-1] != ids.shape[1]:
                raise InputError(f"position_ids must be [B, L] (or [L]) matching input_ids {tuple(ids.shape)}; got {tuple(pos.shape)}")
            return pos.expand(ids.shape[0], -1)
        b, length = ids.shape
        return (torch.arange(length, device=ids.device) + past)[None].expand(b, -1)

    # ----- vision --------------------------------------------------------------------------------------------
    def image_features(self, pixel_values: Float[Tensor, "n channels height width"]) -> Float[Tensor, "n tokens d_model"]:
        """SigLIP tower + projector, per image (transformers' ``get_image_features(...).pooler_output``)."""
        out = self.vision(pixel_values)
        return self.projector(out.last_hidden_state)

    def _vision_features(self, inputs: dict[str, Any], layout: TokenLayout) -> Float[Tensor, "batch m d_model"]:
        from hooked_vlm.families.gemma3.layout import vision_row_index

        feats = self.image_features(inputs["pixel_values"])  # n M d
        per = self.vision_spec.tokens_per_image
        image, slot = vision_row_index(layout, per)
        image, slot = image.to(feats.device), slot.to(feats.device)
        rows = feats[image.clamp(min=0), slot]
        return rows * (image >= 0)[..., None].to(rows.dtype)

    def image_grid(self, activation: Tensor, image: int) -> Tensor:
        """A per-image activation (vision tower ``[n, N, ...]`` or projector ``[n, M, ...]``) of image ``image``
        reshaped to its raster grid ``[side, side, ...]`` (patch grid or pooled token grid)."""
        a = activation[image]
        side = math.isqrt(a.shape[0])
        if side * side != a.shape[0]:
            raise ValueError(f"activation has {a.shape[0]} positions per image, not a square grid")
        return a.reshape(side, side, *a.shape[1:])


#: Gemma 3's per-layer norms: four around the sublayers plus QK-norm (the rest maps as in any decoder).
GEMMA3_NORMS: dict[str, str] = {
    "input_layernorm.weight": "ln1.w",
    "post_attention_layernorm.weight": "ln1_post.w",
    "pre_feedforward_layernorm.weight": "ln2.w",
    "post_feedforward_layernorm.weight": "ln2_post.w",
    "self_attn.q_norm.weight": "attn.q_norm.w",
    "self_attn.k_norm.weight": "attn.k_norm.w",
}


__all__ = ["HookedGemma3", "Gemma3Projector", "Gemma3SiglipTower", "Gemma3VisionSpec"]
