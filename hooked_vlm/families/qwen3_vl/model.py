"""Qwen3-VL (dense, ``Qwen3VLForConditionalGeneration``), reimplemented on the shared blocks.

Architecture:

* **Vision**: a ViT over patches of ``temporal_patch_size`` frames (a linear patch embedding with bias) plus a
  learned ``n x n`` position table resampled bilinearly (``align_corners=True``) to each image's patch grid,
  2-D rotary, block-diagonal attention per image / temporal slice, LayerNorm blocks with a GELU-tanh MLP, and a
  patch merger (LayerNorm per patch, concatenate each 2 x 2 block, Linear-GELU-Linear to the LM width).
* **DeepStack**: after each vision block in ``deepstack_visual_indexes`` a separate merger (LayerNorm *after*
  the 2 x 2 concatenation) projects that block's output; the k-th of these is **added at the visual positions
  after LM block k**. Each addition fires ``blocks.{k}.hook_deepstack [B, L, d_model]`` (zeros at other
  positions), and :meth:`~hooked_vlm.hook_management.HookedActivationCache.decompose_resid` lists it, so
  ``hook_embed + attn_out + mlp_out + deepstack`` sums exactly to the residual.
* **Language model**: a Qwen3 decoder (QK-norm over the head dim before rotary, no q/k/v bias, SwiGLU) with
  **interleaved** M-RoPE: frequency ``j`` rotates by the row position when ``j % 3 == 1`` (``j < 3 * s_H``), by
  the column when ``j % 3 == 2`` (``j < 3 * s_W``), else by the time position.
* **Positions**: transformers 5.24 ``get_rope_index``. A video is split into its temporal slices; each slice is
  its own run of placeholders, written ``<t seconds><|vision_start|> pads <|vision_end|>``, so its time axis is
  the run's start position (time is carried by the timestamp text, not by the position ids).

Differences from transformers' code that change no output: vision activations are batch-first ``[B, N, d]``
(one row per prompt) in raster order of each item's patch grid; the position table is resampled in raster order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vlm.components.attention import Attention
from hooked_vlm.components.block import TransformerBlock
from hooked_vlm.components.mlp import MLP
from hooked_vlm.components.norms import LayerNorm
from hooked_vlm.components.rotary import inverse_frequencies, vision_2d_cos_sin
from hooked_vlm.config import HookedVLMConfig
from hooked_vlm.errors import InputError
from hooked_vlm.families.decoder import decoder_config
from hooked_vlm.families.qwen3_vl import FAMILY
from hooked_vlm.families.qwen_vl.model import HookedQwenVL, VisionPlan
from hooked_vlm.layout import TokenLayout
from hooked_vlm.model import LMInput

#: Qwen3 decoder norms: two per layer plus QK-norm (the rest maps as in any decoder).
QWEN3_NORMS: dict[str, str] = {
    "input_layernorm.weight": "ln1.w",
    "post_attention_layernorm.weight": "ln2.w",
    "self_attn.q_norm.weight": "attn.q_norm.w",
    "self_attn.k_norm.weight": "attn.k_norm.w",
}


@dataclass(frozen=True)
class Qwen3VisionSpec:
    """The vision tower's shape, read from ``Qwen3VLVisionConfig``."""

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
    n_positions: int  # learned position table: a side x side square
    deepstack: tuple[int, ...]  # vision blocks whose outputs feed DeepStack mergers
    window_size: int = 0  # no window attention (read by build_vision_plan)

    @classmethod
    def from_hf_dict(cls, v: dict[str, Any]) -> "Qwen3VisionSpec":
        patch, temporal = v["patch_size"], v["temporal_patch_size"]
        if not isinstance(patch, int) or not isinstance(temporal, int):
            raise NotImplementedError(f"non-square patch sizes are not supported (patch_size={patch}, temporal_patch_size={temporal})")
        spec = cls(
            width=v["hidden_size"], out_width=v["out_hidden_size"], depth=v["depth"], n_heads=v["num_heads"],
            d_mlp=v["intermediate_size"], act=v["hidden_act"], patch_size=patch, merge=v["spatial_merge_size"],
            temporal_patch_size=temporal, in_channels=v.get("in_channels", 3),
            rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            n_positions=v["num_position_embeddings"], deepstack=tuple(v.get("deepstack_visual_indexes") or ()),
        )
        if spec.side**2 != spec.n_positions:
            raise NotImplementedError(f"num_position_embeddings={spec.n_positions} is not a square grid")
        bad = [i for i in spec.deepstack if not 0 <= i < spec.depth]
        if bad:
            raise ValueError(f"deepstack_visual_indexes {bad} name no vision block (depth {spec.depth})")
        return spec

    @property
    def side(self) -> int:
        return int(round(self.n_positions**0.5))

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


