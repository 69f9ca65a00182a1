"""Qwen2-VL and Qwen2.5-VL, reimplemented on the shared blocks.

Architecture (both): a ViT over 14 px patches of 2 frames (a linear patch embedding), 2-D rotary,
block-diagonal attention per image / temporal slice (Qwen2.5-VL: inside windows, except in its
full-attention blocks), a patch merger that concatenates each 2x2 block of patches and projects it to
the language model's width, and a Qwen2 decoder with M-RoPE over (time, row, column) positions.

Differences from transformers' code that change no output: vision activations are batch-first
``[B, N, d]`` (one row per prompt, padded) in raster order of each image's patch grid, and window
attention is a block-diagonal mask in raster order instead of a permutation of the rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vlm.components.attention import Attention
from hooked_vlm.components.block import TransformerBlock
from hooked_vlm.components.mlp import MLP, GatedMLP
from hooked_vlm.components.norms import LayerNorm, RMSNorm
from hooked_vlm.components.rotary import inverse_frequencies, mrope_cos_sin, vision_2d_cos_sin
from hooked_vlm.config import HookedVLMConfig
from hooked_vlm.errors import InputError
from hooked_vlm.families.qwen_vl import FAMILY
from hooked_vlm.families.decoder import LLAMA_NORMS, convert_decoder_key
from hooked_vlm.layout import IMAGE, PAD, SPECIAL, TEXT, VIDEO, TokenLayout, VisualItem
from hooked_vlm.model import HookedVLM
from kernels.mask import MaskSpec


@dataclass(frozen=True)
class QwenVisionSpec:
    """The vision tower's shape, read from either family's vision config (their field names differ)."""

    version: str  # "2" or "2.5"
    width: int
    out_width: int
    depth: int
    n_heads: int
    d_mlp: int
    act: str
    patch_size: int
    merge: int
    temporal_patch_size: int
    in_channels: int
    rope_theta: float
    window_size: int = 0
    fullatt_blocks: tuple[int, ...] = ()
    tokens_per_second: float | None = None

    @classmethod
    def from_hf_dict(cls, v: dict[str, Any], version: str) -> "QwenVisionSpec":
        theta = (v.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        common = dict(
            version=version,
            depth=v["depth"],
            n_heads=v["num_heads"],
            act=v["hidden_act"],
            patch_size=v["patch_size"],
            merge=v["spatial_merge_size"],
            temporal_patch_size=v["temporal_patch_size"],
            in_channels=v.get("in_channels", 3),
            rope_theta=theta,
        )
        if version == "2":
            return cls(width=v["embed_dim"], out_width=v["hidden_size"], d_mlp=int(v["embed_dim"] * v["mlp_ratio"]), **common)
        return cls(
            width=v["hidden_size"],
            out_width=v["out_hidden_size"],
            d_mlp=v["intermediate_size"],
            window_size=v["window_size"],
            fullatt_blocks=tuple(v["fullatt_block_indexes"]),
            tokens_per_second=v.get("tokens_per_second"),
            **common,
        )

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


class QwenPatchMerger(nn.Module):
    """Norm each patch, concatenate each 2x2 block, then MLP (GELU) to the language model's width."""

    def __init__(self, spec: QwenVisionSpec):
        super().__init__()
        self.ln_q = LayerNorm(spec.width, 1e-6) if spec.version == "2" else RMSNorm(spec.width, 1e-6)
        hidden = spec.width * spec.merge**2
        self.mlp = MLP(hidden, hidden, act="gelu", bias=True, d_out=spec.out_width)
        self.hook_in = HookPoint()  # [B, M, merge^2 * width]: the concatenated, normalised 2x2 blocks

    def forward(self, x: Float[Tensor, "batch n width"], merge_index: Int[Tensor, "batch m k"]) -> Float[Tensor, "batch m out"]:
        normed = self.ln_q(x)
        b, m, k = merge_index.shape
        grouped = torch.gather(normed, 1, merge_index.reshape(b, m * k, 1).expand(-1, -1, normed.shape[-1]))
        return self.mlp(self.hook_in(grouped.reshape(b, m, k * normed.shape[-1])))


