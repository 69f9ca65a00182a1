"""HookedVLM: a TransformerLens ``HookedRootModule`` around a reimplemented vision-language model.

The base class owns what every family shares: the language model (embedding, blocks, final norm,
unembedding), caching and hook management with helpful errors, and greedy generation with a KV cache.
A family subclass (``families/``) adds its vision tower, input validation, positions, masks and the
mapping from Hugging Face weight names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vlm.components.attention import KVCache
from hooked_vlm.components.block import TransformerBlock
from hooked_vlm.config import HookedVLMConfig
from hooked_vlm.errors import InputError
from hooked_vlm.hook_management import CheckedHooksMixin
from hooked_vlm.layout import TokenLayout
from hooked_vlm.tl_surface import TransformerLensSurface
from kernels.mask import MaskSpec

if TYPE_CHECKING:
    from hooked_vlm.families.decoder import DecoderSpec
    from hooked_vlm.families.registry import InputSchema
    from kernels.mask import Knockout

#: What ``forward`` can return (TransformerLens's return types, plus "resid": the final normalised residual).
RETURN_TYPES = ("logits", "loss", "both", "resid", None)


@dataclass
class LMInput:
    """What the language-model stack needs for one forward: embeddings, rotary tables and masks.

    ``rotary`` and ``masks`` are keyed by layer type (e.g. ``"full_attention"``, ``"sliding_attention"``);
    ``layer_types[i]`` says which one block ``i`` uses.
    """

    embeds: Float[Tensor, "batch pos d_model"]
    rotary: dict[str, tuple[Tensor, Tensor]]
    masks: dict[str, MaskSpec]
    layout: TokenLayout | None = None
    #: family-specific vision outputs besides ``vision.hook_out`` (see ``HookedVLM._vision_features``)
    vision_extras: dict[str, Tensor] = field(default_factory=dict)


class Unembed(nn.Linear):
    """The unembedding ``W_U`` with TransformerLens's ``unembed.hook_in [B, L, d]`` / ``hook_out [B, L, V]``."""

    def __init__(self, d_model: int, d_vocab: int):
        super().__init__(d_model, d_vocab, bias=False)
        self.hook_in = HookPoint()
        self.hook_out = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        return self.hook_out(super().forward(self.hook_in(x)))