class Qwen3PatchMerger(nn.Module):
    """LayerNorm, concatenate each merge x merge block of patches, Linear-GELU-Linear to the LM width.

    ``postshuffle`` (the DeepStack mergers): the LayerNorm runs on the concatenated block instead of each patch.
    Hooks: ``norm.*``, ``hook_in [B, M, merge^2 * width]`` (what enters the MLP), ``mlp.hook_pre`` / ``hook_post``.
    """

    def __init__(self, spec: Qwen3VisionSpec, postshuffle: bool):
        super().__init__()
        hidden = spec.width * spec.merge**2
        self.postshuffle = postshuffle
        self.norm = LayerNorm(hidden if postshuffle else spec.width, 1e-6)
        self.mlp = MLP(hidden, hidden, act="gelu", bias=True, d_out=spec.out_width)
        self.hook_in = HookPoint()

    def forward(self, x: Float[Tensor, "batch n width"], merge_index: Int[Tensor, "batch m k"]) -> Float[Tensor, "batch m out"]:
        if not self.postshuffle:
            x = self.norm(x)
        b, m, k = merge_index.shape
        grouped = torch.gather(x, 1, merge_index.reshape(b, m * k, 1).expand(-1, -1, x.shape[-1])).reshape(b, m, k * x.shape[-1])
        if self.postshuffle:
            grouped = self.norm(grouped)
        return self.mlp(self.hook_in(grouped))


def bilinear_taps(index: Tensor, size: Tensor, side: int) -> tuple[Int[Tensor, "n 2"], Float[Tensor, "n 2"]]:
    """The two table rows and weights that resample ``side`` learned positions to ``size`` positions along one
    axis (``align_corners=True``: the first and last patch sit exactly on the first and last table entry)."""
    src = index.float() * (side - 1) / (size - 1).clamp(min=1).float()
    floor = src.floor()
    offsets = torch.arange(2, device=index.device)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


