"""HookedVLMConfig: the language-model shape in TransformerLens's field names, plus the HF config it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class HookedVLMConfig:
    """Fields named as in ``HookedTransformerConfig`` so TransformerLens's ``ActivationCache`` tools work."""

    family: str
    architecture: str
    n_layers: int
    d_model: int
    n_heads: int
    n_key_value_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    act_fn: str
    eps: float
    layer_types: list[str]
    hf_config: dict[str, Any] = field(repr=False, default_factory=dict)
    tie_word_embeddings: bool = False
    normalization_type: str = "RMS"
    final_rms: bool = True
    attn_only: bool = False
    positional_embedding_type: str = "rotary"
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    # TransformerLens compatibility fields read by some ActivationCache helpers.
    model_name: str = ""
    original_architecture: str = ""
    use_attn_result: bool = False
    default_prepend_bos: bool = False

    @property
    def d_vocab_out(self) -> int:
        return self.d_vocab