@dataclass
class VisionPlan:
    """Index tensors that place packed pixel rows into batch-first raster order, shared by all blocks."""

    src: Int[Tensor, "batch n"]  # row of the packed pixel tensor for each (prompt, patch); 0 for padding
    valid: Bool[Tensor, "batch n"]
    hw: Int[Tensor, "batch n 2"]  # patch (row, col) for the 2-D rotary
    full_mask: MaskSpec  # one segment per (item, temporal slice)
    window_mask: MaskSpec | None  # Qwen2.5-VL windows
    merge_index: Int[Tensor, "batch m k"]  # the merge^2 patches of each merged token
    merged_valid: Bool[Tensor, "batch m"]


def merge_block_to_raster(t: int, h: int, w: int, merge: int) -> Int[Tensor, "n"]:
    """For each raster-order patch (t, r, c), its row in transformers' merge-block pixel order."""
    idx = torch.arange(t * h * w).reshape(t, h // merge, w // merge, merge, merge)
    return idx.permute(0, 1, 3, 2, 4).reshape(-1)


def build_vision_plan(layout: TokenLayout, spec: QwenVisionSpec, n_image_rows: int, device: torch.device) -> VisionPlan:
    """Batch-first raster layout of every visual item, its segments and windows, and its merge groups."""
    b = layout.batch_size
    per_row: list[list[VisualItem]] = [[] for _ in range(b)]
    for it in layout.items:
        per_row[it.batch].append(it)
    n_max = max([sum(it.n_patches for it in row) for row in per_row] + [1])
    m_max = max([sum(it.n_tokens for it in row) for row in per_row] + [1])
    k = spec.merge**2
    src = torch.zeros(b, n_max, dtype=torch.long)
    valid = torch.zeros(b, n_max, dtype=torch.bool)
    hw = torch.zeros(b, n_max, 2, dtype=torch.long)
    full = torch.full((b, n_max), -1, dtype=torch.long)
    window = torch.full((b, n_max), -1, dtype=torch.long)
    merge_index = torch.zeros(b, m_max, k, dtype=torch.long)
    merged_valid = torch.zeros(b, m_max, dtype=torch.bool)
    seg = win = 0
    wm = spec.window_size // spec.merge // spec.patch_size if spec.window_size else 0
    for bi, row in enumerate(per_row):
        n_off = m_off = 0
        for it in sorted(row, key=lambda x: x.start):
            t, h, w = it.grid_thw
            base = it.pixel_offset + (n_image_rows if it.kind == "video" else 0)
            n = it.n_patches
            sl = slice(n_off, n_off + n)
            src[bi, sl] = base + merge_block_to_raster(t, h, w, spec.merge)
            valid[bi, sl] = True
            tt, rr, cc = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            hw[bi, sl] = torch.stack([rr.flatten(), cc.flatten()], dim=-1)
            full[bi, sl] = seg + tt.flatten()
            seg += t
            if wm:
                nwh, nww = -(-(h // spec.merge) // wm), -(-(w // spec.merge) // wm)
                wid = (tt * nwh + (rr // spec.merge) // wm) * nww + (cc // spec.merge) // wm
                window[bi, sl] = win + wid.flatten()
                win += t * nwh * nww
            gt, gh, gw = it.merged_grid
            mt, mr, mc = torch.meshgrid(torch.arange(gt), torch.arange(gh), torch.arange(gw), indexing="ij")
            offs = torch.stack(
                [(mr * spec.merge + i) * w + mc * spec.merge + j for i in range(spec.merge) for j in range(spec.merge)], dim=-1
            )
            merge_index[bi, m_off : m_off + it.n_tokens] = (n_off + mt[..., None] * h * w + offs).reshape(-1, k)
            merged_valid[bi, m_off : m_off + it.n_tokens] = True
            n_off += n
            m_off += it.n_tokens
    to = dict(device=device)
    full_mask = MaskSpec(causal=False, doc_ids=full.to(**to))
    window_mask = MaskSpec(causal=False, doc_ids=window.to(**to)) if wm else None
    return VisionPlan(src.to(**to), valid.to(**to), hw.to(**to), full_mask, window_mask, merge_index.to(**to), merged_valid.to(**to))


class QwenVisionTower(nn.Module):
    """Patch embedding -> ViT blocks (2-D rotary, block-diagonal / windowed attention) -> patch merger.

    Hooks: ``vision.hook_patch_embed`` ``[B, N, width]``, ``vision.blocks.{j}.*`` as in the language model,
    ``vision.merger.*``, and ``vision.hook_out`` ``[B, M, d_model]`` (features injected into the LM), all
    batch-first with one row per prompt, patches in raster order of each item's grid.
    """

    def __init__(self, spec: QwenVisionSpec):
        super().__init__()
        self.spec = spec
        self.patch_embed = nn.Linear(spec.patch_dim, spec.width, bias=False)
        self.hook_patch_embed = HookPoint()
        d_head = spec.width // spec.n_heads
        self.register_buffer("inv_freq", inverse_frequencies(d_head // 2, spec.rope_theta), persistent=False)
        self.blocks = nn.ModuleList([self._block(i) for i in range(spec.depth)])
        self.merger = QwenPatchMerger(spec)
        self.hook_out = HookPoint()

    def _block(self, index: int) -> TransformerBlock:
        s = self.spec
        attn = Attention(s.width, s.n_heads, s.n_heads, s.width // s.n_heads, qkv_bias=True, o_bias=True, rotary_in_fp32=True, layer_index=index)
        if s.version == "2":
            return TransformerBlock(LayerNorm(s.width, 1e-6), attn, LayerNorm(s.width, 1e-6), MLP(s.width, s.d_mlp, s.act, bias=True))
        return TransformerBlock(RMSNorm(s.width, 1e-6), attn, RMSNorm(s.width, 1e-6), GatedMLP(s.width, s.d_mlp, s.act, bias=True))

    def block_mask(self, index: int, plan: VisionPlan) -> MaskSpec:
        if plan.window_mask is not None and index not in self.spec.fullatt_blocks:
            return plan.window_mask
        return plan.full_mask

    def forward(self, pixels: Float[Tensor, "rows patch_dim"], plan: VisionPlan) -> Float[Tensor, "batch m d_model"]:
        dtype = self.patch_embed.weight.dtype
        x = pixels.to(dtype)[plan.src] * plan.valid[..., None].to(dtype)
        x = self.hook_patch_embed(self.patch_embed(x))
        cos, sin = vision_2d_cos_sin(plan.hw, self.inv_freq)
        for j, block in enumerate(self.blocks):
            x = block(x, cos, sin, self.block_mask(j, plan))
        merged = self.merger(x, plan.merge_index)
        return merged * plan.merged_valid[..., None].to(merged.dtype)  # HookedVLM._vision_output fires hook_out


class HookedQwenVL(HookedVLM):
    """Qwen2-VL / Qwen2.5-VL with hooks on both towers. Inputs are the Hugging Face keyword tensors."""

    hf_architectures = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    input_names = FAMILY.input_schema.names
    #: M-RoPE position rule of the token layout: ``"transformers-5.23"`` (default, exact against transformers) or
    #: ``"official"`` (transformers 4.x / Qwen's reference code); they differ only for scaled video time.
    #: Set per model (``model.rope_rule = "official"``); passed to :func:`mrope_position_ids` as ``rule=``.
    rope_rule: str = "transformers-5.23"
    #: text-config defaults of the M-RoPE tables (a subclass family with other defaults overrides them)
    default_rope_theta: float = 1e6
    default_mrope_section: tuple[int, ...] = (16, 24, 24)
    #: decoder norm weight names beyond the shared ones (``convert_decoder_key``'s ``norm_names``)
    decoder_norm_names: dict[str, str] = LLAMA_NORMS

    # ----- configuration ---------------------------------------------------------------------------------
    @classmethod
    def config_from_hf(cls, hf_config: Any) -> HookedVLMConfig:
        d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
        t = d["text_config"]
        n_heads = t["num_attention_heads"]
        rope = t.get("rope_parameters") or {}
        if rope.get("rope_type", "default") not in ("default", "mrope"):
            raise NotImplementedError(f"rope_type {rope.get('rope_type')!r} is not supported yet (only default M-RoPE)")
        layer_types = list(t.get("layer_types") or ["full_attention"] * t["num_hidden_layers"])
        if not t.get("use_sliding_window"):
            layer_types = ["full_attention"] * t["num_hidden_layers"]
        family = "qwen2_vl" if d["model_type"] == "qwen2_vl" else "qwen2_5_vl"
        return HookedVLMConfig(
            family=family,
            architecture="Qwen2VLForConditionalGeneration" if family == "qwen2_vl" else "Qwen2_5_VLForConditionalGeneration",
            n_layers=t["num_hidden_layers"],
            d_model=t["hidden_size"],
            n_heads=n_heads,
            n_key_value_heads=t["num_key_value_heads"],
            d_head=t["hidden_size"] // n_heads,
            d_mlp=t["intermediate_size"],
            d_vocab=t["vocab_size"],
            act_fn=t["hidden_act"],
            eps=t["rms_norm_eps"],
            layer_types=layer_types,
            hf_config=d,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
            model_name=d.get("_name_or_path", "") or family,
            original_architecture=family,
        )

    @property
    def vision_spec(self) -> QwenVisionSpec:
        return self.vision.spec

    @property
    def token_ids(self) -> dict[str, int]:
        d = self.cfg.hf_config
        return {k: d[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}

    def _build_vision(self) -> nn.Module:
        version = "2" if self.cfg.family == "qwen2_vl" else "2.5"
        return QwenVisionTower(QwenVisionSpec.from_hf_dict(self.cfg.hf_config["vision_config"], version))

    def _register_rope(self) -> None:
        """M-RoPE: one table of inverse frequencies split into (time, row, column) sections."""
        t = self.cfg.hf_config["text_config"]
        rope = t.get("rope_parameters") or {}
        theta = float(rope.get("rope_theta", self.default_rope_theta))
        self.register_buffer("inv_freq", inverse_frequencies(self.cfg.d_head, theta), persistent=False)
        self.mrope_section = list(rope.get("mrope_section", self.default_mrope_section))

    # ----- weights -----------------------------------------------------------------------------------------
    @classmethod
    def convert_hf_state_dict(cls, hf_config: Any, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        """Accepts the in-memory (``model.visual.*``, ``model.language_model.*``) or on-disk (``visual.*``,
        ``model.layers.*``) Qwen layout."""
        out: dict[str, Tensor] = {}
        for k, v in sd.items():
            k = cls._canonical_key(k)
            if k.startswith("model.visual."):
                out.update(cls._convert_vision_key(k[len("model.visual.") :], v))
            elif k.startswith("model.language_model."):
                out.update(convert_decoder_key(k[len("model.language_model.") :], v, norm_names=cls.decoder_norm_names))
            elif k == "lm_head.weight":
                out["unembed.weight"] = v
            else:
                cls._unexpected_key(k)
        if (hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)).get("tie_word_embeddings") or "unembed.weight" not in out:
            out["unembed.weight"] = out["embed.weight"]
        return out

    @staticmethod
    def _canonical_key(k: str) -> str:
        """The in-memory name of a weight saved in either layout (``visual.*`` / ``model.layers.*`` on disk)."""
        if k.startswith("visual."):
            return "model." + k
        if k.startswith("model.") and not k.startswith(("model.visual.", "model.language_model.")):
            return "model.language_model." + k[len("model.") :]
        return k

    @classmethod
    def _unexpected_key(cls, k: str) -> None:
        """A weight outside the vision tower, the language model and ``lm_head``: ignored (Qwen2-VL checkpoints)."""

    @staticmethod
    def _convert_vision_key(k: str, v: Tensor) -> dict[str, Tensor]:
        if k == "patch_embed.proj.weight":
            return {"vision.patch_embed.weight": v.reshape(v.shape[0], -1)}
        if k.startswith("merger."):
            rest = k[len("merger.") :]
            rest = rest.replace("ln_q.weight", "ln_q.w").replace("ln_q.bias", "ln_q.b")
            rest = rest.replace("mlp.0.", "mlp.fc1.").replace("mlp.2.", "mlp.fc2.")
            return {f"vision.merger.{rest}": v}
        parts = k.split(".")
        j, rest = parts[1], ".".join(parts[2:])
        pre = f"vision.blocks.{j}."
        if rest.startswith("norm1."):
            return {pre + "ln1." + ("w" if rest.endswith("weight") else "b"): v}
        if rest.startswith("norm2."):
            return {pre + "ln2." + ("w" if rest.endswith("weight") else "b"): v}
        if rest.startswith("attn.qkv."):
            q, kk, vv = v.chunk(3, dim=0)
            kind = rest.split(".")[-1]
            return {pre + f"attn.q_proj.{kind}": q, pre + f"attn.k_proj.{kind}": kk, pre + f"attn.v_proj.{kind}": vv}
        if rest.startswith("attn.proj."):
            return {pre + "attn.o_proj." + rest.split(".")[-1]: v}
        if rest.startswith("mlp."):
            return {pre + rest: v}
        raise KeyError(f"unexpected vision weight {k!r}")

    # ----- the steps of the forward skeleton that differ (HookedVLM._prepare runs them) --------------------
    def _check_inputs(self, inputs: dict[str, Any], past: int) -> None:
        from hooked_vlm.families.qwen_vl.layout import check_common_inputs

        check_common_inputs(self, inputs, past)

    def _layout(self, inputs: dict[str, Any]) -> TokenLayout:
        """Token layout of the given Hugging Face inputs, validated; includes HF's M-RoPE position ids."""
        from hooked_vlm.families.qwen_vl.layout import build_qwen_layout

        return build_qwen_layout(self, inputs)

    def _position_ids(self, inputs: dict[str, Any], layout: TokenLayout | None, past: int) -> Int[Tensor, "3 batch pos"]:
        ids = inputs["input_ids"]
        pos = inputs.get("position_ids")
        if pos is not None:
            pos = pos.to(ids.device)
            if pos.dim() == 2:
                return pos[None].expand(3, -1, -1)
            if pos.dim() == 3 and pos.shape[0] == 4:
                return pos[1:]
            if pos.dim() == 3 and pos.shape[0] == 3:
                return pos
            raise InputError(f"position_ids must be [B, L], [3, B, L] or [4, B, L]; got {tuple(pos.shape)}")
        if layout is not None and layout.position_ids is not None:
            return layout.position_ids
        b, length = ids.shape
        return (torch.arange(length, device=ids.device) + past).view(1, 1, -1).expand(3, b, -1)

    def _rotary_tables(self, positions: Tensor, masks: dict[str, MaskSpec]) -> dict[str, tuple[Tensor, Tensor]]:
        cos_sin = mrope_cos_sin(positions, self.inv_freq, self.mrope_section)
        return {kind: cos_sin for kind in masks}

    def _vision_pixels(self, inputs: dict[str, Any], layout: TokenLayout) -> tuple[Tensor, VisionPlan]:
        """The packed image then video patch rows, and the plan that places them in batch-first raster order."""
        pv, pvv = inputs.get("pixel_values"), inputs.get("pixel_values_videos")
        parts = [p for p in (pv, pvv) if p is not None]
        pixels = torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=0)
        return pixels, build_vision_plan(layout, self.vision_spec, 0 if pv is None else pv.shape[0], pixels.device)

    def _vision_features(self, inputs: dict[str, Any], layout: TokenLayout) -> Tensor:
        return self.vision(*self._vision_pixels(inputs, layout))

    def _generation_positions(self, input_ids: Tensor, attention_mask: Tensor, inputs: dict[str, Any]) -> Tensor:
        if inputs.get("image_grid_thw") is not None or inputs.get("video_grid_thw") is not None:
            layout = self._layout({"input_ids": input_ids, "attention_mask": attention_mask, **inputs})
            assert layout.position_ids is not None
            return layout.position_ids
        return super()._generation_positions(input_ids, attention_mask, inputs)[None].expand(3, -1, -1)


__all__ = ["HookedQwenVL", "QwenVisionTower", "QwenVisionSpec", "build_vision_plan", "merge_block_to_raster", "TEXT", "IMAGE", "VIDEO", "SPECIAL", "PAD"]
