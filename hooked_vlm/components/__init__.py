"""Shared building blocks of every hooked model: norms, rotary embeddings, attention, MLPs, blocks."""

from hooked_vlm.components.attention import Attention, KVCache
from hooked_vlm.components.block import TransformerBlock
from hooked_vlm.components.mlp import MLP, GatedMLP
from hooked_vlm.components.norms import LayerNorm, RMSNorm

__all__ = ["Attention", "KVCache", "TransformerBlock", "MLP", "GatedMLP", "LayerNorm", "RMSNorm"]
