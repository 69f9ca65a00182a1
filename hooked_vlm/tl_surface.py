"""The TransformerLens ``HookedTransformer`` surface of a hooked VLM's language model.

Weights stacked over layers with TransformerLens's shapes (``W_Q [n_layers, n_heads, d_model, d_head]``,
``W_in [n_layers, d_model, d_mlp]``, ...; grouped-query keys and values repeated to every query head as
TransformerLens's ``GroupedQueryAttention.W_K`` does), ``accumulated_bias``, the tokenizer helpers
(``to_tokens``, ``to_str_tokens``, ``to_string``, ``set_tokenizer``) and ``set_use_attn_result``.
Weights are views into (or functions of) the live parameters, as in TransformerLens.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor


class TransformerLensSurface:
    """Mixin for :class:`hooked_vlm.HookedVLM` (needs ``blocks``, ``cfg`` and ``tokenizer``)."""

    tokenizer: Any

    # ----- weights stacked over layers ----------------------------------------------------------------
    def _stack(self, attr: str, sub: str) -> Tensor:
        return torch.stack([getattr(getattr(block, sub), attr) for block in self.blocks], dim=0)  # type: ignore[attr-defined]

    @property
    def W_Q(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack("W_Q", "attn")

    @property
    def W_K(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack("W_K", "attn")

    @property
    def W_V(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack("W_V", "attn")

    @property
    def W_O(self) -> Float[Tensor, "n_layers n_heads d_head d_model"]:
        return self._stack("W_O", "attn")

    @property
    def b_Q(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stack("b_Q", "attn")

    @property
    def b_K(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stack("b_K", "attn")

    @property
    def b_V(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stack("b_V", "attn")

    @property
    def b_O(self) -> Float[Tensor, "n_layers d_model"]:
        return self._stack("b_O", "attn")

    @property
    def W_in(self) -> Float[Tensor, "n_layers d_model d_mlp"]:
        return self._stack("W_in", "mlp")

    @property
    def W_gate(self) -> Float[Tensor, "n_layers d_model d_mlp"]:
        return self._stack("W_gate", "mlp")

    @property
    def W_out(self) -> Float[Tensor, "n_layers d_mlp d_model"]:
        return self._stack("W_out", "mlp")

    @property
    def b_in(self) -> Float[Tensor, "n_layers d_mlp"]:
        return self._stack("b_in", "mlp")

    @property
    def b_out(self) -> Float[Tensor, "n_layers d_model"]:
        return self._stack("b_out", "mlp")

    @property
    def QK(self):
        """TransformerLens's ``FactoredMatrix`` of every head's query-key circuit ``W_Q @ W_K^T``."""
        from transformer_lens import FactoredMatrix

        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self):
        """TransformerLens's ``FactoredMatrix`` of every head's output-value circuit ``W_V @ W_O``."""
        from transformer_lens import FactoredMatrix

        return FactoredMatrix(self.W_V, self.W_O)

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> Float[Tensor, "d_model"]:
        """Sum of the attention output biases (and MLP output biases) written before ``layer``'s residual.

        As TransformerLens: ``layer`` blocks' ``b_O`` (+ ``b_out``), plus block ``layer``'s ``b_O`` when
        ``mlp_input``. Exact only where no norm follows a sublayer (Gemma 3's post-norms rescale it).
        """
        total = torch.zeros(self.cfg.d_model, device=self.W_E.device, dtype=self.W_E.dtype)  # type: ignore[attr-defined]
        for i in range(layer):
            total = total + self.blocks[i].attn.b_O  # type: ignore[attr-defined]
            if include_mlp_biases:
                total = total + self.blocks[i].mlp.b_out  # type: ignore[attr-defined]
        if mlp_input:
            if layer >= len(self.blocks):  # type: ignore[attr-defined]
                raise ValueError(f"mlp_input=True needs layer < n_layers ({len(self.blocks)}), got {layer}")  # type: ignore[attr-defined]
            total = total + self.blocks[layer].attn.b_O  # type: ignore[attr-defined]
        return total

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Make every language-model attention fire ``hook_result [B, L, H, d_model]`` (per-head outputs)."""
        for block in self.blocks:  # type: ignore[attr-defined]
            block.attn.use_attn_result = use_attn_result
        self.cfg.use_attn_result = use_attn_result  # type: ignore[attr-defined]

    # ----- tokenizer ------------------------------------------------------------------------------------
    def set_tokenizer(self, tokenizer: Any) -> None:
        """Attach a Hugging Face tokenizer (``from_pretrained`` does this for built-ins and checkpoint folders)."""
        self.tokenizer = tokenizer

    def _need_tokenizer(self) -> Any:
        if getattr(self, "tokenizer", None) is None:
            raise ValueError(
                "this model has no tokenizer: attach one with model.set_tokenizer(AutoTokenizer.from_pretrained(folder)) "
                "(HookedVLM.from_pretrained attaches it for built-in names and folders that ship one)"
            )
        return self.tokenizer

    def to_tokens(self, text: str | list[str], prepend_bos: bool | None = None, padding_side: str | None = None) -> Int[Tensor, "batch pos"]:
        """Token ids ``[batch, pos]`` of text (no image placeholders are expanded: use the input builders for
        multimodal prompts). ``prepend_bos=None`` keeps the tokenizer's own choice; a batch is padded on
        ``padding_side`` (default: the tokenizer's)."""
        tok = self._need_tokenizer()
        texts = [text] if isinstance(text, str) else list(text)
        rows = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
        bos = tok.bos_token_id
        if prepend_bos is not None and bos is not None:
            rows = [r[1:] if r[:1] == [bos] else r for r in rows]
            if prepend_bos:
                rows = [[bos] + r for r in rows]
        side = padding_side or getattr(tok, "padding_side", "right")
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        width = max(len(r) for r in rows)
        padded = [([pad] * (width - len(r)) + r) if side == "left" else (r + [pad] * (width - len(r))) for r in rows]
        return torch.tensor(padded, dtype=torch.long, device=self.W_E.device)  # type: ignore[attr-defined]

    def to_string(self, tokens: Tensor | list[int]) -> str | list[str]:
        """Decode ids: ``[pos]`` -> one string, ``[batch, pos]`` -> a list of strings (special tokens kept)."""
        tok = self._need_tokenizer()
        tokens = torch.as_tensor(tokens)
        if tokens.dim() == 2:
            return [tok.decode(row.tolist()) for row in tokens]
        return tok.decode(tokens.tolist())

    def to_str_tokens(self, input: str | Tensor | list[int], prepend_bos: bool | None = None) -> list[str]:
        """One string per token of a text (tokenized as :meth:`to_tokens`) or of ids ``[pos]`` / ``[1, pos]``."""
        tok = self._need_tokenizer()
        ids = self.to_tokens(input, prepend_bos=prepend_bos)[0] if isinstance(input, str) else torch.as_tensor(input)
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"to_str_tokens takes one sequence; got a batch of {ids.shape[0]} (index a row first)")
            ids = ids[0]
        return [tok.decode([i]) for i in ids.tolist()]

    def to_single_token(self, token: int | str) -> int:
        """The id of a string that is exactly one token (ints pass through)."""
        if isinstance(token, int):
            return token
        ids = self.to_tokens(token, prepend_bos=False)[0]
        if ids.numel() != 1:
            raise ValueError(f"{token!r} is {ids.numel()} tokens ({self.to_str_tokens(ids)}), not one")
        return int(ids[0])
