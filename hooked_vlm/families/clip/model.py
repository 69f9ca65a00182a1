"""Hooked CLIP and SigLIP: two-tower image-text models (and their single-tower variants).

Architecture, as in transformers' ``CLIPModel`` and ``SiglipModel``:

* Vision tower: :class:`hooked_vlm.families.vit.HookedViT` (CLIP: ``[CLS]``, pre-LN, pooled
  ``post_layernorm([CLS])``; SigLIP: no ``[CLS]``, pooled by the MAP head).
* Text tower (:class:`HookedTextTower`): token + learned position embeddings, pre-LN blocks,
  ``final_layer_norm``. CLIP is causal (plus the padding mask) and pools the first ``eos_token_id`` token
  (the legacy rule ``argmax(input_ids)`` when ``eos_token_id == 2``); SigLIP is bidirectional (plus the
  padding mask), pools the **last** token (pad to ``max_length``, as its processor does) and applies a
  ``head`` Linear.
* Heads: CLIP projects both pooled outputs with bias-free Linears; SigLIP's pooled outputs are the embeddings.
  Similarities: ``logits_per_text = exp(logit_scale) * cos(text, image)`` (SigLIP ``+ logit_bias``),
  ``logits_per_image = logits_per_text.T``.

The model is a TransformerLens ``HookedRootModule`` (``run_with_cache``, ``run_with_hooks``, ``hooks``) whose
forward returns transformers' own output classes (``CLIPOutput``, ``SiglipOutput``, ...), so comparing with
transformers is one line. Hooks of both towers live under ``vision.`` and ``text.``; the projected
embeddings under ``hook_image_embeds`` / ``hook_text_embeds`` (before L2 normalisation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vlm.components.attention import Attention
from hooked_vlm.components.block import TransformerBlock
from hooked_vlm.components.mlp import MLP
from hooked_vlm.components.norms import LayerNorm
from hooked_vlm.errors import InputError
from hooked_vlm.hook_management import CheckedHooksMixin
from hooked_vlm.families.vit import (
    HookedViT,
    ViTSpec,
    _config_dict,
    _convert_vit_key,
    convert_vit_state_dict,
    encoder_shape,
    normalize_layer,
    run_blocks,
)
from kernels.mask import MaskSpec


# ----- specifications ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextSpec:
    """The shape of a CLIP or SigLIP text tower, read from its transformers text config."""

    kind: str  # "clip" | "siglip"
    vocab_size: int
    width: int
    depth: int
    n_heads: int
    d_mlp: int
    act: str
    eps: float
    max_positions: int
    eos_token_id: int | None
    head_dim_out: int | None = None  # SigLIP ``projection_size`` (its ``head`` Linear)

    @classmethod
    def from_hf_config(cls, config: Any, kind: str | None = None) -> "TextSpec":
        d = _config_dict(config)
        if kind is None:
            mt = str(d.get("model_type", ""))
            kind = "siglip" if "siglip" in mt else "clip" if "clip" in mt else None
            if kind is None:
                raise ValueError(f"cannot tell CLIP from SigLIP for text config model_type {mt!r}; pass kind=")
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0]
        return cls(
            kind=kind,
            vocab_size=d["vocab_size"],
            **encoder_shape(d),
            max_positions=d["max_position_embeddings"],
            eos_token_id=eos,
            head_dim_out=(d.get("projection_size") or d["hidden_size"]) if kind == "siglip" else None,
        )

    @property
    def causal(self) -> bool:
        return self.kind == "clip"


#: transformers class name -> (family, has vision tower, has text tower, has projections, has logit scale)
ARCHITECTURES: dict[str, tuple[str, bool, bool, bool, bool]] = {
    "CLIPModel": ("clip", True, True, True, True),
    "CLIPVisionModel": ("clip", True, False, False, False),
    "CLIPTextModel": ("clip", False, True, False, False),
    "CLIPVisionModelWithProjection": ("clip", True, False, True, False),
    "CLIPTextModelWithProjection": ("clip", False, True, True, False),
    "SiglipModel": ("siglip", True, True, False, True),
    "SiglipVisionModel": ("siglip", True, False, False, False),
    "SiglipTextModel": ("siglip", False, True, False, False),
}


@dataclass
class TwoTowerConfig:
    """What :class:`HookedCLIP` is built from: the towers' specs, the projection width and the HF config."""

    architecture: str
    family: str
    vision: ViTSpec | None
    text: TextSpec | None
    projection_dim: int | None
    logit_scale: bool
    hf_config: dict[str, Any] = field(repr=False, default_factory=dict)
    tie_word_embeddings: bool = False
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    model_name: str = ""

    @property
    def logit_bias(self) -> bool:
        return self.logit_scale and self.family == "siglip"


