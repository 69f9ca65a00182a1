"""The LLaVA family: LLaVA-1.5 (and LLaVA-Med), LLaVA-NeXT, LLaVA-OneVision and LLaVA-NeXT-Video.

Architecture (transformers 5.23 ``Llava*ForConditionalGeneration``):

1. A CLIP or SigLIP vision tower (:class:`hooked_vlm.families.vit.HookedViT`; or :class:`Dinov2Tower` for a
   DINOv2 vision config, LLaVA-Rad's geometry) runs on one row per crop or video frame. ``vision_feature_layer`` picks a hidden state (or a list of them, concatenated along the
   width); ``vision_feature_select_strategy="default"`` drops the first token (CLIP's ``[CLS]``), ``"full"``
   keeps every token. Selected features are read *after* the hooks at that residual site, so editing a vision
   block's output changes the logits.
2. A two-layer GELU MLP projector maps each feature to the language model's width.
3. Packing (NeXT / OneVision / NeXT-Video images): the base crop's tokens, then the high-resolution crops stitched
   into one grid, unpadded back to the image's aspect ratio (OneVision: bilinearly shrunk when larger than
   ``anyres_max_N`` crops), with a learned ``image_newline`` token after each grid row. Videos: NeXT-Video pools
   each frame's features 2x2 *before* the projector, no newline; OneVision pools bilinearly to
   ``ceil(side/2)`` per side *after* the projector and appends one newline after the last frame.
4. The packed features replace the image / video placeholder tokens; a Llama, Mistral or Qwen2 decoder with 1-D
   RoPE (positions ``0..L-1``, as transformers uses without ``position_ids``) produces the logits.

Hook points (all batch-first; see ``docs/llava.md``):

* ``vision.*``: the tower's hooks over ``[R, N, d_vision]``, R = tower rows (every image's crops, base crop first,
  then every video's frames; :meth:`LlavaLayout.tower_rows` / :meth:`LlavaLayout.vision_rows`), N = patches (+1
  ``[CLS]`` for CLIP and DINOv2);
* ``projector.hook_in`` ``[R, N', k*d_vision]`` (the selected feature layer(s) after the strategy),
  ``projector.mlp.hook_pre`` / ``hook_post`` ``[R, N', d]``, ``projector.hook_out`` ``[R, N', d]``;
* ``video_pool.hook_in`` / ``hook_out`` (NeXT-Video: ``[F, N, d_vision]`` -> ``[F, N/4, d_vision]`` before the
  projector; OneVision: ``[F, N, d]`` -> ``[F, ceil(side/2)^2, d]`` after it);
* ``vision.hook_out`` ``[B, M, d]``: exactly the vectors written into the language model's placeholder positions,
  one row per prompt, in sequence order (base crop, grid rows each followed by its newline; video frames then the
  trailing newline), zero-padded to the longest prompt;
* the language model's usual hooks (``hook_embed``, ``blocks.{i}.*``, ``ln_final.*``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vlm.components.attention import Attention
from hooked_vlm.components.block import TransformerBlock
from hooked_vlm.components.mlp import MLP
from hooked_vlm.components.norms import LayerNorm
from hooked_vlm.config import HookedVLMConfig
from hooked_vlm.errors import CheckpointError, InputError, UnsupportedModelError
from hooked_vlm.families.llava import FAMILY
from hooked_vlm.families.decoder import (
    DecoderSpec,
    convert_decoder_key,
    decoder_config,
    default_position_ids,
)
from hooked_vlm.families.llava.layout import (
    LlavaGeometry,
    LlavaItem,
    LlavaLayout,
    build_llava_layout,
    check_common_inputs,
    geometry_from_config,
)
from hooked_vlm.families.vit import (
    FULL_VISIBILITY,
    HookedViT,
    ViTOutput,
    convert_vit_state_dict,
    normalize_layer,
    select_image_features,
)
from hooked_vlm.model import HookedVLM

ARCHITECTURES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "llava_next_video": "LlavaNextVideoForConditionalGeneration",
}
#: Architectures of the original (haotian-liu / microsoft) LLaVA code base, read by ``from_pretrained``.
ORIGINAL_ARCHITECTURES = ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM")
ORIGINAL_IMAGE_TOKEN = -200


class LlavaProjector(nn.Module):
    """``linear_2(gelu(linear_1(x)))`` with hooks: ``hook_in`` (selected tower features), ``mlp.*``, ``hook_out``."""

    def __init__(self, d_in: int, d_model: int, act: str, bias: bool):
        super().__init__()
        self.hook_in = HookPoint()
        self.mlp = MLP(d_in, d_model, act, bias=bias, d_out=d_model)
        self.hook_out = HookPoint()

    def forward(self, x: Float[Tensor, "rows n d_in"]) -> Float[Tensor, "rows n d_model"]:
        return self.hook_out(self.mlp(self.hook_in(x)))


class VideoPool(nn.Module):
    """Per-frame spatial pooling of video features, with ``hook_in`` / ``hook_out`` ``[F, N, d]``.

    ``mode``: ``"average"`` / ``"max"`` / ``"conv"`` (NeXT-Video's ``vision_resampler``, stride ``stride``, before
    the projector) or ``"bilinear"`` (OneVision, to ``ceil(side/2)`` per side, after the projector).
    """

    def __init__(self, mode: str, stride: int, width: int, out_width: int | None = None):
        super().__init__()
        self.mode, self.stride = mode, stride
        if mode == "conv":
            self.conv = nn.Conv2d(width, out_width or width, kernel_size=stride, stride=stride)
        elif mode not in ("average", "max", "bilinear"):
            raise UnsupportedModelError(f"spatial_pool_mode {mode!r} is not one of average, max, conv")
        self.hook_in = HookPoint()
        self.hook_out = HookPoint()

    def forward(self, x: Float[Tensor, "frames n d"], side: int) -> Float[Tensor, "frames m d"]:
        x = self.hook_in(x)
        f, n, d = x.shape
        if n != side * side:
            raise InputError(f"video pooling needs {side}x{side} tokens per frame, got {n} (a CLS token kept by 'full'?)")
        grid = x.reshape(f, side, side, d).permute(0, 3, 1, 2)
        if self.mode == "average":
            out = F.avg_pool2d(grid, self.stride, self.stride)
        elif self.mode == "max":
            out = F.max_pool2d(grid, self.stride, self.stride)
        elif self.mode == "conv":
            out = self.conv(grid)
        else:
            out = F.interpolate(grid, size=[-(-side // 2), -(-side // 2)], mode="bilinear")
        return self.hook_out(out.flatten(2).transpose(1, 2))


@dataclass(frozen=True)
class TowerShape:
    """The tower facts the LLaVA code reads (:class:`ViTSpec` has the same fields) for towers outside ``vit.py``."""

    kind: str
    width: int
    depth: int
    n_heads: int
    image_size: int
    patch_size: int
    has_cls: bool = True

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_positions(self) -> int:
        return self.grid**2 + int(self.has_cls)


class LayerScale(nn.Module):
    """DINOv2's per-channel residual-branch scale ``x * lambda1`` (used as the block's post-sublayer module)."""

    def __init__(self, d: int):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(d))

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return x * self.lambda1


class Dinov2Tower(nn.Module):
    """A DINOv2 vision tower for LLaVA (LLaVA-Rad's geometry), as transformers' ``Dinov2Model``.

    transformers' ``Dinov2Embeddings`` (CLS, position interpolation) are reused as is; each layer is the shared
    :class:`TransformerBlock` (pre-LN ``LayerNorm`` -> non-causal :class:`Attention` -> :class:`LayerScale` as the
    post-attention module; ``LayerNorm`` -> GELU :class:`MLP` -> :class:`LayerScale`), so every block carries the
    usual hooks (``vision.blocks.{j}.attn.hook_pattern`` ...). Same call contract as :class:`HookedViT`
    (``feature_layers``, ``truncate`` -> :class:`ViTOutput`; hidden state 0 = embeddings, i = output of block
    i - 1, last = raw last block without the final ``layernorm``). Hooks: ``hook_embed``, ``blocks.{j}.*``.
    """

    def __init__(self, vision_config: dict[str, Any]):
        super().__init__()
        from transformers import AutoConfig
        from transformers.models.dinov2.modeling_dinov2 import Dinov2Embeddings

        cfg = AutoConfig.for_model(**{k: v for k, v in vision_config.items() if k not in ("transformers_version", "architectures")})
        if cfg.use_swiglu_ffn:
            raise UnsupportedModelError("DINOv2 towers with a SwiGLU MLP (use_swiglu_ffn) are not supported")
        d, h = cfg.hidden_size, cfg.num_attention_heads
        self.spec = TowerShape("dinov2", d, cfg.num_hidden_layers, h, cfg.image_size, cfg.patch_size)
        self.embeddings = Dinov2Embeddings(cfg)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(
            [
                TransformerBlock(
                    LayerNorm(d, cfg.layer_norm_eps),
                    Attention(d, h, h, d // h, qkv_bias=cfg.qkv_bias, o_bias=True, layer_index=j),
                    LayerNorm(d, cfg.layer_norm_eps),
                    MLP(d, int(d * cfg.mlp_ratio), cfg.hidden_act, bias=True),
                    ln1_post=LayerScale(d),
                    ln2_post=LayerScale(d),
                )
                for j in range(cfg.num_hidden_layers)
            ]
        )
        self.ln_post = LayerNorm(d, cfg.layer_norm_eps)

    @property
    def depth(self) -> int:
        return self.spec.depth

    def forward(self, pixel_values: Float[Tensor, "rows 3 h w"], feature_layers: int | list[int] | None = None,
                truncate: bool = False) -> ViTOutput:
        layers = [] if feature_layers is None else ([feature_layers] if isinstance(feature_layers, int) else list(feature_layers))
        wanted = {normalize_layer(int(i), self.depth) for i in layers}
        last = max(wanted) if (truncate and wanted) else self.depth
        dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        x = self.hook_embed(self.embeddings(pixel_values.to(dtype)))
        states = {0: x}
        for j in range(last):
            x = self.blocks[j](x, None, None, FULL_VISIBILITY)
            states[j + 1] = x
        return ViTOutput(self.ln_post(x) if last == self.depth else None, None, {i: states[i] for i in sorted(wanted)})


class HookedLlava(HookedVLM):
    """LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision / LLaVA-NeXT-Video with hooks on both towers and the projector.

    Inputs are transformers' keyword tensors: ``input_ids``, ``attention_mask``, ``pixel_values`` (1.5:
    ``[n_images, 3, S, S]``; any-resolution: ``[n_images, max_crops, 3, S, S]``), ``image_sizes`` (original
    ``(height, width)`` per image; derived from the placeholder runs when omitted and unambiguous),
    ``pixel_values_videos`` ``[n_videos, frames, 3, S, S]``, OneVision's ``batch_num_images``, and per-call
    ``vision_feature_layer`` / ``vision_feature_select_strategy`` overrides.
    """

    hf_architectures = tuple(ARCHITECTURES.values()) + ORIGINAL_ARCHITECTURES
    input_names = FAMILY.input_schema.names
    #: Run every vision block as transformers does (False: stop after the deepest feature layer; the skipped
    #: blocks cannot change the output, but their hooks then do not fire).
    vision_run_all_blocks: bool = True

    # ----- configuration ---------------------------------------------------------------------------------
    @classmethod
    def config_from_hf(cls, hf_config: Any) -> HookedVLMConfig:
        d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
        mt = d.get("model_type")
        if mt not in ARCHITECTURES:
            raise UnsupportedModelError(f"model_type {mt!r} is not a LLaVA variant ({sorted(ARCHITECTURES)})")
        vmt = str(d["vision_config"].get("model_type", ""))
        if vmt not in ("clip_vision_model", "siglip_vision_model", "dinov2"):
            raise UnsupportedModelError(
                f"LLaVA with a {vmt!r} vision tower is not supported (CLIP, SigLIP and DINOv2 towers are); see docs/llava.md"
            )
        t = d["text_config"]
        tie = bool(d.get("tie_word_embeddings") or t.get("tie_word_embeddings"))
        return decoder_config(t, family=mt, architecture=ARCHITECTURES[mt], hf_config=d, tie_word_embeddings=tie)

    @property
    def decoder_spec(self) -> DecoderSpec:
        """The language model's description (parsed once at build: ``self.decoder``)."""
        return self.decoder

    @property
    def variant(self) -> str:
        return self.cfg.family

    @property
    def image_token_id(self) -> int:
        d = self.cfg.hf_config
        return d.get("image_token_id", d.get("image_token_index"))

    @property
    def video_token_id(self) -> int | None:
        d = self.cfg.hf_config
        return d.get("video_token_id", d.get("video_token_index"))

    @property
    def vision_feature_layer(self) -> int | list[int]:
        return self.cfg.hf_config["vision_feature_layer"]

    def geometry(self, strategy: str | None = None) -> LlavaGeometry:
        """Token-count facts of this model (optionally under another select strategy)."""
        return geometry_from_config(self.cfg.hf_config, strategy)

    def _build_vision(self) -> nn.Module:
        vc = self.cfg.hf_config["vision_config"]
        tower = Dinov2Tower(vc) if vc.get("model_type") == "dinov2" else HookedViT.from_hf_config(vc)
        tower.hook_out = HookPoint()  # [B, M, d_model]: the features written into the LM's placeholder positions
        return tower

    def _extra_hooks(self) -> None:
        d = self.cfg.hf_config
        layers = d["vision_feature_layer"]
        k = 1 if isinstance(layers, int) else len(layers)
        self.projector = LlavaProjector(
            self.vision.spec.width * k, self.cfg.d_model, d.get("projector_hidden_act", "gelu"), bool(d.get("multimodal_projector_bias", True))
        )
        if self.variant != "llava":
            self.image_newline = nn.Parameter(torch.zeros(self.cfg.d_model))
        if self.variant == "llava_next_video":
            mode = d.get("spatial_pool_mode", "average")
            self.video_pool = VideoPool(mode, int(d.get("spatial_pool_stride", 2)), self.vision.spec.width, d.get("spatial_pool_out_channels"))
        elif self.variant == "llava_onevision":
            self.video_pool = VideoPool("bilinear", 2, self.cfg.d_model)

    # ----- weights -----------------------------------------------------------------------------------------
    @classmethod
    def convert_hf_state_dict(cls, hf_config: Any, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        """Accepts transformers' in-memory layout (``model.vision_tower.*``, ``model.multi_modal_projector.*``,
        ``model.language_model.*``, ``lm_head.weight``), its on-disk layout (``vision_tower.vision_model.*``,
        ``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.weight``) and the original
        LLaVA layout (``model.mm_projector.{0,2}``, ``model.vision_tower.vision_tower.vision_model.*``,
        ``model.layers.*``)."""
        d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
        if any(k.startswith("model.vision_tower.vision_tower.") for k in sd):
            vprefix = "model.vision_tower.vision_tower."
        elif any(k.startswith("model.vision_tower.") for k in sd):
            vprefix = "model.vision_tower."
        else:
            vprefix = "vision_tower."
        dinov2 = d["vision_config"].get("model_type") == "dinov2"
        if dinov2:
            out = {f"vision.{k}": v for k, v in _convert_dinov2(sd, vprefix).items()}
        else:
            out = {f"vision.{k}": v for k, v in convert_vit_state_dict(sd, prefix=vprefix).items()}
        proj = {"linear_1": "fc1", "linear_2": "fc2", "0": "fc1", "2": "fc2"}
        for key, v in sd.items():
            k = key
            if k.startswith(vprefix):
                continue
            for p in ("model.multi_modal_projector.", "multi_modal_projector.", "model.mm_projector."):
                if k.startswith(p):
                    layer, param = k[len(p) :].split(".", 1)
                    if layer not in proj:
                        raise KeyError(f"unexpected projector weight {key!r} (only the 2-layer MLP projector is supported)")
                    out[f"projector.mlp.{proj[layer]}.{param}"] = v
                    break
            else:
                if k in ("model.image_newline", "image_newline"):
                    out["image_newline"] = v
                elif k in ("lm_head.weight", "language_model.lm_head.weight"):
                    out["unembed.weight"] = v
                elif k.startswith(("model.vision_resampler.", "vision_resampler.")):
                    out["video_pool.conv." + k.split("pool.", 1)[1]] = v
                else:
                    for p in ("model.language_model.", "language_model.model.", "model."):
                        if k.startswith(p):
                            out.update(convert_decoder_key(k[len(p) :], v))
                            break
                    else:
                        raise KeyError(f"unexpected LLaVA weight {key!r}")
        spec_w = d["vision_config"]["hidden_size"]
        if not dinov2:  # post_layernorm is never read by LLaVA; checkpoints that dropped it still load.
            out.setdefault("vision.ln_post.w", torch.ones(spec_w))
            out.setdefault("vision.ln_post.b", torch.zeros(spec_w))
        if "unembed.weight" not in out and "embed.weight" in out:
            out["unembed.weight"] = out["embed.weight"]
        return out

    @classmethod
    def hf_config_from_checkpoint(cls, raw: dict[str, Any], state_dict: dict[str, Tensor]) -> Any:
        """The transformers config of a checkpoint folder's ``config.json`` (original LLaVA layouts converted)."""
        archs = raw.get("architectures") or []
        if archs and archs[0] in ORIGINAL_ARCHITECTURES:
            return original_llava_config(raw, state_dict)
        from transformers import AutoConfig

        return AutoConfig.for_model(**raw)

    # ----- the steps of the forward skeleton that differ (HookedVLM._prepare runs them) --------------------
    def _layout(self, inputs: dict[str, Any]) -> LlavaLayout:
        """Token layout of the given inputs (validated): image / video tokens, crops, newlines, frames, grid cells."""
        return build_llava_layout(self, inputs)

    def layout(self, **inputs: Any) -> LlavaLayout:
        """Token layout of the given inputs (validated): image / video tokens, crops, newlines, frames, grid cells."""
        return self._layout(dict(inputs))

    def _check_inputs(self, inputs: dict[str, Any], past: int) -> None:
        check_common_inputs(self, inputs, past)
        self._check_options(inputs)

    def _position_ids(self, inputs: dict[str, Any], layout: LlavaLayout | None, past: int) -> Int[Tensor, "batch pos"]:
        ids = inputs["input_ids"]
        pos = inputs.get("position_ids")
        if pos is None:
            return default_position_ids(ids, past)
        if pos.dim() != 2:
            raise InputError(f"position_ids must be [batch, seq] for LLaVA (1-D RoPE); got {tuple(pos.shape)}")
        return pos.to(ids.device)

    def _check_options(self, inputs: dict[str, Any]) -> None:
        layers = inputs.get("vision_feature_layer")
        if layers is not None:
            k_now = 1 if isinstance(layers, int) else len(layers)
            k_cfg = 1 if isinstance(self.vision_feature_layer, int) else len(self.vision_feature_layer)
            if k_now != k_cfg:
                raise InputError(
                    f"vision_feature_layer={layers!r} selects {k_now} layer(s) but the projector was trained on {k_cfg} "
                    f"({self.vision_feature_layer!r}); pass the same number of layers"
                )
            for i in [layers] if isinstance(layers, int) else layers:
                try:
                    normalize_layer(int(i), self.vision.depth)
                except IndexError as e:
                    raise InputError(f"vision_feature_layer: {e}") from None
        var = inputs.get("vision_aspect_ratio")
        if var is not None and var != self.cfg.hf_config.get("vision_aspect_ratio"):
            raise InputError(
                f"vision_aspect_ratio={var!r} differs from the config's {self.cfg.hf_config.get('vision_aspect_ratio')!r}; "
                "transformers 5.23 ignores this forward argument (it always uses the config), so hooked_vlm refuses it: "
                "set model.cfg.hf_config['vision_aspect_ratio'] instead"
            )

    # ----- vision ------------------------------------------------------------------------------------------
    def _tower_rows(self, inputs: dict[str, Any], layout: LlavaLayout) -> tuple[Tensor, int]:
        pv, pvv = inputs.get("pixel_values"), inputs.get("pixel_values_videos")
        parts = []
        n_img_rows = 0
        for it in layout.images():
            # 4-D: crops of all images concatenated in image order (LLaVA-1.5: one per image), so rows line up
            crops = pv[it.row_offset : it.row_offset + it.n_rows] if pv.dim() == 4 else pv[it.index, : it.n_rows]
            parts.append(crops)
            n_img_rows += crops.shape[0]
        for it in layout.videos():
            parts.append(pvv[it.index])
        return torch.cat(parts, dim=0), n_img_rows

    def _vision_features(self, inputs: dict[str, Any], layout: LlavaLayout) -> Float[Tensor, "batch m d_model"]:
        geom = layout.geometry
        layers = inputs.get("vision_feature_layer")
        layers = self.vision_feature_layer if layers is None else layers
        rows, n_img = self._tower_rows(inputs, layout)
        out = self.vision(rows, feature_layers=layers, truncate=not self.vision_run_all_blocks)
        sel = select_image_features(out, layers, geom.strategy, self.vision.depth)
        side = geom.side
        per_item: dict[int, Tensor] = {}
        images, videos = layout.images(), layout.videos()
        if videos and self.variant == "llava_next_video":
            img_proj = self.projector(sel[:n_img]) if images else None
            vid_proj = self.projector(self.video_pool(sel[n_img:], side))
        else:
            proj = self.projector(sel)
            img_proj, vid_proj = proj[:n_img], proj[n_img:]
            if videos:
                vid_proj = self.video_pool(vid_proj, side)
        for it in images:
            per_item[id(it)] = self._pack_image(img_proj[it.row_offset : it.row_offset + it.n_rows], it, geom)
        off = 0
        for it in videos:
            f = vid_proj[off : off + it.n_rows].reshape(-1, vid_proj.shape[-1])
            off += it.n_rows
            if geom.video_pool == "bilinear_after":
                f = torch.cat([f, self.image_newline[None].to(f.dtype)], dim=0)
            per_item[id(it)] = f
        b = layout.batch_size
        rows_out: list[list[Tensor]] = [[] for _ in range(b)]
        for it in sorted(layout.items, key=lambda x: (x.batch, x.start)):
            rows_out[it.batch].append(per_item[id(it)])
        width = max([sum(t.shape[0] for t in r) for r in rows_out] + [1])
        ref = next(iter(per_item.values()))
        feats = ref.new_zeros(b, width, ref.shape[-1])
        for bi, r in enumerate(rows_out):
            if r:
                cat = torch.cat(r, dim=0)
                feats[bi, : cat.shape[0]] = cat
        return feats  # HookedVLM._vision_output fires vision.hook_out

    def _pack_image(self, f: Float[Tensor, "crops n d"], it: LlavaItem, geom: LlavaGeometry) -> Float[Tensor, "tokens d"]:
        """Base crop (+ the unpadded any-res grid with a newline per row, or one newline)."""
        if not geom.newline:
            return f[0]
        newline = self.image_newline.to(f.dtype)
        if it.crop_grid == (0, 0):
            return torch.cat([f[0], newline[None]], dim=0)
        side, (nh, nw) = geom.side, it.crop_grid
        d = f.shape[-1]
        grid = f[1 : 1 + nh * nw].reshape(nh, nw, side, side, d).permute(0, 2, 1, 3, 4).reshape(nh * side, nw * side, d)
        top, left, rows, cols = it.unpad
        grid = grid[top : top + rows, left : left + cols]
        if tuple(it.grid_size) != (rows, cols):
            g = F.interpolate(grid.permute(2, 0, 1)[None], size=list(it.grid_size), mode="bilinear")
            grid = g[0].permute(1, 2, 0)
        gr = grid.shape[0]
        grid = torch.cat([grid, newline[None, None].expand(gr, 1, d)], dim=1).reshape(-1, d)
        return torch.cat([f[0], grid], dim=0)

    # ----- original checkpoints ------------------------------------------------------------------------------
    @classmethod
    def from_original_checkpoint(cls, path: str, vision_tower: str | None = None, dtype: torch.dtype | None = None,
                                 device: Any = None) -> "HookedLlava":
        """Load an original-layout LLaVA folder (``LlavaLlamaForCausalLM`` / ``LlavaMistralForCausalLM``).

        ``vision_tower``: a CLIP checkpoint folder (``CLIPVisionModel`` or ``CLIPModel`` layout) for checkpoints that
        do not ship their tower's weights (most LLaVA-1.5 releases load ``openai/clip-vit-large-patch14-336``
        separately).
        """
        import json
        from pathlib import Path

        from hooked_vlm.loading import build, read_weights

        p = Path(path)
        raw = json.loads((p / "config.json").read_text())
        sd = read_weights(p)
        if vision_tower is not None:
            vt = Path(vision_tower)
            vsd = read_weights(vt)
            vraw = json.loads((vt / "config.json").read_text())
            vcfg = vraw.get("vision_config", vraw)
            for k, v in vsd.items():
                if k.startswith("vision_model."):  # CLIPModel / 4.x CLIPVisionModel files
                    sd["model.vision_tower.vision_tower." + k] = v
                elif k.startswith(("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")):  # 5.x CLIPVisionModel
                    sd["model.vision_tower.vision_tower.vision_model." + k] = v
            raw = dict(raw, _vision_config=vcfg)
        hf_config = original_llava_config(raw, sd)
        return build(ARCHITECTURES[hf_config.model_type], hf_config, sd, dtype, device)  # type: ignore[return-value]


_DINOV2_LAYER = {  # transformers Dinov2Layer (5.x names and the on-disk 4.x attention names) -> TransformerBlock
    "norm1.weight": "ln1.w", "norm1.bias": "ln1.b", "norm2.weight": "ln2.w", "norm2.bias": "ln2.b",
    "layer_scale1.lambda1": "ln1_post.lambda1", "layer_scale2.lambda1": "ln2_post.lambda1",
    "attention.q_proj.": "attn.q_proj.", "attention.k_proj.": "attn.k_proj.", "attention.v_proj.": "attn.v_proj.",
    "attention.o_proj.": "attn.o_proj.", "attention.attention.query.": "attn.q_proj.",
    "attention.attention.key.": "attn.k_proj.", "attention.attention.value.": "attn.v_proj.",
    "attention.output.dense.": "attn.o_proj.", "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2.",
}


def _convert_dinov2(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """transformers ``Dinov2Model`` weights under ``prefix`` -> :class:`Dinov2Tower` names."""
    out = {}
    for key, v in sd.items():
        if not key.startswith(prefix):
            continue
        k = key[len(prefix) :]
        if k.startswith("encoder.layer."):
            j, rest = k[len("encoder.layer.") :].split(".", 1)
            match = next((hf for hf in _DINOV2_LAYER if rest == hf or (hf.endswith(".") and rest.startswith(hf))), None)
            if match is None:
                raise KeyError(f"unexpected DINOv2 vision weight {key!r}")
            out[f"blocks.{j}.{_DINOV2_LAYER[match]}{rest[len(match):]}"] = v
        elif k.startswith("embeddings."):
            out[k] = v
        elif k.startswith("layernorm."):
            out["ln_post." + {"weight": "w", "bias": "b"}[k.split(".")[1]]] = v
        else:
            raise KeyError(f"unexpected DINOv2 vision weight {key!r}")
    return out


def _clip_heads(name: str, width: int) -> int:
    """Attention heads of a CLIP tower that ships no config: OpenAI ViT-L 16, ViT-B 12, else width / 64."""
    if "large" in name:
        return 16
    if "base" in name:
        return 12
    return max(1, width // 64)


def original_llava_config(raw: dict[str, Any], sd: dict[str, Tensor]) -> Any:
    """A transformers ``LlavaConfig`` / ``LlavaNextConfig`` for an original LLaVA ``config.json``.

    The text config is the top-level Llama / Mistral fields; the CLIP tower's shape is read from its weights
    (``model.vision_tower.vision_tower.vision_model.*``; heads from ``mm_vision_tower``: ViT-L 16, ViT-B 12, else
    width / 64), or from a ``vision_config`` dict in ``config.json`` / the tower folder given to
    :meth:`HookedLlava.from_original_checkpoint`. The image placeholder is the
    original ``-200``, repeated once per feature (:func:`hooked_vlm.families.llava.preprocess.expand_placeholders`).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig, MistralConfig

    arch = (raw.get("architectures") or ["LlavaLlamaForCausalLM"])[0]
    text_cls = MistralConfig if arch == "LlavaMistralForCausalLM" else LlamaConfig
    skip = {"architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype", "_vision_config"}
    text_fields = {k: v for k, v in raw.items() if k not in skip and not k.startswith(("mm_", "image_", "tune_", "freeze_", "unfreeze_", "use_mm", "tokenizer_"))}
    known = set(text_cls().to_dict())
    text = text_cls(**{k: v for k, v in text_fields.items() if k in known})
    projector = raw.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise UnsupportedModelError(f"mm_projector_type {projector!r} is not supported (only 'mlp2x_gelu', as LLaVA-1.5 / NeXT / Med)")
    hint = dict(raw.get("_vision_config") or raw.get("vision_config") or {})
    pre = "model.vision_tower.vision_tower.vision_model."
    if pre + "embeddings.class_embedding" not in sd:
        raise CheckpointError(
            f"this original LLaVA checkpoint has no vision-tower weights ({raw.get('mm_vision_tower')!r} is loaded "
            "separately by the original code); use HookedLlava.from_original_checkpoint(path, vision_tower=<CLIP folder>)"
        )
    width = sd[pre + "embeddings.class_embedding"].shape[0]
    patch = sd[pre + "embeddings.patch_embedding.weight"].shape[-1]
    n_pos = sd[pre + "embeddings.position_embedding.weight"].shape[0]
    depth = len({k[len(pre) :].split(".")[2] for k in sd if k.startswith(pre + "encoder.layers.")})
    vraw = dict(
        hidden_size=width, intermediate_size=sd[pre + "encoder.layers.0.mlp.fc1.weight"].shape[0], num_hidden_layers=depth,
        num_attention_heads=_clip_heads(str(raw.get("mm_vision_tower", "")), width), patch_size=patch,
        image_size=int(round((n_pos - 1) ** 0.5)) * patch, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )
    vraw.update(hint)  # a tower config (or a partial hint such as num_attention_heads) wins over inference
    vkeys = set(CLIPVisionConfig().to_dict())
    vision = CLIPVisionConfig(**{k: v for k, v in vraw.items() if k in vkeys and k not in ("model_type", "transformers_version", "architectures")})
    select = {"patch": "default", "cls_patch": "full"}[raw.get("mm_vision_select_feature", "patch")]
    common = dict(
        vision_config=vision, text_config=text, image_token_index=ORIGINAL_IMAGE_TOKEN,
        vision_feature_layer=raw.get("mm_vision_select_layer", -2), vision_feature_select_strategy=select,
        projector_hidden_act="gelu", tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )
    if "anyres" in str(raw.get("image_aspect_ratio", "")) and raw.get("mm_patch_merge_type", "").startswith("spatial_unpad"):
        return LlavaNextConfig(image_grid_pinpoints=raw["image_grid_pinpoints"], **common)
    return LlavaConfig(**common)


__all__ = ["HookedLlava", "LlavaProjector", "VideoPool", "Dinov2Tower", "LayerScale", "TowerShape", "original_llava_config", "ARCHITECTURES", "ORIGINAL_ARCHITECTURES"]
