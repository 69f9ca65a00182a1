"""Tiny reference models whose outputs can see a one-position or one-constant error.

The built-in tiny configs (``hooked_vlm.tiny``) use rope_theta 1e6 with 8 rotary frequencies per head, so the
width section of M-RoPE turns by ~1e-4 rad per position and an off-by-one there moves the logits by less than
the equivalence tolerance. These overrides (applied here, never to the shared defaults) make every position
axis and family constant matter: a small rope theta, head dims that give each M-RoPE section several
frequencies, and a Gemma 3 ``query_pre_attn_scalar`` different from ``head_dim``.
"""

from __future__ import annotations

from typing import Any

import torch

from hooked_vlm.tiny import TINY_MODELS, randomize_

#: Qwen text overrides: 2 heads of 32 dims (16 frequencies: T 4, H 6, W 6), one key/value head, theta 10.
QWEN_TEXT = dict(num_attention_heads=2, num_key_value_heads=1)
QWEN_ROPE = {"rope_type": "default", "rope_theta": 10.0, "mrope_section": [4, 6, 6]}
#: Gemma 3: softmax scale from query_pre_attn_scalar 40 (not head_dim 16); small local / global thetas.
GEMMA_SCALAR = 40
GEMMA_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
              "full_attention": {"rope_type": "default", "rope_theta": 100.0}}


def _build(name: str, cfg: Any, seed: int) -> Any:
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = TINY_MODELS[name][1](cfg)
    randomize_(model, seed)
    return model.eval()


def sensitive_qwen_hf(family: str, seed: int = 0) -> Any:
    """A Qwen2-VL / Qwen2.5-VL reference model in which all three M-RoPE axes turn visibly per position."""
    cfg = TINY_MODELS[family][0]()
    for k, v in QWEN_TEXT.items():
        setattr(cfg.text_config, k, v)
    cfg.text_config.rope_parameters = dict(QWEN_ROPE)
    return _build(family, cfg, seed)


def sensitive_gemma3_hf(seed: int = 0, **overrides: Any) -> Any:
    """A Gemma 3 reference model with ``query_pre_attn_scalar != head_dim`` and small rope thetas."""
    cfg = TINY_MODELS["tiny-gemma3"][0](rope_parameters=GEMMA_ROPE, **overrides)
    cfg.text_config.query_pre_attn_scalar = GEMMA_SCALAR
    return _build("tiny-gemma3", cfg, seed)