class HookedVLM(TransformerLensSurface, CheckedHooksMixin):
    """A vision-language model with a named hook on every residual, attention and MLP site of both towers.

    Build one with :meth:`from_hf` (an in-memory transformers model) or :meth:`from_pretrained` (a local
    checkpoint folder in the Hugging Face layout, or a hub id when a hub is reachable). Call it with the
    keyword tensors the Hugging Face model takes; it returns logits ``[batch, seq, vocab]``.
    """

    #: Hugging Face architecture names this class reimplements (filled by each family).
    hf_architectures: ClassVar[tuple[str, ...]] = ()
    #: Keyword inputs ``forward`` accepts (besides the generic ones below).
    input_names: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask")
    generic_inputs: ClassVar[tuple[str, ...]] = (
        "position_ids", "vision_features", "return_type", "stop_at_layer", "final_positions", "start_at_layer", "resid",
    )

    def __init__(self, cfg: HookedVLMConfig):
        super().__init__()
        self.cfg = cfg
        self.decoder = self._parse_decoder()  # parsed once here, read by the blocks, embeddings, masks and rotary
        self.embed = nn.Embedding(cfg.d_vocab, cfg.d_model)
        self.hook_embed = HookPoint()
        self.vision = self._build_vision()
        self.blocks = nn.ModuleList([self._build_block(i) for i in range(cfg.n_layers)])
        self.ln_final = self._build_final_norm()
        self.unembed = Unembed(cfg.d_model, cfg.d_vocab)
        self.tokenizer: Any = None  # set by from_pretrained / set_tokenizer (to_tokens, to_str_tokens, ...)
        if cfg.tie_word_embeddings:
            self.unembed.weight = self.embed.weight
        self._register_rope()
        self._extra_hooks()
        from hooked_vlm.components.attention import share_segment_plans

        share_segment_plans(self)  # one cache of block-diagonal segment plans per model
        self.setup()

    # ----- family hooks (override) -------------------------------------------------------------------
    def _build_vision(self) -> nn.Module | None:
        return None

    def _parse_decoder(self) -> "DecoderSpec | None":
        """The language model's :class:`~hooked_vlm.families.decoder.DecoderSpec` (from ``text_config``)."""
        from hooked_vlm.families.decoder import DecoderSpec

        text = (self.cfg.hf_config or {}).get("text_config")
        return None if text is None else DecoderSpec.from_text_config(text)

    def _build_block(self, index: int) -> TransformerBlock:
        """Decoder block ``index`` as the decoder description says."""
        from hooked_vlm.families.decoder import build_decoder_block

        return build_decoder_block(self.cfg, self.decoder, index)

    def _build_final_norm(self) -> nn.Module:
        from hooked_vlm.components.norms import RMSNorm

        return RMSNorm(self.cfg.d_model, self.cfg.eps, offset=self.decoder.norm_offset)

    def _register_rope(self) -> None:
        """Inverse frequencies ``inv_freq_{layer_type}`` and attention scaling ``rope_scaling[layer_type]`` of the
        1-D RoPE, per layer type (the same tables for every type unless the decoder gives each its own)."""
        from hooked_vlm.families.decoder import rope_inverse_frequencies

        if self.decoder is None:
            return
        text = self.cfg.hf_config["text_config"]
        self.rope_scaling: dict[str, float] = {}
        shared = None if self.decoder.rope_per_layer_type else rope_inverse_frequencies(text)
        for kind in dict.fromkeys(self.cfg.layer_types):
            inv_freq, scaling = shared or rope_inverse_frequencies(text, kind)
            self.register_buffer(f"inv_freq_{kind}", inv_freq, persistent=False)
            self.rope_scaling[kind] = scaling

    def _extra_hooks(self) -> None:
        """Register family-specific top-level hook points (before ``setup``)."""

    # ----- the forward skeleton (run once here; a family overrides the steps that differ) -----------------
    def _prepare(self, inputs: dict[str, Any], cache: KVCache | None, resid: Tensor | None = None) -> LMInput:
        """Everything the blocks need: checks -> layout -> token embeddings -> vision features (``vision.hook_out``)
        injected at the visual positions -> ``hook_embed`` -> position ids -> masks -> rotary tables.

        ``resid`` (a forward from ``start_at_layer``): the residual the blocks start from; the token embeddings,
        the vision tower and ``hook_embed`` are skipped (``LMInput.embeds`` is ``resid``).

        The skeleton is the same for every family; a family overrides :meth:`_check_inputs`, :meth:`_layout`,
        :meth:`_embed_tokens`, :meth:`_vision_features`, :meth:`_position_ids`, :meth:`_attention_masks` and
        :meth:`_rotary_tables` where it differs. ``vision.hook_out`` fires here and nowhere else.
        """
        past = cache.seq_len() if cache is not None else 0
        self._check_inputs(inputs, past)
        layout = None
        if past == 0:
            layout = self._described(self._layout(inputs))
        elif any(inputs.get(k) is not None for k in self._pixel_inputs() + ("vision_features",)):
            raise InputError("pixel inputs can only be given with the prompt (prefill), not at a decode step")
        vision_extras: dict[str, Tensor] = {}
        if resid is None:
            embeds = self._embed_tokens(inputs["input_ids"])
            if layout is not None and layout.items:
                feats, vision_extras = self._vision_output(inputs, layout)
                embeds = self._inject(embeds, feats, layout)
            embeds = self.hook_embed(embeds)
        else:
            embeds = resid
        positions = self._position_ids(inputs, layout, past)
        masks = self._attention_masks(inputs, layout, past)
        return LMInput(embeds=embeds, rotary=self._rotary_tables(positions, masks), masks=masks, layout=layout,
                       vision_extras=vision_extras)

    def _check_inputs(self, inputs: dict[str, Any], past: int) -> None:
        """Validate the keyword inputs (token ids, devices, grids, options); raise :class:`InputError`."""

    def _layout(self, inputs: dict[str, Any]) -> TokenLayout:
        """The token layout of validated inputs (see :meth:`layout`)."""
        raise NotImplementedError

    def _pixel_inputs(self) -> tuple[str, ...]:
        """The pixel keyword inputs (from the family's input schema)."""
        return self.input_schema().pixels

    def _embed_tokens(self, ids: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        """Token embeddings (times the decoder's ``embed_scale``, cast to the weight dtype first, as transformers);
        ids outside the vocabulary (placeholders replaced by vision features) embed as id 0."""
        outside = (ids < 0) | (ids >= self.cfg.d_vocab)
        embeds = self.embed(ids.masked_fill(outside, 0) if bool(outside.any()) else ids)
        if self.decoder is None or self.decoder.embed_scale is None:
            return embeds
        w = self.embed.weight
        scale = torch.tensor(self.decoder.embed_scale, dtype=torch.float32).to(device=w.device, dtype=w.dtype)
        return embeds * scale

    def _vision_features(
        self, inputs: dict[str, Any], layout: TokenLayout
    ) -> Float[Tensor, "batch m d_model"] | tuple[Tensor, dict[str, Tensor]]:
        """Run the vision tower (and projector): one row per prompt, one vector per visual token in sequence order.

        A family whose tower has more outputs than the injected features (e.g. features added to later layers)
        returns ``(features, extras)``; ``extras`` reaches the blocks as ``LMInput.vision_extras``."""
        raise NotImplementedError

    def _vision_output(self, inputs: dict[str, Any], layout: TokenLayout) -> tuple[Float[Tensor, "batch m d_model"], dict[str, Tensor]]:
        """``vision.hook_out``: the tower's features, or ``vision_features=`` (validated here for every family),
        and the tower's extra outputs (empty when ``vision_features=`` was given)."""
        feats = inputs.get("vision_features")
        extras: dict[str, Tensor] = {}
        if feats is None:
            out = self._vision_features(inputs, layout)
            feats, extras = out if isinstance(out, tuple) else (out, {})
        else:
            from hooked_vlm.input_checks import check_vision_features

            per_row = [int((layout.item[bi] >= 0).sum()) for bi in range(layout.batch_size)]
            check_vision_features(feats, layout.batch_size, per_row, self.cfg.d_model)
        return self.vision.hook_out(feats), extras

    def _inject(self, embeds: Tensor, feats: Tensor, layout: TokenLayout) -> Tensor:
        """Write each prompt's features into its visual positions (in sequence order)."""
        embeds = embeds.clone()
        for bi in range(embeds.shape[0]):
            pos = (layout.item[bi] >= 0).nonzero().flatten()
            if pos.numel():
                embeds[bi, pos] = feats[bi, : pos.numel()].to(embeds.dtype)
        return embeds

    def _position_ids(self, inputs: dict[str, Any], layout: TokenLayout | None, past: int) -> Tensor:
        """Rotary position ids (``position_ids=`` when given, else ``past .. past + L - 1``)."""
        raise NotImplementedError

    def _attention_masks(self, inputs: dict[str, Any], layout: TokenLayout | None, past: int) -> dict[str, MaskSpec]:
        """One :class:`MaskSpec` per layer type: causal, padding keys hidden, a window on sliding layers, and the
        family's bidirectional spans (:meth:`_bidirectional_ids`)."""
        from hooked_vlm.families.decoder import decoder_masks

        return decoder_masks(self.cfg.layer_types, inputs.get("attention_mask"), past, self.decoder.sliding_window,
                             bidir_ids=self._bidirectional_ids(layout))

    def _bidirectional_ids(self, layout: TokenLayout | None) -> Tensor | None:
        """``[B, L]`` ids: positions sharing an id >= 0 see each other (e.g. one image's tokens); None = causal."""
        return None

    def _rotary_tables(self, positions: Tensor, masks: dict[str, MaskSpec]) -> dict[str, tuple[Tensor, Tensor]]:
        """cos / sin per layer type (1-D RoPE from :meth:`_register_rope`'s tables)."""
        from hooked_vlm.components.rotary import rope_cos_sin

        tables: dict[str, tuple[Tensor, Tensor]] = {}
        for kind in masks:
            tables[kind] = rope_cos_sin(positions, getattr(self, f"inv_freq_{kind}"), self.rope_scaling[kind])
        return tables

    def encode_vision(self, **inputs: Any) -> Float[Tensor, "batch m d_model"]:
        """Run only the vision tower (and projector): ``vision.hook_out``, one row per prompt; pass it back as
        ``vision_features=`` to skip the tower."""
        layout = self._layout(dict(inputs))
        out = self._vision_features(inputs, layout)
        return self.vision.hook_out(out[0] if isinstance(out, tuple) else out)

    def _layers_reading_vision(self) -> int:
        """How many first blocks add vision-tower outputs besides the injected features (:meth:`_after_block`):
        a forward from ``start_at_layer`` below this would miss them (default 0)."""
        return 0

    def _after_block(self, index: int, resid: Float[Tensor, "batch pos d_model"], prep: LMInput) -> Float[Tensor, "batch pos d_model"]:
        """What enters block ``index + 1`` given block ``index``'s output (default: unchanged). A family that adds
        to the residual between blocks (e.g. DeepStack visual features) overrides this and fires a named hook
        on what it adds, so the residual decomposition stays exact."""
        return resid

    def layout(self, **inputs: Any) -> TokenLayout:
        """Describe every position of the given inputs (see :class:`hooked_vlm.layout.TokenLayout`), validated."""
        return self._described(self._layout(dict(inputs)))

    def _described(self, layout: TokenLayout) -> TokenLayout:
        """The layout with the family's item-kind -> pixel-input names (``TokenLayout.pixel_inputs``)."""
        layout.pixel_inputs = dict(self.input_schema().pixel_kinds)
        return layout

    # ----- capability queries (what analyses may rely on; public, no private state) ----------------------
    #: ``input_ids`` rows are prompts of one batch (a two-tower model's rows are texts scored against images).
    generative: ClassVar[bool] = True
    #: ``forward`` takes ``past_key_values`` (a :class:`KVCache`): generation and prefix reuse work.
    supports_kv_cache: ClassVar[bool] = True
    #: every block broadcasts positions and masks over the batch, so a batch-1 residual may be expanded to n
    #: rows at any block (the sweeps' layer skip).
    blocks_broadcast_batch: ClassVar[bool] = True
    #: attention edges can be knocked out by mask (:meth:`knockout`), no L x L matrix needed.
    supports_mask_knockout: ClassVar[bool] = True

    def prefix_reuse_problem(self, **inputs: Any) -> str | None:
        """Why the keys and values of a prefix of these inputs could NOT be reused for an edited continuation
        (None: they can). Reuse is exact when every language-model mask is causal with no bidirectional spans
        or segments, because then no prefix position sees a later one. Cheap: builds the layout, not the tower."""
        inputs = dict(inputs)
        self._check_inputs(inputs, 0)
        masks = self._attention_masks(inputs, self._layout(inputs), 0)
        for kind, spec in masks.items():
            if not spec.causal or spec.bidir_ids is not None or spec.doc_ids is not None:
                return f"the language model's {kind} mask is not purely causal (bidirectional spans or segments)"
        return None

    def can_reuse_prefix(self, **inputs: Any) -> bool:
        """Whether a prefix's key/value cache stays exact under edits of later positions (see
        :meth:`prefix_reuse_problem`)."""
        return self.prefix_reuse_problem(**inputs) is None

    def knockout(self, knockout: "Knockout", layers: Sequence[int] | None = None, tower: str = "lm") -> Any:
        """Context manager: remove the attention edges of ``knockout`` (a :class:`kernels.mask.Knockout` over
        this run's positions) in ``layers`` (None = all) of ``tower`` for the enclosed runs, by mask."""
        from hooked_vlm.components.attn_stats import knockout as knockout_context

        return knockout_context(self, knockout, layers, tower)

    @classmethod
    def input_schema(cls) -> "InputSchema":
        """Which keyword inputs this family takes and how they are laid out (its registration's schema)."""
        from hooked_vlm.errors import UnsupportedModelError
        from hooked_vlm.families.registry import InputSchema, family_for_architecture

        try:
            return family_for_architecture(cls.hf_architectures[0]).input_schema
        except (UnsupportedModelError, IndexError):  # a class outside hooked_vlm.families: its input_names
            return InputSchema(per_sequence=tuple(cls.input_names))

    @classmethod
    def convert_hf_state_dict(cls, hf_config: Any, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Map Hugging Face parameter names (in-memory or on-disk layout) to ours."""
        raise NotImplementedError

    @classmethod
    def config_from_hf(cls, hf_config: Any) -> HookedVLMConfig:
        raise NotImplementedError

    # ----- construction --------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model: nn.Module, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> "HookedVLM":
        """Build the hooked twin of an in-memory transformers model (same weights, same outputs)."""
        from hooked_vlm.loading import from_hf

        return from_hf(hf_model, dtype=dtype, device=device)

    @classmethod
    def from_pretrained(
        cls, path_or_id: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None, seed: int = 0
    ) -> "HookedVLM":
        """A built-in model by name (``hooked-vlm models``; ``seed`` picks its random weights), a local checkpoint
        folder (config.json + safetensors, sharded or not) or a hub id; the tokenizer is attached when known."""
        from hooked_vlm.loading import from_pretrained

        return from_pretrained(path_or_id, dtype=dtype, device=device, seed=seed)

    # ----- TransformerLens-style weights ------------------------------------------------------------------
    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.weight

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.weight.T

    @property
    def b_U(self) -> Float[Tensor, "d_vocab"]:
        return torch.zeros(self.cfg.d_vocab, dtype=self.unembed.weight.dtype, device=self.unembed.weight.device)

    def tokens_to_residual_directions(self, tokens: Tensor | int) -> Tensor:
        """Unembedding directions of the given token ids (for ``ActivationCache.logit_attrs``)."""
        tokens = torch.as_tensor(tokens, device=self.unembed.weight.device)
        return self.unembed.weight[tokens]

    # ----- forward ---------------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor | None = None, **inputs: Any) -> Tensor:
        """Logits ``[batch, seq, vocab]`` for the Hugging Face keyword inputs of this family.

        Extra keywords: ``position_ids`` (override positions), ``vision_features`` (reuse a previous
        ``vision.hook_out`` and skip the vision tower), ``return_type`` ("logits"; "loss": the mean
        next-token cross-entropy over text targets, see :meth:`text_loss`; "both": ``(logits, loss)``;
        "resid": the final normalised residual; None), ``stop_at_layer`` (return the residual entering that block; ``n_layers``: after the last one),
        ``past_key_values`` (a :class:`KVCache`, used by :meth:`generate`), ``final_positions=n`` (the final
        block computes only the last n positions, so the output covers only them: exact and cheaper when
        only the last token's logits matter; the final block's hooks after ``hook_resid_pre`` then see n
        positions), ``start_at_layer=l`` with ``resid=`` (``[batch, seq, d_model]``, the residual entering block
        ``l``, e.g. from ``stop_at_layer=l``): run blocks ``l..`` only, as TransformerLens's ``start_at_layer``;
        the other inputs still give positions, masks and ``past_key_values``; no embedding, vision tower or hook
        before ``blocks.{l}.hook_resid_pre`` runs.
        """
        cache: KVCache | None = inputs.pop("past_key_values", None)
        return_type = inputs.pop("return_type", "logits")
        stop_at_layer = inputs.pop("stop_at_layer", None)
        final_positions = inputs.pop("final_positions", None)
        start_at_layer = inputs.pop("start_at_layer", None)
        resid_in = inputs.pop("resid", None)
        if return_type not in RETURN_TYPES:
            raise ValueError(f"return_type must be one of {list(RETURN_TYPES)}, got {return_type!r}")
        _check_not_a_dict(input_ids, "forward")
        if isinstance(input_ids, Tensor) and input_ids.dim() == 2 and 0 in input_ids.shape:
            raise InputError(
                f"input_ids {tuple(input_ids.shape)} holds no tokens; give at least one position per prompt "
                "(build prompts with the family's input builder, e.g. hooked_vlm.inputs.build_qwen_inputs)"
            )
        inputs["input_ids"] = input_ids
        self._check_input_names(inputs)
        self._check_stop_and_final(stop_at_layer, final_positions, input_ids)
        self._check_start(start_at_layer, resid_in, stop_at_layer, input_ids)
        prep = self._prepare(inputs, cache, resid=resid_in)
        resid = prep.embeds
        first = start_at_layer or 0
        for i, block in enumerate(self.blocks):
            if stop_at_layer is not None and i == stop_at_layer:
                return resid
            if i < first:
                continue
            kind = self.cfg.layer_types[i]
            cos, sin = prep.rotary[kind]
            if final_positions is not None and i == len(self.blocks) - 1:
                resid = block(resid, cos, sin, prep.masks[kind], cache, last_queries=final_positions)
            else:
                resid = block(resid, cos, sin, prep.masks[kind], cache)
            resid = self._after_block(i, resid, prep)
        if stop_at_layer == len(self.blocks):
            return resid
        normed = self.ln_final(resid)
        if return_type == "resid":
            return normed
        if return_type is None:
            return None
        logits = self.unembed(normed)
        if return_type == "logits":
            return logits
        loss = self.text_loss(logits, input_ids, inputs.get("attention_mask"), prep.layout)
        return loss if return_type == "loss" else (logits, loss)

    def text_loss(
        self, logits: Float[Tensor, "batch pos d_vocab"], input_ids: Int[Tensor, "batch pos"],
        attention_mask: Tensor | None = None, layout: TokenLayout | None = None,
    ) -> Float[Tensor, ""]:
        """Mean next-token cross-entropy over text targets: position p predicts token p+1 wherever token p+1
        is text (per the token layout; without one: not padding and not an image / video placeholder) and
        both positions are real (``attention_mask``). Visual and special tokens are never targets."""
        if logits.shape[1] != input_ids.shape[1]:
            raise ValueError("return_type='loss' needs logits at every position; drop final_positions")
        target = self._text_targets(input_ids, attention_mask, layout)[:, 1:]
        if attention_mask is not None:
            target = target & attention_mask[:, :-1].bool()
        if not bool(target.any()):
            raise InputError("return_type='loss' needs at least one text token after the first position; this input has none")
        logprobs = logits[:, :-1].float().log_softmax(-1)
        nll = -logprobs.gather(-1, input_ids[:, 1:, None])[..., 0]
        return nll[target].mean().to(logits.dtype)

    def _text_targets(self, input_ids: Tensor, attention_mask: Tensor | None, layout: TokenLayout | None) -> Tensor:
        from hooked_vlm.layout import TEXT

        if layout is not None and layout.kind.shape == input_ids.shape:
            return layout.kind == TEXT
        text = torch.ones_like(input_ids, dtype=torch.bool)
        hf = self.cfg.hf_config or {}
        for key in ("image_token_id", "video_token_id", "image_token_index", "video_token_index"):
            if hf.get(key) is not None:
                text &= input_ids != int(hf[key])
        return text if attention_mask is None else text & attention_mask.bool()

    def _check_stop_and_final(self, stop_at_layer: Any, final_positions: Any, input_ids: Tensor | None) -> None:
        """``stop_at_layer`` must name a block (0..n_layers, n = after the last); ``final_positions`` 1..L."""
        n = self.cfg.n_layers
        if stop_at_layer is not None and not (_is_int(stop_at_layer) and 0 <= stop_at_layer <= n):
            raise InputError(
                f"stop_at_layer={stop_at_layer!r} is not a block index: this model has {n} blocks, so pass 0..{n} "
                f"(the residual entering that block; {n} = after the last block) or None for the logits"
            )
        if final_positions is not None:
            length = None if input_ids is None else int(input_ids.shape[-1])
            if not (_is_int(final_positions) and final_positions >= 1 and (length is None or final_positions <= length)):
                raise InputError(
                    f"final_positions={final_positions!r} must be an integer from 1 to the sequence length"
                    + (f" ({length})" if length is not None else "")
                    + ": it is how many last positions the final block computes (None = all)"
                )

    def _check_start(self, start_at_layer: Any, resid: Any, stop_at_layer: Any, input_ids: Tensor | None) -> None:
        """``start_at_layer`` names a block (0..n_layers) and comes with ``resid`` ``[B, L, d_model]`` matching
        ``input_ids``; not above ``stop_at_layer``; not inside the blocks that read the vision tower's extras."""
        n = self.cfg.n_layers
        if start_at_layer is None and resid is None:
            return
        if start_at_layer is None or resid is None:
            raise InputError(
                "start_at_layer and resid go together: pass start_at_layer=l and resid= the residual entering block l "
                "(e.g. model(**inputs, stop_at_layer=l)), or neither"
            )
        if not (_is_int(start_at_layer) and 0 <= start_at_layer <= n):
            raise InputError(f"start_at_layer={start_at_layer!r} is not a block index: this model has {n} blocks, so pass 0..{n}")
        if stop_at_layer is not None and stop_at_layer < start_at_layer:
            raise InputError(f"stop_at_layer={stop_at_layer} is below start_at_layer={start_at_layer}: no block would run")
        want = None if input_ids is None else (*input_ids.shape[:2], self.cfg.d_model)
        if not isinstance(resid, Tensor) or resid.dim() != 3 or (want is not None and tuple(resid.shape) != want):
            got = tuple(resid.shape) if isinstance(resid, Tensor) else type(resid).__name__
            raise InputError(
                f"resid must be the residual [batch, seq, d_model] = {want} of these input_ids entering block "
                f"{start_at_layer}, got {got}"
            )
        reading = self._layers_reading_vision()
        if start_at_layer < reading:
            raise InputError(
                f"start_at_layer={start_at_layer} skips the vision tower, but blocks 0..{reading - 1} of "
                f"{type(self).__name__} add its outputs to the residual after them; start at {reading} or later"
            )

    def _check_input_names(self, inputs: dict[str, Any]) -> None:
        allowed = set(self.input_names) | set(self.generic_inputs)
        unknown = [k for k in inputs if k not in allowed and inputs[k] is not None]
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unexpected input(s) {unknown}; it accepts "
                f"{sorted(self.input_names)} (the Hugging Face keyword tensors) and {sorted(self.generic_inputs)}"
            )

    # ----- hooks and caching: see CheckedHooksMixin ---------------------------------------------------
    def run_with_cache(self, *model_args: Any, attn_stats: Any = None, vision_attn_stats: Any = None, **kwargs: Any):  # type: ignore[override]
        """Forward with caching; returns ``(logits, ActivationCache)`` (TransformerLens semantics).

        ``attn_stats`` / ``vision_attn_stats``: an :class:`~hooked_vlm.components.attention.AttnStatsRequest`
        for the language model / the vision tower. The attention layers then run the ``kernels`` path and
        fire ``attn.hook_lse``, ``hook_region``, ``hook_row_mass``, ``hook_colsum`` and ``hook_rows`` (cache
        them with ``names_filter``), and apply the request's exact knockout, without an L x L matrix.
        """
        from contextlib import ExitStack

        from hooked_vlm.components.attention import attn_stats_request

        with ExitStack() as stack:
            if attn_stats is not None:
                stack.enter_context(attn_stats_request(self, attn_stats, tower="lm"))
            if vision_attn_stats is not None:
                stack.enter_context(attn_stats_request(self, vision_attn_stats, tower="vision"))
            return super().run_with_cache(*model_args, **kwargs)

    def to_nnsight(self, **kwargs: Any) -> Any:
        """This model as an nnsight model (every hook point addressable by its module path; several
        invokes per trace; ``remote=True`` on an NDIF server). See :mod:`hooked_vlm.nnsight_ext`."""
        from hooked_vlm.nnsight_ext import to_nnsight

        return to_nnsight(self, **kwargs)

    def hook_table(self) -> list[tuple[str, str]]:
        """(name, documented shape) of every hook point, in module order."""
        from hooked_vlm.hook_table import describe_hook

        return [(name, describe_hook(name)) for name in self.hook_dict]

    # ----- generation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, max_new_tokens: int = 16, eos_token_id: int | None = None, **inputs: Any) -> Int[Tensor, "batch total"]:
        """Greedy decoding with a KV cache; returns prompt + generated ids (as HF ``generate``).

        Hooks behave as in a forward: at prefill every hook fires once with the full prompt (vision tower
        included); at each decode step only language-model hooks fire, with ``pos = 1`` (the new token), and
        attention patterns of a decode step are ``[B, H, 1, L_so_far]``.
        """
        _check_not_a_dict(max_new_tokens, "generate")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer (tokens to generate), got {max_new_tokens!r}")
        if "input_ids" not in inputs:
            raise TypeError("generate needs the prompt: model.generate(**inputs, max_new_tokens=...) with input_ids among inputs")
        if inputs.get("return_type", "logits") != "logits":
            raise ValueError("generate decodes from logits; drop return_type")
        input_ids = inputs.pop("input_ids")
        attention_mask = inputs.pop("attention_mask", None)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cache = KVCache()
        positions = self._generation_positions(input_ids, attention_mask, inputs)
        logits = self(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache, **inputs)
        next_pos = positions.amax(dim=(0, 2)) + 1 if positions.dim() == 3 else positions.amax(dim=-1) + 1
        out = input_ids
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            token = logits[:, -1].argmax(-1)
            if eos_token_id is not None:
                token = torch.where(finished, torch.full_like(token, eos_token_id), token)
                finished |= token == eos_token_id
            out = torch.cat([out, token[:, None]], dim=1)
            if step == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            step_pos = next_pos[:, None]
            pos_ids = step_pos[None].expand(3, -1, -1) if positions.dim() == 3 else step_pos
            logits = self(input_ids=token[:, None], attention_mask=attention_mask, position_ids=pos_ids, past_key_values=cache)
            next_pos = next_pos + 1
        return out

    def _generation_positions(self, input_ids: Tensor, attention_mask: Tensor, inputs: dict[str, Any]) -> Tensor:
        """Prompt positions as HF ``generate`` computes them (padding-aware)."""
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.masked_fill(attention_mask == 0, 1)


def _check_not_a_dict(value: Any, method: str) -> None:
    """A dict passed positionally (``model(inputs)``) instead of unpacked (``model(**inputs)``)."""
    if isinstance(value, dict):
        call = "model(**inputs)" if method == "forward" else f"model.{method}(**inputs)"
        raise TypeError(f"{method} got a dict as a positional argument; unpack the keyword tensors: {call}")


def _is_int(x: Any) -> bool:
    """A Python / numpy integer (not a bool)."""
    import numbers

    return isinstance(x, numbers.Integral) and not isinstance(x, bool)