class Qwen3VisionTower(nn.Module):
    """Patch embedding + resampled position table -> ViT blocks (2-D rotary, block-diagonal per image / slice)
    -> patch merger, with DeepStack mergers after the blocks in ``spec.deepstack``.

    Hooks (batch-first, one row per prompt, patches in raster order of each item's grid): ``hook_patch_embed``
    / ``hook_pos_embed`` / ``hook_embed`` ``[B, N, width]``, ``blocks.{j}.*``, ``merger.*``,
    ``deepstack_merger_list.{k}.*`` and ``hook_out`` ``[B, M, d_model]`` (fired by the model when it injects).
    """

    def __init__(self, spec: Qwen3VisionSpec):
        super().__init__()
        self.spec = spec
        self.patch_embed = nn.Linear(spec.patch_dim, spec.width, bias=True)
        self.hook_patch_embed = HookPoint()
        self.pos_embed = nn.Embedding(spec.n_positions, spec.width)
        self.hook_pos_embed = HookPoint()
        self.hook_embed = HookPoint()
        d_head = spec.width // spec.n_heads
        self.register_buffer("inv_freq", inverse_frequencies(d_head // 2, spec.rope_theta), persistent=False)
        self.blocks = nn.ModuleList([self._block(i) for i in range(spec.depth)])
        self.merger = Qwen3PatchMerger(spec, postshuffle=False)
        self.deepstack_merger_list = nn.ModuleList([Qwen3PatchMerger(spec, postshuffle=True) for _ in spec.deepstack])
        self.hook_out = HookPoint()

    def _block(self, index: int) -> TransformerBlock:
        s = self.spec
        attn = Attention(s.width, s.n_heads, s.n_heads, s.width // s.n_heads, qkv_bias=True, o_bias=True, rotary_in_fp32=True, layer_index=index)
        return TransformerBlock(LayerNorm(s.width, 1e-6), attn, LayerNorm(s.width, 1e-6), MLP(s.width, s.d_mlp, s.act, bias=True))

    def position_embeddings(self, hw: Int[Tensor, "batch n 2"], sizes: Int[Tensor, "batch n 2"]) -> Float[Tensor, "batch n width"]:
        """The learned table resampled to each patch's (row, col) in its item's (h, w) grid (4-tap bilinear)."""
        side = self.spec.side
        b, n = hw.shape[:2]
        h_taps, h_w = bilinear_taps(hw[..., 0].reshape(-1), sizes[..., 0].reshape(-1), side)
        w_taps, w_w = bilinear_taps(hw[..., 1].reshape(-1), sizes[..., 1].reshape(-1), side)
        index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
        weight = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
        return (self.pos_embed(index) * weight[..., None]).sum(1).reshape(b, n, -1)

    def forward(
        self, pixels: Float[Tensor, "rows patch_dim"], plan: VisionPlan, sizes: Int[Tensor, "batch n 2"]
    ) -> tuple[Float[Tensor, "batch m d_model"], list[Float[Tensor, "batch m d_model"]]]:
        """(merged features, DeepStack features in ``spec.deepstack`` order), zero at padding slots."""
        dtype = self.patch_embed.weight.dtype
        x = pixels.to(dtype)[plan.src] * plan.valid[..., None].to(dtype)
        x = self.hook_patch_embed(self.patch_embed(x))
        x = self.hook_embed(x + self.hook_pos_embed(self.position_embeddings(plan.hw, sizes).to(x.dtype)))
        cos, sin = vision_2d_cos_sin(plan.hw, self.inv_freq)
        keep = plan.merged_valid[..., None].to(dtype)
        deepstack = []
        for j, block in enumerate(self.blocks):
            x = block(x, cos, sin, plan.full_mask)
            if j in self.spec.deepstack:
                deepstack.append(self.deepstack_merger_list[self.spec.deepstack.index(j)](x, plan.merge_index) * keep)
        return self.merger(x, plan.merge_index) * keep, deepstack


def interleaved_mrope_cos_sin(
    position_ids: Int[Tensor, "3 batch pos"], inv_freq: Tensor, mrope_section: list[int]
) -> tuple[Float[Tensor, "batch pos d_head"], Float[Tensor, "batch pos d_head"]]:
    """Qwen3-VL interleaved M-RoPE: frequency ``j`` takes the H angle when ``j % 3 == 1`` and ``j < 3 * s_H``, the
    W angle when ``j % 3 == 2`` and ``j < 3 * s_W``, the T angle otherwise; then duplicated as standard RoPE."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # 3 B L half
    j = torch.arange(freqs.shape[-1], device=freqs.device)
    axis = torch.zeros_like(j)
    axis[(j % 3 == 1) & (j < 3 * mrope_section[1])] = 1
    axis[(j % 3 == 2) & (j < 3 * mrope_section[2])] = 2
    mixed = torch.gather(freqs, 0, axis.view(1, 1, 1, -1).expand(1, *freqs.shape[1:]))[0]
    emb = torch.cat((mixed, mixed), dim=-1)
    return emb.cos(), emb.sin()


class HookedQwen3VL(HookedQwenVL):
    """Qwen3-VL (dense) with hooks on both towers, the DeepStack mergers and each DeepStack injection.

    A Qwen-VL model (:class:`HookedQwenVL`: token ids, position ids, the vision plan, weight names, generation)
    with its own vision tower (resampled position table, DeepStack mergers), the Qwen3 decoder (the shared
    :class:`~hooked_vlm.families.decoder.DecoderSpec`), interleaved M-RoPE, timestamped video slices and the
    DeepStack additions after the first blocks."""

    hf_architectures = ("Qwen3VLForConditionalGeneration",)
    input_names = FAMILY.input_schema.names
    #: what DeepStack adds after each of the first blocks (listed by ActivationCache.decompose_resid)
    extra_residual_hooks = ("hook_deepstack",)
    default_rope_theta = 5e6
    default_mrope_section = (24, 20, 20)
    decoder_norm_names = QWEN3_NORMS

    # ----- configuration ---------------------------------------------------------------------------------
    @classmethod
    def config_from_hf(cls, hf_config: Any) -> HookedVLMConfig:
        d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
        t = d["text_config"]
        rope = t.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise NotImplementedError(f"rope_type {rope.get('rope_type')!r} is not supported yet (only default interleaved M-RoPE)")
        Qwen3VisionSpec.from_hf_dict(d["vision_config"])  # validates the geometry early
        return decoder_config(t, "qwen3_vl", "Qwen3VLForConditionalGeneration", d,
                              tie_word_embeddings=bool(d.get("tie_word_embeddings", False)))

    @property
    def n_deepstack(self) -> int:
        """How many LM blocks (the first ones) receive DeepStack features."""
        return min(len(self.vision_spec.deepstack), self.cfg.n_layers)

    def _build_vision(self) -> nn.Module:
        return Qwen3VisionTower(Qwen3VisionSpec.from_hf_dict(self.cfg.hf_config["vision_config"]))

    def _build_block(self, index: int) -> TransformerBlock:
        """The shared Qwen3 decoder block, plus ``hook_deepstack`` on the blocks that receive DeepStack features."""
        block = super()._build_block(index)
        if index < len(self.vision.spec.deepstack):
            block.hook_deepstack = HookPoint()  # what DeepStack adds after this block [B, L, d_model]
        return block

    # ----- weights (HookedQwenVL.convert_hf_state_dict: both layouts, Qwen3 norm names) ------------------
    @classmethod
    def _unexpected_key(cls, k: str) -> None:
        raise KeyError(f"unexpected Qwen3-VL weight {k!r}")

    @staticmethod
    def _convert_vision_key(k: str, v: Tensor) -> dict[str, Tensor]:
        return _convert_vision_key(k, v)

    # ----- the steps of the forward skeleton that differ (HookedVLM._prepare runs them) --------------------
    def _check_inputs(self, inputs: dict[str, Any], past: int) -> None:
        from hooked_vlm.families.qwen3_vl.layout import check_common_inputs

        check_common_inputs(self, inputs, past)

    def _layout(self, inputs: dict[str, Any]) -> TokenLayout:
        """Token layout of the given inputs, validated; includes transformers' M-RoPE position ids."""
        from hooked_vlm.families.qwen3_vl.layout import build_qwen3_vl_layout

        return build_qwen3_vl_layout(self, inputs)

    def _vision_features(self, inputs: dict[str, Any], layout: TokenLayout) -> tuple[Tensor, dict[str, Tensor]]:
        """Merged features and DeepStack features (``extras["deepstack.{k}"]``), one row per prompt, visual tokens in
        sequence order (zero-padded)."""
        pixels, plan = self._vision_pixels(inputs, layout)
        merged, deepstack = self.vision(pixels, plan, _patch_grid_sizes(layout, plan.src.shape[1]).to(pixels.device))
        return merged, {f"deepstack.{k}": f for k, f in enumerate(deepstack[: self.n_deepstack])}

    def _vision_output(self, inputs: dict[str, Any], layout: TokenLayout) -> tuple[Tensor, dict[str, Tensor]]:
        """As every family, except that ``vision_features=`` replaces only the merged features: the DeepStack
        features still come from the tower, so the pixel inputs must be given too."""
        if inputs.get("vision_features") is None:
            return super()._vision_output(inputs, layout)
        if all(inputs.get(k) is None for k in ("pixel_values", "pixel_values_videos")):
            from hooked_vlm.families.qwen3_vl.layout import DEEPSTACK_NEEDS_PIXELS

            raise InputError(DEEPSTACK_NEEDS_PIXELS)
        feats, _ = super()._vision_output(inputs, layout)
        _, extras = self._vision_features({k: v for k, v in inputs.items() if k != "vision_features"}, layout)
        return feats, extras

    def _layers_reading_vision(self) -> int:
        """Blocks 0..n_deepstack-1 add the DeepStack features after them (see :meth:`_after_block`)."""
        return self.n_deepstack

    def _after_block(self, index: int, resid: Float[Tensor, "batch pos d_model"], prep: LMInput) -> Float[Tensor, "batch pos d_model"]:
        """After block ``k < n_deepstack``: add the k-th DeepStack features at the visual positions (zeros elsewhere,
        and everywhere when the input has no visual tokens), through ``blocks.{k}.hook_deepstack``."""
        if index >= self.n_deepstack:
            return resid
        add = torch.zeros_like(resid)
        feats = prep.vision_extras.get(f"deepstack.{index}")
        if feats is not None and prep.layout is not None:
            full = torch.zeros(*prep.layout.item.shape, resid.shape[-1], dtype=resid.dtype, device=resid.device)
            for bi in range(full.shape[0]):
                pos = (prep.layout.item[bi] >= 0).nonzero().flatten()
                full[bi, pos] = feats[bi, : pos.numel()].to(resid.dtype)
            add = full[:, full.shape[1] - resid.shape[1] :]
        return resid + self.blocks[index].hook_deepstack(add)

    def _rotary_tables(self, positions: Tensor, masks: dict) -> dict[str, tuple[Tensor, Tensor]]:
        cos_sin = interleaved_mrope_cos_sin(positions, self.inv_freq, self.mrope_section)
        return {kind: cos_sin for kind in masks}


def _patch_grid_sizes(layout: TokenLayout, n_max: int) -> Int[Tensor, "batch n 2"]:
    """For each (prompt, patch) slot of the batch-first vision rows, its item's patch-grid (h, w) (1 x 1 at padding)."""
    sizes = torch.ones(layout.batch_size, max(n_max, 1), 2, dtype=torch.long)
    for it in layout.items:
        _, h, w = it.grid_thw
        sizes[it.batch, it.vision_offset : it.vision_offset + it.n_patches] = torch.tensor([h, w])
    return sizes


def _convert_vision_key(k: str, v: Tensor) -> dict[str, Tensor]:
    if k == "patch_embed.proj.weight":
        return {"vision.patch_embed.weight": v.reshape(v.shape[0], -1)}
    if k == "patch_embed.proj.bias":
        return {"vision.patch_embed.bias": v}
    if k == "pos_embed.weight":
        return {"vision.pos_embed.weight": v}
    if k.startswith(("merger.", "deepstack_merger_list.")):
        head, rest = k.split(".", 1) if k.startswith("merger.") else (".".join(k.split(".")[:2]), k.split(".", 2)[2])
        rest = {"norm.weight": "norm.w", "norm.bias": "norm.b"}.get(rest, rest)
        rest = rest.replace("linear_fc1.", "mlp.fc1.").replace("linear_fc2.", "mlp.fc2.")
        return {f"vision.{head}.{rest}": v}
    parts = k.split(".")
    if parts[0] != "blocks":
        raise KeyError(f"unexpected Qwen3-VL vision weight {k!r}")
    pre, rest = f"vision.blocks.{parts[1]}.", ".".join(parts[2:])
    if rest.startswith(("norm1.", "norm2.")):
        return {pre + ("ln1." if rest.startswith("norm1.") else "ln2.") + ("w" if rest.endswith("weight") else "b"): v}
    if rest.startswith("attn.qkv."):
        q, kk, vv = v.chunk(3, dim=0)
        kind = rest.split(".")[-1]
        return {pre + f"attn.q_proj.{kind}": q, pre + f"attn.k_proj.{kind}": kk, pre + f"attn.v_proj.{kind}": vv}
    if rest.startswith("attn.proj."):
        return {pre + "attn.o_proj." + rest.split(".")[-1]: v}
    if rest.startswith("mlp."):
        return {pre + rest.replace("linear_fc1.", "fc1.").replace("linear_fc2.", "fc2."): v}
    raise KeyError(f"unexpected Qwen3-VL vision weight {k!r}")


__all__ = ["HookedQwen3VL", "Qwen3VisionTower", "Qwen3VisionSpec", "Qwen3PatchMerger", "interleaved_mrope_cos_sin", "QWEN3_NORMS"]