# ----- text tower -----------------------------------------------------------------------------------------------
class HookedTextTower(nn.Module):
    """A CLIP (causal) or SigLIP (bidirectional) text transformer with a hook on every site.

    Hook names (relative; ``text.`` in :class:`HookedCLIP`), B texts, L tokens:

    ``hook_token_embed`` / ``hook_pos_embed`` [B, L, d]; ``hook_embed`` [B, L, d] (what enters block 0, =
    transformers ``hidden_states[0]``); ``blocks.{j}.*`` (shared block hooks); ``ln_final.hook_scale`` /
    ``hook_normalized``; ``hook_last_hidden`` [B, L, d] (after ``final_layer_norm``, transformers
    ``last_hidden_state``); ``hook_pooled`` [B, d'] (transformers ``pooler_output``: CLIP the pooled token,
    SigLIP ``head`` of the last token).

    Padded positions never influence real ones (their keys are masked), but their own values can differ from
    transformers' (a fully masked query row gives 0 here, a uniform average there); they are never pooled.
    """

    def __init__(self, spec: TextSpec):
        super().__init__()
        self.spec = spec
        w = spec.width
        self.token_embed = nn.Embedding(spec.vocab_size, w)
        self.pos_embed = nn.Embedding(spec.max_positions, w)
        self.hook_token_embed = HookPoint()
        self.hook_pos_embed = HookPoint()
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList([self._block(j) for j in range(spec.depth)])
        self.ln_final = LayerNorm(w, spec.eps)
        self.hook_last_hidden = HookPoint()
        self.head = nn.Linear(w, spec.head_dim_out) if spec.kind == "siglip" else None
        self.hook_pooled = HookPoint()

    def _block(self, index: int) -> TransformerBlock:
        s = self.spec
        d_head = s.width // s.n_heads
        attn = Attention(s.width, s.n_heads, s.n_heads, d_head, qkv_bias=True, o_bias=True, layer_index=index)
        return TransformerBlock(LayerNorm(s.width, s.eps), attn, LayerNorm(s.width, s.eps), MLP(s.width, s.d_mlp, s.act, bias=True))

    @property
    def depth(self) -> int:
        return self.spec.depth

    def pool_positions(self, input_ids: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch"]:
        """The position each text is pooled at, exactly as transformers.

        CLIP: the first ``eos_token_id`` (position 0 when a text has none); when ``eos_token_id == 2`` the
        legacy rule ``argmax(input_ids)`` (the highest id, the end-of-text token of the original vocabulary).
        SigLIP: the last position, whatever it holds.
        """
        b, length = input_ids.shape
        if self.spec.kind == "siglip":
            return torch.full((b,), length - 1, dtype=torch.long, device=input_ids.device)
        ids = input_ids.to(torch.int)
        if self.spec.eos_token_id == 2:
            return ids.argmax(dim=-1)
        return (ids == self.spec.eos_token_id).int().argmax(dim=-1)

    def mask(self, attention_mask: Tensor | None) -> MaskSpec:
        """Causal (CLIP) or bidirectional (SigLIP), with padding keys hidden when a mask has zeros."""
        key_valid = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            key_valid = attention_mask.bool()
        return MaskSpec(causal=self.spec.causal, key_valid=key_valid)

    def forward(
        self,
        input_ids: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        position_ids: Int[Tensor, "batch pos"] | None = None,
        output_hidden_states: bool = False,
        feature_layers: int | Sequence[int] | None = None,
    ) -> tuple[Float[Tensor, "batch pos d"], Float[Tensor, "batch d_out"], dict[int, Tensor]]:
        """``(last_hidden_state, pooler_output, hidden_states)`` as transformers' text model returns them."""
        if input_ids.dim() != 2:
            input_ids = input_ids.view(-1, input_ids.shape[-1])
        b, length = input_ids.shape
        if length > self.spec.max_positions:
            raise InputError(
                f"text length {length} exceeds max_position_embeddings ({self.spec.max_positions}); truncate the texts"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (b, length):
            raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, length)} like input_ids")
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device)[None]
        tok = self.hook_token_embed(self.token_embed(input_ids))
        pos = self.hook_pos_embed(self.pos_embed(position_ids).expand(b, -1, -1))
        x = self.hook_embed(tok + pos)
        n = self.depth
        wanted = set(range(n + 1)) if output_hidden_states else _wanted(feature_layers, n)
        x, states = run_blocks(self.blocks, x, self.mask(attention_mask), wanted)
        last = self.hook_last_hidden(self.ln_final(x))
        pooled = last[torch.arange(b, device=last.device), self.pool_positions(input_ids).to(last.device)]
        if self.head is not None:
            pooled = self.head(pooled)
        return last, self.hook_pooled(pooled), states


