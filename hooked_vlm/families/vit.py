"""Hooked CLIP and SigLIP vision towers (the ViTs inside CLIP, SigLIP, LLaVA, LLaVA-NeXT/OneVision and Gemma 3).

Architecture, as in transformers' ``CLIPVisionModel`` and ``SiglipVisionModel``:

* CLIP: a convolutional patch embedding without bias, a learned ``[CLS]`` token in front of the patches,
  learned absolute position embeddings, ``pre_layrnorm``, pre-LN encoder layers (q/k/v/out with bias,
  ``quick_gelu`` MLP), and ``post_layernorm`` applied to the ``[CLS]`` token only (the pooled output).
* SigLIP: a convolutional patch embedding with bias, no ``[CLS]``, no pre-LN, ``gelu_pytorch_tanh``,
  ``post_layernorm`` on every token, and an optional multihead-attention-pooling ("MAP") head: a learned
  probe token cross-attends to the patches, followed by a residual MLP.

Both are non-causal (``MaskSpec(causal=False)``) and built from the shared ``TransformerBlock`` /
``Attention`` / ``MLP`` / ``LayerNorm``, so every block carries the usual hook points, batch-first
``[B_images, N, d]`` with patches in raster order (after the ``[CLS]`` token for CLIP).

Hidden states follow transformers' ``hidden_states`` exactly: index 0 is the input to block 0 (after
``pre_layrnorm`` for CLIP), index ``i`` the output of block ``i - 1``, and the last index the raw output of the
last block **without** ``post_layernorm``. Selected hidden states are read back *after* every hook at that
point of the residual stream, so editing a block's output (or the next block's ``hook_resid_pre``) changes
the features a LLaVA projector reads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vlm.components.attention import Attention
from hooked_vlm.components.block import TransformerBlock
from hooked_vlm.components.mlp import MLP
from hooked_vlm.components.norms import LayerNorm
from kernels.mask import MaskSpec

#: The mask of every ViT attention call: all patches see all patches.
FULL_VISIBILITY = MaskSpec(causal=False)


def _config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"expected a transformers vision config or a dict, got {type(config).__name__}")


def encoder_shape(d: dict[str, Any]) -> dict[str, Any]:
    """The transformer shape of a CLIP / SigLIP tower config (``width``, ``depth``, ``n_heads``, ``d_mlp``, ``act``,
    ``eps``), shared by the vision and text specs."""
    return dict(
        width=d["hidden_size"], depth=d["num_hidden_layers"], n_heads=d["num_attention_heads"],
        d_mlp=d["intermediate_size"], act=d["hidden_act"], eps=d["layer_norm_eps"],
    )


@dataclass(frozen=True)
class ViTSpec:
    """The shape of a CLIP or SigLIP vision tower, read from its transformers vision config."""

    kind: str  # "clip" | "siglip"
    width: int
    depth: int
    n_heads: int
    d_mlp: int
    act: str
    eps: float
    image_size: int
    patch_size: int
    in_channels: int = 3
    use_head: bool = False  # SigLIP MAP head

    @classmethod
    def from_hf_config(cls, config: Any, kind: str | None = None) -> "ViTSpec":
        """From a ``CLIPVisionConfig`` / ``SiglipVisionConfig`` (or its ``to_dict()``).

        ``kind`` is inferred from ``model_type`` (``clip_vision_model`` / ``siglip_vision_model``) unless given.
        """
        d = _config_dict(config)
        if kind is None:
            mt = str(d.get("model_type", ""))
            if mt.startswith("siglip2"):
                raise NotImplementedError("SigLIP2 (NaFlex patch embeddings) is not supported by HookedViT")
            if "siglip" in mt:
                kind = "siglip"
            elif "clip" in mt:
                kind = "clip"
            else:
                raise ValueError(f"cannot tell CLIP from SigLIP for vision config model_type {mt!r}; pass kind=")
        if kind not in ("clip", "siglip"):
            raise ValueError(f"kind must be 'clip' or 'siglip', got {kind!r}")
        return cls(
            kind=kind,
            **encoder_shape(d),
            image_size=d["image_size"],
            patch_size=d["patch_size"],
            in_channels=d.get("num_channels", 3),
            use_head=bool(d.get("vision_use_head", True)) if kind == "siglip" else False,
        )

    @property
    def has_cls(self) -> bool:
        return self.kind == "clip"

    @property
    def grid(self) -> int:
        """Patches per side at the native resolution."""
        return self.image_size // self.patch_size

    @property
    def n_positions(self) -> int:
        """Tokens per image at the native resolution (patches, plus ``[CLS]`` for CLIP)."""
        return self.grid**2 + int(self.has_cls)

    @property
    def d_head(self) -> int:
        return self.width // self.n_heads


@dataclass
class ViTOutput:
    """What one tower forward returns (transformers' ``BaseModelOutputWithPooling`` fields, plus selection).

    ``last_hidden_state``: CLIP the raw last block output; SigLIP after ``post_layernorm`` (as transformers).
    ``pooler_output``: CLIP ``post_layernorm([CLS])``; SigLIP the MAP head output (None without a head).
    ``hidden_states``: the requested transformers hidden states, keyed by non-negative index (0..depth).
    """

    last_hidden_state: Float[Tensor, "batch n d"] | None
    pooler_output: Float[Tensor, "batch d"] | None
    hidden_states: dict[int, Float[Tensor, "batch n d"]] = field(default_factory=dict)

    def select(self, feature_layer: int | Sequence[int], depth: int) -> Float[Tensor, "batch n d_cat"]:
        """``hidden_states[feature_layer]``, or the concatenation along the width of a list of layers."""
        if isinstance(feature_layer, int):
            return self.hidden_states[normalize_layer(feature_layer, depth)]
        return torch.cat([self.hidden_states[normalize_layer(i, depth)] for i in feature_layer], dim=-1)


def normalize_layer(index: int, depth: int) -> int:
    """A transformers hidden-state index (negative allowed) as 0..depth."""
    n = depth + 1
    if not -n <= index < n:
        raise IndexError(f"hidden-state index {index} is out of range for a {depth}-block tower ({n} hidden states)")
    return index % n


def select_image_features(
    out: ViTOutput, vision_feature_layer: int | Sequence[int], strategy: str, depth: int
) -> Float[Tensor, "batch n d_cat"]:
    """LLaVA's feature selection (``LlavaModel.get_image_features``): one layer or a width-concatenation of
    several; ``"default"`` drops the ``[CLS]`` token (from each layer, before concatenating), ``"full"`` keeps it."""
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
    layers = [vision_feature_layer] if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
    parts = [out.hidden_states[normalize_layer(i, depth)] for i in layers]
    if strategy == "default":
        parts = [p[:, 1:] for p in parts]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


class ProbeAttention(Attention):
    """The shared :class:`Attention` with queries from one sequence and keys / values from another.

    Used by SigLIP's MAP head (a learned probe attends to the patches). Same projections, hook points
    (``hook_q [B, Lq, H, dh]``, ``hook_k`` / ``hook_v [B, N, H, dh]``, ``hook_attn_scores`` / ``hook_pattern``
    ``[B, H, Lq, N]`` only when asked for, ``hook_z``, opt-in ``hook_result``) and SDPA / pattern paths.
    """

    def forward(  # type: ignore[override]
        self,
        queries: Float[Tensor, "batch q d_model"],
        keys_values: Float[Tensor, "batch k d_model"],
        mask: MaskSpec = FULL_VISIBILITY,
    ) -> Float[Tensor, "batch q d_model"]:
        b, lq, _ = queries.shape
        lk = keys_values.shape[1]
        q = self.hook_q(self.q_proj(queries).view(b, lq, self.n_heads, self.d_head))
        k = self.hook_k(self.k_proj(keys_values).view(b, lk, self.n_kv_heads, self.d_head))
        v = self.hook_v(self.v_proj(keys_values).view(b, lk, self.n_kv_heads, self.d_head))
        q, k = self.hook_rot_q(q), self.hook_rot_k(k)  # no rotary: identical to hook_q / hook_k
        z = self._pattern_path(q, k, v, mask) if self.wants_pattern() else self._fast_path(q, k, v, mask)
        z = self.hook_z(z)
        if self.use_attn_result:
            w = rearrange(self.o_proj.weight, "d (h dh) -> h dh d", h=self.n_heads)
            result = self.hook_result(einsum(z, w, "b l h dh, h dh d -> b l h d"))
            return result.sum(dim=2) + self.b_O
        return self.o_proj(z.reshape(b, lq, -1))


class AttentionPoolingHead(nn.Module):
    """SigLIP's multihead attention pooling: ``x = attn(probe, h); x = x + mlp(ln(x)); return x[:, 0]``.

    Reimplements ``SiglipMultiheadAttentionPoolingHead`` (an ``nn.MultiheadAttention`` with a learned probe)
    with hook points: ``head.attn.*`` (see :class:`ProbeAttention`), ``head.hook_attn_out [B, 1, d]``,
    ``head.ln.*``, ``head.mlp.hook_pre`` / ``hook_post [B, 1, m]``, ``head.hook_mlp_out`` and
    ``head.hook_resid_post [B, 1, d]``.
    """

    def __init__(self, spec: ViTSpec):
        super().__init__()
        w = spec.width
        self.probe = nn.Parameter(torch.zeros(1, 1, w))
        self.attn = ProbeAttention(w, spec.n_heads, spec.n_heads, spec.d_head, qkv_bias=True, o_bias=True)
        self.ln = LayerNorm(w, spec.eps)
        self.mlp = MLP(w, spec.d_mlp, spec.act, bias=True)
        self.hook_attn_out = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, x: Float[Tensor, "batch n d"]) -> Float[Tensor, "batch d"]:
        probe = self.probe.expand(x.shape[0], -1, -1).to(x.dtype)
        h = self.hook_attn_out(self.attn(probe, x))
        h = self.hook_resid_post(h + self.hook_mlp_out(self.mlp(self.ln(h))))
        return h[:, 0]


class HookedViT(nn.Module):
    """A CLIP or SigLIP vision tower with a hook on every site.

    Hook names (relative to where the tower is mounted, e.g. ``vision.`` in a two-tower model):

    ============================== ============= ==========================================================
    ``hook_patch_embed``            B Np d        conv patch embedding, raster order (no ``[CLS]``)
    ``hook_pos_embed``              B N d         position embedding added (``[CLS]`` position first for CLIP)
    ``ln_pre.hook_scale/normalized``  B N 1 / B N d  CLIP only: ``pre_layrnorm``
    ``hook_embed``                  B N d         what enters block 0 (= transformers ``hidden_states[0]``)
    ``blocks.{j}.*``                              the shared block hooks (``attn.hook_pattern [B, H, N, N]`` ...)
    ``ln_post.hook_scale/normalized``  B 1 1 / B 1 d (CLIP, on ``[CLS]``) or B N 1 / B N d (SigLIP)
    ``hook_last_hidden``            B N d         transformers ``last_hidden_state`` (SigLIP post-LN; CLIP raw)
    ``head.*``                                    SigLIP MAP head (see :class:`AttentionPoolingHead`)
    ``hook_pooled``                 B d           transformers ``pooler_output`` (CLIP post-LN ``[CLS]``; SigLIP head)
    ============================== ============= ==========================================================

    ``N`` = patches (+1 for CLIP's ``[CLS]``), ``Np`` = patches.
    """

    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.spec = spec
        w = spec.width
        self.patch_embed = nn.Conv2d(spec.in_channels, w, spec.patch_size, stride=spec.patch_size, bias=spec.kind == "siglip")
        if spec.has_cls:
            self.class_embedding = nn.Parameter(torch.zeros(w))
        self.pos_embed = nn.Embedding(spec.n_positions, w)
        self.hook_patch_embed = HookPoint()
        self.hook_pos_embed = HookPoint()
        self.ln_pre = LayerNorm(w, spec.eps) if spec.kind == "clip" else None
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList([self._block(j) for j in range(spec.depth)])
        self.ln_post = LayerNorm(w, spec.eps)
        self.hook_last_hidden = HookPoint()
        self.head = AttentionPoolingHead(spec) if spec.use_head else None
        self.hook_pooled = HookPoint()

    @classmethod
    def from_hf_config(cls, config: Any, kind: str | None = None) -> "HookedViT":
        """An (uninitialised) tower shaped like a ``CLIPVisionConfig`` / ``SiglipVisionConfig``."""
        return cls(ViTSpec.from_hf_config(config, kind))

    def _block(self, index: int) -> TransformerBlock:
        s = self.spec
        attn = Attention(s.width, s.n_heads, s.n_heads, s.d_head, qkv_bias=True, o_bias=True, layer_index=index)
        return TransformerBlock(LayerNorm(s.width, s.eps), attn, LayerNorm(s.width, s.eps), MLP(s.width, s.d_mlp, s.act, bias=True))

    # ----- hidden-state bookkeeping ----------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return self.spec.depth

    def hidden_state_hook_name(self, index: int) -> str:
        """Relative name of the hook whose (edited) value is transformers' ``hidden_states[index]``.

        ``index < depth``: ``blocks.{index}.hook_resid_pre`` (which fires right after
        ``blocks.{index-1}.hook_resid_post`` / ``hook_embed`` with the same value); ``index == depth``
        (or -1): ``blocks.{depth-1}.hook_resid_post``.
        """
        i = normalize_layer(index, self.depth)
        return f"blocks.{i}.hook_resid_pre" if i < self.depth else f"blocks.{self.depth - 1}.hook_resid_post"

    # ----- forward -------------------------------------------------------------------------------------
    def embed(self, pixel_values: Float[Tensor, "batch channels height width"], interpolate_pos_encoding: bool = False) -> Float[Tensor, "batch n d"]:
        """Patch + position embeddings (+ ``pre_layrnorm`` for CLIP): the input to block 0 (``hook_embed``)."""
        s = self.spec
        _, _, height, width = pixel_values.shape
        if not interpolate_pos_encoding and s.kind == "clip" and (height != s.image_size or width != s.image_size):
            raise ValueError(
                f"Input image size ({height}*{width}) doesn't match model ({s.image_size}*{s.image_size}); "
                "pass interpolate_pos_encoding=True to resize the position embeddings"
            )
        patches = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        x = self.hook_patch_embed(rearrange(patches, "b d gh gw -> b (gh gw) d"))
        if s.has_cls:
            x = torch.cat([self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        pos = self._position_embeddings(x.shape[1], height, width, interpolate_pos_encoding)
        x = x + self.hook_pos_embed(pos.to(x.dtype).expand(x.shape[0], -1, -1))
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        return self.hook_embed(x)

    def _position_embeddings(self, n_tokens: int, height: int, width: int, interpolate: bool) -> Float[Tensor, "1 n d"]:
        """Learned position table, bicubically resized as transformers' ``interpolate_pos_encoding`` when asked."""
        table = self.pos_embed.weight[None]  # 1 P d
        n_cls = int(self.spec.has_cls)
        if not interpolate or (n_tokens == table.shape[1] and height == width):
            return table
        cls_pos, patch_pos = table[:, :n_cls], table[:, n_cls:]
        side = int(math.sqrt(patch_pos.shape[1]))
        grid = rearrange(patch_pos, "1 (h w) d -> 1 d h w", h=side, w=side)
        grid = F.interpolate(grid, size=(height // self.spec.patch_size, width // self.spec.patch_size), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, rearrange(grid, "1 d h w -> 1 (h w) d")], dim=1)

    def forward(
        self,
        pixel_values: Float[Tensor, "batch channels height width"],
        feature_layers: int | Sequence[int] | None = None,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        truncate: bool = False,
    ) -> ViTOutput:
        """Run the tower on ``pixel_values`` (the processor's tensor, one row per image).

        ``feature_layers`` (an index or a list, negative allowed, as ``vision_feature_layer``) or
        ``output_hidden_states=True`` (all ``depth + 1``) fill ``ViTOutput.hidden_states`` with transformers'
        hidden states, read after every hook at that point. ``truncate=True`` stops after the deepest
        requested layer (skipping later blocks, ``post_layernorm`` and the head; their hooks do not fire and
        ``last_hidden_state`` / ``pooler_output`` are None); transformers always runs every block, so the
        default runs them all.
        """
        n = self.depth
        if output_hidden_states:
            wanted = set(range(n + 1))
        elif feature_layers is None:
            wanted = set()
        elif isinstance(feature_layers, int):
            wanted = {normalize_layer(feature_layers, n)}
        else:
            wanted = {normalize_layer(i, n) for i in feature_layers}
        last_block = (max(wanted) if wanted else n) if truncate else n
        x = self.embed(pixel_values, interpolate_pos_encoding)
        x, states = run_blocks(self.blocks, x, FULL_VISIBILITY, wanted, last_block)
        if truncate and last_block < n:
            return ViTOutput(None, None, states)
        return self._finish(x, states)

    def _finish(self, x: Float[Tensor, "batch n d"], states: dict[int, Tensor]) -> ViTOutput:
        if self.spec.kind == "clip":
            last = self.hook_last_hidden(x)
            pooled = self.hook_pooled(self.ln_post(last[:, :1])[:, 0])
            return ViTOutput(last, pooled, states)
        last = self.hook_last_hidden(self.ln_post(x))
        pooled = self.hook_pooled(self.head(last)) if self.head is not None else None
        return ViTOutput(last, pooled, states)


def run_blocks(
    blocks: Sequence[TransformerBlock],
    x: Float[Tensor, "batch n d"],
    mask: MaskSpec,
    wanted: set[int],
    n_run: int | None = None,
) -> tuple[Float[Tensor, "batch n d"], dict[int, Float[Tensor, "batch n d"]]]:
    """Run the first ``n_run`` blocks (all by default) without rotary; also return the transformers hidden
    states whose indices are in ``wanted``, each read after every hook at that point of the residual.

    ``hidden_states[i]`` for ``i < n_run`` is the output of ``blocks[i].hook_resid_pre``, captured by a torch
    forward hook registered here, i.e. after any hook a user attached before the forward, so an edit of that
    hook, of ``blocks[i-1]`` or of the embedding is part of what is returned; ``hidden_states[n_run]`` is the
    residual after the last block run.
    """
    n_run = len(blocks) if n_run is None else n_run
    states: dict[int, Tensor] = {}
    handles = [
        blocks[i].hook_resid_pre.register_forward_hook(_store_output(states, i)) for i in sorted(wanted) if i < n_run
    ]
    try:
        for j in range(n_run):
            x = blocks[j](x, None, None, mask)
    finally:
        for h in handles:
            h.remove()
    if n_run in wanted:
        states[n_run] = x
    return x, {i: states[i] for i in sorted(wanted) if i in states}


def _store_output(store: dict[int, Tensor], index: int):
    def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
        store[index] = output

    return hook


# ----- weights -----------------------------------------------------------------------------------------------
_LAYER_TABLE = {
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.out_proj": "attn.o_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_NORM_SUFFIX = {"weight": "w", "bias": "b"}


def convert_vit_state_dict(sd: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Map a transformers CLIP / SigLIP vision tower's weights to :class:`HookedViT` names (relative).

    Takes the keys under ``prefix`` (e.g. ``"vision_model."`` in ``CLIPModel``, ``"model.vision_tower."`` in
    ``LlavaForConditionalGeneration``; an extra leading ``vision_model.`` is stripped, so both the in-memory
    and the on-disk layouts work) and ignores every other key. Unknown keys under ``prefix`` raise KeyError.
    """
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        k = key[len(prefix) :]
        if k.startswith("vision_model."):
            k = k[len("vision_model.") :]
        if k.endswith("position_ids"):  # a non-persistent buffer some older checkpoints still carry
            continue
        out.update(_convert_vit_key(k, value))
    return out


def _convert_vit_key(k: str, v: Tensor) -> dict[str, Tensor]:
    simple = {
        "embeddings.class_embedding": "class_embedding",
        "embeddings.patch_embedding.weight": "patch_embed.weight",
        "embeddings.patch_embedding.bias": "patch_embed.bias",
        "embeddings.position_embedding.weight": "pos_embed.weight",
        "head.probe": "head.probe",
    }
    if k in simple:
        return {simple[k]: v}
    for hf, ours in (("pre_layrnorm.", "ln_pre."), ("post_layernorm.", "ln_post."), ("head.layernorm.", "head.ln.")):
        if k.startswith(hf):
            return {ours + _NORM_SUFFIX[k[len(hf) :]]: v}
    if k.startswith("head.mlp."):
        return {k: v}
    if k.startswith("head.attention."):
        rest = k[len("head.attention.") :]
        if rest in ("in_proj_weight", "in_proj_bias"):
            kind = "weight" if rest.endswith("weight") else "bias"
            q, kk, vv = v.chunk(3, dim=0)
            return {f"head.attn.q_proj.{kind}": q, f"head.attn.k_proj.{kind}": kk, f"head.attn.v_proj.{kind}": vv}
        if rest.startswith("out_proj."):
            return {"head.attn.o_proj." + rest[len("out_proj.") :]: v}
    if k.startswith("encoder.layers."):
        parts = k.split(".")
        j, rest = parts[2], ".".join(parts[3:])
        pre = f"blocks.{j}."
        for norm, ours in (("layer_norm1.", "ln1."), ("layer_norm2.", "ln2.")):
            if rest.startswith(norm):
                return {pre + ours + _NORM_SUFFIX[rest[len(norm) :]]: v}
        module, _, param = rest.rpartition(".")
        if module in _LAYER_TABLE:
            return {pre + _LAYER_TABLE[module] + "." + param: v}
    raise KeyError(f"unexpected CLIP/SigLIP vision weight {k!r}")


def load_vit_from_hf(tower: HookedViT, sd: Mapping[str, Tensor], prefix: str = "") -> HookedViT:
    """Load transformers-named weights (under ``prefix``) into ``tower`` strictly; returns the tower."""
    ours = convert_vit_state_dict(sd, prefix)
    tower.load_state_dict(ours, strict=True, assign=True)
    return tower


def vit_from_hf(hf_vision: nn.Module, prefix: str = "") -> HookedViT:
    """Hooked twin of an in-memory ``CLIPVisionModel`` / ``SiglipVisionModel`` (or any module holding one under
    ``prefix``, with ``hf_vision.config`` its vision config), in eval mode, same dtype and device."""
    cfg = hf_vision.config
    cfg = getattr(cfg, "vision_config", cfg)
    p = next(hf_vision.parameters())
    with torch.device("meta"):
        tower = HookedViT.from_hf_config(cfg)
    load_vit_from_hf(tower, hf_vision.state_dict(), prefix)
    return tower.to(device=p.device, dtype=p.dtype).eval()


__all__ = [
    "ViTSpec",
    "ViTOutput",
    "HookedViT",
    "AttentionPoolingHead",
    "ProbeAttention",
    "FULL_VISIBILITY",
    "normalize_layer",
    "run_blocks",
    "select_image_features",
    "convert_vit_state_dict",
    "load_vit_from_hf",
    "vit_from_hf",
]