def _wanted(feature_layers: int | Sequence[int] | None, depth: int) -> set[int]:
    if feature_layers is None:
        return set()
    if isinstance(feature_layers, int):
        return {normalize_layer(feature_layers, depth)}
    return {normalize_layer(i, depth) for i in feature_layers}


# ----- the root model -------------------------------------------------------------------------------------------
class HookedCLIP(CheckedHooksMixin):
    """CLIP / SigLIP (two towers, or one of them) with a named hook on every site of both towers.

    Build with :meth:`from_hf` (an in-memory ``CLIPModel``, ``SiglipModel``, ``CLIPVisionModel``,
    ``CLIPTextModel``, ``CLIP*ModelWithProjection``, ``SiglipVisionModel``, ``SiglipTextModel``) or
    :meth:`from_pretrained` (a checkpoint folder saved by transformers). Call it with the processor's keyword
    tensors; it returns the transformers output class of the architecture it reimplements.

    Hooks: ``vision.*`` (see :class:`HookedViT`), ``text.*`` (see :class:`HookedTextTower`),
    ``hook_image_embeds`` [B_images, P] and ``hook_text_embeds`` [B_texts, P]: the projected (CLIP) or pooled
    (SigLIP) embeddings before L2 normalisation, i.e. ``get_image_features`` / ``get_text_features``.
    """

    hf_architectures: ClassVar[tuple[str, ...]] = tuple(ARCHITECTURES)
    #: ``loading.build`` passes the architecture name (CLIPVisionModel and ...WithProjection share a config).
    config_takes_architecture: ClassVar[bool] = True
    input_names: ClassVar[tuple[str, ...]] = (
        "input_ids",
        "pixel_values",
        "attention_mask",
        "position_ids",
        "return_loss",
        "interpolate_pos_encoding",
        "output_hidden_states",
        "return_type",
    )
    #: a two-tower model: ``input_ids`` may hold many texts scored against the images (not one prompt per row)
    generative: ClassVar[bool] = False
    return_types: ClassVar[tuple[str, ...]] = (
        "output",
        "logits_per_image",
        "logits_per_text",
        "image_embeds",
        "text_embeds",
        "loss",
    )

    def __init__(self, cfg: TwoTowerConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = HookedViT(cfg.vision) if cfg.vision is not None else None
        self.text = HookedTextTower(cfg.text) if cfg.text is not None else None
        _, has_v, has_t, has_proj, has_scale = ARCHITECTURES[cfg.architecture]
        self.visual_projection = nn.Linear(cfg.vision.width, cfg.projection_dim, bias=False) if has_proj and has_v else None
        self.text_projection = nn.Linear(cfg.text.width, cfg.projection_dim, bias=False) if has_proj and has_t else None
        shape = (1,) if cfg.family == "siglip" else ()
        self.logit_scale = nn.Parameter(torch.zeros(shape)) if has_scale else None
        self.logit_bias = nn.Parameter(torch.zeros(shape)) if cfg.logit_bias else None
        self.hook_image_embeds = HookPoint()
        self.hook_text_embeds = HookPoint()
        self.setup()

    @classmethod
    def input_schema(cls) -> Any:
        """Which keyword inputs the two-tower family takes (its registration's :class:`InputSchema`)."""
        from hooked_vlm.families.registry import family

        return family("clip").input_schema

    # ----- configuration and weights -----------------------------------------------------------------------
    @classmethod
    def config_from_hf(cls, hf_config: Any, architecture: str | None = None) -> TwoTowerConfig:
        """Specs of the towers from a ``CLIPConfig`` / ``SiglipConfig`` or a single tower's config."""
        d = _config_dict(hf_config)
        if architecture is None:
            archs = d.get("architectures") or []
            architecture = archs[0] if archs else _default_architecture(str(d.get("model_type", "")))
        if architecture not in ARCHITECTURES:
            raise ValueError(f"{architecture!r} is not a CLIP/SigLIP architecture; expected one of {sorted(ARCHITECTURES)}")
        family, has_v, has_t, has_proj, has_scale = ARCHITECTURES[architecture]
        two = has_v and has_t
        vcfg = d["vision_config"] if two else d
        tcfg = d["text_config"] if two else d
        vision = ViTSpec.from_hf_config(vcfg, family) if has_v else None
        text = TextSpec.from_hf_config(tcfg, family) if has_t else None
        proj = d.get("projection_dim") if has_proj else None
        return TwoTowerConfig(
            architecture=architecture,
            family=family,
            vision=vision,
            text=text,
            projection_dim=proj,
            logit_scale=has_scale,
            hf_config=d,
            model_name=d.get("_name_or_path", "") or architecture,
        )

    @classmethod
    def convert_hf_state_dict(cls, hf_config: Any, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Map transformers names (in-memory and on-disk layouts are identical for these classes) to ours."""
        mt = str(_config_dict(hf_config).get("model_type", ""))
        has_v, has_t = not mt.endswith("_text_model"), not mt.endswith("_vision_model")
        out: dict[str, Tensor] = {}
        vision_sd: dict[str, Tensor] = {}
        text_sd: dict[str, Tensor] = {}
        for k, v in sd.items():
            if k in ("visual_projection.weight", "text_projection.weight", "logit_scale", "logit_bias"):
                out[k] = v
            elif k.startswith("vision_model."):
                vision_sd[k[len("vision_model.") :]] = v
            elif k.startswith("text_model."):
                text_sd[k[len("text_model.") :]] = v
            elif has_v and not has_t:
                vision_sd[k] = v
            elif has_t and not has_v:
                text_sd[k] = v
            else:
                raise KeyError(f"unexpected {mt} weight {k!r}")
        out.update({f"vision.{k}": v for k, v in convert_vit_state_dict(vision_sd).items()})
        out.update({f"text.{k}": v for k, v in convert_text_state_dict(text_sd).items()})
        return out

    @classmethod
    def from_hf(cls, hf_model: nn.Module, dtype: torch.dtype | None = None, device: Any = None) -> "HookedCLIP":
        """Hooked twin of an in-memory transformers CLIP / SigLIP model (same weights, same outputs)."""
        from hooked_vlm.loading import from_hf

        return from_hf(hf_model, dtype=dtype, device=device)

    @classmethod
    def from_pretrained(cls, path_or_id: str, dtype: torch.dtype | None = None, device: Any = None) -> "HookedCLIP":
        """Load a transformers checkpoint folder (config.json + safetensors) or a hub id when reachable."""
        from hooked_vlm.loading import from_pretrained

        return from_pretrained(path_or_id, dtype=dtype, device=device)

    # ----- encoders -----------------------------------------------------------------------------------------
    def encode_image(
        self,
        pixel_values: Float[Tensor, "images channels height width"],
        interpolate_pos_encoding: bool = False,
        normalize: bool = False,
    ) -> Float[Tensor, "images proj"]:
        """Image embeddings (transformers ``get_image_features(...).pooler_output``); unit norm if ``normalize``."""
        return self._encode_image(pixel_values, interpolate_pos_encoding, normalize)[0]

    def encode_text(
        self,
        input_ids: Int[Tensor, "texts pos"],
        attention_mask: Int[Tensor, "texts pos"] | None = None,
        position_ids: Int[Tensor, "texts pos"] | None = None,
        normalize: bool = False,
    ) -> Float[Tensor, "texts proj"]:
        """Text embeddings (transformers ``get_text_features(...).pooler_output``); unit norm if ``normalize``."""
        return self._encode_text(input_ids, attention_mask, position_ids, normalize)[0]

    def _encode_image(self, pixel_values, interpolate_pos_encoding=False, normalize=False, output_hidden_states=False):
        if self.vision is None:
            raise InputError(f"{self.cfg.architecture} has no vision tower; pass input_ids only")
        out = self.vision(pixel_values, output_hidden_states=output_hidden_states, interpolate_pos_encoding=interpolate_pos_encoding)
        emb = out.pooler_output
        if emb is None:
            raise InputError("this SigLIP vision tower has no pooling head (vision_use_head=False), so it has no image embedding")
        if self.visual_projection is not None:
            emb = self.visual_projection(emb)
        emb = self.hook_image_embeds(emb)
        return (_unit(emb) if normalize else emb), out

    def _encode_text(self, input_ids, attention_mask=None, position_ids=None, normalize=False, output_hidden_states=False):
        if self.text is None:
            raise InputError(f"{self.cfg.architecture} has no text tower; pass pixel_values only")
        last, pooled, states = self.text(input_ids, attention_mask, position_ids, output_hidden_states=output_hidden_states)
        emb = self.text_projection(pooled) if self.text_projection is not None else pooled
        emb = self.hook_text_embeds(emb)
        return (_unit(emb) if normalize else emb), (last, pooled, states)

    def similarity(
        self, image_embeds: Float[Tensor, "images proj"], text_embeds: Float[Tensor, "texts proj"]
    ) -> Float[Tensor, "texts images"]:
        """``logits_per_text`` from unnormalised embeddings: ``exp(logit_scale) * cos`` (SigLIP ``+ logit_bias``)."""
        if self.logit_scale is None:
            raise InputError(f"{self.cfg.architecture} has no logit scale: similarities need a two-tower model")
        logits = _unit(text_embeds) @ _unit(image_embeds).T * self.logit_scale.exp()
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return logits

    # ----- forward ------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Int[Tensor, "texts pos"] | None = None,
        pixel_values: Float[Tensor, "images channels height width"] | None = None,
        attention_mask: Int[Tensor, "texts pos"] | None = None,
        position_ids: Int[Tensor, "texts pos"] | None = None,
        return_loss: bool = False,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        return_type: str = "output",
        **unknown: Any,
    ) -> Any:
        """The transformers output of this architecture, or one of its fields (``return_type``).

        Two-tower models accept either input alone (the missing side and the similarities are None).
        ``return_type`` is ``"output"`` (``CLIPOutput`` / ``SiglipOutput`` / ``BaseModelOutputWithPooling`` /
        ``CLIP*ModelOutput``), ``"logits_per_image"``, ``"logits_per_text"``, ``"image_embeds"``,
        ``"text_embeds"`` (unit norm for two-tower models, as transformers) or ``"loss"`` (the contrastive /
        sigmoid loss over the batch, for ``run_with_cache(incl_bwd=True)``).
        """
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected input(s) {sorted(unknown)}; it accepts {list(self.input_names)}")
        if return_type not in self.return_types:
            raise ValueError(f"return_type must be one of {self.return_types}, got {return_type!r}")
        if input_ids is None and pixel_values is None:
            raise InputError("pass input_ids (texts), pixel_values (images) or both")
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        arch = self.cfg.architecture
        _, has_v, has_t, _, _ = ARCHITECTURES[arch]
        img = txt = v_out = t_out = None
        if pixel_values is not None:
            img, vo = self._encode_image(pixel_values, interpolate_pos_encoding, output_hidden_states=output_hidden_states)
            v_out = BaseModelOutputWithPooling(
                last_hidden_state=vo.last_hidden_state,
                pooler_output=vo.pooler_output,
                hidden_states=_as_tuple(vo.hidden_states) if output_hidden_states else None,
            )
        if input_ids is not None:
            txt, (last, pooled, states) = self._encode_text(input_ids, attention_mask, position_ids, output_hidden_states=output_hidden_states)
            t_out = BaseModelOutputWithPooling(
                last_hidden_state=last, pooler_output=pooled, hidden_states=_as_tuple(states) if output_hidden_states else None
            )
        if not (has_v and has_t):
            return self._single_tower_output(arch, img if has_v else txt, v_out if has_v else t_out, return_type)
        if self.cfg.family == "clip":  # transformers' CLIPModel reports the projected pooled output
            if v_out is not None:
                v_out.pooler_output = img
            if t_out is not None:
                t_out.pooler_output = txt
        image_embeds = _unit(img) if img is not None else None
        text_embeds = _unit(txt) if txt is not None else None
        per_text = per_image = loss = None
        if img is not None and txt is not None:
            per_text = self.similarity(img, txt)
            per_image = per_text.T
            if return_loss or return_type == "loss":
                loss = contrastive_loss(per_text, self.cfg.family)
        if return_type != "output":
            value = {"logits_per_image": per_image, "logits_per_text": per_text, "image_embeds": image_embeds, "text_embeds": text_embeds, "loss": loss}[return_type]
            if value is None:
                raise InputError(f"return_type={return_type!r} needs both input_ids and pixel_values")
            return value
        output_cls = _output_class(arch)
        return output_cls(
            loss=loss,
            logits_per_image=per_image,
            logits_per_text=per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=t_out,
            vision_model_output=v_out,
        )

    def _single_tower_output(self, arch: str, emb: Tensor | None, base: Any, return_type: str) -> Any:
        if base is None:
            side = "pixel_values" if "Vision" in arch else "input_ids"
            raise InputError(f"{arch} takes {side}")
        if return_type in ("image_embeds", "text_embeds"):
            if (return_type == "image_embeds") != ("Vision" in arch):
                raise InputError(f"{arch} has no {return_type}")
            return emb
        if return_type != "output":
            raise InputError(f"return_type={return_type!r} needs a two-tower model")
        if arch.endswith("WithProjection"):
            from transformers.models.clip.modeling_clip import CLIPTextModelOutput, CLIPVisionModelOutput

            if "Vision" in arch:
                return CLIPVisionModelOutput(image_embeds=emb, last_hidden_state=base.last_hidden_state, hidden_states=base.hidden_states)
            return CLIPTextModelOutput(text_embeds=emb, last_hidden_state=base.last_hidden_state, hidden_states=base.hidden_states)
        return base

    # ----- hooks and caching (TransformerLens, with helpful errors) --------------------------------------------
    def hidden_state_hook_name(self, tower: str, index: int) -> str:
        """Full hook name whose (edited) value is transformers' ``{tower}_model_output.hidden_states[index]``
        (``output_hidden_states=True`` reads it from there, after every hook attached to it)."""
        t = {"vision": self.vision, "text": self.text}[tower]
        if t is None:
            raise InputError(f"{self.cfg.architecture} has no {tower} tower")
        i = normalize_layer(index, t.depth)
        rel = f"blocks.{i}.hook_resid_pre" if i < t.depth else f"blocks.{t.depth - 1}.hook_resid_post"
        return f"{tower}.{rel}"

    def hook_table(self) -> list[tuple[str, str]]:
        """(name, documented shape) of every hook point, in module order.

        Symbols: B images (``vision.*``, ``hook_image_embeds``) or texts (``text.*``, ``hook_text_embeds``),
        N vision tokens (patches + CLIP's [CLS]), Np patches, L text tokens, d tower width, H heads, dh head
        dim, m MLP width, d_out pooled width, P embedding width.
        """
        return [(name, self.documented_shape(name)) for name in self.hook_dict]

    def documented_shape(self, name: str) -> str:
        """The documented shape of hook ``name`` (see :meth:`hook_table` for the symbols)."""
        from hooked_vlm.hook_table import describe_hook

        if name in ("hook_image_embeds", "hook_text_embeds"):
            return "B P"
        tower, rest = name.split(".", 1)
        seq = "N" if tower == "vision" else "L"
        if rest.startswith("head."):  # SigLIP MAP head: one probe query over N patches
            head = {
                "attn.hook_q": "B 1 H dh", "attn.hook_rot_q": "B 1 H dh", "attn.hook_z": "B 1 H dh",
                "attn.hook_k": "B N H dh", "attn.hook_rot_k": "B N H dh", "attn.hook_v": "B N H dh",
                "attn.hook_attn_scores": "B H 1 N", "attn.hook_pattern": "B H 1 N", "attn.hook_result": "B 1 H d",
                "ln.hook_scale": "B 1 1", "ln.hook_normalized": "B 1 d", "mlp.hook_pre": "B 1 m", "mlp.hook_post": "B 1 m",
            }
            sub = rest[len("head.") :]
            if sub in head or not sub.startswith("attn."):
                return head.get(sub, "B 1 d")
        fixed = {
            "hook_patch_embed": "B Np d",
            "hook_pooled": "B d_out",
            "hook_token_embed": "B L d",
            "hook_pos_embed": f"B {seq} d",
            "hook_embed": f"B {seq} d",
            "hook_last_hidden": f"B {seq} d",
        }
        if rest in fixed:
            return fixed[rest]
        if rest.startswith("ln_post.") and self.cfg.family == "clip":  # post_layernorm on [CLS] only
            return "B 1 1" if rest.endswith("hook_scale") else "B 1 d"
        shape = describe_hook(rest).split()
        return " ".join({"L": seq, "Lq": seq, "Lk": seq, "Hkv": "H"}.get(t, t) for t in shape)


# ----- helpers ------------------------------------------------------------------------------------------------
def _unit(x: Tensor) -> Tensor:
    """x / ||x||, computed as transformers does (``_get_vector_norm``: sqrt of the sum of squares)."""
    return x / torch.pow(torch.sum(torch.pow(x, 2), dim=-1, keepdim=True), 0.5)


def _as_tuple(states: dict[int, Tensor]) -> tuple[Tensor, ...]:
    return tuple(states[i] for i in sorted(states))


def contrastive_loss(logits_per_text: Float[Tensor, "texts images"], family: str) -> Float[Tensor, ""]:
    """CLIP's symmetric cross-entropy or SigLIP's pairwise sigmoid loss (pairs on the diagonal), as transformers."""
    if family == "clip":
        labels = torch.arange(len(logits_per_text), device=logits_per_text.device)
        return (F.cross_entropy(logits_per_text, labels) + F.cross_entropy(logits_per_text.T, labels)) / 2.0
    eye = torch.eye(logits_per_text.size(0), device=logits_per_text.device)
    signs = 2 * eye - 1
    return -F.logsigmoid(signs * logits_per_text).sum(dim=-1).mean()


def _output_class(arch: str):
    if arch.startswith("Siglip"):
        from transformers.models.siglip.modeling_siglip import SiglipOutput

        return SiglipOutput
    from transformers.models.clip.modeling_clip import CLIPOutput

    return CLIPOutput


def _default_architecture(model_type: str) -> str:
    table = {
        "clip": "CLIPModel",
        "siglip": "SiglipModel",
        "clip_vision_model": "CLIPVisionModel",
        "clip_text_model": "CLIPTextModel",
        "siglip_vision_model": "SiglipVisionModel",
        "siglip_text_model": "SiglipTextModel",
    }
    if model_type not in table:
        raise ValueError(f"model_type {model_type!r} is not a CLIP/SigLIP model type; expected one of {sorted(table)}")
    return table[model_type]


def convert_text_state_dict(sd: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Map a transformers CLIP / SigLIP text tower's weights (keys under ``prefix``) to :class:`HookedTextTower`
    names; an extra leading ``text_model.`` is stripped. Unknown keys under ``prefix`` raise KeyError."""
    out: dict[str, Tensor] = {}
    for key, v in sd.items():
        if not key.startswith(prefix):
            continue
        k = key[len(prefix) :]
        if k.startswith("text_model."):
            k = k[len("text_model.") :]
        if k.endswith("position_ids"):
            continue
        if k == "embeddings.token_embedding.weight":
            out["token_embed.weight"] = v
        elif k == "embeddings.position_embedding.weight":
            out["pos_embed.weight"] = v
        elif k.startswith("final_layer_norm."):
            out["ln_final." + {"weight": "w", "bias": "b"}[k.rsplit(".", 1)[1]]] = v
        elif k in ("head.weight", "head.bias"):
            out[k] = v
        elif k.startswith("encoder.layers."):
            out.update(_convert_vit_key(k, v))
        else:
            raise KeyError(f"unexpected CLIP/SigLIP text weight {k!r}")
    return out


__all__ = [
    "HookedCLIP",
    "HookedTextTower",
    "TextSpec",
    "TwoTowerConfig",
    "ARCHITECTURES",
    "contrastive_loss",
    "convert_text_state_dict",
]
